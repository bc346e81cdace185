//! Sessions started by init itself, at the daemon's request (protocol and reasons:
//! `berth-guest-proto`). A session's process is a child of init, so it lives in everything
//! Docker set up for the container (namespaces, cgroup, capabilities, seccomp, AppArmor,
//! `no_new_privs`), and its stdio are pipes or a terminal whose other end the daemon holds:
//! no engine process sits on the data path.
//!
//! Threads: one accepts connections, one per connection reads the request and starts the
//! process (then ends), one watches the connections of running sessions. Every descriptor this process opens is close-on-exec, so a process forked by one
//! thread never inherits another session's pipes or terminal. The main thread reaps (see
//! `init`) and reports each session's exit through [`reaped`].

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_guest_proto::{
    INIT_SOCKET_NAME, MAX_MESSAGE, Mode, PIPE_FDS, Reply, Request, message_len, recv_with_fds,
    send_with_fds,
};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// Running sessions: PID → the connection its exit is reported on. Taken from before the
/// fork until the `started` reply is sent, so an exit is never reported before the start.
/// Each entry carries the session's serial number: a PID can be reused by a later session
/// while an earlier one's connection is still open.
static SESSIONS: Mutex<BTreeMap<i32, (u64, UnixStream)>> = Mutex::new(BTreeMap::new());
static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Connections being served at once; more are closed at once (that login fails).
const MAX_CONNECTIONS: usize = 1024;
static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Starts listening; sessions are served on threads from then on. Call with the signals
/// init waits for already blocked, so that no thread takes them.
pub fn start() {
    let listener =
        SocketAddr::from_abstract_name(INIT_SOCKET_NAME).and_then(|a| UnixListener::bind_addr(&a));
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            // Sessions then go through the engine; nothing else depends on this.
            eprintln!("berth-guest: cannot listen for sessions: {e}");
            return;
        }
    };
    let wake = match nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
        Ok(p) => WAKE.get_or_init(|| p).0.as_raw_fd(),
        Err(e) => {
            eprintln!("berth-guest: cannot listen for sessions: {e}");
            return;
        }
    };
    let daemon_uid = host_root_here();
    let spawned = std::thread::Builder::new()
        .name("watch".into())
        .stack_size(64 * 1024)
        .spawn(move || watch_loop(wake))
        .and_then(|_| {
            std::thread::Builder::new()
                .name("accept".into())
                .stack_size(64 * 1024)
                .spawn(move || accept_loop(&listener, daemon_uid))
        });
    if let Err(e) = spawned {
        eprintln!("berth-guest: cannot start the session threads: {e}");
    }
}

