//! End-to-end: `install.sh` installs into a temporary root prefix without systemd (the daemon
//! runs in the background), a second run changes nothing, a user logs in with the stock ssh
//! client, and `--uninstall` / `--uninstall --purge` remove what they say and nothing else.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use berth_testkit::{
    BUSYBOX, docker_output, ensure_images, free_port, guest_binary, ssh_command, wait_until,
    workspace_root,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn script() -> PathBuf {
    workspace_root().join("install.sh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// Alive and not a zombie (the background daemon's parent, the installer, has exited).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn is_berth_daemon(pid: i32) -> bool {
    alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| text(&c).replace('\0', " ").contains("berth daemon"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn container_exists(name: &str) -> bool {
    docker_output(&["inspect", "--type", "container", name])
        .status
        .success()
}

/// One installation under a temporary root. Dropping it kills the background daemon (by the
/// pid it recorded, after checking the process is a berth daemon) and removes the test
/// user's container, so a failure midway leaves nothing running.
struct Install {
    root: TempDir,
    port: u16,
    user: String,
    pid: Option<i32>,
}

impl Install {
    fn new() -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("berth-install-")
                .tempdir()
                .unwrap(),
            port: free_port(),
            user: format!("inst{}", std::process::id()),
            pid: None,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }

    fn state(&self) -> PathBuf {
        self.path("/var/lib/berth")
    }

    fn conf(&self) -> PathBuf {
        self.path("/etc/berth/berth.toml")
    }

    fn berth(&self) -> PathBuf {
        self.path("/usr/local/bin/berth")
    }

    fn guest(&self) -> PathBuf {
        self.path("/usr/local/bin/berth-guest")
    }

    fn container(&self) -> String {
        format!("berth-{}", self.user)
    }

    /// Runs `install.sh ARGS` with stdin not a terminal.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(script())
            .args(args)
            .env("BERTH_ROOT", self.root.path())
            .env("BERTH_NO_SYSTEMD", "1")
            .env("BERTH_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("BERTH_DEFAULT_IMAGE", BUSYBOX)
            .env("BERTH_BIN", BIN)
            .env("BERTH_GUEST_BIN", guest_binary())
            .env_remove("BERTH_STATE_DIR")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "install.sh {args:?}: {}", show(&o));
        text(&o.stdout)
    }

    /// The installed CLI against the installed daemon.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(self.berth())
            .arg("--state-dir")
            .arg(self.state())
            .args(args)
            .output()
            .unwrap()
    }

    fn answers(&self) -> bool {
        self.cli(&["user", "list"]).status.success()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state().join("berth.log")).unwrap_or_default()
    }

    fn recorded_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.state().join("berth.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        for pid in [self.pid, self.recorded_pid()].into_iter().flatten() {
            if is_berth_daemon(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                wait_until(Duration::from_secs(10), || !alive(pid));
                if is_berth_daemon(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = docker_output(&["rm", "-f", &self.container()]);
    }
}

/// A container that belongs to another Berth instance; removed on drop.
struct Foreign(String);

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = docker_output(&["rm", "-f", &self.0]);
    }
}

