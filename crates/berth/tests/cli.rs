//! End-to-end: the admin CLI against a real daemon. Refusals must print one clear message,
//! exit non-zero and change nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Output;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, docker_output, guest_binary};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_refused(o: &Output, expected_stderr: &str) {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    assert_eq!(stderr(o), expected_stderr);
    assert!(
        o.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn user_add_refusals_create_nothing() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let key = d.keygen("k");
    let pubkey = key.with_extension("pub");
    let pk = pubkey.to_str().unwrap();
    d.berth_ok(&["user", "add", "alice", "--image", BUSYBOX, "--key", pk]);

    // Bad name.
    let o = d.berth(&["user", "add", "Bad.Name", "--image", BUSYBOX, "--key", pk]);
    assert_refused(
        &o,
        "error: invalid user name \"Bad.Name\": use 1-32 characters, a lower-case letter or _ first, then lower-case letters, digits, _ or -\n",
    );
    // Existing user.
    let o = d.berth(&["user", "add", "alice", "--image", BUSYBOX, "--key", pk]);
    assert_refused(&o, "error: user alice already exists\n");
    // Missing image, with a hint that does not assume a registry.
    let o = d.berth(&[
        "user",
        "add",
        "bob",
        "--image",
        "berth-test/no-such-image:1",
        "--key",
        pk,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with(
            "error: image berth-test/no-such-image:1 is not present on this host\nhint: "
        ),
        "{e}"
    );
    assert!(e.contains("berth image import"), "{e}");
    // Missing key file.
    let missing = d.dir.path().join("nope.pub");
    let o = d.berth(&[
        "user",
        "add",
        "bob",
        "--image",
        BUSYBOX,
        "--key",
        missing.to_str().unwrap(),
    ]);
    assert_refused(
        &o,
        &format!(
            "error: cannot read key file {}: no such file\n",
            missing.display()
        ),
    );
    // A bad line in the second of two key files: named by file and line.
    let bad = d.dir.path().join("bad.pub");
    let good_line = std::fs::read_to_string(&pubkey).unwrap();
    std::fs::write(&bad, format!("# comment\n{good_line}not-a-key AAAA\n")).unwrap();
    let o = d.berth(&[
        "user",
        "add",
        "bob",
        "--image",
        BUSYBOX,
        "--key",
        pk,
        "--key",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with(&format!(
            "error: key file {}: line 3: not a public key",
            bad.display()
        )),
        "{e}"
    );
    // A private key instead of a public one.
    let o = d.berth(&[
        "user",
        "add",
        "bob",
        "--image",
        BUSYBOX,
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("line 1: not a public key"),
        "{}",
        stderr(&o)
    );
    // No --key at all is a usage error.
    let o = d.berth(&["user", "add", "bob", "--image", BUSYBOX]);
    assert_eq!(o.status.code(), Some(2));

    // Nothing of the refusals was created: one user, no container for anyone.
    let users = d.users();
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0]["name"], "alice");
    assert_eq!(users[0]["image"], BUSYBOX);
    assert_eq!(users[0]["container"], "absent");
    assert_eq!(users[0]["sessions"], 0);
    assert_eq!(users[0]["daemon_mode"], false);
    assert!(d.container_state("bob").is_none());
    assert!(d.container_state("alice").is_none());
}

#[test]
fn user_list_table_show_and_rm() {
    // Her container stays running between the checks below, however slow they are.
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 600,
            ..DaemonOptions::default()
        },
    );
    let key = d.add_user("carol", BUSYBOX);
    let table = d.berth_ok(&["user", "list"]);
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "IMAGE",
            "CONTAINER",
            "DISK",
            "SESSIONS",
            "DAEMON",
            "KEYS"
        ]
    );
    let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row, ["carol", BUSYBOX, "absent", "-", "0", "off", "1"]);

    d.ssh_ok("carol", &key, "true");
    assert_eq!(d.user("carol")["container"], "running");
    let show = d.berth_ok(&["user", "show", "carol"]);
    assert!(
        show.contains(&format!("container:  {}carol (running)", d.prefix)),
        "{show}"
    );

    let o = d.berth(&["user", "rm", "carol"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Her home volume is kept (issue 16), and the line says how to get rid of it.
    assert_eq!(
        stderr(&o),
        format!(
            "removed user carol and their container\n\
             kept their home volume {p}home-carol (berth user add carol gives it back; \
             docker volume rm {p}home-carol deletes it)\n",
            p = d.prefix
        )
    );
    assert!(
        d.container_state("carol").is_none(),
        "container still there"
    );
    assert!(d.users().is_empty());
    let o = d.berth(&["user", "rm", "carol"]);
    assert_refused(&o, "error: user carol not found\n");
    // The removed user can no longer log in.
    let o = d.ssh_run("carol", &key, "true", b"");
    assert_eq!(o.status.code(), Some(255));
}

#[test]
fn keys_add_list_rm() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let k1 = d.add_user("dave", BUSYBOX);
    let k2 = d.keygen("second");
    // The second key cannot log in yet.
    assert_eq!(d.ssh_run("dave", &k2, "true", b"").status.code(), Some(255));
    let k2pub = k2.with_extension("pub");
    let o = d.berth(&[
        "user",
        "key",
        "add",
        "dave",
        "--key",
        k2pub.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(d.ssh_ok("dave", &k2, "echo ok"), "ok\n");
    // Adding it twice is refused.
    let o = d.berth(&[
        "user",
        "key",
        "add",
        "dave",
        "--key",
        k2pub.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: user dave already has key SHA256:"),
        "{}",
        stderr(&o)
    );

    let keys: Vec<serde_json::Value> =
        serde_json::from_str(&d.berth_ok(&["user", "key", "list", "dave", "--json"])).unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[1]["comment"], "second");
    let fp1 = keys[0]["fingerprint"].as_str().unwrap().to_owned();
    // ssh-keygen agrees on the fingerprint.
    let kg = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(k1.with_extension("pub"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&kg.stdout).contains(&fp1));

    // Remove by fingerprint: that key no longer logs in, the other still does.
    let o = d.berth(&["user", "key", "rm", "dave", &fp1]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(d.ssh_run("dave", &k1, "true", b"").status.code(), Some(255));
    assert_eq!(d.ssh_ok("dave", &k2, "echo still"), "still\n");
    // The last key is kept.
    let o = d.berth(&["user", "key", "rm", "dave", k2pub.to_str().unwrap()]);
    assert_refused(
        &o,
        "error: user dave would be left without a key; add another first or remove the user\n",
    );
    let o = d.berth(&["user", "key", "rm", "dave", "SHA256:doesnotexist"]);
    assert_refused(&o, "error: user dave has no key SHA256:doesnotexist\n");
    let o = d.berth(&["user", "key", "list", "nobody"]);
    assert_refused(&o, "error: user nobody not found\n");
}

#[test]
fn daemon_not_running_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(BIN)
        .args(["user", "list"])
        .env("BERTH_STATE_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o),
        format!(
            "error: the berth daemon is not running (no answer on {}/admin.sock)\nhint: start it with `berth daemon` (or check --state-dir / BERTH_STATE_DIR)\n",
            dir.path().display()
        )
    );
}

#[test]
fn config_unknown_key_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "idle_stop_seconds = 5\nidle_stop_secs = 3\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args(["daemon", "--check", "--guest-binary"])
        .arg(guest_binary())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with(&format!(
            "error: invalid config {}: line 2 (`idle_stop_secs = 3`): unknown field `idle_stop_secs`",
            cfg.display()
        )),
        "{e}"
    );
    // The daemon itself refuses to start on it, naming the key.
    let o = std::process::Command::new(BIN)
        .args(["daemon", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .env("BERTH_STATE_DIR", dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("idle_stop_secs"));
    assert!(
        !dir.path().join("state").exists(),
        "a refused start must not create the state dir"
    );

    std::fs::write(&cfg, "idle_stop_seconds = 5\n[limits]\ncpus = 0.5\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args(["daemon", "--check", "--guest-binary"])
        .arg(guest_binary())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("idle_stop_seconds = 5"), "{out}");
    assert!(out.contains("cpus = 0.5"), "{out}");
    assert!(out.contains("listen = \"0.0.0.0:2222\""), "{out}");

    // Bad values are named too, and exit non-zero.
    for (text, named) in [
        ("audit_max_mb = 0\n", "audit_max_mb"),
        (
            "metrics_listen = \"not-an-address\"\n",
            "invalid socket address",
        ),
        ("[limits]\npids = 3\n", "limits.pids"),
        ("idle_stop_seconds = -1\n", "idle_stop_seconds"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let o = std::process::Command::new(BIN)
            .args(["daemon", "--check", "--guest-binary"])
            .arg(guest_binary())
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{text}");
        assert!(stderr(&o).contains(named), "{text}: {}", stderr(&o));
    }
}

/// cargo's plain workspace build leaves a dynamically linked `berth-guest`: the daemon and
/// `--check` refuse it (and a file that is not executable) in one line naming the file and the
/// fix, and a start creates nothing.
#[test]
fn a_guest_helper_that_is_not_static_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // This test binary is a dynamically linked x86_64 executable, like that berth-guest.
    let dynamic = std::env::current_exe().unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, std::fs::read(guest_binary()).unwrap()).unwrap();
    for (file, why) in [
        (
            &dynamic,
            "it is dynamically linked (it needs /lib64/ld-linux-x86-64.so.2",
        ),
        (&plain, "it is not executable"),
    ] {
        let o = std::process::Command::new(BIN)
            .args(["daemon", "--check", "--guest-binary"])
            .arg(file)
            .env_remove("BERTH_STATE_DIR")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.starts_with(&format!(
                "error: {} cannot be the berth-guest helper: {why}",
                file.display()
            )),
            "{e}"
        );
        assert!(e.contains("scripts/build-guest --release"), "{e}");
        let o = std::process::Command::new(BIN)
            .args(["daemon", "--listen", "127.0.0.1:0", "--guest-binary"])
            .arg(file)
            .env("BERTH_STATE_DIR", dir.path().join("state"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("cannot be the berth-guest helper"),
            "{}",
            stderr(&o)
        );
        assert!(
            !dir.path().join("state").exists(),
            "a refused start created the state dir"
        );
    }
}

#[test]
fn state_files_are_private_and_host_key_persists() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let st = d.state_dir();
    assert_eq!(mode(&st.join("host_ed25519_key")), 0o600);
    assert_eq!(mode(&st.join("admin.sock")), 0o600);
    assert_eq!(mode(&st), 0o700);
    let key = d.add_user("erin", BUSYBOX);
    d.ssh_ok("erin", &key, "true");
    let before = std::fs::read(st.join("host_ed25519_key")).unwrap();
    d.restart();
    assert_eq!(std::fs::read(st.join("host_ed25519_key")).unwrap(), before);
    // known_hosts from the first run still matches (strict checking).
    let o = d
        .ssh("erin", &key)
        .args(["-o", "StrictHostKeyChecking=yes", "echo same-host"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = docker_output(&["version"]);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_refuses_to_start() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let key = d.add_user("alice", berth_testkit::BUSYBOX);
    let o = std::process::Command::new(BIN)
        .arg("--state-dir")
        .arg(d.state_dir())
        .args(["daemon", "--listen", "127.0.0.1:0"])
        .arg("--guest-binary")
        .arg(berth_testkit::guest_binary())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with(&format!(
            "error: another berth daemon is running with the state directory {}",
            d.state_dir().display()
        )),
        "{}",
        stderr(&o)
    );
    // The first one is untouched: its admin socket and logins work.
    assert_eq!(d.users().len(), 1);
    assert_eq!(d.ssh_ok("alice", &key, "echo still"), "still\n");
}

/// A port in use stops the daemon before it reaches the engine, the host's firewall or any
/// container (only its own state directory is made first, to lock it): the error names the
/// port (here the engine's socket does not even exist; a daemon that got that far would name
/// the engine instead).
#[test]
fn a_port_in_use_stops_the_daemon_before_it_touches_anything() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "docker_socket = \"{}\"\n",
            dir.path().join("no-engine.sock").display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(BIN)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["daemon", "--listen", &addr.to_string(), "--config"])
        .arg(&config)
        .arg("--guest-binary")
        .arg(guest_binary())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(&format!("cannot listen on {addr}")), "{e}");
    assert!(!e.contains("Docker"), "{e}");
}

