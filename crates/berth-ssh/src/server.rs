//! The accept loop: our own (not russh's `run_on_socket`) so that the connection count is
//! bounded and shutdown is structured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::{Config, run_stream};
use russh::{Disconnect, MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Gateway;
use crate::algorithms::Algorithms;
use crate::handler::Connection;
use crate::throttle::Throttle;

/// Gateway settings that come from Berth's config.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Interval of keepalive probes; a client that misses `keepalive_max` in a row is gone.
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    pub max_connections: usize,
    /// Time a client has from connecting to authenticating (OpenSSH's LoginGraceTime).
    pub login_grace: Duration,
    /// Session channels one connection may have open at once (OpenSSH's MaxSessions).
    pub max_sessions: usize,
    /// Refused logins per minute after which an address's connections are closed at once
    /// until its failures age out; 0 = no limit.
    pub max_auth_failures_per_minute: usize,
    /// Client environment variables passed into sessions (exact names, or a prefix ending
    /// in `*`), like OpenSSH's AcceptEnv.
    pub accept_env: Vec<String>,
    /// Key exchange, cipher and MAC algorithms offered.
    pub algorithms: Algorithms,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 4,
            max_connections: 1000,
            login_grace: Duration::from_secs(30),
            max_sessions: 10,
            max_auth_failures_per_minute: 30,
            accept_env: vec!["LANG".into(), "LC_*".into()],
            algorithms: Algorithms::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot accept connections: {0}")]
    Accept(std::io::Error),
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
        nodelay: true,
        max_auth_attempts: 6,
        event_buffer_size: 100,
        ..Default::default()
    });
    let accept_env = Arc::new(config.accept_env);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let throttle = Arc::new(Throttle::new(config.max_auth_failures_per_minute));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) if is_transient(&e) => {
                        warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => return Err(ServerError::Accept(e)),
                };
                metrics::counter!("berth_connections_total").increment(1);
                // russh's `nodelay` applies only in its own accept loop; this is ours. Small
                // packets (handshake, keystrokes, SFTP replies) must not wait for Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(error = %e, "cannot set TCP_NODELAY");
                }
                if throttle.blocked(peer.ip()) {
                    metrics::counter!("berth_connections_refused_total").increment(1);
                    debug!(%peer, "connection refused: too many failed logins from this address");
                    continue;
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    metrics::counter!("berth_connections_refused_total").increment(1);
                    warn!(%peer, "connection refused: max_connections reached");
                    continue;
                };
                let authenticated = Arc::new(AtomicBool::new(false));
                let handler = Connection::new(
                    gateway.clone(),
                    Some(peer),
                    accept_env.clone(),
                    authenticated.clone(),
                    config.max_sessions,
                );
                let throttle = throttle.clone();
                let cfg = russh_config.clone();
                let shutdown = shutdown.clone();
                let grace = config.login_grace;
                conns.spawn(
                    async move {
                        let _permit = permit;
                        connection(cfg, stream, peer, handler, shutdown, authenticated.clone(), grace).await;
                        // A connection that never authenticated counts against its address.
                        if !authenticated.load(Ordering::SeqCst) {
                            throttle.record_failure(peer.ip());
                        }
                    }
                    .instrument(info_span!("conn", %peer)),
                );
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

async fn connection<G: Gateway>(
    config: Arc<Config>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Connection<G>,
    shutdown: CancellationToken,
    authenticated: Arc<AtomicBool>,
    grace: Duration,
) {
    debug!("connection accepted");
    let deadline = tokio::time::Instant::now() + grace;
    // run_stream waits for the client's identification line: bound it too.
    let stream = QuickAck {
        inner: stream,
        done: authenticated.clone(),
    };
    let session = match tokio::time::timeout_at(deadline, run_stream(config, stream, handler)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "ssh handshake failed");
            return;
        }
        Err(_) => {
            debug!("no ssh identification within the login grace time");
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let login_timer = tokio::time::sleep_until(deadline);
    tokio::pin!(login_timer);
    let mut timer_armed = true;
    loop {
        tokio::select! {
            r = &mut session => {
                if let Err(e) = r { debug!(error = %e, "connection ended with an error"); }
                break;
            }
            () = &mut login_timer, if timer_armed => {
                timer_armed = false;
                if !authenticated.load(Ordering::SeqCst) {
                    info!(target: "audit", event = "login_timeout", %peer, "not authenticated within the login grace time");
                    let _ = handle
                        .disconnect(Disconnect::ByApplication, "login grace time exceeded".into(), String::new())
                        .await;
                    let _ = tokio::time::timeout(Duration::from_secs(3), &mut session).await;
                    break;
                }
            }
            () = shutdown.cancelled() => {
                let _ = handle
                    .disconnect(Disconnect::ByApplication, "berth is shutting down".into(), String::new())
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(3), &mut session).await;
                break;
            }
        }
    }
    debug!(%peer, "connection closed");
}

/// The accepted stream, acknowledging at once what it reads until the client has logged in.
///
/// The OpenSSH client sends its KEXINIT and ECDH_INIT as two small writes with Nagle on.
/// When the server's KEXINIT went out first, the kernel delays its ACK of the client's
/// KEXINIT (delayed ACK, ~40 ms), and ECDH_INIT waits for that ACK: 40 ms of nothing in
/// many logins. `TCP_QUICKACK` is not sticky, so it is set again after each read of the
/// handshake; after the login the kernel's usual ACK pacing applies.
struct QuickAck {
    inner: tokio::net::TcpStream,
    done: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() && !self.done.load(Ordering::Relaxed) {
            let _ = socket2::SockRef::from(&self.inner).set_tcp_quickack(true);
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
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error() == Some(24) // EMFILE: wait for descriptors to free up
        || e.raw_os_error() == Some(23)
}
