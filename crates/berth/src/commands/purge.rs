//! `berth purge`: removes one installation's traces with the daemon stopped (install.sh
//! `--uninstall --purge` runs it): the containers, networks and users' home volumes
//! labelled with its instance id, its host firewall chains, its users' committed images, then the entries Berth makes in the state directory, then that directory
//! if nothing else is left in it. Other containers and images, the default image among them,
//! and any file Berth did not make are left alone.
//!
//! The one command that talks to the Docker engine itself: the daemon, which otherwise does,
//! must not be running (its lock is held for the whole purge).

use std::fs::File;
use std::path::{Path, PathBuf};

use berth_daemon::Config;
use berth_daemon::config::STATE_ENTRIES;
use berth_daemon::lifecycle::{LABEL_INSTANCE, LABEL_NETWORK};
use berth_runtime::{DockerRuntime, Runtime};
use nix::fcntl::{Flock, FlockArg};

use super::block_on;
use crate::Failure;

#[derive(clap::Args)]
pub struct Args {
    /// Config file [default: /etc/berth/berth.toml when present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Do it (without --yes nothing is changed)
    #[arg(long)]
    yes: bool,
}

pub fn run(args: Args, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    // An invalid config could name the wrong state directory or repository: refused.
    let mut config = Config::load(args.config.as_deref()).map_err(|e| Failure {
        message: format!("{e}; nothing was purged"),
        hint: Some("fix the config first: it says what belongs to this installation".into()),
        code: 1,
    })?;
    if let Some(d) = state_dir {
        config.state_dir = d;
    }
    let state = config.state_dir.clone();
    if !args.yes {
        return Err(Failure {
            message: format!(
                "purge deletes this installation's containers, its users' home volumes and committed images ({}:*) and Berth's files in {}; nothing was changed",
                config.commit_repository,
                state.display()
            ),
            hint: Some("confirm with --yes".into()),
            code: 1,
        });
    }
    if state == Path::new("/") {
        return Err(Failure::new(
            "state_dir is / : purge removes nothing there; nothing was purged",
        ));
    }
    let _lock = lock(&state)?;
    block_on(async {
        let engine = DockerRuntime::connect(config.docker_socket.clone())
            .await
            .map_err(|e| Failure {
                message: format!(
                    "cannot reach the Docker engine at {}: {e}; nothing was purged",
                    config.docker_socket.display()
                ),
                hint: Some(
                    "start it (systemctl start docker, or dockerd), then purge again".into(),
                ),
                code: 1,
            })?;
        remove_containers(&engine, &state).await?;
        match berth_runtime::remove_leftover_helpers(&engine).await {
            Ok(n) => println!("helper containers: removed {n} left by a stopped daemon"),
            Err(e) => eprintln!("warning: cannot remove left-over helper containers: {e}"),
        }
        remove_volumes(&engine, &state).await?;
        remove_networks(&engine, &state, &config.network).await?;
        remove_firewall(&config).await;
        remove_images(&engine, &state, &config.commit_repository).await
    })?;
    remove_state(&state);
    Ok(())
}

/// The daemon's lock on `state`, so that none runs during the purge. Not created when
/// missing: a daemon always holds it while it runs.
fn lock(state: &Path) -> Result<Option<Flock<File>>, Failure> {
    let path = state.join("daemon.lock");
    let file = match File::options().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Failure::new(format!(
                "cannot open {}: {e}; nothing was purged",
                path.display()
            )));
        }
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err(_) => Err(Failure {
            message: format!(
                "a berth daemon is running with the state directory {}; nothing was purged",
                state.display()
            ),
            hint: Some("stop it first".into()),
            code: 1,
        }),
    }
}

async fn remove_containers(engine: &DockerRuntime, state: &Path) -> Result<(), Failure> {
    let file = state.join("instance");
    let instance = std::fs::read_to_string(&file).unwrap_or_default();
    let instance = instance.trim();
    if instance.is_empty() {
        println!("containers: none recorded ({} is missing)", file.display());
        return Ok(());
    }
    let found = engine
        .list(LABEL_INSTANCE, instance)
        .await
        .map_err(|e| Failure::new(format!("cannot list containers: {e}")))?;
    let mut n = 0;
    for c in found {
        match engine.remove(&c.id).await {
            Ok(()) => n += 1,
            Err(e) => eprintln!("warning: cannot remove container {}: {e}", c.name),
        }
    }
    println!("containers: removed {n} of this installation ({LABEL_INSTANCE}={instance})");
    Ok(())
}

