//! Many users at once: a burst of simultaneous logins (every one must succeed), and many
//! idle sessions left open while the daemon's memory and CPU are read.

use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::client::{Endpoint, ms};
use crate::figure::Figure;
use crate::interrupt;
use crate::procfs::{self, Memory};
use crate::rig::Rig;

/// Starts `ssh E true` for every endpoint at once and waits for all; returns each client's
/// wall time and the failures (all are waited for either way).
fn burst(endpoints: &[Endpoint]) -> Result<(Vec<f64>, Vec<String>)> {
    let mut started = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        let t = Instant::now();
        let child = e
            .ssh(&[])
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()?;
        started.push((e.user.clone(), t, child));
    }
    type Ended = (String, Duration, std::io::Result<std::process::Output>);
    let results: Vec<Ended> = std::thread::scope(|s| {
        let handles: Vec<_> = started
            .into_iter()
            .map(|(user, t, child)| {
                s.spawn(move || {
                    let out = child.wait_with_output();
                    (user, t.elapsed(), out)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for (user, t, out) in results {
        match out {
            Ok(o) if o.status.success() => times.push(ms(t)),
            Ok(o) => failures.push(format!(
                "{user}: {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => failures.push(format!("{user}: {e}")),
        }
    }
    Ok((times, failures))
}

/// Runs `f` over `items` with at most `width` at a time.
fn in_parallel<T: Sync>(
    items: &[T],
    width: usize,
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    for chunk in items.chunks(width.max(1)) {
        interrupt::check()?;
        std::thread::scope(|s| {
            let hs: Vec<_> = chunk.iter().map(|i| s.spawn(|| f(i))).collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread died")))
                })
                .collect::<Result<Vec<()>>>()
        })?;
    }
    Ok(())
}

/// `n` users logging in at the same moment: warm (containers running) against as many
/// OpenSSH logins at once, then cold (containers stopped).
pub fn simultaneous(rig: &mut Rig, n: usize, rounds: usize, cold_rounds: usize) -> Vec<Figure> {
    let warm = Figure::new(
        "crowd_warm",
        format!("{n} logins at once (`ssh USER true`), containers running"),
        "ms",
        "OpenSSH",
    )
    .percentiles();
    let cold = Figure::new(
        "crowd_cold",
        format!("{n} logins at once, containers stopped"),
        "ms",
        "OpenSSH",
    )
    .percentiles()
    .note("baseline: the same OpenSSH bursts as the warm row (the host has nothing to start)");
    let users = match rig.crowd(n) {
        Ok(u) => u,
        Err(e) => return vec![warm.failed(&e), cold.failed(&e)],
    };
    // Containers made beforehand, a few at a time (untimed).
    if let Err(e) = in_parallel(&users, 4, |u| u.run("true").map(drop)) {
        return vec![warm.failed(&e), cold.failed(&e)];
    }
    // Without the idle sessions before (`--only crowd`), the load starts here.
    if rig.berth_before_load.is_none() {
        std::thread::sleep(SETTLE);
        rig.berth_before_load = Some(
            rig.berth_pid()
                .and_then(procfs::memory)
                .map_err(|e| format!("{e:#}")),
        );
    }
    let root: Vec<Endpoint> = (0..n).map(|_| rig.root.clone()).collect();

    let (mut b, mut o, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    let outcome = (|| -> Result<()> {
        for round in 0..rounds {
            let sides: [(&[Endpoint], &mut Vec<f64>); 2] = if round % 2 == 0 {
                [(&users, &mut b), (&root, &mut o)]
            } else {
                [(&root, &mut o), (&users, &mut b)]
            };
            for (eps, samples) in sides {
                interrupt::check()?;
                let (t, f) = burst(eps)?;
                samples.extend(t);
                failed.extend(f);
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        check_failures(&failed)
    })();
    let baseline = o.clone();
    let warm = warm.with(b, o, outcome);

    let docker = Figure::new(
        "crowd_cold_docker",
        format!("{n} logins at once, containers stopped, vs the same {n} containers started at once through the engine's API"),
        "ms",
        "Docker floor",
    )
    .percentiles()
    .note("floor: POST /containers/{id}/start of the same stopped containers, all at once, each timed until the engine answers; Berth's part is what its logins take beyond that");
    let containers: Vec<String> = users.iter().map(|u| rig.tag.container(&u.user)).collect();
    let stopped = |rig: &Rig| -> Result<()> {
        for c in &containers {
            if rig.engine.running(c)? != Some(false) {
                bail!("{c} did not stop");
            }
        }
        Ok(())
    };
    let (mut b, mut floor, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    let outcome = (|| -> Result<()> {
        for _ in 0..cold_rounds {
            interrupt::check()?;
            in_parallel(&users, 10, |u| u.run("stop").map(drop))?;
            stopped(rig)?;
            std::thread::sleep(Duration::from_secs(1));
            floor.extend(start_at_once(rig, &containers)?);
            in_parallel(&containers, 10, |c| rig.engine.stop(c))?;
            stopped(rig)?;
            std::thread::sleep(Duration::from_secs(1));
            let (t, f) = burst(&users)?;
            b.extend(t);
            failed.extend(f);
        }
        check_failures(&failed)
    })();
    let docker_outcome = match &outcome {
        Ok(()) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    let cold = cold.with(b.clone(), baseline, outcome);
    let docker = docker.with(b, floor, docker_outcome);
    let mut figures = vec![warm, cold, docker];
    figures.extend(memory_after_load(rig));
    figures
}

/// Starts every container in `names` at the same moment through the engine's API; each
/// one's time from that moment until the engine answered.
fn start_at_once(rig: &Rig, names: &[String]) -> Result<Vec<f64>> {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = names
            .iter()
            .map(|c| {
                s.spawn(move || {
                    rig.engine.start(c)?;
                    Ok(ms(t0.elapsed()))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread died")))
            })
            .collect()
    })
}

/// How long the daemon may take to hand back what a load freed: its allocator's trim runs
/// every 10 s.
const SETTLE: Duration = Duration::from_secs(15);

/// The daemon's memory once the idle sessions and the crowds have ended and it has been quiet
/// for [`SETTLE`], against the same daemon at rest before them, each user logged in once
/// (the target: what the load took, given back) and against the daemon at rest after start, with no user (what
/// the 100 users themselves cost comes on top: their state, and the code their logins ran).
/// RSS, and its own memory alone (anonymous: heap and stacks, without the pages of code).
fn memory_after_load(rig: &Rig) -> Vec<Figure> {
    let rss = Figure::new(
        "daemon_memory_after_load",
        "daemon memory after 500 idle sessions and the crowds ended (RSS) vs at rest before them",
        "MiB",
        "before",
    )
    .note(format!(
        "read {} s after the last session ended; before: the same daemon at rest with the same users, each logged in once since it started (containers running, no session), before the idle sessions",
        SETTLE.as_secs()
    ));
    let anon = Figure::new(
        "daemon_heap_after_load",
        "the same, its own memory only (anonymous: heap and stacks, no code)",
        "MiB",
        "before",
    );
    let rss_start = Figure::new(
        "daemon_memory_after_load_vs_start",
        "the same RSS vs at rest after start (no user, no session)",
        "MiB",
        "at start",
    )
    .note("the difference is mostly what the 100 users cost while they exist (their owners' state, the code their logins ran), not the load's");
    let anon_start = Figure::new(
        "daemon_heap_after_load_vs_start",
        "the same, anonymous, vs at rest after start",
        "MiB",
        "at start",
    );
    let end = Instant::now() + Duration::from_secs(60);
    while rig.berth.sessions().unwrap_or(0) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(SETTLE);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let at_start = rig.berth_at_start;
    let now = match rig.berth_pid().and_then(procfs::memory) {
        Ok(m) => m,
        Err(e) => {
            return vec![
                rss.failed(&e),
                anon.failed(&e),
                rss_start.failed(&e),
                anon_start.failed(&e),
            ];
        }
    };
    let against_start = [
        rss_start.with(vec![mib(now.rss_kib)], vec![mib(at_start.rss_kib)], Ok(())),
        anon_start.with(
            vec![mib(now.anon_kib)],
            vec![mib(at_start.anon_kib)],
            Ok(()),
        ),
    ];
    let against_before = match &rig.berth_before_load {
        Some(Ok(b)) => [
            rss.with(vec![mib(now.rss_kib)], vec![mib(b.rss_kib)], Ok(())),
            anon.with(vec![mib(now.anon_kib)], vec![mib(b.anon_kib)], Ok(())),
        ],
        other => {
            let why = match other {
                Some(Err(e)) => format!("no reading of the daemon at rest before the load: {e}"),
                _ => "no reading of the daemon at rest before the load".to_owned(),
            };
            let e = anyhow::anyhow!(why);
            [rss.failed(&e), anon.failed(&e)]
        }
    };
    against_before.into_iter().chain(against_start).collect()
}

fn check_failures(failed: &[String]) -> Result<()> {
    if let Some(first) = failed.first() {
        bail!("{} login(s) failed; first: {first}", failed.len());
    }
    Ok(())
}

/// Open `ssh -n E 'sleep …'` clients kept until dropped (then killed by pid and reaped).
struct Idle {
    children: Vec<Child>,
}

impl Idle {
    fn open(
        endpoints: &[Endpoint],
        command: &str,
        count: impl Fn() -> Result<usize>,
        n: usize,
    ) -> Result<Self> {
        let mut idle = Self {
            children: Vec::new(),
        };
        let before = count()?;
        for (i, e) in endpoints.iter().cycle().take(n).enumerate() {
            interrupt::check()?;
            idle.children.push(
                e.ssh(&["-n"])
                    .arg(command)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .process_group(0)
                    .spawn()?,
            );
            // In batches, each waited for, so that the opening is not a storm.
            if (i + 1) % 50 == 0 || i + 1 == n {
                let want = before + i + 1;
                let end = Instant::now() + Duration::from_secs(120);
                while count()? < want {
                    if let Some(dead) = idle
                        .children
                        .iter_mut()
                        .find_map(|c| c.try_wait().ok().flatten())
                    {
                        bail!("an idle session's client exited ({dead})");
                    }
                    if Instant::now() > end {
                        bail!("only {} of {want} sessions opened", count()?);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Ok(idle)
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// Memory and CPU of a set of processes over a window at rest.
struct Rest {
    memory: Memory,
    /// CPU time used per second of wall time, in seconds (1.0 = one core busy).
    cpu: f64,
}

fn at_rest(pids: impl Fn() -> Vec<u32>, window: Duration) -> Rest {
    let set = pids();
    let t0 = procfs::ticks_of(&set);
    std::thread::sleep(window);
    let t1 = procfs::ticks_of(&set);
    Rest {
        memory: procfs::memory_of(&pids()),
        cpu: t1.saturating_sub(t0) as f64 / procfs::ticks_per_second() / window.as_secs_f64(),
    }
}

fn engine_pids() -> Vec<u32> {
    procfs::named(&["dockerd", "containerd", "containerd-shim"])
}

/// `n` idle sessions open on Berth (spread over the crowd users) and then on OpenSSH: the
/// daemon's memory and CPU at rest before and with them, per session.
pub fn idle(rig: &mut Rig, users: usize, n: usize, window: Duration) -> Vec<Figure> {
    let mem = Figure::new(
        "idle_memory_per_session",
        format!("memory per idle session ({n} open, `ssh USER 'sleep 3600'`)"),
        "KiB",
        "OpenSSH",
    )
    .note("Berth: growth of the daemon's RSS (restarted just before, all containers running) / sessions; OpenSSH: growth of the PSS summed over all sshd processes / sessions");
    let cpu = Figure::new(
        "idle_cpu_per_session",
        format!("CPU per idle session at rest ({n} open)"),
        "µs/s",
        "OpenSSH",
    )
    .note("CPU time used per second of wall time, per session, over the rest window; Berth sends keepalives (every 15 s by default), sshd none by default");
    let engine_mem = Figure::new(
        "idle_engine_memory_per_session",
        format!("Docker engine memory per idle Berth session ({n} open)"),
        "KiB",
        "—",
    )
    .note("dockerd + containerd + shims PSS growth / sessions: what each Docker exec costs outside Berth");
    let total = Figure::new(
        "idle_memory_total",
        format!("daemon memory with {n} idle sessions"),
        "MiB",
        "OpenSSH",
    )
    .note("Berth: daemon RSS; OpenSSH: PSS summed over all sshd processes");
    let berth_rest_figure = Figure::new(
        "daemon_cpu_at_rest",
        format!("daemon CPU at rest with {n} idle sessions"),
        "% of a core",
        "OpenSSH",
    );
    let fail = |e: anyhow::Error| {
        vec![
            mem.clone().failed(&e),
            total.clone().failed(&e),
            cpu.clone().failed(&e),
            engine_mem.clone().failed(&e),
            berth_rest_figure.clone().failed(&e),
        ]
    };
    let eps = match rig.crowd(users) {
        Ok(u) => u,
        Err(e) => return fail(e),
    };
    // Every container running, no session: the "before", on a daemon restarted just now
    // (it adopts the running containers), so that memory freed by earlier work cannot
    // hide what the sessions take.
    if let Err(e) = in_parallel(&eps, 4, |u| u.run("true").map(drop)) {
        return fail(e);
    }
    if let Err(e) = rig.berth.restart() {
        return fail(e);
    }
    let berth_pid = match rig.berth_pid() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    std::thread::sleep(Duration::from_secs(3));
    let berth_pids = || vec![berth_pid];
    // Without sessions a server does next to nothing: a third of the window (at least 10 s)
    // reads its rate well enough, and keeps the full run short.
    let before = (window / 3).max(Duration::from_secs(10)).min(window);
    let b0 = at_rest(berth_pids, before);
    let e0 = procfs::memory_of(&engine_pids());
    // The daemon before the load (the idle sessions and the crowds): each of its users has
    // logged in once since it started, so what a user costs while she exists (her owner, the
    // code of a login) is there already, and the load's own memory is what is to come back.
    // (The figures per idle session keep b0, read before these logins, as their "before".)
    if let Err(e) = in_parallel(&eps, 4, |u| u.run("true").map(drop)) {
        return fail(e);
    }
    std::thread::sleep(SETTLE);
    match procfs::memory(berth_pid) {
        Ok(m) => rig.berth_before_load = Some(Ok(m)),
        Err(e) => return fail(e),
    }
    let berth = (|| -> Result<(Rest, Memory)> {
        let _idle = Idle::open(&eps, "sleep 3600", || rig.berth.sessions(), n)?;
        std::thread::sleep(Duration::from_secs(5));
        let rest = at_rest(berth_pids, window);
        Ok((rest, procfs::memory_of(&engine_pids())))
    })();
    let (b1, e1) = match berth {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    // Berth's sessions end with their clients; wait before loading the machine again.
    let end = Instant::now() + Duration::from_secs(60);
    while rig.berth.sessions().unwrap_or(0) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }

    let sshd_pid = rig.openssh.pid();
    let sshds = || -> Vec<u32> {
        procfs::tree(sshd_pid)
            .into_iter()
            .filter(|(_, comm)| comm == "sshd")
            .map(|(pid, _)| pid)
            .collect()
    };
    let o0 = at_rest(sshds, before);
    let sleeps = || -> Result<usize> {
        Ok(procfs::tree(sshd_pid)
            .iter()
            .filter(|(_, comm)| comm == "sleep")
            .count())
    };
    let root: Vec<Endpoint> = vec![rig.root.clone()];
    let openssh = (|| -> Result<Rest> {
        let _idle = Idle::open(&root, "sleep 3601", sleeps, n)?;
        std::thread::sleep(Duration::from_secs(5));
        Ok(at_rest(sshds, window))
    })();
    let o1 = match openssh {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
    let cpu_per = |a: f64, b: f64| (b - a) * 1e6 / n as f64;
    vec![
        mem.with(
            vec![per(b0.memory.rss_kib, b1.memory.rss_kib)],
            vec![per(o0.memory.pss_kib, o1.memory.pss_kib)],
            Ok(()),
        ),
        total.with(
            vec![b1.memory.rss_kib as f64 / 1024.0],
            vec![o1.memory.pss_kib as f64 / 1024.0],
            Ok(()),
        ),
        cpu.with(
            vec![cpu_per(b0.cpu, b1.cpu)],
            vec![cpu_per(o0.cpu, o1.cpu)],
            Ok(()),
        ),
        engine_mem.with(vec![per(e0.pss_kib, e1.pss_kib)], vec![], Ok(())),
        berth_rest_figure.with(vec![b1.cpu * 100.0], vec![o1.cpu * 100.0], Ok(())),
    ]
}
