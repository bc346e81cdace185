//! Sessions started by the container's init instead of a Docker exec (protocol:
//! `berth-guest-proto`).
//!
//! A Docker exec costs a runc start per session (tens of milliseconds) and puts `dockerd`
//! and the container shim on the data path, each copying every byte. Here the daemon sends
//! the container's `berth-guest init` the session's pipes (or asks it for a terminal), and
//! from then on the bytes go between this process and the session's process directly.
//!
//! Trust runs one way: the guest gets only the far ends of pipes, or the terminal of a pty
//! whose master the daemon opened (in the container's devpts) and keeps to itself, and
//! everything it sends back is checked: the reply is parsed strictly and bounded, the whole
//! handshake has one deadline (a connect that would wait is refused), descriptors it sends
//! are closed where closing cannot block us, and the PID it reports is looked up among init's
//! own children and guarded like any other. A root user can replace her init; the worst she
//! gets is a broken session of her own.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use berth_guest_proto::fds;
use berth_guest_proto::{
    INIT_SOCKET_NAME, Mode, Reply, Request, message_len, recv_with_fds, send_with_fds,
};
use futures_util::StreamExt;
use nix::fcntl::OFlag;
use nix::sys::socket::sockopt::PeerCredentials;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::exec::raw_output;
use crate::process::Identity;
use crate::{
    ContainerInit, Output, ProcessGuard, RootOwner, RuntimeError, Session, SessionHandle,
    SessionSpec, TtySize, sockets_in_netns,
};

/// How long the whole handshake with the guest may take: connect, request, reply.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// An init started less than this long ago that refuses a session is asked again: it may
/// not have bound its socket yet. An older one that refuses does not take sessions.
const YOUNG_INIT: Duration = Duration::from_secs(10);
/// How long to wait before asking a young init again.
const LISTEN_RETRY: Duration = Duration::from_millis(20);

/// How long ago process `p` started (its start in clock ticks since boot, against
/// `/proc/uptime`).
fn age(p: Identity) -> Option<Duration> {
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    #[allow(clippy::cast_precision_loss)]
    let started = p.start as f64 / hz as f64;
    Some(Duration::from_secs_f64((uptime - started).max(0.0)))
}
/// The largest reply read (replies are a few dozen bytes).
const MAX_REPLY: usize = 4096;

/// A session the guest started: its exit is read from the connection, a terminal session
/// is resized through its master. Dropping it closes the connection.
pub struct InitSession {
    /// The connection, and what was read of it past the `started` reply. Taken on drop and
    /// closed on the closer thread (see [`close_later`]).
    conn: tokio::sync::Mutex<(Option<tokio::net::UnixStream>, Vec<u8>)>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl std::fmt::Debug for InitSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitSession")
            .field("tty", &self.master.is_some())
            .finish()
    }
}

impl InitSession {
    pub(crate) fn resize(&self, size: TtySize) -> Result<(), RuntimeError> {
        let Some(master) = &self.master else {
            return Ok(());
        };
        resize_pty(master.get_ref().as_raw_fd(), size)
    }

    /// Waits for the process's end; its exit status (or 128 + signal).
    pub(crate) async fn exit_code(&self) -> Result<i64, RuntimeError> {
        let mut guard = self.conn.lock().await;
        let (conn, early) = &mut *guard;
        let conn = conn.as_ref().ok_or_else(|| lost("no connection"))?;
        let mut msg = std::mem::take(early);
        let mut buf = [0u8; 256];
        loop {
            match message_len(&msg) {
                Ok(Some(len)) if msg.len() >= len => break,
                Ok(_) if msg.len() <= 256 => {}
                _ => return Err(lost("a bad message")),
            }
            // Read with room for descriptors, never a plain read: descriptors attached to
            // bytes read without it are closed by the kernel on this (runtime) thread.
            let got = loop {
                conn.readable().await.map_err(|e| lost(&e.to_string()))?;
                match conn.try_io(tokio::io::Interest::READABLE, || {
                    recv_with_fds(conn.as_fd(), &mut buf, libc::MSG_DONTWAIT)
                }) {
                    Ok(got) => break got,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(lost(&e.to_string())),
                }
            };
            take_bytes(got, &buf, &mut msg).map_err(lost)?;
        }
        let len = message_len(&msg).ok().flatten().unwrap_or_default();
        match Reply::decode(msg.get(..len).unwrap_or_default()) {
            Ok(Reply::Exit { code }) => Ok(code),
            _ => Err(lost("a bad message")),
        }
    }
}

