#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! End-to-end: what an admin sets per user (issue 16, first slice) — memory and CPUs applied
//! to her running container, pids and shared folders from her next container, `default`
//! back to the server's value, sources that would hand over the host refused with nothing
//! changed, and a user with GPUs told why on a host without the NVIDIA runtime.

use std::path::Path;
use std::process::Command;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, docker, guest_binary};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn daemon(config: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 60,
            config: config.to_owned(),
        },
    )
}

/// The container's memory limit in bytes, as its cgroup says (v2 or v1).
fn memory_max(d: &Daemon, user: &str, key: &Path) -> String {
    d.ssh_ok(
        user,
        key,
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    )
    .trim()
    .to_owned()
}

fn pids_max(d: &Daemon, user: &str, key: &Path) -> String {
    d.ssh_ok(
        user,
        key,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
    )
    .trim()
    .to_owned()
}

fn container_id(d: &Daemon, user: &str) -> String {
    docker(&["inspect", "-f", "{{.Id}}", &d.container_name(user)])
        .trim()
        .to_owned()
}

fn show(d: &Daemon, user: &str) -> serde_json::Value {
    serde_json::from_str(&d.berth_ok(&["user", "show", user, "--json"])).unwrap()
}

/// `berth user set USER ARGS...`: (success, stderr).
fn set(d: &Daemon, user: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["user", "set", user];
    all.extend_from_slice(args);
    let o = d.berth(&all);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn settings_records(d: &Daemon) -> usize {
    d.audit()
        .iter()
        .filter(|r| r["event"] == "user_settings")
        .count()
}

#[test]
fn memory_applies_at_once_pids_at_the_next_container_and_default_returns_to_the_server() {
    let d = daemon("[limits]\nmemory_mb = 256\npids = 200\n");
    let k = d.add_user("alice", BUSYBOX);
    assert_eq!(memory_max(&d, "alice", &k), (256 << 20).to_string());
    assert_eq!(pids_max(&d, "alice", &k), "200");
    let id = container_id(&d, "alice");

    // Memory: the running container has it at once, the same container.
    let (ok, err) = set(&d, "alice", &["--memory", "512M", "--pids", "300"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("alice: memory 512 MiB (user), applied to the container now"),
        "{err}"
    );
    assert!(
        err.contains("alice: pids 300 (user), pending until the container is re-created"),
        "{err}"
    );
    assert_eq!(memory_max(&d, "alice", &k), (512 << 20).to_string());
    assert_eq!(container_id(&d, "alice"), id);
    // Pids: not until her next container.
    assert_eq!(pids_max(&d, "alice", &k), "200");
    let text = d.berth_ok(&["user", "show", "alice"]);
    assert!(text.contains("memory:     512 MiB (user)\n"), "{text}");
    assert!(text.contains("cpus:       1 (server)\n"), "{text}");
    assert!(
        text.contains("pids:       300 (user), pending until the container is re-created\n"),
        "{text}"
    );
    assert!(text.contains("gpus:       none (server)\n"), "{text}");
    d.ssh_ok("alice", &k, "remove");
    assert_eq!(pids_max(&d, "alice", &k), "300");
    assert_eq!(memory_max(&d, "alice", &k), (512 << 20).to_string());
    assert_ne!(container_id(&d, "alice"), id);
    let u = show(&d, "alice");
    assert_eq!(u["limits"]["pids"]["pending"], false);
    assert_eq!(u["limits"]["memory"]["value"], 512 << 20);
    assert_eq!(u["limits"]["memory"]["source"], "user");

    // `default`: back to the server's values, memory at once again.
    let (ok, err) = set(&d, "alice", &["--memory", "default", "--pids", "default"]);
    assert!(ok, "{err}");
    assert_eq!(memory_max(&d, "alice", &k), (256 << 20).to_string());
    let u = show(&d, "alice");
    assert_eq!(u["limits"]["memory"]["source"], "server");
    assert_eq!(u["limits"]["memory"]["shown"], "256 MiB");
    assert_eq!(u["limits"]["memory"]["pending"], false);
    assert_eq!(u["limits"]["pids"]["source"], "server");
    assert_eq!(u["limits"]["pids"]["pending"], true);
    assert_eq!(settings_records(&d), 2);
}

#[test]
fn shared_folders_reach_their_users_next_container_and_nobody_elses() {
    let shared = tempfile::tempdir().unwrap();
    let datasets = shared.path().join("datasets");
    let project = shared.path().join("project-a");
    std::fs::create_dir_all(&datasets).unwrap();
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(datasets.join("iris.csv"), "5.1,3.5\n").unwrap();
    let d = daemon(&format!(
        "[[mounts]]\nsource = \"{}\"\ntarget = \"/datasets\"\nread_only = true\n",
        datasets.display()
    ));
    let ka = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    // The server's folder, read-only, in everybody's container.
    assert_eq!(
        d.ssh_ok("alice", &ka, "cat /datasets/iris.csv"),
        "5.1,3.5\n"
    );
    let o = d.ssh_run("alice", &ka, "touch /datasets/x", b"");
    assert!(!o.status.success(), "a read-only folder took a write");

    // Hers, read-write: pending while her container is the old one.
    let spec = format!("{}:/project", project.display());
    let (ok, err) = set(&d, "alice", &["--mount", &spec]);
    assert!(ok, "{err}");
    assert!(
        err.contains("pending until the container is re-created"),
        "{err}"
    );
    let text = d.berth_ok(&["user", "show", "alice"]);
    assert!(
        text.contains(&format!(
            "{} -> /datasets (read-only, server)",
            datasets.canonicalize().unwrap().display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{} -> /project (read-write, user)",
            project.canonicalize().unwrap().display()
        )),
        "{text}"
    );
    assert!(
        text.contains("            pending until the container is re-created\n"),
        "{text}"
    );
    assert_eq!(
        d.ssh_ok("alice", &ka, "test -e /project && echo yes || echo no"),
        "no\n"
    );
    d.ssh_ok("alice", &ka, "remove");
    d.ssh_ok("alice", &ka, "echo from-alice > /project/note");
    assert_eq!(
        std::fs::read_to_string(project.join("note")).unwrap(),
        "from-alice\n"
    );
    assert_eq!(show(&d, "alice")["mounts"]["pending"], false);
    // Bob has the server's folder and not hers.
    assert_eq!(d.ssh_ok("bob", &kb, "cat /datasets/iris.csv"), "5.1,3.5\n");
    assert_eq!(
        d.ssh_ok("bob", &kb, "test -e /project && echo yes || echo no"),
        "no\n"
    );
    assert_eq!(
        show(&d, "bob")["mounts"]["mounts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Read-only of her own, then gone.
    let (ok, err) = set(&d, "alice", &["--mount", &format!("{spec}:ro")]);
    assert!(ok, "{err}");
    d.ssh_ok("alice", &ka, "remove");
    assert!(
        !d.ssh_run("alice", &ka, "touch /project/x", b"")
            .status
            .success()
    );
    let (ok, err) = set(&d, "alice", &["--unmount", "/project"]);
    assert!(ok, "{err}");
    assert!(err.contains("shared folders of her own: none"), "{err}");
    assert_eq!(show(&d, "alice")["mounts"]["pending"], true);
    // A server-wide folder is not hers to remove.
    let (ok, err) = set(&d, "alice", &["--unmount", "/datasets"]);
    assert!(!ok);
    assert!(err.contains("server-wide"), "{err}");
}

#[test]
fn sources_that_would_hand_over_the_host_and_bad_values_change_nothing() {
    let d = daemon("");
    let k = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &k, "true");
    let before = show(&d, "alice");
    let link = d.dir.path().join("to-root");
    std::os::unix::fs::symlink("/", &link).unwrap();
    let state = d.state_dir();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--mount".into(), "/etc:/x".into()],
            "error: cannot share /etc: it is in the host's system tree /etc".into(),
        ),
        (
            vec!["--mount".into(), format!("{}:/x", state.display())],
            "it is in Berth's state directory".into(),
        ),
        (
            vec!["--mount".into(), format!("{}:/x", link.display())],
            format!(
                "error: cannot share {} (it resolves to /): it is the host's root directory",
                link.display()
            ),
        ),
        (
            vec!["--mount".into(), "/var/run/docker.sock:/x".into()],
            "error: cannot share /var/run/docker.sock (it resolves to /run/docker.sock)".into(),
        ),
        (
            vec!["--mount".into(), "/home:/x".into()],
            "it is the whole of /home".into(),
        ),
        (
            vec![
                "--mount".into(),
                format!("{}:/etc/x", d.dir.path().display()),
            ],
            "target /etc/x would shadow the container's system".into(),
        ),
        (
            vec!["--memory".into(), "8X".into()],
            "error: memory \"8X\" is not a size".into(),
        ),
        (
            vec!["--pids".into(), "5".into()],
            "error: pids \"5\" is not a number of processes".into(),
        ),
        (
            vec!["--cpus".into(), "1000".into()],
            "error: cpus 1000 is more than the".into(),
        ),
        (
            vec!["--gpus".into(), "0,0".into()],
            "error: gpus \"0,0\" names GPU 0 twice".into(),
        ),
        // A good value beside a bad one is not kept either.
        (
            vec![
                "--memory".into(),
                "1G".into(),
                "--mount".into(),
                "/etc:/x".into(),
            ],
            "error: cannot share /etc".into(),
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = set(&d, "alice", &args);
        assert!(!ok, "{args:?} was taken");
        assert!(err.contains(&want), "{args:?}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
    }
    let after = show(&d, "alice");
    assert_eq!(after["limits"], before["limits"]);
    assert_eq!(after["mounts"], before["mounts"]);
    assert_eq!(settings_records(&d), 0);
}

#[test]
fn a_bad_mounts_entry_stops_the_daemon_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[[mounts]]\nsource = \"{}\"\ntarget = \"/ok\"\n\
             [[mounts]]\nsource = \"/etc/ssl\"\ntarget = \"/certs\"\n",
            shared.path().display()
        ),
    )
    .unwrap();
    let want = "error: invalid config: [[mounts]] entry 2 (source \"/etc/ssl\", target \"/certs\"): \
                cannot share /etc/ssl: it is in the host's system tree /etc";
    for check in [true, false] {
        let mut c = Command::new(BIN);
        c.arg("daemon")
            .arg("--config")
            .arg(&config)
            .arg("--guest-binary")
            .arg(guest_binary())
            .env("BERTH_STATE_DIR", dir.path().join("state"));
        if check {
            c.arg("--check");
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "check={check}: {err}");
        assert!(
            err.lines().any(|l| l.starts_with(want)),
            "check={check}: {err}"
        );
    }
    // A target the container depends on is refused when the file is read.
    std::fs::write(
        &config,
        "[[mounts]]\nsource = \"/srv\"\ntarget = \"/usr/x\"\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["daemon", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("[[mounts]] entry 1 (source \"/srv\", target \"/usr/x\"): target /usr/x"),
        "{err}"
    );
}

