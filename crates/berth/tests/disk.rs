//! End-to-end: one user cannot fill the server's disk or lock herself out with it (issue 14
//! point 5): console logs capped or off, a per-container disk quota where the engine has
//! one (and a plain word where it has not), disk use reported, commits that never stack
//! past Docker's layer limit, and a daemon that keeps working on a full disk.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_testkit::{
    BUSYBOX, Daemon, DaemonOptions, EngineOptions, QuotaFs, SecondEngine, docker, docker_output,
    wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn daemon(config: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: config.into(),
        },
    )
}

/// Bytes of every console log file Docker keeps for `container` (the rotated one too).
fn console_log_bytes(container: &str) -> u64 {
    let log = docker(&["inspect", "-f", "{{.LogPath}}", container]);
    let dir = Path::new(&log).parent().unwrap().to_owned();
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("-json.log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Three seconds of `yes` into the container's console, as fast as it goes.
const FLOOD: &str = "yes 'a user flooding her console' > /proc/1/fd/1 & sleep 3; kill $!; true";

#[test]
fn a_console_flood_leaves_no_log_beyond_the_cap() {
    let d = daemon("[limits]\nlog_mb = 1\n");
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &key, FLOOD);
    let total = console_log_bytes(&d.container_name("alice"));
    eprintln!("console log on disk after the flood: {total} bytes");
    assert!(
        total > 200_000,
        "the flood logged nothing ({total} bytes): the test proves nothing"
    );
    assert!(total <= 1_100_000, "{total} bytes of log for a 1 MiB cap");
}

#[test]
fn log_mb_0_keeps_no_console_log_at_all() {
    let d = daemon("[limits]\nlog_mb = 0\n");
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &key, FLOOD);
    let container = d.container_name("alice");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.LogConfig.Type}}",
            &container
        ]),
        "none"
    );
    assert_eq!(docker(&["inspect", "-f", "{{.LogPath}}", &container]), "");
    // And the container works as before.
    assert_eq!(d.ssh_ok("alice", &key, "echo fine"), "fine\n");
}

/// What the host's engine stores containers on, as `docker info` says.
fn host_storage() -> (String, String) {
    let driver = docker(&["info", "-f", "{{.Driver}}"]);
    let status = docker(&["info", "-f", "{{json .DriverStatus}}"]);
    let backing: Vec<Vec<String>> = serde_json::from_str(&status).unwrap_or_default();
    let backing = backing
        .into_iter()
        .find(|kv| kv.first().map(String::as_str) == Some("Backing Filesystem"))
        .and_then(|kv| kv.get(1).cloned())
        .unwrap_or_default();
    (driver, backing)
}

