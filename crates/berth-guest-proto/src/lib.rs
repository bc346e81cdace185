//! The spawn protocol between the Berth daemon and `berth-guest init`, the PID 1 of every
//! user's container. No dependencies: the static guest links it as well as the daemon.
//!
//! `berth-guest init` listens on the abstract unix stream socket [`SOCKET_NAME`] in its
//! container's network namespace (abstract names are per network namespace, so each
//! container has its own and nothing outside it can see it). The daemon reaches it from a
//! thread that joined that namespace, checks with `SO_PEERCRED` that the listener is the
//! container's init, and for each SSH session sends one [`Request`]:
//!
//! - pipe mode: three file descriptors ride along (`SCM_RIGHTS`): the read end of the
//!   session's stdin pipe and the write ends of its stdout and stderr pipes. The daemon keeps
//!   the other ends, so session bytes go straight between the daemon and the process.
//! - tty mode: no descriptors; the guest opens a pseudo-terminal in the container (its own
//!   devpts), sets the size, and sends the master back with its reply.
//!
//! The guest forks, the child starts a new session (`setsid`, the terminal as its
//! controlling terminal) and execs the command with init's environment plus the request's.
//! The process inherits everything Docker set up for init: namespaces, cgroup (limits),
//! capabilities, seccomp, AppArmor, `no_new_privs`. The guest answers `started PID` (PID in
//! the container's namespace) or `error TEXT`; when the process ends it sends
//! `exit CODE` (the exit status, or 128 + the signal, as Docker reports it). When the daemon
//! closes the connection while the process still runs (the daemon was killed), the guest
//! sends it SIGHUP, as a terminal hang-up would.
//!
//! Framing: a message is a `u32` little-endian body length ([`MAX_MESSAGE`] at most) and a
//! body of fields, each a `u32` little-endian length and that many bytes. Everything the
//! other side sends is checked: a root user can replace her container's init.

/// The abstract socket name (without the leading NUL).
pub const SOCKET_NAME: &[u8] = b"berth-guest/spawn/1";

/// The largest message body either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Descriptors that ride along a pipe-mode request: stdin (read end), stdout, stderr.
pub const PIPE_FDS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Stdio are the three pipes sent along.
    Pipe,
    /// A pseudo-terminal of this size.
    Tty { cols: u16, rows: u16 },
}

