//! The Berth daemon: the composition root. It reads no command line; `berth daemon` builds a
//! [`Config`] and calls [`run`], which wires the store, the Docker runtime, the lifecycle
//! manager, the SSH gateway and the admin API together and runs them until `shutdown` is
//! cancelled.
//!
//! Invariants: every container operation for a user goes through that user's lifecycle
//! owner ([`lifecycle`]); the SSH gateway reaches containers only through
//! [`gateway::BerthGateway`]; the admin socket is root-only.

pub mod admin;
pub mod audit;
pub mod certs;
pub mod config;
pub mod connect;
pub mod connections;
pub mod disk;
pub mod firewall;
pub mod gateway;
pub mod guest_binary;
pub mod lifecycle;
pub mod mounts;
pub mod moving;
mod resolve;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod user_settings;
pub mod words_socket;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use berth_runtime::{DockerRuntime, Limits, Runtime};
use berth_ssh::SshConfig;
use berth_store::Store;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, ConfigError};

use crate::admin::AdminState;
use crate::audit::Audit;
use crate::gateway::BerthGateway;
use crate::lifecycle::{Lifecycle, Settings};
use crate::sessions::Sessions;

/// A startup failure with advice for the admin; the CLI prints the hint on its own line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartupError {
    pub message: String,
    pub hint: Option<String>,
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = &config.state_dir;
    let nofile = raise_nofile();
    // Checked before anything is created: a helper that cannot be PID 1 in every image is
    // refused at start, not discovered at the first login.
    let guest = guest_binary::check(&config.guest_source()?).map_err(|message| StartupError {
        message,
        hint: None,
    })?;
    create_private_dir(state)?;
    // One daemon per state directory: a second one would adopt (and hang up) the first one's
    // sessions and replace its admin socket.
    let _lock = lock_state_dir(state)?;
    // The SSH port is taken before anything touches the engine, the host's firewall or the
    // containers: a port in use stops the daemon here, having changed nothing. It listens
    // only once the gateway is about to serve, so that a client meanwhile is refused at
    // once (as before) rather than left waiting for a banner through a long start-up.
    let port_taken = bind_ssh_port(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let store = Store::open(&state.join("berth.db"))
        .with_context(|| format!("cannot open the store in {}", state.display()))?;
    let instance = store.instance_id()?;
    // For tools outside the daemon (the uninstaller's --purge finds this instance's
    // containers by their `berth.instance` label).
    std::fs::write(state.join("instance"), format!("{instance}\n"))
        .with_context(|| format!("cannot write {}", state.join("instance").display()))?;
    let audit = Arc::new(
        Audit::to_file(
            &state.join("audit.log"),
            config.audit_max_mb.saturating_mul(1024 * 1024),
        )
        .with_context(|| format!("cannot open {}", state.join("audit.log").display()))?
        .with_user_budget(config.audit_user_budget),
    );
    let metrics = match config.metrics_listen {
        Some(addr) => Some(telemetry::bind(addr).await?),
        None => None,
    };
    let metrics_upkeep = metrics.as_ref().map(telemetry::MetricsListener::handle);
    let certs = Arc::new(
        certs::Certs::load(
            config.trusted_user_ca_keys.as_deref(),
            config.revoked_keys.as_deref(),
        )
        .map_err(|message| StartupError {
            message,
            hint: None,
        })?,
    );
    let host_key = berth_ssh::load_or_create_host_key(&state.join("host_ed25519_key"))?;
    // The helper's bytes (megabytes) are not kept once written.
    let guest_dir = install_guest(guest, state)?;

    let runtime = Arc::new(
        DockerRuntime::connect(config.docker_socket.clone())
            .await
            .map_err(|e| StartupError {
                message: format!(
                    "cannot reach the Docker engine at {}: {e}",
                    config.docker_socket.display()
                ),
                hint: Some("start it (systemctl start docker, or run dockerd)".into()),
            })?,
    );
    let engine = runtime.version().await?;
    info!(docker = %engine.version, api = %engine.api_version, "connected to the Docker engine");
    // Shared folders: a source that would hand over the host stops the daemon here, named,
    // before anything is changed on the host.
    let data_root = runtime.data_root().await?;
    let sources = Arc::new(mounts::SourceRules::new(
        state,
        &config.docker_socket,
        &data_root,
    ));
    let server_mounts = sources
        .server_mounts(&config.mounts)
        .map_err(|e| StartupError {
            message: format!("invalid config: {e}"),
            hint: None,
        })?;
    // Each user's container joins a network of her own, made by her lifecycle owner; the
    // firewall keeps all of them from the host before any container starts.
    let network = config.network_settings().map_err(anyhow::Error::msg)?;
    let firewall = Arc::new(config.firewall_rules().map_err(anyhow::Error::msg)?);
    firewall.ensure().await.map_err(|e| StartupError {
        message: format!("cannot install the host firewall for the containers: {e}"),
        hint: Some(
            "the daemon runs as root with iptables installed; or set [isolation] firewall = false \
             and keep containers from the host otherwise"
                .into(),
        ),
    })?;
    info!(isolation = %firewall.state().await, "host firewall");
    // The network every container shared before issue 14, if no container is left on it.
    let _ = runtime.remove_network(&network.name).await;
    // Containers get the disk cap only where the engine enforces it: a create never fails
    // for want of a quota, and the admin is told (here and in `berth status`).
    let quota = disk::Quota::probe(&*runtime, disk_bytes(&config)).await;
    match &quota {
        disk::Quota::NotEnforced { .. } => warn!("disk quota: {}", quota.describe()),
        _ => info!("disk quota: {}", quota.describe()),
    }
    let userns = user_namespaces(&*runtime).await;
    if userns.starts_with("on") {
        info!("user namespaces: {userns}");
    } else {
        warn!("user namespaces: {userns}");
    }
    let mut limits = limits(&config);
    limits.disk_bytes = quota.bytes();
    let gpus =
        berth_proto::settings::Gpus::parse(&config.limits.gpus).map_err(anyhow::Error::msg)?;
    let gpu_support = gpu_support(&*runtime).await;
    if gpus != berth_proto::settings::Gpus::None
        && gpu_support != berth_runtime::GpuSupport::Available
    {
        warn!(gpus = %gpus, "limits.gpus is set but GPUs are {gpu_support}: users with GPUs cannot log in");
    } else {
        info!("GPUs: {gpu_support}");
    }

    let lifecycle = Lifecycle::new(
        runtime.clone(),
        store.clone(),
        Settings {
            prefix: config.container_prefix.clone(),
            instance,
            network,
            guest_dir: guest_dir.clone(),
            server: user_settings::Server {
                limits,
                gpus,
                mounts: server_mounts,
            },
            gpu_support,
            sources,
            idle_stop: Duration::from_secs(config.idle_stop_seconds),
            stop_timeout_secs: i32::try_from(config.stop_timeout_seconds).unwrap_or(i32::MAX),
            run_dir: state.join("run"),
            guest_binary: guest_dir.join("berth-guest"),
            commit_repository: config.commit_repository.clone(),
            home_volume: config.home_volume,
            audit: audit.clone(),
        },
    );
    lifecycle.disk().set_quota(quota);
    let sessions = Sessions::new(audit.clone());
    lifecycle.reconcile().await?;

    let listener = port_taken
        .listen(SSH_BACKLOG)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let port = listener.local_addr()?.port();
    let forwarding = berth_proto::ForwardingInfo {
        tcp: config.allow_tcp_forwarding,
        agent: config.allow_agent_forwarding,
        x11: config.allow_x11_forwarding,
    };
    let connections = connections::Connections::new();
    let gateway = Arc::new(BerthGateway {
        store: store::AsyncStore::new(store.clone()),
        forwarding,
        runtime: runtime.clone(),
        lifecycle: lifecycle.clone(),
        sessions: sessions.clone(),
        port,
        refusals: Default::default(),
        certs,
        connections: connections.clone(),
        mounts: Default::default(),
    });
    let ssh_config = SshConfig {
        keepalive_interval: Duration::from_secs(config.keepalive_interval_seconds),
        keepalive_max: config.keepalive_max,
        max_connections: config.max_connections,
        login_grace: Duration::from_secs(config.login_grace_seconds),
        max_sessions: config.max_sessions,
        user_limits: berth_ssh::UserLimits {
            connections: config.limits.connections,
            sessions: config.limits.sessions,
            forwards: config.limits.forwards,
            input_buffer_bytes: mib(config.limits.input_buffer_mb),
        },
        input_buffer_bytes: mib(config.input_buffer_mb),
        door: config.door().map_err(anyhow::Error::msg)?,
        fd_limit: Some(nofile),
        // The admin socket, the engine's client, the store and the sessions' pipes keep
        // this many descriptors that no new SSH connection may take.
        fd_reserve: (nofile / 4).min(128),
        accept_env: config.accept_env.clone(),
        algorithms: config.algorithms().map_err(anyhow::Error::msg)?,
        ..SshConfig::default()
    };
    let admin_state = Arc::new(AdminState {
        store: store::AsyncStore::new(store),
        forwarding,
        runtime,
        lifecycle: lifecycle.clone(),
        sessions,
        connections,
        listen: config.listen.to_string(),
        started: std::time::Instant::now(),
        images: tokio::sync::Mutex::new(()),
        firewall: Some(firewall.clone()),
    });
    // Someone flushing the host's firewall (a firewall service reloading) would open the
    // host to the containers: the rules are put back within a minute.
    let every = std::env::var("BERTH_TEST_FIREWALL_CHECK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &u64| (1..=3600).contains(s))
        .map_or(Duration::from_secs(60), Duration::from_secs);
    tokio::spawn(firewall.clone().keep(every, shutdown.clone()));
    let admin_listener = admin::bind(&config.admin_socket()).with_context(|| {
        format!(
            "cannot create the admin socket {}",
            config.admin_socket().display()
        )
    })?;
    let admin = spawn_admin(admin_listener, metrics, admin_state, shutdown.clone())?;
    if config
        .kex_algorithms
        .iter()
        .any(|k| k.starts_with("diffie-hellman"))
    {
        warn!(
            "kex_algorithms offers a finite-field Diffie-Hellman group: each such exchange \
             costs the SSH workers up to half a second of CPU, chosen by an unauthenticated \
             client; offer it only while a client that has nothing else needs it"
        );
    }
    let _trim = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(return_free_memory()));
    let _upkeep = metrics_upkeep
        .map(|h| tokio_util::task::AbortOnDropHandle::new(tokio::spawn(telemetry::upkeep(h))));
    info!(version = berth_proto::VERSION_LONG, listen = %config.listen, state_dir = %state.display(), descriptors = nofile, "berth daemon ready");
    let ssh = berth_ssh::serve(listener, ssh_config, host_key, gateway, shutdown.clone()).await;
    shutdown.cancel();
    lifecycle.shutdown().await;
    let admin = tokio::task::spawn_blocking(move || admin.join()).await;
    let _ = std::fs::remove_file(config.admin_socket());
    ssh?;
    match admin {
        Ok(Ok(r)) => r.context("admin socket failed")?,
        _ => bail!("the admin socket's thread failed"),
    }
    info!("berth daemon stopped");
    Ok(())
}

