//! `berth connect`: the user's laptop side. Mounts local directories at the same paths in
//! her container and runs a command there (or a login shell), through her own `ssh`.
//!
//! One `ssh` master connection carries everything: its own session is the first mount's
//! subsystem (`berth-connect@berth`), further mounts and the command are sessions
//! multiplexed on it (`ssh -S`), so the user authenticates once and `~/.ssh/config`, her
//! agent, `known_hosts` and `ProxyJump` all apply. This process serves each directory on
//! its subsystem's stdin/stdout (`berth_connect::serve`, which keeps every request beneath
//! the directory); nothing listens on the laptop, nothing needs root or FUSE here.
//!
//! When the command ends (or this process is killed, or the network drops) the subsystems'
//! channels close and the daemon takes the mounts away.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use berth_connect::client::Wire;
use berth_connect::proto::{self, ToDaemon, ToLaptop};
use tokio::process::{Child, Command};

use crate::Failure;

/// How long the mounts' connections get to end by themselves once the command is done.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// The original connect.sh's flags keep their meaning: `-u USER -h HOST -p DIR -i KEY -m
/// COMMAND`. (`-h` is the host, so help is `--help` only.)
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// The server as ssh takes it: [user@]host (your ~/.ssh/config applies)
    #[arg(value_name = "[USER@]HOST")]
    destination: Option<String>,
    /// A local directory to mount at the same path in the container (repeatable; default:
    /// the current directory)
    #[arg(
        long = "mount",
        short = 'p',
        visible_short_alias = 'l',
        value_name = "DIR"
    )]
    mounts: Vec<PathBuf>,
    /// The user on the server (connect.sh's -u)
    #[arg(short = 'u', value_name = "USER")]
    user: Option<String>,
    /// The server (connect.sh's -h)
    #[arg(short = 'h', value_name = "HOST")]
    host: Option<String>,
    /// The server's SSH port (default: from ~/.ssh/config, else ssh's own)
    #[arg(long, short = 'P', value_name = "PORT")]
    port: Option<u16>,
    /// The private key to log in with (ssh -i)
    #[arg(short = 'i', short_alias = 'k', value_name = "FILE")]
    identity: Option<PathBuf>,
    /// The command to run, as one string (connect.sh's -m); or give it after --
    #[arg(short = 'm', value_name = "COMMAND", conflicts_with = "command")]
    command_line: Option<String>,
    /// An option for ssh, as ssh -o takes it (repeatable)
    #[arg(short = 'o', value_name = "OPTION")]
    ssh_options: Vec<String>,
    /// The command to run in the container, in the first directory
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
    /// Print help
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

pub fn run(args: Args) -> ExitCode {
    match run_inner(args) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {}", f.message);
            if let Some(h) = f.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(f.code)
        }
    }
}

/// A directory to serve: where it is here, and where it appears in the container (the
/// same absolute path).
struct Local {
    path: PathBuf,
    dir: std::fs::File,
}

