//! The accept loop: our own (not russh's `run_on_socket`) so that what unauthenticated
//! clients hold is bounded ([`crate::door`]), authenticated connections have their own pool,
//! and shutdown is structured.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::{Config, Handle, run_stream};
use russh::{Disconnect, MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::Gateway;
use crate::algorithms::Algorithms;
use crate::door::{Door, DoorConfig, Refusal, Startup};
use crate::handler::{Authenticated, Connection};
use crate::quota::{Quotas, UserLimits};

/// The window a channel grants its client once input buffer is set aside for it (from its
/// user's budget and the daemon's): the most client input the daemon holds for one channel
/// (OpenSSH's sessions and tunnels use the same).
pub(crate) const WINDOW: u32 = 2 * 1024 * 1024;
/// The window every channel starts with, and keeps when the budgets are spent.
pub(crate) const INITIAL_WINDOW: u32 = 64 * 1024;
/// The largest packet a client may send.
pub(crate) const MAX_PACKET: u32 = 32 * 1024;

/// Gateway settings that come from Berth's config.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Interval of keepalive probes; a client that misses `keepalive_max` in a row is gone.
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    /// Authenticated connections open at once (unauthenticated ones are `door.startups`).
    pub max_connections: usize,
    /// Time a client has from connecting to authenticating (OpenSSH's LoginGraceTime).
    pub login_grace: Duration,
    /// Time a client has to send its identification line.
    pub ident_timeout: Duration,
    /// Session channels one connection may have open at once (OpenSSH's MaxSessions).
    pub max_sessions: usize,
    /// What one user may hold at once across her connections.
    pub user_limits: UserLimits,
    /// Client input the daemon may hold for all channels together, in bytes.
    pub input_buffer_bytes: usize,
    /// What unauthenticated clients may hold, and penalties for failing ones.
    pub door: DoorConfig,
    /// The process's descriptor limit: a connection accepted on a descriptor within
    /// `fd_reserve` of it is closed at once, so the admin socket and the sessions always have
    /// descriptors left. `None`: no check.
    pub fd_limit: Option<u64>,
    pub fd_reserve: u64,
    /// Client environment variables passed into sessions (exact names, or a prefix ending
    /// in `*`), like OpenSSH's AcceptEnv.
    pub accept_env: Vec<String>,
    /// Key exchange, cipher and MAC algorithms offered.
    pub algorithms: Algorithms,
    /// Where refusals are summarised in the log.
    pub refusal_summary_every: Duration,
    /// Time the client has to answer a channel the server opens towards it (a connection
    /// to a forwarded port or socket, the agent, X11). Past it the container's end is
    /// closed; with no answer ten times that later, the client is cut.
    pub open_answer: Duration,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 4,
            max_connections: 1000,
            login_grace: Duration::from_secs(30),
            ident_timeout: Duration::from_secs(10),
            max_sessions: 10,
            user_limits: UserLimits::default(),
            input_buffer_bytes: 512 << 20,
            door: DoorConfig::default(),
            fd_limit: None,
            fd_reserve: 128,
            accept_env: vec!["LANG".into(), "LC_*".into()],
            algorithms: Algorithms::default(),
            refusal_summary_every: Duration::from_secs(60),
            open_answer: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot accept connections: {0}")]
    Accept(std::io::Error),
}

/// A random percentage, for the early drop.
fn roll() -> u8 {
    let mut b = [0u8; 1];
    let _ = getrandom::fill(&mut b);
    b[0] % 100
}

