//! End-to-end: `ssh -L` lands inside the user's own container, never on the host.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, KillOnDrop, free_port, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// Starts `ssh -N -L LOCAL:target` and waits until the local port listens.
fn forward(d: &Daemon, key: &Path, target: &str) -> (KillOnDrop, u16) {
    let local = free_port();
    let child = d
        .ssh("alice", key)
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("127.0.0.1:{local}:{target}"),
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let ok = wait_until(Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", local)).is_ok()
    });
    assert!(ok, "ssh -L did not start listening");
    (KillOnDrop(child), local)
}

fn read_all(port: u16) -> String {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    read_to_end(s)
}

/// Everything `s` gives until its end (or its read timeout).
fn read_to_end(mut s: impl Read) -> String {
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn local_forward_reaches_the_containers_localhost_only() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    // A server on the container's loopback, kept up by its session.
    let _server = KillOnDrop(
        d.ssh("alice", &key)
            .arg("echo from-container > /root/msg; while true; do nc -l -p 8080 < /root/msg; done")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        d.listening("alice", &key, 8080)
    }));
    let (_fwd, local) = forward(&d, &key, "localhost:8080");
    // (The readiness probe above used one of the server's connections; it restarts.)
    assert!(wait_until(Duration::from_secs(10), || read_all(local)
        == "from-container\n"));

    // A port only the host listens on: `localhost` is the container, so it is not reached.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    host.set_nonblocking(true).unwrap();
    let hport = host.local_addr().unwrap().port();
    let (_fwd2, local2) = forward(&d, &key, &format!("localhost:{hport}"));
    assert_eq!(read_all(local2), "");
    let (_fwd3, local3) = forward(&d, &key, &format!("127.0.0.1:{hport}"));
    assert_eq!(read_all(local3), "");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        host.accept().is_err(),
        "a forward reached the host's loopback"
    );
}

