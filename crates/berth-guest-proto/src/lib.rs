//! The two protocols between the Berth daemon and its helper in every user's container, and
//! the descriptor passing both sides use. Depends on libc alone: the static guest links it as
//! well as the daemon.
//!
//! - The spawn protocol (below): the daemon asks `berth-guest init`, the container's PID 1,
//!   to start a session.
//! - The words protocol ([`words`]): a process in the container asks the daemon for
//!   `daemon`, `nodaemon` or `stopnow`.
//!
//! # The spawn protocol
//!
//! `berth-guest init` listens on the abstract unix stream socket [`INIT_SOCKET_NAME`] in its
//! container's network namespace (abstract names are per network namespace, so each
//! container has its own and nothing outside it can see it). The daemon reaches it from a
//! thread that joined that namespace, checks with `SO_PEERCRED` that the listener is the
//! container's init, and for each SSH session sends one [`Request`]:
//!
//! - pipe mode: three file descriptors ride along (`SCM_RIGHTS`): the read end of the
//!   session's stdin pipe and the write ends of its stdout and stderr pipes. The daemon keeps
//!   the other ends, so session bytes go straight between the daemon and the process.
//! - tty mode: one descriptor, the terminal. The daemon opens the pseudo-terminal master in
//!   the container's own devpts, sets its size, and sends only the terminal (`TIOCGPTPEER`);
//!   the master stays with the daemon alone, so nobody in the container can change how the
//!   daemon's end behaves (a shared `O_NONBLOCK` flag, for one).
//!
//! The guest accepts only connections from outside its PID namespace made by root
//! (`SO_PEERCRED`: PID 0, UID 0, or under a user namespace that does not map host root, the
//! overflow UID it reads as), i.e. the daemon, never a process of the container. It
//! forks, the child starts a new session (`setsid`, the terminal as its controlling terminal) and execs the command with init's environment plus the request's.
//! The process inherits everything Docker set up for init: namespaces, cgroup (limits),
//! capabilities, seccomp, AppArmor, `no_new_privs`. The guest answers `started PID` (PID in
//! the container's namespace) or `error TEXT`; when the process ends it sends
//! `exit CODE` (the exit status, or 128 + the signal, as Docker reports it). When the daemon
//! closes the connection while the process still runs (the daemon was killed), the guest
//! sends its process group SIGHUP, as a terminal hang-up would. Replies carry no descriptors.
//!
//! Framing: a message is a `u32` little-endian body length ([`MAX_MESSAGE`] at most) and a
//! body of fields, each a `u32` little-endian length and that many bytes. Everything the
//! other side sends is checked: a root user can replace her container's init.

pub mod fds;
pub mod words;

/// The abstract socket name `berth-guest init` listens on (without the leading NUL).
pub const INIT_SOCKET_NAME: &[u8] = b"berth-guest/spawn/1";

/// The largest message body either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Descriptors that ride along a pipe-mode request: stdin (read end), stdout, stderr.
pub const PIPE_FDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stdio are the three pipes sent along.
    Pipe,
    /// Stdio is the terminal sent along, which becomes the controlling terminal.
    Tty,
}

impl Mode {
    /// How many descriptors a request in this mode carries.
    pub fn fds(self) -> usize {
        match self {
            Self::Pipe => PIPE_FDS,
            Self::Tty => 1,
        }
    }
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
        let mode = match self.mode {
            Mode::Pipe => "pipe",
            Mode::Tty => "tty",
        };
        let argc = self.argv.len().to_string();
        let mut f: Vec<&[u8]> = vec![b"spawn", mode.as_bytes(), argc.as_bytes()];
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
            Some(b"tty") => Mode::Tty,
            _ => return Err(WireError("unknown mode")),
        };
        let argc: usize = number(f.get(2))?;
        let rest = f.get(3..).unwrap_or_default();
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

/// At most this many descriptors are sent with one message, and accepted by either side.
pub const MAX_FDS: usize = 4;

/// Sends `data` (all of it or part, like `send`) with `fds` attached (`SCM_RIGHTS`), never
/// raising SIGPIPE. `flags` are added (`MSG_DONTWAIT`). At most [`MAX_FDS`] descriptors.
pub fn send_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
    flags: i32,
) -> std::io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    send_rights(sock, data, fds, flags)
}

