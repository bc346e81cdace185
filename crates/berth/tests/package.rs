//! End-to-end: Berth as a Debian package and a release tarball, used as an admin would.
//!
//! `scripts/package` builds `berth_V-1_amd64.deb`, the upgrade `berth_V-2_amd64.deb` (the same
//! source rebuilt, a higher version) and `--tar` the tarball, once for the tests here; lintian
//! reports no error.
//! - *A clean Debian 12 root*: a container of the debootstrap-made test image, with the
//!   `policy-rc.d` every image build has (services are not started). `apt-get install
//!   ./berth_*.deb` pulls the Docker engine from the archive and runs the maintainer scripts;
//!   files and modes are checked; remove keeps config and state; purge leaves nothing.
//! - *This machine*: install (the service starts: systemd when it runs, else
//!   `/etc/init.d/berth`), add a user, log in with ssh, upgrade while her session is open (the
//!   daemon restarts, her container keeps running, the admin's config is kept), remove (the
//!   daemon stops, state kept), purge (config and state go, her container stays). A machine
//!   with a Berth of its own is not touched: the test says `skipped:` (and fails when
//!   `BERTH_TEST_PACKAGE=1`, as in CI, where nothing may be skipped).
//! - *The tarball*: both binaries static; its `install.sh` installs from it into a temporary
//!   root with no Rust toolchain on the PATH.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_testkit::{
    BUSYBOX, DEBIAN, docker_output, ensure_images, free_port, keygen_at, ssh_command, wait_until,
    workspace_root,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

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

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn run_ok(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(o.status.success(), "{cmd:?}: {}", show(&o));
    text(&o.stdout)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// What the tests here need from the machine, or why they cannot run.
fn unmet() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root".into());
    }
    for tool in [
        "dpkg-deb", "apt-get", "lintian", "objcopy", "unshare", "docker",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} not found (scripts/test installs it)"));
        }
    }
    None
}

/// Prints `skipped:` with the reason, or fails when `BERTH_TEST_PACKAGE=1` (CI).
fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("BERTH_TEST_PACKAGE").is_none_or(|v| v != "1"),
        "{test} cannot run, and BERTH_TEST_PACKAGE=1 says it must: {why}"
    );
    eprintln!("skipped: {test}: {why}");
}

/// The three artifacts, built once for every test here.
struct Built {
    deb: PathBuf,
    upgrade: PathBuf,
    tarball: PathBuf,
    version: String,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let start = Instant::now();
        let package = |args: &[&str]| {
            PathBuf::from(
                run_ok(Command::new(workspace_root().join("scripts/package")).args(args)).trim(),
            )
        };
        let deb = package(&[]);
        let upgrade = package(&["--revision", "2"]);
        let tarball = package(&["--tar"]);
        eprintln!("packages built in {:?}", start.elapsed());
        let name = deb.file_name().unwrap().to_str().unwrap().to_owned();
        let version = name
            .strip_prefix("berth_")
            .and_then(|n| n.strip_suffix("-1_amd64.deb"))
            .unwrap_or_else(|| panic!("unexpected package name {name}"))
            .to_owned();
        Built {
            deb,
            upgrade,
            tarball,
            version,
        }
    })
}

fn deb_field(deb: &Path, field: &str) -> String {
    run_ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg(field))
        .trim()
        .to_owned()
}

