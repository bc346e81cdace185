//! End-to-end: Berth survives `kill -9` of itself and a restart of `dockerd` under it.
//!
//! The dockerd test stops and starts the machine's engine (the one `scripts/test` started),
//! so the tests of this file run one at a time; cargo runs test files one after another.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, docker, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Processes of `user`'s container whose command line contains `needle`.
fn processes(d: &Daemon, user: &str, needle: &str) -> Vec<String> {
    let name = d.container_name(user);
    let out = Command::new("docker")
        .args(["top", &name, "-eo", "pid,args"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn kill_9_loses_nothing_and_the_next_daemon_adopts_the_containers() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 15,
            config: String::new(),
        },
    );
    let alice = d.add_user("alice", BUSYBOX);
    let bob = d.add_user("bob", BUSYBOX);
    d.ssh_ok("alice", &alice, "echo precious > /root/data");
    d.ssh_ok("bob", &bob, "daemon");
    let spawn = |user: &str, key: &Path, cmd: &str| {
        d.ssh(user, key)
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut c1 = spawn("alice", &alice, "sleep 1001");
    let mut c2 = spawn("bob", &bob, "sleep 1002");
    assert!(wait_until(Duration::from_secs(20), || {
        !processes(&d, "alice", "sleep 1001").is_empty()
            && !processes(&d, "bob", "sleep 1002").is_empty()
    }));
    let users_before = d.berth_ok(&["user", "list", "--json"]);

    d.kill9();
    // The clients lose their connection; the containers and the sleeps are still there.
    assert_eq!(c1.wait().unwrap().code(), Some(255));
    assert_eq!(c2.wait().unwrap().code(), Some(255));
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));

    d.restart();
    let log = d.log();
    assert_eq!(
        log.matches("adopting running container").count(),
        2,
        "{log}"
    );
    // Same users, keys and modes (sessions are 0 now: those connections are gone).
    let users: Vec<serde_json::Value> = serde_json::from_str(&users_before).unwrap();
    let after: Vec<serde_json::Value> =
        serde_json::from_str(&d.berth_ok(&["user", "list", "--json"])).unwrap();
    assert_eq!(users.len(), after.len());
    for (a, b) in users.iter().zip(&after) {
        for field in ["name", "image", "keys", "daemon_mode", "forwarding"] {
            assert_eq!(a[field], b[field], "{field}");
        }
    }
    assert_eq!(after[1]["daemon_mode"], true);
    // The orphaned sessions got the hang-up their dead clients could not give them, while
    // both containers still run (alice's grace period is not over).
    assert!(wait_until(Duration::from_secs(10), || {
        processes(&d, "alice", "sleep 1001").is_empty()
            && processes(&d, "bob", "sleep 1002").is_empty()
    }));
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
    assert!(!processes(&d, "alice", "berth-guest init").is_empty());
    // alice's container stops after the grace period; bob's (daemon mode) keeps running.
    assert!(wait_until(Duration::from_secs(40), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(d.container_state("bob").as_deref(), Some("running"));
    // Her data is there on the next login, and logins work.
    assert_eq!(d.ssh_ok("alice", &alice, "cat /root/data"), "precious\n");
    assert_eq!(d.ssh_ok("bob", &bob, "echo bob"), "bob\n");
}

/// Stops the machine's dockerd and starts it again, whichever way it runs.
struct Engine;

impl Engine {
    fn systemd() -> bool {
        Path::new("/run/systemd/system").exists()
            && Command::new("systemctl")
                .args(["is-active", "--quiet", "docker"])
                .status()
                .is_ok_and(|s| s.success())
    }

    fn up() -> bool {
        Command::new("docker")
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn stop(systemd: bool) {
        if systemd {
            assert!(
                Command::new("systemctl")
                    .args(["stop", "docker.socket", "docker"])
                    .status()
                    .unwrap()
                    .success()
            );
        } else {
            let pid: i32 = std::fs::read_to_string("/var/run/docker.pid")
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            assert!(wait_until(Duration::from_secs(60), || !Path::new(
                &format!("/proc/{pid}")
            )
            .exists()));
        }
        assert!(!Self::up());
    }

    fn start(systemd: bool) {
        if systemd {
            assert!(
                Command::new("systemctl")
                    .args(["start", "docker"])
                    .status()
                    .unwrap()
                    .success()
            );
        } else {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open("/var/log/berth-dockerd.log")
                .unwrap();
            // `setsid -f`: dockerd runs on in a session of its own after this returns.
            let forked = Command::new("setsid")
                .args(["-f", "dockerd"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .status()
                .unwrap();
            assert!(forked.success());
        }
        assert!(
            wait_until(Duration::from_secs(60), Self::up),
            "dockerd did not come back"
        );
    }
}

/// Brings the engine back even when the test fails half-way.
struct EngineBack(bool);

impl Drop for EngineBack {
    fn drop(&mut self) {
        if !Engine::up() {
            Engine::start(self.0);
        }
    }
}

#[test]
fn a_dockerd_restart_is_survived_with_a_clear_line_meanwhile() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    assert_eq!(d.ssh_ok("alice", &key, "echo before"), "before\n");
    let systemd = Engine::systemd();
    let _back = EngineBack(systemd);

    Engine::stop(systemd);
    let o = d.ssh_run("alice", &key, "echo during", b"");
    assert_eq!(o.status.code(), Some(255));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "berth: the container engine is not available right now; try again later\r\n"
    );
    let st: serde_json::Value = serde_json::from_str(&d.berth_ok(&["status", "--json"])).unwrap();
    assert!(st["docker_version"].is_null());
    assert!(!st["docker_error"].as_str().unwrap().is_empty());
    assert!(
        d.berth_ok(&["status"])
            .contains("engine:     NOT AVAILABLE")
    );

    Engine::start(systemd);
    // The engine stopped her container; the next login starts it again.
    assert_eq!(d.ssh_ok("alice", &key, "echo after"), "after\n");
    assert!(docker(&["ps", "--format", "{{.Names}}"]).contains(&d.container_name("alice")));
    assert!(d.pid().is_some());
}