impl Drop for InitSession {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.get_mut().0.take()
            && let Ok(conn) = conn.into_std()
        {
            close_later(conn.into());
        }
    }
}

/// Appends what one read from a guest brought to `msg`. Replies and exits carry no
/// descriptors: any that came are closed off the runtime and the read refused; so is an end
/// of the connection before the message is whole.
fn take_bytes(
    got: berth_guest_proto::Received,
    buf: &[u8],
    msg: &mut Vec<u8>,
) -> Result<(), &'static str> {
    if !got.fds.is_empty() || got.truncated {
        discard(got.fds);
        return Err("unexpected descriptors");
    }
    if got.bytes == 0 {
        return Err("the connection closed");
    }
    msg.extend_from_slice(buf.get(..got.bytes).unwrap_or_default());
    Ok(())
}

/// Sets a terminal's size through its master.
fn resize_pty(master: RawFd, size: TtySize) -> Result<(), RuntimeError> {
    let ws = libc::winsize {
        ws_col: size.cols,
        ws_row: size.rows,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, valid for the call.
    #[allow(unsafe_code)]
    unsafe { set_winsize(master, &ws) }
        .map(drop)
        .map_err(|e| RuntimeError::Session(format!("resize: {e}")))
}

fn lost(what: &str) -> RuntimeError {
    RuntimeError::Session(format!(
        "session end not reported by the container's init: {what}"
    ))
}

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_read_bad!(pty_number, libc::TIOCGPTN, libc::c_uint);
nix::ioctl_write_ptr_bad!(set_pty_lock, libc::TIOCSPTLCK, libc::c_int);

/// Opens the network namespace and root directory of init `init` of container `container`
/// (its full id). Checked after the opens, so that they are that process's and not of one
/// that took its PID since; a container in the host's network namespace is refused (nothing
/// of Berth's may act in the host's namespace on a user's behalf).
pub(crate) fn open(init: Identity, container: &str) -> Result<ContainerInit, RuntimeError> {
    use std::os::unix::fs::MetadataExt;
    let not_running = || RuntimeError::ContainerNotFound(container.to_owned());
    let ns = File::open(format!("/proc/{}/ns/net", init.pid)).map_err(|_| not_running())?;
    // O_PATH: the directory is not opened (her init may have chrooted into a mount of hers
    // whose server, a `berth connect` laptop, would be asked), only held as a base for
    // lookups, which run off the async workers.
    let root = nix::fcntl::open(
        format!("/proc/{}/root", init.pid).as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map(File::from)
    .map_err(|_| not_running())?;
    if !init.alive(container) {
        return Err(not_running());
    }
    let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
    let host = File::open("/proc/self/ns/net").ok();
    if id(&ns).is_none() || host.as_ref().and_then(id) == id(&ns) {
        return Err(RuntimeError::HostNamespace(container.to_owned()));
    }
    Ok(ContainerInit {
        ns,
        root,
        init,
        container: container.to_owned(),
    })
}

/// Starts `spec` through init `init` of container `container` (its full id: processes are
/// guarded by it). `Ok(None)` when that init does not take sessions (one started by an
/// older Berth): the caller then uses the engine.
pub(crate) async fn spawn(
    init: Identity,
    container: &str,
    spec: &SessionSpec,
) -> Result<Option<Session>, RuntimeError> {
    let opened = open(init, container)?;
    // A terminal belongs to the container's root, whoever that is on the host.
    let owner = match spec.tty {
        Some(_) => Some(
            opened
                .root_owner()
                .ok_or_else(|| RuntimeError::ContainerNotFound(container.to_owned()))?,
        ),
        None => None,
    };
    let ContainerInit { ns, root, .. } = opened;
    let request = Request {
        mode: if spec.tty.is_some() {
            Mode::Tty
        } else {
            Mode::Pipe
        },
        argv: spec.cmd.iter().map(|a| a.clone().into_bytes()).collect(),
        env: spec.env.iter().map(|e| e.clone().into_bytes()).collect(),
    };
    let message = request.encode();
    // Our ends, and the ends the guest gets.
    let (ours, theirs): (Ends, Vec<OwnedFd>) = match spec.tty {
        Some(size) => {
            // Off the async workers: the lookup walks her root, which she may have made a
            // mount of hers whose server (a laptop) takes its time.
            let (master, terminal) =
                tokio::task::spawn_blocking(move || open_pty(&root, size, owner))
                    .await
                    .map_err(|_| RuntimeError::Session("terminal: the open failed".into()))??;
            (Ends::Tty(master), vec![terminal])
        }
        None => {
            let p = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io_err);
            let (in_r, in_w) = p()?;
            let (out_r, out_w) = p()?;
            let (err_r, err_w) = p()?;
            (Ends::Pipes([in_w, out_r, err_r]), vec![in_r, out_w, err_w])
        }
    };
    let init_pid = init.pid;
    // Only the socket is made in the container's namespace (its abstract socket names are
    // that namespace's); the connect and the exchange happen here, under one deadline.
    let unix = (
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
    );
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // A container started a moment ago may not listen yet (the first login's first
    // session): while its init is young, a refusal is asked again, within the deadline.
    let failed = |e: std::io::Error| RuntimeError::Session(format!("container init: {e}"));
    let conn = loop {
        let sock = sockets_in_netns(&ns, container, &[unix])
            .await
            .and_then(|s| {
                s.into_iter()
                    .next()
                    .ok_or_else(|| std::io::ErrorKind::Other.into())
            })
            .map_err(failed)?;
        match connect(sock).map_err(failed)? {
            Some(c) => break Some(c),
            None if Instant::now() + LISTEN_RETRY < deadline
                && age(init).is_some_and(|a| a < YOUNG_INIT) =>
            {
                tokio::time::sleep(LISTEN_RETRY).await;
            }
            None => break None,
        }
    };
    let handshake = async move {
        let Some(conn) = conn else {
            return Ok(None);
        };
        let conn = Closing(Some(tokio::net::UnixStream::from_std(conn)?));
        let c = conn.get();
        // The listener must be the container's init, not something a user bound.
        let peer = nix::sys::socket::getsockopt(c, PeerCredentials)?;
        if peer.pid() != init_pid {
            return Ok(None);
        }
        let fds: Vec<RawFd> = theirs.iter().map(AsRawFd::as_raw_fd).collect();
        send_all(c, &message, &fds, deadline).await?;
        drop(theirs);
        let (reply, rest) = read_reply(c, deadline).await?;
        Ok::<_, std::io::Error>(Some((conn.take(), reply, rest)))
    }
    .await
    .map_err(failed)?;
    let Some((conn, reply, rest)) = handshake else {
        return Ok(None);
    };
    let pid = match reply {
        Reply::Started { pid } => pid,
        Reply::Error(text) => {
            let text: String = text.chars().take(200).collect();
            return Err(RuntimeError::Session(format!(
                "the container's init could not start the session: {}",
                text.escape_debug()
            )));
        }
        Reply::Exit { .. } => return Err(RuntimeError::Session("unexpected reply".into())),
    };
    // Off the async workers: the init's children are hers to multiply (orphans are
    // reparented to it, up to her pids limit), and each one looked at is a `/proc` read.
    let found = tokio::task::spawn_blocking(move || init.child_with_ns_pid(pid))
        .await
        .ok()
        .flatten();
    let guard = match found {
        Some(host) => ProcessGuard::new(host, container),
        None => ProcessGuard::default(),
    };
    let id = format!("guest-{}-{pid}", init.pid);
    tracing::debug!(exec = %id, host_pid = ?guard.pid(), "session started by the container's init");
    let (stdin, output, master): (Pin<Box<dyn AsyncWrite + Send>>, _, _) = match ours {
        Ends::Pipes([in_w, out_r, err_r]) => {
            let stdin = tokio::net::unix::pipe::Sender::from_owned_fd(in_w).map_err(io_err)?;
            let out = tokio::net::unix::pipe::Receiver::from_owned_fd(out_r).map_err(io_err)?;
            let err = tokio::net::unix::pipe::Receiver::from_owned_fd(err_r).map_err(io_err)?;
            let out = pipe_output(out, 64 * 1024).map(|r| {
                r.map(Output::Stdout)
                    .map_err(|e| RuntimeError::Session(format!("session output: {e}")))
            });
            let err = pipe_output(err, 16 * 1024).map(|r| {
                r.map(Output::Stderr)
                    .map_err(|e| RuntimeError::Session(format!("session output: {e}")))
            });
            let output: crate::OutputStream = Box::pin(futures_util::stream::select(out, err));
            (Box::pin(stdin), output, None)
        }
        Ends::Tty(master) => {
            let master = Arc::new(register(master)?);
            (
                Box::pin(PtyWriter {
                    master: master.clone(),
                    waiting: None,
                }),
                raw_output(Pty(master.clone())),
                Some(master),
            )
        }
    };
    // A keystroke goes straight to the terminal when nothing written before it is pending.
    // The closure holds the master open: its descriptor cannot be reused under it.
    let stdin_now = master.clone().map(|m| -> crate::WriteNow {
        Arc::new(move |data: &[u8]| {
            nix::unistd::write(m.get_ref().as_fd(), data).map_err(Into::into)
        })
    });
    let output_now = master.clone().map(|m| -> crate::ReadNow {
        Arc::new(move |cx: &mut Context<'_>, buf: &mut ReadBuf<'_>| read_master(&m, cx, buf))
    });
    Ok(Some(Session {
        id,
        stdin,
        stdin_now,
        output_now,
        output,
        guard,
        handle: SessionHandle::Init(Arc::new(InitSession {
            conn: tokio::sync::Mutex::new((Some(conn), rest)),
            master,
        })),
    }))
}

/// The daemon's ends of a session's stdio.
enum Ends {
    /// stdin (write end), stdout, stderr (read ends).
    Pipes([OwnedFd; 3]),
    /// The pseudo-terminal master.
    Tty(OwnedFd),
}

/// Connects `sock` (made in a container's network namespace) to the guest's socket there,
/// without waiting: a listener whose backlog is full is refused, not waited for. `None`
/// when nothing listens.
fn connect(sock: OwnedFd) -> std::io::Result<Option<UnixStream>> {
    use nix::sys::socket::UnixAddr;
    let _ = refuse_descriptors(&sock);
    let addr = UnixAddr::new_abstract(INIT_SOCKET_NAME)?;
    match nix::sys::socket::connect(sock.as_raw_fd(), &addr) {
        Ok(()) => Ok(Some(UnixStream::from(sock))),
        Err(nix::errno::Errno::ECONNREFUSED) => Ok(None),
        Err(nix::errno::Errno::EAGAIN) => {
            Err(std::io::Error::other("the container's init is busy"))
        }
        Err(e) => Err(e.into()),
    }
}

/// `f`, given up at `deadline`.
async fn by<T>(
    deadline: Instant,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout_at(deadline.into(), f)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the container's init did not answer in time",
            ))
        })
}