/// Serves the admin socket (and the metrics endpoint) on a runtime of its own, on a thread
/// of its own: whatever the SSH side is doing (a flood of handshakes, many busy sessions),
/// `berth status` and user changes get a thread that does nothing else. The work they start
/// (store calls, the lifecycle owners, Docker) is reached through channels and clients that
/// work from any runtime.
fn spawn_admin<R: Runtime>(
    listener: tokio::net::UnixListener,
    metrics: Option<telemetry::MetricsListener>,
    state: Arc<AdminState<R>>,
    shutdown: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    // Registered again with the admin runtime's own reactor.
    let listener = listener.into_std()?;
    let metrics = metrics
        .map(telemetry::MetricsListener::into_std)
        .transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the admin runtime")?;
    let thread = std::thread::Builder::new()
        .name("berth-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some(m) = metrics {
                    match telemetry::MetricsListener::from_std(m) {
                        Ok(m) => {
                            tokio::spawn(telemetry::serve(m, state.clone(), shutdown.clone()));
                        }
                        Err(e) => tracing::error!(error = %e, "metrics endpoint not served"),
                    }
                }
                admin::serve(
                    tokio::net::UnixListener::from_std(listener)?,
                    state,
                    shutdown,
                )
                .await
            })
        })
        .context("cannot start the admin thread")?;
    Ok(thread)
}

