//! Descriptor hygiene for every unix socket a container can write to (the words socket,
//! forwarded agent and Unix-socket tunnels, the connection to its init).
//!
//! A descriptor sent with `SCM_RIGHTS` and not taken by the reader is closed by the kernel
//! on the reader's own thread, and a close can block: a TCP socket set to linger with unsent
//! data blocks its last close for up to its linger time, and a unix socket closes whatever is
//! still queued in it, nested to any depth. So: the kernel is asked to refuse descriptors
//! outright where it can ([`refuse_descriptors`], Linux 6.16); every reader takes what
//! arrives ([`crate::recv_with_fds`], or [`GuardedUnixStream`]); and what is taken is closed
//! on one thread of its own ([`dispose`]) after it is made harmless: queued descriptors
//! taken out at every depth, pending connections of a listening socket accepted, and every
//! socket set to reset rather than linger.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `SO_PASSRIGHTS` (Linux 6.16, `asm-generic/socket.h`; not in libc yet).
const SO_PASSRIGHTS: libc::c_int = 83;

/// Asks the kernel to refuse descriptors sent to `sock` (a sender's `sendmsg` with any then
/// fails with EPERM); sockets accepted from a listener inherit it. Returns whether the kernel
/// took it (older kernels do not know the option: there the readers take care). With
/// `BERTH_TEST_NO_PASSRIGHTS=1` in the environment it does nothing and returns `false`, as on
/// an older kernel (for tests of that path).
pub fn refuse_descriptors(sock: BorrowedFd<'_>) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var_os("BERTH_TEST_NO_PASSRIGHTS").is_some_and(|v| v == "1")) {
        return false;
    }
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads one c_int from the pointer, valid for the call.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            std::ptr::from_ref(&off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Closes `fd` on the closer thread, after [`drain`] made the close quick.
pub fn close_later(fd: OwnedFd) {
    static CLOSER: std::sync::Mutex<Option<std::sync::mpsc::Sender<OwnedFd>>> =
        std::sync::Mutex::new(None);
    let mut closer = CLOSER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fd = match closer.as_ref() {
        Some(tx) => match tx.send(fd) {
            Ok(()) => return,
            Err(std::sync::mpsc::SendError(fd)) => fd,
        },
        None => fd,
    };
    // No closer yet, or its thread is gone: a new one (tried again at the next close if it
    // cannot start; meanwhile this one is drained here, which leaves nothing to linger).
    let (tx, rx) = std::sync::mpsc::channel::<OwnedFd>();
    let started = std::thread::Builder::new()
        .name("berth-closer".into())
        .spawn(move || {
            for fd in rx {
                drain(fd);
            }
        });
    let fd = match started {
        Ok(_) => match tx.send(fd) {
            Ok(()) => {
                *closer = Some(tx);
                return;
            }
            Err(std::sync::mpsc::SendError(fd)) => fd,
        },
        Err(_) => fd,
    };
    *closer = None;
    drop(closer);
    drain(fd);
}

/// Descriptors of one served file system waiting to be closed, at most ([`serve`]).
pub const MAX_PARKED: usize = 64;

/// File systems this process serves itself, by superblock number ([`serve`]).
static SERVED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u32, ServedFs>>> =
    std::sync::LazyLock::new(Default::default);

struct ServedFs {
    /// Which [`Served`] registered it (a number may be taken by a new file system before
    /// the old one's registration is dropped).
    id: u64,
    /// The queue of that file system's own closer thread, once a descriptor needed it.
    tx: Option<std::sync::mpsc::SyncSender<OwnedFd>>,
    /// Ends the file system (whatever waits on it then fails at once); whether it did.
    end: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
    /// `end` did its work (it is not called again; until then it is tried again at an
    /// overflow, at most once a second).
    ended: bool,
    /// When `end` was last tried.
    tried: Option<std::time::Instant>,
}

/// A file system registered by [`serve`]; dropping it forgets it.
#[must_use = "the file system is forgotten when this is dropped"]
#[derive(Debug)]
pub struct Served {
    fs: u32,
    id: u64,
}

/// While the returned value lives, descriptors of files on `fs` (the superblock number of a
/// FUSE connection this process serves, as `(major << 20) | minor`) that arrive unasked are
/// closed on a thread of that file system's own, not on the closer thread that every other
/// user's go through. A close of such a file waits on this very process: first for the
/// file's lock, which a process writing to it holds while its write waits on the server
/// (for `berth connect`, on a laptop that may take up to the request's deadline), then for
/// the answer to the kernel's FLUSH. Past [`MAX_PARKED`] waiting, `end` is called (it should
/// abort the connection, after which every such close returns at once, and say whether it
/// did) and the descriptor is closed where it is.
pub fn serve(fs: u32, end: impl Fn() -> bool + Send + Sync + 'static) -> Served {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Ok(mut served) = SERVED.lock() {
        served.insert(
            fs,
            ServedFs {
                id,
                tx: None,
                end: std::sync::Arc::new(end),
                ended: false,
                tried: None,
            },
        );
    }
    Served { fs, id }
}

