//! What one user may hold at once across all her connections — connections, sessions,
//! forwarded connections — and the client input the daemon buffers for her and for
//! everyone. One user cannot take the daemon's descriptors, tasks or memory from the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Per-user caps (`[limits]` in the config).
#[derive(Debug, Clone)]
pub struct UserLimits {
    /// Authenticated connections open at once.
    pub connections: usize,
    /// Session channels (shells, commands, sftp) open at once.
    pub sessions: usize,
    /// Forwarded connections open at once: `-L`/`-D` tunnels and the connections accepted
    /// on `-R` ports and sockets, agent sockets and X11 displays.
    pub forwards: usize,
    /// Client input the daemon may hold for the user's channels, in bytes.
    pub input_buffer_bytes: usize,
}

impl Default for UserLimits {
    fn default() -> Self {
        Self {
            connections: 32,
            sessions: 64,
            forwards: 256,
            input_buffer_bytes: 64 << 20,
        }
    }
}

/// What a slot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    Connection,
    Session,
    Forward,
}

impl Held {
    /// The words of a refusal (audit record and what the client is told).
    pub(crate) fn refusal(self) -> &'static str {
        match self {
            Self::Connection => "too many connections for this user",
            Self::Session => "too many sessions for this user",
            Self::Forward => "too many forwarded connections for this user",
        }
    }
}

struct UserQuota {
    /// Her name, shared by what she holds ([`Holding`]).
    name: Arc<str>,
    connections: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    forwards: Arc<Semaphore>,
    /// KiB of input buffer.
    input: Arc<Semaphore>,
}

/// One thing held by a user; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    // Given back before `_held` looks at what she still holds (fields drop in order).
    _permit: OwnedSemaphorePermit,
    _held: Holding,
}

/// Forgets its user's entry when what it guards was the last thing she held: an entry made
/// during a load (her semaphores, her name) would otherwise stay until another user's next
/// `take`, long-lived blocks amid the load's freed memory that keep its pages resident.
struct Holding {
    quotas: Arc<Quotas>,
    user: Arc<str>,
}

impl std::fmt::Debug for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding").field("user", &self.user).finish()
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.quotas.forget_if_idle(&self.user);
    }
}

/// Input buffer set aside for one channel (from its user's budget and the daemon's), beyond
/// the small window every channel starts with. Given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct Reserved {
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    _held: Option<Holding>,
}

impl Reserved {
    /// Bytes reserved (0 when either budget was spent).
    pub(crate) fn bytes(&self) -> usize {
        self.permits
            .as_ref()
            .map_or(0, |(p, _)| p.num_permits() * 1024)
    }
}

pub(crate) struct Quotas {
    limits: UserLimits,
    /// KiB of input buffer, daemon-wide.
    global_input: Arc<Semaphore>,
    users: Mutex<HashMap<String, Arc<UserQuota>>>,
    /// [`crate::SshConfig::open_answer`].
    pub(crate) open_answer: std::time::Duration,
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

impl Quotas {
    pub(crate) fn new(
        limits: UserLimits,
        global_input_bytes: usize,
        open_answer: std::time::Duration,
    ) -> Self {
        Self {
            open_answer,
            global_input: Arc::new(Semaphore::new(
                kib(global_input_bytes).min(Semaphore::MAX_PERMITS),
            )),
            limits,
            users: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<UserQuota>>> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the user of `q` holds nothing (and no one is about to take from it).
    fn holds_nothing(&self, q: &Arc<UserQuota>) -> bool {
        if Arc::strong_count(q) != 1 {
            return false;
        }
        // `strong_count` reads without ordering: a permit taken before another thread let
        // go of its clone must be seen below.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        q.connections.available_permits() == self.limits.connections
            && q.sessions.available_permits() == self.limits.sessions
            && q.forwards.available_permits() == self.limits.forwards
            && q.input.available_permits() == self.user_input_kib()
    }

    /// A user's input budget in KiB, as her semaphore holds it.
    fn user_input_kib(&self) -> usize {
        kib(self.limits.input_buffer_bytes).min(Semaphore::MAX_PERMITS)
    }

    /// Forgets `user`'s entry if she holds nothing. What is given back does this itself
    /// ([`Holding`]); a refused take does it for an entry it may have made.
    fn forget_if_idle(&self, user: &str) {
        let mut users = self.lock();
        if users.get(user).is_some_and(|q| self.holds_nothing(q)) {
            users.remove(user);
        }
    }

    fn user(&self, name: &str) -> Arc<UserQuota> {
        let mut users = self.lock();
        if let Some(q) = users.get(name) {
            return q.clone();
        }
        let l = &self.limits;
        users
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(UserQuota {
                    name: Arc::from(name),
                    connections: Arc::new(Semaphore::new(l.connections)),
                    sessions: Arc::new(Semaphore::new(l.sessions)),
                    forwards: Arc::new(Semaphore::new(l.forwards)),
                    input: Arc::new(Semaphore::new(self.user_input_kib())),
                })
            })
            .clone()
    }