#[test]
fn install_again_login_uninstall_purge() {
    ensure_images();
    let mut inst = Install::new();
    let listen = format!("127.0.0.1:{}", inst.port);

    // First run: everything in place. The engine answers, so it is left alone.
    let out = inst.run_ok(&[]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("docker: unchanged (engine ")
                && l.ends_with(" answers on /var/run/docker.sock)")),
        "{out}"
    );
    inst.pid = inst.recorded_pid();
    let pid = inst.pid.expect("no pid file after install");
    assert!(is_berth_daemon(pid), "daemon pid {pid} not running: {out}");
    assert!(inst.answers(), "daemon does not answer: {}", inst.log());
    assert_eq!(mode(&inst.berth()), 0o755);
    assert_eq!(mode(&inst.guest()), 0o755);
    assert_eq!(
        std::fs::read(inst.berth()).unwrap(),
        std::fs::read(BIN).unwrap()
    );
    assert_eq!(
        std::fs::read(inst.guest()).unwrap(),
        std::fs::read(guest_binary()).unwrap()
    );
    assert_eq!(mode(&inst.state()), 0o700);
    assert_eq!(mode(&inst.conf()), 0o644);
    assert!(
        !inst.path("/etc/systemd").exists(),
        "a unit was written without systemd"
    );
    // The config is the packaged one (what `berth config default` prints, checked below), with
    // the prefix's state dir and the listen address set.
    let packaged = std::fs::read_to_string(workspace_root().join("packaging/berth.toml")).unwrap();
    let expected = packaged
        .replace(
            "# state_dir = \"/var/lib/berth\"\n",
            &format!("state_dir = \"{}\"\n", inst.state().display()),
        )
        .replace(
            "# listen = \"0.0.0.0:2222\"\n",
            &format!("listen = \"{listen}\"\n"),
        );
    assert_ne!(expected, packaged);
    assert_eq!(std::fs::read_to_string(inst.conf()).unwrap(), expected);
    let check = Command::new(BIN)
        .args(["daemon", "--check", "--guest-binary"])
        .arg(guest_binary())
        .arg("--config")
        .arg(inst.conf())
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", show(&check));
    let check = text(&check.stdout);
    assert!(
        check.contains(&format!("listen = \"{listen}\"\n")),
        "{check}"
    );
    assert!(
        check.contains(&format!("state_dir = \"{}\"\n", inst.state().display())),
        "{check}"
    );
    // The next two commands.
    assert!(
        out.contains(&format!(
            "user add alice --image {BUSYBOX} --key ~alice/.ssh/id_ed25519.pub\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("  ssh -p {} alice@127.0.0.1\n", inst.port)),
        "{out}"
    );
    assert!(out.contains("kill $(cat "), "{out}");
    assert!(!out.contains("nothing changed"), "{out}");

    // Second run: nothing changes, and it says so.
    let files = [
        inst.berth(),
        inst.guest(),
        inst.conf(),
        inst.state(),
        inst.state().join("berth.pid"),
    ];
    let before: Vec<SystemTime> = files.iter().map(|f| mtime(f)).collect();
    std::thread::sleep(Duration::from_millis(1100));
    let again = inst.run_ok(&[]);
    assert_eq!(
        again.lines().last(),
        Some("Berth is already installed; nothing changed."),
        "{again}"
    );
    let after: Vec<SystemTime> = files.iter().map(|f| mtime(f)).collect();
    assert_eq!(before, after, "a file changed on the second run: {again}");
    assert_eq!(inst.recorded_pid(), Some(pid));
    assert!(is_berth_daemon(pid));

    // A user logs in with the stock client.
    let key = inst.root.path().join("key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "inst", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let add = inst.cli(&[
        "user",
        "add",
        &inst.user,
        "--image",
        BUSYBOX,
        "--key",
        key.with_extension("pub").to_str().unwrap(),
    ]);
    assert!(add.status.success(), "{}", show(&add));
    let ssh = ssh_command(inst.port, &key, &inst.user)
        .args(["echo", "hi"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        ssh.status.success(),
        "{}\n--- daemon log ---\n{}",
        show(&ssh),
        inst.log()
    );
    assert_eq!(text(&ssh.stdout), "hi\n");
    assert!(container_exists(&inst.container()));
    let instance = std::fs::read_to_string(inst.state().join("instance"))
        .unwrap()
        .trim()
        .to_owned();
    let label = docker_output(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"berth.instance\"}}",
        &inst.container(),
    ]);
    assert_eq!(text(&label.stdout).trim(), instance);

    // Uninstall: the daemon and the binaries go; config, state and the container stay.
    let out = inst.run_ok(&["--uninstall"]);
    assert!(!alive(pid), "daemon still running after --uninstall: {out}");
    let list = Command::new(BIN)
        .arg("--state-dir")
        .arg(inst.state())
        .args(["user", "list"])
        .output()
        .unwrap();
    assert_eq!(list.status.code(), Some(3), "{}", show(&list));
    assert!(!inst.berth().exists() && !inst.guest().exists(), "{out}");
    assert!(inst.conf().exists() && inst.state().join("berth.db").exists());
    assert!(container_exists(&inst.container()));
    assert!(out.contains("--uninstall --purge"), "{out}");

    // Purge without --yes and without a terminal: refused, nothing removed.
    let o = inst.run(&["--uninstall", "--purge"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stderr).contains("--yes"), "{}", show(&o));
    assert!(inst.conf().exists() && inst.state().join("berth.db").exists());
    assert!(container_exists(&inst.container()));

    // Purge with --yes: this instance's container, state and config go; another instance's
    // container stays.
    let other = Foreign(format!("bt-inst-other-{}", std::process::id()));
    let other_label = format!("berth.instance=other-{}", std::process::id());
    docker_output(&["rm", "-f", &other.0]);
    let created = docker_output(&[
        "create",
        "--name",
        &other.0,
        "--label",
        &other_label,
        BUSYBOX,
        "true",
    ]);
    assert!(created.status.success(), "{}", show(&created));
    // A file Berth did not make (a state_dir pointed at the wrong place) survives the purge.
    std::fs::write(inst.state().join("notes.txt"), "mine\n").unwrap();
    let o = inst.run(&["--uninstall", "--purge", "--yes"]);
    assert!(o.status.success(), "{}", show(&o));
    let out = show(&o);
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains(&format!(
            "containers: removed 1 of this installation (berth.instance={instance})\n"
        )),
        "{out}"
    );
    assert!(
        stdout.contains("images: removed ") && stdout.contains(" of berth/users\n"),
        "{out}"
    );
    assert!(stdout.contains("config: removed "), "{out}");
    let left: Vec<String> = std::fs::read_dir(inst.state())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["notes.txt".to_owned()], "{out}");
    assert!(out.contains("holds files Berth did not make"), "{out}");
    std::fs::remove_dir_all(inst.state()).unwrap();
    assert!(!inst.path("/etc/berth").exists(), "{out}");
    assert!(!container_exists(&inst.container()), "{out}");
    assert!(
        container_exists(&other.0),
        "purge removed a foreign container"
    );
}

