//! What an unauthenticated client may cost: the admission policy of the accept loop, after
//! OpenSSH's `MaxStartups`, `PerSourceMaxStartups` and `PerSourcePenalties`.
//!
//! - A connection is a *startup* from accept until it authenticates. Each source (an IPv4
//!   address, or an IPv6 /64) may hold `per_source` startups; past `start` startups in all,
//!   a source's further ones are dropped at random with a probability rising from `rate` %
//!   to 100 % at `full` (random early drop), and at `full` every new one is. Unlike
//!   OpenSSH's, the early drop never falls on a source's only connection: a user who opens
//!   one connection gets in while a few flooding sources hold their shares.
//! - Authenticated connections have their own pool (`max_connections`): a flood of
//!   unauthenticated ones never blocks a user who has a key.
//! - A source that keeps failing (connections that end without authenticating, connections
//!   refused for holding too many startups) is refused outright until its failures age out,
//!   unless it is on the exempt list. The failure table is bounded in entries and in the
//!   time any one connection spends on it.
//! - Refusals are counted (metrics) and summarised in the log once a minute, not one line
//!   each.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

/// How long a failure counts against its source.
const WINDOW: Duration = Duration::from_secs(60);
/// Sources remembered at once; past this, new sources are not penalised until old ones age
/// out (OpenSSH's `max-sources` with `overflow:permissive`).
const MAX_SOURCES: usize = 65_536;

/// A source of connections: an IPv4 address, or the /64 of an IPv6 one (one host usually
/// owns a whole /64, so counting single IPv6 addresses would count nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(bits)))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// An address range, as in `penalty_exempt = ["10.0.0.0/8", "::1"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or ADDRESS/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl Net {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `start:rate:full`, as OpenSSH's `MaxStartups` (default `10:30:100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startups {
    pub start: usize,
    pub rate: u8,
    pub full: usize,
}

impl Default for Startups {
    fn default() -> Self {
        Self {
            start: 10,
            rate: 30,
            full: 100,
        }
    }
}

impl std::str::FromStr for Startups {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not START:RATE:FULL (e.g. \"10:30:100\") with START <= FULL and RATE <= 100"
            )
        };
        let mut parts = s.split(':');
        let (Some(start), Some(rate), Some(full), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let v = Self {
            start: start.parse().map_err(|_| bad())?,
            rate: rate.parse().map_err(|_| bad())?,
            full: full.parse().map_err(|_| bad())?,
        };
        if v.full == 0 || v.start > v.full || v.rate > 100 {
            return Err(bad());
        }
        Ok(v)
    }
}

/// Why a connection was refused before the SSH handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source failed too often recently.
    Penalised,
    /// The source holds `per_source` unauthenticated connections already.
    PerSource,
    /// Random early drop past `start`, or `full` unauthenticated connections.
    Startups,
    /// Too few descriptors left: the admin socket keeps its reserve.
    Descriptors,
    /// Authenticated, but `max_connections` authenticated connections are open.
    Full,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::Penalised,
        Refusal::PerSource,
        Refusal::Startups,
        Refusal::Descriptors,
        Refusal::Full,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Penalised => "penalised",
            Refusal::PerSource => "per_source",
            Refusal::Startups => "startups",
            Refusal::Descriptors => "descriptors",
            Refusal::Full => "max_connections",
        }
    }

    fn index(self) -> usize {
        match self {
            Refusal::Penalised => 0,
            Refusal::PerSource => 1,
            Refusal::Startups => 2,
            Refusal::Descriptors => 3,
            Refusal::Full => 4,
        }
    }
}

/// The door's settings.
#[derive(Debug, Clone)]
pub struct DoorConfig {
    pub startups: Startups,
    /// Unauthenticated connections one source may hold.
    pub per_source: usize,
    /// Failures per minute after which a source is refused; 0 = never.
    pub failures_per_minute: usize,
    /// Sources never penalised (their connections still count as startups).
    pub exempt: Vec<Net>,
}