    /// One more `what` for `user`, or `None` when she holds all she may.
    pub(crate) fn take(self: &Arc<Self>, user: &str, what: Held) -> Option<Slot> {
        let q = self.user(user);
        let sem = match what {
            Held::Connection => &q.connections,
            Held::Session => &q.sessions,
            Held::Forward => &q.forwards,
        };
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            drop(q);
            self.forget_if_idle(user);
            return None;
        };
        let held = self.holding(&q);
        drop(q);
        Some(Slot {
            _permit: permit,
            _held: held,
        })
    }

    fn holding(self: &Arc<Self>, q: &UserQuota) -> Holding {
        Holding {
            quotas: self.clone(),
            user: q.name.clone(),
        }
    }

    /// Sets `bytes` of input buffer aside for one of `user`'s channels, from her budget and
    /// the daemon's; nothing (the channel keeps its small initial window) when either is
    /// spent.
    pub(crate) fn reserve_input(self: &Arc<Self>, user: &str, bytes: usize) -> Reserved {
        let n = u32::try_from(kib(bytes)).unwrap_or(u32::MAX);
        let q = self.user(user);
        let Ok(mine) = q.input.clone().try_acquire_many_owned(n) else {
            drop(q);
            self.forget_if_idle(user);
            return Reserved::default();
        };
        // Her permits go back before the entry is looked at, whichever way this ends.
        let held = self.holding(&q);
        drop(q);
        let Ok(all) = self.global_input.clone().try_acquire_many_owned(n) else {
            drop(mine);
            drop(held);
            return Reserved::default();
        };
        Reserved {
            permits: Some((mine, all)),
            _held: Some(held),
        }
    }
}

/// One authenticated user's view of the quotas, with the report of a refusal.
#[derive(Clone)]
pub(crate) struct Tenant {
    pub(crate) quotas: Arc<Quotas>,
    pub(crate) user: String,
    pub(crate) report: Arc<dyn Fn(Held) + Send + Sync>,
}

impl Tenant {
    /// One more `what`, or `None` (reported) when she holds all she may.
    pub(crate) fn take(&self, what: Held) -> Option<Slot> {
        let slot = self.quotas.take(&self.user, what);
        if slot.is_none() {
            (self.report)(what);
        }
        slot
    }