fn accept_loop(listener: &UnixListener, daemon_uid: u32) {
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !from_daemon(&conn, daemon_uid) {
            continue;
        }
        if CONNECTIONS.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            CONNECTIONS.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name("session".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                serve(conn);
                CONNECTIONS.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            CONNECTIONS.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Only the daemon may ask: the host's root (`daemon_uid`, as it reads here), from outside
/// this PID namespace (a process there has no PID here, so its PID reads as 0). A process of
/// the container, root or not, never gets a process from init.
fn from_daemon(conn: &UnixStream, daemon_uid: u32) -> bool {
    getsockopt(conn, PeerCredentials).is_ok_and(|c| c.pid() == 0 && c.uid() == daemon_uid)
}

/// What the host's root (the daemon) reads as in this container: 0 without a user
/// namespace; under Docker's `userns-remap` host UID 0 is mapped to nothing here, and the
/// kernel shows an unmapped UID as the overflow UID (65534 unless the admin changed it).
fn host_root_here() -> u32 {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    match inside_of_outside_root(&map) {
        Some(uid) => uid,
        None if map.is_empty() => 0,
        None => std::fs::read_to_string("/proc/sys/kernel/overflowuid")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65534),
    }
}

/// The inside ID that outside ID 0 maps to, in text of the `/proc/self/uid_map` format
/// (lines of `inside outside count`); `None` when no line maps it.
fn inside_of_outside_root(map: &str) -> Option<u32> {
    map.lines().find_map(|l| {
        let mut f = l.split_whitespace().map(str::parse::<u32>);
        match (f.next(), f.next(), f.next()) {
            (Some(Ok(inside)), Some(Ok(0)), Some(Ok(count))) if count > 0 => Some(inside),
            _ => None,
        }
    })
}

/// One connection: one request, the process's start; then the connection is watched (see
/// [`watch_loop`]) and this thread ends.
fn serve(conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let started = read_request(&conn).and_then(|(msg, fds)| {
        let req = Request::decode(&msg).map_err(|e| format!("bad request: {e}"))?;
        start_session(&conn, req, fds)
    });
    match started {
        Ok(session) => watch(session, conn),
        Err(text) => {
            let _ = send(&conn, &Reply::Error(text));
        }
    }
}

/// Connections of started sessions, watched for the daemon closing them. Only the watcher
/// thread removes entries, so their descriptors stay valid while it polls them.
static WATCHED: Mutex<Vec<((i32, u64), UnixStream)>> = Mutex::new(Vec::new());
/// Written to when an entry is added, to wake the watcher's poll.
static WAKE: std::sync::OnceLock<(OwnedFd, OwnedFd)> = std::sync::OnceLock::new();

fn watch(session: (i32, u64), conn: UnixStream) {
    let Some((_, wake)) = WAKE.get() else {
        return;
    };
    if let Ok(mut w) = WATCHED.lock() {
        w.push((session, conn));
    }
    let _ = nix::unistd::write(wake, b"x");
}

/// One thread for every session's connection (not one each: a thread counts against the
/// container's pids limit like a process). The daemon closes a connection once it has read
/// the exit; if it closes first while the process runs (the daemon was killed), the process
/// is hung up, as a terminal hang-up would.
fn watch_loop(wake: RawFd) {
    let mut buf = [0u8; 256];
    loop {
        let watched: Vec<((i32, u64), RawFd)> = WATCHED
            .lock()
            .map(|w| w.iter().map(|(p, c)| (*p, c.as_raw_fd())).collect())
            .unwrap_or_default();
        let mut fds: Vec<libc::pollfd> = std::iter::once(wake)
            .chain(watched.iter().map(|&(_, fd)| fd))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for the call; the descriptors stay open
        // (only this thread closes watched connections).
        #[allow(unsafe_code)]
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        let mut closed = Vec::new();
        for (pfd, &(session, fd)) in fds.iter().skip(1).zip(&watched) {
            if pfd.revents == 0 {
                continue;
            }
            // SAFETY: a plain read into `buf`, on a descriptor that stays open (see above).
            #[allow(unsafe_code)]
            let got =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            let again = got < 0 && Errno::last() == Errno::EAGAIN;
            if got == 0 || (got < 0 && !again) {
                closed.push(session);
            }
        }
        if fds.first().is_some_and(|w| w.revents != 0) {
            let _ = nix::unistd::read(
                // SAFETY: the wake pipe's read end lives in WAKE for the whole process.
                #[allow(unsafe_code)]
                unsafe {
                    std::os::fd::BorrowedFd::borrow_raw(wake)
                },
                &mut buf,
            );
        }
        if closed.is_empty() {
            continue;
        }
        if let Ok(mut w) = WATCHED.lock() {
            w.retain(|(s, _)| !closed.contains(s));
        }
        if let Ok(mut sessions) = SESSIONS.lock() {
            for (pid, serial) in closed {
                if sessions.get(&pid).is_some_and(|(s, _)| *s == serial) {
                    sessions.remove(&pid);
                    hang_up(pid);
                }
            }
        }
    }
}

/// Reads one whole request and the descriptors sent with it.
fn read_request(conn: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    let mut msg = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match message_len(&msg).map_err(|e| e.to_string())? {
            Some(len) if msg.len() == len => return Ok((msg, fds)),
            Some(len) if msg.len() > len => return Err("data after the request".into()),
            _ => {}
        }
        let got = recv_with_fds(conn.as_fd(), &mut buf, 0).map_err(|e| format!("read: {e}"))?;
        fds.extend(got.fds);
        if got.bytes == 0 {
            return Err("connection closed".into());
        }
        msg.extend_from_slice(buf.get(..got.bytes).unwrap_or_default());
        if got.truncated || msg.len() > MAX_MESSAGE + 4 || fds.len() > PIPE_FDS {
            return Err("request too large".into());
        }
    }
}

/// Sends a reply. Replies are a few dozen bytes: one call sends them whole into an empty
/// socket buffer, without waiting.
fn send(conn: &UnixStream, reply: &Reply) -> std::io::Result<()> {
    let bytes = reply.encode();
    let n = send_with_fds(conn.as_fd(), &bytes, &[], libc::MSG_DONTWAIT)?;
    if n == bytes.len() {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE))
    }
}

/// What the child needs, prepared before the fork (the child of a threaded process may
/// only make async-signal-safe calls: no allocation).
struct Prepared {
    path: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    /// What the child prints when the exec fails, before the reason.
    failure: Vec<u8>,
}

