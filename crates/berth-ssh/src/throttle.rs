//! Per-source penalties for failed logins, after OpenSSH's PerSourcePenalties: an address
//! that fails authentication too often in a minute has its new connections closed at once
//! until its failures age out.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct Throttle {
    limit: usize,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl Throttle {
    /// `limit` failures per minute per address; 0 turns the throttle off.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            failures: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn record_failure(&self, ip: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let now = Instant::now();
        if let Ok(mut map) = self.failures.lock() {
            // Bound the table: forget addresses whose failures have all aged out.
            if map.len() > 10_000 {
                map.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
            }
            let q = map.entry(ip).or_default();
            q.push_back(now);
            while q.len() > self.limit {
                q.pop_front();
            }
        }
    }

    /// Whether connections from `ip` are refused right now.
    pub(crate) fn blocked(&self, ip: IpAddr) -> bool {
        if self.limit == 0 {
            return false;
        }
        let now = Instant::now();
        let Ok(mut map) = self.failures.lock() else {
            return false;
        };
        let Some(q) = map.get_mut(&ip) else {
            return false;
        };
        while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            q.pop_front();
        }
        if q.is_empty() {
            map.remove(&ip);
            return false;
        }
        q.len() >= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_only_that_address() {
        let t = Throttle::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            t.record_failure(a);
        }
        assert!(!t.blocked(a));
        t.record_failure(a);
        assert!(t.blocked(a));
        assert!(!t.blocked(b));
        let off = Throttle::new(0);
        for _ in 0..10 {
            off.record_failure(a);
        }
        assert!(!off.blocked(a));
    }
}
