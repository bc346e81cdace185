//! Test harness for Berth's end-to-end tests: a real `berth daemon` process on a free
//! loopback port with a temporary state directory, users added through the real CLI, keys
//! made by `ssh-keygen`, and the stock OpenSSH client pointed at it. Never shipped in a
//! binary.
//!
//! Every daemon gets its own container name prefix, so tests running in parallel on one
//! Docker engine never see each other's containers; dropping a [`Daemon`] stops it
//! (SIGTERM, by pid) and removes the containers it made.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: failing loudly is the point"
)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The images `scripts/make-test-images` builds.
pub const BUSYBOX: &str = "berth-test/busybox:latest";
pub const DEBIAN: &str = "berth-test/debian:bookworm-tools-git";

/// The checkout's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

/// `ssh -p PORT -i KEY USER@127.0.0.1` for a throwaway server (host key not kept, no agent,
/// no prompts).
pub fn ssh_command(port: u16, key: &Path, user: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args(THROWAWAY_SSH_OPTIONS)
        .arg(format!("{user}@127.0.0.1"));
    c
}

/// The `-o` options of [`ssh_command`]: no host key kept, no agent, no prompts.
pub const THROWAWAY_SSH_OPTIONS: &[&str] = &[
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=20",
];

/// The static guest helper: `$BERTH_GUEST_BIN`, or built once by `scripts/build-guest`.
pub fn guest_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("BERTH_GUEST_BIN") {
            return PathBuf::from(p);
        }
        let out = Command::new(workspace_root().join("scripts/build-guest"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build-guest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// Makes sure the test images exist (builds them with `scripts/make-test-images` if not).
pub fn ensure_images() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        remove_stale_networks();
        let ok = [BUSYBOX, DEBIAN].iter().all(|i| {
            Command::new("docker")
                .args(["image", "inspect", i])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !ok {
            let st = Command::new(workspace_root().join("scripts/make-test-images"))
                .status()
                .unwrap();
            assert!(st.success(), "make-test-images failed");
        }
    });
}

/// The test process that made a Docker object named `bt<PID>x<N>-...`, if it is gone.
fn dead_owner(name: &str) -> bool {
    name.strip_prefix("bt")
        .and_then(|r| r.split_once('x'))
        .and_then(|(pid, _)| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the containers and networks of test daemons whose test process is gone (killed
/// before its `Daemon`s were dropped): each network holds one of Docker's few default
/// address pools, and a container on it keeps it from being removed.
fn remove_stale_networks() {
    let out = docker_output(&["ps", "-a", "--format", "{{.Names}}", "--filter", "name=^bt"]);
    for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if dead_owner(name) {
            let _ = docker_output(&["rm", "-f", name]);
        }
    }
    let out = docker_output(&[
        "network",
        "ls",
        "--format",
        "{{.Name}}",
        "--filter",
        "name=^bt",
    ]);
    for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        // `bt<PID>x<N>-net`, and its users' `bt<PID>x<N>-net-USER`.
        if name.contains("-net") && dead_owner(name) {
            let _ = docker_output(&["network", "rm", name]);
        }
    }
}

/// Runs a Python 3 `script` (an attacker or a client written in a few lines) with `args`:
/// its stdout piped for the test to read, its stderr the test's own.
pub fn python3(script: &str, args: &[&str], stdin: Stdio) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot run python3")
}

/// Runs `docker ARGS` and returns stdout, trimmed; panics on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The lines of `docker ARGS`'s output (none when it fails).
pub fn docker_lines(args: &[&str]) -> Vec<String> {
    String::from_utf8_lossy(&docker_output(args).stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs `docker ARGS`, returning the whole output whatever the status.
pub fn docker_output(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

/// Makes an Ed25519 key pair at `path` (`.pub` beside it) with `comment`; returns `path`.
pub fn keygen_at(path: &Path, comment: &str) -> PathBuf {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    path.to_owned()
}

/// The SHA256 fingerprint of the public key beside `key` (`SHA256:...`, as sshd logs it).
pub fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen -lf {}", key.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

/// A loopback port nobody listens on, for a listener the test starts next (a daemon, an
/// `ssh -L`). Taken below the kernel's ephemeral range (32768 and up here), where outgoing
/// connections, which the suite makes by the thousand, take their ports: a port the kernel
/// handed out for a moment (bind to 0) was found taken again by the time `ssh -L` bound it.
/// Each port is handed out once per test binary; binaries run at once start at different
/// random places.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let seed = RandomState::new().hash_one(std::process::id());
        AtomicU32::new(u32::try_from(seed % u64::from(SPAN)).unwrap_or(0))
    });
    for _ in 0..SPAN {
        let port = u16::try_from(LOW + next.fetch_add(1, Ordering::Relaxed) % SPAN).unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN);
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct DaemonOptions {
    /// Extra TOML appended to the generated config.
    pub config: String,
    pub idle_stop_seconds: u64,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            config: String::new(),
            idle_stop_seconds: 2,
        }
    }
}

