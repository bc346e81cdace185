//! End-to-end: the life of a user's container: created once, stopped after the last
//! session and a grace period, sessions counted right however they end.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, docker, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn start(idle: u64, extra: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: idle,
            config: extra.to_owned(),
        },
    )
}

fn sessions(d: &Daemon, user: &str) -> u64 {
    d.user(user)["sessions"].as_u64().unwrap()
}

/// Processes in the user's container whose command line contains `needle`, seen from the
/// host through `docker top` (so no session of our own is needed to look).
fn processes(d: &Daemon, user: &str, needle: &str) -> Vec<String> {
    let out = berth_testkit::docker_output(&["top", &d.container_name(user), "-o", "pid,args"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn simultaneous_first_logins_create_one_container() {
    let d = start(5, "");
    let key = d.add_user("alice", BUSYBOX);
    let children: Vec<_> = (0..6)
        .map(|i| {
            d.ssh("alice", &key)
                .arg(format!("echo {i}"))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "login {i} failed\n{}", d.log());
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{i}\n"));
    }
    let ids = docker(&["ps", "-aq", "--filter", &format!("name=^/{}", d.prefix)]);
    assert_eq!(ids.lines().count(), 1, "{ids}");
    assert!(
        d.log().matches("\"event\":\"container_create\"").count() == 1,
        "{}",
        d.log()
    );
}

/// `docker network rm` (or a prune) under a running daemon: the next login into a stopped
/// container makes the user's network again and attaches the container to it.
#[test]
fn the_network_removed_under_the_daemon_is_made_again() {
    let d = start(1, "");
    let alice = d.add_user("alice", BUSYBOX);
    let bob = d.add_user("bob", BUSYBOX);
    let net = format!("{}-alice", d.network());
    assert_eq!(d.ssh_ok("alice", &alice, "echo created"), "created\n");
    let id_before = docker(&["network", "inspect", "-f", "{{.Id}}", &net]);
    assert!(
        wait_until(Duration::from_secs(20), || d
            .container_state("alice")
            .as_deref()
            == Some("exited")),
        "alice's container did not stop"
    );
    // Her container is stopped and attached to a network that no longer exists.
    docker(&["network", "rm", &net]);
    assert_eq!(d.ssh_ok("alice", &alice, "echo started"), "started\n");
    let id_after = docker(&["network", "inspect", "-f", "{{.Id}}", &net]);
    assert_ne!(id_before, id_after);
    // Each user has her own: bob's first login makes his.
    assert_eq!(d.ssh_ok("bob", &bob, "echo bob"), "bob\n");
    let networks = docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}",
        &d.container_name("bob"),
    ]);
    assert_eq!(networks, format!("{}-bob", d.network()));
}

#[test]
fn idle_stop_after_grace_and_login_cancels_it() {
    // A grace well above a login's time on a machine busy with the rest of the suite.
    let d = start(10, "");
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &key, "true");
    let name = d.container_name("alice");
    let started = docker(&["inspect", "-f", "{{.State.StartedAt}}", &name]);
    // Logins inside the grace period keep the same running container (never stopped).
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        d.ssh_ok("alice", &key, "true");
    }
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.StartedAt}}", &name]),
        started
    );
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
    // Then it stops once the grace period passes with no session.
    assert!(wait_until(Duration::from_secs(60), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    assert_eq!(d.user("alice")["container"], "stopped");
    // And the next login starts it again.
    d.ssh_ok("alice", &key, "true");
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
}

#[test]
fn an_open_session_keeps_the_container_running() {
    let d = start(1, "");
    let key = d.add_user("alice", BUSYBOX);
    // Runs until told to end (a file appears), at most a minute: however slow the machine,
    // it outlives the checks below.
    let long = d
        .ssh("alice", &key)
        .arg(
            "i=0; while [ ! -e /tmp/go ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; echo done",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || sessions(
        &d, "alice"
    ) == 1));
    // Short sessions come and go (past the 1 s grace); the long one holds the container.
    d.ssh_ok("alice", &key, "true");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
    assert_eq!(sessions(&d, "alice"), 1);
    d.ssh_ok("alice", &key, "touch /tmp/go");
    let out = long.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    assert!(wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    assert_eq!(sessions(&d, "alice"), 0);
}

#[test]
fn a_killed_client_leaves_no_process_and_no_session() {
    let d = start(2, "");
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &key, "true");
    for (flag, marker) in [("-T", "sleep 1001"), ("-tt", "sleep 1002")] {
        let mut c = d
            .ssh("alice", &key)
            .arg(flag)
            .arg(format!("sh -c '{marker}; echo never'"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_until(Duration::from_secs(20), || !processes(
            &d, "alice", marker
        )
        .is_empty()));
        c.kill().unwrap(); // SIGKILL: the client closes nothing itself
        c.wait().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || processes(&d, "alice", marker)
                .is_empty()),
            "{flag}: {:?} still running",
            processes(&d, "alice", marker)
        );
        assert!(wait_until(Duration::from_secs(10), || sessions(
            &d, "alice"
        ) == 0));
    }
    assert!(wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
}

