//! End-to-end: `berth connect` — a laptop directory at the same path in the user's
//! container, the command run there, and the mount gone when the laptop goes. The "laptop"
//! is this machine's stock `ssh` driven by the real `berth` binary; the daemon, Docker and
//! the container are real.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn start() -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    )
}

/// `berth connect` to `user` on `d` with `key`, mounting `dirs`; the command goes after.
fn connect(d: &Daemon, user: &str, key: &Path, dirs: &[&Path]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("connect");
    let args = d.ssh_args(key);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-p" => {
                c.arg("-P").arg(it.next().unwrap());
            }
            "-i" => {
                c.arg("-i").arg(it.next().unwrap());
            }
            "-o" => {
                c.arg("-o").arg(it.next().unwrap());
            }
            other => panic!("unexpected ssh argument {other}"),
        }
    }
    for dir in dirs {
        c.arg("--mount").arg(dir);
    }
    c.arg(format!("{user}@127.0.0.1"));
    c
}

/// The mount points of the user's container, as its kernel lists them.
fn mounts_in(d: &Daemon, user: &str) -> String {
    let out = Command::new("docker")
        .args(["exec", &d.container_name(user), "cat", "/proc/mounts"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/proc/mounts` escapes a space as `\040`.
fn in_mounts(mounts: &str, path: &Path) -> bool {
    let escaped = path.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&escaped))
}

fn laptop_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::Builder::new()
        .prefix("laptop-")
        .tempdir()
        .unwrap();
    let dir = top.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    (top, dir)
}

fn run(c: &mut Command) -> Output {
    let out = c.stdin(Stdio::null()).output().unwrap();
    eprintln!(
        "connect: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `berth connect` left running; killed (its whole process group) when dropped.
struct Running(Child);

impl Running {
    fn spawn(c: &mut Command) -> Self {
        Self(
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .process_group(0)
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The group is the one this test made (process_group(0) above).
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }
}

#[test]
fn a_laptop_directory_appears_at_its_own_path_and_the_command_runs_there() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let (_top, dir) = laptop_dir("my src é");
    std::fs::write(dir.join("in.txt"), "from the laptop\n").unwrap();

    let out = run(connect(&d, "alice", &key, &[&dir])
        .arg("--")
        .arg("pwd; cat in.txt; echo made > out.txt; exit 7"));
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's exit code is connect's"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("{}\n", dir.display())), "{stdout}");
    assert!(stdout.contains("from the laptop"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(dir.join("out.txt")).unwrap(),
        "made\n"
    );

    // Gone with connect; the audit log has both ends.
    assert!(
        wait_until(Duration::from_secs(15), || !in_mounts(
            &mounts_in(&d, "alice"),
            &dir
        )),
        "the mount outlived connect: {}",
        mounts_in(&d, "alice")
    );
    let audit = d.audit();
    let shown = dir.display().to_string();
    for event in ["mount_start", "mount_end"] {
        assert!(
            audit.iter().any(|r| r["event"] == event
                && r["user"] == "alice"
                && r["path"] == shown.as_str()),
            "no {event} for {shown}"
        );
    }
    // The container was given nothing to mount with.
    let inspect: serde_json::Value = serde_json::from_str(&berth_testkit::docker(&[
        "inspect",
        &d.container_name("alice"),
    ]))
    .unwrap();
    let host = &inspect[0]["HostConfig"];
    assert_eq!(host["Privileged"], false);
    assert!(
        host["CapAdd"].is_null() || host["CapAdd"] == serde_json::json!([]),
        "{host}"
    );
    assert!(
        host["Devices"].is_null() || host["Devices"] == serde_json::json!([]),
        "{host}"
    );
}

#[test]
fn ordinary_tools_work_on_the_mounted_tree() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let (_top, dir) = laptop_dir("work");
    // A tar made on the laptop, to unpack in the container.
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("a/b/c.txt"), "deep\n").unwrap();
    std::fs::write(src.join("top.txt"), "top\n").unwrap();
    let tar = Command::new("tar")
        .arg("-cf")
        .arg(dir.join("tree.tar"))
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());

    let script = r#"set -e
echo one > f
echo two >> f
printf abcdef > t
truncate -s 3 t
echo new > n
echo old > o
mv n o
mkdir -p d/e
rmdir d/e
[ "$(ls -a d | tr '\n' ' ')" = ". .. " ]
ln -s f link
[ "$(readlink link)" = f ]
[ "$(cat link)" = "one
two" ]
chmod 600 f
[ "$(stat -c %a f)" = 600 ]
touch -d '2020-01-02 03:04:05' f
dd if=/dev/zero of=big bs=1 count=1 seek=5368709120 2>/dev/null
[ "$(stat -c %s big)" = 5368709121 ]
mkdir x
tar -xf tree.tar -C x
[ "$(cat x/a/b/c.txt)" = deep ]
echo gone > rm-me
rm rm-me
ls -la > listing
echo ok"#;
    let out = run(connect(&d, "alice", &key, &[&dir]).arg("--").arg(script));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("ok\n"));

    // Everything happened on the laptop's disk.
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
    assert_eq!(read("f"), "one\ntwo\n");
    assert_eq!(read("t"), "abc");
    assert_eq!(read("o"), "new\n");
    assert!(!dir.join("n").exists() && !dir.join("rm-me").exists());
    assert!(dir.join("d").is_dir() && !dir.join("d/e").exists());
    assert_eq!(
        std::fs::read_link(dir.join("link")).unwrap(),
        Path::new("f")
    );
    let f = std::fs::metadata(dir.join("f")).unwrap();
    assert_eq!(f.permissions().mode() & 0o777, 0o600);
    // The container's clock zone is UTC, as the test's.
    assert_eq!(f.mtime(), 1_577_934_245);
    assert_eq!(
        std::fs::metadata(dir.join("big")).unwrap().len(),
        5_368_709_121
    );
    assert_eq!(read("x/a/b/c.txt"), "deep\n");
    assert_eq!(read("x/top.txt"), "top\n");
    // Files made in the container belong to the laptop's user (here the test's own).
    assert_eq!(f.uid(), nix::unistd::getuid().as_raw());
}

#[test]
fn the_mount_goes_when_the_laptop_process_is_killed_and_bob_is_fine_meanwhile() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    d.ssh_ok("bob", &kb, "true");
    let (_top, one) = laptop_dir("one");
    let (_top2, two) = laptop_dir("two");
    std::fs::write(one.join("x"), "1").unwrap();
    std::fs::write(two.join("y"), "2").unwrap();

    // Two connects of the same user at once, with different directories.
    let first = Running::spawn(
        connect(&d, "alice", &key, &[&one])
            .arg("--")
            .arg("sleep 300"),
    );
    let second = Running::spawn(
        connect(&d, "alice", &key, &[&two])
            .arg("--")
            .arg("sleep 300"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            let m = mounts_in(&d, "alice");
            in_mounts(&m, &one) && in_mounts(&m, &two)
        }),
        "{}",
        mounts_in(&d, "alice")
    );
    assert_eq!(
        d.ssh_ok(
            "alice",
            &key,
            &format!("cat '{}/x' '{}/y'", one.display(), two.display())
        ),
        "12"
    );
    // Another user sees neither; the host has no trace of either.
    assert!(!in_mounts(&mounts_in(&d, "bob"), &one));
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains(&*one.to_string_lossy()) && !host.contains("berth-connect"),
        "{host}"
    );
    // Each mount is a session, shown with its path.
    let sessions = d.berth_ok(&["session", "list"]);
    for dir in [&one, &two] {
        let shown = format!("berth connect {:?}", dir.display().to_string());
        assert!(sessions.contains(&shown), "{shown} in {sessions}");
    }

    // The first laptop stops answering: a reader in the container waits on it, bob does not.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let mut stuck = d
        .ssh("alice", &key)
        .arg(format!("cat '{}/x'; echo \"status $?\"", one.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        let t = Instant::now();
        d.ssh_ok("bob", &kb, "true");
        // Stuck behind alice's mount he would wait until her laptop is killed: forever.
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "bob waited {:?}",
            t.elapsed()
        );
    }
    d.berth_ok(&["status"]);

    // Killed for good: the mount leaves the container, the reader gets an error, the other
    // mount stays.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(first.pid()),
        nix::sys::signal::Signal::SIGCONT,
    )
    .ok();
    assert!(
        wait_until(Duration::from_secs(30), || !in_mounts(
            &mounts_in(&d, "alice"),
            &one
        )),
        "{}",
        mounts_in(&d, "alice")
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = stuck.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a reader of the gone mount hangs"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut said = String::new();
    stuck
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("status 1"), "the read did not fail: {said}");
    assert!(in_mounts(&mounts_in(&d, "alice"), &two));
    drop(second);
    drop(first);
    assert!(wait_until(Duration::from_secs(30), || !in_mounts(
        &mounts_in(&d, "alice"),
        &two
    )));
}

#[test]
fn paths_that_would_shadow_the_system_are_refused_and_change_nothing() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    // On the laptop: said before any connection.
    let out = run(connect(&d, "alice", &key, &[Path::new("/etc")])
        .arg("--")
        .arg("true"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error:") && err.contains("/etc") && err.contains("system"),
        "{err}"
    );
    let out = run(connect(&d, "alice", &key, &[Path::new("/no/such/dir")])
        .arg("--")
        .arg("true"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !d.audit().iter().any(|r| r["event"] == "login_accepted"),
        "a refused path still connected"
    );

    // A client that is not berth asks the daemon for /proc/sys and for /.berth: refused,
    // with a reason, and nothing mounted.
    d.ssh_ok("alice", &key, "true");
    let before = mounts_in(&d, "alice");
    for path in ["/proc/sys", "/.berth/run", "relative"] {
        let hello = berth_connect::proto::encode(&berth_connect::proto::ToDaemon::Hello {
            version: berth_connect::proto::VERSION,
            path: path.as_bytes().to_vec(),
        })
        .unwrap();
        let mut framed = u32::try_from(hello.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&hello);
        let mut c = d
            .ssh("alice", &key)
            .arg("-s")
            .arg(berth_connect::proto::SUBSYSTEM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.as_mut().unwrap().write_all(&framed).unwrap();
        let out = c.wait_with_output().unwrap();
        let reply = out.stdout.get(4..).unwrap_or_default();
        let answer: berth_connect::proto::ToLaptop =
            berth_connect::proto::decode(reply).unwrap_or_else(|e| panic!("{path}: {e} {out:?}"));
        match answer {
            berth_connect::proto::ToLaptop::Refused { reason } => {
                assert!(!reason.is_empty(), "{path}");
            }
            other => panic!("{path} was not refused: {other:?}"),
        }
    }
    assert_eq!(mounts_in(&d, "alice"), before);
}

#[test]
fn a_laptop_user_without_root_mounts_and_owns_what_the_container_writes() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    // The laptop user is nobody (65534): her own key, directory and temporary files.
    let top = tempfile::Builder::new()
        .prefix("laptop-")
        .tempdir()
        .unwrap();
    let nobody = nix::unistd::Uid::from_raw(65534);
    let nogroup = nix::unistd::Gid::from_raw(65534);
    let dir = top.path().join("work");
    std::fs::create_dir(&dir).unwrap();
    let her_key = top.path().join("id");
    std::fs::copy(&key, &her_key).unwrap();
    for p in [top.path(), dir.as_path(), her_key.as_path()] {
        nix::unistd::chown(p, Some(nobody), Some(nogroup)).unwrap();
    }
    std::fs::set_permissions(&her_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700)).unwrap();

    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(BIN)
        .arg("connect")
        .args(["-P", &d.port.to_string(), "-i"])
        .arg(&her_key)
        .args(berth_testkit::THROWAWAY_SSH_OPTIONS)
        .arg("--mount")
        .arg(&dir)
        .arg("alice@127.0.0.1")
        .arg("--")
        .arg("echo hi > made; mkdir sub; id -u")
        .env("HOME", top.path())
        .env("TMPDIR", top.path()));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "root in the container"
    );
    for p in ["made", "sub"] {
        let m = std::fs::metadata(dir.join(p)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (65534, 65534),
            "{p} is the laptop user's"
        );
    }
    assert_eq!(std::fs::read_to_string(dir.join("made")).unwrap(), "hi\n");
}

#[test]
fn without_a_command_a_login_shell_opens_in_the_directory_on_a_terminal() {
    let d = start();
    let key = d.add_user("deb", berth_testkit::DEBIAN);
    let (_top, dir) = laptop_dir("shell");
    let mut line = vec![BIN.to_owned(), "connect".into()];
    let args = d.ssh_args(&key);
    for pair in args.chunks(2) {
        let flag = match pair[0].as_str() {
            "-p" => "-P",
            other => other,
        };
        line.push(flag.to_owned());
        line.push(format!("'{}'", pair[1]));
    }
    line.push("--mount".into());
    line.push(dir.display().to_string());
    line.push("deb@127.0.0.1".into());
    // Typed into the terminal once the shell is up; the size set before reaches it.
    let mut term = Command::new("timeout")
        .args(["90", "script", "-qec"])
        .arg(format!("stty cols 97 rows 31; {}", line.join(" ")))
        .arg("/dev/null")
        // With a display, the shell gets X11 forwarding (no X server needed to see that).
        .env("DISPLAY", ":77")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut typing = term.stdin.take().unwrap();
    let mut seen = String::new();
    let mut out = term.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = out.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    });
    std::thread::sleep(Duration::from_secs(8));
    typing
        .write_all(b"echo at=$(pwd) shell=$0 display=$DISPLAY; stty size; exit 3\n")
        .unwrap();
    let status = term.wait().unwrap();
    drop(typing);
    seen.push_str(&reader.join().unwrap());
    assert!(seen.contains(&format!("at={}", dir.display())), "{seen}");
    assert!(seen.contains("shell=/bin/bash"), "{seen}");
    assert!(seen.contains("31 97"), "{seen}");
    assert!(seen.contains("display=localhost:1"), "{seen}");
    assert_eq!(status.code(), Some(3), "{seen}");
}

#[test]
fn ctrl_c_ends_connect_and_takes_the_mount_away() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let (_top, dir) = laptop_dir("interrupted");
    let mut running = Running::spawn(
        connect(&d, "alice", &key, &[&dir])
            .arg("--")
            .arg("sleep 300"),
    );
    assert!(wait_until(Duration::from_secs(30), || in_mounts(
        &mounts_in(&d, "alice"),
        &dir
    )));
    // Ctrl-C on a terminal signals the whole foreground group: connect and its ssh.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(running.pid()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = running.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "connect did not end on Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status:?}");
    assert!(
        wait_until(Duration::from_secs(15), || !in_mounts(
            &mounts_in(&d, "alice"),
            &dir
        )),
        "{}",
        mounts_in(&d, "alice")
    );
}
