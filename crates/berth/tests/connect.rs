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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_testkit::{BUSYBOX, fingerprint, wait_until};

mod common;
use common::*;

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
    expect_mounted(&d, "alice", &dir, false, Duration::from_secs(15));
    for event in ["mount_start", "mount_end"] {
        assert!(
            audited(&d, event, "alice", &dir),
            "no {event} for {}",
            dir.display()
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
    // Having opened a file, each mount reads ahead 4 MiB, not the kernel's 128 KiB for FUSE
    // (its backing device, named by the mount's device number).
    for dir in [&one, &two] {
        let dev: u64 = d
            .ssh_ok("alice", &key, &format!("stat -c %d '{}'", dir.display()))
            .trim()
            .parse()
            .unwrap();
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        let kb = std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
            .unwrap();
        assert_eq!(kb.trim(), "4096", "{}", dir.display());
    }
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
    let mut stuck = reader(&d, "alice", &key, &one.join("x"));
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        let t = Instant::now();
        d.ssh_ok("bob", &kb, "true");
        // Stuck behind alice's mount he would wait until her laptop is killed: forever.
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "bob waited {:?}",
            t.elapsed()
        );
    }
    // `berth status` answers meanwhile, and lists both mounts.
    let status = d.berth_ok(&["status"]);
    for dir in [&one, &two] {
        assert!(status.contains(&*dir.to_string_lossy()), "{status}");
    }

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
    expect_mounted(&d, "alice", &one, false, Duration::from_secs(30));
    let status = ends_within(
        &mut stuck,
        Duration::from_secs(40),
        "a reader of the gone mount hangs",
    );
    let mut said = String::new();
    stuck
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(status.success(), "{said}");
    assert!(said.contains("status 1"), "the read did not fail: {said}");
    assert!(
        audited(&d, "mount_end", "alice", &one),
        "no mount_end for the killed laptop's {}",
        one.display()
    );
    assert!(in_mounts(&mounts_in(&d, "alice"), &two));
    drop(second);
    drop(first);
    expect_mounted(&d, "alice", &two, false, Duration::from_secs(30));
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
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: /no/such/dir") && err.contains("No such file or directory"),
        "{err}"
    );
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
    let (top, dir) = laptop_dir("shell");
    // Made by the test once the first size is seen: the terminal is resized then.
    let resize = top.path().join("resize");
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
        // The terminal is made larger while the shell runs (`stty` on it, as a resized
        // window does: the kernel signals the foreground, connect's ssh among it).
        .arg(format!(
            "stty cols 97 rows 31; (while [ ! -e {flag} ]; do sleep 0.2; done; \
             stty cols 120 rows 40; touch {flag}.done) </dev/tty & {}",
            line.join(" "),
            flag = resize.display()
        ))
        .arg("/dev/null")
        // With a display, the shell gets X11 forwarding (no X server needed to see that).
        .env("DISPLAY", ":77")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut typing = term.stdin.take().unwrap();
    let mut out = term.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let shown = |what: &str| seen.lock().unwrap().contains(what);
    std::thread::sleep(Duration::from_secs(8));
    typing
        .write_all(b"echo at=$(pwd) shell=$0 display=$DISPLAY; stty size\n")
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || shown("31 97")),
        "{}",
        seen.lock().unwrap()
    );
    std::fs::write(&resize, "").unwrap();
    let resized = top.path().join("resize.done");
    assert!(wait_until(Duration::from_secs(20), || resized.exists()));
    typing.write_all(b"stty size; exit 3\n").unwrap();
    let status = term.wait().unwrap();
    drop(typing);
    reader.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&format!("at={}", dir.display())), "{seen}");
    assert!(seen.contains("shell=/bin/bash"), "{seen}");
    assert!(seen.contains("31 97"), "{seen}");
    assert!(
        seen.contains("40 120"),
        "the resize did not reach the shell: {seen}"
    );
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
    expect_mounted(&d, "alice", &dir, true, Duration::from_secs(30));
    // Ctrl-C on a terminal signals the whole foreground group: connect and its ssh.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(running.pid()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = running.ends_within(Duration::from_secs(20), "connect did not end on Ctrl-C");
    assert!(!status.success(), "{status:?}");
    expect_mounted(&d, "alice", &dir, false, Duration::from_secs(15));
}

