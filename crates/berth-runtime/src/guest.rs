//! Sessions started by the container's init instead of a Docker exec (protocol:
//! `berth-guest-proto`).
//!
//! A Docker exec costs a runc start per session (tens of milliseconds) and puts `dockerd`
//! and the container shim on the data path, each copying every byte. Here the daemon sends
//! the container's `berth-guest init` the session's pipes (or asks it for a terminal), and
//! from then on the bytes go between this process and the session's process directly.
//!
//! Trust runs one way: the guest gets only the far ends of pipes made for it, and everything
//! it sends back is checked (the reply is parsed strictly, a terminal must be a pty master,
//! the PID it reports is looked up among init's own children and guarded like any other).
//! A root user can replace her init; the worst she gets is a broken session of her own.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use berth_guest_proto::{MAX_MESSAGE, Mode, Reply, Request, SOCKET_NAME, message_len};
use futures_util::StreamExt;
use nix::fcntl::OFlag;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg, sockopt::PeerCredentials,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::io::ReaderStream;

use crate::exec::raw_output;
use crate::process::Identity;
use crate::{Exec, ExecHandle, ExecSpec, Output, ProcessGuard, RuntimeError, TtySize, in_netns};

/// How long the guest may take to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A session the guest started: its exit is read from the connection, a terminal session
/// is resized through its master. Dropping it closes the connection.
pub struct GuestSession {
    /// The connection, and what was read of it past the `started` reply.
    conn: tokio::sync::Mutex<(tokio::net::UnixStream, Vec<u8>)>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl std::fmt::Debug for GuestSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSession")
            .field("tty", &self.master.is_some())
            .finish()
    }
}