/// Serves SSH on `listener` until `shutdown` is cancelled, then disconnects every client and
/// returns once their sessions have ended (or after a few seconds).
pub async fn serve<G: Gateway>(
    listener: TcpListener,
    config: SshConfig,
    host_key: PrivateKey,
    gateway: Arc<G>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let russh_config = Arc::new(Config {
        keys: vec![host_key],
        preferred: config.algorithms.preferred(),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_secs(1),
        // OpenSSH tries "none" first; that probe must not cost every login a second.
        auth_rejection_time_initial: Some(Duration::ZERO),
        // russh's default cuts idle shells after 10 minutes; keepalives detect dead clients.
        inactivity_timeout: None,
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: config.keepalive_max,
        // A client that takes none of what is written to it is as gone as one that misses
        // its keepalives (the loop that would send them waits in the write). No deadline when
        // either is zero (a zero deadline would fail every write that waits at all).
        write_stall_timeout: Some(
            config
                .keepalive_interval
                .saturating_mul(u32::try_from(config.keepalive_max).unwrap_or(u32::MAX)),
        )
        .filter(|d| !d.is_zero()),
        nodelay: true,
        max_auth_attempts: 6,
        event_buffer_size: 100,
        // Flow control: a channel's window is re-opened as its consumer takes the data
        // (`crate::inbox`), so the daemon holds at most one window per channel.
        manual_window_adjust: true,
        window_size: INITIAL_WINDOW,
        maximum_packet_size: MAX_PACKET,
        ..Default::default()
    });
    let accept_env = Arc::new(config.accept_env.clone());
    let quotas = Arc::new(Quotas::new(
        config.user_limits.clone(),
        config.input_buffer_bytes,
        config.open_answer,
    ));
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let door = Door::new(config.door.clone());
    let _summary = AbortOnDropHandle::new(tokio::spawn(
        door.clone().summarise(config.refusal_summary_every),
    ));
    let fd_ceiling = config.fd_limit.map(|l| l.saturating_sub(config.fd_reserve));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) if is_out_of_descriptors(&e) => {
                        // Logins resume by themselves once descriptors are free again.
                        door.refuse(Refusal::Descriptors);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) if is_transient(&e) => {
                        debug!(error = %e, "accept failed; retrying");
                        continue;
                    }
                    Err(e) => return Err(ServerError::Accept(e)),
                };
                metrics::counter!("berth_connections_total").increment(1);
                // The kernel hands out the lowest free descriptor: one this high means the
                // table is nearly full. Close it now; the reserve stays for the rest.
                if fd_ceiling.is_some_and(|c| u64::try_from(stream.as_raw_fd()).unwrap_or(u64::MAX) >= c) {
                    door.refuse(Refusal::Descriptors);
                    continue;
                }
                let startup = match door.admit(peer.ip(), roll()) {
                    Ok(s) => s,
                    Err(why) => {
                        debug!(%peer, reason = why.label(), "connection refused");
                        continue;
                    }
                };
                // russh's `nodelay` applies only in its own accept loop; this is ours. Small
                // packets (handshake, keystrokes, SFTP replies) must not wait for Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let authenticated = Arc::new(Authenticated::default());
                let handler = Connection::new(
                    gateway.clone(),
                    Some(peer),
                    accept_env.clone(),
                    authenticated.clone(),
                    config.max_sessions,
                    quotas.clone(),
                );
                let conn = Conn {
                    config: russh_config.clone(),
                    peer,
                    shutdown: shutdown.clone(),
                    authenticated,
                    grace: config.login_grace,
                    ident_timeout: config.ident_timeout,
                    door: door.clone(),
                    startup,
                    permits: permits.clone(),
                };
                conns.spawn(conn.run(stream, handler).instrument(debug_span!("conn", %peer)));
            }
        }
    }
    info!(
        "ssh gateway stopping; disconnecting {} connection(s)",
        conns.len()
    );
    if tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        conns.abort_all();
    }
    Ok(())
}

/// One accepted connection, from its first byte to its end.
struct Conn {
    config: Arc<Config>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    authenticated: Arc<Authenticated>,
    grace: Duration,
    ident_timeout: Duration,
    door: Arc<Door>,
    /// Its place among the unauthenticated connections, until it authenticates.
    startup: Startup,
    permits: Arc<Semaphore>,
}

