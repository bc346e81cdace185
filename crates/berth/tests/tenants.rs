//! End-to-end: what one user may not do to another, or to the server (issue 14's attacks).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, KillOnDrop, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn daemon() -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    )
}

/// `ssh -N` with `args` as `user`, kept open.
fn hold_open(d: &Daemon, user: &str, key: &Path, args: &[&str]) -> KillOnDrop {
    KillOnDrop(
        d.ssh(user, key)
            .args(["-N", "-o", "ExitOnForwardFailure=yes"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// How long `child` takes to exit, at most `limit`; `None` if it is still running then.
fn exits_within(child: &mut Child, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    wait_until(limit, || child.try_wait().unwrap().is_some()).then(|| start.elapsed())
}

fn audit(d: &Daemon) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.state_dir().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn removing_a_key_or_a_user_or_a_kick_ends_their_open_connections() {
    let d = daemon();
    let k1 = d.add_user("bob", BUSYBOX);
    let k2 = d.keygen("bob-second");
    d.berth_ok(&[
        "user",
        "key",
        "add",
        "bob",
        "--key",
        k2.with_extension("pub").to_str().unwrap(),
    ]);
    // bob keeps a remote forward open with his first key, and a plain connection with his
    // second.
    let mut fwd = hold_open(&d, "bob", &k1, &["-R", "9000:localhost:22"]);
    assert!(wait_until(Duration::from_secs(20), || d.listening("bob", &k2, 9000)));
    let mut plain = hold_open(&d, "bob", &k2, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(plain.0.try_wait().unwrap().is_none());

    // The first key removed: its connection ends, with its forward; the other stays.
    d.berth_ok(&[
        "user",
        "key",
        "rm",
        "bob",
        k1.with_extension("pub").to_str().unwrap(),
    ]);
    let took = exits_within(&mut fwd.0, Duration::from_secs(10))
        .expect("the removed key's connection stayed open");
    eprintln!("key rm closed the connection in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(wait_until(Duration::from_secs(10), || !d.listening("bob", &k2, 9000)));
    assert!(
        plain.0.try_wait().unwrap().is_none(),
        "the other key's connection ended"
    );

    // A kick ends all of them, and says how many.
    let o = d.berth(&["user", "kick", "bob"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "kicked bob: 1 connection(s) closed\n"
    );
    let took = exits_within(&mut plain.0, Duration::from_secs(10)).expect("kick left it open");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The keys stay: bob logs in again.
    assert_eq!(d.ssh_ok("bob", &k2, "echo back"), "back\n");

    // The user removed: her connection ends too.
    let mut last = hold_open(&d, "bob", &k2, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(last.0.try_wait().unwrap().is_none());
    d.berth_ok(&["user", "rm", "bob"]);
    let took = exits_within(&mut last.0, Duration::from_secs(10)).expect("user rm left it open");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // A kick of nobody is an error that changes nothing.
    let o = d.berth(&["user", "kick", "bob"]);
    assert!(!o.status.success());

    let closed: Vec<_> = audit(&d)
        .into_iter()
        .filter(|r| r["event"] == "connections_closed")
        .map(|r| {
            (
                r["reason"].as_str().unwrap().to_owned(),
                r["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        closed,
        [
            ("key_removed".to_owned(), 1),
            ("kick".to_owned(), 1),
            ("user_removed".to_owned(), 1)
        ]
    );
}

#[test]
fn a_users_saved_image_cannot_be_given_to_another() {
    let d = daemon();
    let ka = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &ka, "echo planted > /etc/profile.d/x.sh; true");
    let o = d.ssh_run("alice", &ka, "commit", b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let image = d.commit_image("alice");
    let kb = d.keygen("bob");
    for name in [image.clone(), format!("docker.io/{image}")] {
        let o = d.berth(&[
            "user",
            "add",
            "bob",
            "--image",
            &name,
            "--key",
            kb.with_extension("pub").to_str().unwrap(),
        ]);
        assert!(!o.status.success(), "bob was given {name}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("is a user's own saved image"), "{e}");
    }
    assert!(
        d.users().iter().all(|u| u["name"] != "bob"),
        "bob was half made"
    );
}

#[test]
fn a_flood_of_host_words_is_counted_not_written_past_the_users_budget() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: "audit_user_budget = 20\n".into(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    let mux = d.dir.path().join("mux");
    let ssh = |args: &[&str]| {
        let mut c = d.ssh("alice", &key);
        c.args(["-S", mux.to_str().unwrap()]).args(args);
        c
    };
    assert!(
        ssh(&["-M", "-f", "-N", "-o", "ControlPersist=60"])
            .status()
            .unwrap()
            .success()
    );
    // 120 host words over the one connection, 8 at a time (fewer than max_sessions).
    for _ in 0..15 {
        let batch: Vec<_> = (0..8)
            .map(|_| {
                ssh(&["port"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in batch {
            assert!(c.wait().unwrap().success());
        }
    }
    let _ = ssh(&["-O", "exit"]).output();
    let records = audit(&d);
    // Everything of her own doing (logins, words) shares the budget: 20 a minute, so at
    // most two minutes' worth whatever the clock did meanwhile, of 120 words and the logins.
    let mine: Vec<&str> = records
        .iter()
        .filter(|r| r["user"] == "alice" && r["event"] != "user_add")
        .map(|r| r["event"].as_str().unwrap_or_default())
        .collect();
    assert!((20..=40).contains(&mine.len()), "{mine:?}");
    assert!(mine.contains(&"host_word"), "{mine:?}");
    // Her login was written before any of it.
    let first = records
        .iter()
        .find(|r| r["user"] == "alice" && r["event"] != "user_add")
        .unwrap();
    assert_eq!(first["event"], "login_accepted");
}