/// Opens a pseudo-terminal in the container's own devpts (`dev/pts/ptmx` under its root,
/// resolved inside that root, no symlinks): the master, non-blocking and the daemon's alone,
/// with the size set; and its terminal, for the guest (`TIOCGPTPEER`: no path lookup),
/// owned by `owner`. (devpts gives a new terminal to whoever opened the multiplexer: the
/// daemon's root, which is not the container's root under a user namespace, and then the
/// container's root could not open its own terminal by name, as `$(tty)` does.)
fn open_pty(
    root: &File,
    size: TtySize,
    owner: Option<RootOwner>,
) -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    use nix::fcntl::{OpenHow, ResolveFlag};
    use nix::sys::statfs::{DEVPTS_SUPER_MAGIC, fstatfs};
    let pty_err = |what: &str| RuntimeError::Session(format!("terminal: {what}"));
    // O_PATH first: that opens nothing (no driver runs). Only devpts's own ptmx node (c 5:2;
    // nobody can make nodes on devpts) is then opened for real: a user who made her init
    // chroot elsewhere cannot have the daemon open some other device she made.
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let not_ptmx = || pty_err("the container's /dev/pts/ptmx is not a pty multiplexer");
    let path = nix::fcntl::openat2(root.as_fd(), "dev/pts/ptmx", how)
        .map_err(|e| pty_err(&format!("cannot open the container's /dev/pts/ptmx: {e}")))?;
    let devpts = fstatfs(&path).is_ok_and(|f| f.filesystem_type() == DEVPTS_SUPER_MAGIC);
    let ptmx = nix::sys::stat::fstat(&path).is_ok_and(|st| {
        st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(5, 2)
    });
    if !devpts || !ptmx {
        return Err(not_ptmx());
    }
    let master = nix::fcntl::open(
        format!("/proc/self/fd/{}", path.as_raw_fd()).as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| pty_err(&e.to_string()))?;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one c_uint to the pointer, valid for the call.
    #[allow(unsafe_code)]
    let is_master = unsafe { pty_number(master.as_raw_fd(), &mut n) }.is_ok();
    if !is_master {
        return Err(not_ptmx());
    }
    let unlock: libc::c_int = 0;
    resize_pty(master.as_raw_fd(), size)?;
    // SAFETY: TIOCSPTLCK reads one c_int from a pointer valid for the call; TIOCGPTPEER takes
    // open flags by value and returns a new descriptor we own.
    #[allow(unsafe_code)]
    let terminal = unsafe {
        set_pty_lock(master.as_raw_fd(), &unlock).map_err(|e| pty_err(&e.to_string()))?;
        let fd = libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(pty_err(&std::io::Error::last_os_error().to_string()));
        }
        OwnedFd::from_raw_fd(fd)
    };
    if let Some(o) = owner {
        nix::unistd::fchown(&terminal, Some(nix::unistd::Uid::from_raw(o.uid)), None).map_err(
            |e| {
                pty_err(&format!(
                    "cannot give the terminal to the container's root: {e}"
                ))
            },
        )?;
    }
    Ok((master, terminal))
}