impl Conn {
    async fn run<G: Gateway>(self, stream: tokio::net::TcpStream, handler: Connection<G>) {
        let Self {
            config,
            peer,
            shutdown,
            authenticated,
            grace,
            ident_timeout,
            door,
            startup,
            permits,
        } = self;
        debug!("connection accepted");
        let deadline = tokio::time::Instant::now() + grace;
        let stream = QuickAck {
            inner: stream,
            done: authenticated.clone(),
            ahead: Vec::new(),
            at: 0,
        };
        // run_stream waits for the client's identification line: that has its own, shorter
        // deadline (OpenSSH waits 10 s for it too).
        let ident_deadline = deadline.min(tokio::time::Instant::now() + ident_timeout);
        let session = match tokio::time::timeout_at(
            ident_deadline,
            run_stream(config, stream, handler),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(error = %e, "ssh handshake failed");
                door.failed(peer.ip());
                return;
            }
            Err(_) => {
                debug!("no ssh identification in time");
                door.failed(peer.ip());
                return;
            }
        };
        let handle = session.handle();
        // Every way out of this function ends the connection's task: a client that ignores a
        // DISCONNECT (or cannot be sent one, in a key exchange it never finishes) keeps
        // nothing once the 3 s given it are over. (Dropping `session` alone would detach it.)
        let _abort = AbortOnDrop(session.abort_handle());
        tokio::pin!(session);
        let login_timer = tokio::time::sleep_until(deadline);
        tokio::pin!(login_timer);
        let mut startup = Some(startup);
        let mut permit = None;
        loop {
            tokio::select! {
                r = &mut session => {
                    if let Err(e) = r { debug!(error = %e, "connection ended with an error"); }
                    break;
                }
                () = authenticated.wait(), if startup.is_some() => {
                    // Out of the startups, into the pool of authenticated connections.
                    startup = None;
                    if authenticated.over_cap() {
                        part(&handle, &mut session, Disconnect::TooManyConnections, "berth: too many connections for this user").await;
                        break;
                    }
                    match permits.clone().try_acquire_owned() {
                        Ok(p) => permit = Some(p),
                        Err(_) => {
                            door.refuse(Refusal::Full);
                            warn!(%peer, "authenticated connection refused: max_connections reached");
                            part(&handle, &mut session, Disconnect::TooManyConnections, "too many connections").await;
                            break;
                        }
                    }
                }
                () = authenticated.revoked(), if startup.is_none() => {
                    info!(%peer, "access revoked; closing the connection");
                    part(&handle, &mut session, Disconnect::ByApplication, "access revoked").await;
                    break;
                }
                () = &mut login_timer, if startup.is_some() => {
                    info!(target: "audit", event = "login_timeout", %peer, "not authenticated within the login grace time");
                    door.failed(peer.ip());
                    part(&handle, &mut session, Disconnect::ByApplication, "login grace time exceeded").await;
                    return;
                }
                () = shutdown.cancelled() => {
                    part(&handle, &mut session, Disconnect::ByApplication, "berth is shutting down").await;
                    break;
                }
            }
        }
        // A connection that ended without authenticating counts against its source.
        if !authenticated.get() {
            door.failed(peer.ip());
        }
        drop((startup, permit));
        debug!(%peer, "connection closed");
    }
}

