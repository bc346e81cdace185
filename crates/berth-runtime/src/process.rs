//! Killing what an exec left behind.
//!
//! Docker has no API to signal an exec, and closing the attached stream does not end a TTY
//! exec (moby/moby#9098). The daemon runs in the host PID namespace, so it finds the exec's
//! host PID and its descendants in `/proc` and signals them itself. Every PID is checked
//! against the start time recorded when it was found, so a recycled PID is never signalled,
//! and must sit in the container's cgroup (its path names the container id), so nothing
//! outside the container is ever signalled.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The host process an exec started. On drop, unless [`finished`](Self::finished) was
/// called, the process and all its descendants get SIGHUP, then SIGKILL a moment later.
#[derive(Debug, Default)]
pub struct ProcessGuard {
    root: Option<(i32, u64)>,
    /// Only processes whose cgroup path contains this (the container id) are signalled.
    scope: String,
}

impl ProcessGuard {
    /// Guards `pid` if it is a live process of the container `scope`; otherwise guards
    /// nothing.
    pub(crate) fn new(pid: i32, scope: &str) -> Self {
        let root = start_time(pid)
            .filter(|_| in_scope(pid, scope))
            .map(|t| (pid, t));
        Self {
            root,
            scope: scope.to_owned(),
        }
    }

    /// The exec ended by itself; nothing to kill.
    pub fn finished(&mut self) {
        self.root = None;
    }

    pub fn pid(&self) -> Option<i32> {
        self.root.map(|(p, _)| p)
    }

    /// Sends `sig` to the exec's process and its live descendants.
    pub fn signal(&self, sig: Signal) {
        if let Some(root) = self.root {
            for (pid, _) in tree(root, &self.scope) {
                let _ = kill(Pid::from_raw(pid), sig);
            }
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if let Some(root) = self.root.take() {
            end_tree(
                root,
                std::mem::take(&mut self.scope),
                Duration::from_millis(300),
            );
        }
    }
}

impl ProcessGuard {
    /// Ends the exec's process tree as it is now (`berth session kill`): SIGHUP to each
    /// process, SIGKILL after `grace` to those still alive (checked by start time and scope,
    /// so a recycled PID is never signalled). The guard stays armed. Returns whether there
    /// was a live process to signal.
    pub fn end(&self, grace: Duration) -> bool {
        match self.root {
            Some(root) if start_time(root.0) == Some(root.1) => {
                end_tree(root, self.scope.clone(), grace);
                true
            }
            _ => false,
        }
    }
}

/// SIGHUP to `root`'s tree, SIGKILL to what of it is left after `grace`: off the async
/// runtime, on a thread of its own, which also walks the tree (the container decides its
/// size, up to her pids limit: a thousand processes are 60 ms of `/proc` reads). Only a
/// root still alive starts one.
fn end_tree(root: (i32, u64), scope: String, grace: Duration) {
    if start_time(root.0) != Some(root.1) {
        return;
    }
    let fallback = scope.clone();
    let reaper = std::thread::Builder::new()
        .name("berth-reaper".into())
        .spawn(move || {
            let procs = hang_up_tree(root, &scope);
            if procs.is_empty() {
                return;
            }
            // A shell given SIGHUP passes it on and exits; whatever ignores it is killed.
            std::thread::sleep(grace);
            for (pid, started) in procs {
                if start_time(pid) == Some(started) && in_scope(pid, &scope) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        });
    if let Err(e) = reaper {
        // Better late than never: SIGHUP to the session's own process, here (not the walk:
        // this may be an async worker, or a caller holding a lock); a shell passes it on.
        tracing::warn!(error = %e, "cannot start the reaper thread; SIGHUP to the root only");
        if start_time(root.0) == Some(root.1) && in_scope(root.0, &fallback) {
            let _ = kill(Pid::from_raw(root.0), Signal::SIGHUP);
        }
    }
}

/// SIGHUP to `root`'s tree as it is now; returns its members.
fn hang_up_tree(root: (i32, u64), scope: &str) -> Vec<(i32, u64)> {
    let procs = tree(root, scope);
    tracing::debug!(
        pid = root.0,
        count = procs.len(),
        "ending what is left of an exec"
    );
    for &(pid, started) in &procs {
        // Looked at again: the walk's length is hers (up to her pids limit), and one found
        // early may have ended and its PID been taken by a process that is not hers.
        if start_time(pid) == Some(started) && in_scope(pid, scope) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
        }
    }
    procs
}

/// `(pid, start time)` of `root` and every live descendant, `root` first. Empty when
/// `root` is gone or was recycled. Found through each process's children lists, so the cost
/// is the tree's size, not the host's process count.
fn tree(root: (i32, u64), scope: &str) -> Vec<(i32, u64)> {
    if start_time(root.0) != Some(root.1) || !in_scope(root.0, scope) {
        return Vec::new();
    }
    let mut out = vec![root];
    let mut seen = HashSet::from([root.0]);
    let mut queue = VecDeque::from([root.0]);
    while let Some(p) = queue.pop_front() {
        for child in children_of(p) {
            if seen.contains(&child) {
                continue;
            }
            // One caught moving to another parent is taken there, if that one is ours.
            let Some(stat) = read_stat(child).filter(|s| !s.zombie && s.ppid == p) else {
                continue;
            };
            if in_scope(child, scope) {
                seen.insert(child);
                out.push((child, stat.start_time));
                queue.push_back(child);
            }
        }
    }
    out
}

/// The children of every thread of process `pid` (a thread that forks is its child's
/// parent task), each thread's newest first.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .rev()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out
}

