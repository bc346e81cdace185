//! `berth daemon`: runs the server in the foreground until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use berth_daemon::{Config, StartupError};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::Failure;

#[derive(clap::Args)]
pub struct Args {
    /// Address the SSH gateway listens on [default: 0.0.0.0:2222]
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Config file [default: /etc/berth/berth.toml when present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The static berth-guest helper [default: next to this binary, else
    /// ../libexec/berth/berth-guest from it]
    #[arg(long, value_name = "FILE")]
    guest_binary: Option<PathBuf>,
    /// Validate the configuration, print the effective settings and exit
    #[arg(long)]
    check: bool,
    /// With --check: print the settings as JSON (an unset optional one as null)
    #[arg(long, requires = "check")]
    json: bool,
}

impl Args {
    /// Runs the server, rather than checking its configuration.
    pub fn serves(&self) -> bool {
        !self.check
    }
}

pub fn run(args: Args, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    let mut config =
        Config::load(args.config.as_deref()).map_err(|e| Failure::new(e.to_string()))?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = state_dir {
        config.state_dir = d;
    }
    if let Some(g) = args.guest_binary {
        config.guest_binary = Some(g);
    }
    if config.guest_binary.is_none() {
        config.guest_binary = packaged_guest();
    }
    config
        .validate()
        .map_err(|e| Failure::new(format!("invalid config: {e}")))?;
    if args.check {
        let guest = config
            .guest_source()
            .map_err(|e| Failure::new(format!("cannot locate the berth-guest helper: {e}")))?;
        berth_daemon::guest_binary::check(&guest).map_err(Failure::new)?;
        let (data_root, gpus) = check_engine(&config);
        // The shared folders' sources, as the daemon checks them at start.
        berth_daemon::mounts::SourceRules::new(
            &config.state_dir,
            &config.docker_socket,
            &data_root.unwrap_or_else(|| PathBuf::from("/var/lib/docker")),
        )
        .server_mounts(&config.mounts)
        .map_err(|e| Failure::new(format!("invalid config: {e}")))?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&config).unwrap_or_default()
            );
        } else {
            print!("{}", config.to_toml());
        }
        // On stderr (stdout carries the settings only), after them: a reader that closed
        // the pipe has ended the command already.
        let rules = config.firewall_rules().map_err(Failure::new)?;
        let isolation = super::block_on(async { Ok(rules.state().await) })?;
        eprintln!("isolation: {isolation}");
        eprintln!("GPUs: {gpus}");
        return Ok(());
    }
    let filter = EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,russh=warn,bollard=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    // Before any thread of the runtime allocates.
    berth_daemon::tune_allocator();
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| Failure::new(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let mut term = signal(SignalKind::terminate()).map_err(|e| Failure::new(e.to_string()))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| Failure::new(e.to_string()))?;
        let token = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("shutting down (a second signal exits at once)");
            token.cancel();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            std::process::exit(130);
        });
        berth_daemon::run(config, shutdown).await.map_err(|e| {
            match e.downcast_ref::<StartupError>() {
                Some(s) => Failure {
                    message: s.message.clone(),
                    hint: s.hint.clone(),
                    code: 1,
                },
                None => Failure::new(format!("{e:#}")),
            }
        })
    })
}

/// Says on stderr what the engine does for isolation: whether it runs containers in user
/// namespaces, and with `limits.disk_gb` set, whether it enforces that (the settings
/// themselves are valid either way: containers are then made without the cap); and
/// whether it can give containers GPUs. Returns the engine's data root, when it answers, and
/// the GPUs line (printed after the settings, as the isolation line).
fn check_engine(config: &Config) -> (Option<PathBuf>, String) {
    use berth_runtime::Runtime;
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return (None, "unknown: cannot start the async runtime".into());
    };
    let bytes = berth_daemon::disk_bytes(config);
    let (quota, userns, gpus, root) = rt.block_on(async {
        let connect = berth_runtime::DockerRuntime::connect(config.docker_socket.clone());
        let engine = match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
            Ok(Ok(engine)) => engine,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer in time".into(),
                };
                let line = format!(
                    "unknown: cannot reach the Docker engine at {}: {why}",
                    config.docker_socket.display()
                );
                return (bytes.map(|_| line.clone()), line.clone(), line, None);
            }
        };
        let quota = match bytes {
            Some(b) => Some(
                berth_daemon::disk::Quota::probe(&engine, Some(b))
                    .await
                    .describe(),
            ),
            None => None,
        };
        let root = tokio::time::timeout(std::time::Duration::from_secs(10), engine.data_root())
            .await
            .ok()
            .and_then(Result::ok);
        (
            quota,
            berth_daemon::user_namespaces(&engine).await,
            berth_daemon::gpu_support(&engine).await.to_string(),
            root,
        )
    });
    if let Some(q) = quota {
        eprintln!("disk quota: {q}");
    }
    eprintln!("user namespaces: {userns}");
    (root, gpus)
}

/// The helper where a package puts it, with the programs that are not commands:
/// `BIN/../libexec/berth/berth-guest` (`/usr/libexec/berth/berth-guest` for `/usr/bin/berth`),
/// when there is no `berth-guest` next to this binary.
fn packaged_guest() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.join("berth-guest").exists() {
        return None;
    }
    let packaged = dir.parent()?.join("libexec/berth/berth-guest");
    packaged.exists().then_some(packaged)
}