/// A child process (an `ssh` client, a server) killed and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `berth daemon`.
pub struct Daemon {
    pub dir: TempDir,
    pub port: u16,
    pub prefix: String,
    bin: PathBuf,
    child: Option<Child>,
    config_path: PathBuf,
    log_path: PathBuf,
    nofile: Option<u64>,
    /// Extra environment for the daemon process.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon with `bin` (the `berth` binary under test) and waits until its admin
    /// socket answers.
    pub fn start(bin: &Path, opts: DaemonOptions) -> Self {
        Self::start_limited(bin, opts, None)
    }

    /// As [`Daemon::start`], with the descriptor limit (soft and hard) set to `nofile`, as a
    /// small `LimitNOFILE=` would.
    pub fn start_limited(bin: &Path, opts: DaemonOptions, nofile: Option<u64>) -> Self {
        ensure_images();
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .unwrap();
        let prefix = format!("bt{}x{n}-", std::process::id());
        let config_path = dir.path().join("berth.toml");
        let text = format!(
            "container_prefix = \"{prefix}\"\nnetwork = \"{prefix}net\"\ncommit_repository = \"{}/users\"\nidle_stop_seconds = {}\nstop_timeout_seconds = 2\n{}\n",
            prefix.trim_end_matches('-'),
            opts.idle_stop_seconds,
            opts.config
        );
        std::fs::write(&config_path, text).unwrap();
        let mut d = Self {
            port: free_port(),
            prefix,
            bin: bin.to_owned(),
            child: None,
            log_path: dir.path().join("daemon.log"),
            config_path,
            dir,
            nofile,
            env: Vec::new(),
        };
        d.spawn();
        d
    }

    /// Restarts the daemon with `key=value` added to its environment.
    pub fn restart_with_env(&mut self, key: &str, value: &str) {
        let _ = self.stop();
        self.env.push((key.to_owned(), value.to_owned()));
        self.spawn();
    }

    /// The daemon's process id and how many descriptors it has open.
    pub fn descriptors(&self) -> usize {
        let pid = self.pid().expect("daemon running");
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
    }