/// The binary prints the packaged config and unit byte for byte (install.sh writes them from
/// it), and the config documents every key `--check` prints, each with its default.
#[test]
fn the_binary_prints_the_packaged_files_and_they_list_every_key() {
    let root = workspace_root();
    let berth = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(args)
            .env_remove("BERTH_STATE_DIR")
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", show(&o));
        text(&o.stdout)
    };
    let packaged = std::fs::read_to_string(root.join("packaging/berth.toml")).unwrap();
    assert_eq!(berth(&["config", "default"]), packaged);
    let unit = std::fs::read_to_string(root.join("packaging/berth.service")).unwrap();
    assert_eq!(
        berth(&["config", "unit", "--binary", "/usr/local/bin/berth"]),
        unit
    );
    for line in [
        "ExecStart=/usr/local/bin/berth daemon --config /etc/berth/berth.toml",
        "Restart=on-failure",
        "MemoryMax=2G",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing: {unit}");
    }
    assert!(unit.contains("docker.service"), "{unit}");
    let o = Command::new(BIN)
        .args(["config", "unit", "--binary", "/opt/my berth"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).starts_with("error: /opt/my berth cannot be written in a systemd unit"),
        "{}",
        show(&o)
    );

    let check = |config: &Path| {
        let o = Command::new(BIN)
            .args(["daemon", "--check", "--guest-binary"])
            .arg(guest_binary())
            .arg("--config")
            .arg(config)
            .env_remove("BERTH_STATE_DIR")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", show(&o));
        text(&o.stdout)
    };
    // The packaged file is valid and is all defaults.
    let defaults = check(Path::new("/dev/null"));
    assert_eq!(check(&root.join("packaging/berth.toml")), defaults);

    // Every key --check prints appears, commented out, in its section.
    let is_key = |s: &str| {
        s.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
    };
    let keys = |text: &str, commented: bool| {
        let mut section = String::new();
        let mut out = BTreeSet::new();
        for line in text.lines() {
            if line.starts_with('[') {
                section = line.to_owned();
                continue;
            }
            let line = if commented {
                match line.strip_prefix("# ") {
                    Some(l) => l,
                    None => continue,
                }
            } else {
                line
            };
            if is_key(line) {
                out.insert(format!("{section}{}", line.split_once(" = ").unwrap().0));
            }
        }
        out
    };
    let printed = keys(&defaults, false);
    let listed = keys(&packaged, true);
    assert!(printed.contains("[limits]pids"), "{printed:?}");
    let missing: Vec<_> = printed.difference(&listed).collect();
    assert!(missing.is_empty(), "packaging/berth.toml lacks {missing:?}");
    // No key is set in the packaged file: every setting line is commented out.
    assert!(keys(&packaged, false).is_empty(), "{packaged}");
    // Each commented key has a comment line explaining it just above.
    let lines: Vec<&str> = packaged.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.strip_prefix("# ").is_some_and(is_key) {
            assert!(
                i > 0 && lines[i - 1].starts_with("# "),
                "{line} has no explanation"
            );
        }
    }

    // Uncommented, every value is the default.
    let dir = tempfile::tempdir().unwrap();
    let uncommented: String = packaged
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(k) if is_key(k) => format!("{k}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, uncommented).unwrap();
    // Optional keys (guest_binary, metrics_listen) are unset by default, so --check prints
    // them only here, with the example value.
    let all = check(&path);
    let mut section = String::new();
    let mut defaults_only = String::new();
    for line in all.lines() {
        if line.starts_with('[') {
            section = line.to_owned();
        } else if is_key(line) {
            let key = line.split_once(" = ").unwrap().0;
            if !printed.contains(&format!("{section}{key}")) {
                continue;
            }
        }
        defaults_only.push_str(line);
        defaults_only.push('\n');
    }
    assert_eq!(defaults_only, defaults);

    // --listen and --state-dir are set, and read back by `config get` and `--check --json`.
    let set = berth(&[
        "--state-dir",
        "/srv/berth state",
        "config",
        "default",
        "--listen",
        "127.0.0.1:2200",
    ]);
    std::fs::write(&path, &set).unwrap();
    let p = path.to_str().unwrap();
    assert_eq!(
        berth(&["config", "get", "state_dir", "--config", p]),
        "/srv/berth state\n"
    );
    assert_eq!(
        berth(&["config", "get", "listen", "--config", p]),
        "127.0.0.1:2200\n"
    );
    assert_eq!(
        berth(&["config", "get", "accept_env", "--config", p]),
        "LANG\nLC_*\n"
    );
    assert_eq!(
        berth(&["config", "get", "metrics_listen", "--config", p]),
        ""
    );
    let o = Command::new(BIN)
        .args(["daemon", "--check", "--json", "--guest-binary"])
        .arg(guest_binary())
        .arg("--config")
        .arg(&path)
        .env_remove("BERTH_STATE_DIR")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["state_dir"], "/srv/berth state");
    assert_eq!(json["listen"], "127.0.0.1:2200");
    assert_eq!(json["limits"]["pids"], 1024);
    assert_eq!(json["metrics_listen"], serde_json::Value::Null);
    let o = Command::new(BIN)
        .args(["config", "get", "nope", "--config", p])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "error: no setting is named nope\nhint: `berth config default` lists every setting\n"
    );
}

