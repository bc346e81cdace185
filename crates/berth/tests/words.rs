//! End-to-end: the seed's words. Host-side (`commit`, `stop`, `remove`, `port`, `freeport`,
//! `status`, `help`) and inside the container (`daemon`, `nodaemon`, `stopnow`), in a
//! busybox image, with the real ssh client and real Docker.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, docker, docker_output, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn start(idle: u64) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: idle,
            config: String::new(),
        },
    )
}

fn sessions(d: &Daemon, user: &str) -> u64 {
    d.user(user)["sessions"].as_u64().unwrap()
}

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn commit_then_remove_then_login_finds_the_file() {
    let d = start(30);
    let key = d.add_user("alice", BUSYBOX);
    // Nothing to commit before the first login.
    let o = d.ssh_run("alice", &key, "commit", b"");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        err(&o),
        "berth: commit failed: there is no container to commit yet; log in once to create it\n"
    );
    // A long session stays open across the commit: it ends when told to (a file appears),
    // however long the commit takes on a busy engine.
    let long = d
        .ssh("alice", &key)
        .arg("i=0; until [ -e /tmp/go ] || [ $i -ge 1200 ]; do sleep 0.1; i=$((i+1)); done; echo survived")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || sessions(
        &d, "alice"
    ) == 1));
    d.ssh_ok("alice", &key, "echo kept > /root/kept.txt");
    let o = d.ssh_run("alice", &key, "commit", b"");
    assert!(o.status.success(), "{}", err(&o));
    let id = out(&o).trim().to_owned();
    assert!(id.starts_with("sha256:"), "{id}");
    // "saved your container as IMAGE (N B added, SIZE in all, L layers); ..."
    let said = err(&o);
    let image = d.commit_image("alice");
    assert!(
        said.starts_with(&format!("saved your container as {image} ("))
            && said.contains(" added, ")
            && said.contains(" layers); ")
            && said.ends_with("; your next new container is made from it\n"),
        "{said}"
    );
    assert_eq!(
        docker(&[
            "image",
            "inspect",
            "-f",
            "{{.Id}}",
            &d.commit_image("alice")
        ]),
        id
    );
    assert_eq!(d.user("alice")["committed_image"], d.commit_image("alice"));
    // The commit left the session count alone: the long session is still the one.
    assert_eq!(sessions(&d, "alice"), 1);
    d.ssh_ok("alice", &key, "touch /tmp/go");
    assert_eq!(
        String::from_utf8_lossy(&long.wait_with_output().unwrap().stdout),
        "survived\n"
    );
    assert!(wait_until(Duration::from_secs(10), || sessions(
        &d, "alice"
    ) == 0));
    // remove: the container goes, the image stays, the next login makes a new container from it.
    let before = docker(&["inspect", "-f", "{{.Id}}", &d.container_name("alice")]);
    let o = d.ssh_run("alice", &key, "remove", b"");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "removed your container; your next login creates a fresh one from your image\n"
    );
    assert!(d.container_state("alice").is_none());
    assert_eq!(d.ssh_ok("alice", &key, "cat /root/kept.txt"), "kept\n");
    let after = docker(&[
        "inspect",
        "-f",
        "{{.Id}} {{.Config.Image}}",
        &d.container_name("alice"),
    ]);
    assert!(!after.starts_with(&before), "same container after remove");
    assert!(after.ends_with(&d.commit_image("alice")), "{after}");
    // user rm removes the committed image too.
    d.berth_ok(&["user", "rm", "alice"]);
    assert!(
        !docker_output(&["image", "inspect", &d.commit_image("alice")])
            .status
            .success()
    );
    assert_eq!(sessions_of_all(&d), 0);
}

fn sessions_of_all(d: &Daemon) -> usize {
    d.users().len()
}