impl GuestSession {
    pub(crate) fn resize(&self, size: TtySize) -> Result<(), RuntimeError> {
        let Some(master) = &self.master else {
            return Ok(());
        };
        let ws = libc::winsize {
            ws_col: size.cols,
            ws_row: size.rows,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, valid for the call.
        #[allow(unsafe_code)]
        unsafe { set_winsize(master.get_ref().as_raw_fd(), &ws) }
            .map(drop)
            .map_err(|e| RuntimeError::Docker(format!("resize: {e}")))
    }

    /// Waits for the process's end; its exit status (or 128 + signal).
    pub(crate) async fn exit_code(&self) -> Result<i64, RuntimeError> {
        let mut guard = self.conn.lock().await;
        let (conn, early) = &mut *guard;
        let mut msg = std::mem::take(early);
        let mut buf = [0u8; 256];
        loop {
            match message_len(&msg) {
                Ok(Some(len)) if msg.len() >= len => break,
                Ok(_) if msg.len() <= 256 => {}
                _ => return Err(lost("a bad message")),
            }
            let n = conn
                .read(&mut buf)
                .await
                .map_err(|e| lost(&e.to_string()))?;
            if n == 0 {
                return Err(lost("the connection closed"));
            }
            msg.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        let len = message_len(&msg).ok().flatten().unwrap_or_default();
        match Reply::decode(msg.get(..len).unwrap_or_default()) {
            Ok(Reply::Exit { code }) => Ok(code),
            _ => Err(lost("a bad message")),
        }
    }
}

fn lost(what: &str) -> RuntimeError {
    RuntimeError::Docker(format!(
        "session end not reported by the container's init: {what}"
    ))
}

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_read_bad!(pty_number, libc::TIOCGPTN, libc::c_uint);

/// Starts `spec` through init `init` of container `container` (its full id: processes are
/// guarded by it). `Ok(None)` when that init does not take sessions (one started by an
/// older Berth): the caller then uses the engine.
pub(crate) async fn spawn(
    init: Identity,
    container: &str,
    spec: &ExecSpec,
) -> Result<Option<Exec>, RuntimeError> {
    let not_running = || RuntimeError::ContainerNotFound(container.to_owned());
    let ns = File::open(format!("/proc/{}/ns/net", init.pid)).map_err(|_| not_running())?;
    // Checked after the open: the namespace is that of the process we mean, not of one that
    // took its PID since.
    if !init.alive(container) {
        return Err(not_running());
    }
    let request = Request {
        mode: match spec.tty {
            Some(s) => Mode::Tty {
                cols: s.cols,
                rows: s.rows,
            },
            None => Mode::Pipe,
        },
        argv: spec.cmd.iter().map(|a| a.clone().into_bytes()).collect(),
        env: spec.env.iter().map(|e| e.clone().into_bytes()).collect(),
    };
    let message = request.encode();
    // Pipes: ours, and theirs to send.
    let pipes = if spec.tty.is_none() {
        let p = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io_err);
        let (in_r, in_w) = p()?;
        let (out_r, out_w) = p()?;
        let (err_r, err_w) = p()?;
        Some(([in_w, out_r, err_r], [in_r, out_w, err_w]))
    } else {
        None
    };
    let (ours, theirs) = match pipes {
        Some((o, t)) => (Some(o), Some(t)),
        None => (None, None),
    };
    let init_pid = init.pid;
    let handshake = in_netns(ns, move || {
        let addr = SocketAddr::from_abstract_name(SOCKET_NAME)?;
        let conn = match UnixStream::connect_addr(&addr) {
            Ok(c) => c,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => return Ok(None),
            Err(e) => return Err(e),
        };
        // The listener must be the container's init, not something a user bound.
        let peer = nix::sys::socket::getsockopt(&conn, PeerCredentials)?;
        if peer.pid() != init_pid {
            return Ok(None);
        }
        conn.set_read_timeout(Some(REPLY_TIMEOUT))?;
        conn.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let fds: Vec<RawFd> = theirs
            .as_ref()
            .map(|t| t.iter().map(AsRawFd::as_raw_fd).collect())
            .unwrap_or_default();
        send_all(&conn, &message, &fds)?;
        drop(theirs);
        let (reply, fd, rest) = read_reply(&conn)?;
        Ok(Some((conn, reply, fd, rest)))
    })
    .await
    .map_err(|e| RuntimeError::Docker(format!("container init: {e}")))?;
    let Some((conn, reply, fd, rest)) = handshake else {
        return Ok(None);
    };
    let pid = match reply {
        Reply::Started { pid } => pid,
        Reply::Error(text) => {
            return Err(RuntimeError::Docker(format!(
                "the container's init could not start the session: {text}"
            )));
        }
        Reply::Exit { .. } => return Err(RuntimeError::Docker("unexpected reply".into())),
    };
    let guard = match init.child_with_ns_pid(pid) {
        Some(host) => ProcessGuard::new(host, container),
        None => ProcessGuard::default(),
    };
    conn.set_nonblocking(true).map_err(io_err)?;
    conn.set_read_timeout(None).map_err(io_err)?;
    let conn = tokio::net::UnixStream::from_std(conn).map_err(io_err)?;
    let id = format!("guest-{}-{pid}", init.pid);
    tracing::debug!(exec = %id, host_pid = ?guard.pid(), "session started by the container's init");
    let (stdin, output, master): (Pin<Box<dyn AsyncWrite + Send>>, _, _) = match ours {
        Some([in_w, out_r, err_r]) => {
            let stdin = tokio::net::unix::pipe::Sender::from_owned_fd(in_w).map_err(io_err)?;
            let out = tokio::net::unix::pipe::Receiver::from_owned_fd(out_r).map_err(io_err)?;
            let err = tokio::net::unix::pipe::Receiver::from_owned_fd(err_r).map_err(io_err)?;
            let out = ReaderStream::with_capacity(out, 64 * 1024).map(|r| {
                r.map(Output::Stdout)
                    .map_err(|e| RuntimeError::Docker(format!("session output: {e}")))
            });
            let err = ReaderStream::with_capacity(err, 16 * 1024).map(|r| {
                r.map(Output::Stderr)
                    .map_err(|e| RuntimeError::Docker(format!("session output: {e}")))
            });
            let output: crate::OutputStream = Box::pin(futures_util::stream::select(out, err));
            (Box::pin(stdin), output, None)
        }
        None => {
            let master =
                fd.ok_or_else(|| RuntimeError::Docker("no terminal in the reply".into()))?;
            let master = Arc::new(pty_master(master)?);
            (
                Box::pin(Pty(master.clone())),
                raw_output(Pty(master.clone())),
                Some(master),
            )
        }
    };
    Ok(Some(Exec {
        id,
        stdin,
        output,
        guard,
        handle: ExecHandle::Guest(Arc::new(GuestSession {
            conn: tokio::sync::Mutex::new((conn, rest)),
            master,
        })),
    }))
}

fn io_err(e: impl Into<std::io::Error>) -> RuntimeError {
    RuntimeError::Docker(format!("session setup: {}", e.into()))
}

fn send_all(conn: &UnixStream, msg: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < msg.len() {
        let iov = [IoSlice::new(msg.get(sent..).unwrap_or_default())];
        // The descriptors ride with the first byte only.
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsg: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        sent += sendmsg::<()>(conn.as_raw_fd(), &iov, cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    }
    Ok(())
}

/// Reads one reply and at most one descriptor sent with it; also returns what was read past
/// the reply (a quick process's `exit` can arrive in the same read).
fn read_reply(conn: &UnixStream) -> std::io::Result<(Reply, Option<OwnedFd>, Vec<u8>)> {
    let bad = |what: &str| std::io::Error::other(format!("bad reply from init: {what}"));
    let mut msg = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    let len = loop {
        match message_len(&msg).map_err(|e| bad(e.0))? {
            Some(len) if msg.len() >= len => break len,
            _ => {}
        }
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let got = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let n = got.bytes;
        for c in got.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` in this process for us.
                    #[allow(unsafe_code)]
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if n == 0 {
            return Err(bad("connection closed"));
        }
        msg.extend_from_slice(buf.get(..n).unwrap_or_default());
        if msg.len() > MAX_MESSAGE.min(64 * 1024) || fds.len() > 1 {
            return Err(bad("too large"));
        }
    };
    let rest = msg.split_off(len);
    let reply = Reply::decode(&msg).map_err(|e| bad(e.0))?;
    Ok((reply, fds.pop(), rest))
}

/// Checks that `fd` is a pseudo-terminal master (TIOCGPTN answers only on one) and makes it
/// non-blocking for the async reactor.
fn pty_master(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, RuntimeError> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one c_uint to the pointer, valid for the call.
    #[allow(unsafe_code)]
    let is_master = unsafe { pty_number(fd.as_raw_fd(), &mut n) }.is_ok();
    if !is_master {
        return Err(RuntimeError::Docker(
            "the container's init sent something that is not a terminal".into(),
        ));
    }
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io_err)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io_err)?;
    // SAFETY: an OwnedFd is valid and open for as long as it is owned, and the AsyncFd owns it.
    #[allow(unsafe_code)]
    unsafe { AsyncFd::register(fd) }.map_err(|e| io_err(std::io::Error::from(e)))
}

/// A terminal master, read and written through the reactor. The end of the terminal (every
/// process closed its side) reads as EIO, taken here as the end of output.
struct Pty(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut ready = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match ready.try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(Into::into)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut ready = ready!(self.0.poll_write_ready(cx))?;
            match ready
                .try_io(|fd| nix::unistd::write(fd.get_ref().as_fd(), data).map_err(Into::into))
            {
                Ok(r) => return Poll::Ready(r),
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

/// Drains and discards what is left on a connection (tests).
#[cfg(test)]
fn drain(mut c: &UnixStream) -> usize {
    use std::io::Read;
    let mut buf = [0u8; 64];
    c.read(&mut buf).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replies_are_read_whole_with_their_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let msg = Reply::Started { pid: 7 }.encode();
        let (head, tail) = msg.split_at(3);
        send_all(&a, head, &[r.as_raw_fd()]).unwrap();
        send_all(&a, tail, &[]).unwrap();
        let (reply, fd, rest) = read_reply(&b).unwrap();
        assert_eq!(reply, Reply::Started { pid: 7 });
        assert!(rest.is_empty());
        assert!(fd.is_some());
        assert!(pty_master(fd.unwrap()).is_err(), "a pipe is not a terminal");
        drop(a);
        assert_eq!(drain(&b), 0);
    }

    #[tokio::test]
    async fn an_exit_in_the_same_read_as_the_start_is_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut both = Reply::Started { pid: 9 }.encode();
        both.extend(Reply::Exit { code: 3 }.encode());
        send_all(&a, &both, &[]).unwrap();
        let (reply, _, rest) = read_reply(&b).unwrap();
        assert_eq!(reply, Reply::Started { pid: 9 });
        b.set_nonblocking(true).unwrap();
        let s = GuestSession {
            conn: tokio::sync::Mutex::new((tokio::net::UnixStream::from_std(b).unwrap(), rest)),
            master: None,
        };
        assert_eq!(s.exit_code().await.unwrap(), 3);
        // A connection that ends without an exit is an error, not a code.
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        b.set_nonblocking(true).unwrap();
        let s = GuestSession {
            conn: tokio::sync::Mutex::new((tokio::net::UnixStream::from_std(b).unwrap(), vec![])),
            master: None,
        };
        assert!(s.exit_code().await.is_err());
    }

    #[test]
    fn garbage_replies_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        send_all(&a, &[255, 255, 255, 255, 1, 2, 3], &[]).unwrap();
        assert!(read_reply(&b).is_err());
        let (a, b) = UnixStream::pair().unwrap();
        send_all(&a, &[1, 0], &[]).unwrap();
        drop(a);
        assert!(read_reply(&b).is_err());
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

    fn spec() -> ExecSpec {
        ExecSpec {
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
        let ns = File::open(format!("/proc/{pid}/ns/net")).unwrap();
        let listener = in_netns(ns, || {
            std::os::unix::net::UnixListener::bind_addr(&SocketAddr::from_abstract_name(
                SOCKET_NAME,
            )?)
        })
        .await
        .unwrap();
        listener.set_nonblocking(true).unwrap();
        assert!(spawn(init, "", &spec()).await.unwrap().is_none());
        let (conn, _) = listener.accept().unwrap();
        conn.set_nonblocking(false).unwrap();
        assert_eq!(drain(&conn), 0, "a request reached the impostor");
        // A process that is gone is not joined.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            spawn(init, "", &spec()).await,
            Err(RuntimeError::ContainerNotFound(_))
        ));
    }
}