/// The package's metadata, its file list, and lintian: no error, and no warning but those
/// the package overrides (each with its reason).
#[test]
fn the_package_is_complete_and_lintian_clean() {
    if let Some(why) = unmet() {
        return skip("the_package_is_complete_and_lintian_clean", &why);
    }
    let b = built();
    let cargo_version = std::fs::read_to_string(workspace_root().join("Cargo.toml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    assert_eq!(b.version, cargo_version, "one place sets the version");
    assert_eq!(deb_field(&b.deb, "Version"), format!("{cargo_version}-1"));
    assert_eq!(
        deb_field(&b.upgrade, "Version"),
        format!("{cargo_version}-2")
    );
    assert_eq!(deb_field(&b.deb, "Depends"), "docker.io | docker-ce");
    assert!(deb_field(&b.deb, "Built-Using").starts_with("glibc (= "));
    let description = deb_field(&b.deb, "Description");
    assert!(description.contains("berth purge --yes"), "{description}");
    assert!(
        description.contains("never a user's container"),
        "{description}"
    );

    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&b.deb));
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{contents}"))
            .to_owned()
    };
    for (path, perms) in [
        ("/usr/bin/berth", "-rwxr-xr-x root/root"),
        ("/usr/libexec/berth/berth-guest", "-rwxr-xr-x root/root"),
        ("/etc/berth/berth.toml", "-rw-r--r-- root/root"),
        ("/etc/init.d/berth", "-rwxr-xr-x root/root"),
        ("/etc/logrotate.d/berth", "-rw-r--r-- root/root"),
        ("/lib/systemd/system/berth.service", "-rw-r--r-- root/root"),
        ("/usr/share/man/man1/berth.1.gz", "-rw-r--r-- root/root"),
        (
            "/usr/share/man/man5/berth.toml.5.gz",
            "-rw-r--r-- root/root",
        ),
        (
            "/usr/share/bash-completion/completions/berth",
            "-rw-r--r-- root/root",
        ),
        (
            "/usr/share/zsh/vendor-completions/_berth",
            "-rw-r--r-- root/root",
        ),
        (
            "/usr/share/fish/vendor_completions.d/berth.fish",
            "-rw-r--r-- root/root",
        ),
        ("/usr/share/doc/berth/copyright", "-rw-r--r-- root/root"),
        (
            "/usr/share/doc/berth/changelog.Debian.gz",
            "-rw-r--r-- root/root",
        ),
    ] {
        let e = entry(path);
        assert!(e.starts_with(perms), "{e}");
    }
    // Small: stripped (the debug info is beside the package).
    let size: u64 = entry("/usr/bin/berth")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(size < 40 << 20, "berth is {size} bytes: not stripped?");
    let debug = b.deb.parent().unwrap().join("berth.debug");
    assert!(debug.exists(), "{} missing", debug.display());

    let conffiles = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("dpkg-deb --ctrl-tarfile \"$1\" | tar -xOf - ./conffiles")
            .arg("sh")
            .arg(&b.deb),
    );
    assert_eq!(
        conffiles,
        "/etc/berth/berth.toml\n/etc/init.d/berth\n/etc/logrotate.d/berth\n"
    );

    // The shipped config and unit are the binary's (packaging/ holds the same, tested in
    // install.rs), the unit runs the packaged binary.
    let unpacked = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&b.deb)
            .arg(unpacked.path()),
    );
    let at = |p: &str| unpacked.path().join(p.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(at("/etc/berth/berth.toml")).unwrap(),
        std::fs::read_to_string(workspace_root().join("packaging/berth.toml")).unwrap()
    );
    let unit = std::fs::read_to_string(at("/lib/systemd/system/berth.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/berth daemon --config /etc/berth/berth.toml\n"),
        "{unit}"
    );
    // The completion scripts call `berth` by name, never the path it was built at.
    let bash = std::fs::read_to_string(at("/usr/share/bash-completion/completions/berth")).unwrap();
    assert!(bash.contains("\"berth\" -- \"${words[@]}\""), "{bash}");
    assert!(!bash.contains("target"), "{bash}");

    let lintian = run(Command::new("lintian")
        .args(["--fail-on", "error", "--display-info", "--show-overrides"])
        .arg(&b.deb));
    let report = text(&lintian.stdout);
    eprintln!("lintian:\n{report}");
    assert!(lintian.status.success(), "{}", show(&lintian));
    let unexplained: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(unexplained.is_empty(), "lintian: {unexplained:?}");
}

