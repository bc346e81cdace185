//! Whole listings the laptop gave, kept for [`super::fs`]'s 20 s window (sshfs keeps its
//! directory cache as long): a directory listed again within it is opened and read without
//! a round trip, and the entries' attributes come with it as they did the first time.
//!
//! A listing is kept only when it was read whole, from the start to the laptop's empty
//! answer, with nothing changed in the directory meanwhile. Whatever the mount does to a
//! directory or to a file in it (making, removing, renaming, writing, `setattr`) drops the
//! directory's listing at once: stale attributes would otherwise be given to the kernel,
//! which takes them over its own (a file's size after a write, say). Changes made on the
//! laptop beside the mount show once the listing is older than the window, as entries do.
//!
//! ```text
//! opendir ──(a listing younger than the window)──► local handle: readdir from the copy
//!         └─(none)──► laptop handle ──readdir from 0 … empty answer──► kept (unless changed)
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_connect::proto::DirEntry;

/// Handles the daemon gives for listings it answers itself; the laptop's never have it.
pub const LOCAL: u64 = 1 << 63;

/// A listing being read from the laptop on one of its handles.
struct Building {
    ino: u64,
    entries: Vec<DirEntry>,
    /// The offset the next batch must start at to continue it.
    next: u64,
    bytes: usize,
    /// The directory changed while it was read: not kept.
    spoiled: bool,
}

struct Kept {
    entries: Arc<[DirEntry]>,
    at: Instant,
    bytes: usize,
}

pub struct DirCache {
    ttl: Duration,
    max_bytes: usize,
    max_local: usize,
    lists: HashMap<u64, Kept>,
    /// Directories in the order their listings were kept (the oldest go first past
    /// `max_bytes`; an entry whose listing went or was replaced is skipped).
    order: VecDeque<(u64, Instant)>,
    bytes: usize,
    building: HashMap<u64, Building>,
    /// The bytes of every listing being read, together bounded by `max_bytes` too (each
    /// open handle of the laptop's could be reading one).
    building_bytes: usize,
    local: HashMap<u64, Arc<[DirEntry]>>,
    next_local: u64,
}

/// What an entry costs while kept.
fn cost(e: &DirEntry) -> usize {
    e.name.len() + 160
}

impl DirCache {
    /// Listings younger than `ttl`, `max_bytes` of them at once, `max_local` handles open
    /// on them.
    pub fn new(ttl: Duration, max_bytes: usize, max_local: usize) -> Self {
        Self {
            ttl,
            max_bytes,
            max_local,
            lists: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            building: HashMap::new(),
            building_bytes: 0,
            local: HashMap::new(),
            next_local: 0,
        }
    }

    /// A handle on the listing of `ino` kept less than the window ago, if there is one and
    /// room for a handle.
    pub fn open(&mut self, ino: u64, now: Instant) -> Option<u64> {
        let kept = self.lists.get(&ino)?;
        if now.saturating_duration_since(kept.at) >= self.ttl {
            self.drop_list(ino);
            return None;
        }
        if self.local.len() >= self.max_local {
            return None;
        }
        let entries = kept.entries.clone();
        self.next_local = self.next_local.wrapping_add(1);
        let fh = LOCAL | (self.next_local & !LOCAL);
        self.local.insert(fh, entries);
        Some(fh)
    }

    /// The listing behind a local handle.
    pub fn local(&self, fh: u64) -> Option<Arc<[DirEntry]>> {
        self.local.get(&fh).cloned()
    }

    /// The laptop's handle `fh` on directory `ino` was just opened: its listing may be kept.
    pub fn start(&mut self, fh: u64, ino: u64) {
        self.building.insert(
            fh,
            Building {
                ino,
                entries: Vec::new(),
                next: super::fs::DOTS,
                bytes: 0,
                spoiled: false,
            },
        );
    }

    /// The laptop answered `entries` from offset `from` on handle `fh`; an empty answer
    /// ends the listing, which is kept if it was read whole and nothing changed.
    pub fn fetched(&mut self, fh: u64, from: u64, entries: &[DirEntry], now: Instant) {
        let Some(b) = self.building.get_mut(&fh) else {
            return;
        };
        if b.spoiled || b.next != from {
            self.stop_building(fh);
            return;
        }
        if let Some(last) = entries.last() {
            let more = entries.iter().map(cost).sum::<usize>();
            if b.bytes + more > self.max_bytes / 4 || self.building_bytes + more > self.max_bytes {
                self.stop_building(fh);
                return;
            }
            b.bytes += more;
            b.next = last.offset;
            b.entries.extend_from_slice(entries);
            self.building_bytes += more;
            return;
        }
        if let Some(b) = self.stop_building(fh) {
            self.keep(b.ino, b.entries, b.bytes, now);
        }
    }

    fn stop_building(&mut self, fh: u64) -> Option<Building> {
        let b = self.building.remove(&fh)?;
        self.building_bytes -= b.bytes;
        Some(b)
    }