impl Default for DoorConfig {
    fn default() -> Self {
        Self {
            startups: Startups::default(),
            per_source: 10,
            failures_per_minute: 30,
            exempt: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Table {
    startups: usize,
    per_source: HashMap<Source, usize>,
    failures: HashMap<Source, VecDeque<Instant>>,
    /// When the failure table was last swept for aged-out sources.
    swept: Option<Instant>,
}

/// The admission state shared by the accept loop and its connections.
pub struct Door {
    config: DoorConfig,
    table: Mutex<Table>,
    refused: [AtomicU64; 5],
}

/// One unauthenticated connection's place; given back when dropped (the connection ended)
/// or when it authenticates ([`Door::promote`]).
pub struct Startup {
    door: Arc<Door>,
    source: Source,
}

impl Drop for Startup {
    fn drop(&mut self) {
        if let Ok(mut t) = self.door.table.lock() {
            t.startups = t.startups.saturating_sub(1);
            if let Some(n) = t.per_source.get_mut(&self.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.per_source.remove(&self.source);
                }
            }
        }
    }
}

impl Door {
    pub fn new(config: DoorConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            table: Mutex::new(Table::default()),
            refused: Default::default(),
        })
    }

    /// Admits a new connection from `ip` as a startup, or says why not. `roll` is a random
    /// number in 0..100 for the early drop.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, roll: u8) -> Result<Startup, Refusal> {
        let source = Source::of(ip);
        let now = Instant::now();
        let Ok(mut t) = self.table.lock() else {
            return Err(Refusal::Startups);
        };
        let r = self.check(&mut t, source, ip, roll, now);
        if r.is_ok() {
            t.startups += 1;
            *t.per_source.entry(source).or_default() += 1;
        }
        drop(t);
        match r {
            Ok(()) => Ok(Startup {
                door: self.clone(),
                source,
            }),
            Err(why) => {
                if why == Refusal::PerSource {
                    // Holding the limit and asking for more is itself a failure.
                    self.failed(ip);
                }
                self.refuse(why);
                Err(why)
            }
        }
    }

    fn check(
        &self,
        t: &mut Table,
        source: Source,
        ip: IpAddr,
        roll: u8,
        now: Instant,
    ) -> Result<(), Refusal> {
        if self.penalised(t, source, ip, now) {
            return Err(Refusal::Penalised);
        }
        let mine = t.per_source.get(&source).copied().unwrap_or(0);
        if mine >= self.config.per_source {
            return Err(Refusal::PerSource);
        }
        let s = self.config.startups;
        if t.startups >= s.full {
            return Err(Refusal::Startups);
        }
        // The early drop falls on sources that already hold a startup: a flood's second and
        // later connections, never a client's only one (until FULL are open).
        if mine > 0 && t.startups >= s.start {
            // Linear from `rate` % at `start` to 100 % at `full`.
            let span = (s.full - s.start).max(1);
            let p =
                usize::from(s.rate) + (100 - usize::from(s.rate)) * (t.startups - s.start) / span;
            if usize::from(roll) < p {
                return Err(Refusal::Startups);
            }
        }
        Ok(())
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.config.exempt.iter().any(|n| n.contains(ip))
    }

    fn penalised(&self, t: &mut Table, source: Source, ip: IpAddr, now: Instant) -> bool {
        if self.config.failures_per_minute == 0 || self.exempt(ip) {
            return false;
        }
        let Some(q) = t.failures.get_mut(&source) else {
            return false;
        };
        while q
            .front()
            .is_some_and(|at| now.duration_since(*at) >= WINDOW)
        {
            q.pop_front();
        }
        if q.is_empty() {
            t.failures.remove(&source);
            return false;
        }
        q.len() >= self.config.failures_per_minute
    }

    /// Counts a failure against `ip`'s source now.
    pub fn failed(&self, ip: IpAddr) {
        let limit = self.config.failures_per_minute;
        if limit == 0 || self.exempt(ip) {
            return;
        }
        let source = Source::of(ip);
        let now = Instant::now();
        let Ok(mut t) = self.table.lock() else {
            return;
        };
        if !t.failures.contains_key(&source) && t.failures.len() >= MAX_SOURCES {
            // Full: sweep aged-out sources, at most once per second whatever the flood, so
            // no connection pays for more than its share of the sweep.
            if t.swept
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                t.swept = Some(now);
                t.failures
                    .retain(|_, q| q.back().is_some_and(|at| now.duration_since(*at) < WINDOW));
            }
            if t.failures.len() >= MAX_SOURCES {
                return;
            }
        }
        let q = t.failures.entry(source).or_default();
        q.push_back(now);
        while q.len() > limit {
            q.pop_front();
        }
    }

    /// Counts a refusal (metrics now, the log once a minute).
    pub fn refuse(&self, why: Refusal) {
        metrics::counter!("berth_connections_refused_total", "reason" => why.label()).increment(1);
        if let Some(n) = self.refused.get(why.index()) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Logs, once per `every`, how many connections were refused and why (nothing when
    /// none were). Runs until dropped.
    pub async fn summarise(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Some((total, detail)) = self.take_counts() {
                info!(
                    refused = total,
                    "connections refused in the last {}s: {detail}",
                    every.as_secs()
                );
            }
        }
    }

    /// The refusals counted since the last call, as (total, "reason n, ..."); `None` when
    /// there were none.
    fn take_counts(&self) -> Option<(u64, String)> {
        let counts: Vec<(Refusal, u64)> = Refusal::ALL
            .iter()
            .filter_map(|r| {
                let n = self.refused.get(r.index())?.swap(0, Ordering::Relaxed);
                (n > 0).then_some((*r, n))
            })
            .collect();
        if counts.is_empty() {
            return None;
        }
        let total = counts.iter().map(|(_, n)| n).sum();
        let detail: Vec<String> = counts
            .iter()
            .map(|(r, n)| format!("{} {n}", r.label()))
            .collect();
        Some((total, detail.join(", ")))
    }

    /// Unauthenticated connections now (for tests and status).
    pub fn startups(&self) -> usize {
        self.table.lock().map_or(0, |t| t.startups)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn door(per_source: usize, startups: &str, failures: usize, exempt: &[&str]) -> Arc<Door> {
        Door::new(DoorConfig {
            startups: startups.parse().unwrap(),
            per_source,
            failures_per_minute: failures,
            exempt: exempt.iter().map(|s| s.parse().unwrap()).collect(),
        })
    }

    #[test]
    fn ipv6_sources_are_slash_64s_and_mapped_v4_is_v4() {
        assert_eq!(
            Source::of(ip("2001:db8::1")),
            Source::of(ip("2001:db8::ffff:2"))
        );
        assert_ne!(
            Source::of(ip("2001:db8::1")),
            Source::of(ip("2001:db8:0:1::1"))
        );
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.1")),
            Source::of(ip("192.0.2.1"))
        );
        assert_eq!(Source::of(ip("2001:db8::1")).to_string(), "2001:db8::/64");
    }

    #[test]
    fn per_source_cap_counts_a_v6_slash_64_and_frees_on_drop() {
        let d = door(2, "100:30:100", 0, &[]);
        let a = d.admit(ip("2001:db8::1"), 99).unwrap();
        let _b = d.admit(ip("2001:db8::2"), 99).unwrap();
        assert_eq!(
            d.admit(ip("2001:db8::3"), 99).err(),
            Some(Refusal::PerSource)
        );
        // Another source is not affected.
        let _c = d.admit(ip("192.0.2.1"), 99).unwrap();
        drop(a);
        let _d = d.admit(ip("2001:db8::3"), 99).unwrap();
        assert_eq!(d.startups(), 3);
    }

    #[test]
    fn random_early_drop_between_start_and_full_spares_a_sources_only_connection() {
        let d = door(1000, "2:50:4", 0, &[]);
        let flood = ip("192.0.2.1");
        let held: Vec<_> = (0..2).map(|_| d.admit(flood, 0).unwrap()).collect();
        // At start: 50 % drop for the flooding source; a low roll is dropped, a high one
        // admitted.
        assert_eq!(d.admit(flood, 10).err(), Some(Refusal::Startups));
        let third = d.admit(flood, 60).unwrap();
        // 3 of 4: 75 %.
        assert_eq!(d.admit(flood, 70).err(), Some(Refusal::Startups));
        // A source's only connection is never dropped at random.
        let user = d.admit(ip("198.51.100.1"), 0).unwrap();
        // Full: everything is dropped, first connections too.
        assert_eq!(
            d.admit(ip("198.51.100.2"), 99).err(),
            Some(Refusal::Startups)
        );
        drop((held, third, user));
        assert_eq!(d.startups(), 0);
    }

    #[test]
    fn failures_penalise_a_source_unless_exempt() {
        let d = door(10, "100:30:100", 3, &["198.51.100.0/24"]);
        for _ in 0..3 {
            d.failed(ip("192.0.2.1"));
            d.failed(ip("198.51.100.7"));
        }
        assert_eq!(d.admit(ip("192.0.2.1"), 99).err(), Some(Refusal::Penalised));
        assert!(d.admit(ip("192.0.2.2"), 99).is_ok());
        assert!(d.admit(ip("198.51.100.7"), 99).is_ok());
    }

    #[test]
    fn asking_past_the_per_source_cap_is_a_failure() {
        let d = door(1, "100:30:100", 2, &[]);
        let _held = d.admit(ip("192.0.2.1"), 99).unwrap();
        assert_eq!(d.admit(ip("192.0.2.1"), 99).err(), Some(Refusal::PerSource));
        assert_eq!(d.admit(ip("192.0.2.1"), 99).err(), Some(Refusal::PerSource));
        // Two failures now: penalised even for a slot that is free again.
        assert_eq!(d.admit(ip("192.0.2.1"), 99).err(), Some(Refusal::Penalised));
    }

    #[test]
    fn the_failure_table_stays_bounded_under_a_flood_of_sources() {
        let d = door(10, "100:30:100", 5, &[]);
        for i in 0..(MAX_SOURCES as u32 + 5000) {
            d.failed(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert!(d.table.lock().unwrap().failures.len() <= MAX_SOURCES);
    }

    #[test]
    fn refusals_are_summarised_by_reason_then_reset() {
        let d = door(1, "100:30:100", 0, &[]);
        let _held = d.admit(ip("192.0.2.1"), 99).unwrap();
        for _ in 0..3 {
            let _ = d.admit(ip("192.0.2.1"), 99);
        }
        d.refuse(Refusal::Descriptors);
        assert_eq!(
            d.take_counts(),
            Some((4, "per_source 3, descriptors 1".into()))
        );
        assert_eq!(d.take_counts(), None);
    }

    #[test]
    fn settings_parse() {
        assert_eq!(
            "10:30:100".parse::<Startups>().unwrap(),
            Startups::default()
        );
        for bad in ["10:30", "10:130:100", "20:30:10", "a:b:c", "0:0:0"] {
            assert!(bad.parse::<Startups>().is_err(), "{bad}");
        }
        let n: Net = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.1.2.3")) && !n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.9.9.9")));
        let all: Net = "::/0".parse().unwrap();
        assert!(all.contains(ip("2001:db8::1")));
        assert!("10.0.0.0/33".parse::<Net>().is_err());
        assert!("nope".parse::<Net>().is_err());
        let one: Net = "192.0.2.1".parse().unwrap();
        assert!(one.contains(ip("192.0.2.1")) && !one.contains(ip("192.0.2.2")));
    }
}