impl Drop for Served {
    fn drop(&mut self) {
        // The queue's sender goes with it: its thread closes what is left and ends.
        if let Ok(mut served) = SERVED.lock()
            && served.get(&self.fs).is_some_and(|e| e.id == self.id)
        {
            served.remove(&self.fs);
        }
    }
}

/// Hands `fd` to the closer of its file system if this process serves that one (`None`);
/// gives it back otherwise. When that closer is full, or its thread cannot be started, the
/// file system is ended first (once), so that the close of the descriptor given back
/// returns at once.
fn park(fd: OwnedFd, fs: u32) -> Option<OwnedFd> {
    use std::sync::mpsc::TrySendError;
    let (fd, end) = {
        let Ok(mut served) = SERVED.lock() else {
            return Some(fd);
        };
        let Some(entry) = served.get_mut(&fs) else {
            return Some(fd);
        };
        if entry.tx.is_none() && !entry.ended {
            let (tx, rx) = std::sync::mpsc::sync_channel::<OwnedFd>(MAX_PARKED);
            let spawned = std::thread::Builder::new()
                .name("berth-closer-fs".into())
                .spawn(move || rx.into_iter().for_each(drop));
            entry.tx = spawned.is_ok().then_some(tx);
        }
        let fd = match &entry.tx {
            Some(tx) => match tx.try_send(fd) {
                Ok(()) => return None,
                Err(TrySendError::Full(fd) | TrySendError::Disconnected(fd)) => fd,
            },
            None => fd,
        };
        let now = std::time::Instant::now();
        if entry.ended
            || entry
                .tried
                .is_some_and(|t| now < t + std::time::Duration::from_secs(1))
        {
            return Some(fd);
        }
        entry.tried = Some(now);
        (fd, (entry.end.clone(), entry.id))
    };
    let (end, id) = end;
    // Outside the lock: an abort writes to the kernel.
    if end()
        && let Ok(mut served) = SERVED.lock()
        && let Some(entry) = served.get_mut(&fs)
        && entry.id == id
    {
        entry.ended = true;
    }
    Some(fd)
}

/// Descriptors that arrived unasked: closed off the caller's thread.
pub fn dispose(fds: Vec<OwnedFd>) {
    for fd in fds {
        close_later(fd);
    }
}

/// Takes apart what `fd` holds and closes it all: the descriptors queued in a unix socket
/// (and in those, to any depth), the connections pending on a listening one; every socket
/// among them is set to reset on close rather than linger.
///
/// Nothing is left for the kernel to close unseen, however much is queued, since that close
/// could be a lingering socket's and block this thread (every user's closer). Each unix
/// socket is shut for reading first, so that what is queued in it is all there will be (a
/// peer's send, or a connect to a listener, then fails); then it is emptied message by
/// message, depth first, each socket closed once empty. What is open at once stays small:
/// the kernel nests unix sockets in flight at most a few deep (`MAX_RECURSION_LEVEL`), each
/// message holding at most 253 descriptors. Past [`MAX_ROUNDS`] steps, what is left is
/// emptied on a thread of its own, not this one.
pub fn drain(fd: OwnedFd) {
    drain_within(fd, MAX_ROUNDS);
}

fn drain_within(fd: OwnedFd, rounds: usize) {
    let mut open: Vec<Opened> = Vec::new();
    open.extend(opened(fd));
    if let Some(rest) = empty_out(open, rounds) {
        // If the thread cannot start, the closure is dropped with what it holds: closed
        // here as it is (the one case left).
        let _ = std::thread::Builder::new()
            .name("berth-closer-long".into())
            .spawn(move || {
                let _ = empty_out(rest, usize::MAX);
            });
    }
}