/// Starts the session; its PID and serial number.
fn start_session(conn: &UnixStream, req: Request, fds: Vec<OwnedFd>) -> Result<(i32, u64), String> {
    let prepared = prepare(&req)?;
    if fds.len() != req.mode.fds() {
        return Err(format!(
            "{:?} mode takes {} descriptors",
            req.mode,
            req.mode.fds()
        ));
    }
    let mut fds = fds.into_iter();
    let mut next = || raise(fds.next().ok_or_else(|| "descriptor missing".to_owned())?);
    let stdio = match req.mode {
        Mode::Pipe => [next()?, next()?, next()?],
        Mode::Tty => {
            let terminal = next()?;
            let (a, b) = (dup(&terminal)?, dup(&terminal)?);
            [terminal, a, b]
        }
    };
    let argv: Vec<*const libc::c_char> = prepared
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = prepared
        .env
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let raw = stdio.each_ref().map(AsRawFd::as_raw_fd);
    let tty = req.mode == Mode::Tty;
    let mut sessions = SESSIONS.lock().map_err(|_| "internal error".to_owned())?;
    // SAFETY: the child only makes async-signal-safe calls on memory prepared above (see
    // `child`), then execs or exits.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Child) => child(&prepared, &argv, &envp, raw, tty),
        Ok(ForkResult::Parent { child }) => {
            drop(stdio);
            let pid = child.as_raw();
            let serial = SERIAL.fetch_add(1, Ordering::SeqCst);
            let sent = send(conn, &Reply::Started { pid });
            match (sent, conn.try_clone()) {
                (Ok(()), Ok(report)) => {
                    sessions.insert(pid, (serial, report));
                }
                // Nobody to report to: the process runs on as an orphan would. Hang it up
                // (still under the lock: it cannot have been reaped, so the PID is its own).
                _ => hang_up(pid),
            }
            Ok((pid, serial))
        }
        Err(e) => Err(format!("cannot start a process: {}", e.desc())),
    }
}

/// Resolves the command on PATH (the session's, else init's) and builds argv and the
/// environment: init's (what Docker gave the container) overridden by the request's.
fn prepare(req: &Request) -> Result<Prepared, String> {
    let cstring = |b: &[u8]| CString::new(b).map_err(|_| "NUL in the request".to_owned());
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for kv in &req.env {
        let eq = kv.iter().position(|&b| b == b'=').unwrap_or(kv.len());
        let (k, v) = kv.split_at(eq);
        env.insert(
            OsStr::from_bytes(k).to_owned(),
            OsStr::from_bytes(v.get(1..).unwrap_or_default()).to_owned(),
        );
    }
    let cmd = req.argv.first().ok_or_else(|| "no command".to_owned())?;
    let path = find_on_path(cmd, env.get(OsStr::new("PATH")).map(OsString::as_os_str));
    let mut failure = b"berth-guest: cannot run ".to_vec();
    failure.extend_from_slice(cmd);
    failure.extend_from_slice(b": ");
    Ok(Prepared {
        path: cstring(&path)?,
        argv: req
            .argv
            .iter()
            .map(|a| cstring(a))
            .collect::<Result<_, _>>()?,
        env: env
            .into_iter()
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                cstring(&kv)
            })
            .collect::<Result<_, _>>()?,
        failure,
    })
}

const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `cmd` itself when it holds a slash, else the first executable file of that name on
/// `path`; `cmd` unchanged when there is none (the exec then fails with ENOENT).
fn find_on_path(cmd: &[u8], path: Option<&OsStr>) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    if cmd.contains(&b'/') || cmd.is_empty() {
        return cmd.to_vec();
    }
    let path = path.map_or(DEFAULT_PATH, OsStrExt::as_bytes);
    for dir in path.split(|&b| b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        let mut candidate = dir.to_vec();
        candidate.push(b'/');
        candidate.extend_from_slice(cmd);
        let executable = std::fs::metadata(OsStr::from_bytes(&candidate))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            return candidate;
        }
    }
    cmd.to_vec()
}

/// A descriptor numbered above stdio, so the child's `dup2`s onto 0, 1 and 2 never
/// overwrite one another (init's own stdio could in principle be closed).
fn raise(fd: OwnedFd) -> Result<OwnedFd, String> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let raised = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(3)).map_err(|e| e.to_string())?;
    // SAFETY: fcntl just made `raised`, a new descriptor nothing else owns.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(raised) })
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, String> {
    fd.as_fd().try_clone_to_owned().map_err(|e| e.to_string())
}