/// While the daemon starts (here it waits on an engine that never answers), its SSH port is
/// held but not listened on: a client is refused at once, not left waiting for a banner.
#[test]
fn a_client_during_start_up_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // An "engine" whose socket accepts (the kernel's backlog) and never answers.
    let engine = dir.path().join("silent-engine.sock");
    let _silent = std::os::unix::net::UnixListener::bind(&engine).unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!("docker_socket = \"{}\"\n", engine.display()),
    )
    .unwrap();
    let port = berth_testkit::free_port();
    let state = dir.path().join("state");
    let mut daemon = std::process::Command::new(BIN)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "daemon",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&config)
        .arg("--guest-binary")
        .arg(guest_binary())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The instance file is written after the port is bound, before the engine is asked.
    let bound = berth_testkit::wait_until(std::time::Duration::from_secs(30), || {
        state.join("instance").exists()
    });
    let refused = std::net::TcpStream::connect(("127.0.0.1", port));
    let still_starting = daemon.try_wait().unwrap().is_none();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(bound, "the daemon never got as far as its instance file");
    assert!(
        still_starting,
        "the daemon did not wait on the silent engine"
    );
    let e = refused.expect_err("a connection was taken during start-up");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
}

/// Regression: `berth status | head -1` and `berth user list | head -0` panicked ("failed
/// printing to stdout: Broken pipe", exit 101, a backtrace hint). A command whose reader has
/// gone ends as `ls | head` does: killed by SIGPIPE, nothing on stderr. The daemon still
/// ignores SIGPIPE (one closed connection must not end it).
#[test]
fn a_closed_output_pipe_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    d.add_user("alice", BUSYBOX);
    for args in [
        &["status"][..],
        &["user", "list"],
        &["config", "default"],
        &[
            "daemon",
            "--check",
            "--guest-binary",
            guest_binary().to_str().unwrap(),
        ],
    ] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let o = Command::new(BIN)
            .args(args)
            .env("BERTH_STATE_DIR", d.state_dir())
            .stdout(Stdio::from(write))
            .output()
            .unwrap();
        // (`--check` says on stderr whether the engine remaps container root and whether
        // GPUs can be given: not errors.)
        let e: String = stderr(&o)
            .lines()
            .filter(|l| !l.starts_with("user namespaces: ") && !l.starts_with("GPUs: "))
            .collect();
        assert!(!e.contains("panicked"), "{args:?}: {e}");
        assert_ne!(o.status.code(), Some(101), "{args:?}: {e}");
        assert_eq!(o.status.signal(), Some(libc_sigpipe()), "{args:?}: {e}");
        assert_eq!(e, "", "{args:?}");
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid().unwrap())).unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(ignored & (1 << (libc_sigpipe() - 1)), 0, "{status}");
}