fn run_inner(args: Args) -> Result<u8, Failure> {
    let destination = destination(&args)?;
    let mut locals = Vec::new();
    let asked = if args.mounts.is_empty() {
        vec![
            std::env::current_dir()
                .map_err(|e| Failure::new(format!("the current directory: {e}")))?,
        ]
    } else {
        args.mounts.clone()
    };
    for p in asked {
        let local = local(&p)?;
        if locals.iter().any(|l: &Local| l.path == local.path) {
            return Err(Failure::new(format!(
                "{} is given twice",
                local.path.display()
            )));
        }
        locals.push(local);
    }
    let command = match (&args.command_line, args.command.is_empty()) {
        (Some(c), _) => Some(c.clone()),
        (None, false) => Some(args.command.join(" ")),
        (None, true) => None,
    };
    // The control socket lives in a directory only this user can enter.
    let control_dir = tempfile::Builder::new()
        .prefix("berth-connect-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(|e| Failure::new(format!("cannot make a temporary directory: {e}")))?;
    let control = control_dir.path().join("ssh");
    // Before any thread of the runtime allocates.
    tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the async runtime: {e}")))?;
    // connect.sh logged in with `ssh -Y` when it ran no command.
    let x11 = command.is_none() && std::env::var_os("DISPLAY").is_some();
    let ssh = Ssh {
        destination,
        control,
        args: &args,
        x11,
    };
    rt.block_on(connect(ssh, locals, command))
}

fn destination(args: &Args) -> Result<String, Failure> {
    // Nothing given as the server may be taken by ssh for an option.
    for v in [&args.destination, &args.host, &args.user]
        .into_iter()
        .flatten()
    {
        if v.starts_with('-') || v.is_empty() {
            return Err(Failure {
                message: format!("{v:?} is not a server or user name"),
                hint: None,
                code: 2,
            });
        }
    }
    match (&args.destination, &args.host) {
        (Some(_), Some(_)) => Err(Failure::new(
            "give the server once: as [USER@]HOST or with -h",
        )),
        (Some(d), None) => Ok(match &args.user {
            Some(u) if !d.contains('@') => format!("{u}@{d}"),
            _ => d.clone(),
        }),
        (None, Some(h)) => Ok(match &args.user {
            Some(u) => format!("{u}@{h}"),
            None => h.clone(),
        }),
        (None, None) => Err(Failure {
            message: "which server? give [USER@]HOST".into(),
            hint: Some("berth connect alice@server --mount ~/src -- make".into()),
            code: 2,
        }),
    }
}

/// `p` as a directory to serve: it must exist and be a directory; its path in the container
/// is its absolute path here (`..` and `.` taken out as the shell's `cd` would).
fn local(p: &Path) -> Result<Local, Failure> {
    let abs = std::path::absolute(p).map_err(|e| Failure::new(format!("{}: {e}", p.display())))?;
    let mut path = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                path.pop();
            }
            Component::CurDir => {}
            c => path.push(c),
        }
    }
    let meta =
        std::fs::metadata(&path).map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Err(Failure::new(format!(
            "{} is not a directory",
            path.display()
        )));
    }
    let path =
        berth_connect::target::check(path.as_os_str().as_bytes()).map_err(|e| Failure::new(e.0))?;
    let dir = berth_connect::serve::open_root(&path)
        .map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    Ok(Local { path, dir })
}

/// How to run ssh against the server, with the user's options.
struct Ssh<'a> {
    destination: String,
    control: PathBuf,
    args: &'a Args,
    /// The login shell gets trusted X11 forwarding (`-Y`).
    x11: bool,
}

impl Ssh<'_> {
    fn command(&self, master: bool) -> Command {
        let mut c = Command::new("ssh");
        if let Some(p) = self.args.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(i) = &self.args.identity {
            c.arg("-i").arg(i);
        }
        for o in &self.args.ssh_options {
            c.arg("-o").arg(o);
        }
        // A network that drops is noticed here too (the first value of an option wins, so
        // the user's own -o comes first).
        c.args([
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ]);
        if master {
            c.args(["-M", "-o", "ControlPersist=no"]);
            // The master makes the X11 request of a multiplexed session, and only if its
            // own options allow it (the mount's subsystem ignores its own request).
            if self.x11 {
                c.args(["-o", "ForwardX11=yes", "-o", "ForwardX11Trusted=yes"]);
            }
        }
        c.arg("-S").arg(&self.control);
        c
    }
}

/// Sets up glibc's allocator for the laptop's end, a process that moves 256 KiB frames for as
/// long as it runs.
///
/// Buffers below 1 MiB (a frame, a read of the file) come from the heap, and the heap keeps
/// up to 8 MiB free at its top: with glibc's defaults each frame got pages of its own or
/// shrank the heap after it, and page faults filled them again (1 GiB read through the
/// mount: 0.85–2.0 s of this process's CPU before, 0.7–0.8 s after).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; thread-safe in glibc.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 1 << 20);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// The most a pipe to or from ssh holds: a whole wire frame ([`proto::MAX_FRAME`]) and more.
const PIPE_BYTES: i32 = 1 << 20;