fn io_err(e: impl Into<std::io::Error>) -> RuntimeError {
    RuntimeError::Session(format!("session setup: {}", e.into()))
}

/// Sends `msg` with `fds` riding on its first byte, by `deadline`.
async fn send_all(
    conn: &tokio::net::UnixStream,
    msg: &[u8],
    fds: &[RawFd],
    deadline: Instant,
) -> std::io::Result<()> {
    by(deadline, async {
        let mut sent = 0;
        while sent < msg.len() {
            let fds = if sent == 0 { fds } else { &[] };
            let rest = msg.get(sent..).unwrap_or_default();
            sent += conn
                .async_io(tokio::io::Interest::WRITABLE, || {
                    send_with_fds(conn.as_fd(), rest, fds, libc::MSG_DONTWAIT)
                })
                .await?;
        }
        Ok(())
    })
    .await
}

/// Reads one reply, by `deadline`; also returns what was read past it (a quick process's
/// `exit` can arrive in the same read). A reply carries no descriptors: any that come are
/// closed safely and the reply refused.
async fn read_reply(
    conn: &tokio::net::UnixStream,
    deadline: Instant,
) -> std::io::Result<(Reply, Vec<u8>)> {
    let bad = |what: &str| std::io::Error::other(format!("bad reply from init: {what}"));
    by(deadline, async {
        let mut msg = Vec::new();
        let mut buf = [0u8; MAX_REPLY];
        let len = loop {
            match message_len(&msg).map_err(|e| bad(e.0))? {
                Some(len) if len > MAX_REPLY => return Err(bad("too large")),
                Some(len) if msg.len() >= len => break len,
                _ => {}
            }
            let got = conn
                .async_io(tokio::io::Interest::READABLE, || {
                    recv_with_fds(conn.as_fd(), &mut buf, libc::MSG_DONTWAIT)
                })
                .await?;
            take_bytes(got, &buf, &mut msg).map_err(bad)?;
        };
        let rest = msg.split_off(len);
        let reply = Reply::decode(&msg).map_err(|e| bad(e.0))?;
        Ok((reply, rest))
    })
    .await
}