/// How long a connection told to go is given to end before its task is aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Tells the client why it is being disconnected, then gives the connection `CLOSE_GRACE` to
/// end. The disconnect never waits: russh sends it ahead of whatever the connection was about
/// to say, even in a key exchange.
async fn part<F: Future + Unpin>(handle: &Handle, session: &mut F, reason: Disconnect, why: &str) {
    let _ = handle.disconnect(reason, why.into(), String::new()).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, session).await;
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The accepted stream, reading ahead, and acknowledging at once what it reads until the
/// client has logged in.
///
/// russh reads a packet as its length (4 bytes) and then the rest, each exactly, so each
/// packet cost three `recvfrom` calls: the length, the rest, and one that found nothing
/// (tokio forgets that the socket is readable only after a read short of its buffer). A
/// small read is made here into [`READ_AHEAD`] bytes on the stack instead, and what the
/// caller did not ask for is kept for its next read: a keystroke's packet is one call. What
/// is kept is at most [`READ_AHEAD`] bytes, and its buffer is let go when it empties, unless
/// it is small ([`KEEP_AHEAD`]). Reads of [`READ_AHEAD`] or more (a bulk packet's rest) go
/// to the socket directly once what was kept is taken. (tokio's `BufReader` does the same
/// read-ahead but holds its whole buffer for the connection's life: 2 KiB per idle session,
/// against at most [`KEEP_AHEAD`] here; and its buffered reads spend no task budget.)
///
/// The OpenSSH client sends its KEXINIT and ECDH_INIT as two small writes with Nagle on.
/// When the server's KEXINIT went out first, the kernel delays its ACK of the client's
/// KEXINIT (delayed ACK, ~40 ms), and ECDH_INIT waits for that ACK: 40 ms of nothing in
/// many logins. `TCP_QUICKACK` is not sticky, so it is set again after each read of the
/// handshake; after the login the kernel's usual ACK pacing applies.
struct QuickAck {
    inner: tokio::net::TcpStream,
    done: Arc<Authenticated>,
    /// Read from the socket, not yet asked for; the part before `at` is taken.
    ahead: Vec<u8>,
    at: usize,
}

