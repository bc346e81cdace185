//! Everything one run sets up and takes down: a temporary directory with the keys, the
//! baseline sshd, the Berth daemon, the users, and what Berth and the floor make in Docker.
//! Dropping the [`Rig`] stops the servers (by the pids it spawned) and removes this run's
//! containers, images and network, on success, error or Ctrl-C alike.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::client::Endpoint;
use crate::engine::Engine;
use crate::procfs::{self, Memory};
use crate::servers::{Berth, OpenSsh, Tag, keygen};

pub struct Options {
    pub berth: PathBuf,
    pub guest: PathBuf,
    pub sshd: PathBuf,
    pub docker_socket: PathBuf,
    pub busybox: String,
    pub debian: String,
    /// Copy the daemons' logs here when the run ends (for profiling with `BERTH_LOG`).
    pub keep_logs: Option<PathBuf>,
}

pub struct Rig {
    pub engine: Engine,
    pub tag: Tag,
    pub berth: Berth,
    pub openssh: OpenSsh,
    /// root on the baseline sshd.
    pub root: Endpoint,
    /// A Berth user on the busybox image (Berth's own sftp-server).
    pub alice: Endpoint,
    /// A Berth user on the Debian image (bash, the image's own sftp-server).
    pub bob: Endpoint,
    /// Many Berth users on the busybox image, made by [`Rig::crowd`].
    crowd: Vec<Endpoint>,
    /// Both daemons' memory just after start, before any user or session.
    pub berth_at_start: Memory,
    pub sshd_at_start: Memory,
    /// The daemon's memory at rest before the idle sessions and the crowds (their users made
    /// and each logged in once, containers running, no session): what their load is to give
    /// back.
    pub berth_before_load: Option<std::result::Result<Memory, String>>,
    pub busybox: String,
    /// OpenSSH's server binary (for a second, stock-configured baseline).
    pub sshd_path: PathBuf,
    keep_logs: Option<PathBuf>,
    pub dir: TempDir,
}

impl Rig {
    pub fn new(opts: &Options) -> Result<Self> {
        let engine = Engine::new(opts.docker_socket.clone());
        engine
            .version()
            .context("the Docker engine does not answer")?;
        sweep_stale(&engine);
        let tag = Tag {
            base: format!("bench{}", std::process::id()),
        };
        let dir = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&keys)?;
        let root_key = keygen(&keys.join("root"), "root")?;
        let alice_key = keygen(&keys.join("alice"), "alice")?;
        let bob_key = keygen(&keys.join("bob"), "bob")?;
        let openssh = OpenSsh::start(
            &dir.path().join("sshd"),
            &opts.sshd,
            &std::fs::read_to_string(root_key.with_extension("pub"))?,
        )?;
        let berth = Berth::start(
            &dir.path().join("berth"),
            &opts.berth,
            &opts.guest,
            &tag,
            86_400,
        )?;
        // At rest: no user, no session, the start-up work done.
        std::thread::sleep(Duration::from_secs(2));
        let berth_pid = berth.pid().context("berth daemon not running")?;
        let berth_at_start = procfs::memory(berth_pid)?;
        let sshd_at_start = procfs::memory(openssh.pid())?;
        let rig = Self {
            root: Endpoint::new(openssh.port, "root", &root_key),
            alice: Endpoint::new(berth.port, "alice", &alice_key),
            bob: Endpoint::new(berth.port, "bob", &bob_key),
            crowd: Vec::new(),
            engine,
            tag,
            berth,
            openssh,
            berth_at_start,
            sshd_at_start,
            berth_before_load: None,
            busybox: opts.busybox.clone(),
            sshd_path: opts.sshd.clone(),
            keep_logs: opts.keep_logs.clone(),
            dir,
        };
        rig.berth.add_user("alice", &opts.busybox, &alice_key)?;
        rig.berth.add_user("bob", &opts.debian, &bob_key)?;
        // First logins: both containers exist and run from here on.
        rig.alice.run("true")?;
        rig.bob.run("true")?;
        rig.root.run("true")?;
        Ok(rig)
    }

    pub fn berth_pid(&self) -> Result<u32> {
        self.berth.pid().context("berth daemon not running")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `n` busybox users `crowd001...`, each with their own key (made once).
    pub fn crowd(&mut self, n: usize) -> Result<Vec<Endpoint>> {
        let keys = self.path("keys");
        while self.crowd.len() < n {
            let name = format!("crowd{:03}", self.crowd.len() + 1);
            let key = keygen(&keys.join(&name), &name)?;
            self.berth.add_user(&name, &self.busybox, &key)?;
            self.crowd.push(Endpoint::new(self.berth.port, &name, &key));
        }
        Ok(self.crowd.iter().take(n).cloned().collect())
    }

    fn cleanup(&mut self) {
        self.berth.stop();
        if let Err(e) = self.berth.purge() {
            eprintln!("berth-bench: berth purge: {e:#}");
        }
        if let Some(to) = &self.keep_logs {
            let _ = std::fs::create_dir_all(to);
            for (from, name) in [
                (self.berth.log.clone(), "berth.log"),
                (self.dir.path().join("sshd/sshd.log"), "sshd.log"),
            ] {
                let _ = std::fs::copy(from, to.join(name));
            }
        }
        let tag = &self.tag.base;
        let leftovers = self
            .engine
            .containers_matching(&format!("^/{tag}[-_]"))
            .unwrap_or_default();
        for (id, name) in leftovers {
            if let Err(e) = self.engine.remove(&id) {
                eprintln!("berth-bench: cannot remove container {name}: {e:#}");
            }
        }
        for id in self
            .engine
            .images_matching(&format!("{tag}/*"))
            .unwrap_or_default()
        {
            let _ = self.engine.remove_image(&id);
        }
        // The engine may take a moment to release the endpoints of containers just removed.
        let networks = self
            .engine
            .networks_matching(&format!("^{}(-.+)?$", self.tag.network()))
            .unwrap_or_default();
        for net in networks {
            let mut attempt = 0;
            while let Err(e) = self.engine.remove_network(&net) {
                attempt += 1;
                if attempt == 10 {
                    eprintln!("berth-bench: cannot remove network {net}: {e:#}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Removes the containers and networks of earlier runs that died without cleaning up
/// (their `bench<PID>` no longer names a live berth-bench).
fn sweep_stale(engine: &Engine) {
    let stale = |name: &str| -> bool {
        let digits: String = name
            .trim_start_matches('/')
            .trim_start_matches("bench")
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && procfs::comm(pid).is_none_or(|c| c != "berth-bench")
        })
    };
    for (id, name) in engine
        .containers_matching("^/bench[0-9]+[-_]")
        .unwrap_or_default()
    {
        if stale(&name) {
            eprintln!("berth-bench: removing {name}, left by an interrupted run");
            let _ = engine.remove(&id);
        }
    }
    for net in engine
        .networks_matching("^bench[0-9]+(-.+)?$")
        .unwrap_or_default()
    {
        if stale(&net) {
            let _ = engine.remove_network(&net);
        }
    }
}

/// `true` when `path` exists and is executable by someone.
pub fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