    fn keep(&mut self, ino: u64, entries: Vec<DirEntry>, bytes: usize, now: Instant) {
        self.drop_list(ino);
        while self.bytes + bytes > self.max_bytes {
            let Some((old, at)) = self.order.pop_front() else {
                return;
            };
            if self.lists.get(&old).is_some_and(|k| k.at == at) {
                self.drop_list(old);
            }
        }
        self.bytes += bytes;
        self.order.push_back((ino, now));
        self.lists.insert(
            ino,
            Kept {
                entries: entries.into(),
                at: now,
                bytes,
            },
        );
        // Entries of `order` whose listing is gone pile up only as fast as listings are
        // kept; past twice what is held, they are swept.
        if self.order.len() > 2 * self.lists.len() + 64 {
            let lists = &self.lists;
            self.order
                .retain(|(ino, at)| lists.get(ino).is_some_and(|k| k.at == *at));
        }
    }

    fn drop_list(&mut self, ino: u64) {
        if let Some(k) = self.lists.remove(&ino) {
            self.bytes -= k.bytes;
        }
    }

    /// A handle was released (local or the laptop's).
    pub fn close(&mut self, fh: u64) {
        self.local.remove(&fh);
        let _ = self.stop_building(fh);
    }

    /// Directory `ino` changed (or a file in it did): its listing goes, and one being read
    /// is not kept.
    pub fn changed(&mut self, ino: u64) {
        self.drop_list(ino);
        for b in self.building.values_mut() {
            if b.ino == ino {
                b.spoiled = true;
            }
        }
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::connect::fs::DOTS;

    fn entries(names: &[&str], first: u64) -> Vec<DirEntry> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| DirEntry {
                name: n.as_bytes().to_vec(),
                offset: first + i as u64 + 1,
                attr: None,
            })
            .collect()
    }

    fn read_whole(c: &mut DirCache, fh: u64, ino: u64, now: Instant) {
        c.start(fh, ino);
        let a = entries(&["a", "b"], DOTS);
        c.fetched(fh, DOTS, &a, now);
        let b = entries(&["c"], DOTS + 2);
        c.fetched(fh, DOTS + 2, &b, now);
        c.fetched(fh, DOTS + 3, &[], now);
        c.close(fh);
    }

    #[test]
    fn a_whole_listing_is_kept_for_the_window_only() {
        let now = Instant::now();
        let mut c = DirCache::new(Duration::from_secs(20), 1 << 20, 8);
        assert_eq!(c.open(7, now), None);
        read_whole(&mut c, 1, 7, now);
        let fh = c.open(7, now + Duration::from_secs(19)).unwrap();
        assert!(fh & LOCAL != 0);
        let names: Vec<_> = c
            .local(fh)
            .unwrap()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        assert_eq!(names, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        c.close(fh);
        assert_eq!(c.local(fh), None);
        assert_eq!(c.open(7, now + Duration::from_secs(20)), None);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn partial_out_of_order_or_changed_listings_are_not_kept() {
        let now = Instant::now();
        let mut c = DirCache::new(Duration::from_secs(20), 1 << 20, 8);
        // Never read to its end.
        c.start(1, 7);
        c.fetched(1, DOTS, &entries(&["a"], DOTS), now);
        c.close(1);
        assert_eq!(c.open(7, now), None);
        // Read from elsewhere than where it stopped (a seek).
        c.start(2, 7);
        c.fetched(2, DOTS, &entries(&["a"], DOTS), now);
        c.fetched(2, DOTS + 5, &[], now);
        assert_eq!(c.open(7, now), None);
        // Changed while read.
        c.start(3, 7);
        c.fetched(3, DOTS, &entries(&["a"], DOTS), now);
        c.changed(7);
        c.fetched(3, DOTS + 1, &[], now);
        assert_eq!(c.open(7, now), None);
        // Changed after: dropped.
        read_whole(&mut c, 4, 7, now);
        assert!(c.open(7, now).is_some());
        c.changed(7);
        assert_eq!(c.open(7, now), None);
    }

    #[test]
    fn bytes_and_handles_are_bounded() {
        let now = Instant::now();
        let one = cost(&entries(&["a"], 0)[0]) * 3;
        let mut c = DirCache::new(Duration::from_secs(20), one * 4 + 1, 2);
        for ino in 0..10 {
            read_whole(&mut c, 100 + ino, ino, now);
            assert!(c.bytes() <= one * 4 + 1);
        }
        // The newest are kept, the oldest went.
        assert!(c.open(9, now).is_some());
        assert!(c.open(8, now).is_some());
        assert_eq!(c.open(0, now), None);
        // Two handles at most: a third is refused (the laptop is asked instead).
        assert_eq!(c.open(9, now), None);
        // Listings being read on many handles at once are bounded together: past the
        // bound, the one growing is not kept.
        for fh in 0..10 {
            c.start(200 + fh, 50 + fh);
            c.fetched(200 + fh, DOTS, &entries(&["a", "b"], DOTS), now);
            assert!(c.building_bytes <= one * 4 + 1);
        }
        for fh in 0..10 {
            c.close(200 + fh);
        }
        assert_eq!(c.building_bytes, 0);
    }
}
