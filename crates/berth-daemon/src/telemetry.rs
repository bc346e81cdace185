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
    axum::serve(l.listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
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
