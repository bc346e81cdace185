//! End-to-end: what an admin sees — `berth status`, `berth session kill`, the audit log and
//! the Prometheus metrics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, KillOnDrop, free_port, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn status(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&d.berth_ok(&["status", "--json"])).unwrap()
}

/// Whether a process matching `pattern` (a grep pattern; `[s]leep` does not match the
/// grep itself) runs in alice's container.
fn running(d: &Daemon, key: &Path, pattern: &str) -> bool {
    let cmd = format!("ps | grep -q '{pattern}' && echo y || echo n");
    d.ssh_ok("alice", key, &cmd) == "y\n"
}

#[test]
fn status_shows_sessions_and_session_kill_ends_one() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    let st = status(&d);
    assert!(
        st["docker_version"]
            .as_str()
            .unwrap()
            .starts_with(|c: char| c.is_ascii_digit())
    );
    assert_eq!(st["users"], 1);
    assert_eq!(st["sessions"].as_array().unwrap().len(), 0);

    let mut client = KillOnDrop(
        d.ssh("alice", &key)
            .arg("sleep 300")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        status(&d)["sessions"].as_array().unwrap().len() == 1
    }));
    let st = status(&d);
    let s = &st["sessions"][0];
    assert_eq!(s["user"], "alice");
    assert_eq!(s["command"], "sleep 300");
    assert!(s["from"].as_str().unwrap().starts_with("127.0.0.1:"), "{s}");
    assert!(s["since"].as_str().unwrap().ends_with('Z'));
    let c = &st["containers"][0];
    assert_eq!(c["user"], "alice");
    assert_eq!(c["running"], true);
    assert_eq!(c["name"], d.container_name("alice"));

    let table = d.berth_ok(&["status"]);
    assert!(table.contains("sessions:   1"), "{table}");
    assert!(
        table.contains("sleep 300") && table.contains("alice"),
        "{table}"
    );

    let id = s["id"].as_u64().unwrap().to_string();
    let out = d.berth_ok(&["session", "kill", &id]);
    assert_eq!(out, format!("killed session {id} of alice (sleep 300)\n"));
    // The client sees its command end (killed by SIGHUP: 129), the registry empties.
    let mut code = None;
    assert!(wait_until(Duration::from_secs(10), || {
        code = client.0.try_wait().unwrap().and_then(|s| s.code());
        code.is_some()
    }));
    assert_eq!(code, Some(129));
    assert!(wait_until(Duration::from_secs(10), || {
        status(&d)["sessions"].as_array().unwrap().is_empty()
    }));
    assert!(!running(&d, &key, "[s]leep 300"));

    // A session that ignores the hang-up is killed two seconds later, children included.
    let mut stubborn = KillOnDrop(
        d.ssh("alice", &key)
            .arg("trap '' HUP; sleep 301; echo survived")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut sid = String::new();
    assert!(wait_until(Duration::from_secs(20), || {
        let st = status(&d);
        match st["sessions"].as_array().unwrap().first() {
            Some(s) if running(&d, &key, "[s]leep 301") => {
                sid = s["id"].as_u64().unwrap().to_string();
                true
            }
            _ => false,
        }
    }));
    d.berth_ok(&["session", "kill", &sid]);
    let mut code = None;
    assert!(wait_until(Duration::from_secs(15), || {
        code = stubborn.0.try_wait().unwrap().and_then(|s| s.code());
        code.is_some()
    }));
    assert_eq!(code, Some(137));
    assert!(!running(&d, &key, "[s]leep 30"));

    let o = d.berth(&["session", "kill", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!("error: no open session {id}\n")
    );
}

#[test]
fn the_audit_log_has_one_json_line_per_event() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let key = d.add_user("alice", BUSYBOX);
    let stranger = d.keygen("stranger");
    let refused = d.ssh_run("alice", &stranger, "true", b"");
    assert_eq!(refused.status.code(), Some(255));
    assert_eq!(d.ssh_ok("alice", &key, "echo in"), "in\n");
    d.berth_ok(&["user", "set", "alice", "--x11-forwarding", "off"]);

    let path = d.state_dir().join("audit.log");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        lines = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        lines.iter().any(|l| l["event"] == "session_end")
    }));
    let find = |event: &str| {
        lines
            .iter()
            .find(|l| l["event"] == event)
            .unwrap_or_else(|| panic!("no {event} in {lines:#?}"))
            .clone()
    };
    let fp = |k: &Path| {
        let o = std::process::Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(k)
            .output()
            .unwrap();
        String::from_utf8(o.stdout)
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_eq!(find("user_add")["user"], "alice");
    let r = find("login_refused");
    assert_eq!(r["user"], "alice");
    assert_eq!(r["key"], fp(&stranger));
    assert!(r["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let a = find("login_accepted");
    assert_eq!(a["key"], fp(&key));
    assert_eq!(find("container_create")["user"], "alice");
    assert_eq!(find("container_start")["user"], "alice");
    let start = find("session_start");
    assert_eq!(start["command"], "echo in");
    let end = find("session_end");
    assert_eq!(end["id"], start["id"]);
    assert_eq!(end["exit"], 0);
    assert_eq!(find("user_forwarding")["x11"], false);
    assert!(
        lines
            .iter()
            .all(|l| l["ts"].as_str().unwrap().ends_with('Z'))
    );
    // The container stops after the grace period: that is recorded too.
    assert!(wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"event\":\"container_stop\"")
    }));
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample `name` (no labels) in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_count_logins_failures_sessions_and_bytes() {
    let mport = free_port();
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: format!("metrics_listen = \"127.0.0.1:{mport}\"\n"),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    let stranger = d.keygen("stranger");
    assert_eq!(
        d.ssh_run("alice", &stranger, "true", b"").status.code(),
        Some(255)
    );
    let payload = vec![b'x'; 100_000];
    let out = d.ssh_run("alice", &key, "wc -c", &payload);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
    let _open = KillOnDrop(
        d.ssh("alice", &key)
            .arg("sleep 300")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut text = String::new();
    assert!(wait_until(Duration::from_secs(20), || {
        text = scrape(mport);
        text.contains("\nberth_sessions_open 1")
    }));
    assert!(sample(&text, "berth_connections_total") >= 3.0);
    assert!(sample(&text, "berth_logins_total") >= 2.0);
    assert!(sample(&text, "berth_auth_failures_total") >= 1.0);
    assert_eq!(sample(&text, "berth_containers_running"), 1.0);
    assert!(sample(&text, "berth_relayed_bytes_total") >= 100_000.0);
    assert!(sample(&text, "berth_login_duration_seconds_count") >= 2.0);
    assert!(
        text.contains("berth_login_duration_seconds_bucket{le=\"0.5\"}"),
        "{text}"
    );
    // Every metric is Berth's, and none carries a user.
    let body: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with('#'))
        .filter(|l| !l.is_empty())
        .collect();
    assert!(body.len() > 20, "{text}");
    for l in body {
        let name = l
            .trim_start_matches("# HELP ")
            .trim_start_matches("# TYPE ");
        assert!(name.starts_with("berth_"), "{l}");
        assert!(!l.contains("alice") && !l.contains("user="), "{l}");
    }
}