/// Lets a pipe to or from ssh hold [`PIPE_BYTES`] (the default is 64 KiB): a frame then goes
/// in one write, where it took one wake-up of each side per 32 KiB ssh reads (these were a
/// quarter of the laptop's context switches in a bulk read). Where the system allows less
/// (`/proc/sys/fs/pipe-max-size`, or the user's pipe pages spent), the pipe stays as it is.
fn widen_pipe(pipe: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(pipe.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
}

/// One mount: its ssh (the master for the first) and the task serving its directory.
struct Mount {
    ssh: Child,
    serving: tokio::task::JoinHandle<()>,
}

async fn connect(ssh: Ssh<'_>, locals: Vec<Local>, command: Option<String>) -> Result<u8, Failure> {
    let mut mounts: Vec<Mount> = Vec::new();
    let mut first_path = None;
    for (i, local) in locals.into_iter().enumerate() {
        let mut c = ssh.command(i == 0);
        c.arg("-s")
            .arg(&ssh.destination)
            .arg(proto::SUBSYSTEM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = c
            .spawn()
            .map_err(|e| Failure::new(format!("cannot run ssh: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Failure::new("ssh has no pipes"));
        };
        widen_pipe(&stdin);
        widen_pipe(&stdout);
        let mut wire = Wire::new(stdout, stdin);
        let hello = ToDaemon::Hello {
            version: proto::VERSION,
            path: local.path.as_os_str().as_bytes().to_vec(),
        };
        let shown = local.path.display().to_string();
        let answer = async {
            wire.send(&hello).await?;
            wire.recv::<ToLaptop>().await
        }
        .await;
        match answer {
            Ok(Some(ToLaptop::Welcome { .. })) => {}
            Ok(Some(ToLaptop::Refused { reason })) => {
                return Err(Failure::new(format!("{shown}: {reason}")));
            }
            Ok(None) | Err(_) => {
                let why = match child.wait().await {
                    Ok(s) if s.code() == Some(255) => {
                        "ssh could not connect (see above)".to_owned()
                    }
                    _ => {
                        "the server does not offer berth connect (is it a Berth server?)".to_owned()
                    }
                };
                return Err(Failure::new(format!("{shown}: {why}")));
            }
            Ok(Some(ToLaptop::Request { .. })) => {
                return Err(Failure::new(format!(
                    "{shown}: the server spoke out of turn"
                )));
            }
        }
        eprintln!("berth connect: {shown} is mounted in the container");
        first_path.get_or_insert_with(|| local.path.clone());
        let serving = tokio::spawn(async move {
            if let Err(e) = berth_connect::serve::serve(local.dir, wire).await {
                eprintln!("berth connect: {shown}: {e}");
            }
        });
        mounts.push(Mount {
            ssh: child,
            serving,
        });
    }
    let Some(cwd) = first_path else {
        return Err(Failure::new("nothing to mount"));
    };
    // The command (or a login shell) in the first directory, on the master connection.
    let mut c = ssh.command(false);
    let interactive = command.is_none();
    if interactive {
        c.arg("-t");
    }
    if ssh.x11 {
        c.arg("-Y");
    }
    c.arg(&ssh.destination)
        .arg("--")
        .arg(remote_command(&cwd, command.as_deref()));
    // Ctrl-C is the command's (ssh passes it on, or it ends ssh); this process waits to
    // take the mounts down after it. A TERM or HUP to this process alone ends the command's
    // ssh first, so nothing is left running behind it.
    use tokio::signal::unix::{SignalKind, signal};
    let _ignore_interrupts = signal(SignalKind::interrupt());
    let (mut term, mut hup) = (
        signal(SignalKind::terminate()).map_err(|e| Failure::new(format!("signals: {e}")))?,
        signal(SignalKind::hangup()).map_err(|e| Failure::new(format!("signals: {e}")))?,
    );
    let mut child = c
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::new(format!("cannot run ssh: {e}")))?;
    let ended_by = tokio::select! {
        status = child.wait() => Ok(status),
        _ = term.recv() => Err(libc_signal::TERM),
        _ = hup.recv() => Err(libc_signal::HUP),
    };
    let code = match ended_by {
        Ok(Ok(status)) => exit_code(status),
        Ok(Err(e)) => {
            wind_down(mounts).await;
            return Err(Failure::new(format!("ssh: {e}")));
        }
        Err(sig) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            128 + sig
        }
    };
    wind_down(mounts).await;
    Ok(code)
}

/// Signal numbers (Linux), for exit codes.
mod libc_signal {
    pub const HUP: u8 = 1;
    pub const TERM: u8 = 15;
}

/// ssh's exit code, or 128 + the signal that ended it, as a shell reports it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(255),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
        (None, None) => 255,
    }
}

