//! What the end-to-end tests of `berth connect` share: the daemon, a `berth connect` with
//! the test's key, and the container's mount table.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{Daemon, DaemonOptions, wait_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_berth");

pub fn start() -> Daemon {
    start_with(30, "")
}

/// A daemon that stops idle containers after `idle_stop_seconds`, with `config` lines.
pub fn start_with(idle_stop_seconds: u64, config: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds,
            config: config.into(),
        },
    )
}

/// `berth connect` to `user` on `d` with `key`, mounting `dirs`; the command goes after.
pub fn connect(d: &Daemon, user: &str, key: &Path, dirs: &[&Path]) -> Command {
    connect_via(d.port, d, user, key, dirs)
}

/// [`connect`] through `port` on loopback (a relay in front of the daemon).
pub fn connect_via(port: u16, d: &Daemon, user: &str, key: &Path, dirs: &[&Path]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("connect");
    let args = d.ssh_args(key);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-p" => {
                it.next().unwrap();
                c.arg("-P").arg(port.to_string());
            }
            "-i" => {
                c.arg("-i").arg(it.next().unwrap());
            }
            "-o" => {
                c.arg("-o").arg(it.next().unwrap());
            }
            other => panic!("unexpected ssh argument {other}"),
        }
    }
    for dir in dirs {
        c.arg("--mount").arg(dir);
    }
    c.arg(format!("{user}@127.0.0.1"));
    c
}

/// The mount points of the user's container, as its kernel lists them.
pub fn mounts_in(d: &Daemon, user: &str) -> String {
    let out = Command::new("docker")
        .args(["exec", &d.container_name(user), "cat", "/proc/mounts"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/proc/mounts` escapes a space as `\040`.
pub fn in_mounts(mounts: &str, path: &Path) -> bool {
    let escaped = path.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&escaped))
}

pub fn laptop_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::Builder::new()
        .prefix("laptop-")
        .tempdir()
        .unwrap();
    let dir = top.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    (top, dir)
}

pub fn run(c: &mut Command) -> Output {
    let out = c.stdin(Stdio::null()).output().unwrap();
    eprintln!(
        "connect: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `berth connect` left running; killed (its whole process group) when dropped.
pub struct Running(pub Child);

impl Running {
    pub fn spawn(c: &mut Command) -> Self {
        Self(
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .process_group(0)
                .spawn()
                .unwrap(),
        )
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).unwrap()
    }

    /// Its exit status once it ends; the test fails, saying `what`, if that takes past `limit`.
    pub fn ends_within(&mut self, limit: Duration, what: &str) -> ExitStatus {
        ends_within(&mut self.0, limit, what)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The group is the one this test made (process_group(0) above).
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }
}

/// `child`'s exit status once it ends; the test fails, saying `what`, if that takes past
/// `limit`.
pub fn ends_within(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the audit log has `event` (`mount_start`, `mount_end`) of `user` for `dir`.
pub fn audited(d: &Daemon, event: &str, user: &str, dir: &Path) -> bool {
    let shown = dir.display().to_string();
    d.audit()
        .iter()
        .any(|r| r["event"] == event && r["user"] == user && r["path"] == shown.as_str())
}

/// Waits for `user`'s container to stop (its grace period once no session is left); the
/// test fails if it is still running after 30 s.
pub fn stops_by_itself(d: &Daemon, user: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || d
            .container_state(user)
            .as_deref()
            != Some("running")),
        "the container kept running: {:?}",
        d.container_state(user)
    );
}

/// Waits until `dir` is (`mounted`) or is no longer a mount point in `user`'s container; the
/// test fails, with the container's mount table, if that takes past `limit`.
pub fn expect_mounted(d: &Daemon, user: &str, dir: &Path, mounted: bool, limit: Duration) {
    assert!(
        wait_until(limit, || in_mounts(&mounts_in(d, user), dir) == mounted),
        "{} {} after {limit:?}: {}",
        dir.display(),
        if mounted {
            "not mounted"
        } else {
            "still mounted"
        },
        mounts_in(d, user)
    );
}

/// `cat DIR/FILE` in `user`'s container, on a connection of its own, saying
/// `status N` when it ends.
pub fn reader(d: &Daemon, user: &str, key: &Path, file: &Path) -> Child {
    d.ssh(user, key)
        .arg(format!("cat '{}'; echo \"status $?\"", file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}