/// The users' home volumes of this installation (after its containers, which use them).
async fn remove_volumes(engine: &DockerRuntime, state: &Path) -> Result<(), Failure> {
    let instance = std::fs::read_to_string(state.join("instance")).unwrap_or_default();
    let instance = instance.trim();
    if instance.is_empty() {
        return Ok(());
    }
    let found = engine
        .list_volumes(LABEL_INSTANCE, instance)
        .await
        .map_err(|e| Failure::new(format!("cannot list volumes: {e}")))?;
    let mut n = 0;
    for name in found {
        match engine.remove_volume(&name).await {
            Ok(_) => n += 1,
            Err(e) => eprintln!("warning: cannot remove volume {name}: {e}"),
        }
    }
    println!("home volumes: removed {n} of this installation");
    Ok(())
}

/// The users' networks of this installation, and the network they shared before issue 14.
async fn remove_networks(
    engine: &DockerRuntime,
    state: &Path,
    shared: &str,
) -> Result<(), Failure> {
    let instance = std::fs::read_to_string(state.join("instance")).unwrap_or_default();
    let instance = instance.trim();
    let mut found = if instance.is_empty() {
        Vec::new()
    } else {
        engine
            .list_networks(LABEL_INSTANCE, instance)
            .await
            .map_err(|e| Failure::new(format!("cannot list networks: {e}")))?
    };
    // Older Berths labelled their one network `berth.network=1`.
    let legacy = engine
        .list_networks(LABEL_NETWORK, "1")
        .await
        .unwrap_or_default();
    found.extend(legacy.into_iter().filter(|n| n == shared));
    let mut n = 0;
    for name in found {
        match engine.remove_network(&name).await {
            Ok(()) => n += 1,
            Err(e) => eprintln!("warning: cannot remove network {name}: {e}"),
        }
    }
    println!("networks: removed {n} of this installation");
    Ok(())
}

/// The host firewall's chains of this installation (the config names their bridges).
async fn remove_firewall(config: &Config) {
    let rules = match config.firewall_rules() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warning: firewall rules not removed: {e}");
            return;
        }
    };
    match rules.remove().await {
        Ok(n) => println!(
            "firewall: removed {n} chain(s) for bridges {}+",
            rules.bridges
        ),
        Err(e) => eprintln!("warning: cannot remove the firewall rules: {e}"),
    }
}

async fn remove_images(engine: &DockerRuntime, state: &Path, repo: &str) -> Result<(), Failure> {
    let images = engine
        .list_images()
        .await
        .map_err(|e| Failure::new(format!("cannot list images: {e}")))?;
    let mut n = 0;
    for name in images.into_iter().flat_map(|i| i.tags) {
        if name.rsplit_once(':').is_none_or(|(r, _)| r != repo) {
            continue;
        }
        match engine.remove_image(&name).await {
            Ok(()) => n += 1,
            Err(e) => eprintln!("warning: cannot remove image {name}: {e}"),
        }
    }
    // Earlier saves no tag names any more (replaced while a container still used them),
    // found by the instance's label, which they inherit from the users' containers.
    let instance = std::fs::read_to_string(state.join("instance")).unwrap_or_default();
    let instance = instance.trim();
    if !instance.is_empty() {
        let untagged = engine
            .dangling_images(&[(LABEL_INSTANCE, instance)])
            .await
            .map_err(|e| Failure::new(format!("cannot list images: {e}")))?;
        for id in untagged {
            match engine.remove_image(&id).await {
                Ok(()) => n += 1,
                Err(e) => eprintln!("warning: cannot remove image {id}: {e}"),
            }
        }
    }
    println!("images: removed {n} of {repo}");
    Ok(())
}

/// Removes [`STATE_ENTRIES`] from `state`, then `state` if that left it empty. Only from a
/// directory that holds a file no one but Berth names so (`guest` or `run` alone could be
/// anybody's).
fn remove_state(state: &Path) {
    if !state.is_dir() {
        println!("state: none ({} is missing)", state.display());
        return;
    }
    const OURS: [&str; 4] = ["berth.db", "instance", "daemon.lock", "berth.pid"];
    if !OURS
        .iter()
        .any(|f| state.join(f).symlink_metadata().is_ok())
    {
        eprintln!(
            "warning: {} holds none of Berth's files ({}); left it alone",
            state.display(),
            OURS.join(", ")
        );
        return;
    }
    for entry in STATE_ENTRIES {
        let path = state.join(entry);
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = removed {
            eprintln!("warning: cannot remove {}: {e}", path.display());
        }
    }
    if std::fs::remove_dir(state).is_ok() {
        println!("state: removed {}", state.display());
    } else {
        eprintln!(
            "warning: {} holds files Berth did not make; removed Berth's own and left the rest",
            state.display()
        );
    }
}
