//! The file system of a connect mount: the kernel's FUSE requests, from processes in the
//! user's container, turned into requests on the wire to her laptop.
//!
//! The FUSE loop (one thread, [`run`]) never waits for the laptop: each request resolves its
//! paths in the inode table ([`super::inodes`]), then is answered from a task on the tokio
//! runtime, where [`Client::call`] bounds the requests in flight and gives each a deadline.
//! Whatever the laptop answers is checked before the kernel sees it (an errno out of range,
//! more bytes than asked, a wrong kind of answer: `EIO`).
//!
//! Every file is shown as the owner given (the container's root); `chown` is accepted and
//! changes nothing (files on the laptop belong to its user). Extended attributes are not
//! carried: the kernel is told so once and stops asking.
//!
//! ```text
//! run ──► handshake ──► serving ──(abort(), the laptop gone, or the mount's last user gone)──► ended
//! ```

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_connect::client::{CallError, Client};
use berth_connect::proto::{self, Answer, Attr, ByteBuf, Op, SetTime, Time};
use berth_runtime::mount::FuseConnection;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::{OwnedRwLockReadGuard, OwnedSemaphorePermit, RwLock, Semaphore};

use super::dircache::{self, DirCache};
use super::inodes::Inodes;

/// How long the kernel may trust names and attributes (and, through them, the file contents
/// it cached: see `FUSE_AUTO_INVAL_DATA` in `init`). What processes in the container do
/// through the mount the kernel sees at once; a change made on the laptop beside the mount
/// shows within this window, as with sshfs's 20 s cache. 1 s made every `stat` of `make`,
/// `git status` and `find` a round trip to the laptop once a second had passed
/// (docs/benchmarks.md, "berth connect against sshfs"); each `berth connect` is a new mount
/// with nothing cached.
const TTL: Duration = Duration::from_secs(20);

/// Inodes the kernel may hold at once on one mount, and the bytes of their names.
pub const MAX_NODES: usize = 200_000;
pub const MAX_NAME_BYTES: usize = 16 << 20;

/// How far the kernel reads ahead of a process reading a file in order (the mount's
/// `read_ahead_kb`, set on the first open: [`ReadAhead`]). The kernel gives every FUSE mount
/// 128 KiB, and INIT's answer can only lower it: then about two reads of 128 KiB were in
/// flight at once, and a bulk read waited on each round trip to the laptop (1 GiB read in
/// 3.0–3.8 s; 1.8–2.5 s with 4 MiB, sixteen frames of the wire in flight).
pub const MAX_READAHEAD: u32 = 4 << 20;

/// Background requests (readahead, cached writes) the kernel keeps in flight: as many as
/// the wire takes.
const MAX_BACKGROUND: u16 = berth_connect::client::MAX_IN_FLIGHT as u16;

/// Requests of one mount being answered at once; as many as the wire takes, the rest wait in
/// the kernel. A write holds one wire I/O (256 KiB), a read at most the kernel's 1 MiB asked
/// plus its parts in flight: 128 MiB a mount at the very most, 16 MiB for writes.
const MAX_TASKS: usize = berth_connect::client::MAX_IN_FLIGHT;

struct Shared {
    client: Client,
    owner: (u32, u32),
    inodes: Mutex<Inodes>,
    /// Places for requests being answered: [`ConnectFs::place`].
    tasks: Arc<Semaphore>,
    /// Writes behind (answered to the kernel, not yet by the laptop) hold it shared; every
    /// other call takes it alone for a moment before it goes ([`Shared::call`]).
    order: Arc<RwLock<()>>,
    /// The inodes and ranges of the writes behind.
    flying: Mutex<Vec<(u64, Range<u64>)>>,
    /// The first failure of a write behind, by handle, until a flush or fsync reports it.
    failures: Mutex<HashMap<u64, Errno>>,
    /// Whole listings kept for the window ([`super::dircache`]).
    dirs: Mutex<DirCache>,
    /// What the laptop listed beyond what the kernel took, by directory handle: the
    /// kernel asks a page of entries at a time, the laptop answers up to
    /// [`proto::READDIR_BYTES`].
    listings: Mutex<Listings>,
    /// Files' first bytes, given with their opening ([`Heads`]).
    heads: Mutex<Heads>,
    /// Attributes of files written, given with their release ([`Settled`]).
    settled: Mutex<Settled>,
    /// Names the laptop said are not there ([`Absent`]).
    absent: Mutex<Absent>,
}

/// Names the laptop said are not there, by directory, for [`TTL`] from its answer, as the
/// kernel keeps them (a negative entry), until a change through the mount makes or moves a
/// name there. The kernel asks again for a name it holds as absent when a process creates it
/// exclusively (`O_EXCL`, mkdir, mknod, symlink, link: `cp` and `make`'s recipes do, once per
/// file built), for a rename's target, and when it dropped the entry from its cache: those
/// are answered from here. Sound for each: an exclusive create of a name the laptop has since
/// made fails with `EEXIST` on the laptop, as it would have after a fresh lookup; a rename
/// over it replaces it there; and the kernel would have given its own entry, as old, had it
/// kept it. What the laptop makes itself shows after the window, as with the kernel's own.
/// An answer is kept only if no change through the mount made or moved the name while the
/// lookup was asked (the kernel asks again for a name it holds, to check it, without the
/// directory's lock that keeps a lookup and a change of the directory apart).
/// Directory numbers are never reused ([`super::inodes`]), so a forgotten directory's names
/// only wait for the window or the bound.
#[derive(Default)]
struct Absent {
    names: HashMap<u64, HashMap<Box<[u8]>, Instant>>,
    count: usize,
    /// Lookups asked, not yet answered: token → the directory, the name, and whether a
    /// change made or moved it since.
    asking: HashMap<u64, (u64, Box<[u8]>, bool)>,
    next: u64,
}

/// Absent names kept at once on one mount (the kernel holds as many as it likes itself).
const MAX_ABSENT: usize = 4096;

impl Absent {
    /// How long `name` in `dir` is still known absent.
    fn get(&self, dir: u64, name: &[u8], now: Instant) -> Option<Duration> {
        let at = self.names.get(&dir)?.get(name)?;
        let left = TTL.saturating_sub(now.saturating_duration_since(*at));
        (!left.is_zero()).then_some(left)
    }

    /// A token for a lookup of `name` in `dir`, for [`Absent::answered`]; `None` past the
    /// bound (as many as the requests in flight, normally).
    fn ask(&mut self, dir: u64, name: &[u8]) -> Option<u64> {
        if self.asking.len() >= MAX_ABSENT {
            return None;
        }
        self.next = self.next.wrapping_add(1);
        self.asking.insert(self.next, (dir, name.into(), false));
        Some(self.next)
    }

    /// The lookup asked with `token` was answered; `absent` when the laptop said `ENOENT`,
    /// kept if nothing made or moved the name meanwhile.
    fn answered(&mut self, token: u64, absent: bool, now: Instant) {
        if let Some((dir, name, spoiled)) = self.asking.remove(&token)
            && absent
            && !spoiled
        {
            self.keep(dir, &name, now);
        }
    }

    fn keep(&mut self, dir: u64, name: &[u8], now: Instant) {
        if self.count >= MAX_ABSENT {
            for names in self.names.values_mut() {
                names.retain(|_, at| now.saturating_duration_since(*at) < TTL);
            }
            self.names.retain(|_, names| !names.is_empty());
            self.count = self.names.values().map(HashMap::len).sum();
        }
        if self.count >= MAX_ABSENT {
            self.names.clear();
            self.count = 0;
        }
        let names = self.names.entry(dir).or_default();
        if names.insert(name.into(), now).is_none() {
            self.count += 1;
        }
    }

    /// `name` in `dir` is (or may be) there now.
    fn forget(&mut self, dir: u64, name: &[u8]) {
        for (d, n, spoiled) in self.asking.values_mut() {
            if *d == dir && **n == *name {
                *spoiled = true;
            }
        }
        if let Some(names) = self.names.get_mut(&dir) {
            if names.remove(name).is_some() {
                self.count -= 1;
            }
            if names.is_empty() {
                self.names.remove(&dir);
            }
        }
    }
}

/// Small files read whole with their opening, by handle, as the laptop gave them
/// ([`Op::Open`]'s `head`): a small file is opened and read in one round trip, not two (`git
/// status` reading every file of a tree, `make` reading its sources, `cat *.o > prog`). A head
/// answers only reads that come within [`HEAD_FRESH`] of the opening, and goes at the handle's
/// release.
///
/// A change of a file through the mount (a write, a truncation, a setattr, an unlink, a rename
/// of it or over it, a link to it) drops its heads, and none is kept while a change of the file
/// is in flight or if one began or ended while it was asked for (the laptop's workers run in
/// any order). By inode: the laptop gives a head only of a file with one name, so another
/// inode here stands for it only if the laptop renamed it beside the mount, or if that inode's
/// name is gone (a handle still open on a name unlinked or renamed over, after a second name
/// was made): a change through an inode without a name drops every head and stops new ones
/// while it is in flight, as every change did before. What the laptop changes itself is seen
/// from the next opening on (close-to-open, as NFS has it). Changes of other files do not
/// matter: `cat *.o > prog` writes `prog` while it reads the rest.
#[derive(Default)]
struct Heads {
    by_handle: HashMap<u64, Head>,
    busy: InFlight,
    /// Openings that asked for a head, not yet answered: token → the inode, and whether a
    /// change of it began or ended since.
    asking: HashMap<u64, (u64, bool)>,
    next: u64,
}

struct Head {
    at: Instant,
    ino: u64,
    /// The whole file as it was opened.
    data: Vec<u8>,
}

/// Heads kept and asked for at once on one mount (each at most [`proto::MAX_HEAD`]: 64 KiB);
/// an opening past it asks for none.
const MAX_HEADS: usize = 64;

/// How long after its opening a head answers reads.
const HEAD_FRESH: Duration = Duration::from_secs(1);

impl Heads {
    /// A token to ask for `ino`'s head with its opening, for [`Heads::answered`], when one
    /// could be kept; drops the stale ones first.
    fn ask(&mut self, ino: u64, now: Instant) -> Option<u64> {
        self.by_handle
            .retain(|_, h| now.saturating_duration_since(h.at) < HEAD_FRESH);
        if self.by_handle.len() + self.asking.len() >= MAX_HEADS || self.busy.may_touch(ino) {
            return None;
        }
        self.next = self.next.wrapping_add(1);
        self.asking.insert(self.next, (ino, false));
        Some(self.next)
    }

    /// The opening asked with `token` was answered (`None`: failed, or came without a head):
    /// handle `fh` and the head, asked for at `at` with at most `asked` bytes, kept when
    /// nothing changed the file meanwhile.
    fn answered(&mut self, token: u64, got: Option<(u64, Vec<u8>)>, at: Instant, asked: u32) {
        let Some((ino, spoiled)) = self.asking.remove(&token) else {
            return;
        };
        if let Some((fh, data)) = got
            // More than asked for is not the file.
            && data.len() <= asked as usize
            && !spoiled
            && !self.busy.may_touch(ino)
            && self.by_handle.len() < MAX_HEADS
        {
            self.by_handle.insert(fh, Head { at, ino, data });
        }
    }

    /// The bytes a read of `size` at `offset` on `fh` gets from its head (fewer at the end
    /// of the file).
    fn read(&mut self, fh: u64, offset: u64, size: u32, now: Instant) -> Option<Vec<u8>> {
        let head = self.by_handle.get(&fh)?;
        if now.saturating_duration_since(head.at) >= HEAD_FRESH {
            self.by_handle.remove(&fh);
            return None;
        }
        let len = head.data.len() as u64;
        let end = offset.saturating_add(u64::from(size));
        let (from, to) = (offset.min(len) as usize, end.min(len) as usize);
        head.data.get(from..to).map(<[u8]>::to_vec)
    }

    /// A change of the files of `scope` begins: their heads are not the files any more (and
    /// none is, when one of them has no name here).
    fn begin(&mut self, scope: Scope) {
        self.busy.begin(scope);
        if scope.nameless {
            self.nothing();
        }
        for ino in scope.inos() {
            self.by_handle.retain(|_, h| h.ino != ino);
            self.spoil(ino);
        }
    }

    /// The laptop has answered a change (or it was given up).
    fn end(&mut self, scope: Scope) {
        self.busy.end(scope);
        if scope.nameless {
            self.nothing();
        }
        for ino in scope.inos() {
            self.spoil(ino);
        }
    }

    /// No head is the file any more, nor one being asked for: a change through an inode
    /// without a name may be of any file.
    fn nothing(&mut self) {
        self.by_handle.clear();
        self.asking
            .values_mut()
            .for_each(|(_, spoiled)| *spoiled = true);
    }

    fn spoil(&mut self, ino: u64) {
        for (i, spoiled) in self.asking.values_mut() {
            if *i == ino {
                *spoiled = true;
            }
        }
    }

    fn release(&mut self, fh: u64) {
        self.by_handle.remove(&fh);
    }
}

/// Attributes of files written through the mount, as the laptop gave them when a handle open
/// for writing was released ([`Op::Release`]'s `attr`), by inode. A write makes the kernel drop
/// what it knew of the file's size and times, so without them every `stat` of a file just built
/// is a round trip to the laptop (`make` with nothing left to do, right after a build); sshfs
/// answers those from a cache of its own.
///
/// They answer `getattr` for [`TTL`] after the laptop gave them, as long as nothing changed the
/// file through the mount meanwhile: a change of the file (a write, a setattr, a truncation, an
/// unlink, a rename of it or over it, a link to it) drops its own. None is asked for while a
/// change of the file is in flight, none is kept if one began while it was asked for, and only a
/// file with a single name is kept (another name would be another inode here, whose changes
/// would not drop this one's; a second name made through the mount is a change of the file).
/// What the laptop changes itself shows after the window, as with the kernel's own cache,
/// and never older than what the kernel was given another way since (a lookup, a listing). The
/// access time shown is the one at the release: reads do not drop them (a build reads what it
/// just wrote: `cat *.o > prog`).
///
/// Directories too: a change of a directory's names (a create, mkdir, symlink, link, unlink,
/// rmdir, rename) makes the kernel drop the directory's attributes, and with
/// `default_permissions` every path walked through it asks for them again: `make -j4` asked
/// the laptop for `obj`'s after each of its 100 files was made in it (docs/benchmarks.md).
/// The laptop's answer to such a change carries the directory's attributes after it, numbered
/// in the order the laptop read them ([`proto::DirAfter`]), so answers that come in another
/// order still leave the latest. They are kept ([`Settled::dir_after`]) when the directory is
/// still the one the kernel knows there, no read or change of the directory itself was
/// answered since the change was sent (a lookup's or getattr's answer cannot be ordered
/// against them: see `Seen::epoch`), and none later was given.
#[derive(Default)]
struct Settled {
    attrs: HashMap<u64, (FileAttr, Instant)>,
    /// Releases that asked for the attributes, not yet answered: inode → token.
    asked: HashMap<u64, u64>,
    busy: InFlight,
    /// What the laptop last told of each inode here: numbers here are by name, and a name
    /// can come to stand for another file (renamed on the laptop over it) while a handle of
    /// the old one is still open.
    seen: HashMap<u64, Seen>,
    next: u64,
    /// Hands out [`Seen::epoch`]s: never the same twice on a mount, so a mark taken before
    /// an inode was forgotten and seen again never matches.
    epochs: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Seen {
    /// The laptop's inode number (`st_ino`) last given to the kernel.
    laptop: u64,
    /// Changed at every answer with the inode's attributes that carry no number (a lookup, a
    /// getattr, a listing, a setattr), every start and end of a change of the inode itself,
    /// and every change of its names that brought no attributes after it: a directory's
    /// attributes after a change are kept only if none came between the change's sending and
    /// its answer ([`Settled::mark`]).
    epoch: u64,
    /// The highest [`proto::DirAfter::seq`] answered for it.
    seq: u64,
}

/// Files whose attributes are kept (or asked for) at once on one mount.
const MAX_SETTLED: usize = 4096;

/// The files a change through the mount touches, by inode: one, or two for a rename (what is
/// renamed, and what it replaces or is exchanged with); `None` for a name the mount has no
/// inode for (nothing is kept for it).
#[derive(Clone, Copy)]
struct Scope {
    a: Option<u64>,
    b: Option<u64>,
    /// One of them has no name here (unlinked or renamed over, a handle still open): another
    /// inode may stand for the same file ([`Changing::begin`] finds it out).
    nameless: bool,
}

impl Scope {
    fn file(ino: u64) -> Self {
        Self::of(Some(ino), None)
    }