#[test]
fn user_rm_keep_image_keeps_it() {
    let d = start(30);
    let key = d.add_user("bob", BUSYBOX);
    d.ssh_ok("bob", &key, "true");
    d.ssh_ok("bob", &key, "commit");
    let o = d.berth(&["user", "rm", "bob", "--keep-image"]);
    assert!(o.status.success());
    assert_eq!(
        err(&o),
        format!(
            "removed user bob and their container; kept image {}\n\
             kept their home volume {p}home-bob (berth user add bob gives it back; \
             docker volume rm {p}home-bob deletes it)\n",
            d.commit_image("bob"),
            p = d.prefix
        )
    );
    assert!(
        docker_output(&["image", "inspect", &d.commit_image("bob")])
            .status
            .success()
    );
}

#[test]
fn stop_ends_open_sessions_and_counts_stay_right() {
    let d = start(30);
    let key = d.add_user("alice", BUSYBOX);
    let long = d
        .ssh("alice", &key)
        .arg("sleep 100")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || sessions(
        &d, "alice"
    ) == 1));
    let o = d.ssh_run("alice", &key, "stop", b"");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "stopped your container\n");
    let st = long.wait_with_output().unwrap();
    assert_ne!(st.status.code(), Some(0));
    assert_eq!(d.container_state("alice").as_deref(), Some("exited"));
    assert!(wait_until(Duration::from_secs(10), || sessions(
        &d, "alice"
    ) == 0));
    assert_eq!(
        d.ssh_ok("alice", &key, "stop"),
        "your container is not running\n"
    );
    // And the next login starts it again.
    assert_eq!(d.ssh_ok("alice", &key, "echo up"), "up\n");
}

#[test]
fn a_login_racing_a_stop_gets_a_running_container() {
    let d = start(30);
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &key, "true");
    for round in 0..4 {
        let stop = d
            .ssh("alice", &key)
            .arg("stop")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let logins: Vec<_> = (0..3)
            .map(|i| {
                d.ssh("alice", &key)
                    .arg(format!("echo r{round}l{i}"))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        assert!(stop.wait_with_output().unwrap().status.success());
        for (i, l) in logins.into_iter().enumerate() {
            let o = l.wait_with_output().unwrap();
            // A login is served before or after the stop, never half-way: either it ran, or
            // the stop ended it (then it was running, and exits by signal/255).
            if o.status.success() {
                assert_eq!(out(&o), format!("r{round}l{i}\n"));
            }
        }
        // Whatever the order, a login right after works.
        assert_eq!(d.ssh_ok("alice", &key, "echo after"), "after\n");
    }
    assert!(wait_until(Duration::from_secs(10), || sessions(
        &d, "alice"
    ) == 0));
}

#[test]
fn port_freeport_status_help() {
    let d = start(30);
    let key = d.add_user("alice", BUSYBOX);
    assert_eq!(d.ssh_ok("alice", &key, "port"), format!("{}\n", d.port));
    assert_eq!(
        d.ssh_ok("alice", &key, "echo $SSH_PORT"),
        format!("{}\n", d.port)
    );
    let p: u16 = d.ssh_ok("alice", &key, "freeport").trim().parse().unwrap();
    assert!(p >= 49152, "{p}");
    // The port can be bound in the container.
    let o = d.ssh_run(
        "alice",
        &key,
        &format!("nc -l -p {p} & sleep 0.5; cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -ci ':{p:04X} '; kill $!"),
        b"",
    );
    assert_eq!(out(&o).trim(), "1", "{}", err(&o));
    let status = d.ssh_ok("alice", &key, "status");
    assert_eq!(
        status,
        format!(
            "container: {} (running)\nsessions: 0\ndaemon mode: off\nimage: {BUSYBOX}\n",
            d.container_name("alice")
        )
    );
    let help = d.ssh_ok("alice", &key, "help");
    for w in [
        "commit", "stop", "remove", "port", "freeport", "status", "daemon", "nodaemon", "stopnow",
    ] {
        assert!(help.contains(&format!("  {w} ")), "{help}");
    }
    // Not the whole command: runs in the container.
    let o = d.ssh_run("alice", &key, "status now", b"");
    assert_eq!(o.status.code(), Some(127));
}

#[test]
fn daemon_mode_holds_past_grace_and_restart_and_nodaemon_lets_go() {
    let mut d = start(1);
    let key = d.add_user("alice", BUSYBOX);
    let o = d.ssh_run("alice", &key, "daemon", b"");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "daemon mode on: your container keeps running when no session is open\n"
    );
    assert_eq!(d.user("alice")["daemon_mode"], true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
    // Across a daemon restart too (the mode lives in the store).
    d.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
    // The guest socket works again after the restart: nodaemon, then it stops.
    let o = d.ssh_run("alice", &key, "nodaemon", b"");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "daemon mode off: your container stops 1 s after your last session ends\n"
    );
    assert!(wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    assert_eq!(d.user("alice")["daemon_mode"], false);
}

#[test]
fn stopnow_ends_a_running_shell() {
    let d = start(30);
    let key = d.add_user("alice", BUSYBOX);
    let shell = d
        .ssh("alice", &key)
        .arg("-tt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || sessions(
        &d, "alice"
    ) == 1));
    let o = d.ssh_run("alice", &key, "stopnow", b"");
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "stopping your container; every session in it ends\n"
    );
    let st = shell.wait_with_output().unwrap();
    assert_ne!(st.status.code(), Some(0));
    assert!(wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    assert!(wait_until(Duration::from_secs(10), || sessions(
        &d, "alice"
    ) == 0));
}

