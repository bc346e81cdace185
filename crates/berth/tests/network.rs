//! End-to-end: what a user's container can reach on the network (issue 14, point 6). The
//! internet is a network namespace of the test's own behind a veth pair; the host is every
//! IPv4 address `ip -o addr` shows (the bridge gateways included), with a listener on
//! 0.0.0.0; the other user is bob, on the same daemon.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, KillOnDrop, docker, free_port, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");
/// What the host's listeners answer; a container must never read it unless allowed.
const HOST: &str = "host-listener";
const INTERNET: &str = "internet-listener";

fn daemon(config: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 60,
            config: config.to_owned(),
        },
    )
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Answers `text` to every connection on `listener`, from a thread of its own.
fn answer(listener: TcpListener, text: &'static str) {
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(format!("{text}\n").as_bytes());
        }
    });
}

/// "The internet": a network namespace with a veth pair to the host on a /30 of the
/// benchmarking range (198.18.0.0/15, which nothing here routes), removed on drop.
struct Internet {
    ns: String,
    veth: String,
    /// The namespace's address and the port its listener answers on.
    addr: Ipv4Addr,
    port: u16,
    /// A link-local address of the namespace, standing for the cloud metadata service
    /// (169.254.169.254 itself is never touched), the same listener behind it.
    link_local: Ipv4Addr,
}

impl Internet {
    fn new() -> Option<Self> {
        let pid = std::process::id();
        let ns = format!("btnet{pid}");
        let veth = format!("bvh{pid}");
        let peer = format!("bvn{pid}");
        // A /30 of its own per test process.
        let block = (pid % 16000) * 4;
        let host = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block + 1);
        let addr = Ipv4Addr::from(u32::from(host) + 1);
        let ll_block = (pid % 64) * 4;
        let link_local = Ipv4Addr::from(u32::from(Ipv4Addr::new(169, 254, 213, 2)) + ll_block);
        let me = Self {
            ns: ns.clone(),
            veth: veth.clone(),
            addr,
            port: 0,
            link_local,
        };
        let host_cidr = format!("{host}/30");
        let ns_cidr = format!("{addr}/30");
        let ll_host = format!("{}/30", Ipv4Addr::from(u32::from(link_local) - 1));
        let ll_ns = format!("{link_local}/30");
        let steps: [&[&str]; 9] = [
            &["netns", "add", &ns],
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            &["link", "set", &peer, "netns", &ns],
            &["addr", "add", &host_cidr, "dev", &veth],
            &["link", "set", &veth, "up"],
            &["-n", &ns, "addr", "add", &ns_cidr, "dev", &peer],
            &["-n", &ns, "link", "set", &peer, "up"],
            &["addr", "add", &ll_host, "dev", &veth],
            &["-n", &ns, "addr", "add", &ll_ns, "dev", &peer],
        ];
        for step in steps {
            if !run("ip", step) {
                println!("skipped: cannot make a network namespace (ip {step:?} failed)");
                return None;
            }
        }
        let mut me = me;
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            answer(l, INTERNET);
        });
        me.port = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Some(me)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        run("ip", &["link", "del", &self.veth]);
        run("ip", &["netns", "del", &self.ns]);
    }
}

/// Every IPv4 address of the host but loopback's (from inside a container, 127.0.0.1 is
/// the container's own).
fn host_addresses() -> Vec<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next()?.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

/// The gateway (host side) of `user`'s container's network.
fn gateway(d: &Daemon, user: &str) -> Ipv4Addr {
    let net = format!("{}-{user}", d.network());
    docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        &net,
    ])
    .parse()
    .unwrap()
}