#[test]
fn without_quotas_the_admin_is_told_plainly_and_disk_use_is_still_reported() {
    let (driver, backing) = host_storage();
    if driver == "overlay2" && backing == "xfs" {
        eprintln!("skipped: the host's engine may enforce quotas (the xfs test covers it)");
        return;
    }
    let metrics = berth_testkit::free_port();
    let d = daemon(&format!(
        "metrics_listen = \"127.0.0.1:{metrics}\"\n[limits]\ndisk_gb = 1\n"
    ));
    let status = d.berth_ok(&["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with("disk quota: "))
        .unwrap_or_else(|| panic!("no disk quota line: {status}"));
    if driver == "overlay2" {
        assert_eq!(
            line,
            format!(
                "disk quota: not enforced: overlay2 on {backing} has no project quotas; \
                 put /var/lib/docker on xfs mounted with pquota"
            )
        );
    } else {
        assert!(line.starts_with("disk quota: not enforced: "), "{line}");
    }
    // `--check` says the same, on stderr, and still passes.
    let config = d.dir.path().join("berth.toml");
    let guest = berth_testkit::guest_binary();
    let check = d.berth(&[
        "daemon",
        "--check",
        "--config",
        config.to_str().unwrap(),
        "--guest-binary",
        guest.to_str().unwrap(),
    ]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let check = String::from_utf8_lossy(&check.stderr);
    assert_eq!(
        check.lines().find(|l| l.starts_with("disk quota: ")),
        Some(line),
        "--check and status disagree: {check}"
    );

    // The container is made (without the cap), and what she writes is counted.
    let alice = d.add_user("alice", BUSYBOX);
    let bob = d.add_user("bob", BUSYBOX);
    d.ssh_ok(
        "alice",
        &alice,
        "dd if=/dev/zero of=/root/big bs=1M count=30 2>/dev/null",
    );
    d.ssh_ok("bob", &bob, "true");
    let mib = 1024 * 1024;
    let disk_of = |user: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&d.berth_ok(&["user", "show", user, "--json"])).unwrap();
        v["disk_bytes"].as_u64()
    };
    assert!(
        wait_until(Duration::from_secs(60), || disk_of("alice")
            .is_some_and(|b| b >= 30 * mib)),
        "alice's 30 MiB never showed: {:?}",
        disk_of("alice")
    );
    assert!(disk_of("bob").unwrap() < 5 * mib, "{:?}", disk_of("bob"));
    let list = d.berth_ok(&["user", "list"]);
    assert!(list.contains("DISK") && list.contains("MiB"), "{list}");
    let scrape = || {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{metrics}/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut text = String::new();
    let shown = wait_until(Duration::from_secs(30), || {
        text = scrape();
        text.lines().any(|l| {
            l.strip_prefix("berth_user_disk_bytes{user=\"alice\"} ")
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= (30 * mib) as f64)
        })
    });
    assert!(shown, "no disk metric for alice: {text}");
}

#[test]
fn a_user_writing_past_disk_gb_gets_enospc_and_bob_is_fine() {
    // overlay2 on xfs with project quotas where the kernel has them, else btrfs's.
    let start = |fs| {
        SecondEngine::start(&EngineOptions {
            quota_fs: Some(fs),
            args: vec![],
        })
    };
    let (engine, driver) = match start(QuotaFs::Xfs { mib: 2048 }) {
        Ok(e) => (e, "overlay2"),
        Err(xfs) => match start(QuotaFs::Btrfs { mib: 2048 }) {
            Ok(e) => {
                eprintln!("xfs: {xfs}; btrfs instead");
                (e, "btrfs")
            }
            Err(btrfs) => {
                eprintln!("skipped: no file system with quotas here: {xfs}; {btrfs}");
                return;
            }
        },
    };
    engine.import_image(BUSYBOX);
    let d = daemon(&format!(
        "docker_socket = \"{}\"\n[limits]\ndisk_gb = 0.05\n",
        engine.socket().display()
    ));
    let status = d.berth_ok(&["status"]);
    assert!(
        status.contains(&format!("disk quota: 51.2 MiB per container ({driver})")),
        "{status}\n{}",
        d.log()
    );
    let alice = d.add_user("alice", BUSYBOX);
    let bob = d.add_user("bob", BUSYBOX);
    // Her container's layer (outside her home, which is a volume of its own: issue 16).
    let out = d.ssh_run(
        "alice",
        &alice,
        "dd if=/dev/zero of=/big bs=1M count=100",
        b"",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        // ENOSPC from an xfs project quota, EDQUOT from a btrfs quota group.
        !out.status.success()
            && (err.contains("No space left on device") || err.contains("Disk quota exceeded")),
        "alice wrote past her quota ({}): {err}",
        out.status
    );
    d.ssh_ok("alice", &alice, "rm /big");
    // Her home volume has the same cap where the engine can give a volume one (xfs).
    if driver == "overlay2" {
        let out = d.ssh_run(
            "alice",
            &alice,
            "dd if=/dev/zero of=/root/big bs=1M count=100",
            b"",
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("No space left on device"),
            "alice wrote past her quota in her home ({}): {err}",
            out.status
        );
        d.ssh_ok("alice", &alice, "rm /root/big");
    }
    // Bob writes what he likes below his own quota, and logs in as ever.
    d.ssh_ok(
        "bob",
        &bob,
        "dd if=/dev/zero of=/root/ok bs=1M count=20 2>/dev/null",
    );
    assert_eq!(d.ssh_ok("bob", &bob, "echo fine"), "fine\n");
    // Alice too, now that she has made room.
    d.ssh_ok("alice", &alice, "echo again > /root/f");
    assert_eq!(d.ssh_ok("alice", &alice, "cat /root/f"), "again\n");
    drop(d);
    drop(engine);
}

#[test]
fn a_hundred_and_thirty_commits_still_log_in() {
    let d = daemon("");
    let key = d.add_user("alice", BUSYBOX);
    let ssh = |cmd: &str| {
        let out = d.ssh_run("alice", &key, cmd, b"");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut flattened = 0;
    for i in 0..130 {
        // A new container from her last commit, a change, a commit, the container gone.
        // In her container's layer (her home is a volume: no commit carries it).
        let (ok, _, err) = ssh(&format!("echo {i} >> /f"));
        assert!(ok, "login {i} failed: {err}\n{}", d.log());
        let (ok, _, err) = ssh("commit");
        assert!(ok, "commit {i} failed: {err}");
        let reply = err
            .lines()
            .find(|l| l.starts_with("saved your container as "))
            .unwrap_or_else(|| panic!("no reply to the commit: {err}"));
        // "... (SIZE added, SIZE in all, N layers); ..."
        let layers: usize = reply
            .rsplit_once(" layer")
            .and_then(|(s, _)| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no layer count in the commit's reply: {reply}"));
        assert!(
            layers <= berth_runtime::MAX_LAYERS,
            "commit {i}: {layers} layers"
        );
        if reply.contains("flattening") {
            flattened += 1;
        }
        let (ok, _, err) = ssh("remove");
        assert!(ok, "remove {i} failed: {err}");
    }
    assert!(flattened >= 1, "130 commits and not one flattened");
    let expected: String = (0..130).map(|i| format!("{i}\n")).collect();
    let (ok, out, err) = ssh("cat /f");
    assert!(ok, "{err}");
    assert_eq!(out, expected);
    // The audit record of each commit says what it made.
    let audit = std::fs::read_to_string(d.state_dir().join("audit.log")).unwrap();
    let commits: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "container_commit")
        .collect();
    assert_eq!(commits.len(), 130);
    assert!(
        commits
            .iter()
            .all(|c| c["size_bytes"].as_u64().unwrap() > 0 && c["layers"].as_u64().unwrap() >= 1)
    );
    assert!(commits.iter().any(|c| c["flattened"] == true));
    // No earlier commit is left behind untagged: a flattened commit does not build on the
    // image her container was made from, which then goes with that container.
    let instance = std::fs::read_to_string(d.state_dir().join("instance")).unwrap();
    let left = docker_output(&[
        "images",
        "-q",
        "--filter",
        "dangling=true",
        "--filter",
        &format!("label=berth.instance={}", instance.trim()),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "earlier commits left untagged"
    );
}

/// A tmpfs of `mib` MiB mounted on `dir` for the guard's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(Self(dir.to_owned()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("--lazy").arg(&self.0).status();
    }
}

/// Copies the files of `from` (flat, plus the `guest` and `run` trees) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Fills the file system of `dir` with a file there; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=64k"])
        .output()
        .unwrap();
    path
}

