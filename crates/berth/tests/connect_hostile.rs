//! End-to-end: `berth connect`'s server end against laptops that misbehave or vanish: a
//! network that drops without a word, a peer that never says hello, frames larger than the
//! wire allows, more mounts than a user may have, and a laptop that takes requests and never
//! answers. The daemon, Docker, the container and `ssh` are real; the misbehaving laptop is
//! this process speaking the wire (`berth_connect::proto`) on `ssh -s berth-connect@berth`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_connect::client::Wire;
use berth_connect::proto::{self, Op, ToDaemon, ToLaptop};
use berth_testkit::{BUSYBOX, Daemon, wait_until};
use common::*;
use futures_util::{SinkExt, StreamExt};

/// A TCP relay in front of the daemon that can go silent: from then on what either side
/// sends is dropped on the floor and nothing is closed, as when a network drops.
struct Relay {
    port: u16,
    silent: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn to(port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Self {
            port: listener.local_addr().unwrap().port(),
            silent: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(Mutex::new(Vec::new())),
        };
        let (silent, streams) = (relay.silent.clone(), relay.streams.clone());
        // Accepts for the test's life (the thread ends with the test binary).
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { return };
                let up = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let mut held = streams.lock().unwrap();
                held.push(down.try_clone().unwrap());
                held.push(up.try_clone().unwrap());
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up.try_clone().unwrap(), down.try_clone().unwrap()),
                ] {
                    let silent = silent.clone();
                    std::thread::spawn(move || pump(from, to, &silent));
                }
            }
        });
        relay
    }

    fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, silent: &AtomicBool) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) if !silent.load(Ordering::SeqCst) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Ok(_) => {}
        }
    }
    if !silent.load(Ordering::SeqCst) {
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_dropped_network_takes_the_mount_away_fails_its_readers_and_the_container_stops() {
    // Keepalives every second, three missed: the window is a few seconds.
    let d = start_with(3, "keepalive_interval_seconds = 1\nkeepalive_max = 3\n");
    let key = d.add_user("alice", BUSYBOX);
    let (_top, dir) = laptop_dir("far away");
    std::fs::write(dir.join("x"), "laptop\n").unwrap();
    let relay = Relay::to(d.port);
    let mut laptop = Running::spawn(
        connect_via(relay.port, &d, "alice", &key, &[&dir])
            // The laptop's ssh notices too (the user's options come first).
            .args(["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"])
            .arg("--")
            .arg("sleep 300"),
    );
    expect_mounted(&d, "alice", &dir, true, Duration::from_secs(30));

    relay.go_silent();
    // A reader in the container, on a connection of its own, waits on the silent laptop.
    let reader = reader(&d, "alice", &key, &dir.join("x"));
    let out = reader.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("status 1"),
        "the read did not fail: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    expect_mounted(&d, "alice", &dir, false, Duration::from_secs(20));
    assert!(
        audited(&d, "mount_end", "alice", &dir),
        "no mount_end for {}",
        dir.display()
    );
    // No session left: the container stops after its grace period, as after any logout.
    stops_by_itself(&d, "alice");
    // The laptop's end gives up by itself too, with ssh's failure.
    let status = laptop.ends_within(Duration::from_secs(30), "connect hangs on a dead network");
    assert!(!status.success(), "{status:?}");
}

/// The laptop's end spoken by this process, on `ssh -s berth-connect@berth`.
struct Peer {
    child: tokio::process::Child,
    wire: Wire<tokio::process::ChildStdout, tokio::process::ChildStdin>,
}

impl Peer {
    fn open(d: &Daemon, user: &str, key: &Path) -> Self {
        let mut c = tokio::process::Command::from(d.ssh(user, key));
        let mut child = c
            .arg("-s")
            .arg(proto::SUBSYSTEM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let wire = Wire::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
        Self { child, wire }
    }

    /// Says hello for `path`; the daemon's answer.
    async fn hello(&mut self, path: &Path) -> ToLaptop {
        use std::os::unix::ffi::OsStrExt;
        self.wire
            .send(&ToDaemon::Hello {
                version: proto::VERSION,
                path: path.as_os_str().as_bytes().to_vec(),
            })
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.wire.recv())
            .await
            .expect("no answer to hello")
            .unwrap()
            .expect("the daemon closed instead of answering")
    }

    /// Writes `bytes` as they are (frames of the test's own making).
    async fn raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let w = self.wire.tx.get_mut();
        let _ = w.write_all(bytes).await;
        let _ = w.flush().await;
    }

    /// Whether the daemon ends the subsystem (ssh exits) within `limit`.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.child.wait()).await.is_ok()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The real laptop's end (`berth_connect::serve`) of `dir` for `user`, except that the
/// requests `hold` picks are never answered: their ids go to `held`. Returns the `ssh` child.
async fn laptop_holding(
    d: &Daemon,
    user: &str,
    key: &Path,
    dir: &Path,
    held: &Arc<Mutex<Vec<u64>>>,
    hold: fn(&Op) -> bool,
) -> tokio::process::Child {
    let mut peer = Peer::open(d, user, key);
    assert!(matches!(peer.hello(dir).await, ToLaptop::Welcome { .. }));
    let Peer { child, wire } = peer;
    let Wire { mut rx, tx } = wire;
    let (to_serve, from_filter) = tokio::io::duplex(1 << 20);
    let mut forward = tokio_util::codec::FramedWrite::new(to_serve, proto::codec());
    let root = berth_connect::serve::open_root(dir).unwrap();
    tokio::spawn(berth_connect::serve::serve(
        root,
        Wire::new(from_filter, tx.into_inner()),
    ));
    let held = held.clone();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = rx.next().await {
            match proto::decode::<ToLaptop>(&frame) {
                Ok(ToLaptop::Request { id, op }) if hold(&op) => held.lock().unwrap().push(id),
                _ => {
                    if forward.send(frame.freeze()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    child
}

#[test]
fn peers_that_stay_silent_or_send_too_much_are_cut_off_and_mount_nothing() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok("alice", &key, "true");
    let before = mounts_in(&d, "alice");
    let rt = runtime();
    rt.block_on(async {
        // Silent: the hello has a deadline (30 s). Its wire stays open (an EOF would end it).
        let opened = Instant::now();
        let Peer {
            child: mut silent,
            wire: _silent_wire,
        } = Peer::open(&d, "alice", &key);
        let silent_ended = tokio::spawn(async move {
            let _ = silent.wait().await;
            opened.elapsed()
        });

        // A first frame of 16 MiB, far past the largest the wire allows.
        let mut huge = Peer::open(&d, "alice", &key);
        let mut frame = (16u32 << 20).to_be_bytes().to_vec();
        frame.extend(std::iter::repeat_n(0x5a, 256 * 1024));
        huge.raw(&frame).await;
        assert!(huge.closed_within(Duration::from_secs(15)).await);

        // A hello that does not decode.
        let mut junk = Peer::open(&d, "alice", &key);
        junk.raw(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
        assert!(junk.closed_within(Duration::from_secs(15)).await);

        // Welcomed, then a reply far too large: the mount is taken away.
        let (_top, dir) = laptop_dir("too much");
        let mut late = Peer::open(&d, "alice", &key);
        assert!(matches!(late.hello(&dir).await, ToLaptop::Welcome { .. }));
        assert!(in_mounts(&mounts_in(&d, "alice"), &dir));
        late.raw(&frame).await;
        assert!(late.closed_within(Duration::from_secs(15)).await);
        expect_mounted(&d, "alice", &dir, false, Duration::from_secs(15));

        let took = tokio::time::timeout(Duration::from_secs(60), silent_ended)
            .await
            .expect("a peer that never says hello holds its session")
            .unwrap();
        assert!(
            took > Duration::from_secs(25) && took < Duration::from_secs(50),
            "a silent peer was cut off after {took:?}, not the hello's 30 s"
        );
    });
    assert_eq!(mounts_in(&d, "alice"), before);
    // The daemon is whole: a login works, and nothing of the mounts is left as a session.
    assert_eq!(d.ssh_ok("alice", &key, "echo fine").trim(), "fine");
    let sessions = d.berth_ok(&["session", "list"]);
    assert!(!sessions.contains("berth connect"), "{sessions}");
}

#[test]
fn a_user_has_at_most_eight_mounts_and_a_ninth_is_refused_with_a_reason() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let top = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut peers = Vec::new();
        for i in 0..8 {
            let mut p = Peer::open(&d, "alice", &key);
            let answer = p.hello(&top.path().join(format!("m{i}"))).await;
            assert!(
                matches!(answer, ToLaptop::Welcome { .. }),
                "{i}: {answer:?}"
            );
            peers.push(p);
        }
        let ninth = top.path().join("m8");
        let mut p = Peer::open(&d, "alice", &key);
        match p.hello(&ninth).await {
            ToLaptop::Refused { reason } => {
                assert!(reason.contains("8 directories mounted"), "{reason}");
            }
            other => panic!("a ninth mount: {other:?}"),
        }
        assert!(!in_mounts(&mounts_in(&d, "alice"), &ninth));
        // One ends; its place is free again.
        let gone = peers.remove(0);
        drop(gone);
        let mut again = None;
        for _ in 0..50 {
            let mut p = Peer::open(&d, "alice", &key);
            match p.hello(&ninth).await {
                ToLaptop::Welcome { .. } => {
                    again = Some(p);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        assert!(again.is_some(), "the freed place was not given again");
        assert!(in_mounts(&mounts_in(&d, "alice"), &ninth));
    });
}

#[test]
fn a_laptop_that_never_answers_gets_at_most_64_requests_and_each_fails_in_time() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    let (_top, dir) = laptop_dir("slow");
    // Bob's container runs: his logins are warm, as a user's usually are.
    d.ssh_ok("bob", &kb, "true");
    let held = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime();
    // The real laptop's end (`berth_connect::serve`), but every lookup of a name is held
    // back here and never answered. (Lookups, not reads: the kernel itself keeps reads ahead
    // to 64 in flight, so only requests it does not bound test the daemon's bounds.)
    let mut laptop = rt.block_on(laptop_holding(&d, "alice", &key, &dir, &held, |op| {
        matches!(op, Op::Lookup { .. })
    }));

    // A hundred processes at once, each asking for a name of its own and saying how it
    // ended, as it ends.
    let started = Instant::now();
    let mut readers = d
        .ssh("alice", &key)
        .arg(format!(
            "cd '{}' && for i in $(seq 0 99); do (stat n$i >/dev/null 2>&1; echo \"$i $?\") & done; wait",
            dir.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(25), || held.lock().unwrap().len() >= 64),
        "only {} lookups reached the laptop",
        held.lock().unwrap().len()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        held.lock().unwrap().len(),
        64,
        "more requests in flight than the bound"
    );
    // Bob's logins do not wait on alice's laptop.
    let t = Instant::now();
    d.ssh_ok("bob", &kb, "true");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "bob waited {:?}",
        t.elapsed()
    );

    // Each request has a deadline (30 s): given up, its process gets EIO and its place goes
    // to the next.
    assert!(
        wait_until(Duration::from_secs(50), || held.lock().unwrap().len() > 64),
        "requests without an answer were never given up"
    );

    // The laptop goes: every process, waiting on the laptop or for a place, fails at once.
    laptop.start_kill().unwrap();
    let out = readers.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    for _ in 0..100 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a process waiting on a gone laptop hangs");
        assert!(line.ends_with(" 1"), "a lookup without an answer: {line}");
    }
    let _ = readers.wait();
    eprintln!("all lookups ended {:?} after the start", started.elapsed());
}

/// A process in the container as the test plays it from the host (through the container's
/// root): a writer to the file whose write waits on the laptop (holding the file's lock),
/// then three messages of 200 copies of the file's descriptor to the words socket.
const MOUNT_FDS: &str = r#"
import array, os, socket, sys, threading, time
path, sock = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY)
def writer():
    while True:
        try:
            os.write(fd, b'x' * 4096)
        except OSError as e:
            print('write failed', e.errno, flush=True)
            if e.errno == 107:
                return
threading.Thread(target=writer, daemon=True).start()
def send(n):
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
    s.sendmsg([b'daemon\n'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [fd] * n))])
    s.recv(100); s.close()