/// Empties the sockets of `open` (innermost last) and closes each once empty, for at most
/// `rounds` steps (each message or connection taken is one); what is left, if any.
fn empty_out(mut open: Vec<Opened>, rounds: usize) -> Option<Vec<Opened>> {
    let mut buf = [0u8; 4096];
    let mut taken = 0usize;
    while let Some(top) = open.last_mut() {
        if taken >= rounds {
            return Some(open);
        }
        taken += 1;
        let out = match top.kind {
            Kind::Other => None,
            Kind::Listener => accept_now(top.fd.as_fd()).map(|c| vec![c]),
            Kind::Stream | Kind::Datagrams | Kind::Packets => {
                match crate::recv_with_fds(top.fd.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                    Ok(got) if got.bytes == 0 && got.fds.is_empty() => match top.kind {
                        // A stream's end: a stream has no empty messages.
                        Kind::Stream => None,
                        // An empty packet comes with credentials (`SO_PASSCRED` is on);
                        // the end of a packet socket, which reads the same, with none.
                        Kind::Packets => got.credentials.then(Vec::new),
                        // An empty datagram (the end reads as EAGAIN).
                        _ => Some(Vec::new()),
                    },
                    Ok(got) => {
                        top.errors = 0;
                        Some(got.fds)
                    }
                    // Empty.
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => None,
                    // A pending error, reported once and cleared (a peer that closed with
                    // bytes unread sets one): read again; many in a row is the end.
                    Err(_) => {
                        top.errors += 1;
                        (top.errors <= MAX_ERRORS).then(Vec::new)
                    }
                }
            }
        };
        match out {
            Some(fds) => {
                for fd in fds {
                    open.extend(opened(fd));
                }
            }
            // Emptied: closed now (innermost first, as the stack has it).
            None => drop(open.pop()),
        }
    }
    None
}

/// Steps a drain takes on the closer thread: about a second's work. Past them, a thread of
/// its own goes on (a container can queue more than that: many sockets, each holding as
/// many messages as its peer's buffer takes).
const MAX_ROUNDS: usize = 1 << 20;

/// Errors in a row after which a socket is taken to be empty.
const MAX_ERRORS: usize = 16;

/// What a descriptor is, for [`drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Not a unix socket: closed at once (a socket among them defused first).
    Other,
    /// A listening unix socket: its pending connections are taken.
    Listener,
    /// A unix stream socket: read until its end.
    Stream,
    /// A unix datagram socket: read until nothing is left (empty datagrams included).
    Datagrams,
    /// A unix sequenced-packet socket.
    Packets,
}

struct Opened {
    fd: OwnedFd,
    kind: Kind,
    /// Reads that failed in a row.
    errors: usize,
}

/// `fd` made ready for [`drain`]: parked instead when it is a file of a file system this
/// process serves (`None`); a socket defused; a unix socket shut for reading.
fn opened(fd: OwnedFd) -> Option<Opened> {
    let st = quiet_stat(fd.as_fd());
    // A file of a file system this process serves goes to that one's own closer.
    let fd = match &st {
        Some(st) => park(fd, (st.stx_dev_major << 20) | st.stx_dev_minor)?,
        None => fd,
    };
    let other = |fd| {
        Some(Opened {
            fd,
            kind: Kind::Other,
            errors: 0,
        })
    };
    if !st.is_some_and(|st| is_socket_mode(st.stx_mode)) {
        return other(fd);
    }
    defuse(fd.as_fd());
    if sockopt_int(fd.as_fd(), libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
        return other(fd);
    }
    // Credentials with every message read (an empty packet is then told from the end), and
    // nothing else before the descriptors (the sender may have set these on the socket).
    set_sockopt_int(fd.as_fd(), libc::SO_PASSCRED, 1);
    set_sockopt_int(fd.as_fd(), libc::SO_PASSSEC, 0);
    set_sockopt_int(fd.as_fd(), libc::SO_PASSPIDFD, 0);
    // SAFETY: shutdown takes a descriptor and a constant; it changes no memory of ours.
    #[allow(unsafe_code)]
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD);
    }
    let kind = if is_listening(fd.as_fd()) {
        Kind::Listener
    } else {
        match sockopt_int(fd.as_fd(), libc::SO_TYPE) {
            Some(libc::SOCK_STREAM) => Kind::Stream,
            Some(libc::SOCK_SEQPACKET) => Kind::Packets,
            _ => Kind::Datagrams,
        }
    };
    Some(Opened {
        fd,
        kind,
        errors: 0,
    })
}