#[test]
fn a_full_disk_keeps_logins_working_and_the_admin_is_told() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let mut d = daemon("");
    let alice = d.add_user("alice", BUSYBOX);
    assert_eq!(d.ssh_ok("alice", &alice, "echo hi"), "hi\n");
    // The state directory moves onto a small file system of its own.
    let st = d.stop();
    assert!(st.success());
    let state = d.state_dir();
    let saved = d.dir.path().join("state-saved");
    std::fs::rename(&state, &saved).unwrap();
    let _tmpfs = match Tmpfs::mount(&state, 32) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs: {e}");
            return;
        }
    };
    copy_tree(&saved, &state);
    d.restart();
    assert_eq!(d.ssh_ok("alice", &alice, "echo hi"), "hi\n");

    let filler = fill(&state);
    // The admin is told, plainly, and nothing changes.
    let key = d.keygen("carol");
    let pubkey = key.with_extension("pub");
    let add = |d: &Daemon| {
        d.berth(&[
            "user",
            "add",
            "carol",
            "--image",
            BUSYBOX,
            "--key",
            pubkey.to_str().unwrap(),
        ])
    };
    let out = add(&d);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "user add succeeded on a full disk");
    assert!(err.starts_with("error: disk full: "), "{err}");
    // Logins that need no write keep working, again and again (enough of them that their
    // audit records need more room than the log's last page has); reads answer.
    for _ in 0..30 {
        assert_eq!(d.ssh_ok("alice", &alice, "echo still"), "still\n");
    }
    d.berth_ok(&["status"]);
    assert_eq!(d.users().len(), 1);
    // The audit log's failure is said once, not once a record; nothing panicked.
    let log = d.log();
    assert_eq!(
        log.matches("cannot write the audit log").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    // Room again: everything works as before.
    std::fs::remove_file(&filler).unwrap();
    let out = add(&d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.ssh_ok("carol", &key, "echo carol"), "carol\n");
    assert!(d.log().contains("the audit log is written again"));
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn audit line {l:?}: {e}")))
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "user_add" && r["user"] == "carol"),
        "{audit}"
    );
    d.stop();
}
