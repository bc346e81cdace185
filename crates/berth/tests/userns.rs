//! End-to-end: Berth works unchanged when Docker remaps container root to an unprivileged
//! host UID (`userns-remap`, issue 14 point 10), so that per-UID kernel limits are no longer
//! shared with the host's root. A second Docker engine, started by the test with
//! `--userns-remap=default` on its own socket and data root, runs the containers: logins
//! (command, terminal), the words socket and the container's init, agent and X11
//! forwarding, scp and sftp, `-L` and `-R` (ports and Unix sockets), and `commit`. Each
//! container still sees only its own run directory, although every container's root is the
//! same host UID. `berth status` and `berth daemon --check` say whether it is on.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_testkit::{
    BUSYBOX, DEBIAN, Daemon, DaemonOptions, EngineOptions, KillOnDrop, SecondEngine, free_port,
    in_terminal, wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn daemon(config: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 60,
            config: config.into(),
        },
    )
}

/// What `berth daemon --check` writes to stderr for this daemon's config.
fn check_stderr(d: &Daemon) -> String {
    let config = d.dir.path().join("berth.toml");
    let guest = berth_testkit::guest_binary();
    let o = d.berth(&[
        "daemon",
        "--check",
        "--config",
        config.to_str().unwrap(),
        "--guest-binary",
        guest.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// The line of `text` that starts with `prefix`.
fn line_of<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in: {text}"))
}

/// The host UID and GID that root of `container` (running) is: the first mapping of its
/// init's `uid_map` and `gid_map` for ID 0.
fn container_root_on_host(engine: &SecondEngine, container: &str) -> (u32, u32) {
    let pid = engine.docker_ok(&["inspect", "-f", "{{.State.Pid}}", container]);
    let first = |file: &str| -> u32 {
        let map = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
        let fields: Vec<u32> = map
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        assert_eq!(fields[0], 0, "{file}: {map}");
        fields[1]
    };
    (first("uid_map"), first("gid_map"))
}

/// A one-line TCP server on the client's side (the far end of `-R`).
fn client_side_server(text: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut s, text.as_bytes());
        }
    });
    port
}

/// Everything a connection to `127.0.0.1:port` reads.
fn read_port(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut out);
    out
}

