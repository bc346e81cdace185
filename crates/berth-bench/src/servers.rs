//! The two servers under test, each a child process this harness started and alone stops
//! (by the pid it spawned): a private OpenSSH `sshd` on loopback as the baseline, and the
//! release `berth daemon` with a temporary state directory.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::interrupt;

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Makes an Ed25519 key pair; returns the private key's path (`.pub` beside it).
pub fn keygen(path: &Path, comment: &str) -> Result<PathBuf> {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .context("ssh-keygen")?;
    if !st.success() {
        bail!("ssh-keygen {} failed", path.display());
    }
    Ok(path.to_owned())
}

/// SIGTERM to a child we spawned, SIGKILL if it lingers, and reap it.
fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let end = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_ready(
    child: &mut Child,
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        interrupt::check()?;
        if let Some(st) = child.try_wait()? {
            bail!(
                "{what} exited at start ({st}): {}",
                fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{what} did not become ready; log: {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The baseline: OpenSSH's `sshd -D` with its own config, host key and authorized keys in a
/// temporary directory. The host's `/etc/ssh` and its sshd service are never touched.
///
/// `SetEnv SHLVL=1`: Debian's bash reads `~/.bashrc` even for `bash -c CMD` when sshd runs
/// it (SSH_SOURCE_BASHRC) unless it is a nested shell; root's dotfiles on a development
/// machine (pyenv, nvm ...) would otherwise add their own startup to every baseline login.
/// The baseline measures OpenSSH, not the host's dotfiles.
pub struct OpenSsh {
    child: Child,
    pub port: u16,
    made_privsep_dir: bool,
}

impl OpenSsh {
    /// The baseline for most figures: `MaxStartups 1000`, so that the crowd of logins at
    /// once is not dropped by OpenSSH's early drop.
    pub fn start(dir: &Path, sshd: &Path, authorized_keys: &str) -> Result<Self> {
        Self::start_with(dir, sshd, authorized_keys, "MaxStartups 1000\n")
    }

    /// With `extra` lines of sshd_config (an empty string: OpenSSH's own defaults for
    /// them, as Debian ships it).
    pub fn start_with(dir: &Path, sshd: &Path, authorized_keys: &str, extra: &str) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let host_key = keygen(&dir.join("ssh_host_ed25519_key"), "bench-sshd")?;
        let keys = dir.join("authorized_keys");
        fs::write(&keys, authorized_keys)?;
        let port = free_port()?;
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress 127.0.0.1\n\
                 HostKey {}\n\
                 PidFile {}\n\
                 AuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 X11Forwarding no\n\
                 AcceptEnv LANG LC_*\n\
                 {extra}\
                 MaxSessions 10\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\n\
                 SetEnv SHLVL=1\n\
                 LogLevel ERROR\n",
                host_key.display(),
                dir.join("sshd.pid").display(),
                keys.display(),
            ),
        )?;
        // sshd insists on its privilege separation directory (systemd makes it at start).
        let privsep = Path::new("/run/sshd");
        let made_privsep_dir = !privsep.exists();
        if made_privsep_dir {
            fs::create_dir_all(privsep)?;
        }
        let log = dir.join("sshd.log");
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run {}", sshd.display()))?;
        let mut s = Self {
            child,
            port,
            made_privsep_dir,
        };
        wait_ready(&mut s.child, "sshd", &log, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for OpenSsh {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
        if self.made_privsep_dir {
            let _ = fs::remove_dir("/run/sshd");
        }
    }
}

/// Names of what a Berth daemon of this run owns in Docker.
#[derive(Debug, Clone)]
pub struct Tag {
    /// `bench<PID>`: every container, image and network of this run starts with it.
    pub base: String,
}

impl Tag {
    pub fn container_prefix(&self) -> String {
        format!("{}-", self.base)
    }
    pub fn commit_repository(&self) -> String {
        format!("{}/users", self.base)
    }
    pub fn network(&self) -> String {
        self.base.clone()
    }
    pub fn container(&self, user: &str) -> String {
        format!("{}-{user}", self.base)
    }
    /// The floor's container (outside Berth's prefix: Berth never sees it as a user's).
    pub fn floor(&self) -> String {
        format!("{}_floor", self.base)
    }
}

/// `berth daemon` (the release binary) on a loopback port with a temporary state directory.
pub struct Berth {
    /// The config's lines that name this run's Docker objects.
    names: String,
    child: Option<Child>,
    bin: PathBuf,
    guest: PathBuf,
    config: PathBuf,
    state_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

/// Limits on failures and connections raised so that they cannot interfere with 100 logins
/// at once and 500 open sessions from one address (the baseline has `MaxStartups 1000`).
const CROWD_LIMITS: &str = "max_auth_failures_per_minute = 0\n\
                            max_connections = 5000\n\
                            max_startups = \"1000:30:1000\"\n\
                            per_source_max_startups = 1000\n";

impl Berth {
    pub fn start(dir: &Path, bin: &Path, guest: &Path, tag: &Tag, idle_stop: u64) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let config = dir.join("berth.toml");
        let names = format!(
            "container_prefix = \"{}\"\n\
             commit_repository = \"{}\"\n\
             network = \"{}\"\n\
             idle_stop_seconds = {idle_stop}\n\
             stop_timeout_seconds = 5\n",
            tag.container_prefix(),
            tag.commit_repository(),
            tag.network(),
        );
        fs::write(&config, format!("{names}{CROWD_LIMITS}"))?;
        let mut b = Self {
            names,
            child: None,
            bin: bin.to_owned(),
            guest: guest.to_owned(),
            config,
            state_dir: dir.join("state"),
            port: free_port()?,
            log: dir.join("berth.log"),
        };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("daemon")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--config")
            .arg(&self.config)
            .arg("--guest-binary")
            .arg(&self.guest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        let (bin, state, port) = (self.bin.clone(), self.state_dir.clone(), self.port);
        let child = self.child.insert(child);
        wait_ready(child, "berth daemon", &self.log, || {
            cli(&bin, &state, &["user", "list", "--json"]).is_ok()
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
    }

    /// Restarts the daemon with the door's own defaults (`true`) or with the bench's raised
    /// limits (`false`).
    pub fn door_defaults(&mut self, defaults: bool) -> Result<()> {
        let limits = if defaults { "" } else { CROWD_LIMITS };
        fs::write(&self.config, format!("{}{limits}", self.names))?;
        self.restart()
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same state and port; running
    /// containers are adopted, as after any restart.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The `berth` binary (its `connect` is the laptop's side).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Removes what the (stopped) daemon made: its containers, per-user networks, host
    /// firewall chains and committed images (`berth purge`).
    pub fn purge(&self) -> Result<String> {
        cli(
            &self.bin,
            &self.state_dir,
            &[
                "purge",
                "--yes",
                "--config",
                &self.config.display().to_string(),
            ],
        )
    }

    /// Runs the `berth` CLI against this daemon; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        cli(&self.bin, &self.state_dir, args)
    }

    pub fn add_user(&self, name: &str, image: &str, key: &Path) -> Result<()> {
        let pubkey = key.with_extension("pub");
        self.cli(&[
            "user",
            "add",
            name,
            "--image",
            image,
            "--key",
            &pubkey.to_string_lossy(),
        ])
        .map(drop)
    }

    pub fn sessions(&self) -> Result<usize> {
        let v: Value = serde_json::from_str(&self.cli(&["session", "list", "--json"])?)?;
        Ok(v.as_array().map_or(0, Vec::len))
    }

    /// Stops the daemon (SIGTERM, as an admin would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(20));
        }
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cli(bin: &Path, state_dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("BERTH_STATE_DIR", state_dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "berth {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