fn set_sockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt reads one c_int from the pointer, valid for the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Makes closing socket `fd` quick: reset, no lingering.
fn defuse(fd: BorrowedFd<'_>) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one linger struct from the pointer, valid for the call.
    #[allow(unsafe_code)]
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The type and device of the file `fd` is, without asking its file system anything: a
/// FUSE file's attributes would be asked of its server (`AT_STATX_DONT_SYNC`: what the
/// kernel holds is enough for both, which never change).
fn quiet_stat(fd: BorrowedFd<'_>) -> Option<libc::statx> {
    // SAFETY: statx writes one statx struct to the pointer, valid for the call; the path is
    // an empty C string, as AT_EMPTY_PATH asks.
    #[allow(unsafe_code)]
    unsafe {
        let mut st: libc::statx = std::mem::zeroed();
        (libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            &mut st,
        ) == 0)
            .then_some(st)
    }
}

fn is_socket_mode(mode: u16) -> bool {
    u32::from(mode) & libc::S_IFMT == libc::S_IFSOCK
}

fn sockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to `v`, valid for the call.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            std::ptr::from_mut(&mut v).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

fn is_listening(fd: BorrowedFd<'_>) -> bool {
    sockopt_int(fd, libc::SO_ACCEPTCONN) == Some(1)
}

/// A connection pending on listening socket `fd`, without waiting. The listener is made
/// non-blocking first: a blocking accept would wait for ever once the queue is empty (or
/// once the container, which may share the listener, took the last one). That flag is on
/// the open file description the container sent, so it sees it too; it is closing anyway.
fn accept_now(fd: BorrowedFd<'_>) -> Option<OwnedFd> {
    // SAFETY: fcntl F_GETFL/F_SETFL read and set the descriptor's status flags.
    #[allow(unsafe_code)]
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return None;
        }
    }
    // SAFETY: accept4 with null address pointers returns a new descriptor or -1.
    #[allow(unsafe_code)]
    let c = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    // SAFETY: a non-negative result is a new descriptor that nothing else owns.
    #[allow(unsafe_code)]
    (c >= 0).then(|| unsafe { OwnedFd::from_raw_fd(c) })
}

#[cfg(feature = "tokio")]
pub use guarded::{GuardedUnixListener, GuardedUnixStream};

#[cfg(feature = "tokio")]
mod guarded {
    use std::os::fd::{AsFd, OwnedFd};
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};

    use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
    use tokio::net::UnixStream;

    /// A unix stream whose other end is a container's: descriptors that come with its
    /// bytes are taken and disposed of ([`super::dispose`]), never closed by the kernel on
    /// a runtime worker, and it is closed on the closer thread (with whatever is still
    /// queued in it).
    #[derive(Debug)]
    pub struct GuardedUnixStream(Option<UnixStream>);

    impl GuardedUnixStream {
        /// Guards `stream`, asking the kernel to refuse descriptors on it from now on.
        pub fn new(stream: UnixStream) -> Self {
            let _ = super::refuse_descriptors(stream.as_fd());
            Self(Some(stream))
        }

        /// Guards `stream` without asking the kernel anything: as on a kernel before 6.16.
        #[cfg(test)]
        pub(crate) fn on_an_old_kernel(stream: UnixStream) -> Self {
            Self(Some(stream))
        }

        fn get(&self) -> &UnixStream {
            // Only `drop` empties it.
            self.0.as_ref().unwrap_or_else(|| unreachable!())
        }

        fn get_mut(&mut self) -> &mut UnixStream {
            self.0.as_mut().unwrap_or_else(|| unreachable!())
        }
    }

    /// A unix listener a container can connect to: the kernel is asked to refuse
    /// descriptors on it (its connections inherit that), its connections are
    /// [`GuardedUnixStream`]s, and it is closed on the closer thread (connections still
    /// pending in its backlog can hold descriptors).
    #[derive(Debug)]
    pub struct GuardedUnixListener(Option<tokio::net::UnixListener>);

    impl GuardedUnixListener {
        pub fn new(listener: tokio::net::UnixListener) -> Self {
            let _ = super::refuse_descriptors(listener.as_fd());
            Self(Some(listener))
        }

        pub async fn accept(&self) -> std::io::Result<GuardedUnixStream> {
            let l = self.0.as_ref().unwrap_or_else(|| unreachable!());
            let (s, _) = l.accept().await?;
            Ok(GuardedUnixStream::new(s))
        }
    }

    impl Drop for GuardedUnixListener {
        fn drop(&mut self) {
            if let Some(l) = self.0.take()
                && let Ok(std) = l.into_std()
            {
                super::close_later(OwnedFd::from(std));
            }
        }
    }

    impl Drop for GuardedUnixStream {
        fn drop(&mut self) {
            if let Some(s) = self.0.take()
                && let Ok(std) = s.into_std()
            {
                super::close_later(OwnedFd::from(std));
            }
        }
    }

    impl AsyncRead for GuardedUnixStream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let s = self.get();
            loop {
                ready!(s.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                let got = s.try_io(Interest::READABLE, || {
                    crate::recv_with_fds(s.as_fd(), unfilled, libc::MSG_DONTWAIT)
                });
                match got {
                    Ok(got) => {
                        super::dispose(got.fds);
                        buf.advance(got.bytes);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
    }

    impl AsyncWrite for GuardedUnixStream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(self.get_mut().get_mut()).poll_write(cx, data)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(self.get_mut().get_mut()).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(self.get_mut().get_mut()).poll_shutdown(cx)
        }
    }
}