fn libc_sigpipe() -> i32 {
    nix::sys::signal::Signal::SIGPIPE as i32
}

/// `berth purge` changes nothing without --yes, and nothing while a daemon runs on the state
/// directory (it would recreate what is removed).
#[test]
fn purge_asks_for_yes_and_refuses_while_the_daemon_runs() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let config = d.dir.path().join("berth.toml");
    let purge = |yes: bool| {
        let mut c = std::process::Command::new(BIN);
        c.arg("purge").arg("--config").arg(&config);
        if yes {
            c.arg("--yes");
        }
        c.env("BERTH_STATE_DIR", d.state_dir()).output().unwrap()
    };
    let o = purge(false);
    assert_refused(
        &o,
        &format!(
            "error: purge deletes this installation's containers, its users' home volumes and committed images ({}/users:*) and Berth's files in {}; nothing was changed\nhint: confirm with --yes\n",
            d.prefix.trim_end_matches('-'),
            d.state_dir().display()
        ),
    );
    let o = purge(true);
    assert_refused(
        &o,
        &format!(
            "error: a berth daemon is running with the state directory {}; nothing was purged\nhint: stop it first\n",
            d.state_dir().display()
        ),
    );
    assert!(d.state_dir().join("berth.db").exists());
    assert_eq!(d.users().len(), 0);
}