    fn of(a: Option<u64>, b: Option<u64>) -> Self {
        Self {
            a,
            b,
            nameless: false,
        }
    }

    fn inos(self) -> impl Iterator<Item = u64> {
        self.a.into_iter().chain(self.b)
    }
}

/// Changes through the mount in flight, for [`Heads`] and [`Settled`]: by inode, and how many
/// are through an inode without a name ([`Scope::nameless`]), which may be of any file.
#[derive(Default)]
struct InFlight {
    by_ino: HashMap<u64, usize>,
    nameless: usize,
}

impl InFlight {
    fn begin(&mut self, scope: Scope) {
        if scope.nameless {
            self.nameless += 1;
        }
        for ino in scope.inos() {
            *self.by_ino.entry(ino).or_default() += 1;
        }
    }

    fn end(&mut self, scope: Scope) {
        if scope.nameless {
            self.nameless = self.nameless.saturating_sub(1);
        }
        for ino in scope.inos() {
            if let Some(n) = self.by_ino.get_mut(&ino) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.by_ino.remove(&ino);
                }
            }
        }
    }

    /// A change of `ino` itself is in flight.
    fn changing(&self, ino: u64) -> bool {
        self.by_ino.contains_key(&ino)
    }

    /// A change in flight may touch file `ino`: one of it, or one through a nameless inode.
    fn may_touch(&self, ino: u64) -> bool {
        self.nameless > 0 || self.changing(ino)
    }
}

impl Settled {
    fn begin(&mut self, scope: Scope) {
        self.busy.begin(scope);
        if scope.nameless {
            self.nothing();
        }
        for ino in scope.inos() {
            self.attrs.remove(&ino);
            self.asked.remove(&ino);
            self.touch(ino);
        }
    }

    fn end(&mut self, scope: Scope) {
        self.busy.end(scope);
        if scope.nameless {
            self.nothing();
        }
        for ino in scope.inos() {
            self.touch(ino);
        }
    }

    /// No file's kept attributes hold any more, nor those being asked for: a change through
    /// an inode without a name may be of any file (another inode may stand for it). A
    /// directory's stay: a change of a file's contents or size does not touch them, and a
    /// directory has one inode here.
    fn nothing(&mut self) {
        self.attrs
            .retain(|_, (attr, _)| attr.kind == FileType::Directory);
        self.asked.clear();
    }

    /// A token to ask for `ino`'s attributes with its release, when they could be kept.
    fn ask(&mut self, ino: u64, now: Instant) -> Option<u64> {
        if self.attrs.len() + self.asked.len() >= MAX_SETTLED {
            self.attrs
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < TTL);
        }
        if self.attrs.len() + self.asked.len() >= MAX_SETTLED || self.busy.may_touch(ino) {
            return None;
        }
        self.next = self.next.wrapping_add(1);
        self.asked.insert(ino, self.next);
        Some(self.next)
    }

    /// The release asked with `token` was answered: `attr`, when the laptop gave them, of its
    /// file `laptop` (`st_ino`), kept only if that is still the file the kernel knows there.
    fn answered(
        &mut self,
        ino: u64,
        token: u64,
        attr: Option<FileAttr>,
        laptop: u64,
        now: Instant,
    ) {
        if self.asked.get(&ino) != Some(&token) {
            return;
        }
        self.asked.remove(&ino);
        if let Some(attr) = attr
            && self.seen.get(&ino).map(|s| s.laptop) == Some(laptop)
            && attr.nlink == 1
            && attr.kind == FileType::RegularFile
            && !self.busy.may_touch(ino)
        {
            self.attrs.insert(ino, (attr, now));
        }
    }

    /// `ino`'s kept attributes, with how long they remain good.
    fn get(&mut self, ino: u64, now: Instant) -> Option<(FileAttr, Duration)> {
        let (attr, at) = self.attrs.get(&ino)?;
        let left = TTL.saturating_sub(now.saturating_duration_since(*at));
        if left.is_zero() {
            self.attrs.remove(&ino);
            return None;
        }
        Some((*attr, left))
    }

    fn forget(&mut self, ino: u64) {
        self.attrs.remove(&ino);
        self.asked.remove(&ino);
        self.seen.remove(&ino);
    }

    /// The laptop gave `ino`'s attributes to the kernel another way (a lookup, a listing, a
    /// getattr): the kept ones may be older, and must not take their place.
    fn superseded(&mut self, ino: u64, laptop: u64) {
        self.attrs.remove(&ino);
        // As many as the inodes the kernel knows; past the mount's bound, none is known (and
        // nothing kept until seen again).
        if self.seen.len() >= MAX_NODES && !self.seen.contains_key(&ino) {
            self.seen.clear();
        }
        self.epochs += 1;
        let seen = self.seen.entry(ino).or_insert(Seen {
            laptop,
            epoch: 0,
            seq: 0,
        });
        seen.laptop = laptop;
        seen.epoch = self.epochs;
    }

    fn touch(&mut self, ino: u64) {
        if let Some(seen) = self.seen.get_mut(&ino) {
            self.epochs += 1;
            seen.epoch = self.epochs;
        }
    }

    /// A change of `dir`'s names was made (or may have been) without its attributes after:
    /// what is kept of it is older now, and so is whatever a change in flight brings.
    fn unknown(&mut self, dir: u64) {
        self.attrs.remove(&dir);
        self.touch(dir);
    }

    /// Taken as a change in directory `dir` is sent, for [`Settled::dir_after`] with its
    /// answer; `None` for a directory the laptop has told nothing of.
    fn mark(&self, dir: u64) -> Option<u64> {
        self.seen.get(&dir).map(|s| s.epoch)
    }

    /// The answer to a change in `dir` sent with `mark` carried the directory's attributes
    /// after it, `attr` made of `after`: kept when they are the latest of it and nothing came
    /// meanwhile that they cannot be ordered against (see [`Settled`]).
    fn dir_after(
        &mut self,
        dir: u64,
        mark: Option<u64>,
        after: &proto::DirAfter,
        attr: FileAttr,
        now: Instant,
    ) {
        let Some(seen) = self.seen.get_mut(&dir) else {
            return;
        };
        if after.seq <= seen.seq {
            return;
        }
        seen.seq = after.seq;
        // Whatever is kept is older now.
        self.attrs.remove(&dir);
        if !(Some(seen.epoch) == mark
            && seen.laptop == after.attr.ino
            && attr.kind == FileType::Directory
            && !self.busy.changing(dir))
        {
            return;
        }
        if self.attrs.len() + self.asked.len() >= MAX_SETTLED {
            self.attrs
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < TTL);
        }
        if self.attrs.len() + self.asked.len() < MAX_SETTLED || self.attrs.contains_key(&dir) {
            self.attrs.insert(dir, (attr, now));
        }
    }
}

/// A change through the mount in flight, for [`Heads`] and [`Settled`]: begun when made,
/// ended when dropped (once the laptop has answered, or the request is given up).
struct Changing(Arc<Shared>, Scope);

impl Changing {
    fn begin(shared: &Arc<Shared>, mut scope: Scope) -> Self {
        scope.nameless = {
            let inodes = shared.inodes();
            scope.inos().any(|ino| inodes.path(ino).is_err())
        };
        lock(&shared.heads).begin(scope);
        lock(&shared.settled).begin(scope);
        Self(shared.clone(), scope)
    }
}

impl Drop for Changing {
    fn drop(&mut self) {
        // A name lost while the change was in flight: as if it had none from the start.
        let lost = !self.1.nameless && {
            let inodes = self.0.inodes();
            self.1.inos().any(|ino| inodes.path(ino).is_err())
        };
        let mut heads = lock(&self.0.heads);
        heads.end(self.1);
        if lost {
            heads.nothing();
        }
        drop(heads);
        let mut settled = lock(&self.0.settled);
        settled.end(self.1);
        if lost {
            settled.nothing();
        }
    }
}

/// Drops the kept listings of `dirs` when dropped (a write's, once the laptop answered).
struct Changed {
    shared: Arc<Shared>,
    dirs: Vec<u64>,
}

impl Drop for Changed {
    fn drop(&mut self) {
        self.shared.changed(&self.dirs);
    }
}

/// A write behind in flight: see [`Shared::behind`].
struct Behind {
    _order: OwnedRwLockReadGuard<()>,
    shared: Arc<Shared>,
    ino: u64,
    range: Range<u64>,
}

impl Drop for Behind {
    fn drop(&mut self) {
        let mut flying = lock(&self.shared.flying);
        if let Some(i) = flying
            .iter()
            .position(|(ino, r)| *ino == self.ino && *r == self.range)
        {
            flying.swap_remove(i);
        }
    }
}

#[derive(Default)]
struct Listings {
    kept: HashMap<u64, Kept>,
    bytes: usize,
}

struct Kept {
    /// The offset the kernel asks next for these.
    from: u64,
    entries: Vec<proto::DirEntry>,
    bytes: usize,
}

/// The bytes of listings kept at once on one mount; past it, a listing is asked again.
const MAX_KEPT_BYTES: usize = 4 << 20;

/// Whole listings kept for the window on one mount, and handles open on them.
const MAX_DIR_BYTES: usize = 16 << 20;
const MAX_LOCAL_DIRS: usize = 4096;

impl Shared {
    /// The entries from `offset` (past the dots), with the listing's offsets: kept from the
    /// last answer, or asked.
    async fn listing(&self, fh: u64, offset: u64) -> Result<Vec<proto::DirEntry>, Errno> {
        if let Some(kept) = self.take_listing(fh)
            && kept.from == offset.max(DOTS)
        {
            return Ok(kept.entries);
        }
        let op = Op::Readdir {
            fh,
            offset: offset.saturating_sub(DOTS),
        };
        match self.call(op).await? {
            Answer::Entries(mut entries) => {
                for e in &mut entries {
                    e.offset = e.offset.checked_add(DOTS).ok_or(Errno::EIO)?;
                }
                lock(&self.dirs).fetched(fh, offset.max(DOTS), &entries, Instant::now());
                Ok(entries)
            }
            _ => Err(Errno::EIO),
        }
    }

    /// The entries from `offset` on handle `fh`: from a kept listing (a local handle) or
    /// the laptop; true for the laptop's.
    async fn entries(&self, fh: u64, offset: u64) -> Result<(Vec<proto::DirEntry>, bool), Errno> {
        if fh & dircache::LOCAL == 0 {
            return Ok((self.listing(fh, offset).await?, true));
        }
        let all = lock(&self.dirs).local(fh).ok_or(Errno::EBADF)?;
        let from = offset.max(DOTS);
        let start = all.partition_point(|e| e.offset <= from);
        Ok((all.get(start..).unwrap_or_default().to_vec(), false))
    }

    /// Keeps what the kernel did not take, to be asked from `from`, within the mount's bound.
    fn keep(&self, fh: u64, from: u64, entries: Vec<proto::DirEntry>) {
        let bytes = entries.iter().map(|e| e.name.len() + 128).sum();
        let mut l = lock(&self.listings);
        if l.bytes + bytes <= MAX_KEPT_BYTES {
            l.bytes += bytes;
            let old = l.kept.insert(
                fh,
                Kept {
                    from,
                    entries,
                    bytes,
                },
            );
            if let Some(old) = old {
                l.bytes -= old.bytes;
            }
        }
    }

    fn take_listing(&self, fh: u64) -> Option<Kept> {
        let mut l = lock(&self.listings);
        let kept = l.kept.remove(&fh)?;
        l.bytes -= kept.bytes;
        Some(kept)
    }

    fn forget_listing(&self, fh: u64) {
        let _ = self.take_listing(fh);
        lock(&self.dirs).close(fh);
    }

    /// Directories whose kept listings a change makes stale.
    fn changed(&self, dirs: &[u64]) {
        let mut kept = lock(&self.dirs);
        for d in dirs {
            kept.changed(*d);
        }
    }