/// Asks the kernel to refuse descriptors sent to `sock` (see [`berth_guest_proto::fds`]).
fn refuse_descriptors(sock: &impl AsFd) -> bool {
    fds::refuse_descriptors(sock.as_fd())
}

/// A connection to a guest that, unless taken, is closed by [`close_later`].
struct Closing(Option<tokio::net::UnixStream>);

impl Closing {
    fn get(&self) -> &tokio::net::UnixStream {
        // Only `take` empties it, and that consumes self.
        self.0.as_ref().unwrap_or_else(|| unreachable!())
    }

    fn take(mut self) -> tokio::net::UnixStream {
        self.0.take().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(c) = self.0.take()
            && let Ok(c) = c.into_std()
        {
            close_later(c.into());
        }
    }
}

/// Closes a descriptor a guest could have a hand in off this thread, made harmless first
/// (see [`berth_guest_proto::fds::close_later`]).
fn close_later(fd: OwnedFd) {
    fds::close_later(fd);
}

/// Descriptors nobody asked for, closed off the runtime.
fn discard(fds: Vec<OwnedFd>) {
    fds::dispose(fds);
}

/// A process's output pipe as a stream of what it wrote, read `capacity` bytes at most at a
/// time. The buffer is taken only once the pipe has something to read: an idle session (a
/// `sleep`, a server waiting for input) holds no output buffer, where reserving it up front
/// cost 80 KiB per session (see docs/benchmarks.md, "Where an idle session's memory goes").
fn pipe_output(
    pipe: tokio::net::unix::pipe::Receiver,
    capacity: usize,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    futures_util::stream::unfold(
        Some((pipe, bytes::BytesMut::new())),
        move |state| async move {
            let (pipe, mut buf) = state?;
            loop {
                if let Err(e) = pipe.readable().await {
                    return Some((Err(e), None));
                }
                if buf.capacity() == 0 {
                    buf.reserve(capacity);
                }
                match pipe.try_read_buf(&mut buf) {
                    Ok(0) => return None,
                    Ok(_) => {
                        let chunk = buf.split().freeze();
                        return Some((Ok(chunk), Some((pipe, buf))));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Some((Err(e), None)),
                }
            }
        },
    )
}

/// Registers our (non-blocking, private) pty master with the reactor, for reading only.
///
/// Registered for writing too, the master would wake the reactor every time the terminal's
/// reader took input (the kernel signals room to write on each read of the slave side): for
/// every keystroke, one to three wakes of the daemon with nothing to do, while the shell
/// is about to echo. [`PtyWriter`] asks for writability only while the terminal is full.
fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, RuntimeError> {
    // SAFETY: an OwnedFd is valid and open for as long as it is owned, and the AsyncFd owns it.
    #[allow(unsafe_code)]
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| io_err(std::io::Error::from(e)))
}

