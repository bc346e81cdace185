//! What a server holds for clients that push more than it can use (issue 14, points 2–3):
//! 40 sessions whose clients send `/dev/zero` as fast as they are let into a process that
//! never reads it (`ssh USER 'sleep 600' </dev/zero`). Berth against OpenSSH on the same
//! loopback: the server's memory and descriptors while it lasts, and once the clients are
//! gone.

use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::client::Endpoint;
use crate::figure::Figure;
use crate::interrupt;
use crate::procfs;
use crate::rig::Rig;

const SESSIONS: usize = 40;
/// How long the clients push before the measurement.
const PUSH: Duration = Duration::from_secs(5);

/// Descriptors open in `pids` together.
fn descriptors(pids: &[u32]) -> usize {
    pids.iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(Iterator::count)
        .sum()
}

struct Clients(Vec<Child>);

impl Drop for Clients {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Opens the flooding sessions on `eps` in turn, ten at a time (both servers let a source
/// hold only ten unauthenticated connections), each batch waited for.
fn open(eps: &[Endpoint], count: impl Fn() -> Result<usize>) -> Result<Clients> {
    let mut clients = Clients(Vec::new());
    let before = count()?;
    for (i, e) in eps.iter().cycle().take(SESSIONS).enumerate() {
        interrupt::check()?;
        clients.0.push(
            e.ssh(&[])
                .arg("sleep 600")
                .stdin(std::fs::File::open("/dev/zero")?)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()?,
        );
        if (i + 1) % 10 == 0 {
            let want = before + i + 1;
            let end = Instant::now() + Duration::from_secs(120);
            while count()? < want {
                if Instant::now() > end {
                    bail!("only {} of {want} sessions opened", count()?);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(clients)
}

/// How long after the clients are gone the server is read: the daemon gives memory freed
/// back to the kernel every 10 s.
const SETTLE: Duration = Duration::from_secs(15);

/// (memory MiB, descriptors) during the flood, and what the flood left (after − before), for
/// the processes `pids` gives. "Before" follows one login of each user and `settle` (a
/// daemon just restarted makes a user's state at her first login: not the flood's).
fn measure(
    eps: &[Endpoint],
    count: impl Fn() -> Result<usize>,
    pids: impl Fn() -> Vec<u32>,
    mib: impl Fn(&[u32]) -> f64,
    settle: Duration,
) -> Result<[(f64, f64); 2]> {
    for e in eps {
        e.run("true")?;
    }
    std::thread::sleep(settle);
    let p = pids();
    let before = (mib(&p), descriptors(&p) as f64);
    let clients = open(eps, &count)?;
    std::thread::sleep(PUSH);
    let p = pids();
    let during = (mib(&p), descriptors(&p) as f64);
    drop(clients);
    let end = Instant::now() + Duration::from_secs(60);
    while count()? > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(SETTLE);
    let p = pids();
    let left = (mib(&p) - before.0, descriptors(&p) as f64 - before.1);
    Ok([during, left])
}

/// Sessions of the second loop: each with agent and remote forwarding.
const FORWARDING_SESSIONS: usize = 300;

/// `FORWARDING_SESSIONS` sessions, ten at a time, each `ssh -A -R 0:127.0.0.1:1 ... true`;
/// returns (memory MiB, descriptors) of `pids` 3 s after the last, minus before.
fn forwarding_loop(
    eps: &[Endpoint],
    pids: impl Fn() -> Vec<u32>,
    mib: impl Fn(&[u32]) -> f64,
    agent: &std::path::Path,
) -> Result<(f64, f64)> {
    let p = pids();
    let before = (mib(&p), descriptors(&p) as f64);
    let mut eps = eps.iter().cycle();
    for _ in 0..FORWARDING_SESSIONS / 10 {
        interrupt::check()?;
        let batch: Vec<Child> = eps
            .by_ref()
            .take(10)
            .map(|e| {
                e.ssh(&["-A", "-R", "0:127.0.0.1:1"])
                    .arg("true")
                    .env("SSH_AUTH_SOCK", agent)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .collect::<std::io::Result<_>>()?;
        for mut c in batch {
            c.wait()?;
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let p = pids();
    Ok((mib(&p) - before.0, descriptors(&p) as f64 - before.1))
}

pub fn figures(rig: &mut Rig) -> Vec<Figure> {
    let figures = [
        Figure::new(
            "stdin_flood_memory",
            format!(
                "server memory while {SESSIONS} clients push /dev/zero into `sleep` (never read)"
            ),
            "MiB",
            "OpenSSH",
        )
        .note("Berth: daemon RSS; OpenSSH: PSS summed over all sshd processes"),
        Figure::new(
            "stdin_flood_descriptors",
            format!("server descriptors while {SESSIONS} clients push /dev/zero into `sleep`"),
            "descriptors",
            "OpenSSH",
        )
        .note("Berth: the daemon's; OpenSSH: summed over all sshd processes"),
        Figure::new(
            "stdin_flood_memory_left",
            "server memory left once those clients are gone (after − before)",
            "MiB",
            "OpenSSH",
        )
        .difference()
        .note(format!(
            "read {} s after the last session ended (the daemon gives freed memory back every 10 s)",
            SETTLE.as_secs()
        )),
        Figure::new(
            "stdin_flood_descriptors_left",
            "server descriptors left once those clients are gone (after − before)",
            "descriptors",
            "OpenSSH",
        )
        .difference(),
        Figure::new(
            "forwarding_sessions_memory_left",
            format!(
                "server memory left by {FORWARDING_SESSIONS} sessions with -A and -R (after − before)"
            ),
            "MiB",
            "OpenSSH",
        )
        .difference(),
        Figure::new(
            "forwarding_sessions_descriptors_left",
            format!(
                "server descriptors left by {FORWARDING_SESSIONS} sessions with -A and -R (after − before)"
            ),
            "descriptors",
            "OpenSSH",
        )
        .difference(),
    ];
    let fail = |e: anyhow::Error| figures.iter().map(|f| f.clone().failed(&e)).collect();
    // Four users: one user's connections are capped (32 by default).
    let eps = match rig.crowd(4) {
        Ok(u) => u,
        Err(e) => return fail(e),
    };
    let berth_pid = match rig.berth_pid() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let rss = |p: &[u32]| procfs::memory_of(p).rss_kib as f64 / 1024.0;
    let pss = |p: &[u32]| procfs::memory_of(p).pss_kib as f64 / 1024.0;
    let berth = match measure(
        &eps,
        || rig.berth.sessions(),
        || vec![berth_pid],
        rss,
        SETTLE,
    ) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let sshd_pid = rig.openssh.pid();
    let sleeps = || -> Result<usize> {
        Ok(procfs::tree(sshd_pid)
            .iter()
            .filter(|(_, comm)| comm == "sleep")
            .count())
    };
    let sshds = || -> Vec<u32> {
        procfs::tree(sshd_pid)
            .into_iter()
            .filter(|(_, comm)| comm == "sshd")
            .map(|(pid, _)| pid)
            .collect()
    };
    let root = vec![rig.root.clone()];
    // sshd's sessions are processes that end with them: nothing to settle.
    let openssh = match measure(&root, sleeps, sshds, pss, Duration::ZERO) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    // The second loop (issue 14 point 2): sessions that open forwardings and end.
    let agent = rig.dir.path().join("hoard-agent.sock");
    let _agent = match std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&agent)
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => Clients(vec![c]),
        Err(e) => return fail(e.into()),
    };
    std::thread::sleep(Duration::from_millis(500));
    let berth_loop = match forwarding_loop(&eps, || vec![berth_pid], rss, &agent) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let openssh_loop = match forwarding_loop(&root, sshds, pss, &agent) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let [
        memory,
        descriptors,
        memory_left,
        descriptors_left,
        loop_memory,
        loop_descriptors,
    ] = figures;
    vec![
        loop_memory.with(vec![berth_loop.0], vec![openssh_loop.0], Ok(())),
        loop_descriptors.with(vec![berth_loop.1], vec![openssh_loop.1], Ok(())),
        memory.with(vec![berth[0].0], vec![openssh[0].0], Ok(())),
        descriptors.with(vec![berth[0].1], vec![openssh[0].1], Ok(())),
        memory_left.with(vec![berth[1].0], vec![openssh[1].0], Ok(())),
        descriptors_left.with(vec![berth[1].1], vec![openssh[1].1], Ok(())),
    ]
}