#[test]
fn a_vanished_client_is_found_by_keepalives() {
    let d = start(2, "keepalive_interval_seconds = 1\nkeepalive_max = 2\n");
    let key = d.add_user("alice", BUSYBOX);
    let mut c = d
        .ssh("alice", &key)
        .args(["-o", "ServerAliveInterval=0", "sleep 1003"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || !processes(
        &d,
        "alice",
        "sleep 1003"
    )
    .is_empty()));
    // A stopped client keeps its TCP connection open but answers nothing, like a client
    // whose network went away.
    let pid = Pid::from_raw(i32::try_from(c.id()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    let gone = wait_until(Duration::from_secs(20), || {
        processes(&d, "alice", "sleep 1003").is_empty() && sessions(&d, "alice") == 0
    });
    kill(pid, Signal::SIGKILL).unwrap();
    c.wait().unwrap();
    assert!(gone, "session not ended by keepalive\n{}", d.log());
}

#[test]
fn container_defaults_are_confined() {
    let d = start(10, "[limits]\nmemory_mb = 512\ncpus = 0.5\npids = 200\n");
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &key, "true");
    let name = d.container_name("alice");
    let f = |fmt: &str| docker(&["inspect", "-f", fmt, &name]);
    assert_eq!(f("{{.HostConfig.Privileged}}"), "false");
    assert!(f("{{.HostConfig.SecurityOpt}}").contains("no-new-privileges"));
    assert_eq!(f("{{.HostConfig.PidsLimit}}"), "200");
    assert_eq!(f("{{.HostConfig.Memory}}"), (512u64 << 20).to_string());
    assert_eq!(f("{{.HostConfig.NanoCpus}}"), "500000000");
    assert_eq!(
        f("{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}"),
        format!("{}-alice", d.network())
    );
    assert!(f("{{.HostConfig.CapDrop}}").contains("NET_RAW"));
    assert_eq!(f("{{.HostConfig.PidMode}}"), "");
    assert_eq!(f("{{.HostConfig.IpcMode}}"), "private");
    let mounts = f("{{range .Mounts}}{{.Source}}->{{.Destination}}:{{.RW}} {{end}}");
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    // Exactly Berth's own read-only mounts: the guest dir, this user's socket dir, and the
    // helper under the three names on PATH; and her home volume, read-write (issue 16).
    let st = d.state_dir();
    let guest = st.join("guest");
    let mut got: Vec<&str> = mounts.split_whitespace().collect();
    got.sort_unstable();
    let mut want = vec![
        format!("{}->/.berth:false", guest.display()),
        format!("{}->/.berth/run:false", st.join("run/alice").display()),
    ];
    for w in ["daemon", "nodaemon", "stopnow"] {
        want.push(format!(
            "{}->/usr/local/bin/{w}:false",
            guest.join("berth-guest").display()
        ));
    }
    let home = format!("{}home-alice", d.prefix);
    want.push(format!(
        "{}->/root:true",
        docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &home])
    ));
    want.sort_unstable();
    assert_eq!(got, want);
    // Inside: PID 1 is the guest init, no Docker socket, and the guest dir is read-only.
    assert_eq!(
        d.ssh_ok("alice", &key, "cat /proc/1/cmdline | tr '\\0' ' '"),
        "/.berth/berth-guest init "
    );
    let o = d.ssh_run(
        "alice",
        &key,
        "ls /var/run/docker.sock /run/docker.sock",
        b"",
    );
    assert_ne!(o.status.code(), Some(0));
    let o = d.ssh_run("alice", &key, "touch /.berth/x", b"");
    assert_ne!(o.status.code(), Some(0));
    // The pids limit holds.
    let o = d.ssh_run(
        "alice",
        &key,
        "i=0; while [ $i -lt 300 ]; do sleep 5 & i=$((i+1)); done 2>&1; wait",
        b"",
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Resource temporarily unavailable")
            || !o.status.success()
            || {
                let e = String::from_utf8_lossy(&o.stderr);
                e.contains("fork") || e.contains("Resource")
            }
    );
}

#[test]
fn init_reaps_orphans() {
    let d = start(10, "");
    let key = d.add_user("alice", BUSYBOX);
    // Orphans whose parent exits are re-parented to PID 1, which must reap them.
    d.ssh_ok("alice", &key, "for i in 1 2 3; do (sleep 0.2 &) ; done");
    std::thread::sleep(Duration::from_secs(1));
    let stat = d.ssh_ok(
        "alice",
        &key,
        "cat /proc/[0-9]*/stat 2>/dev/null | awk '{print $3}' | sort | uniq -c",
    );
    assert!(!stat.contains(" Z"), "zombies left: {stat}");
}

#[test]
fn sigterm_ends_sessions_and_exits_zero_then_restart_adopts() {
    let mut d = start(2, "");
    let key = d.add_user("alice", BUSYBOX);
    let c = d
        .ssh("alice", &key)
        .arg("sleep 1004")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || !processes(
        &d,
        "alice",
        "sleep 1004"
    )
    .is_empty()));
    let st = d.stop();
    assert!(st.success(), "exit status {st}");
    // The client was disconnected and the session's processes are gone.
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(255));
    assert!(
        wait_until(Duration::from_secs(10), || processes(
            &d,
            "alice",
            "sleep 1004"
        )
        .is_empty()),
        "{}",
        d.log()
    );
    assert!(!d.state_dir().join("admin.sock").exists());
    // The container was left running; a new daemon adopts it and stops it after the grace.
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
    d.restart();
    assert!(d.log().contains("adopting running container"));
    assert!(wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    // Logins work on the new daemon.
    assert_eq!(d.ssh_ok("alice", &key, "echo back"), "back\n");
    let _ = Command::new("true").status();
}