/// The input side of a terminal master: writes go straight to the master, and only a write
/// the terminal refuses (its input queue is full: a paste into a program that does not
/// read) registers a duplicate of it for writability, dropped once a write goes through.
struct PtyWriter {
    master: Arc<AsyncFd<OwnedFd>>,
    /// A duplicate of the master registered for writability, while a write waits for room.
    waiting: Option<AsyncFd<OwnedFd>>,
}

impl AsyncWrite for PtyWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let write = |fd: &OwnedFd| -> std::io::Result<usize> {
            nix::unistd::write(fd.as_fd(), data).map_err(Into::into)
        };
        loop {
            let Some(waiting) = &self.waiting else {
                match write(self.master.get_ref()) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    done => return Poll::Ready(done),
                }
                // Registered after the refusal: the registration reports room that came
                // meanwhile, so no wake-up is lost.
                let dup = self.master.get_ref().try_clone()?;
                // SAFETY: the duplicate is owned by the AsyncFd, open for as long as it is.
                #[allow(unsafe_code)]
                let waiting =
                    unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::WRITABLE) }
                        .map_err(std::io::Error::from)?;
                self.waiting = Some(waiting);
                continue;
            };
            let mut ready = ready!(waiting.poll_write_ready(cx))?;
            match ready.try_io(|fd| write(fd.get_ref())) {
                Ok(done) => {
                    // Deregistered before the duplicate is closed (AsyncFd's drop).
                    self.waiting = None;
                    return Poll::Ready(done);
                }
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A terminal master's output, read through the reactor. The end of the terminal (every
/// process closed its side) reads as EIO, taken here as the end of output.
struct Pty(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        read_master(&self.0, cx, buf)
    }
}