/// An uninstall reads what it can of a broken config (its state directory here), but a purge
/// does not guess at what belongs to the installation: it refuses and changes nothing.
#[test]
fn a_broken_config_is_read_for_an_uninstall_but_never_purged() {
    let inst = Install::new();
    std::fs::create_dir_all(inst.conf().parent().unwrap()).unwrap();
    let state = inst.path("/srv/state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("berth.db"), "").unwrap();
    std::fs::write(
        inst.conf(),
        format!("state_dir = \"{}\"\nidle_stop_secs = 3\n", state.display()),
    )
    .unwrap();
    let o = inst.run(&["--uninstall", "--purge", "--yes"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("is invalid (error: invalid config ") && err.contains("idle_stop_secs"),
        "{err}"
    );
    assert!(err.contains("--purge needs a valid "), "{err}");
    assert!(o.stdout.is_empty(), "{}", show(&o));
    assert!(inst.conf().exists() && state.join("berth.db").exists());

    let out = inst.run_ok(&["--uninstall"]);
    assert!(
        out.contains(&format!(
            "kept: config {}",
            inst.path("/etc/berth").display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("state {} (users", state.display())),
        "{out}"
    );
}

#[test]
fn unknown_argument_is_a_usage_error_and_creates_nothing() {
    let inst = Install::new();
    for args in [&["--bogus"][..], &["--purge"], &["--uninstall", "--yes"]] {
        let o = inst.run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", show(&o));
        let err = text(&o.stderr);
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains("usage: install.sh"), "{err}");
        assert!(o.stdout.is_empty(), "{}", show(&o));
    }
    assert_eq!(std::fs::read_dir(inst.root.path()).unwrap().count(), 0);
}

/// Every `NAME` on the PATH (`which -a`), to hide them from the installer.
fn on_path(name: &str) -> Vec<String> {
    let o = Command::new("which").args(["-a", name]).output().unwrap();
    text(&o.stdout).lines().map(str::to_owned).collect()
}

/// The engine is decided by what Berth needs (an engine answering on the configured socket,
/// or a `dockerd` to start), never by the `docker` CLI alone. The machine's `dockerd` (and,
/// for "no docker at all", its `docker` CLIs) are hidden in a mount namespace of the run's own
/// by binding `/dev/null` over them; `apt-get` is a stub that records what it was asked and
/// refuses the install, so nothing is installed for real. (The third case, an engine that
/// answers, is `install_again_login_uninstall_purge`: "docker: unchanged".)
#[test]
fn no_dockerd_means_docker_io_is_installed_whether_or_not_a_cli_is_there() {
    for with_cli in [true, false] {
        let inst = Install::new();
        // A config whose engine socket answers nothing.
        let sock = inst.root.path().join("no-engine.sock");
        std::fs::create_dir_all(inst.conf().parent().unwrap()).unwrap();
        std::fs::write(
            inst.conf(),
            format!(
                "state_dir = \"{}\"\nlisten = \"127.0.0.1:{}\"\ndocker_socket = \"{}\"\n",
                inst.state().display(),
                inst.port,
                sock.display()
            ),
        )
        .unwrap();
        let stubs = inst.path("/stubs");
        std::fs::create_dir_all(&stubs).unwrap();
        let apt_log = inst.path("/apt.log");
        std::fs::write(
            stubs.join("apt-get"),
            format!(
                "#!/bin/sh\necho \"$*\" >>'{}'\n[ \"$1\" = update ] && exit 0\nexit 100\n",
                apt_log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            stubs.join("apt-get"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let mut hide = on_path("dockerd");
        if !with_cli {
            hide.extend(on_path("docker"));
        }
        let path = format!("{}:{}", stubs.display(), std::env::var("PATH").unwrap());
        let o = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                "for f in $HIDE; do mount --bind /dev/null \"$f\" || exit 99; done; \
                 if command -v dockerd >/dev/null; then echo dockerd still there; exit 98; fi; \
                 exec \"$@\"",
            )
            .arg("sh")
            .arg(script())
            .env("HIDE", hide.join(" "))
            .env("PATH", path)
            .env("BERTH_ROOT", inst.root.path())
            .env("BERTH_NO_SYSTEMD", "1")
            .env("BERTH_DEFAULT_IMAGE", BUSYBOX)
            .env("BERTH_BIN", BIN)
            .env("BERTH_GUEST_BIN", guest_binary())
            .env_remove("BERTH_STATE_DIR")
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let out = text(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(1),
            "with_cli={with_cli}: {}",
            show(&o)
        );
        let said = if with_cli {
            "docker: no Docker engine (a docker CLI at /"
        } else {
            "docker: no Docker engine; installing docker.io from the distribution's packages\n"
        };
        assert!(out.contains(said), "with_cli={with_cli}: {}", show(&o));
        if with_cli {
            assert!(
                out.contains("but no dockerd); installing docker.io"),
                "{}",
                show(&o)
            );
        }
        assert!(
            text(&o.stderr).contains("error: apt-get install docker.io failed"),
            "{}",
            show(&o)
        );
        let asked = std::fs::read_to_string(&apt_log).unwrap();
        assert!(
            asked.lines().any(|l| l == "install -y -qq docker.io"),
            "{asked}"
        );
        // Nothing was started on the way.
        assert!(inst.recorded_pid().is_none(), "{}", show(&o));
    }
}