    /// The directory `ino` is in, whose listing carries its attributes.
    fn parent_of(&self, ino: u64) -> Vec<u64> {
        self.inodes().parent(ino).into_iter().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
impl Shared {
    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The call, its failure as the errno the process sees.
    /// Every call but a write behind first waits for the writes in flight (answered to the
    /// kernel already), so that it sees them on the laptop.
    async fn call(&self, op: Op) -> Result<Answer, Errno> {
        self.writes_settled(tokio::time::Instant::now() + self.client.deadline())
            .await?;
        self.client.call(op).await.map_err(|e| errno(&e))
    }

    /// Waits until the writes in flight are answered, until `deadline` at most (a request's
    /// own): the lock is fair, so behind a silent laptop's writes the waits would add up,
    /// each request queued after the last. Past it, the caller's process gets EIO.
    async fn writes_settled(&self, deadline: tokio::time::Instant) -> Result<(), Errno> {
        tokio::time::timeout_at(deadline, self.order.write())
            .await
            .map(drop)
            .map_err(|_| Errno::EIO)
    }

    /// A place for a write behind to `ino` over `range`, held until the laptop answers it;
    /// one over a range in flight waits for that first (the laptop's workers may write in
    /// any order). Within a request's deadline; EIO past it.
    async fn behind(self: &Arc<Self>, ino: u64, range: Range<u64>) -> Result<Behind, Errno> {
        let deadline = tokio::time::Instant::now() + self.client.deadline();
        loop {
            {
                let mut flying = lock(&self.flying);
                let over = flying
                    .iter()
                    .any(|(i, r)| *i == ino && r.start < range.end && range.start < r.end);
                if !over {
                    flying.push((ino, range.clone()));
                    break;
                }
            }
            self.writes_settled(deadline).await?;
        }
        let order = tokio::time::timeout_at(deadline, self.order.clone().read_owned()).await;
        let behind = |order| Behind {
            _order: order,
            shared: self.clone(),
            ino,
            range: range.clone(),
        };
        match order {
            Ok(order) => Ok(behind(order)),
            Err(_) => {
                let mut flying = lock(&self.flying);
                if let Some(i) = flying.iter().position(|(i, r)| *i == ino && *r == range) {
                    flying.swap_remove(i);
                }
                Err(Errno::EIO)
            }
        }
    }

    /// A write behind on `fh` failed: every flush and the next fsync say so.
    fn failed(&self, fh: u64, e: Errno) {
        lock(&self.failures).entry(fh).or_insert(e);
    }

    /// The failure for a flush, kept: a flush comes with every close(2) of a descriptor of
    /// the open file, including the copy a child forked meanwhile closes at its exec, and
    /// that close must not take the error from the process's own close or fsync.
    fn failure_seen(&self, fh: u64) -> Option<Errno> {
        lock(&self.failures).get(&fh).copied()
    }

    /// The failure for an fsync (told once, as the kernel's own write-back errors are) or
    /// for the release of the handle.
    fn failure(&self, fh: u64) -> Option<Errno> {
        lock(&self.failures).remove(&fh)
    }

    async fn attr(&self, ino: u64, op: Op) -> Result<FileAttr, Errno> {
        match self.call(op).await? {
            Answer::Attr(a) => {
                lock(&self.settled).superseded(ino, a.ino);
                self.file_attr(ino, &a)
            }
            _ => Err(Errno::EIO),
        }
    }

    fn file_attr(&self, ino: u64, a: &Attr) -> Result<FileAttr, Errno> {
        let kind = match a.mode & libc::S_IFMT {
            libc::S_IFREG => FileType::RegularFile,
            libc::S_IFDIR => FileType::Directory,
            libc::S_IFLNK => FileType::Symlink,
            libc::S_IFIFO => FileType::NamedPipe,
            libc::S_IFSOCK => FileType::Socket,
            libc::S_IFCHR => FileType::CharDevice,
            libc::S_IFBLK => FileType::BlockDevice,
            _ => return Err(Errno::EIO),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.blocks,
            atime: system_time(a.atime),
            mtime: system_time(a.mtime),
            ctime: system_time(a.ctime),
            crtime: system_time(a.ctime),
            kind,
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: u32::try_from(a.rdev).unwrap_or(0),
            // Tools size their buffers by it: one wire I/O.
            blksize: proto::MAX_IO,
            flags: 0,
        })
    }

    /// `name` in `dir` is made or moved through the mount: it may be there now.
    fn naming(&self, dir: u64, name: &[u8]) {
        lock(&self.absent).forget(dir, name);
    }

    /// Taken as a change of `dir`'s names is sent: see [`Settled::mark`].
    fn mark(&self, dir: u64) -> Option<u64> {
        lock(&self.settled).mark(dir)
    }

    /// The laptop answered a change of `dir`'s names, sent with `mark`, with `after`.
    fn dir_after(&self, dir: u64, mark: Option<u64>, after: Option<Box<proto::DirAfter>>) {
        match after.map(|a| (self.file_attr(dir, &a.attr), a)) {
            Some((Ok(attr), after)) => {
                lock(&self.settled).dir_after(dir, mark, &after, attr, Instant::now());
            }
            _ => self.dir_unknown(dir),
        }
    }

    /// A change of `dir`'s names failed, or was given up: the laptop may have made it.
    fn dir_unknown(&self, dir: u64) {
        lock(&self.settled).unknown(dir);
    }

    /// `dirs` and the directories they are in, whose listings carry their attributes.
    fn with_parents(&self, dirs: &[u64]) -> Vec<u64> {
        let inodes = self.inodes();
        let mut all = dirs.to_vec();
        all.extend(dirs.iter().filter_map(|d| inodes.parent(*d)));
        all
    }

    /// The kernel was not given `ino` after all (a listing's entry that did not fit, an entry
    /// that failed): the lookup taken for it goes back.
    fn unsent(&self, ino: u64) {
        let gone = {
            let mut inodes = self.inodes();
            inodes.forget(ino, 1);
            inodes.parent(ino).is_none()
        };
        if gone {
            lock(&self.settled).forget(ino);
        }
    }

    /// A new name in `parent` answered with `attr`: the kernel gets its entry.
    fn entry(&self, parent: u64, name: &[u8], attr: &Attr) -> Result<FileAttr, Errno> {
        let ino = self
            .inodes()
            .remember(parent, name)
            .map_err(Errno::from_i32)?;
        lock(&self.settled).superseded(ino, attr.ino);
        self.file_attr(ino, attr).inspect_err(|_| self.unsent(ino))
    }
}

/// An opening of a file the kernel holds a name of (for up to [`TTL`]) that the laptop no
/// longer has: `ESTALE`, on which the kernel walks the path again asking the laptop
/// (`LOOKUP_REVAL`), as with NFS. The kernel strips `O_CREAT` from an opening of a name it
/// holds, so without it writing a file removed on the laptop failed with `ENOENT` until the
/// name's 20 s were over. Only openings: `stat`s and listings say `ENOENT` as they are (the
/// kernel retries no call on a descriptor, and `ESTALE` would reach the program there).
fn gone(e: Errno) -> Errno {
    if e == Errno::ENOENT { Errno::ESTALE } else { e }
}

/// The errno a process in the container sees: the laptop's own when it is one a process
/// may see, `EIO` otherwise (the kernel refuses a reply with an errno out of its range and
/// leaves the request waiting; `ENOSYS` would switch the operation off for the mount).
fn errno(e: &CallError) -> Errno {
    match e.errno() {
        n @ 1..512 if n != libc::ENOSYS => Errno::from_i32(n),
        _ => Errno::EIO,
    }
}

fn system_time(t: Time) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.secs >= 0 {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(t.secs.unsigned_abs()) + nanos)
            .unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.secs.unsigned_abs()))
            .and_then(|t| t.checked_add(nanos))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn wire_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Time {
                secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Time { secs, nanos }
            }
        }),
    }
}

/// A connect mount's file system; give it to [`run`].
pub struct ConnectFs {
    shared: Arc<Shared>,
    rt: Handle,
    read_ahead: ReadAhead,
}

/// The mount's readahead, raised to [`MAX_READAHEAD`] once the kernel has INIT's answer
/// (which would lower it again): on the loop's first open, the first request that may read a
/// file, answered after INIT's. The setting is opened by [`run`], while the mount is held;
/// unset for a file system not run by it, or where `/sys` is read-only.
#[derive(Default)]
struct ReadAhead {
    setting: Option<berth_runtime::mount::ReadAhead>,
    done: std::sync::atomic::AtomicBool,
}

impl ReadAhead {
    fn raise(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(setting) = &self.setting
            && !self.done.load(Relaxed)
            && !self.done.swap(true, Relaxed)
            && let Err(e) = setting.set(MAX_READAHEAD)
        {
            tracing::debug!(error = %e, "connect: the kernel's readahead stays");
        }
    }
}

impl ConnectFs {
    /// `owner`: the uid and gid every file is shown with (the container root's host ids).
    pub fn new(client: Client, rt: Handle, owner: (u32, u32)) -> Self {
        Self::with_limits(client, rt, owner, MAX_NODES, MAX_NAME_BYTES)
    }