/// `BERTH_COMPLETE=bash berth -- WORDS...`, as the bash completion script asks at a Tab.
fn complete(state: &Path, words: &[&str]) -> (Output, std::time::Duration) {
    let start = std::time::Instant::now();
    let o = std::process::Command::new(BIN)
        .arg("--")
        .args(words)
        .env("BERTH_COMPLETE", "bash")
        .env("_CLAP_COMPLETE_INDEX", (words.len() - 1).to_string())
        .env("BERTH_STATE_DIR", state)
        .output()
        .unwrap();
    (o, start.elapsed())
}

fn candidates(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .split(['\n', '\x0b'])
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

/// User, image and session names complete from the running daemon; with no daemon, or one
/// that accepts the connection and never answers, a Tab gets the other candidates at once.
#[test]
fn completion_asks_the_daemon_and_never_waits_for_one_that_is_silent() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    d.add_user("alice", BUSYBOX);
    // A Tab gets nothing when the daemon (or the engine behind it) is slower than the Tab's
    // deadline, as on a machine busy with the rest of the suite (an engine importing or
    // saving images answers an image list late); the user presses Tab again.
    let completes = |words: &[&str], want: &str| {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            let (o, _) = complete(&d.state_dir(), words);
            assert!(o.status.success(), "{}", stderr(&o));
            if candidates(&o).contains(&want.to_owned()) {
                return true;
            }
            if std::time::Instant::now() > until {
                return false;
            }
        }
    };
    assert!(completes(&["berth", "user", "rm", ""], "alice"));
    assert!(completes(
        &["berth", "user", "add", "bob", "--image", ""],
        BUSYBOX
    ));
    let (o, _) = complete(&d.state_dir(), &["berth", "user", "l"]);
    assert_eq!(candidates(&o), ["list"]);

    // A socket that takes the connection (the backlog) and never answers.
    let dir = tempfile::tempdir().unwrap();
    let _silent = std::os::unix::net::UnixListener::bind(dir.path().join("admin.sock")).unwrap();
    let (o, took) = complete(dir.path(), &["berth", "user", "rm", ""]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        took < std::time::Duration::from_secs(5),
        "a Tab took {took:?}"
    );
    let got = candidates(&o);
    assert!(got.contains(&"--keep-image".to_owned()), "{got:?}");
    assert!(!got.contains(&"alice".to_owned()), "{got:?}");
    // No daemon at all.
    let none = tempfile::tempdir().unwrap();
    let (o, took) = complete(none.path(), &["berth", "user", "rm", ""]);
    assert!(o.status.success() && took < std::time::Duration::from_secs(5));
}