    /// Input buffer for one more channel, beyond its initial window.
    pub(crate) fn reserve_input(&self) -> Reserved {
        self.quotas.reserve_input(
            &self.user,
            (crate::server::WINDOW - crate::server::INITIAL_WINDOW) as usize,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn quotas(global: usize) -> Arc<Quotas> {
        Arc::new(Quotas::new(
            UserLimits {
                connections: 2,
                sessions: 1,
                forwards: 1,
                input_buffer_bytes: 4 << 20,
            },
            global,
            std::time::Duration::from_secs(30),
        ))
    }

    #[test]
    fn each_user_has_her_own_caps() {
        let q = quotas(64 << 20);
        let a1 = q.take("alice", Held::Connection).unwrap();
        let _a2 = q.take("alice", Held::Connection).unwrap();
        assert!(q.take("alice", Held::Connection).is_none());
        // Bob is not affected by alice.
        let _b = q.take("bob", Held::Connection).unwrap();
        drop(a1);
        assert!(q.take("alice", Held::Connection).is_some());
        let _s = q.take("alice", Held::Session).unwrap();
        assert!(q.take("alice", Held::Session).is_none());
        assert!(q.take("alice", Held::Forward).is_some());
    }

    #[test]
    fn input_budgets_per_user_and_daemon_wide() {
        let q = quotas(6 << 20);
        let a = q.reserve_input("alice", 2 << 20);
        let a2 = q.reserve_input("alice", 2 << 20);
        assert_eq!((a.bytes(), a2.bytes()), (2 << 20, 2 << 20));
        // Her own budget (4 MiB) is spent.
        assert_eq!(q.reserve_input("alice", 2 << 20).bytes(), 0);
        // Bob has his, until the daemon's (6 MiB) is spent.
        let b = q.reserve_input("bob", 2 << 20);
        assert_eq!(b.bytes(), 2 << 20);
        assert_eq!(q.reserve_input("carol", 2 << 20).bytes(), 0);
        drop(a);
        assert_eq!(q.reserve_input("carol", 2 << 20).bytes(), 2 << 20);
    }

    #[test]
    fn users_holding_nothing_are_forgotten() {
        let q = quotas(64 << 20);
        for i in 0..100 {
            drop(q.take(&format!("u{i}"), Held::Session));
        }
        assert_eq!(q.users.lock().unwrap().len(), 0);
        let last = q.take("last", Held::Session);
        assert_eq!(q.users.lock().unwrap().len(), 1);
        drop(last);
        assert_eq!(q.users.lock().unwrap().len(), 0);
    }

    #[test]
    fn a_user_is_forgotten_only_when_her_last_hold_is_given_back() {
        let q = quotas(64 << 20);
        let session = q.take("alice", Held::Session).unwrap();
        let input = q.reserve_input("alice", 1 << 20);
        assert_eq!(input.bytes(), 1 << 20);
        drop(session);
        // Her reservation still counts against her budget.
        assert_eq!(q.users.lock().unwrap().len(), 1);
        assert_eq!(q.reserve_input("alice", 4 << 20).bytes(), 0);
        drop(input);
        assert_eq!(q.users.lock().unwrap().len(), 0);
        // A reservation the daemon-wide budget refuses leaves nothing behind either.
        let q = quotas(1 << 20);
        let _bob = q.reserve_input("bob", 1 << 20);
        assert_eq!(q.reserve_input("alice", 1 << 20).bytes(), 0);
        assert_eq!(q.users.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_take_forgets_only_a_user_holding_nothing() {
        let q = Arc::new(Quotas::new(
            UserLimits {
                connections: 1,
                sessions: 1,
                forwards: 0,
                input_buffer_bytes: 4 << 20,
            },
            64 << 20,
            std::time::Duration::from_secs(30),
        ));
        // Refused outright (a cap of 0, a reservation past her whole budget): her entry,
        // made for the look, is forgotten at once.
        assert!(q.take("carol", Held::Forward).is_none());
        assert_eq!(q.reserve_input("dave", 8 << 20).bytes(), 0);
        assert_eq!(q.users.lock().unwrap().len(), 0);
        // Refused at her cap: she still holds her connection, so her entry stays.
        let held = q.take("alice", Held::Connection).unwrap();
        assert!(q.take("alice", Held::Connection).is_none());
        assert_eq!(q.users.lock().unwrap().len(), 1);
        drop(held);
        assert_eq!(q.users.lock().unwrap().len(), 0);
    }
}
