//! End-to-end: client input is flow-controlled, not buffered (issue 14, point 3). A process
//! that does not read its stdin stalls only its own sender; the daemon holds at most a window
//! per channel; a client that vanishes with its input backed up is still noticed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, KillOnDrop, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// What the daemon must stay under while it is flooded.
const RSS_CEILING: u64 = 256 * 1024 * 1024;

fn daemon() -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    )
}

/// The daemon's resident memory, in bytes.
fn rss(d: &Daemon) -> u64 {
    let pid = d.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Bob is fine: his login and the admin's status answer (within generous deadlines: these
/// are hang guards, not timings).
fn bob_is_fine(d: &Daemon, kb: &Path) {
    let bob = d.ssh("bob", kb);
    let st = Command::new("timeout")
        .arg("60")
        .arg(bob.get_program())
        .args(bob.get_args())
        .arg("true")
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "bob could not log in");
    let status = Command::new("timeout")
        .args(["60", BIN, "--state-dir"])
        .arg(d.state_dir())
        .arg("status")
        .output()
        .unwrap();
    assert!(status.status.success(), "berth status did not answer");
}

/// `ssh alice@host CMD </dev/zero`: a client pushing input as fast as it is let.
fn flooding(d: &Daemon, user: &str, key: &Path, cmd: &str) -> KillOnDrop {
    KillOnDrop(
        d.ssh(user, key)
            .arg(cmd)
            .stdin(std::fs::File::open("/dev/zero").unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Processes running `needle` in `user`'s container.
fn running(d: &Daemon, user: &str, needle: &str) -> usize {
    let out = berth_testkit::docker(&["exec", &d.container_name(user), "ps", "-o", "args"]);
    out.lines().filter(|l| l.trim() == needle).count()
}

#[test]
fn forty_sessions_that_never_read_their_flooded_stdin_keep_the_daemon_small() {
    // Caps high enough for the 40 connections: this is about what each one may hold.
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: "[limits]\nconnections = 64\n".into(),
        },
    );
    let ka = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    d.ssh_ok("alice", &ka, "true");
    let before = rss(&d);
    // In batches: the door lets one source hold only a few unauthenticated connections.
    let mut clients: Vec<KillOnDrop> = Vec::new();
    for batch in 1..=8 {
        clients.extend((0..5).map(|_| flooding(&d, "alice", &ka, "sleep 600")));
        assert!(
            wait_until(Duration::from_secs(60), || running(
                &d,
                "alice",
                "sleep 600"
            ) == 5 * batch),
            "the sessions did not all start: {} of {}",
            running(&d, "alice", "sleep 600"),
            5 * batch
        );
    }
    // Each client has spent its window by now (2 MiB at loopback speed takes milliseconds);
    // they keep pushing for a while.
    std::thread::sleep(Duration::from_secs(5));
    let flooded = rss(&d);
    eprintln!(
        "daemon RSS: {} MiB before, {} MiB with 40 flooding sessions",
        before >> 20,
        flooded >> 20
    );
    assert!(
        flooded < RSS_CEILING,
        "daemon RSS {} MiB under the flood",
        flooded >> 20
    );
    // The sessions are alive (flow control stalls the senders; it does not cut them off),
    // and nobody else is hurt.
    assert!(
        clients
            .iter_mut()
            .all(|c| c.0.try_wait().unwrap().is_none())
    );
    assert_eq!(running(&d, "alice", "sleep 600"), 40);
    bob_is_fine(&d, &kb);
    // A client that vanishes with its input backed up is noticed, and its session ended.
    drop(clients.drain(..20));
    assert!(
        wait_until(Duration::from_secs(60), || running(
            &d,
            "alice",
            "sleep 600"
        ) == 20),
        "sessions of vanished clients still run: {}",
        running(&d, "alice", "sleep 600")
    );
    drop(clients);
    assert!(wait_until(Duration::from_secs(60), || running(
        &d,
        "alice",
        "sleep 600"
    ) == 0));
    // What the flood took goes back (most of it: the allocator keeps some slack).
    let back = wait_until(Duration::from_secs(30), || {
        rss(&d) < flooded.min(RSS_CEILING)
    });
    let after = rss(&d);
    eprintln!("daemon RSS after the sessions ended: {} MiB", after >> 20);
    assert!(back, "daemon RSS {} MiB after the flood", after >> 20);
}

#[test]
fn a_process_that_does_not_read_stalls_only_its_own_channel() {
    let d = daemon();
    let ka = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &ka, "true");
    // One connection (a master) carrying several channels.
    let sock = d.dir.path().join("master.sock");
    let master_args = |c: &mut Command| {
        c.arg("-S").arg(&sock);
    };
    let mut m = d.ssh("alice", &ka);
    master_args(&mut m);
    let _master = KillOnDrop(
        m.args(["-M", "-N"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || sock.exists()));
    // A channel whose process never reads, flooded.
    let mut s = d.ssh("alice", &ka);
    master_args(&mut s);
    let _stuck = KillOnDrop(
        s.arg("sleep 600")
            .stdin(std::fs::File::open("/dev/zero").unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(30), || running(
        &d,
        "alice",
        "sleep 600"
    ) == 1));
    std::thread::sleep(Duration::from_secs(2));
    // The same connection still carries other channels, both ways, in bulk.
    let mut c = d.ssh("alice", &ka);
    master_args(&mut c);
    let out = Command::new("timeout")
        .arg("60")
        .arg(c.get_program())
        .args(c.get_args())
        .arg("head -c 50000000 | wc -c")
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "50000000");
    assert_eq!(running(&d, "alice", "sleep 600"), 1);
}