sys.stdin.readline()  # the test's word: a write is held
send(60)
print('sent 60', flush=True)
sys.stdin.readline()  # the test's word: go on
for _ in range(3):
    send(200)
print('sent', flush=True)
time.sleep(120)
"#;

/// One descriptor (a pipe's end) to a words socket: says `closed` once the daemon has closed
/// it (a write finds no reader), within 10 s, or `open`.
const ONE_FD: &str = r#"
import array, os, socket, sys, time
r, w = os.pipe()
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendmsg([b'daemon\n'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [r]))])
os.close(r)
t0 = time.time()
while time.time() < t0 + 10:
    try:
        os.write(w, b'x')
    except BrokenPipeError:
        print('closed', flush=True); sys.exit(0)
    time.sleep(0.01)
print('open', flush=True)
"#;

/// On a kernel without `SO_PASSRIGHTS` (before Linux 6.16: Debian 12's), a container can send
/// the daemon descriptors of files on her own mount, and the close of each waits on her
/// laptop while a write to the file does. They are closed on a thread of her mount's own, not
/// on the one every user's descriptors go through; past 64 waiting, her mount is ended. Bob's
/// descriptors are closed at once meanwhile (with 60 of hers waiting, and with 660 sent), and
/// nothing is left open.
#[test]
fn descriptors_of_a_mount_s_files_sent_to_the_daemon_hold_up_nobody_else() {
    let mut d = start();
    d.restart_with_env("BERTH_TEST_NO_PASSRIGHTS", "1");
    let key = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    d.ssh_ok("bob", &kb, "true");
    let (_top, dir) = laptop_dir("held");
    std::fs::write(dir.join("f"), "").unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime();
    // The real laptop's end, but no write is ever answered.
    let _laptop = rt.block_on(laptop_holding(&d, "alice", &key, &dir, &held, |op| {
        matches!(op, Op::Write { .. })
    }));
    expect_mounted(&d, "alice", &dir, true, Duration::from_secs(30));
    let pid = berth_testkit::docker(&[
        "inspect",
        "-f",
        "{{.State.Pid}}",
        &d.container_name("alice"),
    ]);
    let baseline = d.descriptors();
    let words = |user: &str| d.state_dir().join(format!("run/{user}/guest.sock"));
    let mut attacker = KillOnDrop(berth_testkit::python3(
        MOUNT_FDS,
        &[
            &format!("/proc/{pid}/root{}", dir.join("f").display()),
            words("alice").to_str().unwrap(),
        ],
        Stdio::piped(),
    ));
    let lines = lines_of(attacker.0.stdout.take().unwrap());
    // Its descriptors are sent once a write of its waits on the laptop.
    assert!(
        wait_until(Duration::from_secs(30), || !held.lock().unwrap().is_empty()),
        "no write reached the laptop"
    );
    let mut word = attacker.0.stdin.take().unwrap();
    writeln!(word, "go").unwrap();
    let next = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {what} from the attacker"))
    };
    // Bob's descriptor is closed at once.
    let bob_closes = || {
        let mut bob =
            berth_testkit::python3(ONE_FD, &[words("bob").to_str().unwrap()], Stdio::piped());
        drop(bob.stdin.take());
        let out = bob.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "closed"
    };
    // 60 of hers waiting, below the bound: her mount is still there, and none of them is on
    // the closer bob's go through (the first would hold it up).
    assert_eq!(next("the first 60"), "sent 60");
    assert!(bob_closes(), "bob's descriptor waited behind alice's");
    writeln!(word, "more").unwrap();
    // The writer's reports may come first: what it saw once the mount was ended.
    let mut said = Vec::new();
    while !said.iter().any(|l| l == "sent") {
        said.push(next("report"));
    }
    // And alice's 660 notwithstanding.
    assert!(bob_closes(), "bob's descriptor waited behind alice's");
    d.ssh_ok("bob", &kb, "true");

    // Past 64 of hers waiting, her mount was ended: the write waiting fails (ECONNABORTED)
    // and the next ones find no connection (ENOTCONN), not the laptop's EIO 30 s later.
    while !said.iter().any(|l| l == "write failed 107") {
        said.push(next(&format!("end of the mount (so far: {said:?})")));
    }
    assert!(
        said.iter()
            .all(|l| ["sent", "write failed 103", "write failed 107"].contains(&l.as_str())),
        "{said:?}"
    );
    drop(attacker);
    assert!(
        wait_until(Duration::from_secs(30), || d.descriptors() <= baseline),
        "descriptors: {baseline} before the attack, {} after",
        d.descriptors()
    );
}

