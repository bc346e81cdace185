//! What `/proc` says about the processes under test: resident memory, CPU time, children.

use anyhow::{Context, Result, anyhow};

/// Memory of one process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`: pages resident, shared ones included.
    pub rss_kib: u64,
    /// `Pss` from `smaps_rollup`: shared pages divided among their sharers; summing it over
    /// many forked processes (sshd) does not count the shared text many times.
    pub pss_kib: u64,
    /// `Anonymous` from `smaps_rollup`: the heap, stacks and other memory of its own, without
    /// the pages of code and files it maps.
    pub anon_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
            anon_kib: self.anon_kib + o.anon_kib,
        }
    }
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Ok(Memory {
        rss_kib: field_number(&status, "VmRSS:").unwrap_or(0),
        pss_kib: field_number(&rollup, "Pss:").unwrap_or(0),
        anon_kib: field_number(&rollup, "Anonymous:").unwrap_or(0),
    })
}

fn field_number(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// `(ppid, comm, utime + stime in ticks)` from `/proc/PID/stat`.
fn stat(pid: u32) -> Result<(u32, String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // comm is in parentheses and may itself hold spaces or parentheses: split at the last.
    let open = text.find('(').ok_or_else(|| anyhow!("bad stat"))?;
    let close = text.rfind(')').ok_or_else(|| anyhow!("bad stat"))?;
    let comm = text.get(open + 1..close).unwrap_or_default().to_owned();
    let rest: Vec<&str> = text
        .get(close + 1..)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // Fields after comm start at 3 (state); ppid is 4, utime 14, stime 15.
    let field = |n: usize| -> Result<u64> {
        rest.get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("bad stat field {n} for pid {pid}"))
    };
    Ok((field(4)? as u32, comm, field(14)? + field(15)?))
}

/// CPU time (user + system) a process has used so far, in ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    Ok(stat(pid)?.2)
}

pub fn comm(pid: u32) -> Option<String> {
    stat(pid).ok().map(|s| s.1)
}

/// Every process on the machine as `(pid, ppid, comm)`.
fn all() -> Vec<(u32, u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).ok().map(|(ppid, comm, _)| (pid, ppid, comm)))
        .collect()
}

/// `pid` and all its descendants, as `(pid, comm)`.
pub fn tree(pid: u32) -> Vec<(u32, String)> {
    let procs = all();
    let mut out: Vec<(u32, String)> = procs
        .iter()
        .filter(|p| p.0 == pid)
        .map(|p| (p.0, p.2.clone()))
        .collect();
    let mut i = 0;
    while let Some(&(parent, _)) = out.get(i) {
        out.extend(
            procs
                .iter()
                .filter(|p| p.1 == parent)
                .map(|p| (p.0, p.2.clone())),
        );
        i += 1;
    }
    out
}

/// Processes whose name is one of `names`.
pub fn named(names: &[&str]) -> Vec<u32> {
    all()
        .into_iter()
        .filter(|p| names.contains(&p.2.as_str()))
        .map(|p| p.0)
        .collect()
}

/// Sum of the memory of `pids` (processes that vanished count as nothing).
pub fn memory_of(pids: &[u32]) -> Memory {
    pids.iter()
        .filter_map(|p| memory(*p).ok())
        .fold(Memory::default(), |a, b| a + b)
}

/// What the threads of some processes have done so far: CPU time from the scheduler's own
/// accounting (`/proc/PID/task/TID/schedstat`, nanoseconds, not 10 ms ticks) and context
/// switches (each one a sleep and a wake-up, or a preemption).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Work {
    pub cpu_ns: u64,
    pub switches: u64,
}

impl Work {
    /// What was done between `self` and `later`.
    pub fn until(self, later: Work) -> Work {
        Work {
            cpu_ns: later.cpu_ns.saturating_sub(self.cpu_ns),
            switches: later.switches.saturating_sub(self.switches),
        }
    }
}

/// The [`Work`] of every thread of `pids` now (threads that ended are not counted).
pub fn work_of(pids: &[u32]) -> Work {
    let mut w = Work::default();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let sched = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            w.cpu_ns += sched
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            w.switches += field_number(&status, "voluntary_ctxt_switches:").unwrap_or(0)
                + field_number(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0);
        }
    }
    w
}

/// Sum of the CPU ticks of `pids` (processes that vanished count as nothing).
pub fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p).ok()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(memory(me).unwrap().rss_kib > 0);
        let before = work_of(&[me]);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let done = before.until(work_of(&[me]));
        assert!(done.cpu_ns > 0 && done.switches >= 1, "{done:?}");
        assert!(comm(me).is_some());
        assert_eq!(tree(me).first().map(|p| p.0), Some(me));
    }
}