/// A paramiko client that floods window changes and extended data from the moment it asks
/// for its command, while the container is still being created, and for `secs` after.
const PARAMIKO_FLOOD: &str = r#"
import sys, time, paramiko
host, port, user, keyfile, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
t = paramiko.Transport((host, port))
t.connect(username=user, pkey=paramiko.Ed25519Key.from_private_key_file(keyfile))
ch = t.open_session()
ch.exec_command("cat >/dev/null; echo done")
end, n, sent, goal = time.time() + secs, 0, 0, 128 << 20
while sent < goal and time.time() < end:
    ch.resize_pty(80 + n % 50, 24 + n % 10)
    sent += ch.send_stderr(b"x" * 16384)
    n += 1
print("flooded", n, sent, flush=True)
ch.shutdown_write()
out = b""
while not ch.exit_status_ready() or ch.recv_ready():
    if ch.recv_ready():
        out += ch.recv(1024)
    else:
        time.sleep(0.05)
print(out.decode().strip(), ch.recv_exit_status(), flush=True)
"#;

#[test]
fn extended_data_and_window_changes_flooded_during_a_slow_start_are_not_hoarded() {
    let d = daemon();
    // A user whose container does not exist yet: her first command waits for its creation.
    let ka = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    let before = rss(&d);
    let script = d.dir.path().join("flood.py");
    std::fs::write(&script, PARAMIKO_FLOOD).unwrap();
    // Debian's python3 (with python3-paramiko from the test command).
    let mut flood = KillOnDrop(
        Command::new("/usr/bin/python3")
            .arg(&script)
            .args(["127.0.0.1", &d.port.to_string(), "alice"])
            .arg(&ka)
            .arg("60")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut peak = 0;
    let mut checked_bob = false;
    while flood.0.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(rss(&d));
        if peak > before + (256 << 20) {
            break;
        }
        if !checked_bob {
            bob_is_fine(&d, &kb);
            checked_bob = true;
        }
    }
    assert!(wait_until(Duration::from_secs(60), || flood
        .0
        .try_wait()
        .unwrap()
        .is_some()));
    let mut out = String::new();
    std::io::Read::read_to_string(flood.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(flood.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("{out}{err}daemon RSS peak: {} MiB", peak >> 20);
    let flooded: Vec<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("flooded "))
        .unwrap_or_else(|| panic!("the flood did not run: {out}{err}\n{}", d.log()))
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    // Far more was sent than the daemon grew by: extended input is dropped (its window given
    // back), window changes are not queued.
    assert!(flooded[1] >= 128 << 20, "only {} bytes sent", flooded[1]);
    assert!(out.contains("done 0"), "{out}{err}");
    assert!(
        peak < before + (32 << 20),
        "daemon RSS {} MiB at its peak, {} MiB before",
        peak >> 20,
        before >> 20
    );
}

#[test]
fn one_connection_carries_many_sessions_one_after_another() {
    let d = daemon();
    let ka = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &ka, "true");
    let sock = d.dir.path().join("seq.sock");
    let mut m = d.ssh("alice", &ka);
    m.arg("-S").arg(&sock);
    let _master = KillOnDrop(
        m.args(["-M", "-N"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || sock.exists()));
    // More than the per-connection cap (10) in all: each ended session gives its place back.
    for i in 0..25 {
        let mut c = d.ssh("alice", &ka);
        c.arg("-S").arg(&sock).arg(format!("echo {i}"));
        let o = c.stdin(Stdio::null()).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            i.to_string(),
            "session {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