/// `sendmsg` with `fds` as one `SCM_RIGHTS` message (up to 14: the control buffer's room).
fn send_rights(
    sock: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
    flags: i32,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut space = [0u64; 8];
    if std::mem::size_of_val(fds) + 16 > std::mem::size_of_val(&space) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    #[allow(unsafe_code)]
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: the control buffer (64 bytes, 8-aligned) holds one header (16 bytes) and
        // the descriptors (checked above); CMSG_* compute offsets inside it.
        #[allow(unsafe_code)]
        unsafe {
            msg.msg_control = space.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(bytes as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    #[allow(unsafe_code)]
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | flags) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// What one [`recv_with_fds`] got.
#[derive(Debug)]
pub struct Received {
    pub bytes: usize,
    /// Every descriptor that came, close-on-exec, owned (closed when dropped).
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// More descriptors came than a message can carry (the kernel closed the rest).
    pub truncated: bool,
    /// Credentials came with it (`SCM_CREDENTIALS`, on a socket with `SO_PASSCRED`): a
    /// message was read, even an empty one (the end of a packet socket brings none).
    pub credentials: bool,
}

/// Receives into `buf` and takes ownership of every descriptor that came with the bytes,
/// also when more came than fit (a sender can attach any number: none may leak).
pub fn recv_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    flags: i32,
) -> std::io::Result<Received> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // Room for SCM_MAX_FD (253) descriptors and whatever else the socket's options bring
    // before them (credentials, a pidfd, a security label: the sender may have set them on
    // a socket it then sent): a list the kernel truncates is closed by the kernel on this
    // thread, and the close of a hostile descriptor (a lingering socket) can block; every
    // descriptor that arrives is handed to the caller instead.
    let mut space = [0u64; 512];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    #[allow(unsafe_code)]
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&space);
    // SAFETY: `msg` points at live buffers for the duration of the call.
    #[allow(unsafe_code)]
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
    let bytes = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    let mut fds = Vec::new();
    let mut credentials = false;
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR/NXTHDR walk it within
    // msg_controllen, and each SCM_RIGHTS payload holds cmsg_len - CMSG_LEN(0) bytes of
    // descriptors the kernel installed for us (also when it truncated the list).
    #[allow(unsafe_code)]
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            credentials |=
                (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS;
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(c).cast::<i32>();
                for i in 0..len / std::mem::size_of::<i32>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        bytes,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        credentials,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn requests_round_trip() {
        for mode in [Mode::Pipe, Mode::Tty] {
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
    fn descriptors_pass_and_none_leak_when_too_many_come() {
        use std::os::fd::{AsFd, AsRawFd};
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = std::io::pipe().unwrap();
        let raw = [r.as_raw_fd(); 3];
        assert_eq!(send_with_fds(a.as_fd(), b"hi", &raw, 0).unwrap(), 2);
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!((got.bytes, got.fds.len(), got.truncated), (2, 3, false));
        // More than MAX_FDS, sent raw (send_with_fds refuses): all arrive, owned (the
        // receiver decides what to do with them; none is closed behind its back).
        let many: Vec<i32> = vec![r.as_raw_fd(); 7];
        assert_eq!(send_rights(a.as_fd(), b"x", &many, 0).unwrap(), 1);
        let got = recv_with_fds(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!((got.bytes, got.fds.len(), got.truncated), (1, 7, false));
        assert!(send_with_fds(a.as_fd(), b"x", &many, 0).is_err());
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
            frame(&[b"spawn", b"pipe", b"0"]),
            frame(&[b"spawn", b"pipe", b"2", b"x"]),
            frame(&[b"spawn", b"pty", b"1", b"x"]),
            frame(&[b"spawn", b"tty", b"-1", b"x"]),
            frame(&[b"spawn", b"pipe", b"1", b"x\0y"]),
            frame(&[b"spawn", b"pipe", b"1", b"x", b"NOVALUE"]),
            frame(&[b"spawn", b"pipe", b"1", b"x", b"=x"]),
            frame(&[b"exec", b"pipe", b"1", b"x"]),
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