/// The package into a clean Debian 12 root: apt resolves the engine from the archive, the
/// maintainer scripts run without systemd and with services refused, every file lands with
/// its mode, the config validates, remove keeps config and state, purge leaves nothing.
#[test]
fn apt_installs_it_into_a_clean_debian_root_and_purges_it_away() {
    if let Some(why) = unmet() {
        return skip(
            "apt_installs_it_into_a_clean_debian_root_and_purges_it_away",
            &why,
        );
    }
    ensure_images();
    let b = built();
    // apt's downloads are kept between runs.
    let cache = b.deb.parent().unwrap().join("apt-cache");
    for d in ["archives/partial", "lists/partial"] {
        std::fs::create_dir_all(cache.join(d)).unwrap();
    }
    let script = r#"
set -eu
# As in any image build: maintainer scripts may not start services.
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
export DEBIAN_FRONTEND=noninteractive
apt="apt-get -q -o APT::Sandbox::User=root"
$apt update >/dev/null
echo "== install"
$apt install -y --no-install-recommends /pkg/$DEB 2>&1
echo "== files"
for f in /usr/bin/berth /usr/libexec/berth/berth-guest /etc/berth /etc/berth/berth.toml \
         /etc/init.d/berth /lib/systemd/system/berth.service /var/lib/berth \
         /usr/share/man/man1/berth.1.gz /usr/share/bash-completion/completions/berth; do
  stat -c '%a %U:%G %n' "$f"
done
echo "== enabled"
ls /etc/systemd/system/multi-user.target.wants/ /etc/rc2.d/ | grep berth
echo "== version"
berth --version
echo "== check"
berth daemon --check >/dev/null && echo valid
echo "== docker"
dpkg-query -W -f='${Status}\n' docker.io
echo "== remove"
$apt remove -y berth >/dev/null 2>&1
ls /etc/berth /var/lib/berth -d
test ! -e /usr/bin/berth && echo binary gone
echo "== purge"
$apt purge -y berth 2>&1 | grep '^berth:' || true
ls -d /etc/berth /var/lib/berth 2>&1 || true
dpkg-query -W -f='${Status}\n' berth 2>&1 || true
echo "== end"
"#;
    let name = format!("bt{}xpkg-root", std::process::id());
    let _ = docker_output(&["rm", "-f", &name]);
    let o = run(Command::new("docker")
        .args(["run", "--rm", "--name", &name, "-e"])
        .arg(format!(
            "DEB={}",
            b.deb.file_name().unwrap().to_str().unwrap()
        ))
        .arg("-v")
        .arg(format!("{}:/pkg:ro", b.deb.parent().unwrap().display()))
        .arg("-v")
        .arg(format!(
            "{}:/var/cache/apt/archives",
            cache.join("archives").display()
        ))
        .arg("-v")
        .arg(format!(
            "{}:/var/lib/apt/lists",
            cache.join("lists").display()
        ))
        .args([DEBIAN, "sh", "-c", script]));
    // apt ends some lines it passes on from dpkg with \r\n.
    let out = text(&o.stdout).replace('\r', "");
    assert!(o.status.success(), "{}", show(&o));
    let section = |name: &str| -> String {
        let start = out.find(&format!("== {name}\n")).unwrap() + name.len() + 4;
        let end = out[start..]
            .find("\n== ")
            .map_or(out.len(), |e| start + e + 1);
        out[start..end].to_owned()
    };
    // The engine came from the archive: that is what Depends asks for.
    assert_eq!(section("docker"), "install ok installed\n", "{out}");
    let install = section("install");
    assert!(
        install.contains("berth: systemd is not running; /etc/init.d/berth runs the daemon"),
        "{install}"
    );
    assert!(
        install.contains("berth user add alice --image"),
        "{install}"
    );
    assert_eq!(
        section("files"),
        "755 root:root /usr/bin/berth\n\
         755 root:root /usr/libexec/berth/berth-guest\n\
         755 root:root /etc/berth\n\
         644 root:root /etc/berth/berth.toml\n\
         755 root:root /etc/init.d/berth\n\
         644 root:root /lib/systemd/system/berth.service\n\
         700 root:root /var/lib/berth\n\
         644 root:root /usr/share/man/man1/berth.1.gz\n\
         644 root:root /usr/share/bash-completion/completions/berth\n",
        "{out}"
    );
    let enabled = section("enabled");
    assert!(enabled.contains("berth.service\n"), "{enabled}");
    assert!(enabled.contains("S01berth\n"), "{enabled}");
    assert!(
        section("version").starts_with(&format!("berth {} (", b.version)),
        "{out}"
    );
    // The helper is found in /usr/libexec and passes the static check.
    assert_eq!(section("check"), "valid\n", "{out}");
    assert_eq!(
        section("remove"),
        "/etc/berth\n/var/lib/berth\nbinary gone\n",
        "{out}"
    );
    let purge = section("purge");
    assert!(
        purge.contains("berth: purged /etc/berth, /var/lib/berth and /var/log/berth.log\n"),
        "{purge}"
    );
    assert!(purge.contains("ls: cannot access '/etc/berth'"), "{purge}");
    assert!(
        purge.contains("ls: cannot access '/var/lib/berth'"),
        "{purge}"
    );
    assert!(!purge.contains("install ok"), "{purge}");
}