fn limits(config: &Config) -> Limits {
    let l = &config.limits;
    let memory = i64::try_from(l.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
    // f64 → nanocpus; validated to 0..=1024 in Config::validate.
    #[allow(clippy::cast_possible_truncation)]
    let nano = (l.cpus * 1e9) as i64;
    Limits {
        memory_bytes: (memory > 0).then_some(memory),
        nano_cpus: (nano > 0).then_some(nano),
        pids: i64::from(l.pids),
        log_bytes: (l.log_mb > 0).then(|| l.log_mb.saturating_mul(1024 * 1024)),
        // Set once the engine is known to enforce it (see `run`).
        disk_bytes: None,
    }
}

/// What `berth status` and `berth daemon --check` say about user namespaces (Docker's
/// `userns-remap`): on, with the host UID of containers' root, or off and what to do.
pub async fn user_namespaces<R: Runtime>(runtime: &R) -> String {
    match tokio::time::timeout(Duration::from_secs(10), runtime.user_namespaces()).await {
        Ok(Ok(u)) => u.to_string(),
        Ok(Err(e)) => format!("unknown: cannot ask the engine: {e}"),
        Err(_) => "unknown: the engine did not answer in time".into(),
    }
}

/// Whether the engine can give containers GPUs; an engine that does not answer has none.
pub async fn gpu_support<R: Runtime>(runtime: &R) -> berth_runtime::GpuSupport {
    match tokio::time::timeout(Duration::from_secs(10), runtime.gpu_support()).await {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot ask the engine for its runtimes; GPUs taken as not available");
            berth_runtime::GpuSupport::NotAvailable
        }
        Err(_) => berth_runtime::GpuSupport::NotAvailable,
    }
}