/// What `nc ADDR PORT` reads in `user`'s container, one line per address.
fn reach_from(d: &Daemon, user: &str, key: &Path, targets: &[(Ipv4Addr, u16)]) -> Vec<String> {
    let script: String = targets
        .iter()
        .map(|(a, p)| {
            format!("echo \"{a}:{p} $(nc -w 3 {a} {p} </dev/null 2>&1 | head -c 100)\"; ")
        })
        .collect();
    let out = d.ssh_run(user, key, &script, b"");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What a local port forward of `user` to each target reads (empty when the daemon could
/// not connect: the client closes the forwarded connection).
fn forward_from(d: &Daemon, user: &str, key: &Path, targets: &[(Ipv4Addr, u16)]) -> Vec<String> {
    let listening = |p: u16| TcpStream::connect(("127.0.0.1", p)).is_ok();
    // A local port taken by another test between choosing and binding makes `ssh` exit
    // (ExitOnForwardFailure): then it is tried again with other ports.
    let mut tries = 0;
    let (locals, _ssh) = loop {
        tries += 1;
        let locals: Vec<u16> = targets.iter().map(|_| free_port()).collect();
        let mut ssh = d.ssh(user, key);
        ssh.args(["-N", "-o", "ExitOnForwardFailure=yes"]);
        for ((a, p), l) in targets.iter().zip(&locals) {
            ssh.args(["-L", &format!("127.0.0.1:{l}:{a}:{p}")]);
        }
        let mut child = KillOnDrop(
            ssh.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut exited = false;
        let up = wait_until(Duration::from_secs(60), || {
            exited = child.0.try_wait().unwrap().is_some();
            exited || locals.iter().all(|p| listening(*p))
        });
        if up && !exited {
            break (locals, child);
        }
        assert!(
            exited && tries < 5,
            "the forwards did not listen\n{}",
            d.log()
        );
    };
    targets
        .iter()
        .zip(&locals)
        .map(|((a, p), l)| {
            let mut s = TcpStream::connect(("127.0.0.1", *l)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = String::new();
            let _ = s.read_to_string(&mut got);
            format!("{a}:{p} {}", got.trim())
        })
        .collect()
}

fn host_listener() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = l.local_addr().unwrap().port();
    answer(l, HOST);
    port
}

#[test]
fn a_container_reaches_the_internet_but_not_the_host_nor_another_user() {
    let Some(internet) = Internet::new() else {
        return;
    };
    let port = host_listener();
    let d = daemon("");
    let alice = d.add_user("alice", BUSYBOX);
    let bob = d.add_user("bob", BUSYBOX);

    // bob's container runs, with a listener of its own.
    let _bob = KillOnDrop(
        d.ssh("bob", &bob)
            .arg("nc -ll -p 7000 -e echo bob-listener")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(20), || d.listening("bob", &bob, 7000)),
        "{}",
        d.log()
    );
    let bob_addr: Ipv4Addr = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &d.container_name("bob"),
    ])
    .parse()
    .unwrap();

    // The internet answers; a link-local address (where cloud metadata lives) does not.
    let out = reach_from(
        &d,
        "alice",
        &alice,
        &[
            (internet.addr, internet.port),
            (internet.link_local, internet.port),
        ],
    );
    assert!(out[0].ends_with(INTERNET), "{out:?}\n{}", d.log());
    assert!(!out[1].contains(INTERNET), "{out:?}");

    // No address of the host does, the gateway of alice's own bridge among them.
    let host = host_addresses();
    assert!(host.contains(&gateway(&d, "alice")), "{host:?}");
    let targets: Vec<(Ipv4Addr, u16)> = host.iter().map(|a| (*a, port)).collect();
    let out = reach_from(&d, "alice", &alice, &targets);
    assert_eq!(out.len(), targets.len(), "{out:?}");
    for line in &out {
        assert!(!line.contains(HOST), "alice reached the host: {out:?}");
    }

    // Nor does bob, by address or by name.
    let out = reach_from(&d, "alice", &alice, &[(bob_addr, 7000)]);
    assert!(!out[0].contains("bob-listener"), "{out:?}");
    let own = d.ssh_run(
        "alice",
        &alice,
        &format!("nslookup {}", d.container_name("alice")),
        b"",
    );
    assert!(
        own.status.success(),
        "alice's own name resolves: {}",
        String::from_utf8_lossy(&own.stdout)
    );
    let other = d.ssh_run(
        "alice",
        &alice,
        &format!("nslookup {}", d.container_name("bob")),
        b"",
    );
    assert!(
        !other.status.success(),
        "bob's name resolves in alice's container: {}",
        String::from_utf8_lossy(&other.stdout)
    );

    // `ssh -L` connects from inside alice's container, and is held to the same rules.
    let mut targets = targets;
    targets.push((internet.link_local, internet.port));
    targets.push((internet.addr, internet.port));
    targets.push((bob_addr, 7000));
    let out = forward_from(&d, "alice", &alice, &targets);
    let (last, rest) = out.split_last().unwrap();
    assert!(!last.contains("bob-listener"), "{out:?}");
    let (internet_line, rest) = rest.split_last().unwrap();
    let (link_local_line, host_lines) = rest.split_last().unwrap();
    assert!(!link_local_line.contains(INTERNET), "{out:?}");
    assert!(internet_line.ends_with(INTERNET), "{out:?}");
    for line in host_lines {
        assert!(!line.contains(HOST), "alice's -L reached the host: {out:?}");
    }

    let status = d.berth_ok(&["status"]);
    assert!(status.contains("isolation:  in force"), "{status}");
}