/// Paths a real installation on this machine would have; any of them means hands off.
const MACHINE_PATHS: &[&str] = &[
    "/etc/berth",
    "/var/lib/berth",
    "/usr/bin/berth",
    "/usr/libexec/berth",
    "/etc/init.d/berth",
    "/lib/systemd/system/berth.service",
    "/etc/systemd/system/berth.service",
    "/run/berth.pid",
    "/var/log/berth.log",
];

fn berth_on_machine() -> Option<String> {
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "berth"])
        .output()
        .unwrap();
    if status.status.success() && !text(&status.stdout).contains("not-installed") {
        return Some(format!(
            "the berth package is here ({})",
            text(&status.stdout)
        ));
    }
    MACHINE_PATHS
        .iter()
        .find(|p| Path::new(p).symlink_metadata().is_ok())
        .map(|p| format!("{p} exists"))
}

/// apt-get or dpkg on this machine, with services allowed: a `policy-rc.d` that refuses them
/// (as this kind of machine may have, for image builds) is replaced, in a mount namespace of
/// the command's own, by one that allows them, as on a server.
fn apt(args: &[&str]) -> Output {
    let allow = std::env::temp_dir().join(format!("berth-allow-rc-{}", std::process::id()));
    std::fs::write(&allow, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&allow, std::fs::Permissions::from_mode(0o755)).unwrap();
    run(Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(
            "if [ -e /usr/sbin/policy-rc.d ]; then mount --bind \"$ALLOW\" /usr/sbin/policy-rc.d || exit 99; fi; \
             exec \"$@\"",
        )
        .arg("sh")
        .args(args)
        .env("ALLOW", &allow)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn apt_ok(args: &[&str]) -> String {
    let o = apt(args);
    assert!(o.status.success(), "{args:?}: {}", show(&o));
    text(&o.stdout)
}

/// The installed daemon's status, when it answers.
fn status() -> Option<serde_json::Value> {
    let o = Command::new("/usr/bin/berth")
        .args(["status", "--json"])
        .env_remove("BERTH_STATE_DIR")
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).unwrap())
}