/// Passes over a process's children lists before a child is taken to be gone (see
/// [`Identity::child_with_ns_pid`]).
const CHILD_PASSES: usize = 3;

/// A process known by PID and start time: a process that took the PID since is not it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub pid: i32,
    pub start: u64,
}

impl Identity {
    pub(crate) fn of(pid: i32) -> Option<Self> {
        start_time(pid).map(|start| Self { pid, start })
    }

    /// Still running, and in container `scope`.
    pub(crate) fn alive(&self, scope: &str) -> bool {
        start_time(self.pid) == Some(self.start) && in_scope(self.pid, scope)
    }

    /// The host PID of this process's child whose PID in its own PID namespace is
    /// `ns_pid`, or `None` when it has already ended and been reaped.
    ///
    /// A child's parent is the thread that forked it. When that thread ends, the child moves
    /// to the thread group's leader (the first live thread), so one pass that read the
    /// leader's list before the move and the forking thread's after it misses the child;
    /// the move happens once, and the next pass finds it under the leader. (This used to
    /// fall back to reading every process's `stat` on the host: 3–4 ms a login with a few
    /// hundred processes, and most of the daemon's CPU in a crowd of short logins, whose
    /// process has often been reaped by then.) The kernel's lists can also leave out a live
    /// child while a sibling exits mid-read; a session missed so has no guard here, and is
    /// still hung up by the init when its connection closes.
    pub(crate) fn child_with_ns_pid(&self, ns_pid: i32) -> Option<i32> {
        let inner_pid = |child: i32| {
            std::fs::read_to_string(format!("/proc/{child}/status"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<i32>().ok())
        };
        let mut looked_at = HashSet::new();
        for _ in 0..CHILD_PASSES {
            for child in children_of(self.pid) {
                // A PID read once and not it is not it the next time either (unless
                // recycled, which takes the whole PID space).
                if looked_at.insert(child) && inner_pid(child) == Some(ns_pid) {
                    return Some(child);
                }
            }
        }
        None
    }
}

/// Whether `pid` belongs to the cgroup scope `scope` (empty matches everything: tests).
/// Sends SIGHUP to `pid` alone, if it is a live process of container `scope` (non-empty):
/// what a shell gets when its terminal goes away. Returns whether it was sent.
pub(crate) fn hang_up(pid: i32, scope: &str) -> bool {
    !scope.is_empty()
        && start_time(pid).is_some()
        && in_scope(pid, scope)
        && kill(Pid::from_raw(pid), Signal::SIGHUP).is_ok()
}

fn in_scope(pid: i32, scope: &str) -> bool {
    scope.is_empty()
        || std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(scope))
}

struct Stat {
    zombie: bool,
    ppid: i32,
    start_time: u64,
}

/// The start time of a live (not zombie) process.
fn start_time(pid: i32) -> Option<u64> {
    read_stat(pid).filter(|s| !s.zombie).map(|s| s.start_time)
}

fn read_stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses,
/// so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... starttime(22) → indices 0, 1, 19.
    Some(Stat {
        zombie: *fields.first()? == "Z",
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_child_by_its_namespace_pid() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let me = Identity::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(me.alive(""));
        // Same namespace here: the inner PID is the host PID.
        assert_eq!(me.child_with_ns_pid(pid), Some(pid));
        assert_eq!(me.child_with_ns_pid(1), None);
        child.kill().unwrap();
        child.wait().unwrap();
        let gone = Identity { pid, start: 0 };
        assert!(!gone.alive(""));
    }

    #[test]
    fn finds_a_child_whose_forking_thread_has_ended() {
        // The child moves to the leader when its parent thread ends; it must still be found
        // (and a child that is gone must not be).
        let mut child = std::thread::spawn(|| {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap()
        })
        .join()
        .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let me = Identity::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert_eq!(me.child_with_ns_pid(pid), Some(pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(me.child_with_ns_pid(pid), None);
    }

    #[test]
    fn parses_names_with_parens() {
        let s = "42 (a) b (c)) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123456 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.ppid, 7);
        assert_eq!(st.start_time, 123456);
    }

    #[test]
    fn kills_a_tree_on_drop() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let root = (pid, start_time(pid).unwrap());
        let members = tree(root, "");
        assert_eq!(members.len(), 3, "{members:?}");
        drop(ProcessGuard::new(pid, ""));
        child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        for (p, t) in &members[1..] {
            assert_ne!(start_time(*p), Some(*t), "descendant {p} survived");
        }
    }

    #[test]
    fn out_of_scope_process_is_never_signalled() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let g = ProcessGuard::new(pid, "0123456789abcdef-not-our-container");
        assert_eq!(g.pid(), None);
        drop(g);
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            child.try_wait().unwrap().is_none(),
            "a process outside the scope was killed"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn finished_guard_kills_nothing() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let mut g = ProcessGuard::new(pid, "");
        g.finished();
        drop(g);
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