#[test]
fn the_admin_opens_named_host_ports_or_the_whole_host() {
    let open = host_listener();
    let closed = host_listener();

    // One port allowed: that one answers on the gateway, the other does not.
    let d = daemon(&format!("[isolation]\nallow = [\"tcp:{open}\"]\n"));
    let alice = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &alice, "true");
    let gw = gateway(&d, "alice");
    let out = reach_from(&d, "alice", &alice, &[(gw, open), (gw, closed)]);
    assert!(out[0].ends_with(HOST), "{out:?}\n{}", d.log());
    assert!(!out[1].contains(HOST), "{out:?}");
    let status = d.berth_ok(&["status"]);
    assert!(status.contains(&format!("but tcp:{open}")), "{status}");
    drop(d);

    // The whole host opened.
    let d = daemon("[isolation]\nhost_access = true\n");
    let alice = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &alice, "true");
    let gw = gateway(&d, "alice");
    let out = reach_from(&d, "alice", &alice, &[(gw, open), (gw, closed)]);
    assert!(out.iter().all(|l| l.ends_with(HOST)), "{out:?}");
    let status = d.berth_ok(&["status"]);
    assert!(status.contains("host_access = true"), "{status}");
}

/// A container made by an older Berth, on the one network every user shared: it moves to
/// its user's own network at its next start, with its files; the shared network goes once
/// nobody is on it; her network goes with the user.
#[test]
fn a_container_on_the_old_shared_network_moves_to_its_users_own_with_its_files() {
    let d = daemon("");
    let alice = d.add_user("alice", BUSYBOX);
    let container = d.container_name("alice");
    d.ssh_ok("alice", &alice, "echo kept > /root/file");
    d.ssh_ok("alice", &alice, "stop");
    assert!(wait_until(Duration::from_secs(20), || d
        .container_state("alice")
        .as_deref()
        == Some("exited")));
    let shared = d.network();
    let own = format!("{shared}-alice");
    docker(&[
        "network",
        "create",
        "--label",
        "berth.network=1",
        "-o",
        "com.docker.network.bridge.enable_icc=false",
        &shared,
    ]);
    docker(&["network", "disconnect", &own, &container]);
    docker(&["network", "connect", &shared, &container]);

    assert_eq!(d.ssh_ok("alice", &alice, "cat /root/file"), "kept\n");
    let networks = docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        &container,
    ]);
    assert_eq!(networks, own);
    assert!(
        !berth_testkit::docker_output(&["network", "inspect", &shared])
            .status
            .success(),
        "the shared network is still there\n{}",
        d.log()
    );

    d.berth_ok(&["user", "rm", "alice"]);
    assert!(
        !berth_testkit::docker_output(&["network", "inspect", &own])
            .status
            .success(),
        "alice's network outlived her"
    );
}

/// A rule of Berth's taken away by someone else (a firewall service reloading its own) is
/// put back at the next check, and the container is shut out of the host again; checks
/// while nothing changed put nothing back.
#[test]
fn a_rule_taken_from_the_firewall_is_put_back() {
    let open = host_listener();
    let mut d = daemon("");
    d.restart_with_env("BERTH_TEST_FIREWALL_CHECK_SECONDS", "2");
    let alice = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &alice, "true");
    let status = d.berth_ok(&["status"]);
    let bridges = status
        .split("in force on bridges ")
        .nth(1)
        .and_then(|r| r.split('+').next())
        .unwrap_or_else(|| panic!("no isolation line in {status}"))
        .to_owned();
    let chain = format!("BERTH-IN-{}", bridges.trim_end_matches('-'));
    // Several checks with nothing to put back.
    std::thread::sleep(Duration::from_secs(5));
    assert!(!d.log().contains("put back"), "{}", d.log());

    assert!(run("iptables", &["-w", "10", "-D", &chain, "-j", "REJECT"]));
    assert!(
        wait_until(Duration::from_secs(20), || d
            .log()
            .contains("had changed; put back")),
        "the rule taken away was not put back\n{}",
        d.log()
    );
    assert!(run("iptables", &["-w", "10", "-C", &chain, "-j", "REJECT"]));
    let gw = gateway(&d, "alice");
    let out = reach_from(&d, "alice", &alice, &[(gw, open)]);
    assert!(!out[0].contains(HOST), "{out:?}");
    assert!(d.berth_ok(&["status"]).contains("in force on bridges"));
}
