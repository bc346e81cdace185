//! Prometheus metrics at `http://metrics_listen/metrics` (opt-in). The crates count through
//! the [`metrics`] facade; this module installs the recorder, fills in the gauges that are
//! read at scrape time (containers running, each user's disk use) and serves the text
//! format. Every name starts with `berth_`; only `berth_user_disk_bytes` carries a user
//! label (one series per user: bounded by the users the admin added).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use berth_runtime::Runtime;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::admin::AdminState;

/// Login latency buckets, seconds: from a warm login (~0.1 s) to a slow first login.
const LOGIN_BUCKETS: &[f64] = &[0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0];

/// How often histogram samples nobody scraped are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

pub struct MetricsListener {
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
}

/// A bound metrics listener moved between runtimes (see `spawn_admin`).
pub struct StdMetricsListener {
    listener: std::net::TcpListener,
    handle: PrometheusHandle,
}

impl MetricsListener {
    pub fn into_std(self) -> std::io::Result<StdMetricsListener> {
        Ok(StdMetricsListener {
            listener: self.listener.into_std()?,
            handle: self.handle,
        })
    }

    /// Registers the listener with the current runtime.
    pub fn from_std(l: StdMetricsListener) -> std::io::Result<Self> {
        Ok(Self {
            listener: tokio::net::TcpListener::from_std(l.listener)?,
            handle: l.handle,
        })
    }
}

/// Installs the process-wide recorder and binds `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<MetricsListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("berth_login_duration_seconds".into()),
            LOGIN_BUCKETS,
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    describe();
    Ok(MetricsListener { listener, handle })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "berth_connections_total",
        "TCP connections accepted by the SSH gateway"
    );
    describe_counter!(
        "berth_connections_refused_total",
        "connections closed at once (max_connections, or an address over its failure limit)"
    );
    describe_counter!(
        "berth_logins_total",
        "successful public-key authentications"
    );
    describe_counter!("berth_auth_failures_total", "refused public keys");
    describe_gauge!("berth_sessions_open", "sessions with a running process");
    describe_gauge!(
        "berth_containers_running",
        "this instance's running containers"
    );
    describe_gauge!(
        "berth_user_disk_bytes",
        Unit::Bytes,
        "a user's disk use: her container's writable layer, home volume and committed image, as last measured (measured apart, at most every 30 s)"
    );
    describe_gauge!(
        "berth_disk_bytes",
        Unit::Bytes,
        "every user's disk use together (containers' writable layers, home volumes, committed images), as last measured"
    );
    describe_histogram!(
        "berth_login_duration_seconds",
        Unit::Seconds,
        "from authentication to the first session's process running"
    );
    describe_counter!(
        "berth_relayed_bytes_total",
        Unit::Bytes,
        "bytes relayed between clients and containers (sessions and tunnels, both ways)"
    );
}

/// Folds the login histogram's samples into their buckets every [`UPKEEP_EVERY`]: they wait
/// in the recorder until drained, by a scrape or by this (one sample kept per login
/// otherwise, for good, should nobody scrape or the metrics server not start). Runs from
/// the recorder's installation for as long as the daemon does.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

impl MetricsListener {
    pub fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }
}

pub async fn serve<R: Runtime>(
    l: MetricsListener,
    state: Arc<AdminState<R>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render::<R>))
        .with_state((state, l.handle));
    serve_bounded(l.listener, app, METRICS_BOUNDS, shutdown).await;
    Ok(())
}

/// What one HTTP client of the metrics endpoint may hold. Anyone who can reach its port is a
/// stranger (it has no authentication, and at least every local user can reach it), and a
/// scrape is one small request: so few connections at once, each with a deadline for its
/// request's header and for its whole life, and a small buffer for what it sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpBounds {
    /// Connections served at once; the next wait in the kernel's backlog until one ends.
    pub connections: usize,
    /// From when a request is awaited (the connection's start, or the answer before) to its
    /// header's end: a keep-alive connection idle that long is closed.
    pub header_read: std::time::Duration,
    /// A connection's whole life, however busy (keep-alive included).
    pub lifetime: std::time::Duration,
}

const METRICS_BOUNDS: HttpBounds = HttpBounds {
    connections: 16,
    header_read: std::time::Duration::from_secs(5),
    lifetime: std::time::Duration::from_secs(30),
};

/// The most a client's unread bytes may take in a connection's buffer (hyper's least).
const HTTP_BUFFER: usize = 8 * 1024;