/// Kills and reaps the child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of `out`, read on a thread of their own.
fn lines_of(out: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Hold the laptop's answers from now on (for [`a_mount_put_where_a_forwarded_socket_was_is_never_asked`]).
static HOLDING: AtomicBool = AtomicBool::new(false);

/// She puts a mount of hers where her `-R` socket was (`rm` it, `mkdir`, `berth connect`
/// there) and lets its laptop go silent. When the forward ends, the daemon looks before it
/// removes the socket; that look asks the mount nothing (it used to ask it for the root's
/// attributes, on a runtime worker: waiting on her laptop, and with two such drops no
/// session of anyone's moved).
#[test]
fn a_mount_put_where_a_forwarded_socket_was_is_never_asked() {
    let d = start();
    let key = d.add_user("alice", BUSYBOX);
    let kb = d.add_user("bob", BUSYBOX);
    d.ssh_ok("bob", &kb, "true");
    let (_top, dir) = laptop_dir("sock");
    let sock = dir.display().to_string();
    let parent = dir.parent().unwrap().display().to_string();
    d.ssh_ok("alice", &key, &format!("mkdir -p '{parent}'"));
    let mut forward = KillOnDrop(
        std::process::Command::new("ssh")
            .args(d.ssh_args(&key))
            .args(["-N", "-R", &format!("{sock}:127.0.0.1:9")])
            .arg("alice@127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(20), || d
            .ssh_run("alice", &key, &format!("test -S '{sock}'"), b"")
            .status
            .success()),
        "the forwarded socket never came"
    );
    d.ssh_ok("alice", &key, &format!("rm '{sock}' && mkdir '{sock}'"));
    let held = Arc::new(Mutex::new(Vec::new()));
    let rt = runtime();
    let _laptop = rt.block_on(laptop_holding(&d, "alice", &key, &dir, &held, |op| {
        HOLDING.load(Ordering::SeqCst) && matches!(op, Op::Getattr { .. } | Op::Lookup { .. })
    }));
    assert!(
        wait_until(Duration::from_secs(20), || d
            .ssh_run(
                "alice",
                &key,
                &format!("grep -q ' {sock} fuse' /proc/mounts"),
                b""
            )
            .status
            .success()),
        "the mount never came"
    );
    // Past the time attributes are kept (20 s), the mount's root's would be asked again.
    std::thread::sleep(Duration::from_secs(22));
    HOLDING.store(true, Ordering::SeqCst);
    let _ = forward.0.kill();
    let _ = forward.0.wait();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        held.lock().unwrap().len(),
        0,
        "the socket's removal asked her laptop"
    );
    let t = Instant::now();
    d.ssh_ok("bob", &kb, "true");
    eprintln!("bob logged in in {:?}", t.elapsed());
}