/// Start `argv` with init's environment overridden by `env` (`KEY=VALUE` each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub mode: Mode,
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The process runs; its PID in the container.
    Started {
        pid: i32,
    },
    Error(String),
    /// The process ended: exit status, or 128 + signal.
    Exit {
        code: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub &'static str);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for WireError {}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    // Fields are bounded by MAX_MESSAGE well below u32::MAX.
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

fn frame(fields: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for f in fields {
        put(&mut body, f);
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length of the message at the start of `buf`, header included, once its header is
/// there; an error when it announces more than [`MAX_MESSAGE`].
pub fn message_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(len) = read_u32(buf) else {
        return Ok(None);
    };
    if len > MAX_MESSAGE {
        return Err(WireError("message too long"));
    }
    Ok(Some(len + 4))
}

fn read_u32(buf: &[u8]) -> Option<usize> {
    let head: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(head) as usize)
}

/// The fields of one whole message (header included, as [`message_len`] measured).
fn fields(msg: &[u8]) -> Result<Vec<&[u8]>, WireError> {
    let mut rest = msg.get(4..).ok_or(WireError("short message"))?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = read_u32(rest).ok_or(WireError("truncated field"))?;
        let field = rest
            .get(4..4 + len)
            .ok_or(WireError("field past the end of the message"))?;
        out.push(field);
        rest = rest.get(4 + len..).unwrap_or_default();
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(field: Option<&&[u8]>) -> Result<T, WireError> {
    field
        .and_then(|f| std::str::from_utf8(f).ok())
        .and_then(|s| s.parse().ok())
        .ok_or(WireError("bad number"))
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let (mode, cols, rows) = match self.mode {
            Mode::Pipe => ("pipe", 0, 0),
            Mode::Tty { cols, rows } => ("tty", cols, rows),
        };
        let (cols, rows, argc) = (
            cols.to_string(),
            rows.to_string(),
            self.argv.len().to_string(),
        );
        let mut f: Vec<&[u8]> = vec![
            b"spawn",
            mode.as_bytes(),
            cols.as_bytes(),
            rows.as_bytes(),
            argc.as_bytes(),
        ];
        f.extend(self.argv.iter().map(Vec::as_slice));
        f.extend(self.env.iter().map(Vec::as_slice));
        frame(&f)
    }

    pub fn decode(msg: &[u8]) -> Result<Self, WireError> {
        let f = fields(msg)?;
        if f.first() != Some(&&b"spawn"[..]) {
            return Err(WireError("not a spawn request"));
        }
        let mode = match f.get(1).copied() {
            Some(b"pipe") => Mode::Pipe,
            Some(b"tty") => Mode::Tty {
                cols: number(f.get(2))?,
                rows: number(f.get(3))?,
            },
            _ => return Err(WireError("unknown mode")),
        };
        let argc: usize = number(f.get(4))?;
        let rest = f.get(5..).unwrap_or_default();
        if argc == 0 || argc > rest.len() {
            return Err(WireError("bad argument count"));
        }
        let (argv, env) = rest.split_at(argc);
        let no_nul = |v: &&[u8]| !v.contains(&0);
        if !argv.iter().all(no_nul) || !env.iter().all(no_nul) {
            return Err(WireError("NUL in an argument or variable"));
        }
        if !env.iter().all(|e| e.iter().skip(1).any(|&b| b == b'=')) {
            return Err(WireError("a variable without KEY="));
        }
        Ok(Self {
            mode,
            argv: argv.iter().map(|a| a.to_vec()).collect(),
            env: env.iter().map(|e| e.to_vec()).collect(),
        })
    }
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Started { pid } => frame(&[b"started", pid.to_string().as_bytes()]),
            Self::Error(text) => frame(&[b"error", text.as_bytes()]),
            Self::Exit { code } => frame(&[b"exit", code.to_string().as_bytes()]),
        }
    }

    pub fn decode(msg: &[u8]) -> Result<Self, WireError> {
        let f = fields(msg)?;
        match (f.first().copied(), f.len()) {
            (Some(b"started"), 2) => Ok(Self::Started {
                pid: number(f.get(1))?,
            }),
            (Some(b"error"), 2) => Ok(Self::Error(
                String::from_utf8_lossy(f.get(1).copied().unwrap_or_default()).into_owned(),
            )),
            (Some(b"exit"), 2) => Ok(Self::Exit {
                code: number(f.get(1))?,
            }),
            _ => Err(WireError("unknown reply")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn requests_round_trip() {
        for mode in [Mode::Pipe, Mode::Tty { cols: 80, rows: 24 }] {
            let r = Request {
                mode,
                argv: vec![b"/bin/sh".to_vec(), b"-c".to_vec(), b"".to_vec()],
                env: vec![b"TERM=xterm".to_vec(), b"EMPTY=".to_vec()],
            };
            let msg = r.encode();
            assert_eq!(message_len(&msg).unwrap(), Some(msg.len()));
            assert_eq!(Request::decode(&msg).unwrap(), r);
        }
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Started { pid: 42 },
            Reply::Error("no such thing".into()),
            Reply::Exit { code: 137 },
        ] {
            assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn bad_messages_are_refused() {
        let ok = Request {
            mode: Mode::Pipe,
            argv: vec![b"true".to_vec()],
            env: vec![],
        };
        let good = ok.encode();
        // Truncated anywhere inside a field.
        for cut in 5..good.len() {
            let mut m = good[..cut].to_vec();
            m[..4].copy_from_slice(&((cut - 4) as u32).to_le_bytes());
            assert!(Request::decode(&m).is_err(), "cut at {cut}");
        }
        let bad = [
            frame(&[b"spawn", b"pipe", b"0", b"0", b"0"]),
            frame(&[b"spawn", b"pipe", b"0", b"0", b"2", b"x"]),
            frame(&[b"spawn", b"pty", b"0", b"0", b"1", b"x"]),
            frame(&[b"spawn", b"tty", b"80", b"-1", b"1", b"x"]),
            frame(&[b"spawn", b"pipe", b"0", b"0", b"1", b"x\0y"]),
            frame(&[b"spawn", b"pipe", b"0", b"0", b"1", b"x", b"NOVALUE"]),
            frame(&[b"spawn", b"pipe", b"0", b"0", b"1", b"x", b"=x"]),
            frame(&[b"exec", b"pipe", b"0", b"0", b"1", b"x"]),
        ];
        for m in &bad {
            assert!(Request::decode(m).is_err(), "{m:?}");
        }
        assert!(Reply::decode(&frame(&[b"started", b"x"])).is_err());
        assert!(Reply::decode(&frame(&[b"exit"])).is_err());
        let mut huge = vec![0u8; 4];
        huge.copy_from_slice(&((MAX_MESSAGE + 1) as u32).to_le_bytes());
        assert!(message_len(&huge).is_err());
        assert_eq!(message_len(&[1, 0]).unwrap(), None);
    }
}