#[test]
fn output_streams_while_the_command_runs_and_the_container_stops_after_grace() {
    // Idle containers stop 3 s after their last session.
    let d = start_with(3, "");
    let key = d.add_user("alice", BUSYBOX);
    let (_top, dir) = laptop_dir("stream");
    let mut c = connect(&d, "alice", &key, &[&dir]);
    let mut running = c
        .arg("--")
        .arg("echo first; echo to-stderr >&2; sleep 20; echo second; exit 4")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let spawned = Instant::now();
    let mut out = std::io::BufReader::new(running.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "first\n");
    // The command sleeps 20 s after it: the line came while it ran.
    assert!(
        spawned.elapsed() < Duration::from_secs(15) && running.try_wait().unwrap().is_none(),
        "the first line came only at the end ({:?})",
        spawned.elapsed()
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    running
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(running.wait().unwrap().code(), Some(4));
    assert_eq!(rest, "second\n");
    assert!(err.contains("to-stderr\n"), "{err}");

    // The mount went with connect; with no session left the container stops, as after a
    // logout.
    expect_mounted(&d, "alice", &dir, false, Duration::from_secs(15));
    stops_by_itself(&d, "alice");
}

#[test]
fn git_and_make_work_in_the_mounted_tree_and_the_laptop_sees_their_work() {
    let d = start();
    let key = d.add_user("deb", berth_testkit::DEBIAN);
    let (_top, dir) = laptop_dir("project");
    std::fs::write(dir.join("in.txt"), "source\n").unwrap();
    std::fs::write(dir.join("Makefile"), "out: in.txt\n\tcp in.txt out\n").unwrap();
    std::fs::write(dir.join(".gitignore"), "out\n").unwrap();
    let script = r#"set -e
git init -q
git add -A
git -c user.name=Alice -c user.email=alice@example.org commit -qm first
make
make
# The laptop's clock for file times moves by ticks: a change within the tick of `out`'s
# making would leave both the same time, and make rightly sees nothing to do.
sleep 1
echo changed >> in.txt
git status --porcelain
make
git -c user.name=Alice -c user.email=alice@example.org commit -qam second
git status --porcelain
echo ok"#;
    let out = run(connect(&d, "deb", &key, &[&dir]).arg("--").arg(script));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("'out' is up to date"), "{stdout}");
    assert!(stdout.contains(" M in.txt\n"), "{stdout}");
    assert!(stdout.ends_with("ok\n"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(dir.join("out")).unwrap(),
        "source\nchanged\n"
    );
    // The repository is the laptop's: its own git reads both commits, and nothing is
    // left to commit.
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(git(&["log", "--format=%s"]), "second\nfirst\n");
    assert_eq!(git(&["status", "--porcelain"]), "");
}

/// An OpenSSH `sshd` on loopback for root with `authorized` keys: a jump host.
struct JumpHost {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl JumpHost {
    fn start(dir: &Path, authorized: &Path) -> Self {
        let host_key = berth_testkit::keygen_at(&dir.join("host_key"), "jump");
        let port = berth_testkit::free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\n\
                 AuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 AllowTcpForwarding yes\nLogLevel VERBOSE\n",
                host_key.display(),
                authorized.display()
            ),
        )
        .unwrap();
        // sshd insists on its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut me = Self { child, port, log };
        // Its own "listening" line, and still running (not another's listener on the port).
        assert!(
            wait_until(Duration::from_secs(20), || std::fs::read_to_string(&me.log)
                .unwrap_or_default()
                .contains(&format!("Server listening on 127.0.0.1 port {port}"))),
            "sshd did not start: {}",
            std::fs::read_to_string(&me.log).unwrap_or_default()
        );
        assert!(me.child.try_wait().unwrap().is_none());
        me
    }
}

impl Drop for JumpHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_users_own_ssh_applies_config_agent_and_jump_host_with_the_original_flags() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let (top, dir) = laptop_dir("via jump");
    let home = top.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    // The key is in an agent only: no -i, no key file where ssh looks by itself.
    let agent_sock = top.path().join("agent.sock");
    let mut agent = berth_testkit::KillOnDrop(
        Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&agent_sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || agent_sock.exists()));
    let added = Command::new("ssh-add")
        .arg("-q")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &agent_sock)
        .status()
        .unwrap();
    assert!(added.success());
    let jump = JumpHost::start(top.path(), &key.with_extension("pub"));
    // The server's port and the jump host come from ~/.ssh/config, under a name of its own.
    let quiet = format!(
        "  StrictHostKeyChecking no\n  UserKnownHostsFile {}\n  LogLevel ERROR\n  BatchMode yes\n",
        top.path().join("known_hosts").display()
    );
    std::fs::write(
        home.join(".ssh/config"),
        format!(
            "Host berth-box\n  HostName 127.0.0.1\n  Port {}\n  ProxyJump jumper\n{quiet}\
             Host jumper\n  HostName 127.0.0.1\n  Port {}\n  User root\n{quiet}",
            d.port, jump.port
        ),
    )
    .unwrap();
    // Run as `connect` (a link named like the original tool) with its flags.
    let link = top.path().join("connect");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    // ssh reads the config of the user's home from the password database (/root here):
    // this connect alone sees the test's home there, in a mount namespace of its own.
    let out = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$0\" /root && exec \"$@\"")
        .arg(&home)
        .arg(&link)
        .args(["-u", "alice", "-h", "berth-box", "-p"])
        .arg(&dir)
        .args(["-m", "echo jumped > proof; pwd"])
        .env("SSH_AUTH_SOCK", &agent_sock)
        .env_remove("DISPLAY"));
    let _ = agent.0.kill();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&*dir.to_string_lossy()),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("proof")).unwrap(),
        "jumped\n"
    );
    // The jump host let the agent's key in: the one alice's own.
    let fingerprint = fingerprint(&key);
    let log = std::fs::read_to_string(&jump.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("Accepted publickey for root") && l.contains(&fingerprint)),
        "the jump host was not used with the agent's key {fingerprint}: {log}"
    );
}