/// A client-side `ssh-agent` holding one key; returns it, its socket and the key's
/// fingerprint.
fn agent_with_a_key(d: &Daemon) -> (KillOnDrop, std::path::PathBuf, String) {
    let sock = d.dir.path().join("agent.sock");
    let agent = KillOnDrop(
        Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let key = d.keygen("in-agent");
    let o = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fp = berth_testkit::fingerprint(&key);
    (agent, sock, fp)
}

/// The client's X server: Xvfb on a free display with its own cookie; returns it, the
/// display and the authority file.
fn x_server(d: &Daemon) -> (KillOnDrop, String, std::path::PathBuf) {
    let n = (120..200)
        .find(|n| !Path::new(&format!("/tmp/.X{n}-lock")).exists())
        .unwrap();
    let display = format!(":{n}");
    let auth = d.dir.path().join("Xauthority");
    let st = Command::new("xauth")
        .arg("-f")
        .arg(&auth)
        .args(["add", &display, ".", "0123456789abcdef0123456789abcdef"])
        .status()
        .unwrap();
    assert!(st.success());
    let xvfb = KillOnDrop(
        Command::new("Xvfb")
            .args([&display, "-nolisten", "tcp", "-auth"])
            .arg(&auth)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = format!("/tmp/.X11-unix/X{n}");
    assert!(wait_until(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    (xvfb, display, auth)
}

#[test]
fn berth_works_unchanged_when_docker_remaps_container_root() {
    let engine = match SecondEngine::start(&EngineOptions {
        quota_fs: None,
        args: vec!["--userns-remap=default".into()],
    }) {
        Ok(e) => e,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let security = engine.docker_ok(&["info", "-f", "{{json .SecurityOptions}}"]);
    assert!(security.contains("name=userns"), "{security}");
    berth_testkit::ensure_images();
    engine.import_image(DEBIAN);
    engine.import_image(BUSYBOX);
    let d = daemon(&format!(
        "docker_socket = \"{}\"\n",
        engine.socket().display()
    ));

    // The admin is told, in `status` and in `--check`.
    let status = d.berth_ok(&["status"]);
    let line = line_of(&status, "user namespaces: ");
    assert!(
        line.starts_with("user namespaces: on (userns-remap: container root is host UID "),
        "{line}"
    );
    assert_eq!(line_of(&check_stderr(&d), "user namespaces: "), line);

    let alice = d.add_user("alice", DEBIAN);
    let bob = d.add_user("bob", BUSYBOX);
    let ssh = |user: &str, key: &Path, cmd: &str| d.ssh_ok(user, key, cmd);

    // A command: root in her container, which is not root on the host.
    assert_eq!(ssh("alice", &alice, "id -u; echo hi"), "0\nhi\n");
    let (uid, gid) = container_root_on_host(&engine, &d.container_name("alice"));
    assert!(uid > 0 && gid > 0, "not remapped: {uid}:{gid}");
    assert!(line.contains(&format!("host UID {uid}")), "{line}");
    // Sessions are started by the container's init (its abstract socket), not the engine.
    assert!(
        d.log().contains("session started by the container's init"),
        "{}",
        d.log()
    );

    // A terminal: hers, as it is without a user namespace (root's, written to by root).
    let ssh_cmd = format!("ssh {}", d.ssh_args(&alice).join(" "));
    let out = in_terminal(
        &format!(
            "{ssh_cmd} -tt alice@127.0.0.1 'stat -c owner=%u $(tty); echo to-tty > $(tty) && echo wrote; id -u'"
        ),
        Duration::from_secs(30),
    );
    assert!(out.contains("owner=0"), "{out}");
    assert!(out.contains("to-tty") && out.contains("wrote"), "{out}");

    // The words socket in /.berth/run.
    assert_eq!(
        ssh(
            "alice",
            &alice,
            "daemon >/dev/null && nodaemon >/dev/null && echo ok"
        ),
        "ok\n"
    );

    // Agent forwarding: a socket only her container's root reaches, only in her container.
    let (_agent, agent_sock, fp) = agent_with_a_key(&d);
    let o = d
        .ssh("alice", &alice)
        .env("SSH_AUTH_SOCK", &agent_sock)
        .args(["-A", "ssh-add -l && stat -c %u:%a $SSH_AUTH_SOCK"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    assert!(out.contains(&fp), "{out}");
    assert!(out.ends_with("0:600\n"), "{out}");
    // While her agent socket exists, bob's container (whose root is the same host UID)
    // sees only its own run directory.
    let _held = KillOnDrop(
        d.ssh("alice", &alice)
            .env("SSH_AUTH_SOCK", &agent_sock)
            .args(["-A", "sleep 60"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let run = d.state_dir().join("run/alice");
    let agent_file = || {
        std::fs::read_dir(&run)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("agent-"))
    };
    assert!(wait_until(Duration::from_secs(20), || agent_file().is_some()));
    {
        use std::os::unix::fs::MetadataExt;
        let meta = agent_file().unwrap().metadata().unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
    }
    assert_eq!(ssh("bob", &bob, "ls -a /.berth/run"), ".\n..\nguest.sock\n");
    drop(_held);

    // X11 forwarding.
    let (_xvfb, display, auth) = x_server(&d);
    let o = d
        .ssh("alice", &alice)
        .env("DISPLAY", &display)
        .env("XAUTHORITY", &auth)
        .args(["-X", "xdpyinfo | grep 'name of display'"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("localhost:10.0"), "{out}");

    // scp and sftp, both ways.
    let mut opts = d.ssh_args(&alice);
    opts[0] = "-P".into();
    let up = d.dir.path().join("up.txt");
    std::fs::write(&up, "copied up\n").unwrap();
    let st = Command::new("scp")
        .args(&opts)
        .arg(&up)
        .arg("alice@127.0.0.1:/root/up.txt")
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(ssh("alice", &alice, "cat /root/up.txt"), "copied up\n");
    let batch = d.dir.path().join("batch");
    let down = d.dir.path().join("down.txt");
    std::fs::write(
        &batch,
        format!(
            "put {} /root/s.txt\nget /root/s.txt {}\n",
            up.display(),
            down.display()
        ),
    )
    .unwrap();
    let o = Command::new("sftp")
        .args(&opts)
        .arg("-b")
        .arg(&batch)
        .arg("alice@127.0.0.1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&down).unwrap(), "copied up\n");

    // -L to a port on bob's container's loopback.
    let _server = KillOnDrop(
        d.ssh("bob", &bob)
            .arg("echo from-container > /root/msg; while true; do nc -l -p 8080 < /root/msg; done")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || d.listening("bob", &bob, 8080)));
    let local = free_port();
    let _fwd = KillOnDrop(
        d.ssh("bob", &bob)
            .args([
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                &format!("127.0.0.1:{local}:localhost:8080"),
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || read_port(local)
        == "from-container\n"));

    // -R: a port and a Unix socket in her container that lead back to the client.
    let target = client_side_server("from-client\n");
    let mux_sock = d.dir.path().join("mux");
    let mux = |extra: &[&str]| {
        let mut c = d.ssh("alice", &alice);
        c.args(["-S", mux_sock.to_str().unwrap()]).args(extra);
        c.output().unwrap()
    };
    assert!(
        mux(&["-M", "-f", "-N", "-o", "ControlPersist=60"])
            .status
            .success()
    );
    let o = mux(&["-O", "forward", "-R", &format!("0:127.0.0.1:{target}")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let port: u16 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    assert_eq!(
        ssh(
            "alice",
            &alice,
            &format!(
                "perl -MIO::Socket::INET -e 'my $c = IO::Socket::INET->new(\"127.0.0.1:{port}\") or die \"connect: $!\\n\"; print while <$c>'"
            )
        ),
        "from-client\n"
    );
    let o = mux(&[
        "-O",
        "forward",
        "-R",
        &format!("/tmp/fwd.sock:127.0.0.1:{target}"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        ssh("alice", &alice, "stat -c %u:%a /tmp/fwd.sock"),
        "0:600\n"
    );
    assert_eq!(
        ssh(
            "alice",
            &alice,
            "perl -MIO::Socket::UNIX -e 'my $c = IO::Socket::UNIX->new(Peer => \"/tmp/fwd.sock\") or die \"connect: $!\\n\"; print while <$c>'"
        ),
        "from-client\n"
    );
    let _ = mux(&["-O", "exit"]);

    // commit: her container saved as her image; the next container, made from it, works.
    ssh("alice", &alice, "echo kept > /root/kept.txt");
    let saved = ssh("alice", &alice, "commit");
    assert!(saved.starts_with("sha256:"), "{saved}");
    engine.docker_ok(&["image", "inspect", &d.commit_image("alice")]);
    ssh("alice", &alice, "remove");
    assert_eq!(ssh("alice", &alice, "cat /root/kept.txt"), "kept\n");
    let out = in_terminal(
        &format!(
            "{ssh_cmd} -tt alice@127.0.0.1 'cat /root/kept.txt; echo to-tty > $(tty) && echo wrote'"
        ),
        Duration::from_secs(30),
    );
    assert!(out.contains("kept") && out.contains("wrote"), "{out}");
    drop(d);
    drop(engine);
}

#[test]
fn status_and_check_say_when_user_namespaces_are_off() {
    let remapped = berth_testkit::docker(&["info", "-f", "{{json .SecurityOptions}}"]);
    if remapped.contains("name=userns") {
        eprintln!("skipped: the host's engine remaps container root already");
        return;
    }
    let d = daemon("");
    let status = d.berth_ok(&["status"]);
    let line = line_of(&status, "user namespaces: ");
    assert_eq!(
        line,
        "user namespaces: off: container root is the host's root for per-UID kernel limits; \
         turn on userns-remap (see the README)"
    );
    assert_eq!(line_of(&check_stderr(&d), "user namespaces: "), line);
}
