//! The open sessions, daemon-wide: for `berth status`, `berth session kill ID`, the
//! `berth_sessions_open` gauge and the audit log's `session_start`/`session_end`.
//!
//! A session is registered when its process starts and leaves the registry when the
//! [`Registration`] (held by the session's process control) is dropped, however the session
//! ended. Killing one signals its process tree in the container (SIGHUP, then SIGKILL): the
//! session then ends the ordinary way, its client getting the exit status.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use berth_proto::SessionInfo;
use berth_runtime::ProcessGuard;

use crate::audit::{Audit, Event};

/// A session's process tree, shared by its control (which finishes or drops it) and the
/// registry (which may signal it).
pub type SharedGuard = Arc<Mutex<ProcessGuard>>;

struct Entry {
    info: SessionInfo,
    ender: Ender,
}

/// How `session kill` ends a session.
enum Ender {
    /// Signal its process tree in the container.
    Process(Weak<Mutex<ProcessGuard>>),
    /// Cancel it (a `berth connect` mount, which runs in the daemon).
    Cancel(tokio_util::sync::CancellationToken),
}

pub struct Sessions {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Entry>>,
    audit: Arc<Audit>,
}

impl Sessions {
    pub fn new(audit: Arc<Audit>) -> Arc<Self> {
        Arc::new(Self {
            next: AtomicU64::new(1),
            open: Mutex::new(BTreeMap::new()),
            audit,
        })
    }

    /// Records a session that just started its process.
    pub fn register(
        self: &Arc<Self>,
        user: &str,
        peer: Option<SocketAddr>,
        command: String,
        guard: &SharedGuard,
    ) -> Registration {
        self.enter(user, peer, command, Ender::Process(Arc::downgrade(guard)))
    }

    /// Records a session served by the daemon itself (a `berth connect` mount); `session
    /// kill` cancels `cancel`.
    pub fn register_cancellable(
        self: &Arc<Self>,
        user: &str,
        peer: Option<SocketAddr>,
        command: String,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Registration {
        self.enter(user, peer, command, Ender::Cancel(cancel))
    }

    fn enter(
        self: &Arc<Self>,
        user: &str,
        peer: Option<SocketAddr>,
        command: String,
        ender: Ender,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let info = SessionInfo {
            id,
            user: user.to_owned(),
            from: peer.map_or_else(|| "-".into(), |p| p.to_string()),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            command,
        };
        self.audit.record(Event::SessionStart {
            id,
            user: info.user.clone(),
            peer: info.from.clone(),
            command: info.command.clone(),
        });
        metrics::gauge!("berth_sessions_open").increment(1.0);
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, Entry { info, ender });
        }
        Registration {
            id,
            sessions: self.clone(),
            exit: None,
        }
    }

    /// The open sessions, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        self.open
            .lock()
            .map(|o| o.values().map(|e| e.info.clone()).collect())
            .unwrap_or_default()
    }

    /// Ends session `id`: SIGHUP to its processes (as they are when the reaper thread walks
    /// them, at once), SIGKILL two seconds later to those still there (even if the
    /// session's own process is gone by then).
    pub fn kill(&self, id: u64) -> Result<SessionInfo, KillError> {
        let (info, signalled) = {
            let open = self.open.lock().map_err(|_| KillError::NoSuchSession)?;
            let e = open.get(&id).ok_or(KillError::NoSuchSession)?;
            let signalled = match &e.ender {
                Ender::Process(guard) => guard
                    .upgrade()
                    .is_some_and(|g| g.lock().is_ok_and(|g| g.end(Duration::from_secs(2)))),
                Ender::Cancel(token) => {
                    token.cancel();
                    true
                }
            };
            (e.info.clone(), signalled)
        };
        if signalled {
            Ok(info)
        } else {
            Err(KillError::NothingToSignal(info))
        }
    }
}

#[derive(Debug)]
pub enum KillError {
    NoSuchSession,
    /// The session is open but no process of it is known to the daemon (its process ended
    /// and the session is closing, or the container's init did not say which it was).
    NothingToSignal(SessionInfo),
}

/// Keeps a session in the registry; dropping it records the session's end.
pub struct Registration {
    id: u64,
    sessions: Arc<Sessions>,
    exit: Option<u32>,
}

impl Registration {
    pub fn set_exit(&mut self, code: u32) {
        self.exit = Some(code);
    }

    /// What shows for the session from now on (a mount's path, once known).
    pub fn describer(&self) -> Describer {
        Describer {
            id: self.id,
            sessions: Arc::downgrade(&self.sessions),
        }
    }
}

/// Changes what `session list` shows for one session while it is open.
pub struct Describer {
    id: u64,
    sessions: Weak<Sessions>,
}

impl Describer {
    pub fn describe(&self, command: String) {
        if let Some(sessions) = self.sessions.upgrade()
            && let Ok(mut open) = sessions.open.lock()
            && let Some(e) = open.get_mut(&self.id)
        {
            e.info.command = command;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let entry = self
            .sessions
            .open
            .lock()
            .ok()
            .and_then(|mut o| o.remove(&self.id));
        metrics::gauge!("berth_sessions_open").decrement(1.0);
        let user = entry.map(|e| e.info.user).unwrap_or_default();
        self.sessions.audit.record(Event::SessionEnd {
            id: self.id,
            user,
            exit: self.exit,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_with_no_known_process_says_so() {
        let sessions = Sessions::new(Arc::new(Audit::log_only()));
        // A session whose process the daemon could not identify guards nothing.
        let guard: SharedGuard = Arc::new(Mutex::new(ProcessGuard::default()));
        let reg = sessions.register("alice", None, "sleep 60".into(), &guard);
        match sessions.kill(reg.id) {
            Err(KillError::NothingToSignal(info)) => assert_eq!(info.user, "alice"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            sessions.kill(reg.id + 1),
            Err(KillError::NoSuchSession)
        ));
        drop(reg);
        assert!(matches!(sessions.kill(1), Err(KillError::NoSuchSession)));
    }
}