#[test]
fn the_guest_socket_takes_no_orders_it_does_not_know() {
    let d = start(30);
    let key = d.add_user("alice", BUSYBOX);
    // Only this container's socket is mounted, read-only.
    let o = d.ssh_run(
        "alice",
        &key,
        "ls /.berth/run; rm -f /.berth/run/guest.sock; ls /.berth/run",
        b"",
    );
    assert_eq!(out(&o), "guest.sock\nguest.sock\n", "{}", err(&o));
    // Garbage, an unknown word, a very long line, a word naming another user: each gets an
    // error line and the daemon stays up. (Sent from the host to the same socket: busybox
    // has no unix-socket client, and the server cannot tell the difference anyway.)
    let sock = d.state_dir().join("run/alice/guest.sock");
    let long = vec![b'a'; 100_000];
    for payload in [
        &b"rm -rf /\n"[..],
        b"daemon bob\n",
        &long,
        b"\0\xff\n",
        b"daemon",
    ] {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(payload);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert_eq!(
            reply,
            "error unknown request; expected daemon, nodaemon or stopnow\n",
            "{:?}",
            &payload[..payload.len().min(20)]
        );
    }
    assert_eq!(d.user("alice")["daemon_mode"], false);
    assert_eq!(
        d.ssh_ok("alice", &key, "daemon >/dev/null && echo ok"),
        "ok\n"
    );
    // The commands take no arguments.
    let o = d.ssh_run("alice", &key, "daemon bob", b"");
    assert_eq!(o.status.code(), Some(2));
}

/// A sparse file takes no room in her container, but a commit copies it in full, into an
/// image under no quota, on the disk every user's containers are on: a commit that would
/// not fit is refused, saying why, and saves nothing.
#[test]
fn a_commit_that_would_not_fit_is_refused_and_saves_nothing() {
    let d = start(30);
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok(
        "alice",
        &key,
        "truncate -s 10995116277760 /big && ls -l /big",
    );
    let o = d.ssh_run("alice", &key, "commit", b"");
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let said = err(&o);
    assert!(
        said.starts_with("berth: commit failed: your container's changes come to ")
            && said.contains("counted in full")
            && said.contains("nothing was saved"),
        "{said}"
    );
    assert_eq!(
        docker(&["images", "-q", &d.commit_image("alice")]).trim(),
        "",
        "an image was made"
    );
    // Without it, the commit goes through.
    d.ssh_ok("alice", &key, "rm /big");
    let o = d.ssh_run("alice", &key, "commit", b"");
    assert!(o.status.success(), "{}", err(&o));
}