/// The forked child: a new session, the terminal as its controlling terminal, stdio in
/// place, default signal handling, then the exec. Only async-signal-safe calls.
fn child(
    p: &Prepared,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    stdio: [RawFd; 3],
    tty: bool,
) -> ! {
    // SAFETY: raw libc calls on valid pointers and descriptors; all async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Rust ignores SIGPIPE in this process; an ignored signal stays ignored across exec.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::setsid();
        if tty {
            libc::ioctl(stdio[0], libc::TIOCSCTTY, 0);
        }
        for (target, fd) in stdio.iter().enumerate() {
            libc::dup2(*fd, target as libc::c_int);
        }
        libc::execve(p.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        let reason: &[u8] = match *libc::__errno_location() {
            libc::ENOENT => b"No such file or directory\n",
            libc::EACCES => b"Permission denied\n",
            libc::ENOEXEC => b"Exec format error\n",
            libc::ENOMEM => b"Out of memory\n",
            _ => b"cannot execute\n",
        };
        libc::write(2, p.failure.as_ptr().cast(), p.failure.len());
        libc::write(2, reason.as_ptr().cast(), reason.len());
        libc::_exit(127);
    }
}

/// SIGHUP to a session's process group (its process leads one: `setsid`) and to the
/// process itself. Called with [`SESSIONS`] held and the PID in it: not reaped, not reused.
fn hang_up(pid: i32) {
    let _ = kill(Pid::from_raw(-pid), Signal::SIGHUP);
    let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
}

/// Reaps every child that has exited (several exits can share one SIGCHLD) and reports each
/// session's end to the daemon. Holds [`SESSIONS`] throughout, so a PID found there is never
/// one already reaped (and perhaps reused) when another thread signals it.
pub fn reap_children() {
    let Ok(mut sessions) = SESSIONS.lock() else {
        return;
    };
    loop {
        let (pid, code) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(WaitStatus::Exited(pid, code)) => (pid, i64::from(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + i64::from(sig as i32)),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        if let Some((_, conn)) = sessions.remove(&pid.as_raw()) {
            let _ = send(&conn, &Reply::Exit { code });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_process_of_the_same_pid_namespace_is_not_the_daemon() {
        // The peer here is this very process: it has a PID in this namespace.
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(!from_daemon(&a, 0));
        assert!(!from_daemon(&a, nix::unistd::geteuid().as_raw()));
    }

    #[test]
    fn the_host_root_is_found_in_a_uid_map() {
        // No user namespace: host root is root here. Docker's userns-remap: it is not mapped
        // at all (the caller then takes the overflow UID).
        assert_eq!(inside_of_outside_root("0 0 4294967295\n"), Some(0));
        assert_eq!(inside_of_outside_root("0 100000 65536\n"), None);
        assert_eq!(inside_of_outside_root("0 100000 65536\n7 0 1\n"), Some(7));
        assert_eq!(inside_of_outside_root("7 0 0\n"), None);
        assert_eq!(inside_of_outside_root(""), None);
        // This test's own namespace: whatever it maps, the answer is a UID.
        let _ = host_root_here();
    }

    #[test]
    fn finds_commands_on_path() {
        let path = OsStr::new("/nonexistent:/bin:/usr/bin");
        assert!(find_on_path(b"sh", Some(path)).ends_with(b"/sh"));
        assert_eq!(find_on_path(b"./x", Some(path)), b"./x");
        assert_eq!(
            find_on_path(b"no-such-cmd-here", Some(path)),
            b"no-such-cmd-here"
        );
        // A directory named like the command is not it.
        assert_eq!(find_on_path(b"tmp", Some(OsStr::new("/"))), b"tmp");
    }

    #[test]
    fn the_request_overrides_init_environment() {
        let req = Request {
            mode: Mode::Pipe,
            argv: vec![b"sh".to_vec()],
            env: vec![b"PATH=/bin".to_vec(), b"TERM=dumb".to_vec()],
        };
        let p = prepare(&req).unwrap();
        let env: Vec<&[u8]> = p.env.iter().map(|c| c.as_bytes()).collect();
        assert!(env.contains(&&b"PATH=/bin"[..]));
        assert!(env.contains(&&b"TERM=dumb"[..]));
        assert_eq!(env.iter().filter(|e| e.starts_with(b"PATH=")).count(), 1);
        assert_eq!(p.path.as_bytes(), b"/bin/sh");
    }
}