fn daemon_pid() -> Option<i32> {
    status().and_then(|s| s["pid"].as_i64()).map(|p| p as i32)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Undoes whatever of the machine test is left when it ends, passed or not: the package
/// purged, a daemon that outlived it stopped, its files, the user's container, her home
/// volume and the network removed. Runs only for a machine that had no Berth before.
struct MachineGuard {
    container: String,
    /// Her home volume, which the package's purge (rightly) keeps.
    volume: String,
    network: String,
    pids: Vec<i32>,
    session: Option<Child>,
}

impl Drop for MachineGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.session.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = daemon_pid() {
            self.pids.push(pid);
        }
        let _ = apt(&["dpkg", "--purge", "berth"]);
        for &pid in &self.pids {
            let berth = std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c == b"berth\n");
            if alive(pid) && berth {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for p in MACHINE_PATHS {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
        let _ = docker_output(&["rm", "-f", &self.container]);
        let _ = docker_output(&["volume", "rm", "-f", &self.volume]);
        // The host firewall chains and the per-user networks of the installed daemon (its
        // own purge needs its config, which the package's purge removed): this build's
        // `berth purge` with a config naming the same network.
        if let Ok(dir) = tempfile::tempdir() {
            let config = dir.path().join("berth.toml");
            // (A repository of its own: purge removes the committed images it names.)
            let text = format!(
                "network = \"{}\"\ncommit_repository = \"{}-none\"\n",
                self.network, self.network
            );
            if std::fs::write(&config, text).is_ok() {
                let _ = Command::new(env!("CARGO_BIN_EXE_berth"))
                    .args(["purge", "--yes", "--config"])
                    .arg(&config)
                    .env("BERTH_STATE_DIR", dir.path())
                    .output();
            }
        }
        for net in text(&docker_output(&["network", "ls", "--format", "{{.Name}}"]).stdout).lines()
        {
            if net == self.network || net.starts_with(&format!("{}-", self.network)) {
                let _ = docker_output(&["network", "rm", net]);
            }
        }
    }
}

fn inspect(container: &str, format: &str) -> String {
    text(&docker_output(&["inspect", "-f", format, container]).stdout)
        .trim()
        .to_owned()
}

/// Install, log in, upgrade with the session open, remove, purge, on this machine.
#[test]
fn install_login_upgrade_with_a_session_open_remove_purge_on_this_machine() {
    let test = "install_login_upgrade_with_a_session_open_remove_purge_on_this_machine";
    if let Some(why) = unmet() {
        return skip(test, &why);
    }
    if let Some(why) = berth_on_machine() {
        return skip(
            test,
            &format!("this machine has a Berth of its own, left alone: {why}"),
        );
    }
    ensure_images();
    let b = built();
    let pid = std::process::id();
    let port = free_port();
    let user = format!("pkg{pid}");
    let mut guard = MachineGuard {
        container: format!("berth-{user}"),
        volume: format!("berth-home-{user}"),
        network: format!("bt{pid}xpkg-net"),
        pids: Vec::new(),
        session: None,
    };

    // The admin's config, there before the package (as configuration management would put
    // it): loopback only, a network of this test's own. dpkg keeps it (--force-confold).
    std::fs::create_dir_all("/etc/berth").unwrap();
    let config = run_ok(
        Command::new(b.deb.parent().unwrap().join("bin/berth")).args([
            "config",
            "default",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]),
    );
    // A grace longer than the test: after the upgrade the new daemon adopts her container and
    // starts its grace, and apt (its triggers) can take longer than the default 10 s on a busy
    // machine, so the checks below would see an idle stop, not the upgrade's doing.
    let config = config
        .replace(
            "# network = \"berth\"\n",
            &format!("network = \"{}\"\n", guard.network),
        )
        .replace("# idle_stop_seconds = 10\n", "idle_stop_seconds = 600\n");
    assert!(config.contains("\nidle_stop_seconds = 600\n"), "{config}");
    std::fs::write("/etc/berth/berth.toml", &config).unwrap();

    let confold = "Dpkg::Options::=--force-confold";
    let out = apt_ok(&[
        "apt-get",
        "install",
        "-y",
        "-o",
        confold,
        b.deb.to_str().unwrap(),
    ]);
    assert!(out.contains("berth user add alice"), "{out}");
    assert!(
        wait_until(Duration::from_secs(20), || status().is_some()),
        "{out}"
    );
    let st = status().unwrap();
    let first = st["pid"].as_i64().unwrap() as i32;
    guard.pids.push(first);
    let version = run_ok(Command::new("/usr/bin/berth").arg("--version"));
    assert_eq!(
        version.trim(),
        format!("berth {}", st["version"].as_str().unwrap()),
        "the daemon and the CLI say the same version"
    );
    assert_eq!(st["listen"], format!("127.0.0.1:{port}"));
    assert_eq!(mode(Path::new("/var/lib/berth")), 0o700);
    assert_eq!(mode(Path::new("/var/lib/berth/host_ed25519_key")), 0o600);
    assert_eq!(
        std::fs::read_to_string("/etc/berth/berth.toml").unwrap(),
        config
    );

    // A user, her login, and completion of her name from the daemon.
    let dir = tempfile::tempdir().unwrap();
    let key = keygen_at(&dir.path().join("key"), "pkg");
    run_ok(Command::new("/usr/bin/berth").args([
        "user",
        "add",
        &user,
        "--image",
        BUSYBOX,
        "--key",
        key.with_extension("pub").to_str().unwrap(),
    ]));
    // One candidate a line (or a \x0b apart, as the bash script asks for with _CLAP_IFS).
    // A Tab gets no names when the daemon answers later than its deadline, as an engine busy
    // with the rest of the suite makes it; the user presses Tab again.
    let tab = || {
        run_ok(
            Command::new("/usr/bin/berth")
                .args(["--", "berth", "user", "rm", ""])
                .env("BERTH_COMPLETE", "bash")
                .env("_CLAP_COMPLETE_INDEX", "3")
                .env_remove("BERTH_STATE_DIR"),
        )
    };
    let mut complete = tab();
    let until = std::time::Instant::now() + Duration::from_secs(90);
    while !complete.split(['\n', '\x0b']).any(|c| c == user) && std::time::Instant::now() < until {
        complete = tab();
    }
    assert!(
        complete.split(['\n', '\x0b']).any(|c| c == user),
        "{complete:?}"
    );
    let hi = run_ok(ssh_command(port, &key, &user).args(["echo", "hi"]));
    assert_eq!(hi, "hi\n");

    // Her session stays open over the upgrade.
    let mut session = ssh_command(port, &key, &user)
        .arg("touch /root/before-upgrade; echo ready; exec sleep 600")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(session.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    guard.session = Some(session);
    let container = guard.container.clone();
    let id = inspect(&container, "{{.Id}}");
    let started = inspect(&container, "{{.State.StartedAt}}");
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");

    let out = apt_ok(&[
        "apt-get",
        "install",
        "-y",
        "-o",
        confold,
        b.upgrade.to_str().unwrap(),
    ]);
    assert!(
        wait_until(Duration::from_secs(20), || daemon_pid()
            .is_some_and(|p| p != first)),
        "the daemon was not restarted by the upgrade: {out}"
    );
    let second = daemon_pid().unwrap();
    guard.pids.push(second);
    assert!(!alive(first), "the old daemon {first} still runs");
    let installed = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Version}", "berth"]));
    assert_eq!(installed, format!("{}-2", b.version));
    // The container was never stopped, and the admin's config is as she wrote it.
    assert_eq!(inspect(&container, "{{.Id}}"), id);
    assert_eq!(inspect(&container, "{{.State.StartedAt}}"), started);
    assert_eq!(inspect(&container, "{{.State.Running}}"), "true");
    assert_eq!(
        std::fs::read_to_string("/etc/berth/berth.toml").unwrap(),
        config
    );
    // The session lived in the old daemon: it ends (as its client sees a closed connection).
    let mut session = guard.session.take().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || session
            .try_wait()
            .unwrap()
            .is_some()),
        "the session outlived the daemon that served it"
    );
    // She logs in again into the same container.
    let again = run_ok(ssh_command(port, &key, &user).args(["ls", "/root/before-upgrade"]));
    assert_eq!(again, "/root/before-upgrade\n");
    assert_eq!(inspect(&container, "{{.Id}}"), id);

    // Remove: the daemon stops; config, state and her container stay.
    apt_ok(&["apt-get", "remove", "-y", "berth"]);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(second)),
        "the daemon still runs after remove"
    );
    assert!(!Path::new("/usr/bin/berth").exists());
    assert!(Path::new("/var/lib/berth/berth.db").exists());
    assert_eq!(
        std::fs::read_to_string("/etc/berth/berth.toml").unwrap(),
        config
    );
    assert_eq!(inspect(&container, "{{.Id}}"), id);
    let instance = std::fs::read_to_string("/var/lib/berth/instance").unwrap();

    // Purge: config and state go; her container stays, and the admin is told how to remove it.
    let out = apt_ok(&["apt-get", "purge", "-y", "berth"]);
    assert!(!Path::new("/etc/berth").exists(), "{out}");
    assert!(!Path::new("/var/lib/berth").exists(), "{out}");
    assert_eq!(
        inspect(&container, "{{.Id}}"),
        id,
        "purge removed a user's container"
    );
    assert!(
        out.contains(&format!(
            "docker rm -f $(docker ps -aq --filter label=berth.instance={})",
            instance.trim()
        )),
        "{out}"
    );
    let left = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "berth"])
        .output()
        .unwrap();
    assert!(
        !left.status.success() || text(&left.stdout).contains("not-installed"),
        "{}",
        show(&left)
    );
}