    pub fn with_limits(
        client: Client,
        rt: Handle,
        owner: (u32, u32),
        max_nodes: usize,
        max_name_bytes: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                owner,
                inodes: Mutex::new(Inodes::new(max_nodes, max_name_bytes)),
                tasks: Arc::new(Semaphore::new(MAX_TASKS)),
                listings: Mutex::default(),
                order: Arc::default(),
                flying: Mutex::default(),
                failures: Mutex::default(),
                dirs: Mutex::new(DirCache::new(TTL, MAX_DIR_BYTES, MAX_LOCAL_DIRS)),
                heads: Mutex::default(),
                settled: Mutex::default(),
                absent: Mutex::default(),
            }),
            rt,
            read_ahead: ReadAhead::default(),
        }
    }

    /// A place among the mount's [`MAX_TASKS`], waited for on the FUSE loop: while all are
    /// taken the loop reads no more requests and the kernel holds them (with their
    /// processes), so nothing more is copied or spawned however many processes call in.
    /// `None` only when the runtime is gone.
    fn place(&self) -> Option<OwnedSemaphorePermit> {
        self.rt
            .block_on(self.shared.tasks.clone().acquire_owned())
            .ok()
    }

    /// Runs `answer` on the runtime with the shared state, in a place taken first: the
    /// FUSE loop goes on once it has one.
    fn answer<F, Fut>(&self, answer: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Without a place the reply is dropped unsent: fuser answers EIO for it.
        if let Some(place) = self.place() {
            self.answer_in(place, answer);
        }
    }

    fn answer_in<F, Fut>(&self, place: OwnedSemaphorePermit, answer: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fut = answer(self.shared.clone());
        self.rt.spawn(async move {
            fut.await;
            drop(place);
        });
    }

    fn path(&self, ino: INodeNo) -> Result<proto::RelPath, Errno> {
        self.shared.inodes().path(ino.0).map_err(Errno::from_i32)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<proto::RelPath, Errno> {
        self.shared
            .inodes()
            .child_path(parent.0, name.as_bytes())
            .map_err(Errno::from_i32)
    }

    /// Like [`Self::answer`], for a request that changes `dirs` (or files in them): their
    /// kept listings go now, and again once it is answered (a listing read meanwhile may
    /// have missed the change).
    fn answer_touching<F, Fut>(&self, dirs: Vec<u64>, answer: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.shared.changed(&dirs);
        self.answer(move |s| async move {
            let shared = s.clone();
            answer(s).await;
            shared.changed(&dirs);
        });
    }

    /// A request whose answer is a new entry `name` in `parent`; `changing`, held until the
    /// laptop answers, when it changes a file there is (a link).
    fn new_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        op: Op,
        changing: Option<Changing>,
        also: Vec<u64>,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        let lookup = matches!(op, Op::Lookup { .. });
        let (touched, mark, token) = if lookup {
            let token = lock(&self.shared.absent).ask(parent.0, &name);
            (Vec::new(), None, token)
        } else {
            self.shared.naming(parent.0, &name);
            let mut touched = self.shared.with_parents(&[parent.0]);
            touched.extend(also);
            (touched, self.shared.mark(parent.0), None)
        };
        self.answer_touching(touched, move |s| async move {
            let _changing = changing;
            let answer = s.call(op).await;
            if let Some(token) = token {
                let absent = matches!(answer, Err(Errno::ENOENT));
                lock(&s.absent).answered(token, absent, Instant::now());
            }
            if !lookup || answer.is_ok() {
                s.naming(parent.0, &name);
            }
            let attr = match answer {
                Ok(Answer::Attr(a)) if lookup => a,
                Ok(Answer::Entry { attr, dir }) if !lookup => {
                    s.dir_after(parent.0, mark, dir);
                    attr
                }
                // A name that is not there is remembered as such for as long as one that
                // is (`make` asks for GNUmakefile and makefile each time it runs).
                Err(Errno::ENOENT) if lookup => {
                    return reply.entry(&TTL, &dot_attr(0), Generation(0));
                }
                failed => {
                    if !lookup {
                        s.dir_unknown(parent.0);
                    }
                    return reply.error(failed.err().unwrap_or(Errno::EIO));
                }
            };
            match s.entry(parent.0, &name, &attr) {
                Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    /// A request changing the names of `dirs` (an unlink's or rmdir's directory, a rename's
    /// two), and the files of `scope` (their link count or place), answered with the
    /// directories after it. The names it `made` (a rename's) may be there once it is
    /// answered, whatever the answer: it may have been made after the call was given up.
    fn done(
        &self,
        dirs: Vec<u64>,
        scope: Scope,
        op: Op,
        reply: ReplyEmpty,
        made: Vec<(u64, Vec<u8>)>,
        then: impl FnOnce(&Shared) + Send + 'static,
    ) {
        let changing = Changing::begin(&self.shared, scope);
        let marks: Vec<_> = dirs.iter().map(|d| (*d, self.shared.mark(*d))).collect();
        let rename = matches!(op, Op::Rename { .. });
        self.answer_touching(self.shared.with_parents(&dirs), move |s| async move {
            let _changing = changing;
            // The directories after, in the order of `dirs`.
            let answer = s.call(op).await;
            for (dir, name) in &made {
                s.naming(*dir, name);
            }
            let afters = match answer {
                Ok(Answer::Removed { dir }) if !rename => [dir, None],
                Ok(Answer::Renamed { from, to }) if rename => [from, to],
                failed => {
                    for (dir, _) in &marks {
                        s.dir_unknown(*dir);
                    }
                    return reply.error(failed.err().unwrap_or(Errno::EIO));
                }
            };
            then(&s);
            for ((dir, mark), after) in marks.into_iter().zip(afters) {
                s.dir_after(dir, mark, after);
            }
            reply.ok()
        });
    }
}

macro_rules! resolve {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(e),
        }
    };
}

impl Filesystem for ConnectFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each is a wish: what the kernel lacks is done without.
        let _ = config.set_max_write(proto::MAX_IO);
        // No `max_readahead`: it may only lower the kernel's (see `ReadAhead`).
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        for flag in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // Cached pages are kept across opens (FOPEN_KEEP_CACHE) and dropped when the
            // attributes show the file changed (mtime or size).
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            let _ = config.add_capabilities(flag);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let absent = lock(&self.shared.absent).get(parent.0, name.as_bytes(), Instant::now());
        if let Some(left) = absent {
            return reply.entry(&left, &dot_attr(0), Generation(0));
        }
        let path = resolve!(reply, self.child(parent, name));
        self.new_entry(parent, name, Op::Lookup { path }, None, Vec::new(), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.shared.settled).forget(ino.0);
        self.shared.inodes().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // A file written through the mount and closed since: as the laptop gave it then.
        let kept = lock(&self.shared.settled).get(ino.0, Instant::now());
        if let Some((attr, left)) = kept {
            return reply.attr(&left, &attr);
        }
        let path = match (self.path(ino), fh) {
            (Ok(p), _) => p,
            // An unlinked file still open is asked by its handle.
            (Err(_), Some(_)) => proto::RelPath::root(),
            (Err(e), None) => return reply.error(e),
        };
        let op = Op::Getattr {
            path,
            fh: fh.map(|f| f.0),
        };
        self.answer(move |s| async move {
            match s.attr(ino.0, op).await {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let path = match (self.path(ino), fh) {
            (Ok(p), _) => p,
            (Err(_), Some(_)) => proto::RelPath::root(),
            (Err(e), None) => return reply.error(e),
        };
        let fh = fh.map(|f| f.0);
        let mode = mode.map(|m| m & 0o7777);
        let (atime, mtime) = (atime.map(wire_time), mtime.map(wire_time));
        // Ownership is not carried (chown as root succeeds and changes nothing).
        let op = if mode.is_none() && size.is_none() && atime.is_none() && mtime.is_none() {
            Op::Getattr { path, fh }
        } else {
            Op::Setattr {
                path,
                fh,
                mode,
                size,
                atime,
                mtime,
            }
        };
        let (touched, changing) = match op {
            Op::Setattr { .. } => (
                self.shared.parent_of(ino.0),
                Some(Changing::begin(&self.shared, Scope::file(ino.0))),
            ),
            _ => (Vec::new(), None),
        };
        self.answer_touching(touched, move |s| async move {
            let _changing = changing;
            match s.attr(ino.0, op).await {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let path = resolve!(reply, self.path(ino));
        self.answer(move |s| async move {
            match s.call(Op::Readlink { path }).await {
                Ok(Answer::Bytes(b)) if b.len() < 4096 => reply.data(&b),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Only regular files: no devices, pipes or sockets on the laptop's disk.
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let path = resolve!(reply, self.child(parent, name));
        let name = name.as_bytes().to_vec();
        self.shared.naming(parent.0, &name);
        let mark = self.shared.mark(parent.0);
        self.answer_touching(self.shared.with_parents(&[parent.0]), move |s| async move {
            let op = Op::Create {
                path,
                flags: libc::O_WRONLY | libc::O_EXCL,
                mode: mode & 0o7777,
            };
            let answer = s.call(op).await;
            s.naming(parent.0, &name);
            let (fh, attr) = match answer {
                Ok(Answer::Created { fh, attr, dir }) => {
                    s.dir_after(parent.0, mark, dir);
                    (fh, attr)
                }
                failed => {
                    s.dir_unknown(parent.0);
                    return reply.error(failed.err().unwrap_or(Errno::EIO));
                }
            };
            let _ = s.call(Op::Release { fh, attr: false }).await;
            match s.entry(parent.0, &name, &attr) {
                Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let path = resolve!(reply, self.child(parent, name));
        let op = Op::Mkdir {
            path,
            mode: mode & 0o7777,
        };
        self.new_entry(parent, name, op, None, Vec::new(), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let path = resolve!(reply, self.child(parent, name));
        let scope = Scope::of(self.shared.inodes().find(parent.0, name.as_bytes()), None);
        let name = name.as_bytes().to_vec();
        self.shared.naming(parent.0, &name);
        self.done(
            vec![parent.0],
            scope,
            Op::Unlink { path },
            reply,
            Vec::new(),
            move |s| s.inodes().unlinked(parent.0, &name),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let path = resolve!(reply, self.child(parent, name));
        // The directory removed: its kept attributes go.
        let scope = Scope::of(self.shared.inodes().find(parent.0, name.as_bytes()), None);
        let name = name.as_bytes().to_vec();
        self.shared.naming(parent.0, &name);
        self.done(
            vec![parent.0],
            scope,
            Op::Rmdir { path },
            reply,
            Vec::new(),
            move |s| s.inodes().unlinked(parent.0, &name),
        );
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let path = resolve!(reply, self.child(parent, link_name));
        let target = target.as_os_str().as_bytes().to_vec();
        let op = Op::Symlink { path, target };
        self.new_entry(parent, link_name, op, None, Vec::new(), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let from = resolve!(reply, self.child(parent, name));
        let to = resolve!(reply, self.child(newparent, newname));
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        // What is renamed, and what it replaces (or is exchanged with).
        let scope = {
            let inodes = self.shared.inodes();
            Scope::of(
                inodes.find(parent.0, &name),
                inodes.find(newparent.0, &newname),
            )
        };
        let op = Op::Rename {
            from,
            to,
            flags: flags.bits(),
        };
        self.shared.naming(parent.0, &name);
        self.shared.naming(newparent.0, &newname);
        let made = vec![(parent.0, name.clone()), (newparent.0, newname.clone())];
        self.done(
            vec![parent.0, newparent.0],
            scope,
            op,
            reply,
            made,
            move |s| {
                s.inodes()
                    .renamed(parent.0, &name, newparent.0, &newname, exchange)
            },
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let from = resolve!(reply, self.path(ino));
        let to = resolve!(reply, self.child(newparent, newname));
        // The file gets a second name (another inode here).
        let changing = Changing::begin(&self.shared, Scope::file(ino.0));
        let op = Op::Link { from, to };
        // The file's directory lists its link count too.
        let source = self.shared.parent_of(ino.0);
        self.new_entry(newparent, newname, op, Some(changing), source, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.read_ahead.raise();
        let path = resolve!(reply, self.path(ino));
        let reading = flags.0 & libc::O_ACCMODE != libc::O_WRONLY;
        let truncating = (flags.0 & libc::O_TRUNC != 0)
            .then(|| Changing::begin(&self.shared, Scope::file(ino.0)));
        self.answer(move |s| async move {
            let _truncating = truncating;
            let at = Instant::now();
            let token = if reading {
                lock(&s.heads).ask(ino.0, at)
            } else {
                None
            };
            let head = if token.is_some() { proto::MAX_HEAD } else { 0 };
            let answer = s
                .call(Op::Open {
                    path,
                    flags: flags.0,
                    head,
                })
                .await;
            let (fh, data) = match answer {
                Ok(Answer::Opened { fh, head: data }) => (Ok(fh), data),
                Ok(_) => (Err(Errno::EIO), None),
                Err(e) => (Err(gone(e)), None),
            };
            if let Some(token) = token {
                let got = fh.ok().zip(data.map(ByteBuf::into_vec));
                lock(&s.heads).answered(token, got, at, head);
            }
            match fh {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(e),
            }
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let path = resolve!(reply, self.child(parent, name));
        let existing = self.shared.inodes().find(parent.0, name.as_bytes());
        let name = name.as_bytes().to_vec();
        let op = Op::Create {
            path,
            flags: flags & !libc::O_CREAT,
            mode: mode & 0o7777,
        };
        // An existing file (one the kernel took for absent) is emptied.
        let truncating = (flags & libc::O_TRUNC != 0).then(|| {
            let scope = Scope::of(existing, None);
            Changing::begin(&self.shared, scope)
        });
        self.shared.naming(parent.0, &name);
        let mark = self.shared.mark(parent.0);
        self.answer_touching(self.shared.with_parents(&[parent.0]), move |s| async move {
            let _truncating = truncating;
            let answer = s.call(op).await;
            s.naming(parent.0, &name);
            let (fh, attr) = match answer {
                Ok(Answer::Created { fh, attr, dir }) => {
                    s.dir_after(parent.0, mark, dir);
                    (fh, attr)
                }
                failed => {
                    s.dir_unknown(parent.0);
                    return reply.error(failed.err().unwrap_or(Errno::EIO));
                }
            };
            match s.entry(parent.0, &name, &attr) {
                Ok(a) => {
                    let keep = FopenFlags::FOPEN_KEEP_CACHE;
                    reply.created(&TTL, &a, Generation(0), FileHandle(fh), keep)
                }
                Err(e) => {
                    // The kernel never learns the handle: close it on the laptop.
                    let _ = s.call(Op::Release { fh, attr: false }).await;
                    reply.error(e)
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Some(data) = lock(&self.shared.heads).read(fh.0, offset, size, Instant::now()) {
            return reply.data(&data);
        }
        self.answer(move |s| async move {
            // The kernel asks at most max_pages at once; the wire carries MAX_IO a frame, and
            // the frames of one read are in flight together. A short answer is the end of
            // the file.
            let parts = (0..size.div_ceil(proto::MAX_IO)).map(|i| {
                let at = i * proto::MAX_IO;
                let want = (size - at).min(proto::MAX_IO);
                let op = Op::Read {
                    fh: fh.0,
                    offset: offset.saturating_add(u64::from(at)),
                    size: want,
                };
                let s = s.clone();
                async move { (want, s.call(op).await) }
            });
            let mut data: Vec<u8> = Vec::new();
            for (want, answer) in futures_util::future::join_all(parts).await {
                match answer {
                    Ok(Answer::Data(d)) if d.len() <= want as usize => {
                        let short = d.len() < want as usize;
                        if data.is_empty() {
                            data = d;
                        } else {
                            data.extend_from_slice(&d);
                        }
                        if short {
                            break;
                        }
                    }
                    Ok(_) => return reply.error(Errno::EIO),
                    Err(e) => return reply.error(e),
                }
            }
            reply.data(&data)
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // max_write is MAX_IO: the kernel never sends more.
        let Some(chunk) = data.get(..data.len().min(proto::MAX_IO as usize)) else {
            return reply.error(Errno::EIO);
        };
        // The place before the copy: writers waiting for one hold no copy.
        let Some(place) = self.place() else {
            return reply.error(Errno::EIO);
        };
        let op = Op::Write {
            fh: fh.0,
            offset,
            data: chunk.to_vec(),
        };
        let len = chunk.len();
        let Some(end) = offset.checked_add(len as u64) else {
            return reply.error(Errno::EFBIG);
        };
        // Appends are placed by the laptop, and O_SYNC/O_DSYNC writes are to be on its
        // disk when they return: those wait for the laptop's answer.
        let behind = flags.0 & (libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC) == 0;
        // The file's size and times change: its directory's kept listing goes, and so do
        // the heads of file contents.
        let changing = Changing::begin(&self.shared, Scope::file(ino.0));
        let touched = self.shared.parent_of(ino.0);
        self.shared.changed(&touched);
        self.answer_in(place, move |s| async move {
            // Held until the laptop has answered.
            let changing = changing;
            let _after = Changed {
                shared: s.clone(),
                dirs: touched,
            };
            if !behind {
                return match s.call(op).await {
                    Ok(Answer::Written(n)) if n as usize <= len => reply.written(n),
                    Ok(_) => reply.error(Errno::EIO),
                    Err(e) => reply.error(e),
                };
            }
            // Answered now, as sshfs does: the next write goes out while this one is on
            // its way, and a failure is told at the next flush (close) or fsync.
            let flying = match s.behind(ino.0, offset..end).await {
                Ok(flying) => flying,
                Err(e) => return reply.error(e),
            };
            reply.written(len as u32);
            let failed = match s.client.call(op).await {
                Ok(Answer::Written(n)) if n as usize == len => None,
                // The laptop's disk is full (a regular file takes what fits).
                Ok(Answer::Written(_)) => Some(Errno::ENOSPC),
                Ok(_) => Some(Errno::EIO),
                Err(e) => Some(errno(&e)),
            };
            if let Some(e) = failed {
                s.failed(fh.0, e);
            }
            // Ended once the laptop has answered: until then a release of the file asks for
            // no attributes ([`Settled::ask`]).
            drop(changing);
            drop(flying);
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): the writes behind are on the laptop, or their failure is told.
        self.answer(move |s| async move {
            let deadline = tokio::time::Instant::now() + s.client.deadline();
            if let Err(e) = s.writes_settled(deadline).await {
                return reply.error(e);
            }
            match s.failure_seen(fh.0) {
                Some(e) => reply.error(e),
                None => reply.ok(),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // close(2) has returned already; the handle is closed on the laptop meanwhile.
        reply.ok();
        lock(&self.shared.heads).release(fh.0);
        // A handle that may have written: its file's attributes come back with it.
        let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let token = writable
            .then(|| lock(&self.shared.settled).ask(ino.0, Instant::now()))
            .flatten();
        self.answer(move |s| async move {
            let attr = token.is_some();
            let answer = s.call(Op::Release { fh: fh.0, attr }).await;
            if let Some(token) = token {
                // An inode left without a name (unlinked, renamed over) is not kept: another
                // name of the same file is another inode here, whose writes it would not see.
                let named = s.inodes().path(ino.0).is_ok();
                let (attr, laptop) = match answer {
                    Ok(Answer::Attr(a)) if named => (s.file_attr(ino.0, &a).ok(), a.ino),
                    _ => (None, 0),
                };
                lock(&s.settled).answered(ino.0, token, attr, laptop, Instant::now());
            }
            let _ = s.failure(fh.0);
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.answer(move |s| async move {
            match s.call(Op::Fsync { fh: fh.0, datasync }).await {
                Ok(Answer::Done) => match s.failure(fh.0) {
                    Some(e) => reply.error(e),
                    None => reply.ok(),
                },
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // A listing kept from less than the window ago: no round trip.
        if let Some(fh) = lock(&self.shared.dirs).open(ino.0, Instant::now()) {
            return reply.opened(FileHandle(fh), FopenFlags::empty());
        }
        let path = resolve!(reply, self.path(ino));
        self.answer(move |s| async move {
            match s.call(Op::Opendir { path }).await {
                // Listings are not cached by the kernel (FOPEN_CACHE_DIR): each one, with
                // attributes, refreshes the entries' (20 s) for the stats that follow, as
                // `git status` does; served from a cache, every stat after the 20 s was a
                // round trip (docs/benchmarks.md). The daemon keeps them instead.
                Ok(Answer::Handle(fh)) if fh & dircache::LOCAL == 0 => {
                    lock(&s.dirs).start(fh, ino.0);
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.answer(move |s| async move {
            for (name, off) in dots(offset) {
                let shown = match name {
                    b"." => ino.0,
                    _ => s.inodes().parent(ino.0).unwrap_or(ino.0),
                };
                if reply.add(
                    INodeNo(shown),
                    off,
                    FileType::Directory,
                    OsStr::from_bytes(name),
                ) {
                    return reply.ok();
                }
            }
            let (entries, laptop) = match s.entries(fh.0, offset).await {
                Ok(e) => e,
                Err(e) => return reply.error(e),
            };
            let mut next = offset.max(DOTS);
            let mut rest = entries.into_iter();
            while let Some(e) = rest.next() {
                let kind = e.attr.and_then(|a| s.file_attr(0, &a).ok()).map(|a| a.kind);
                let Some(kind) = kind.filter(|_| valid_name(&e.name)) else {
                    next = e.offset;
                    continue;
                };
                // The number the kernel knows, if it knows one; any other is only shown.
                let shown = s.inodes().find(ino.0, &e.name).unwrap_or(u64::MAX);
                if reply.add(INodeNo(shown), e.offset, kind, OsStr::from_bytes(&e.name)) {
                    if laptop {
                        s.keep(fh.0, next, std::iter::once(e).chain(rest).collect());
                    }
                    break;
                }
                next = e.offset;
            }
            reply.ok()
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.answer(move |s| async move {
            for (name, off) in dots(offset) {
                // The kernel takes no lookup on these, and only the number and the kind
                // from their attributes.
                let shown = match name {
                    b"." => ino.0,
                    _ => s.inodes().parent(ino.0).unwrap_or(ino.0),
                };
                let a = dot_attr(shown);
                if reply.add(
                    INodeNo(shown),
                    off,
                    OsStr::from_bytes(name),
                    &TTL,
                    &a,
                    Generation(0),
                ) {
                    return reply.ok();
                }
            }
            let (entries, laptop) = match s.entries(fh.0, offset).await {
                Ok(e) => e,
                Err(e) => return reply.error(e),
            };
            let mut next = offset.max(DOTS);
            let mut sent = false;
            let mut rest = entries.into_iter();
            while let Some(e) = rest.next() {
                let Some(attr) = e.attr.filter(|_| valid_name(&e.name)) else {
                    next = e.offset;
                    continue;
                };
                let a = match s.entry(ino.0, &e.name, &attr) {
                    Ok(a) => a,
                    // The inode table is full: what is listed so far goes out, and a call
                    // with nothing to give fails rather than end the listing early.
                    Err(err) => {
                        if laptop {
                            s.keep(fh.0, next, std::iter::once(e).chain(rest).collect());
                        }
                        if sent || offset < DOTS {
                            return reply.ok();
                        }
                        return reply.error(err);
                    }
                };
                let name = OsStr::from_bytes(&e.name);
                if reply.add(a.ino, e.offset, name, &TTL, &a, Generation(0)) {
                    // Not sent: the kernel takes no lookup on it.
                    s.unsent(a.ino.0);
                    if laptop {
                        s.keep(fh.0, next, std::iter::once(e).chain(rest).collect());
                    }
                    break;
                }
                sent = true;
                next = e.offset;
            }
            reply.ok()
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
        self.shared.forget_listing(fh.0);
        if fh.0 & dircache::LOCAL != 0 {
            return;
        }
        self.answer(move |s| async move {
            let _ = s
                .call(Op::Release {
                    fh: fh.0,
                    attr: false,
                })
                .await;
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.answer(move |s| async move {
            match s.call(Op::Statfs).await {
                Ok(Answer::Statfs(f)) => reply.statfs(
                    f.blocks, f.bfree, f.bavail, f.files, f.ffree, f.bsize, f.namelen, f.frsize,
                ),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    // Extended attributes are not carried. ENOSYS tells the kernel once for the mount: it
    // then answers EOPNOTSUPP itself, and stops asking for security.capability on each
    // write.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks; this is asked only without it.
        reply.ok();
    }
}

/// A name from the laptop the kernel may be given: one component, not a dot entry (those
/// are the daemon's own: [`dots`]).
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

/// A listing's offsets: `.` is 0 → 1, `..` 1 → 2, and the laptop's entry n (it leaves out
/// the dots) n + 2.
pub(super) const DOTS: u64 = 2;

/// The dot entries a listing from `offset` starts with, and the offset after each.
fn dots(offset: u64) -> impl Iterator<Item = (&'static [u8], u64)> {
    [(&b"."[..], 1), (&b".."[..], DOTS)]
        .into_iter()
        .filter(move |(_, off)| *off > offset)
}

/// What a dot entry of readdirplus carries: the kernel reads its number and kind only.
/// With number 0, a name that is not there (a negative entry).
fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: proto::MAX_IO,
        flags: 0,
    }
}

/// A running FUSE session; [`FuseSession::abort`] (or dropping it) ends it.
pub struct FuseSession {
    conn: FuseConnection,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// Descriptors of this mount's files that a container sends the daemon are closed apart
    /// from everyone else's (each close waits on this mount, and through it on the laptop).
    _served: berth_guest_proto::fds::Served,
}

/// Runs `fs` on `dev` (an open `/dev/fuse` whose connection `conn` is mounted, its mount
/// held by the caller) on a thread of its own.
pub fn run(mut fs: ConnectFs, dev: OwnedFd, conn: FuseConnection) -> io::Result<FuseSession> {
    match conn.read_ahead() {
        Ok(setting) => fs.read_ahead.setting = Some(setting),
        Err(e) => tracing::debug!(error = %e, "connect: the kernel's readahead stays"),
    }
    let mut config = fuser::Config::default();
    // Processes in the container are other users than the daemon's root; the kernel checks
    // their permissions (allow_other, default_permissions on the mount).
    config.acl = SessionACL::All;
    config.n_threads = Some(1);
    let thread = std::thread::Builder::new()
        .name("berth-fuse".into())
        .spawn(move || {
            let session = fuser::Session::from_fd(fs, dev, SessionACL::All, config)?;
            session.run()
        })?;
    let served = berth_guest_proto::fds::serve(conn.0, move || {
        tracing::warn!(
            conn = conn.0,
            "connect: descriptors of a mount's files were sent to the daemon faster than they close; the mount is ended"
        );
        match conn.abort() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, conn = conn.0, "connect: cannot abort a FUSE connection");
                false
            }
        }
    });
    Ok(FuseSession {
        conn,
        thread: Some(thread),
        _served: served,
    })
}

impl FuseSession {
    /// Aborts the FUSE connection: every request waiting and every later one fails with
    /// `ENOTCONN`, and the session's thread ends.
    pub fn abort(&self) -> io::Result<()> {
        self.conn.abort()
    }

    /// Whether the session's thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the session's thread (after [`FuseSession::abort`], or once the mount is
    /// gone); its error if it ended on one.
    pub fn join(mut self) -> io::Result<()> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the FUSE session's thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for FuseSession {
    fn drop(&mut self) {
        if self.thread.is_some()
            && let Err(e) = self.abort()
        {
            tracing::warn!(error = %e, conn = self.conn.0, "connect: cannot abort a FUSE connection");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::Ordering;

    use berth_connect::client::Wire;
    use rustix::fs::{CWD, Mode, OFlags};
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};

    use super::*;
    use crate::connect::laptop::{Laptop as FakeLaptop, Tamper};

    /// Who answers the mount's requests (the fake when none is given).
    enum Laptop {
        /// The fake, its answers passed through a function.
        Tampered(Tamper),
        /// The fake, doing writes in any order (`FakeLaptop::reorder`).
        Reordering,
    }

    /// What every file is shown as in these tests (the laptop's files are root's).
    const OWNER: (u32, u32) = (1234, 5678);

    /// A laptop directory mounted on a host directory through a `ConnectFs`.
    struct Mounted {
        laptop: tempfile::TempDir,
        at: tempfile::TempDir,
        session: Option<FuseSession>,
        shared: Arc<Shared>,
        serving: tokio::task::JoinHandle<()>,
        silent: Arc<std::sync::atomic::AtomicBool>,
        // Serves the laptop and the client while the mount lives.
        _rt: tokio::runtime::Runtime,
    }

    impl Mounted {
        fn dir(&self) -> &Path {
            self.at.path()
        }

        fn laptop(&self) -> &Path {
            self.laptop.path()
        }

        /// `sh -c script` in the mount; its stdout, or a panic with its stderr.
        fn sh(&self, script: &str) -> String {
            let out = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(self.dir())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            if let Some(s) = self.session.take() {
                let _ = s.abort();
            }
            let _ = rustix::mount::unmount(self.at.path(), rustix::mount::UnmountFlags::DETACH);
        }
    }

    /// The FUSE connection behind a descriptor on its mount (the minor of its device, as the
    /// fuse control file system names it), asked without a round trip to the file system.
    fn connection(mounted: impl AsFd) -> io::Result<FuseConnection> {
        use rustix::fs::{AtFlags, StatxFlags, statx};
        let st = statx(
            mounted,
            "",
            AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
            StatxFlags::BASIC_STATS,
        )?;
        assert_eq!(st.stx_dev_major, 0, "not a FUSE mount");
        Ok(FuseConnection(st.stx_dev_minor))
    }

    /// Mounts like the daemon does (the new mount API), but on a host directory.
    fn fuse_mount(at: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
        let dev = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
        let fs = rustix::mount::fsopen("fuse", FsOpenFlags::FSOPEN_CLOEXEC)?;
        let fd = dev.as_raw_fd().to_string();
        for (key, value) in [
            ("fd", fd.as_str()),
            ("rootmode", "40000"),
            ("user_id", "0"),
            ("group_id", "0"),
        ] {
            rustix::mount::fsconfig_set_string(&fs, key, value)?;
        }
        rustix::mount::fsconfig_set_flag(&fs, "allow_other")?;
        rustix::mount::fsconfig_set_flag(&fs, "default_permissions")?;
        rustix::mount::fsconfig_create(&fs)?;
        let mnt =
            rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
        rustix::mount::move_mount(&mnt, "", CWD, at, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
        Ok((dev, mnt))
    }

    fn mount_with(
        owner: (u32, u32),
        deadline: Duration,
        max_nodes: usize,
        tamper: Option<Laptop>,
    ) -> Option<Mounted> {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: FUSE mounts need root");
            return None;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let laptop_dir = tempfile::tempdir().unwrap();
        let at = tempfile::tempdir().unwrap();
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let mut laptop = FakeLaptop::new(laptop_dir.path());
        laptop.reorder = matches!(tamper, Some(Laptop::Reordering));
        laptop.tamper = match tamper {
            Some(Laptop::Tampered(t)) => Some(t),
            _ => None,
        };
        let silent = laptop.silent.clone();
        let serving = rt.spawn(laptop.serve(theirs));
        let (r, w) = tokio::io::split(ours);
        let (client, driver) = Client::start(Wire::new(r, w), deadline);
        rt.spawn(driver);
        let fs = ConnectFs::with_limits(client, rt.handle().clone(), owner, max_nodes, 1 << 20);
        let shared = fs.shared.clone();
        let (dev, mnt) = match fuse_mount(at.path()) {
            Ok(m) => m,
            Err(e) => {
                println!("skipped: cannot mount FUSE here: {e}");
                return None;
            }
        };
        let session = run(fs, dev, connection(&mnt).unwrap()).unwrap();
        Some(Mounted {
            laptop: laptop_dir,
            at,
            session: Some(session),
            shared,
            serving,
            silent,
            _rt: rt,
        })
    }

    fn mount() -> Option<Mounted> {
        mount_with(OWNER, Duration::from_secs(30), MAX_NODES, None)
    }

    /// A mount served by `laptop`, otherwise as [`mount`].
    fn mount_by(laptop: Laptop) -> Option<Mounted> {
        mount_with(OWNER, Duration::from_secs(30), MAX_NODES, Some(laptop))
    }

    /// Runs `f` on a thread of its own, failing the test if it has not ended in a minute.
    fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the operation hangs")
    }

    #[test]
    fn ordinary_tools_work_on_the_mount() {
        let Some(m) = mount() else { return };
        m.sh("set -e
             echo hello > a; echo more >> a
             mkdir -p d/e; echo x > d/e/f
             mv d dd; mv dd/e/f dd/e/g
             echo new > b; mv b a
             echo gone > c; rm c
             mkdir r; rmdir r
             ln -s a link; ln a hard
             truncate -s 2 hard
             chmod 600 a; touch -d '2001-02-03 04:05:06' a
             chown 1:1 a");
        let l = m.laptop();
        assert_eq!(std::fs::read(l.join("a")).unwrap(), b"ne");
        assert_eq!(std::fs::read(l.join("dd/e/g")).unwrap(), b"x\n");
        assert!(!l.join("c").exists() && !l.join("r").exists() && !l.join("d").exists());
        assert_eq!(std::fs::read_link(l.join("link")).unwrap(), Path::new("a"));
        let meta = std::fs::metadata(l.join("a")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.mtime(), 981_173_106 - local_offset());
        // chown changed nothing on the laptop.
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());

        // What the container sees: the owner given, the laptop's modes and times.
        let shown = std::fs::metadata(m.dir().join("a")).unwrap();
        assert_eq!((shown.uid(), shown.gid()), OWNER);
        assert_eq!(shown.mode() & 0o7777, 0o600);
        assert_eq!(shown.mtime(), meta.mtime());
        assert_eq!(shown.len(), 2);
        assert_eq!(std::fs::read_to_string(m.dir().join("link")).unwrap(), "ne");
        let mut names = m
            .sh("ls -a dd/e; ls")
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        names.sort();
        assert_eq!(names, [".", "..", "a", "dd", "g", "hard", "link"]);
        // Inode numbers are the table's, stable while the kernel knows them.
        let ino = std::fs::metadata(m.dir().join("dd/e/g")).unwrap().ino();
        assert_eq!(
            std::fs::metadata(m.dir().join("dd/e/g")).unwrap().ino(),
            ino
        );
        let found = m.shared.inodes().path(ino).unwrap();
        assert_eq!(found.0, b"dd/e/g");
        // Extended attributes: not supported.
        let mut buf = [0u8; 64];
        assert_eq!(
            rustix::fs::getxattr(m.dir().join("a"), "user.x", &mut buf),
            Err(rustix::io::Errno::NOTSUP)
        );
        assert_eq!(
            rustix::fs::setxattr(
                m.dir().join("a"),
                "user.x",
                b"1",
                rustix::fs::XattrFlags::empty()
            ),
            Err(rustix::io::Errno::NOTSUP)
        );
        // statfs goes to the laptop.
        m.sh("df . >/dev/null");
        // Only regular files are made by mknod.
        let fifo = Command::new("mkfifo")
            .arg("fifo")
            .current_dir(m.dir())
            .output()
            .unwrap();
        assert!(!fifo.status.success());
        assert!(!l.join("fifo").exists());
    }

    /// The seconds `touch -d` in local time is behind UTC (0 in the test environment).
    fn local_offset() -> i64 {
        let out = Command::new("date").arg("+%z").output().unwrap();
        let z = String::from_utf8(out.stdout).unwrap();
        let z = z.trim();
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let h: i64 = z[1..3].parse().unwrap();
        let mi: i64 = z[3..5].parse().unwrap();
        sign * (h * 3600 + mi * 60)
    }

    #[test]
    fn tar_extracts_into_the_mount() {
        let Some(m) = mount() else { return };
        let src = tempfile::tempdir().unwrap();
        let tar = src.path().join("t.tar");
        let tree = src.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b/c")).unwrap();
        for i in 0..200 {
            std::fs::write(tree.join(format!("a/b/f{i}")), format!("{i}\n").repeat(i)).unwrap();
        }
        std::fs::write(tree.join("a/b/c/exe"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(tree.join("a/b/c/exe"), PermissionsExt::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("../f3", tree.join("a/b/c/l")).unwrap();
        let ok = Command::new("tar")
            .args([
                "cf",
                tar.to_str().unwrap(),
                "-C",
                tree.to_str().unwrap(),
                ".",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        // As root: tar restores owners (accepted, changed nothing) and modes.
        m.sh(&format!(
            "tar xf {} && ls -l a/b/c >/dev/null",
            tar.display()
        ));
        let diff = Command::new("diff")
            .args(["-r", tree.to_str().unwrap(), m.laptop().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            diff.status.success(),
            "{}{}",
            String::from_utf8_lossy(&diff.stdout),
            String::from_utf8_lossy(&diff.stderr)
        );
        let exe = std::fs::metadata(m.laptop().join("a/b/c/exe")).unwrap();
        assert_eq!(exe.permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn large_offsets_and_big_io() {
        let Some(m) = mount() else { return };
        // A 5 GiB sparse file: its tail read through the mount, then written.
        let f = std::fs::File::create(m.laptop().join("sparse")).unwrap();
        let five = 5u64 << 30;
        std::os::unix::fs::FileExt::write_all_at(&f, b"tail", five - 4).unwrap();
        drop(f);
        let out = m.sh("tail -c 4 sparse; stat -c %s sparse");
        assert_eq!(out, format!("tail{five}\n"));
        m.sh("printf more | dd of=sparse bs=1 seek=5368709120 conv=notrunc status=none");
        let f = std::fs::File::open(m.laptop().join("sparse")).unwrap();
        let mut buf = [0; 8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, five - 4).unwrap();
        assert_eq!(&buf, b"tailmore");

        // Several MiB in and out in big requests, byte for byte.
        let data: Vec<u8> = (0..(3 << 20) + 12345)
            .map(|i: u32| (i % 251) as u8)
            .collect();
        std::fs::write(m.dir().join("big"), &data).unwrap();
        assert_eq!(std::fs::read(m.laptop().join("big")).unwrap(), data);
        assert_eq!(std::fs::read(m.dir().join("big")).unwrap(), data);
    }

    #[test]
    fn git_commits_in_the_mount() {
        if Command::new("git").arg("--version").output().is_err() {
            println!("skipped: git is not installed");
            return;
        }
        // As in a container: its root sees its own files (git refuses a repository of
        // another owner).
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let Some(m) = mount_with(me, Duration::from_secs(30), MAX_NODES, None) else {
            return;
        };
        m.sh("set -e
             export HOME=$PWD GIT_CONFIG_NOSYSTEM=1
             git init -q .
             git config user.email t@example.org; git config user.name t
             echo 'int main(void) { return 0; }' > main.c
             mkdir src; echo one > src/one
             git add -A; git commit -q -m first
             echo two > src/one; git commit -q -am second
             git status --porcelain > status
             git log --oneline | wc -l > count
             git fsck --no-progress 2>&1 >/dev/null");
        assert_eq!(
            std::fs::read_to_string(m.laptop().join("count")).unwrap(),
            "2\n"
        );
        assert_eq!(
            std::fs::read_to_string(m.laptop().join("status")).unwrap(),
            "?? status\n"
        );
    }

    fn errno_of(r: io::Result<impl Sized>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn a_silent_laptop_gives_an_error_after_the_deadline() {
        let Some(m) = mount_with(OWNER, Duration::from_secs(2), MAX_NODES, None) else {
            return;
        };
        std::fs::write(m.laptop().join("file"), "x").unwrap();
        m.silent.store(true, Ordering::SeqCst);
        let path = m.dir().join("file");
        let r = within_a_minute(move || std::fs::read(path));
        assert_eq!(errno_of(r), Some(libc::EIO));
    }

    /// A request waits for the writes in flight (so that it sees them on the laptop), but
    /// not past its own deadline: behind a silent laptop's writes, queued requests each
    /// waited for the one before (the lock is fair), up to minutes for a `stat`.
    #[test]
    fn a_request_behind_writes_that_never_end_fails_at_its_deadline() {
        let Some(m) = mount_with(OWNER, Duration::from_secs(1), MAX_NODES, None) else {
            return;
        };
        m.silent.store(true, Ordering::SeqCst);
        let s = m.shared.clone();
        // A write behind whose answer never comes, held for longer than any deadline.
        let held = m._rt.block_on(s.behind(7, 0..10)).unwrap();
        let stat = Op::Getattr {
            path: berth_connect::proto::RelPath::root(),
            fh: None,
        };
        let answered = m
            ._rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), s.call(stat)).await });
        assert!(
            matches!(answered, Ok(Err(Errno::EIO))),
            "{:?}",
            answered.map(|r| r.map(|_| ()))
        );
        // And a write behind over the same range, which waits for the first: EIO as well,
        // and no place left taken.
        let again = m._rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), s.behind(7, 5..15)).await
        });
        assert!(matches!(again, Ok(Err(Errno::EIO))));
        drop(held);
        assert!(lock(&s.flying).is_empty());
    }

    #[test]
    fn a_closed_wire_gives_enotconn_and_abort_ends_the_session() {
        let Some(mut m) = mount() else { return };
        std::fs::write(m.dir().join("file"), "x").unwrap();
        m.serving.abort();
        let path = m.dir().join("other");
        let r = within_a_minute(move || std::fs::read(path));
        assert_eq!(errno_of(r), Some(libc::ENOTCONN));

        let session = m.session.take().unwrap();
        session.abort().unwrap();
        within_a_minute(move || session.join()).unwrap();
        let path = m.dir().join("file");
        let r = within_a_minute(move || std::fs::metadata(path));
        assert_eq!(errno_of(r), Some(libc::ENOTCONN));
    }

    #[test]
    fn the_inode_table_is_bounded() {
        let Some(m) = mount_with(OWNER, Duration::from_secs(30), 20, None) else {
            return;
        };
        for i in 0..40 {
            std::fs::write(m.laptop().join(format!("f{i}")), "x").unwrap();
        }
        let results: Vec<_> = (0..40)
            .map(|i| errno_of(std::fs::metadata(m.dir().join(format!("f{i}")))))
            .collect();
        assert!(results.contains(&Some(libc::ENOMEM)), "{results:?}");
        assert!(m.shared.inodes().len() <= 20);
        // A listing past the bound is whole, or fails: it never ends early as if the
        // directory had no more.
        let listed: Vec<_> = std::fs::read_dir(m.dir()).unwrap().collect();
        let failed = listed.iter().any(|e| e.is_err());
        assert!(failed || listed.len() == 40, "{} listed", listed.len());
        if failed {
            let e = listed.into_iter().find_map(Result::err).unwrap();
            assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
        }
        assert!(m.shared.inodes().len() <= 20);
        assert!(std::fs::metadata(m.dir()).is_ok());
    }

    #[test]
    fn a_big_listing_is_whole_with_its_dots_and_asked_once() {
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        let tamper: Tamper = Box::new(move |op, result| {
            if matches!(op, Op::Readdir { .. }) {
                count.fetch_add(1, Ordering::SeqCst);
            }
            result
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        let names: std::collections::BTreeSet<String> = (0..3000)
            .map(|i| format!("a-file-with-a-name-of-some-length-{i:05}"))
            .collect();
        std::fs::create_dir(m.laptop().join("many")).unwrap();
        for n in &names {
            std::fs::write(m.laptop().join("many").join(n), "").unwrap();
        }
        // With attributes (the first listing), then names only (nothing looked up since),
        // each through getdents with one page of room, as some programs ask.
        for _ in 0..2 {
            let before = asked.load(Ordering::SeqCst);
            let mut listed = getdents_by_page(&m.dir().join("many"));
            assert_eq!(listed.len(), 3002, "each entry once");
            let mut want: Vec<String> = names.iter().cloned().collect();
            want.extend([".".into(), "..".into()]);
            want.sort_unstable();
            listed.sort_unstable();
            assert_eq!(listed, want);
            // The laptop answers ~64 KiB a call (11 calls for these names); asked again
            // for each page the kernel takes, it would be ~60 to ~140 calls.
            let calls = asked.load(Ordering::SeqCst) - before;
            assert!(calls <= 16, "{calls} listing calls");
        }
        assert_eq!(m.sh("ls -ia many | head -2 | wc -l").trim(), "2");
    }

    /// The names in `dir`, read with getdents64 into a buffer of 4 KiB.
    fn getdents_by_page(dir: &Path) -> Vec<String> {
        let d = std::fs::File::open(dir).unwrap();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut raw = rustix::fs::RawDir::new(&d, &mut buf);
        let mut names = Vec::new();
        while let Some(e) = raw.next() {
            let e = e.unwrap();
            names.push(e.file_name().to_str().unwrap().to_owned());
        }
        names
    }

    #[test]
    fn absent_names_and_whole_listings_are_kept_until_changed_through_the_mount() {
        let asked: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let seen = asked.clone();
        let tamper: Tamper = Box::new(move |op, result| {
            let what = match op {
                Op::Lookup { .. } => "lookup",
                Op::Opendir { .. } | Op::Readdir { .. } => "listing",
                _ => "other",
            };
            seen.lock().unwrap().push(what);
            result
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        let count = |what| asked.lock().unwrap().iter().filter(|w| **w == what).count();
        std::fs::create_dir(m.laptop().join("d")).unwrap();
        std::fs::write(m.laptop().join("d/a"), "").unwrap();
        // An absent name is asked once.
        for _ in 0..3 {
            assert!(!m.dir().join("d/missing").exists());
        }
        let lookups = count("lookup");
        assert!(!m.dir().join("d/missing").exists());
        assert_eq!(count("lookup"), lookups, "asked again for an absent name");
        let list = || m.sh("ls d").lines().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(list(), ["a"]);
        // A whole listing is kept: listed again, nothing is asked.
        let listings = count("listing");
        assert_eq!(list(), ["a"]);
        assert_eq!(count("listing"), listings, "listed again");
        // A write to a file in it drops it (the listing carries the file's size).
        std::fs::write(m.dir().join("d/a"), "0123456789").unwrap();
        assert_eq!(m.sh("ls -l d | grep -c ' 10 '").trim(), "1");
        assert!(count("listing") > listings, "a listing kept over a write");
        // What is made through the mount shows at once, in lookups and listings.
        std::fs::write(m.dir().join("d/missing"), "here").unwrap();
        assert_eq!(std::fs::read(m.dir().join("d/missing")).unwrap(), b"here");
        assert_eq!(list(), ["a", "missing"]);
        std::fs::remove_file(m.dir().join("d/a")).unwrap();
        assert_eq!(list(), ["missing"]);
    }

    #[test]
    fn an_absent_name_is_made_exclusively_without_asking_again() {
        let lookups: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let seen = lookups.clone();
        let tamper: Tamper = Box::new(move |op, result| {
            if let Op::Lookup { path } = op {
                seen.lock().unwrap().push(path.0.clone());
            }
            result
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        let asked = |name: &str| {
            let lookups = lookups.lock().unwrap();
            lookups
                .iter()
                .filter(|p| p.as_slice() == name.as_bytes())
                .count()
        };
        let exclusive = |name: &str| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.dir().join(name))
                .map(drop)
        };
        // `make` stats the target, then `cp` creates it exclusively (the kernel asks again
        // for an absent name then): asked once.
        for name in ["a.o", "b.o"] {
            assert!(!m.dir().join(name).exists());
            assert_eq!(asked(name), 1);
            exclusive(name).unwrap();
            assert_eq!(asked(name), 1, "{name}: asked again");
            assert!(m.laptop().join(name).exists());
        }
        assert!(!m.dir().join("d").exists());
        std::fs::create_dir(m.dir().join("d")).unwrap();
        assert_eq!(asked("d"), 1, "mkdir asked again");
        // Made on the laptop beside the mount meanwhile: an exclusive create fails as it must.
        assert!(!m.dir().join("late").exists());
        std::fs::write(m.laptop().join("late"), b"laptop's").unwrap();
        let e = exclusive("late").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(m.laptop().join("late")).unwrap(), b"laptop's");
    }

    #[test]
    fn absent_names_are_kept_for_the_window_until_named_and_bounded() {
        let t0 = Instant::now();
        let mut a = Absent::default();
        a.keep(1, b"x", t0);
        assert_eq!(a.get(1, b"x", t0), Some(TTL));
        assert_eq!(a.get(1, b"y", t0), None);
        assert_eq!(a.get(2, b"x", t0), None, "another directory");
        assert_eq!(a.get(1, b"x", t0 + TTL), None, "past the window");
        a.forget(1, b"x");
        assert_eq!(a.get(1, b"x", t0), None);
        assert!(a.names.is_empty());
        // A lookup's answer is kept unless the name was made or moved while it was asked.
        let (x, y, z) = (a.ask(1, b"x"), a.ask(1, b"y"), a.ask(1, b"z"));
        a.forget(1, b"x");
        a.answered(x.unwrap(), true, t0);
        a.answered(y.unwrap(), true, t0);
        a.answered(z.unwrap(), false, t0);
        assert_eq!(a.get(1, b"x", t0), None, "made while asked");
        assert_eq!(a.get(1, b"y", t0), Some(TTL));
        assert_eq!(a.get(1, b"z", t0), None, "there");
        assert!(a.asking.is_empty());
        a.forget(1, b"y");
        for i in 0..MAX_ABSENT + 10 {
            a.keep(i as u64 % 7, format!("n{i}").as_bytes(), t0);
            assert!(a.count <= MAX_ABSENT);
        }
        assert_eq!(a.count, a.names.values().map(HashMap::len).sum::<usize>());
        // Past the bound, the expired go first.
        let mut a = Absent::default();
        for i in 0..MAX_ABSENT {
            a.keep(1, format!("old{i}").as_bytes(), t0);
        }
        a.keep(1, b"new", t0 + TTL);
        assert_eq!((a.count, a.get(1, b"new", t0 + TTL)), (1, Some(TTL)));
    }

    #[test]
    fn a_link_made_through_the_mount_shows_in_its_files_kept_listing() {
        let Some(m) = mount() else { return };
        std::fs::create_dir(m.laptop().join("a")).unwrap();
        std::fs::create_dir(m.laptop().join("b")).unwrap();
        std::fs::write(m.laptop().join("a/f"), b"f").unwrap();
        // The link count `ls -l` shows (from the listing), then `stat`'s.
        let links = || m.sh("ls -l a | awk 'NR > 1 { print $2 }'; stat -c %h a/f");
        // Listed once (kept), then linked from another directory.
        assert_eq!(links(), "1\n1\n");
        std::fs::hard_link(m.dir().join("a/f"), m.dir().join("b/g")).unwrap();
        assert_eq!(links(), "2\n2\n");
    }

    #[test]
    fn writes_behind_keep_their_order_and_what_follows_sees_them() {
        use std::os::unix::fs::FileExt;
        let Some(m) = mount_by(Laptop::Reordering) else {
            return;
        };
        // Eight 64 KiB blocks overwritten in turns from one descriptor, to a laptop that
        // does writes in any order: it would put an older block over a newer one if writes
        // in flight over the same range were not held back.
        let path = m.dir().join("f");
        let f = std::fs::File::create(&path).unwrap();
        let mut want = vec![0u8; 8 << 16];
        for i in 0..200u32 {
            let at = (i as usize % 8) << 16;
            let block = vec![(i % 251) as u8; 1 << 16];
            // Half a block on from time to time: ranges that overlap two blocks.
            let at = if i % 7 == 0 {
                at.saturating_sub(1 << 15)
            } else {
                at
            };
            f.write_at(&block, at as u64).unwrap();
            want[at..at + block.len()].copy_from_slice(&block);
        }
        // A read that asks the laptop (not the kernel's cache: another name is another
        // inode here), a stat and a read from another descriptor, before any close, see
        // all of it.
        std::fs::hard_link(&path, m.dir().join("g")).unwrap();
        let got = std::fs::read(m.dir().join("g")).unwrap();
        assert!(got == want, "read from the laptop");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), want.len() as u64);
        assert!(
            std::fs::read(&path).unwrap() == want,
            "read through the mount"
        );
        drop(f);
        assert!(
            std::fs::read(m.laptop().join("f")).unwrap() == want,
            "on the laptop"
        );
    }

    #[test]
    fn a_failed_write_behind_is_told_at_close_and_at_fsync() {
        use std::io::Write;
        let tamper: Tamper = Box::new(|op, result| match op {
            Op::Write { .. } => Err(libc::ENOSPC),
            _ => result,
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        let mut f = std::fs::File::create(m.dir().join("a")).unwrap();
        // The write itself is answered at once, its failure comes with fsync.
        f.write_all(b"data").unwrap();
        // A copy of the descriptor closed meanwhile (as a child forked by another thread
        // closes its copy at exec) is told, and leaves the failure for the fsync.
        let copy = std::os::fd::IntoRawFd::into_raw_fd(f.try_clone().unwrap());
        assert_eq!(nix::unistd::close(copy), Err(nix::errno::Errno::ENOSPC));
        assert_eq!(errno_of(f.sync_all()), Some(libc::ENOSPC));
        // ... or with close.
        let mut f = std::fs::File::create(m.dir().join("b")).unwrap();
        f.write_all(b"data").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        assert_eq!(nix::unistd::close(fd), Err(nix::errno::Errno::ENOSPC));
        // An append waits for the laptop: its failure is the write's own.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(m.dir().join("a"))
            .unwrap();
        assert_eq!(errno_of(f.write_all(b"more")), Some(libc::ENOSPC));
    }

    #[test]
    fn a_small_file_is_opened_and_read_in_one_round_trip() {
        let asked: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let seen = asked.clone();
        let tamper: Tamper = Box::new(move |op, result| {
            seen.lock().unwrap().push(match op {
                Op::Open { .. } => "open",
                Op::Read { .. } => "read",
                _ => "other",
            });
            result
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        let count = |what| asked.lock().unwrap().iter().filter(|w| **w == what).count();
        let small: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(m.laptop().join("small"), &small).unwrap();
        std::fs::write(m.laptop().join("big"), &big).unwrap();
        assert_eq!(std::fs::read(m.dir().join("small")).unwrap(), small);
        assert_eq!((count("open"), count("read")), (1, 0), "{:?}", asked.lock());
        // A longer file: read from the laptop.
        assert!(std::fs::read(m.dir().join("big")).unwrap() == big);
        assert_eq!(count("open"), 2);
        assert!(count("read") > 0);

        // Writes to another file in flight meanwhile (`cat *.o > prog`) change nothing of it.
        for i in 0..20 {
            std::fs::write(m.laptop().join(format!("part{i}")), &small).unwrap();
        }
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer = std::thread::spawn({
            let (out, writing) = (m.dir().join("out"), writing.clone());
            move || {
                use std::io::Write as _;
                let mut f = std::fs::File::create(out).unwrap();
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    f.write_all(&[7; 1 << 20]).unwrap();
                    f.set_len(0).unwrap();
                }
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let reads = count("read");
        for i in 0..20 {
            assert_eq!(
                std::fs::read(m.dir().join(format!("part{i}"))).unwrap(),
                small
            );
        }
        assert_eq!(
            count("read"),
            reads,
            "reads asked while another file was written"
        );
        writing.store(false, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();

        // A head is not the file once the file is changed through the mount: a reader
        // that opened it before the change reads the change.
        use std::os::unix::fs::FileExt;
        std::fs::write(m.laptop().join("edited"), &small).unwrap();
        let reader = std::fs::File::open(m.dir().join("edited")).unwrap();
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(m.dir().join("edited"))
            .unwrap();
        // Part of a page: the kernel's cache does not hold the page whole, so the read asks.
        writer.write_all_at(b"CHANGED", 10).unwrap();
        let mut got = vec![0u8; small.len()];
        reader.read_exact_at(&mut got, 0).unwrap();
        let mut want = small.clone();
        want[10..17].copy_from_slice(b"CHANGED");
        assert!(got == want, "a head read after a change through the mount");
        // ... through another name of the same file, too (another inode here).
        std::fs::write(m.laptop().join("one"), &small).unwrap();
        std::fs::hard_link(m.laptop().join("one"), m.laptop().join("two")).unwrap();
        let reader = std::fs::File::open(m.dir().join("one")).unwrap();
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(m.dir().join("two"))
            .unwrap();
        let reads = count("read");
        writer.write_all_at(b"CHANGED", 10).unwrap();
        reader.read_exact_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "a head read after a change through another name"
        );
        assert!(count("read") > reads, "not asked again");
        // ... and through a name unlinked since the second was made: the file has one name
        // when the second is opened, and the first's handle is still open.
        std::fs::write(m.laptop().join("first"), &small).unwrap();
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(m.dir().join("first"))
            .unwrap();
        std::fs::hard_link(m.dir().join("first"), m.dir().join("second")).unwrap();
        std::fs::remove_file(m.dir().join("first")).unwrap();
        let opens = count("open");
        let reader = std::fs::File::open(m.dir().join("second")).unwrap();
        assert_eq!(count("open"), opens + 1);
        writer.write_all_at(b"CHANGED", 10).unwrap();
        reader.read_exact_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "a head read after a change through a name since unlinked"
        );
        // ... and by a truncation (setattr) or an opening with O_TRUNC.
        for how in ["ftruncate", "O_TRUNC"] {
            std::fs::write(m.laptop().join(how), &small).unwrap();
            let other = m.laptop().join(format!("{how}-other"));
            std::fs::hard_link(m.laptop().join(how), &other).unwrap();
            let reader = std::fs::File::open(m.dir().join(how)).unwrap();
            let other = m.dir().join(format!("{how}-other"));
            let mut open = std::fs::OpenOptions::new();
            open.write(true);
            if how == "O_TRUNC" {
                drop(open.truncate(true).open(&other).unwrap());
            } else {
                open.open(&other).unwrap().set_len(0).unwrap();
            }
            let n = reader.read_at(&mut got, 0).unwrap();
            assert!(
                got[..n].iter().all(|b| *b == 0),
                "{how}: a head read after the file was emptied"
            );
        }
    }

    #[test]
    fn heads_answer_only_fresh_and_never_across_a_change_of_their_file() {
        let t0 = Instant::now();
        let mut h = Heads::default();
        let keep = |h: &mut Heads, ino, fh, data: &[u8]| {
            let k = h.ask(ino, t0).unwrap();
            h.answered(k, Some((fh, data.to_vec())), t0, 64);
        };
        keep(&mut h, 7, 1, b"0123456789");
        // The file: reads past its end are short.
        assert_eq!(h.read(1, 2, 3, t0).as_deref(), Some(&b"234"[..]));
        assert_eq!(h.read(1, 8, 100, t0).as_deref(), Some(&b"89"[..]));
        assert_eq!(h.read(1, 50, 10, t0).as_deref(), Some(&b""[..]));
        assert_eq!(h.read(1, u64::MAX, u32::MAX, t0).as_deref(), Some(&b""[..]));
        assert_eq!(h.read(3, 0, 1, t0), None);
        // Stale after the window.
        assert_eq!(h.read(1, 0, 1, t0 + HEAD_FRESH), None);

        // A change of the file drops its heads and no other; while it is in flight none is
        // asked for the file or kept, nor one asked for before it began or ended.
        keep(&mut h, 7, 2, b"x");
        keep(&mut h, 8, 8, b"other");
        let (before, also_before) = (h.ask(7, t0).unwrap(), h.ask(7, t0).unwrap());
        h.begin(Scope::file(7));
        assert_eq!(h.read(2, 0, 1, t0), None);
        assert_eq!(h.read(8, 0, 5, t0).as_deref(), Some(&b"other"[..]));
        assert_eq!(h.ask(7, t0), None);
        let other = h.ask(9, t0).expect("another file is asked for");
        h.answered(other, None, t0, 64);
        h.answered(before, Some((3, b"old".to_vec())), t0, 64);
        h.end(Scope::file(7));
        h.answered(also_before, Some((4, b"old".to_vec())), t0, 64);
        assert_eq!((h.read(3, 0, 3, t0), h.read(4, 0, 3, t0)), (None, None));
        keep(&mut h, 7, 5, b"new");
        assert_eq!(h.read(5, 0, 3, t0).as_deref(), Some(&b"new"[..]));
        // A rename drops both files' (what is renamed, and what it replaces).
        h.begin(Scope::of(Some(7), Some(8)));
        h.end(Scope::of(Some(7), Some(8)));
        assert_eq!((h.read(5, 0, 3, t0), h.read(8, 0, 3, t0)), (None, None));
        // A name without an inode here touches nothing.
        keep(&mut h, 7, 6, b"kept");
        h.begin(Scope::of(None, None));
        h.end(Scope::of(None, None));
        assert!(h.read(6, 0, 1, t0).is_some());
        // A change through an inode without a name (it may be the same file as another
        // inode): every head goes, none is asked for while it is in flight, and none asked
        // before is kept.
        let nameless = Scope {
            nameless: true,
            ..Scope::file(20)
        };
        let asked = h.ask(21, t0).unwrap();
        h.begin(nameless);
        assert_eq!(h.read(6, 0, 1, t0), None);
        assert_eq!(h.ask(22, t0), None);
        h.end(nameless);
        h.answered(asked, Some((21, b"old".to_vec())), t0, 64);
        assert_eq!(h.read(21, 0, 1, t0), None);
        keep(&mut h, 22, 22, b"after");
        assert!(h.read(22, 0, 1, t0).is_some());

        // More than asked for is refused; a release drops it; heads kept and asked for are
        // bounded together, and an opening that failed gives its place back.
        let k = h.ask(10, t0).unwrap();
        h.answered(k, Some((16, vec![0; 65])), t0, 64);
        assert_eq!(h.read(16, 0, 1, t0), None);
        let pending = h.ask(11, t0).unwrap();
        for fh in 0..2 * MAX_HEADS as u64 {
            if let Some(k) = h.ask(100 + fh, t0) {
                h.answered(k, Some((100 + fh, vec![1])), t0, 64);
            }
        }
        assert_eq!(h.by_handle.len(), MAX_HEADS - 1);
        assert_eq!(h.ask(12, t0), None);
        h.answered(pending, None, t0, 64);
        let k = h.ask(12, t0).unwrap();
        h.answered(k, None, t0, 64);
        h.release(100);
        assert!(h.ask(13, t0).is_some());
        assert!(h.ask(14, t0 + HEAD_FRESH).is_some());
        assert!(h.by_handle.is_empty(), "stale heads dropped");
    }

    fn file(ino: u64, size: u64, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o644,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    #[test]
    fn settled_attributes_answer_only_while_nothing_changed_the_file() {
        let t0 = Instant::now();
        let size = |s: &mut Settled, ino| s.get(ino, t0).map(|(a, _)| a.size);
        let mut s = Settled::default();
        // The kernel was given laptop file N for inode N.
        for ino in 0..20 {
            s.superseded(ino, ino);
        }
        let k = s.ask(1, t0).unwrap();
        s.answered(1, k, Some(file(1, 10, 1)), 1, t0);
        assert_eq!(size(&mut s, 1), Some(10));
        assert_eq!(s.get(1, t0 + TTL), None, "past the window");

        // A change of the file between the asking and the answer: not kept.
        let k = s.ask(2, t0).unwrap();
        s.begin(Scope::file(2));
        s.end(Scope::file(2));
        s.answered(2, k, Some(file(2, 1, 1)), 2, t0);
        assert_eq!(size(&mut s, 2), None);
        // Nor asked while one is in flight.
        s.begin(Scope::file(2));
        assert_eq!(s.ask(2, t0), None);
        assert!(s.ask(3, t0).is_some(), "another file is asked");
        s.end(Scope::file(2));

        // A rename drops both files it touches (kept, and being asked), and no other.
        let (k4, k5, k10) = (
            s.ask(4, t0).unwrap(),
            s.ask(5, t0).unwrap(),
            s.ask(10, t0).unwrap(),
        );
        s.answered(4, k4, Some(file(4, 4, 1)), 4, t0);
        s.answered(10, k10, Some(file(10, 10, 1)), 10, t0);
        s.begin(Scope::of(Some(4), Some(5)));
        assert_eq!(s.ask(5, t0), None, "while the rename is in flight");
        s.end(Scope::of(Some(4), Some(5)));
        s.answered(5, k5, Some(file(5, 5, 1)), 5, t0);
        assert_eq!((size(&mut s, 4), size(&mut s, 5)), (None, None));
        assert_eq!(size(&mut s, 10), Some(10));
        // A name without an inode here touches nothing.
        s.begin(Scope::of(None, None));
        s.end(Scope::of(None, None));
        assert_eq!(size(&mut s, 10), Some(10));

        // A change of the file drops its own only.
        for ino in [6, 7] {
            let k = s.ask(ino, t0).unwrap();
            s.answered(ino, k, Some(file(ino, ino, 1)), ino, t0);
        }
        s.begin(Scope::file(6));
        assert_eq!((size(&mut s, 6), size(&mut s, 7)), (None, Some(7)));
        s.end(Scope::file(6));

        // A file with two names is never kept; nor is a forgotten inode.
        let k = s.ask(8, t0).unwrap();
        s.answered(8, k, Some(file(8, 8, 2)), 8, t0);
        assert_eq!(size(&mut s, 8), None);
        s.forget(7);
        assert_eq!(size(&mut s, 7), None);
        // A release of a handle on another laptop file than the one the kernel knows there (the
        // name now stands for another file): not kept.
        let k = s.ask(11, t0).unwrap();
        s.answered(11, k, Some(file(11, 11, 1)), 99, t0);
        assert_eq!(size(&mut s, 11), None);
        // Attributes the kernel was given another way since (a lookup, a listing) win.
        let k = s.ask(9, t0).unwrap();
        s.answered(9, k, Some(file(9, 9, 1)), 9, t0);
        s.superseded(9, 9);
        assert_eq!(size(&mut s, 9), None);

        // Bounded.
        let mut s = Settled::default();
        for ino in 0..MAX_SETTLED as u64 {
            assert!(s.ask(ino, t0).is_some());
        }
        assert_eq!(s.ask(u64::MAX, t0), None);
    }

    #[test]
    fn a_directory_keeps_the_latest_attributes_its_changes_brought() {
        let t0 = Instant::now();
        let dir = |size| FileAttr {
            kind: FileType::Directory,
            ..file(1, size, 2)
        };
        let after = |seq, laptop| proto::DirAfter {
            seq,
            attr: Attr {
                ino: laptop,
                ..Attr::default()
            },
        };
        let size = |s: &mut Settled| s.get(1, t0).map(|(a, _)| a.size);
        let mut s = Settled::default();
        // Nothing is kept of a directory the laptop told nothing of.
        let m = s.mark(1);
        s.dir_after(1, m, &after(1, 1), dir(10), t0);
        assert_eq!(size(&mut s), None);
        s.superseded(1, 1);

        // Two changes in flight, answered in the other order: the later read stays.
        let (m1, m2) = (s.mark(1), s.mark(1));
        s.dir_after(1, m2, &after(3, 1), dir(30), t0);
        s.dir_after(1, m1, &after(2, 1), dir(20), t0);
        assert_eq!(size(&mut s), Some(30));
        assert_eq!(s.get(1, t0 + TTL), None, "past the window");

        // A lookup answered between a change's sending and its answer cannot be ordered
        // against it: what was kept goes, and the change's answer is not kept.
        let m = s.mark(1);
        s.dir_after(1, s.mark(1), &after(4, 1), dir(40), t0);
        assert_eq!(size(&mut s), Some(40));
        s.superseded(1, 1);
        assert_eq!(size(&mut s), None);
        s.dir_after(1, m, &after(5, 1), dir(50), t0);
        assert_eq!(size(&mut s), None);
        // A change sent after it is kept; a later read that cannot be kept drops it (it is
        // older than what that change's process was told), and an earlier one stays out.
        let m_new = s.mark(1);
        s.dir_after(1, m_new, &after(7, 1), dir(70), t0);
        assert_eq!(size(&mut s), Some(70));
        s.dir_after(1, m, &after(8, 1), dir(80), t0);
        assert_eq!(size(&mut s), None);
        s.dir_after(1, m_new, &after(6, 1), dir(60), t0);
        assert_eq!(size(&mut s), None);

        // A change of the directory itself (a rename of it, a chmod) drops what is kept, and
        // nothing is kept while it is in flight, nor from a change sent before it began.
        s.dir_after(1, s.mark(1), &after(9, 1), dir(90), t0);
        assert_eq!(size(&mut s), Some(90));
        let m = s.mark(1);
        s.begin(Scope::file(1));
        assert_eq!(size(&mut s), None);
        s.dir_after(1, s.mark(1), &after(10, 1), dir(100), t0);
        assert_eq!(size(&mut s), None);
        s.end(Scope::file(1));
        s.dir_after(1, m, &after(11, 1), dir(110), t0);
        assert_eq!(size(&mut s), None);
        s.dir_after(1, s.mark(1), &after(12, 1), dir(120), t0);
        assert_eq!(size(&mut s), Some(120));

        // Another laptop file by that name now, or not a directory: not kept.
        s.dir_after(1, s.mark(1), &after(13, 99), dir(130), t0);
        assert_eq!(size(&mut s), None);
        s.dir_after(1, s.mark(1), &after(14, 1), file(1, 140, 1), t0);
        assert_eq!(size(&mut s), None);
        // Forgotten by the kernel: nothing more.
        s.dir_after(1, s.mark(1), &after(15, 1), dir(150), t0);
        s.forget(1);
        assert_eq!(size(&mut s), None);
        s.dir_after(1, s.mark(1), &after(16, 1), dir(160), t0);
        assert_eq!(size(&mut s), None);

        // A directory forgotten and seen again: a change sent before does not count.
        s.superseded(1, 1);
        let m = s.mark(1);
        s.forget(1);
        s.superseded(1, 1);
        s.dir_after(1, m, &after(20, 1), dir(200), t0);
        assert_eq!(size(&mut s), None);
        // A change that brought no attributes after it (failed, given up, or the laptop
        // could not read them): what is kept goes, and a change in flight keeps nothing.
        s.dir_after(1, s.mark(1), &after(21, 1), dir(210), t0);
        assert_eq!(size(&mut s), Some(210));
        let m = s.mark(1);
        s.unknown(1);
        assert_eq!(size(&mut s), None);
        s.dir_after(1, m, &after(22, 1), dir(220), t0);
        assert_eq!(size(&mut s), None);
        // A change through an inode without a name drops every file's kept attributes (it
        // may be any file), not a directory's.
        s.dir_after(1, s.mark(1), &after(23, 1), dir(230), t0);
        s.superseded(42, 42);
        let k = s.ask(42, t0).unwrap();
        s.answered(42, k, Some(file(42, 42, 1)), 42, t0);
        assert!(s.get(42, t0).is_some());
        let nameless = Scope {
            nameless: true,
            ..Scope::file(40)
        };
        s.begin(nameless);
        assert_eq!(s.get(42, t0), None);
        assert_eq!(size(&mut s), Some(230));
        assert_eq!(s.ask(41, t0), None, "asked while it is in flight");
        s.end(nameless);
        assert!(s.ask(41, t0).is_some());

        // Bounded with the files' attributes.
        let mut s = Settled::default();
        for ino in 0..=MAX_SETTLED as u64 {
            s.superseded(ino, ino);
            let a = FileAttr {
                kind: FileType::Directory,
                ..file(ino, 1, 2)
            };
            s.dir_after(ino, s.mark(ino), &after(ino + 1, ino), a, t0);
        }
        assert_eq!(s.attrs.len(), MAX_SETTLED);
    }

    #[test]
    fn a_directory_changed_through_the_mount_is_stated_without_asking_the_laptop() {
        // The laptop's answers to getattrs and lookups, by path.
        let asked: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let seen = asked.clone();
        let tamper: Tamper = Box::new(move |op, result| {
            if let Op::Getattr { path, .. } | Op::Lookup { path } = op {
                seen.lock().unwrap().push(path.0.clone());
            }
            result
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        let asked_for = |what: &str| {
            let asked = asked.lock().unwrap();
            asked
                .iter()
                .filter(|w| w.as_slice() == what.as_bytes())
                .count()
        };
        use std::os::unix::fs::MetadataExt;
        let same = |md: &std::fs::Metadata, what: &str| {
            let on_laptop = std::fs::symlink_metadata(m.laptop().join(what)).unwrap();
            assert_eq!(
                (md.nlink(), md.size(), md.mtime(), md.mtime_nsec()),
                (
                    on_laptop.nlink(),
                    on_laptop.size(),
                    on_laptop.mtime(),
                    on_laptop.mtime_nsec()
                ),
                "{what}"
            );
            assert_eq!(
                (md.ctime(), md.ctime_nsec()),
                (on_laptop.ctime(), on_laptop.ctime_nsec()),
                "{what}"
            );
        };
        let obj = m.dir().join("obj");
        std::fs::create_dir(&obj).unwrap();
        std::fs::create_dir(m.dir().join("other")).unwrap();
        // Every kind of change of its names, each followed by a stat of the directory and a
        // path walked through it (the kernel checks the directory's permissions).
        type Change<'a> = (&'a str, Box<dyn Fn() + 'a>);
        let changes: Vec<Change> = vec![
            (
                "create",
                Box::new(|| std::fs::write(obj.join("a"), b"a").unwrap()),
            ),
            (
                "mkdir",
                Box::new(|| std::fs::create_dir(obj.join("sub")).unwrap()),
            ),
            (
                "symlink",
                Box::new(|| std::os::unix::fs::symlink("a", obj.join("s")).unwrap()),
            ),
            (
                "link",
                Box::new(|| std::fs::hard_link(obj.join("a"), obj.join("h")).unwrap()),
            ),
            (
                "rename",
                Box::new(|| std::fs::rename(obj.join("h"), obj.join("h2")).unwrap()),
            ),
            (
                "rename out",
                Box::new(|| std::fs::rename(obj.join("h2"), m.dir().join("other/h")).unwrap()),
            ),
            (
                "unlink",
                Box::new(|| std::fs::remove_file(obj.join("s")).unwrap()),
            ),
            (
                "rmdir",
                Box::new(|| std::fs::remove_dir(obj.join("sub")).unwrap()),
            ),
            (
                "mknod",
                Box::new(|| {
                    nix::sys::stat::mknod(
                        &obj.join("n"),
                        nix::sys::stat::SFlag::S_IFREG,
                        nix::sys::stat::Mode::from_bits_truncate(0o644),
                        0,
                    )
                    .unwrap()
                }),
            ),
        ];
        for (what, change) in &changes {
            let before = asked_for("obj");
            change();
            let md = std::fs::metadata(&obj).unwrap();
            let _ = std::fs::metadata(obj.join("a")).unwrap();
            assert_eq!(asked_for("obj"), before, "{what}: the laptop was asked");
            same(&md, "obj");
        }
        // The other directory of the rename out too.
        let before = asked_for("other");
        let md = std::fs::metadata(m.dir().join("other")).unwrap();
        assert_eq!(asked_for("other"), before, "the rename's other directory");
        same(&md, "other");
        // And the served directory's own.
        std::fs::write(m.dir().join("top"), b"").unwrap();
        let before = asked_for("");
        let md = std::fs::metadata(m.dir()).unwrap();
        assert_eq!(asked_for(""), before, "the served directory");
        same(&md, "");

        // A chmod of the directory is its own answer; what the laptop changes itself shows
        // once the kernel asks again.
        std::fs::set_permissions(&obj, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(std::fs::metadata(&obj).unwrap().mode() & 0o777, 0o700);
        same(&std::fs::metadata(&obj).unwrap(), "obj");
    }

    #[test]
    fn a_file_written_and_closed_is_stated_without_asking_the_laptop() {
        // The getattrs of files by name (the directory's own are asked: a new entry changed
        // it), and the releases that bring attributes.
        let asked: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let seen = asked.clone();
        let tamper: Tamper = Box::new(move |op, result| {
            match op {
                Op::Getattr { path, .. } => seen.lock().unwrap().push(path.0.clone()),
                Op::Release { attr: true, .. } => seen.lock().unwrap().push(b"/release".to_vec()),
                _ => {}
            }
            result
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        let count = |what: &str| {
            let asked = asked.lock().unwrap();
            asked
                .iter()
                .filter(|w| w.as_slice() == what.as_bytes())
                .count()
        };
        // Writes `name` through the mount, waits `settle` past the release that brings its
        // attributes (answered after close(2) returns), and stats it: its metadata, and
        // whether the laptop was asked.
        let write_and_stat = |name: &str, data: &[u8], settle: Duration| {
            let releases = count("/release");
            std::fs::write(m.dir().join(name), data).unwrap();
            let end = Instant::now() + Duration::from_secs(10);
            while count("/release") == releases && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(settle);
            // A rename of another file meanwhile touches nothing kept for this one.
            let other = m.dir().join(format!("{name}.other"));
            std::fs::write(&other, b"").unwrap();
            std::fs::rename(&other, m.dir().join(format!("{name}.moved"))).unwrap();
            let before = count(name);
            let md = std::fs::metadata(m.dir().join(name)).unwrap();
            (md, count(name) > before)
        };
        use std::os::unix::fs::MetadataExt;
        // The release's answer is taken a moment after the laptop gave it: a stat in that
        // moment asks; tries with a longer wait each time.
        let mut hit = None;
        for i in 0..20u64 {
            let name = format!("built{i}");
            let data = vec![b'x'; 1000 + i as usize];
            let (md, asked) = write_and_stat(&name, &data, Duration::from_millis(10 * i));
            if !asked {
                hit = Some((name, md, data.len()));
                break;
            }
        }
        let (name, md, len) = hit.expect("every stat after a write asked the laptop");
        let on_laptop = std::fs::metadata(m.laptop().join(&name)).unwrap();
        assert_eq!(md.len(), len as u64);
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (on_laptop.mtime(), on_laptop.mtime_nsec())
        );

        // A write drops them: a stat that follows asks, and sees the new size.
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(m.dir().join(&name))
            .unwrap();
        f.write_all(b"more").unwrap();
        assert_eq!(
            std::fs::metadata(m.dir().join(&name)).unwrap().len(),
            len as u64 + 4
        );
        drop(f);

        // A file with a second name (made on the laptop) is asked each time.
        std::fs::write(m.laptop().join("twice"), b"").unwrap();
        std::fs::hard_link(m.laptop().join("twice"), m.laptop().join("again")).unwrap();
        let (md, asked) = write_and_stat("twice", b"data", Duration::from_millis(300));
        assert!(
            asked,
            "a file with two names answered from what its release gave"
        );
        assert_eq!(md.len(), 4);
    }

    #[test]
    fn a_name_removed_on_the_laptop_is_not_held_against_the_container() {
        let Some(m) = mount() else {
            return;
        };
        // Names the kernel holds (for 20 s) of what the laptop then removes.
        for name in ["written.bin", "opened.bin"] {
            std::fs::write(m.laptop().join(name), b"x").unwrap();
            assert!(std::fs::metadata(m.dir().join(name)).is_ok());
            std::fs::remove_file(m.laptop().join(name)).unwrap();
        }
        // Written again from the container at once: created, not refused.
        std::fs::write(m.dir().join("written.bin"), b"second").unwrap();
        assert_eq!(
            std::fs::read(m.laptop().join("written.bin")).unwrap(),
            b"second"
        );
        // Opened without O_CREAT: gone, said as such.
        assert_eq!(
            errno_of(std::fs::File::open(m.dir().join("opened.bin"))),
            Some(libc::ENOENT)
        );
        // A directory: ENOENT as it was (no ESTALE reaches the program).
        std::fs::create_dir(m.laptop().join("d")).unwrap();
        assert!(std::fs::read_dir(m.dir().join("d")).is_ok());
        std::fs::remove_dir(m.laptop().join("d")).unwrap();
        assert_eq!(
            errno_of(std::fs::read_dir(m.dir().join("d"))),
            Some(libc::ENOENT)
        );
    }

    #[test]
    fn nonsense_answers_are_errors_not_hangs() {
        let tamper: Tamper = Box::new(|op, result| match op {
            Op::Lookup { path } if path.0 == b"weird" => Err(100_000),
            Op::Lookup { path } if path.0 == b"nosys" => Err(libc::ENOSYS),
            Op::Lookup { path } if path.0 == b"kind" => Ok(Answer::Done),
            Op::Read { size, .. } => Ok(Answer::Data(vec![0; *size as usize + 1])),
            // A head longer than asked for is not kept: the read goes to the laptop.
            Op::Open { head, .. } => match result {
                Ok(Answer::Opened { fh, .. }) => Ok(Answer::Opened {
                    fh,
                    head: Some(proto::ByteBuf::from(vec![0; *head as usize + 1])),
                }),
                r => r,
            },
            Op::Readlink { .. } => Ok(Answer::Bytes(vec![b'a'; 5000])),
            _ => result,
        });
        let Some(m) = mount_by(Laptop::Tampered(tamper)) else {
            return;
        };
        std::fs::write(m.laptop().join("file"), "x").unwrap();
        std::os::unix::fs::symlink("file", m.laptop().join("link")).unwrap();
        let dir: PathBuf = m.dir().to_path_buf();
        let r = within_a_minute(move || {
            [
                errno_of(std::fs::metadata(dir.join("weird"))),
                errno_of(std::fs::metadata(dir.join("nosys"))),
                errno_of(std::fs::metadata(dir.join("kind"))),
                errno_of(std::fs::read(dir.join("file"))),
                errno_of(std::fs::read_link(dir.join("link"))),
            ]
        });
        assert_eq!(r, [Some(libc::EIO); 5]);
        // The mount still works.
        assert!(std::fs::metadata(m.dir().join("file")).is_ok());
    }
}