#[test]
fn agent_forwarding_lists_the_clients_keys_only_with_dash_a() {
    use berth_testkit::DEBIAN;
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", DEBIAN);
    // A client-side agent holding one key.
    let sock = d.dir.path().join("agent.sock");
    let _agent = KillOnDrop(
        std::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let agent_key = d.keygen("in-agent");
    let st = std::process::Command::new("ssh-add")
        .arg(&agent_key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let fp = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(agent_key.with_extension("pub"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();

    let o = d
        .ssh("alice", &key)
        .env("SSH_AUTH_SOCK", &sock)
        .args(["-A", "ssh-add -l; echo sock=$SSH_AUTH_SOCK"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(&fp), "{out}");
    assert!(out.contains("sock=/.berth/run/agent-"), "{out}");
    // Without -A there is none, and the session's socket is gone after it ended.
    let out = d.ssh_ok(
        "alice",
        &key,
        "echo sock=${SSH_AUTH_SOCK:-none}; ls /.berth/run",
    );
    assert_eq!(out, "sock=none\nguest.sock\n");
}

/// A one-line TCP server on the host side (the client's end of `-R`).
fn client_side_server(text: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = std::io::Write::write_all(&mut s, text.as_bytes());
        }
    });
    port
}

#[test]
fn remote_forward_listens_in_the_container_with_port_zero_and_cancel() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    let target = client_side_server("from-client\n");
    // A master connection, to add and cancel forwards on it.
    let sock = d.dir.path().join("mux");
    let mux = |extra: &[&str]| {
        let mut c = d.ssh("alice", &key);
        c.args(["-S", sock.to_str().unwrap()]).args(extra);
        c
    };
    assert!(
        mux(&["-M", "-f", "-N", "-o", "ControlPersist=60"])
            .status()
            .unwrap()
            .success()
    );
    // Port 0: the server picks one and the client learns it.
    let o = mux(&["-O", "forward", "-R", &format!("0:127.0.0.1:{target}")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let port: u16 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    assert!(d.listening("alice", &key, port));
    assert_eq!(
        d.ssh_ok("alice", &key, &format!("nc 127.0.0.1 {port} </dev/null")),
        "from-client\n"
    );
    // It listens in the container, not on the host.
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "remote forward listened on the host"
    );

    // A fixed port, then cancelled.
    let fixed = free_port();
    let spec = format!("{fixed}:127.0.0.1:{target}");
    assert!(
        mux(&["-O", "forward", "-R", &spec])
            .output()
            .unwrap()
            .status
            .success()
    );
    assert!(d.listening("alice", &key, fixed));
    assert!(
        mux(&["-O", "cancel", "-R", &spec])
            .output()
            .unwrap()
            .status
            .success()
    );
    assert!(wait_until(Duration::from_secs(10), || {
        !d.listening("alice", &key, fixed)
    }));
    let _ = mux(&["-O", "exit"]).output();
}

#[test]
fn forwarding_switches_server_wide_and_per_user() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: "allow_tcp_forwarding = false\nallow_agent_forwarding = false\n".into(),
        },
    );
    let ka = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    let o = d.berth(&[
        "user",
        "set",
        "bob",
        "--tcp-forwarding",
        "on",
        "--agent-forwarding",
        "on",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "bob: tcp forwarding on, agent forwarding on, x11 forwarding on\n"
    );
    assert_eq!(d.user("alice")["forwarding"]["tcp"], false);
    assert_eq!(d.user("bob")["forwarding"]["tcp"], true);
    let remote = |user: &str, key: &Path| {
        d.ssh(user, key)
            .args([
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                "0:127.0.0.1:9",
                "-o",
                "ConnectTimeout=5",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // alice follows the server: -R is refused and ssh gives up.
    let mut a = remote("alice", &ka);
    let exited = wait_until(Duration::from_secs(20), || a.try_wait().unwrap().is_some());
    assert!(exited, "alice's remote forward was accepted");
    assert_ne!(a.wait().unwrap().code(), Some(0));
    // bob's own switch is on: his forward stays up.
    let b = KillOnDrop(remote("bob", &kb));
    std::thread::sleep(Duration::from_secs(2));
    let mut b = b;
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "bob's remote forward was refused"
    );
    // Agent forwarding likewise.
    let sock = d.dir.path().join("agent.sock");
    let _agent = KillOnDrop(
        std::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let agent_sock = |user: &str, key: &Path| {
        let o = d
            .ssh(user, key)
            .env("SSH_AUTH_SOCK", &sock)
            .args(["-A", "echo ${SSH_AUTH_SOCK:-none}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    assert_eq!(agent_sock("alice", &ka), "none");
    assert!(agent_sock("bob", &kb).starts_with("/.berth/run/agent-"));
    // Back to the server's setting.
    d.berth_ok(&["user", "set", "bob", "--agent-forwarding", "default"]);
    assert_eq!(agent_sock("bob", &kb), "none");
    let o = d.berth(&["user", "set", "bob"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn forwards_never_reach_another_users_container_or_the_docker_socket() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let ka = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    // bob serves on all his addresses.
    let _server = KillOnDrop(
        d.ssh("bob", &kb)
            .arg("while true; do echo from-bob | nc -l -p 7000; done")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        d.listening("bob", &kb, 7000)
    }));
    let bob_ip = berth_testkit::docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &d.container_name("bob"),
    ]);
    // From bob's own container his server answers (the test's control)...
    assert_eq!(
        d.ssh_ok("bob", &kb, &format!("nc {bob_ip} 7000 </dev/null")),
        "from-bob\n"
    );
    // ...but alice's forward to it gets nothing.
    let (_fwd, local) = forward(&d, &ka, &format!("{bob_ip}:7000"));
    assert_eq!(read_all(local), "");
    // A Unix-socket forward to the Docker socket's path looks in alice's container, where
    // there is none.
    let sock = d.dir.path().join("docker-fwd.sock");
    let mut c = d
        .ssh("alice", &ka)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{}:/var/run/docker.sock", sock.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || sock.exists()));
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut s, b"GET /version HTTP/1.0\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert_eq!(reply, "", "the docker socket answered through a forward");
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn client_environment_follows_the_allow_list() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: "accept_env = [\"LANG\", \"LC_*\", \"BERTH_TEST_*\"]\n".into(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    let o = d
        .ssh("alice", &key)
        .args([
            "-o",
            "SendEnv=LANG LC_TIME BERTH_TEST_X OTHER_VAR",
            "echo $LANG/$LC_TIME/$BERTH_TEST_X/${OTHER_VAR:-unset}",
        ])
        .env("LANG", "C.UTF-8")
        .env("LC_TIME", "C")
        .env("BERTH_TEST_X", "yes")
        .env("OTHER_VAR", "leak")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "C.UTF-8/C/yes/unset\n");
}

#[test]
fn x11_forwarding_shows_the_clients_display() {
    use berth_testkit::DEBIAN;
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", DEBIAN);
    // The client's X server: Xvfb on a display nobody holds (a lock file left by a killed X
    // server counts as held), with its own cookie.
    let n = (97..200)
        .find(|n| !Path::new(&format!("/tmp/.X{n}-lock")).exists())
        .unwrap();
    let display = format!(":{n}");
    let socket = format!("/tmp/.X11-unix/X{n}");
    let auth = d.dir.path().join("Xauthority");
    let cookie: String = (0..16)
        .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
        .collect();
    let st = std::process::Command::new("xauth")
        .arg("-f")
        .arg(&auth)
        .args(["add", &display, ".", &cookie])
        .status()
        .unwrap();
    assert!(st.success());
    let _xvfb = KillOnDrop(
        std::process::Command::new("Xvfb")
            .args([&display, "-nolisten", "tcp", "-auth"])
            .arg(&auth)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Listening, not just there (a socket file may outlive its server).
    assert!(wait_until(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let o = d
        .ssh("alice", &key)
        .env("DISPLAY", &display)
        .env("XAUTHORITY", &auth)
        .args([
            "-X",
            "echo DISPLAY=$DISPLAY; xdpyinfo | grep -E 'name of display|dimensions'",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("DISPLAY=localhost:10.0"), "{out}");
    assert!(out.contains("name of display:    localhost:10.0"), "{out}");
    assert!(out.contains("dimensions:"), "{out}");
    // The cookie was for that session only; without -X there is no display.
    assert!(wait_until(Duration::from_secs(10), || !d
        .ssh_ok("alice", &key, "xauth list 2>/dev/null")
        .contains("unix:10")));
    assert_eq!(d.ssh_ok("alice", &key, "echo ${DISPLAY:-none}"), "none\n");
    // Switched off for her: -X gets no display.
    d.berth_ok(&["user", "set", "alice", "--x11-forwarding", "off"]);
    let o = d
        .ssh("alice", &key)
        .env("DISPLAY", &display)
        .env("XAUTHORITY", &auth)
        .args(["-X", "echo ${DISPLAY:-none}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "none\n");
}

#[test]
fn a_connection_with_only_forwardings_keeps_the_container_running() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 1,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    // A session holds the container running until the forwarding connection is up (a login
    // on a busy machine can take longer than the 1 s grace), then ends.
    let long = d
        .ssh("alice", &key)
        .arg("i=0; until [ -e /tmp/go ] || [ $i -ge 1200 ]; do sleep 0.1; i=$((i+1)); done")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _long = KillOnDrop(long);
    assert!(wait_until(
        Duration::from_secs(60),
        || d.user("alice")["sessions"] == 1
    ));
    let (fwd, _local) = forward(&d, &key, "localhost:9");
    d.ssh_ok("alice", &key, "touch /tmp/go");
    assert!(wait_until(
        Duration::from_secs(60),
        || d.user("alice")["sessions"] == 0
    ));
    // Well past the grace period, with no session: still running, and no session counted.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(d.container_state("alice").as_deref(), Some("running"));
    assert_eq!(d.user("alice")["sessions"], 0);
    drop(fwd);
    assert!(wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
}

#[test]
fn dynamic_forward_socks_reaches_the_container() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    let _web = KillOnDrop(
        d.ssh("alice", &key)
            .arg("mkdir -p /root/www && echo hello-socks > /root/www/index.html && exec httpd -f -p 127.0.0.1:8081 -h /root/www")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        d.listening("alice", &key, 8081)
    }));
    let local = free_port();
    let _socks = KillOnDrop(
        d.ssh("alice", &key)
            .args(["-N", "-D", &format!("127.0.0.1:{local}")])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || TcpStream::connect(
        ("127.0.0.1", local)
    )
    .is_ok()));
    let o = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "--socks5-hostname",
            &format!("127.0.0.1:{local}"),
            "http://localhost:8081/",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello-socks\n");
}

#[test]
fn local_forward_names_resolve_as_the_container_resolves_them() {
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", BUSYBOX);
    // A name only the container's /etc/hosts knows, and a server on all its addresses.
    let _server = KillOnDrop(
        d.ssh("alice", &key)
            .arg(
                "echo '127.0.0.1 only-in-container.test' >> /etc/hosts; \
                 echo by-name > /root/msg; while true; do nc -l -p 8082 < /root/msg; done",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(20), || {
        d.ssh_run("alice", &key, "grep -q only-in-container /etc/hosts", b"")
            .status
            .success()
            && d.listening("alice", &key, 8082)
    }));
    let (_a, local) = forward(&d, &key, "only-in-container.test:8082");
    assert!(wait_until(Duration::from_secs(10), || read_all(local) == "by-name\n"));

    // The container's own name: only Docker's DNS inside its network answers it.
    let name = d.container_name("alice");
    let (_b, local) = forward(&d, &key, &format!("{name}:8082"));
    assert!(wait_until(Duration::from_secs(10), || read_all(local) == "by-name\n"));

    // A name nobody knows: the forward opens and the connection is refused at once.
    let (_c, local) = forward(&d, &key, "no-such-name.invalid:8082");
    assert_eq!(read_all(local), "");
}

/// A Unix socket server in the container (perl is in every Debian): each connection gets
/// `text` and a newline.
fn socket_server_in_container(d: &Daemon, key: &Path, path: &str, text: &str) -> KillOnDrop {
    let script = format!(
        "perl -MIO::Socket::UNIX -e 'unlink $ARGV[0]; my $s = IO::Socket::UNIX->new(Local => $ARGV[0], Listen => 5) or die $!; while (my $c = $s->accept) {{ print $c \"{text}\\n\"; close $c }}' {path}"
    );
    KillOnDrop(
        d.ssh("alice", key)
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// What a connection to the Unix socket at `path` in alice's container reads.
const READ_SOCKET: &str = "perl -MIO::Socket::UNIX -e 'my $c = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die \"connect: $!\\n\"; print while <$c>'";

fn read_unix(path: &Path) -> String {
    std::os::unix::net::UnixStream::connect(path).map_or_else(
        |_| String::new(),
        |s| {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            read_to_end(s)
        },
    )
}

#[test]
fn unix_socket_forwards_both_ways_stay_in_the_container_and_are_audited() {
    use berth_testkit::DEBIAN;
    let d = Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    );
    let key = d.add_user("alice", DEBIAN);
    let _server = socket_server_in_container(&d, &key, "/run/app.sock", "from-container-socket");
    assert!(wait_until(Duration::from_secs(20), || {
        d.ssh_run("alice", &key, "test -S /run/app.sock", b"")
            .status
            .success()
    }));
    // A socket on the host, and a symlink to its path in the container.
    let host_sock = d.dir.path().join("host.sock");
    let host = std::os::unix::net::UnixListener::bind(&host_sock).unwrap();
    host.set_nonblocking(true).unwrap();
    d.ssh_ok(
        "alice",
        &key,
        &format!(
            "ln -sf {} /run/host.sock && ln -sfn {} /run/out",
            host_sock.display(),
            d.dir.path().display()
        ),
    );
    // One master connection; forwards are added to it.
    let mux_sock = d.dir.path().join("mux");
    let mux = |extra: &[&str]| {
        let mut c = d.ssh("alice", &key);
        c.args(["-S", mux_sock.to_str().unwrap()]).args(extra);
        c.output().unwrap()
    };
    assert!(
        mux(&["-M", "-f", "-N", "-o", "ControlPersist=60"])
            .status
            .success()
    );

    // -L to a socket in the container.
    let local = d.dir.path().join("local.sock");
    let o = mux(&[
        "-O",
        "forward",
        "-L",
        &format!("{}:/run/app.sock", local.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_unix(&local), "from-container-socket\n");
    // -L through a symlink to the host's socket: resolved inside the container, not reached.
    let local2 = d.dir.path().join("local2.sock");
    let o = mux(&[
        "-O",
        "forward",
        "-L",
        &format!("{}:/run/host.sock", local2.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_unix(&local2), "");
    std::thread::sleep(Duration::from_millis(300));
    assert!(host.accept().is_err(), "a socket forward reached the host");

    // -R: a socket made in the container, mode 0600, that leads back to the client.
    let target = client_side_server("from-client\n");
    let spec = format!("/tmp/fwd.sock:127.0.0.1:{target}");
    let o = mux(&["-O", "forward", "-R", &spec]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.ssh_ok("alice", &key, "stat -c %a /tmp/fwd.sock"), "600\n");
    assert_eq!(
        d.ssh_ok("alice", &key, &format!("{READ_SOCKET} /tmp/fwd.sock")),
        "from-client\n"
    );
    // -R through a symlinked directory that names a host path: made in the container or
    // nowhere, never on the host.
    let o = mux(&[
        "-O",
        "forward",
        "-R",
        &format!("/run/out/x.sock:127.0.0.1:{target}"),
    ]);
    assert!(
        !o.status.success(),
        "a socket was made in a directory the container lacks"
    );
    assert!(
        !d.dir.path().join("x.sock").exists(),
        "a socket was made on the host"
    );
    // Cancelled: the socket is removed from the container.
    assert!(mux(&["-O", "cancel", "-R", &spec]).status.success());
    assert!(wait_until(Duration::from_secs(10), || {
        !d.ssh_run("alice", &key, "test -e /tmp/fwd.sock", b"")
            .status
            .success()
    }));
    // A TCP -R, then forwarding switched off for alice: her next -L is refused.
    let o = mux(&["-O", "forward", "-R", &format!("0:127.0.0.1:{target}")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    d.berth_ok(&["user", "set", "alice", "--tcp-forwarding", "off"]);
    let local3 = d.dir.path().join("local3.sock");
    let o = mux(&[
        "-O",
        "forward",
        "-L",
        &format!("{}:/run/app.sock", local3.display()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_unix(&local3), "");
    let _ = mux(&["-O", "exit"]);

    let audit = std::fs::read_to_string(d.state_dir().join("audit.log")).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| {
            r["event"] == "forward_open" || r["event"] == "forward_refused"
        })
        .collect();
    let has = |event: &str, kind: &str, target: &str| {
        records.iter().any(|r| {
            r["event"] == event
                && r["kind"] == kind
                && r["user"] == "alice"
                && r["target"].as_str().unwrap_or_default().contains(target)
        })
    };
    assert!(
        has("forward_open", "local_socket", "/run/app.sock"),
        "{records:#?}"
    );
    assert!(
        has("forward_open", "remote_socket", "/tmp/fwd.sock"),
        "{records:#?}"
    );
    assert!(has("forward_open", "remote", ":"), "{records:#?}");
    assert!(
        has("forward_refused", "remote_socket", "/run/out/x.sock"),
        "{records:#?}"
    );
    assert!(
        records.iter().any(|r| r["event"] == "forward_refused"
            && r["kind"] == "local_socket"
            && r["reason"] == "socket forwarding is off for this user"),
        "{records:#?}"
    );
}
