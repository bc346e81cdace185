//! A login under attack: while 1000 idle TCP connections and 200 key exchanges asking for
//! the 8192-bit Diffie-Hellman group come from 127.0.0.2 and 127.0.0.3, a user with a key
//! logs in from 127.0.0.1. Berth with the door's defaults against OpenSSH as Debian ships it
//! (a private `sshd` with the stock `MaxStartups`, on the same loopback), each under the same
//! flood in turn.
//!
//! The key exchanges are made the cheap way an attacker would make them: identification,
//! a KEXINIT offering only `diffie-hellman-group18-sha512`, and a KEXDH_INIT whose value is 2,
//! which costs the sender nothing and a server that accepts the group two 8192-bit
//! exponentiations.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;

use crate::client::{Endpoint, ms, timed};
use crate::figure::Figure;
use crate::procfs;
use crate::rig::Rig;
use crate::servers::OpenSsh;

const IDLE: usize = 1000;
const EXCHANGES: usize = 200;
/// Exchanges in flight at once.
const IN_FLIGHT: usize = 50;
const SOURCES: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

fn connect_from(from: &str, port: u16) -> Option<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    let src: SocketAddr = format!("{from}:0").parse().ok()?;
    sock.bind(&src.into()).ok()?;
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    // A full backlog drops SYNs for minutes: give up after 5 s.
    sock.connect_timeout(&dst.into(), Duration::from_secs(5))
        .ok()?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    Some(s)
}

/// One unencrypted SSH packet (RFC 4253 §6) around `payload`.
fn packet(payload: &[u8]) -> Vec<u8> {
    let mut pad = 8 - (payload.len() + 5) % 8;
    if pad < 4 {
        pad += 8;
    }
    let len = u32::try_from(payload.len() + pad + 1).unwrap_or(u32::MAX);
    let mut p = len.to_be_bytes().to_vec();
    p.push(u8::try_from(pad).unwrap_or(4));
    p.extend_from_slice(payload);
    p.extend(std::iter::repeat_n(0u8, pad));
    p
}

fn name_list(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One cheap group-18 exchange against `port` from `from`; returns when the server has
/// answered, refused or closed.
fn exchange(from: &str, port: u16) {
    let Some(mut s) = connect_from(from, port) else {
        return;
    };
    if s.write_all(b"SSH-2.0-flood\r\n").is_err() {
        return;
    }
    let mut kexinit = vec![20u8];
    kexinit.extend_from_slice(&[7u8; 16]);
    for list in [
        "diffie-hellman-group18-sha512",
        "ssh-ed25519,rsa-sha2-512,rsa-sha2-256,ecdsa-sha2-nistp256",
        "aes128-ctr",
        "aes128-ctr",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ] {
        name_list(&mut kexinit, list);
    }
    kexinit.push(0);
    kexinit.extend_from_slice(&0u32.to_be_bytes());
    // KEXDH_INIT, e = 2 (mpint).
    let kexdh = [30u8, 0, 0, 0, 1, 2];
    let mut out = packet(&kexinit);
    out.extend(packet(&kexdh));
    if s.write_all(&out).is_err() {
        return;
    }
    // Read until the server closes or its reply (host key, f, signature) has come.
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
        if got > 1200 {
            break;
        }
    }
}

/// What one server did under the flood.
struct Outcome {
    logins_ms: Vec<f64>,
    failed: usize,
    cpu_s: f64,
}

fn cpu_ticks_with_children(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let rest: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime 14, stime 15, cutime 16, cstime 17 (fields after comm start at 3).
    (14..=17)
        .filter_map(|n| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

fn under_flood(port: u16, pid: u32, user: &Endpoint, runs: usize) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_ticks_with_children(pid);
    let idlers: Vec<_> = SOURCES
        .iter()
        .map(|from| {
            let (from, stop) = ((*from).to_owned(), stop.clone());
            std::thread::spawn(move || {
                let held: Vec<_> = (0..IDLE / SOURCES.len())
                    .filter_map(|_| connect_from(&from, port))
                    .collect();
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(held);
            })
        })
        .collect();
    let exchanges = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut done = 0;
            while done < EXCHANGES && !stop.load(Ordering::SeqCst) {
                let batch: Vec<_> = (0..IN_FLIGHT.min(EXCHANGES - done))
                    .map(|i| {
                        let [first, second] = SOURCES;
                        let from = if (done + i) % 2 == 0 { first } else { second };
                        std::thread::spawn(move || exchange(from, port))
                    })
                    .collect();
                done += batch.len();
                for t in batch {
                    let _ = t.join();
                }
            }
        })
    };
    // Let the flood build up, then log in, one login at a time.
    std::thread::sleep(Duration::from_millis(500));
    let mut logins_ms = Vec::new();
    let mut failed = 0;
    for _ in 0..runs {
        match timed(user.ssh(&[]).arg("true").stdin(std::process::Stdio::null())) {
            Ok(d) => logins_ms.push(ms(d)),
            Err(_) => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = exchanges.join();
    stop.store(true, Ordering::SeqCst);
    for t in idlers {
        let _ = t.join();
    }
    // The server's children (sshd's per-connection processes) are counted once reaped.
    std::thread::sleep(Duration::from_secs(3));
    let cpu_s =
        (cpu_ticks_with_children(pid).saturating_sub(cpu0)) as f64 / procfs::ticks_per_second();
    Outcome {
        logins_ms,
        failed,
        cpu_s,
    }
}

pub fn figures(rig: &mut Rig, runs: usize) -> Vec<Figure> {
    let mut run = || -> Result<(Outcome, Outcome)> {
        // Berth with the door's defaults (the rest of the run raises its limits for the
        // crowd), warmed up again after the restart.
        rig.berth.door_defaults(true)?;
        rig.alice.run("true")?;
        let berth = under_flood(rig.alice.port, rig.berth_pid()?, &rig.alice, runs);
        rig.berth.door_defaults(false)?;
        // OpenSSH as Debian ships it: its own MaxStartups (10:30:100), not the bench's 1000.
        let dir = rig.path("sshd-stock");
        let stock = OpenSsh::start_with(
            &dir,
            &rig.sshd_path,
            &std::fs::read_to_string(rig.root.key.with_extension("pub"))?,
            "",
        )?;
        let root = Endpoint::new(stock.port, "root", &rig.root.key);
        root.run("true")?;
        let openssh = under_flood(stock.port, stock.pid(), &root, runs);
        Ok((berth, openssh))
    };
    match run() {
        Ok((b, o)) => {
            let note = format!(
                "{IDLE} idle connections and {EXCHANGES} group-18 exchanges ({IN_FLIGHT} in flight) from {} while the user logs in {runs} times; logins refused: Berth {}, OpenSSH {}",
                SOURCES.join(" and "),
                b.failed,
                o.failed
            );
            vec![
                Figure::new(
                    "login_under_flood",
                    "warm login during the flood (a user with a key, from 127.0.0.1)",
                    "ms",
                    "OpenSSH",
                )
                .percentiles()
                .note(note)
                .with(b.logins_ms, o.logins_ms, Ok(())),
                Figure::new(
                    "flood_server_cpu",
                    "server CPU spent during the flood (daemon, or sshd and its children)",
                    "s",
                    "OpenSSH",
                )
                .with(vec![b.cpu_s], vec![o.cpu_s], Ok(())),
            ]
        }
        Err(e) => vec![
            Figure::new(
                "login_under_flood",
                "warm login during the flood",
                "ms",
                "OpenSSH",
            )
            .failed(&e),
        ],
    }
}
