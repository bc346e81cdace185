//! The authenticated SSH connections, daemon-wide, by user and by the key each logged in
//! with: what `berth user rm`, `berth user key rm` and `berth user kick` end. A connection is
//! registered when it authenticates and leaves when its [`Registered`] (held by the
//! connection) is dropped; revoking cancels its token, and the SSH layer then closes it with
//! everything on it (sessions, forwards, agent sockets).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

struct Entry {
    user: String,
    /// The key's SHA-256 fingerprint (for a certificate: its key's).
    key: String,
    token: CancellationToken,
}

#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

/// Keeps a connection in the registry while it lives.
pub struct Registered {
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.connections.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl Connections {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Records a connection of `user` that authenticated with key `fingerprint`; returns its
    /// registration and the token that revoking it cancels.
    pub fn register(
        self: &Arc<Self>,
        user: &str,
        fingerprint: &str,
    ) -> (Registered, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let token = CancellationToken::new();
        if let Ok(mut open) = self.open.lock() {
            open.insert(
                id,
                Entry {
                    user: user.to_owned(),
                    key: fingerprint.to_owned(),
                    token: token.clone(),
                },
            );
        }
        let registered = Registered {
            id,
            connections: self.clone(),
        };
        (registered, token)
    }

    /// Ends `user`'s connections (only those made with key `fingerprint`, when given);
    /// returns how many.
    pub fn revoke(&self, user: &str, fingerprint: Option<&str>) -> usize {
        let Ok(open) = self.open.lock() else {
            return 0;
        };
        let mut n = 0;
        for e in open.values() {
            if e.user == user && fingerprint.is_none_or(|fp| fp == e.key) && !e.token.is_cancelled()
            {
                e.token.cancel();
                n += 1;
            }
        }
        n
    }

    /// `user`'s open connections.
    pub fn count(&self, user: &str) -> usize {
        self.open
            .lock()
            .map(|o| o.values().filter(|e| e.user == user).count())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_a_key_ends_that_keys_connections_and_a_user_all_of_hers() {
        let c = Connections::new();
        let (_a1, t1) = c.register("alice", "SHA256:one");
        let (_a2, t2) = c.register("alice", "SHA256:two");
        let (_b, tb) = c.register("bob", "SHA256:one");
        assert_eq!(c.revoke("alice", Some("SHA256:one")), 1);
        assert!(t1.is_cancelled() && !t2.is_cancelled() && !tb.is_cancelled());
        assert_eq!(
            c.revoke("alice", None),
            1,
            "the one already ended is not counted again"
        );
        assert!(t2.is_cancelled() && !tb.is_cancelled());
        drop(_b);
        assert_eq!(c.count("bob"), 0);
        assert_eq!(c.revoke("bob", None), 0);
    }
}