/// Reads a terminal's output from its master; the end (`EIO`: the terminal's other side is
/// closed) reads as nothing.
fn read_master(
    master: &AsyncFd<OwnedFd>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<std::io::Result<()>> {
    loop {
        let mut ready = ready!(master.poll_read_ready(cx))?;
        // Read into the buffer's spare room as it is: zeroing 32 KiB first, for every
        // keystroke echoed, is work for nothing.
        // SAFETY: nothing here de-initialises what the buffer holds; read(2) only writes.
        #[allow(unsafe_code)]
        let spare = unsafe { buf.unfilled_mut() };
        let read = ready.try_io(|fd| {
            // SAFETY: `spare` is writable memory of `spare.len()` bytes that lives for
            // this call; read(2) writes at most that many bytes into it.
            #[allow(unsafe_code)]
            let n = unsafe {
                libc::read(
                    fd.get_ref().as_raw_fd(),
                    spare.as_mut_ptr().cast::<libc::c_void>(),
                    spare.len(),
                )
            };
            usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
        });
        match read {
            Ok(Ok(n)) => {
                // A read that did not fill the room took all there was: the next one
                // waits for the reactor, as tokio's own streams do, instead of asking
                // the terminal again. That read would only say "nothing", after
                // waiting for the kernel's worker to finish moving the terminal's
                // input (a sleep in the kernel, for every echoed keystroke). What
                // comes later is a new edge, which this clear never loses (it clears
                // only the readiness this read saw).
                if n > 0 && n < spare.len() {
                    ready.clear_ready();
                }
                // SAFETY: read(2) initialised the first `n` bytes of the spare room.
                #[allow(unsafe_code)]
                unsafe {
                    buf.assume_init(n);
                }
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_would_block) => {}
        }
    }
}

/// Reads what is left on a connection (tests).
#[cfg(test)]
fn leftover(mut c: &UnixStream) -> usize {
    use std::io::Read;
    let mut buf = [0u8; 64];
    c.read(&mut buf).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A process's age comes out of its start and the clock since boot: this test's own
    /// process is younger than the machine's first, and both are plausible.
    #[test]
    fn a_process_s_age_is_read_from_proc() {
        let me = crate::process::Identity::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        let first = crate::process::Identity::of(1).unwrap();
        let (mine, its) = (age(me).unwrap(), age(first).unwrap());
        assert!(mine < Duration::from_secs(3600), "{mine:?}");
        assert!(its >= mine, "{its:?} < {mine:?}");
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    /// A session on `conn` (a test's end of a pair), `early` already read.
    fn session_on(conn: UnixStream, early: Vec<u8>) -> InitSession {
        conn.set_nonblocking(true).unwrap();
        InitSession {
            conn: tokio::sync::Mutex::new((
                Some(tokio::net::UnixStream::from_std(conn).unwrap()),
                early,
            )),
            master: None,
        }
    }

    fn pair() -> (tokio::net::UnixStream, tokio::net::UnixStream) {
        tokio::net::UnixStream::pair().unwrap()
    }

    #[tokio::test]
    async fn pipe_output_is_whole_in_order_and_ends_with_the_writer() {
        use tokio::io::AsyncWriteExt;
        let (tx, rx) = tokio::net::unix::pipe::pipe().unwrap();
        let mut stream = Box::pin(pipe_output(rx, 1024));
        // Nothing written yet: nothing to read, and the stream waits.
        let idle = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(idle.is_err(), "a silent pipe must not end the stream");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                let mut tx = tx;
                tx.write_all(&data).await.unwrap();
                // Dropping the writer is the process's end of output.
            }
        });
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= 1024);
            got.extend_from_slice(&chunk);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn replies_are_read_whole_and_descriptors_in_them_refused() {
        let (a, b) = pair();
        let msg = Reply::Started { pid: 7 }.encode();
        let (head, tail) = msg.split_at(3);
        send_all(&a, head, &[], soon()).await.unwrap();
        send_all(&a, tail, &[], soon()).await.unwrap();
        let (reply, rest) = read_reply(&b, soon()).await.unwrap();
        assert_eq!(reply, Reply::Started { pid: 7 });
        assert!(rest.is_empty());
        // A reply carrying a descriptor is refused (and the descriptor closed).
        let (r, _w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        send_all(&a, &msg, &[r.as_raw_fd()], soon()).await.unwrap();
        assert!(read_reply(&b, soon()).await.is_err());
        drop(a);
        assert_eq!(leftover(&b.into_std().unwrap()), 0);
    }

    #[tokio::test]
    async fn an_exit_carrying_descriptors_is_refused() {
        let (a, b) = pair();
        let (r, _w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        send_all(
            &a,
            &Reply::Exit { code: 0 }.encode(),
            &[r.as_raw_fd()],
            soon(),
        )
        .await
        .unwrap();
        let s = session_on(b.into_std().unwrap(), vec![]);
        assert!(s.exit_code().await.is_err());
    }

    #[tokio::test]
    async fn a_silent_or_trickling_init_runs_into_one_deadline() {
        let (a, b) = pair();
        let started = Instant::now();
        let t = tokio::spawn(async move {
            // One byte every 300 ms: each read is quick, the whole is not.
            for byte in (Reply::Started { pid: 1 }).encode() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if send_all(&a, &[byte], &[], soon()).await.is_err() {
                    return;
                }
            }
        });
        let e = read_reply(&b, Instant::now() + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(b);
        t.await.unwrap();
    }

    #[test]
    fn terminals_come_only_from_a_devpts_ptmx_inside_the_root() {
        // The host's own root stands in for a container's here.
        let (master, terminal) = open_pty(
            &File::open("/").unwrap(),
            TtySize { cols: 91, rows: 33 },
            None,
        )
        .unwrap();
        assert!(nix::unistd::isatty(&terminal).unwrap());
        let mut ws: libc::winsize = unsafe_zeroed_winsize();
        // SAFETY: TIOCGWINSZ writes one winsize to the pointer.
        #[allow(unsafe_code)]
        let r = unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!((r, ws.ws_col, ws.ws_row), (0, 91, 33));
        drop(master);
        // A symlink to the real one, or a plain file, under the root: refused.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("dev/pts")).unwrap();
        std::os::unix::fs::symlink("/dev/pts/ptmx", dir.path().join("dev/pts/ptmx")).unwrap();
        let root = File::open(dir.path()).unwrap();
        assert!(open_pty(&root, TtySize { cols: 1, rows: 1 }, None).is_err());
        std::fs::remove_file(dir.path().join("dev/pts/ptmx")).unwrap();
        std::fs::write(dir.path().join("dev/pts/ptmx"), b"").unwrap();
        assert!(open_pty(&root, TtySize { cols: 1, rows: 1 }, None).is_err());
        // A device node she made there (even one with ptmx's own numbers): not devpts, so
        // never opened for real.
        for (major, minor) in [(1, 3), (5, 2)] {
            std::fs::remove_file(dir.path().join("dev/pts/ptmx")).unwrap();
            nix::sys::stat::mknod(
                &dir.path().join("dev/pts/ptmx"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                libc::makedev(major, minor),
            )
            .unwrap();
            assert!(open_pty(&root, TtySize { cols: 1, rows: 1 }, None).is_err());
        }
    }

    fn unsafe_zeroed_winsize() -> libc::winsize {
        libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }

    #[tokio::test]
    async fn an_exit_in_the_same_read_as_the_start_is_kept() {
        let (a, b) = pair();
        let mut both = Reply::Started { pid: 9 }.encode();
        both.extend(Reply::Exit { code: 3 }.encode());
        send_all(&a, &both, &[], soon()).await.unwrap();
        let (reply, rest) = read_reply(&b, soon()).await.unwrap();
        assert_eq!(reply, Reply::Started { pid: 9 });
        let s = session_on(b.into_std().unwrap(), rest);
        assert_eq!(s.exit_code().await.unwrap(), 3);
        // A connection that ends without an exit is an error, not a code.
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        b.set_nonblocking(true).unwrap();
        let s = session_on(b, vec![]);
        assert!(s.exit_code().await.is_err());
    }

    #[tokio::test]
    async fn garbage_replies_are_refused() {
        let (a, b) = pair();
        send_all(&a, &[255, 255, 255, 255, 1, 2, 3], &[], soon())
            .await
            .unwrap();
        assert!(read_reply(&b, soon()).await.is_err());
        // Longer than any reply may be, though well-formed.
        let (a, b) = pair();
        let long = Reply::Error("x".repeat(MAX_REPLY)).encode();
        let t = tokio::spawn(async move { send_all(&a, &long, &[], soon()).await });
        assert!(read_reply(&b, soon()).await.is_err());
        drop(b);
        let _ = t.await;
        let (a, b) = pair();
        send_all(&a, &[1, 0], &[], soon()).await.unwrap();
        drop(a);
        assert!(read_reply(&b, soon()).await.is_err());
    }
}

/// Against a process in a network namespace of its own (`unshare -n`, needs root like the
/// daemon): no listener there, or a listener that is not that process, means "use the
/// engine", never a session started by someone else.
#[cfg(test)]
mod namespace_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn isolated_process() -> std::process::Child {
        let child = std::process::Command::new("unshare")
            .args(["-n", "sleep", "30"])
            .spawn()
            .expect("unshare");
        // unshare execs sleep once the namespace exists.
        let pid = i32::try_from(child.id()).unwrap();
        for _ in 0..100 {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn spec() -> SessionSpec {
        SessionSpec {
            cmd: vec!["true".into()],
            env: vec![],
            tty: None,
        }
    }

    #[tokio::test]
    async fn no_listener_or_an_impostor_means_the_engine() {
        let mut child = isolated_process();
        let pid = i32::try_from(child.id()).unwrap();
        let init = crate::process::Identity::of(pid).unwrap();
        // Nobody listens in that namespace.
        assert!(spawn(init, "", &spec()).await.unwrap().is_none());
        // Someone other than that process listens under the name: refused, nothing sent.
        // (Made in that namespace, bound here: the name is the socket's namespace's.)
        let ns = File::open(format!("/proc/{pid}/ns/net")).unwrap();
        let unix = (
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
        );
        let sock = sockets_in_netns(&ns, "test", &[unix])
            .await
            .unwrap()
            .remove(0);
        let name = nix::sys::socket::UnixAddr::new_abstract(INIT_SOCKET_NAME).unwrap();
        nix::sys::socket::bind(sock.as_raw_fd(), &name).unwrap();
        nix::sys::socket::listen(&sock, nix::sys::socket::Backlog::new(8).unwrap()).unwrap();
        let listener = std::os::unix::net::UnixListener::from(sock);
        assert!(spawn(init, "", &spec()).await.unwrap().is_none());
        let (conn, _) = listener.accept().unwrap();
        conn.set_nonblocking(false).unwrap();
        assert_eq!(leftover(&conn), 0, "a request reached the impostor");
        // A process that is gone is not joined.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            spawn(init, "", &spec()).await,
            Err(RuntimeError::ContainerNotFound(_))
        ));
    }
}