/// Ends the mounts: the extra ones first (their channels close), the master last.
async fn wind_down(mounts: Vec<Mount>) {
    for mut m in mounts.into_iter().rev() {
        m.serving.abort();
        // The serving task held ssh's stdin: its end is the channel's EOF.
        let _ = m.serving.await;
        if tokio::time::timeout(WIND_DOWN, m.ssh.wait()).await.is_err() {
            let _ = m.ssh.start_kill();
            let _ = m.ssh.wait().await;
        }
    }
}

/// What the container's shell runs: `cd` to the directory, then the command or a login
/// shell (root's shell from the image's `/etc/passwd`, as a login would start).
fn remote_command(cwd: &Path, command: Option<&str>) -> OsString {
    let mut s = OsString::from("cd -- ");
    s.push(quote(cwd.as_os_str().as_bytes()));
    s.push(" || exit 1; ");
    match command {
        Some(c) => s.push(c),
        None => s.push(
            "s=$(sed -n 's/^root:[^:]*:[^:]*:[^:]*:[^:]*:[^:]*://p' /etc/passwd 2>/dev/null); \
             [ -x \"$s\" ] || s=/bin/sh; SHELL=$s exec \"$s\" -l",
        ),
    }
    s
}

/// `b` in single quotes for a POSIX shell.
fn quote(b: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(b.len() + 2);
    out.push(b'\'');
    for &c in b {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    std::ffi::OsStr::from_bytes(&out).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        match Cli::try_parse_from(std::iter::once("connect").chain(argv.iter().copied())) {
            Ok(c) => c.args,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_original_flags_name_the_server_and_nothing_becomes_an_ssh_option() {
        let ok = |argv: &[&str]| destination(&parse(argv)).map_err(|f| f.message);
        assert_eq!(
            ok(&["-u", "alice", "-h", "server"]),
            Ok("alice@server".into())
        );
        assert_eq!(ok(&["alice@server"]), Ok("alice@server".into()));
        assert_eq!(ok(&["-u", "alice", "server"]), Ok("alice@server".into()));
        assert!(ok(&["-u=-oProxyCommand=x", "-h", "server"]).is_err());
        assert!(ok(&["-h=-oProxyCommand=x"]).is_err());
        assert!(ok(&["server", "-h", "other"]).is_err());
        assert!(ok(&[]).is_err());
        let a = parse(&["-p", "/tmp/a", "-l", "/tmp/b", "-m", "make", "s"]);
        assert_eq!(a.mounts, [PathBuf::from("/tmp/a"), PathBuf::from("/tmp/b")]);
        assert_eq!(a.command_line.as_deref(), Some("make"));
    }

    #[test]
    fn a_command_ended_by_a_signal_exits_as_a_shell_says() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(2)), 130);
    }

    #[test]
    fn the_remote_command_changes_to_the_directory_first() {
        let c = remote_command(Path::new("/home/a b/it's"), Some("make -j4"));
        assert_eq!(
            c,
            OsString::from("cd -- '/home/a b/it'\\''s' || exit 1; make -j4")
        );
    }
}