#[cfg(all(test, feature = "tokio"))]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use tokio::io::AsyncReadExt;

    use super::*;

    /// A TCP connection whose last close would block for 30 s (unsent data, a long linger),
    /// and its peer, which keeps it open and does not read.
    fn lingering_tcp() -> (OwnedFd, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        c.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 65536];
        let mut stuck = 0;
        while stuck < 3 {
            match (&c).write(&chunk) {
                Ok(n) => stuck = usize::from(n == 0),
                Err(_) => {
                    stuck += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 30,
        };
        // SAFETY: setsockopt reads one linger struct from the pointer.
        #[allow(unsafe_code)]
        unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::from_ref(&linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        (OwnedFd::from(c), peer)
    }

    /// `fd` wrapped `depth` times: each time sent into a fresh unix socket pair and the
    /// receiving end returned, still holding it in its queue.
    fn nest(mut fd: OwnedFd, depth: usize) -> OwnedFd {
        for _ in 0..depth {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            crate::send_with_fds(a.as_fd(), b"n", &[fd.as_raw_fd()], 0).unwrap();
            fd = OwnedFd::from(b);
        }
        fd
    }

    /// Whether `peer` sees its connection end (reset or closed) within `limit`.
    fn ends_within(peer: &mut std::net::TcpStream, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut buf = vec![0u8; 1 << 20];
        while Instant::now() < end {
            peer.set_read_timeout(Some(
                end.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
            match peer.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }

    #[tokio::test]
    async fn a_lingering_socket_nested_in_what_a_reader_gets_is_reset_off_the_reader() {
        let (tcp, mut peer) = lingering_tcp();
        let nested = nest(tcp, 3);
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut guarded = GuardedUnixStream::on_an_old_kernel(ours);
        crate::send_with_fds(theirs.as_fd(), b"x", &[nested.as_raw_fd()], 0).unwrap();
        drop(nested);
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let n = guarded.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"x");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        // The closer reached the TCP socket three unix sockets down and reset it.
        assert!(
            ends_within(&mut peer, Duration::from_secs(10)),
            "the lingering socket was not reset"
        );
    }

    /// Sends one byte with `fds` (up to 253: more than `send_with_fds` takes).
    fn send_many(sock: BorrowedFd<'_>, fds: &[libc::c_int]) {
        let mut space = [0u64; 132];
        let mut byte = *b"n";
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: the header points at live buffers; CMSG_FIRSTHDR/DATA stay within
        // `space`, which holds CMSG_SPACE of 253 descriptors.
        #[allow(unsafe_code)]
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = space.as_mut_ptr().cast();
            let bytes = std::mem::size_of_val(fds) as u32;
            msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
            assert_eq!(libc::sendmsg(sock.as_raw_fd(), &msg, 0), 1);
        }
    }

    /// A connected pair of unix sequenced-packet sockets.
    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array, which then are ours.
        #[allow(unsafe_code)]
        unsafe {
            assert_eq!(
                libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()),
                0
            );
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        }
    }

    /// Runs `drain(fd)` on a thread of its own; whether it returned within `limit`.
    fn drained_within(fd: OwnedFd, limit: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drain(fd);
            let _ = tx.send(());
        });
        rx.recv_timeout(limit).is_ok()
    }

    #[test]
    fn an_empty_datagram_does_not_hide_what_follows_it() {
        let (tcp, mut peer) = lingering_tcp();
        let (theirs, ours) = std::os::unix::net::UnixDatagram::pair().unwrap();
        theirs.send(b"").unwrap();
        crate::send_with_fds(theirs.as_fd(), b"n", &[tcp.as_raw_fd()], 0).unwrap();
        drop((tcp, theirs));
        assert!(
            drained_within(OwnedFd::from(ours), Duration::from_secs(10)),
            "the closer was held by a lingering socket behind an empty datagram"
        );
        assert!(
            ends_within(&mut peer, Duration::from_secs(10)),
            "the lingering socket was not reset"
        );
    }

    #[test]
    fn empty_packets_do_not_hide_what_follows_them() {
        let (tcp, mut peer) = lingering_tcp();
        let (theirs, ours) = seqpacket_pair();
        for _ in 0..100 {
            crate::send_with_fds(theirs.as_fd(), b"", &[], 0).unwrap();
        }
        crate::send_with_fds(theirs.as_fd(), b"n", &[tcp.as_raw_fd()], 0).unwrap();
        drop((tcp, theirs));
        assert!(
            drained_within(ours, Duration::from_secs(10)),
            "the closer was held by a lingering socket behind empty packets"
        );
        assert!(
            ends_within(&mut peer, Duration::from_secs(10)),
            "the lingering socket was not reset"
        );
    }

    #[test]
    fn however_many_descriptors_are_queued_all_are_taken_out() {
        let (tcp, mut peer) = lingering_tcp();
        let (theirs, ours) = std::os::unix::net::UnixStream::pair().unwrap();
        // Room for all of it in the socket (as root, past `wmem_max`).
        let size: libc::c_int = 64 << 20;
        // SAFETY: setsockopt reads one c_int from the pointer.
        #[allow(unsafe_code)]
        unsafe {
            libc::setsockopt(
                theirs.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        theirs.set_nonblocking(true).unwrap();
        // 70,000 descriptors (past the 65,536 the closer used to take before closing the
        // rest as they were), then the lingering socket.
        let null = std::fs::File::open("/dev/null").unwrap();
        let many = [null.as_raw_fd(); 250];
        for _ in 0..280 {
            send_many(theirs.as_fd(), &many);
        }
        // Inside a unix socket of its own: one the old closer would have closed unseen.
        let inner = nest(tcp, 1);
        crate::send_with_fds(theirs.as_fd(), b"n", &[inner.as_raw_fd()], 0).unwrap();
        drop((inner, theirs, null));
        assert!(
            drained_within(OwnedFd::from(ours), Duration::from_secs(30)),
            "the closer was held by a lingering socket behind many descriptors"
        );
        assert!(
            ends_within(&mut peer, Duration::from_secs(10)),
            "the lingering socket was not reset"
        );
    }

    /// A seqpacket socket whose peer closed with bytes unread has an error pending, which
    /// the first read reports (and clears) before the queue: not the end of it.
    #[test]
    fn a_pending_error_does_not_hide_what_is_queued() {
        let (tcp, mut peer) = lingering_tcp();
        let (a, b) = seqpacket_pair();
        // Bytes b never reads; then the lingering socket queued for a.
        crate::send_with_fds(a.as_fd(), b"unread", &[], 0).unwrap();
        crate::send_with_fds(b.as_fd(), b"n", &[tcp.as_raw_fd()], 0).unwrap();
        drop((tcp, b));
        assert_eq!(
            sockopt_int(a.as_fd(), libc::SO_ERROR),
            Some(libc::ECONNRESET)
        );
        assert!(
            drained_within(a, Duration::from_secs(10)),
            "the closer was held by a lingering socket behind a pending error"
        );
        assert!(
            ends_within(&mut peer, Duration::from_secs(10)),
            "the lingering socket was not reset"
        );
    }

    /// Past its share of steps, the closer leaves the rest to a thread of its own: it
    /// returns, and the rest is still taken apart.
    #[test]
    fn past_its_steps_the_closer_hands_the_rest_on() {
        let (tcp, mut peer) = lingering_tcp();
        let (theirs, ours) = std::os::unix::net::UnixStream::pair().unwrap();
        for _ in 0..50 {
            crate::send_with_fds(theirs.as_fd(), b"n", &[], 0).unwrap();
        }
        let inner = nest(tcp, 2);
        crate::send_with_fds(theirs.as_fd(), b"n", &[inner.as_raw_fd()], 0).unwrap();
        drop((inner, theirs));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drain_within(OwnedFd::from(ours), 10);
            let _ = tx.send(());
        });
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        assert!(
            ends_within(&mut peer, Duration::from_secs(10)),
            "the rest was not taken apart"
        );
    }

    #[test]
    fn a_peer_cannot_add_to_what_is_being_drained() {
        let (theirs, ours) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        (&theirs).write_all(b"queued").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let keeps_sending = std::thread::spawn(move || {
            let _ = rx.recv();
            // Once the drain began, every send fails.
            (&theirs).write(b"more")
        });
        let ours = OwnedFd::from(ours);
        // SAFETY: dup returns a new descriptor that nothing else owns.
        #[allow(unsafe_code)]
        let kept = unsafe { OwnedFd::from_raw_fd(libc::dup(ours.as_raw_fd())) };
        drain(ours);
        tx.send(()).unwrap();
        let sent = keeps_sending.join().unwrap();
        assert!(sent.is_err(), "a send after the drain went in: {sent:?}");
        drop(kept);
    }

    #[test]
    fn the_kernel_refuses_descriptors_where_it_can() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        if !refuse_descriptors(b.as_fd()) {
            eprintln!(
                "skipped: SO_PASSRIGHTS needs Linux 6.16 (nothing asserted on this kernel; the readers' own disposal is tested above)"
            );
            return;
        }
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(crate::send_with_fds(a.as_fd(), b"x", &[r.as_raw_fd()], 0).is_err());
        assert_eq!(crate::send_with_fds(a.as_fd(), b"x", &[], 0).unwrap(), 1);
    }

    #[test]
    fn pending_connections_of_a_listening_socket_are_taken_apart_too() {
        let dir = std::env::temp_dir().join(format!("berth-fds-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (tcp, mut peer) = lingering_tcp();
        let c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        crate::send_with_fds(c.as_fd(), b"n", &[tcp.as_raw_fd()], 0).unwrap();
        drop((tcp, c));
        let _ = std::fs::remove_file(&path);
        let start = Instant::now();
        close_later(OwnedFd::from(l));
        assert!(
            ends_within(&mut peer, Duration::from_secs(10)),
            "the pending connection's socket lingered"
        );
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    fn a_file() -> OwnedFd {
        std::fs::File::open("/proc/self/stat").unwrap().into()
    }

    #[test]
    fn descriptors_of_a_served_file_system_go_to_its_own_closer_while_it_is_served() {
        // A number no real superblock has here (major 4095): only this test uses it.
        const FS: u32 = 0xFFF0_0001;
        assert!(park(a_file(), FS).is_some(), "taken before it was served");
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let e = ended.clone();
        let served = serve(FS, move || {
            e.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            true
        });
        for _ in 0..3 {
            assert!(park(a_file(), FS).is_none(), "not taken while served");
        }
        assert_eq!(ended.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(served);
        assert!(park(a_file(), FS).is_some(), "taken after it was forgotten");
    }

    #[test]
    fn a_registration_dropped_late_leaves_a_newer_one_of_the_same_number() {
        const FS: u32 = 0xFFF0_0002;
        let old = serve(FS, || true);
        let new = serve(FS, || true);
        drop(old);
        assert!(
            park(a_file(), FS).is_none(),
            "the newer registration was forgotten"
        );
        drop(new);
        assert!(park(a_file(), FS).is_some());
    }

    #[test]
    fn the_quiet_stat_sees_the_device_and_type_fstat_does() {
        let f = a_file();
        let st = quiet_stat(f.as_fd()).unwrap();
        assert_eq!(
            libc::makedev(st.stx_dev_major, st.stx_dev_minor),
            unsafe_stat(&f).st_dev,
            "statx and fstat name different devices"
        );
        assert!(!is_socket_mode(st.stx_mode));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let st = quiet_stat(a.as_fd()).unwrap();
        assert!(is_socket_mode(st.stx_mode));
    }

    fn unsafe_stat(f: &OwnedFd) -> libc::stat {
        // SAFETY: fstat writes one stat struct to the pointer, valid for the call.
        #[allow(unsafe_code)]
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(f.as_raw_fd(), &mut st), 0);
            st
        }
    }
}