/// The completion scripts and man pages print; an unknown shell or page is a usage error.
#[test]
fn completions_and_man_pages_print_and_refuse_what_they_do_not_know() {
    let berth = |args: &[&str]| std::process::Command::new(BIN).args(args).output().unwrap();
    for (shell, marker) in [
        ("bash", "complete -o nospace"),
        ("zsh", "#compdef berth"),
        ("fish", "complete --keep-order --exclusive --command berth"),
    ] {
        let o = berth(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("BERTH_COMPLETE"), "{shell}: {script}");
    }
    for (page, head) in [
        ("berth", ".TH BERTH 1 "),
        ("berth.toml", ".TH BERTH.TOML 5 "),
    ] {
        let o = berth(&["man", page]);
        assert!(o.status.success(), "{page}: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.lines().any(|l| l.starts_with(head)), "{page}: {text}");
    }
    for args in [&["completions", "tcsh"][..], &["man", "ssh"]] {
        let o = berth(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
        assert!(
            stderr(&o).starts_with("error: invalid value "),
            "{}",
            stderr(&o)
        );
    }
    let v = berth(&["--version"]);
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.starts_with(&format!("berth {} (", env!("CARGO_PKG_VERSION"))) && v.ends_with(")\n"),
        "{v}"
    ); // Built from a checkout: the commit's hash and date.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if root.join(".git").exists() {
        let commit = v.split_once(" (").unwrap().1.trim_end_matches(")\n");
        let (hash, date) = commit.split_once(' ').unwrap_or((commit, ""));
        assert!(
            hash.len() >= 12 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{v}"
        );
        assert_eq!(date.len(), 10, "{v}");
    }
}

/// A key's comment is the user's words, printed on the admin's terminal by `user key list`:
/// its control characters (a terminal's escape sequences: a clipboard write, hidden text)
/// are never kept or printed.
#[test]
fn a_key_comment_cannot_send_escape_sequences_to_the_admins_terminal() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let key = d.keygen("k");
    let line = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut fields = line.split_whitespace();
    let (kind, blob) = (fields.next().unwrap(), fields.next().unwrap());
    let evil = d.dir.path().join("evil.pub");
    std::fs::write(
        &evil,
        format!("{kind} {blob} laptop\u{1b}]52;c;aGk=\u{7}\u{1b}[8mhidden\u{1b}[0m\n"),
    )
    .unwrap();
    d.berth_ok(&[
        "user",
        "add",
        "alice",
        "--image",
        BUSYBOX,
        "--key",
        evil.to_str().unwrap(),
    ]);
    let o = d.berth(&["user", "key", "list", "alice"]);
    assert!(o.status.success());
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("laptop]52;c;aGk="), "{shown}");
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "{shown:?}"
    );
    let o = d.berth(&["user", "key", "list", "alice", "--json"]);
    let json = String::from_utf8_lossy(&o.stdout);
    assert!(
        !json.contains("\\u001b") && !json.contains("\\u0007"),
        "{json}"
    );
}