    /// This daemon's network name (no test shares one with another); user alice's
    /// container is on `NETWORK-alice`.
    pub fn network(&self) -> String {
        format!("{}net", self.prefix)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the daemon; when its port was taken meanwhile (the suite's binaries run at once,
    /// and a port free when it was chosen may be bound by another's listener before the
    /// daemon binds it), on another port.
    fn spawn(&mut self) {
        for _ in 0..5 {
            let seen = self.log().len();
            match self.try_spawn() {
                Ok(()) => return,
                Err(st) => {
                    let log = self.log();
                    let new = log.get(seen..).unwrap_or_default();
                    if !(new.contains("cannot listen on") && new.contains("Address already in use"))
                    {
                        panic!("daemon exited early ({st}): {log}");
                    }
                    self.port = free_port();
                }
            }
        }
        panic!("no port the daemon could listen on: {}", self.log());
    }

    /// Starts the daemon and waits until it answers; its exit status if it exits first.
    fn try_spawn(&mut self) -> Result<(), std::process::ExitStatus> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("daemon")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--config")
            .arg(&self.config_path)
            .arg("--guest-binary")
            .arg(guest_binary())
            .env(
                "BERTH_LOG",
                "info,berth_ssh=debug,berth_runtime=debug,berth_daemon=debug",
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let mut exited = None;
        let ready = wait_until(Duration::from_secs(120), || {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                exited = Some(st);
                return true;
            }
            self.berth(&["user", "list", "--json"]).status.success()
        });
        if let Some(st) = exited {
            self.child = None;
            return Err(st);
        }
        assert!(ready, "daemon did not become ready: {}", self.log());
        Ok(())
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        kill(
            Pid::from_raw(i32::try_from(child.id()).unwrap()),
            Signal::SIGTERM,
        )
        .unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > end {
                child.kill().unwrap();
                panic!("daemon did not stop on SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the daemon with SIGKILL (no cleanup at all) and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        kill(
            Pid::from_raw(i32::try_from(child.id()).unwrap()),
            Signal::SIGKILL,
        )
        .unwrap();
        let _ = child.wait();
    }

    /// Starts the daemon again on the same state directory and port (another port only when
    /// that one was taken meanwhile: read `port` afresh after a restart).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let st = self.stop();
            assert!(st.success(), "daemon exit status {st}");
        }
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The audit log's records, oldest first.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state_dir().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs the `berth` CLI against this daemon.
    pub fn berth(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .env("BERTH_STATE_DIR", self.state_dir())
            .output()
            .unwrap()
    }

    /// Runs the CLI and panics unless it succeeds; returns stdout.
    pub fn berth_ok(&self, args: &[&str]) -> String {
        let out = self.berth(args);
        assert!(
            out.status.success(),
            "berth {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `berth user list --json`, parsed.
    pub fn users(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.berth_ok(&["user", "list", "--json"])).unwrap()
    }

    pub fn user(&self, name: &str) -> serde_json::Value {
        self.users()
            .into_iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("no user {name}"))
    }

    /// Makes a key pair in the temp dir: returns the private key's path (`.pub` beside it).
    pub fn keygen(&self, name: &str) -> PathBuf {
        keygen_at(&self.dir.path().join(format!("key-{name}")), name)
    }

    /// Adds `name` with a fresh key and `image`; returns the private key path.
    pub fn add_user(&self, name: &str, image: &str) -> PathBuf {
        let key = self.keygen(name);
        let pubkey = key.with_extension("pub");
        self.berth_ok(&[
            "user",
            "add",
            name,
            "--image",
            image,
            "--key",
            pubkey.to_str().unwrap(),
        ]);
        key
    }

    /// The image `commit` makes for `user`.
    pub fn commit_image(&self, user: &str) -> String {
        format!("{}/users:{user}", self.prefix.trim_end_matches('-'))
    }

    pub fn container_name(&self, user: &str) -> String {
        format!("{}{user}", self.prefix)
    }

    /// The container's state (`running`, `exited`, ...) or `None` when it does not exist.
    pub fn container_state(&self, user: &str) -> Option<String> {
        let out = docker_output(&[
            "inspect",
            "-f",
            "{{.State.Status}}",
            &self.container_name(user),
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// An `ssh` command for `user` with `key`, non-interactive and with its own known_hosts.
    pub fn ssh(&self, user: &str, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_args(key)).arg(format!("{user}@127.0.0.1"));
        c
    }

    /// The options `ssh` needs to reach this daemon, for building other commands.
    pub fn ssh_args(&self, key: &Path) -> Vec<String> {
        vec![
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            key.to_string_lossy().into_owned(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=accept-new".into(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.dir.path().join("known_hosts").display()
            ),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-o".into(),
            "ConnectTimeout=20".into(),
        ]
    }

    /// Runs `ssh user@host CMD`, with `stdin` fed to it, and returns the output.
    pub fn ssh_run(&self, user: &str, key: &Path, cmd: &str, stdin: &[u8]) -> Output {
        let mut child = self
            .ssh(user, key)
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }

    /// Whether a TCP socket listens on `port` in `user`'s container (asked over ssh).
    pub fn listening(&self, user: &str, key: &Path, port: u16) -> bool {
        let cmd = format!(
            "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -i ':{port:04X} ' | grep -c ' 0A '"
        );
        let out = self.ssh_run(user, key, &cmd, b"").stdout;
        !out.is_empty() && out != b"0\n"
    }

    /// Runs `ssh user@host CMD` and panics unless it exits 0; returns stdout.
    pub fn ssh_ok(&self, user: &str, key: &Path, cmd: &str) -> String {
        let out = self.ssh_run(user, key, cmd, b"");
        assert!(
            out.status.success(),
            "ssh {user} {cmd:?} failed ({}): {}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(
                Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                Signal::SIGTERM,
            );
            let end = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its host firewall chains (and its containers, networks and images, removed below
        // again in case the purge could not run).
        let _ = Command::new(&self.bin)
            .args(["purge", "--yes", "--config"])
            .arg(&self.config_path)
            .env("BERTH_STATE_DIR", self.state_dir())
            .output();
        let ids = docker_output(&["ps", "-aq", "--filter", &format!("name=^/{}", self.prefix)]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = docker_output(&["rm", "-f", id]);
        }
        for net in docker_lines(&["network", "ls", "--format", "{{.Name}}"]) {
            if net == self.network() || net.starts_with(&format!("{}-", self.network())) {
                let _ = docker_output(&["network", "rm", &net]);
            }
        }
        // Users' home volumes (kept by `user rm` without --purge-data).
        for v in docker_lines(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name={}", self.prefix),
        ]) {
            if v.starts_with(&self.prefix) {
                let _ = docker_output(&["volume", "rm", "-f", &v]);
            }
        }
        let repo = format!("reference={}/*", self.prefix.trim_end_matches('-'));
        let images = docker_output(&["images", "-q", "--filter", &repo]);
        for id in String::from_utf8_lossy(&images.stdout).split_whitespace() {
            let _ = docker_output(&["rmi", "-f", id]);
        }
    }
}

/// Runs `script` so that `shell_cmd` sees a real terminal (for `ssh -t` tests); returns
/// everything written to the terminal.
pub fn in_terminal(shell_cmd: &str, timeout: Duration) -> String {
    let mut child = Command::new("timeout")
        .arg(timeout.as_secs().to_string())
        .args(["script", "-qec", shell_cmd, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child.wait().unwrap();
    out
}

/// How a [`SecondEngine`] is started.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Put the data root on a loop-mounted file system with quotas, so that the engine
    /// enforces `--storage-opt size=` (`None`: a plain directory, overlay2).
    pub quota_fs: Option<QuotaFs>,
    /// More `dockerd` arguments (`--userns-remap=default`, ...).
    pub args: Vec<String>,
}

/// A file system whose quotas Docker's storage drivers use, on a sparse loop file of `mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaFs {
    /// xfs mounted with `prjquota`, the overlay2 driver (needs a kernel with XFS_QUOTA).
    Xfs { mib: u64 },
    /// btrfs, the btrfs driver (quota groups).
    Btrfs { mib: u64 },
}

/// A second Docker engine, started by a test beside the host's: its own socket, data root,
/// exec root, pid file, containerd (namespaces named after it) and network namespace, no
/// default bridge and no iptables rules, so the host's firewall, `docker0` and containers
/// are never touched.
/// Containers and networks made in it go with it: dropping it removes them, stops the
/// engine (SIGTERM to its pid, waited for), unmounts its file system and removes its
/// directory.
pub struct SecondEngine {
    dir: TempDir,
    child: Option<Child>,
    socket: PathBuf,
    data_root: PathBuf,
    mounted: bool,
}

impl SecondEngine {
    /// Starts one and waits until it answers. `Err` says why it cannot run here (for a
    /// test's `skipped:` line): not root, no `dockerd`, no `mkfs.xfs`, no loop device.
    pub fn start(opts: &EngineOptions) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("a second Docker engine needs root".into());
        }
        let Some(dockerd) = find_program("dockerd") else {
            return Err("no dockerd on PATH".into());
        };
        // Short: containerd's and the shims' sockets live under the exec root (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("be-")
            .tempdir_in("/var/tmp")
            .map_err(|e| e.to_string())?;
        let data_root = dir.path().join("data");
        std::fs::create_dir_all(&data_root).map_err(|e| e.to_string())?;
        let mut engine = Self {
            socket: dir.path().join("docker.sock"),
            data_root,
            dir,
            child: None,
            mounted: false,
        };
        let driver = match opts.quota_fs {
            Some(fs @ QuotaFs::Xfs { .. }) => {
                engine.mount(fs)?;
                "overlay2"
            }
            Some(fs @ QuotaFs::Btrfs { .. }) => {
                engine.mount(fs)?;
                "btrfs"
            }
            None => "overlay2",
        };
        let config = engine.dir.path().join("daemon.json");
        std::fs::write(&config, "{}\n").map_err(|e| e.to_string())?;
        let log = std::fs::File::create(engine.dir.path().join("dockerd.log"))
            .map_err(|e| e.to_string())?;
        let name = engine
            .dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // In a network namespace of its own (`unshare --net`, which then runs dockerd under
        // the same pid): with `--bridge=none` dockerd deletes any `docker0` it sees, and the
        // host's engine needs its own.
        let child = Command::new("unshare")
            .args(["--net", "--"])
            .arg(dockerd)
            .arg("--host")
            .arg(format!("unix://{}", engine.socket.display()))
            .arg("--data-root")
            .arg(&engine.data_root)
            .arg("--exec-root")
            .arg(engine.dir.path().join("exec"))
            .arg("--pidfile")
            .arg(engine.dir.path().join("docker.pid"))
            .arg("--config-file")
            .arg(&config)
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .args(["--storage-driver", driver, "--log-level", "warn"])
            .arg(format!("--containerd-namespace=berth-{name}"))
            .arg(format!(
                "--containerd-plugins-namespace=berth-{name}-plugins"
            ))
            .args(&opts.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start dockerd: {e}"))?;
        engine.child = Some(child);
        let up = wait_until(Duration::from_secs(45), || {
            engine.docker(&["version"]).status.success()
                || engine
                    .child
                    .as_mut()
                    .is_none_or(|c| c.try_wait().ok().flatten().is_some())
        });
        if !up || !engine.docker(&["version"]).status.success() {
            return Err(format!(
                "the second dockerd did not come up: {}",
                engine.log()
            ));
        }
        Ok(engine)
    }

    fn mount(&mut self, fs: QuotaFs) -> Result<(), String> {
        let (mkfs, mib, options) = match fs {
            QuotaFs::Xfs { mib } => ("mkfs.xfs", mib, "loop,prjquota"),
            QuotaFs::Btrfs { mib } => ("mkfs.btrfs", mib, "loop"),
        };
        let Some(mkfs_path) = find_program(mkfs) else {
            return Err(format!("{mkfs} missing (install xfsprogs and btrfs-progs)"));
        };
        let image = self.dir.path().join("fs.img");
        // Sparse: only what is written takes space.
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib * 1024 * 1024))
            .map_err(|e| e.to_string())?;
        let run = |c: &mut Command| {
            let out = c.output().map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            }
        };
        run(Command::new(mkfs_path).arg("-q").arg(&image)).map_err(|e| format!("{mkfs}: {e}"))?;
        run(Command::new("mount")
            .args(["-o", options])
            .arg(&image)
            .arg(&self.data_root))
        .map_err(|e| {
            // The kernel's reason (e.g. "quota support not available in this kernel").
            let why = Command::new("dmesg")
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .last()
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            format!("cannot mount a loop {fs:?} with {options}: {e} ({why})")
        })?;
        self.mounted = true;
        Ok(())
    }

    /// The engine's socket, for `docker_socket` in Berth's config.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its data root (on the loop file system when asked for).
    pub fn data_root(&self) -> &Path {
        &self.data_root
    }

    /// Runs `docker ARGS` against this engine, returning the whole output.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `docker ARGS` against this engine; panics on failure; returns stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} (second engine): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Copies `image` from the host's engine into this one (`docker save | docker load`).
    pub fn import_image(&self, image: &str) {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let load = Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["load", "-q"])
            .stdin(save.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(save.wait().unwrap().success(), "docker save {image} failed");
        assert!(
            load.status.success(),
            "docker load into the second engine: {}",
            String::from_utf8_lossy(&load.stderr)
        );
    }

    /// What the engine wrote to its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Removes its containers and networks, stops it and waits for it to exit, unmounts its
    /// file system. Done by `Drop` too.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let ids = self.docker(&["ps", "-aq"]);
                for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                    let _ = self.docker(&["rm", "-f", id]);
                }
                let nets = self.docker(&["network", "ls", "-q", "--filter", "type=custom"]);
                for id in String::from_utf8_lossy(&nets.stdout).split_whitespace() {
                    let _ = self.docker(&["network", "rm", id]);
                }
                let _ = kill(
                    Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                    Signal::SIGTERM,
                );
                let end = Instant::now() + Duration::from_secs(30);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.mounted {
            let plain = Command::new("umount")
                .arg(&self.data_root)
                .status()
                .is_ok_and(|s| s.success());
            if !plain {
                // Something under it is still mounted (an engine killed mid-way): take the
                // whole tree down, lazily if it must be.
                let _ = Command::new("umount")
                    .args(["--recursive", "--lazy"])
                    .arg(&self.data_root)
                    .status();
            }
            self.mounted = false;
        }
    }
}

impl Drop for SecondEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program` on PATH, or in the sbin directories a test's PATH may lack.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