/// Serves `app` on `listener` within `bounds` until `shutdown`. (`axum::serve` gives hyper no
/// timer, so a client that never ends its header holds its connection and up to 400 KiB of
/// buffer for ever, and as many connections as it opens.)
pub(crate) async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: Router,
    bounds: HttpBounds,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(bounds.connections.max(1)));
    let mut served = tokio::task::JoinSet::new();
    loop {
        while served.try_join_next().is_some() {}
        // A slot first, then the connection: past the cap, clients wait in the backlog.
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was taken: not
                    // this listener's end. A pause, so that it does not spin.
                    tracing::debug!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        served.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_read)
                .max_buf_size(HTTP_BUFFER)
                .serve_connection(TokioIo::new(stream), service);
            // Ended at its deadline by being dropped: the socket is closed.
            let _ = tokio::time::timeout(bounds.lifetime, connection).await;
        });
    }
    served.abort_all();
}

async fn render<R: Runtime>(
    State((state, handle)): State<(Arc<AdminState<R>>, PrometheusHandle)>,
) -> ([(&'static str, &'static str); 1], String) {
    // Asked of the engine at most every few seconds, however often the endpoint is hit.
    static ASKED: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let due = ASKED.lock().is_ok_and(|mut at| {
        let due = at.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5));
        if due {
            *at = Some(std::time::Instant::now());
        }
        due
    });
    if due
        && let Ok(list) = state
            .runtime
            .list("berth.instance", state.lifecycle.instance())
            .await
    {
        #[allow(clippy::cast_precision_loss)]
        let running = list.iter().filter(|c| c.running).count() as f64;
        metrics::gauge!("berth_containers_running").set(running);
    }
    if due {
        let usage = state.lifecycle.disk_usage().await;
        if state.lifecycle.disk().measured() {
            #[allow(clippy::cast_precision_loss, reason = "a gauge")]
            metrics::gauge!("berth_disk_bytes").set(crate::disk::total(&usage) as f64);
        }
        for (user, used) in usage {
            #[allow(clippy::cast_precision_loss, reason = "a gauge")]
            metrics::gauge!("berth_user_disk_bytes", "user" => user).set(used.total() as f64);
        }
    }
    handle.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4")],
        handle.render(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Serves a one-route app within `bounds`; the address, and the token that stops it.
    async fn start(bounds: HttpBounds) -> (SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/x", get(|| async { "ok" }));
        let stop = CancellationToken::new();
        tokio::spawn(serve_bounded(listener, app, bounds, stop.clone()));
        (addr, stop)
    }

    /// Everything the server sends until it closes the connection, or `None` if it is still
    /// open after `within`.
    async fn until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
        let mut all = Vec::new();
        tokio::time::timeout(within, s.read_to_end(&mut all))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&all).into_owned())
    }

    const GET: &[u8] = b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";

    #[tokio::test]
    async fn a_scrape_is_answered() {
        let (addr, stop) = start(METRICS_BOUNDS).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(GET).await.unwrap();
        let answer = until_closed(&mut s, Duration::from_secs(10)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_header_never_ended_is_cut_at_its_deadline() {
        let bounds = HttpBounds {
            header_read: Duration::from_millis(300),
            lifetime: Duration::from_secs(600),
            ..METRICS_BOUNDS
        };
        let (addr, stop) = start(bounds).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\nx-slow: ")
            .await
            .unwrap();
        // A byte now and then, as a slow client would send them: the deadline is for the
        // whole header, not between bytes.
        let dribble = async {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s.write_all(b"a").await.is_err() {
                    break;
                }
            }
        };
        dribble.await;
        let answer = until_closed(&mut s, Duration::from_secs(10)).await;
        assert!(answer.is_some(), "the connection is still open");
        assert!(!answer.unwrap().contains("200 OK"));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_header_past_the_buffer_is_refused() {
        let bounds = HttpBounds {
            header_read: Duration::from_secs(600),
            lifetime: Duration::from_secs(600),
            ..METRICS_BOUNDS
        };
        let (addr, stop) = start(bounds).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nhost: a\r\n")
            .await
            .unwrap();
        let line = format!("x-big: {}\r\n", "a".repeat(1000));
        for _ in 0..64 {
            if s.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
        let answer = until_closed(&mut s, Duration::from_secs(10)).await;
        assert!(answer.is_some(), "64 KiB of header were taken in");
        assert!(!answer.unwrap().contains("200 OK"));
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let bounds = HttpBounds {
            connections: 1,
            header_read: Duration::from_secs(600),
            lifetime: Duration::from_secs(600),
        };
        let (addr, stop) = start(bounds).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(GET).await.unwrap();
        // Not served while the first holds the only slot (served at once without the cap)...
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(500), second.read(&mut byte)).await;
        assert!(early.is_err(), "served past the cap of one connection");
        // ...and served once it is given back.
        drop(idle);
        let answer = until_closed(&mut second, Duration::from_secs(10))
            .await
            .expect("the second connection was never served");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.cancel();
    }
}