#[test]
fn a_user_with_gpus_on_a_host_without_the_nvidia_runtime_is_told_and_nothing_is_made() {
    let runtimes = docker(&["info", "--format", "{{json .Runtimes}}"]);
    if runtimes.contains("\"nvidia\"") {
        println!("skipped: this engine has the NVIDIA runtime; the refusal cannot happen here");
        return;
    }
    let d = daemon("");
    let status = d.berth_ok(&["status"]);
    assert!(
        status.contains("GPUs: not available (no NVIDIA container runtime)\n"),
        "{status}"
    );
    let k = d.add_user("carol", BUSYBOX);
    let (ok, err) = set(&d, "carol", &["--gpus", "all"]);
    assert!(ok, "{err}");
    assert!(err.contains("carol: gpus all (user)"), "{err}");
    let o = d.ssh_run("carol", &k, "true", b"");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("your account is set to use GPUs"))
            .count(),
        1,
        "{err}"
    );
    assert!(
        err.contains(
            "your account is set to use GPUs, but this server has no NVIDIA container runtime; ask the administrator"
        ),
        "{err}"
    );
    assert_eq!(d.container_state("carol"), None, "a container was made");
    // Back to none: she logs in.
    let (ok, err) = set(&d, "carol", &["--gpus", "default"]);
    assert!(ok, "{err}");
    assert_eq!(d.ssh_ok("carol", &k, "echo in"), "in\n");
    // `daemon --check` says it too.
    let config = d.dir.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let o = Command::new(BIN)
        .args(["daemon", "--check", "--config"])
        .arg(&config)
        .arg("--guest-binary")
        .arg(guest_binary())
        .env("BERTH_STATE_DIR", d.dir.path().join("check-state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("GPUs: not available (no NVIDIA container runtime)"),
        "{err}"
    );
}