/// The release tarball: both binaries static, the files it promises, and its install.sh
/// installing from it (man pages and completions too) with no Rust toolchain to be found.
#[test]
fn the_tarball_installs_without_a_rust_toolchain() {
    if let Some(why) = unmet() {
        return skip("the_tarball_installs_without_a_rust_toolchain", &why);
    }
    ensure_images();
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(&b.tarball)
            .arg("-C")
            .arg(dir.path()),
    );
    let top = dir.path().join(format!("berth-{}-x86_64-linux", b.version));
    let listing = run_ok(Command::new("tar").arg("-tzf").arg(&b.tarball));
    for f in [
        "berth",
        "berth-guest",
        "install.sh",
        "berth.service",
        "berth.toml",
        "README.md",
        "man/berth.1",
        "man/berth.toml.5",
        "completions/berth.bash",
        "completions/_berth",
        "completions/berth.fish",
    ] {
        let path = format!("berth-{}-x86_64-linux/{f}", b.version);
        assert!(
            listing.lines().any(|l| l == path),
            "{path} missing:\n{listing}"
        );
    }
    for bin in ["berth", "berth-guest"] {
        let headers = run_ok(Command::new("readelf").arg("-lW").arg(top.join(bin)));
        assert!(
            !headers.contains("INTERP"),
            "{bin} is not static:\n{headers}"
        );
        let sections = run_ok(Command::new("readelf").arg("-SW").arg(top.join(bin)));
        assert!(!sections.contains(".debug_info"), "{bin} is not stripped");
    }

    // install.sh from the unpacked tarball, into a temporary root, with a PATH and HOME where
    // no cargo can be found.
    let root = tempfile::Builder::new()
        .prefix("berth-tar-")
        .tempdir()
        .unwrap();
    let port = free_port();
    let install = |args: &[&str]| {
        run(Command::new(top.join("install.sh"))
            .args(args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", root.path())
            .env("BERTH_ROOT", root.path())
            .env("BERTH_NO_SYSTEMD", "1")
            .env("BERTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("BERTH_DEFAULT_IMAGE", BUSYBOX))
    };
    let at = |p: &str| root.path().join(p.trim_start_matches('/'));
    let o = install(&[]);
    let pid = std::fs::read_to_string(at("/var/lib/berth/berth.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    let stop = |pid: Option<i32>| {
        if let Some(pid) = pid.filter(|&p| alive(p)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            wait_until(Duration::from_secs(10), || !alive(pid));
        }
    };
    if !o.status.success() {
        stop(pid);
        panic!("install.sh from the tarball: {}", show(&o));
    }
    let out = text(&o.stdout);
    let checks = || {
        assert!(!out.contains("building"), "{out}");
        assert_eq!(
            std::fs::read(at("/usr/local/bin/berth")).unwrap(),
            std::fs::read(top.join("berth")).unwrap()
        );
        for (file, shipped) in [
            ("/usr/local/share/man/man1/berth.1", "man/berth.1"),
            ("/usr/local/share/man/man5/berth.toml.5", "man/berth.toml.5"),
            (
                "/usr/local/share/bash-completion/completions/berth",
                "completions/berth.bash",
            ),
            (
                "/usr/local/share/zsh/site-functions/_berth",
                "completions/_berth",
            ),
            (
                "/usr/local/share/fish/vendor_completions.d/berth.fish",
                "completions/berth.fish",
            ),
        ] {
            assert_eq!(
                std::fs::read_to_string(at(file)).unwrap(),
                std::fs::read_to_string(top.join(shipped)).unwrap(),
                "{file}"
            );
            assert_eq!(mode(&at(file)), 0o644, "{file}");
        }
        assert!(out.contains("manuals: installed berth(1)"), "{out}");
        let ran = Command::new(at("/usr/local/bin/berth"))
            .arg("--state-dir")
            .arg(at("/var/lib/berth"))
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(ran.status.success(), "{}", show(&ran));
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks));
    let o = install(&["--uninstall", "--purge", "--yes"]);
    stop(pid);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(o.status.success(), "{}", show(&o));
    assert!(text(&o.stdout).contains("manuals: removed"), "{}", show(&o));
    assert!(!at("/usr/local/share/man/man1/berth.1").exists());
}