/// What one small read takes from the socket (a keystroke's packet is about 50 bytes).
const READ_AHEAD: usize = 2048;
/// A buffer of bytes read ahead this small is kept when it empties: small packets cost one
/// allocation per connection, not one per packet. (A bulk packet's read-ahead, up to
/// [`READ_AHEAD`], is let go once taken, so an idle connection keeps no more than this.)
const KEEP_AHEAD: usize = 256;

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let kept = this.ahead.get(this.at..).unwrap_or_default();
        if !kept.is_empty() {
            // What is kept is served without the socket, so it spends the task's budget as
            // the socket's reads do: a client that packs many small packets into each read
            // still makes the connection's task yield to the others every 128 reads.
            let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
            coop.made_progress();
            let n = kept.len().min(buf.remaining());
            buf.put_slice(kept.get(..n).unwrap_or_default());
            this.at += n;
            if this.at == this.ahead.len() {
                this.at = 0;
                this.ahead.clear();
                if this.ahead.capacity() > KEEP_AHEAD {
                    this.ahead = Vec::new();
                }
            }
            return Poll::Ready(Ok(()));
        }
        let r = if buf.remaining() >= READ_AHEAD {
            std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let mut room = [std::mem::MaybeUninit::<u8>::uninit(); READ_AHEAD];
            let mut read = tokio::io::ReadBuf::uninit(&mut room);
            let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut read);
            if let Poll::Ready(Ok(())) = r {
                let got = read.filled();
                let (now, later) = got.split_at(got.len().min(buf.remaining()));
                buf.put_slice(now);
                this.ahead.extend_from_slice(later);
            }
            r
        };
        if r.is_ready() && !this.done.get() {
            let _ = socket2::SockRef::from(&this.inner).set_tcp_quickack(true);
        }
        r
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// EMFILE (the process's descriptors) or ENFILE (the system's).
fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback connection: the accepted side wrapped as the gateway wraps it, and the
    /// client's side.
    async fn wrapped() -> (QuickAck, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let stream = QuickAck {
            inner: accepted.unwrap().0,
            done: Arc::new(Authenticated::default()),
            ahead: Vec::new(),
            at: 0,
        };
        (stream, client.unwrap())
    }

    /// Several packets sent at once, read the way russh reads them (a length, then the
    /// rest, exactly), and in pieces of every other size: the bytes come through in order,
    /// nothing read ahead is lost, and what is kept never passes its bound.
    #[tokio::test]
    async fn bytes_read_ahead_come_through_whole_and_in_order() {
        let (mut server, mut client) = wrapped().await;
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                // Small writes and large ones, so that reads find one packet, several, or part.
                for piece in sent.chunks(1500).enumerate().flat_map(|(i, c)| {
                    let cut = (i * 37) % c.len();
                    [&c[..cut], &c[cut..]]
                }) {
                    client.write_all(piece).await.unwrap();
                }
                client.shutdown().await.unwrap();
                client
            })
        };
        let mut got = Vec::new();
        let sizes = [4usize, 48, 1, 4, 2047, 2048, 4, 32_768, 3, 100_000];
        let mut buf = vec![0u8; 100_000];
        'reading: for size in sizes.iter().cycle() {
            let n = server.read(&mut buf[..*size]).await.unwrap();
            if n == 0 {
                break 'reading;
            }
            got.extend_from_slice(&buf[..n]);
            assert!(server.ahead.len() - server.at <= READ_AHEAD);
            assert!(server.ahead.len() <= READ_AHEAD);
        }
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes came through out of order");
        // Empty again, and no more than a small buffer kept.
        assert_eq!(server.ahead.len(), 0);
        assert!(server.ahead.capacity() <= KEEP_AHEAD);
        drop(writer.await.unwrap());
    }

    /// A keystroke's packet is taken from the socket by one read: its length is asked for
    /// and the rest is then served from what was read ahead, with nothing left in the
    /// socket.
    #[tokio::test]
    async fn a_small_packet_is_one_read_of_the_socket() {
        let (mut server, mut client) = wrapped().await;
        let packet: Vec<u8> = (0..52u8).collect();
        client.write_all(&packet).await.unwrap();
        let mut len = [0u8; 4];
        server.read_exact(&mut len).await.unwrap();
        assert_eq!(len, [0, 1, 2, 3]);
        assert_eq!(
            server.ahead.len() - server.at,
            48,
            "the rest was not read ahead"
        );
        // The socket itself is empty now: its bytes are all in the read-ahead.
        let mut probe = [0u8; 1];
        assert!(matches!(
            server.inner.try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ));
        let mut rest = [0u8; 48];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest[..], &packet[4..]);
        // A zero-length read is not an end of stream in disguise, nor a read of the socket.
        client.write_all(b"more").await.unwrap();
        let mut none = [0u8; 0];
        assert_eq!(server.read(&mut none).await.unwrap(), 0);
        let mut more = [0u8; 4];
        server.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"more");
    }

    /// Bytes served from what was read ahead spend the task's budget like reads of the
    /// socket: a client packing a thousand one-byte reads into one segment does not keep
    /// the connection's task from yielding to the others.
    #[tokio::test]
    async fn reads_of_what_was_kept_make_the_task_yield() {
        let (mut server, mut client) = wrapped().await;
        client.write_all(&[7u8; 2000]).await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();
        assert_eq!(
            server.ahead.len() - server.at,
            1999,
            "the rest was not read ahead"
        );
        // Within one poll of the task, one-byte reads until one is refused.
        let served = std::future::poll_fn(|cx| {
            let mut served = 0;
            loop {
                let mut byte = [0u8; 1];
                let mut buf = tokio::io::ReadBuf::new(&mut byte);
                match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut server), cx, &mut buf)
                {
                    std::task::Poll::Ready(r) => {
                        r.unwrap();
                        served += 1;
                        assert!(served < 1999, "every kept byte was served in one poll");
                    }
                    std::task::Poll::Pending => return std::task::Poll::Ready(served),
                }
            }
        })
        .await;
        assert!(served <= 128, "{served} reads in one poll of the task");
        // The refusal woke the task: the rest comes on the next polls.
        let mut rest = vec![0u8; 1999 - served];
        server.read_exact(&mut rest).await.unwrap();
        assert!(rest.iter().all(|b| *b == 7));
    }
}