/// `limits.disk_gb` in bytes; `None` when off.
pub fn disk_bytes(config: &Config) -> Option<u64> {
    // Validated to 0..=1e6 GiB in Config::validate: the product fits.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "validated range"
    )]
    let bytes = (config.limits.disk_gb * 1024.0 * 1024.0 * 1024.0) as u64;
    (bytes > 0).then_some(bytes)
}

/// Holds `STATE/daemon.lock` (flock) for the daemon's lifetime.
fn lock_state_dir(state: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = state.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        StartupError {
            message: format!(
                "another berth daemon is running with the state directory {} ({e})",
                state.display()
            ),
            hint: Some("stop it first, or give this one another --state-dir".into()),
        }
        .into()
    })
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    check_secure_dir(dir, nix::unistd::geteuid().as_raw()).map_err(|message| StartupError {
        message,
        hint: Some(
            "the state directory holds the host key, the database and the audit log: it must be \
             the daemon's own, in directories only root can change"
                .into(),
        ),
    })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set permissions on {}", dir.display()))?;
    Ok(())
}

/// Whether `dir` (once its symlinks are resolved) is a directory of user `owner`'s and every
/// directory above it belongs to root or `owner` and is writable by nobody else, unless it
/// is sticky (like `/tmp`): as sshd's `StrictModes` checks a user's files. Otherwise whoever
/// owns one of them could put a symlink where the daemon writes (its audit log, as root, say
/// to `/etc/ld.so.preload`), or a host key or database of theirs where it reads.
fn check_secure_dir(dir: &Path, owner: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let meta = |p: &Path| std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()));
    let top = meta(&real)?;
    if !top.is_dir() || top.uid() != owner {
        return Err(format!(
            "state directory {} is owned by uid {}, not by the daemon's (uid {owner})",
            real.display(),
            top.uid()
        ));
    }
    // Above what it resolves to, and every step of the path as given: a symlink on the way
    // is followed at every open, so it must be as safe from others as a directory is.
    let given = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for above in real.ancestors().skip(1).chain(given.ancestors()) {
        let m = meta(above)?;
        let shared = m.is_dir() && m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if (m.uid() != 0 && m.uid() != owner) || shared {
            return Err(format!(
                "{} (on the way to state directory {}) can be changed by others: owner uid {}, mode {:o}",
                above.display(),
                real.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Copies the static `berth-guest` helper into `STATE/guest/`, the directory mounted
/// read-only at `/.berth` in every container.
/// Raises the soft descriptor limit to the hard one (systemd gives services 1024 soft; every
/// connection and session holds descriptors) and returns the soft limit now in force.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

fn install_guest(bytes: Vec<u8>, state: &Path) -> anyhow::Result<PathBuf> {
    let dir = state.join("guest");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let dst = dir.join("berth-guest");
    if std::fs::read(&dst).ok().as_deref() != Some(bytes.as_slice()) {
        // Write beside and rename: running containers keep the old inode.
        let tmp = dir.join(".berth-guest.new");
        std::fs::write(&tmp, &bytes)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &dst)?;
    }
    // The mount point of each container's own guest socket directory (see lifecycle).
    std::fs::create_dir_all(dir.join("run"))?;
    // The state dir is 0700; Docker (root) can still bind-mount the guest dir from it.
    Ok(dir)
}

/// `n` MiB in bytes (saturating).
fn mib(n: u64) -> usize {
    usize::try_from(n.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
}

/// Sets up glibc's allocator for a daemon whose load comes and goes; called before the
/// runtime starts its threads.
///
/// Buffers of 320 KiB and more (a channel's input, up to its 2 MiB window) get pages of their
/// own, given back the moment they are freed; glibc would otherwise raise this threshold as
/// such buffers come and go, and serve them from the heap. The threshold lies just above a
/// frame of `berth connect` (`berth_connect::proto::MAX_FRAME`, 272 KiB): at 256 KiB each
/// frame of a bulk copy was a mapping of its own, faulted in page by page and unmapped (1 GiB
/// written through a mount: 2.3 s of the daemon's CPU, 1.5 s from the heap). (Fewer arenas, `M_ARENA_MAX` 2,
/// was tried: after 30 users' logins the arenas held 5.4 MB instead of 7.7 MB for the same
/// 1.3 MB in use, but the memory resident was the same 3.4 MB, and the workers would share
/// one lock; not kept.)
///
/// The top of a heap is given back once 2 MiB of it are free (with the threshold above fixed,
/// glibc would give it back at 128 KiB): a bulk copy through `berth connect` grew and shrank
/// the workers' heaps for every request, and the page faults that refilled them were a fifth
/// of the daemon's CPU (1 GiB written: 2.7 s of CPU before, 2.1–2.25 s after; 8 MiB gave
/// 2.0 s). The periodic trim ([`TRIM_EVERY`]) does not shrink the top of a thread's heap
/// (glibc's `malloc_trim` trims only the main heap's top, and a thread's heap shrinks only
/// once its free top reaches the threshold), so up to 2 MiB per thread arena can stay
/// resident for good; 8 MiB would have let each keep 8.
pub fn tune_allocator() {
    /// A frame of `berth connect` (and the allocator's header) stays below it.
    const MMAP_THRESHOLD: i32 = 320 * 1024;
    const _: () = assert!(berth_connect::proto::MAX_FRAME + 64 <= MMAP_THRESHOLD as usize);
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; thread-safe in glibc.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 20);
    }
}

/// Connections the kernel queues for the gateway before it accepts them (as tokio's own
/// `TcpListener::bind`).
const SSH_BACKLOG: u32 = 1024;

/// Binds the SSH port without listening on it yet: a port in use fails here, and until
/// [`tokio::net::TcpSocket::listen`] a client is refused. `SO_REUSEADDR` as a listener of
/// the standard library has it (a restart is not refused for connections in `TIME_WAIT`).
fn bind_ssh_port(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// How often memory the allocator holds free goes back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// glibc's allocator keeps what a load freed (hundreds of sessions' buffers) in its arenas,
/// so the daemon's RSS would stay at its peak for good; every few seconds the free pages
/// go back to the kernel (`malloc_trim`, which walks only the allocator's own free lists:
/// a few milliseconds at most).
async fn return_free_memory() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim takes no pointers and is thread-safe in glibc.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_state_directory_must_be_the_daemons_in_directories_only_root_changes() {
        // Run as root by the test command; as another user only the owner is checked.
        let me = nix::unistd::geteuid().as_raw();
        let top = tempfile::tempdir().unwrap();
        mode(top.path(), 0o755);
        let ok = top.path().join("ok");
        std::fs::create_dir(&ok).unwrap();
        check_secure_dir(&ok, me).unwrap();
        // A parent others may write to (not sticky): refused, naming it.
        let shared = top.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        mode(&shared, 0o777);
        std::fs::create_dir(shared.join("state")).unwrap();
        let err = check_secure_dir(&shared.join("state"), me).unwrap_err();
        assert!(err.contains("shared") && err.contains("777"), "{err}");
        // Sticky, like /tmp: kept.
        mode(&shared, 0o1777);
        check_secure_dir(&shared.join("state"), me).unwrap();
        // Through a symlink: what it leads to is checked.
        std::os::unix::fs::symlink(shared.join("state"), top.path().join("link")).unwrap();
        check_secure_dir(&top.path().join("link"), me).unwrap();
        if me != 0 {
            return;
        }
        // The directory itself, or one above it, someone else's.
        let theirs = top.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = check_secure_dir(&theirs, me).unwrap_err();
        assert!(err.contains("uid 65534"), "{err}");
        std::fs::create_dir(theirs.join("state")).unwrap();
        let err = check_secure_dir(&theirs.join("state"), me).unwrap_err();
        assert!(err.contains("theirs") && err.contains("65534"), "{err}");
        // A symlink of someone else's to a good one: they could point it elsewhere later.
        let link = top.path().join("their-link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let err = check_secure_dir(&link, me).unwrap_err();
        assert!(err.contains("their-link") && err.contains("65534"), "{err}");
    }
}
