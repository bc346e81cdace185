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

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_connect::client::{CallError, Client};
use berth_connect::proto::{self, Answer, Attr, Op, SetTime, Time};
use berth_runtime::mount::FuseConnection;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

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

/// Readahead and writes of up to one wire I/O.
const MAX_READAHEAD: u32 = 1 << 20;

/// Background requests (readahead) the kernel keeps in flight: as many as the wire takes.
const MAX_BACKGROUND: u16 = berth_connect::client::MAX_IN_FLIGHT as u16;

struct Shared {
    client: Client,
    owner: (u32, u32),
    inodes: Mutex<Inodes>,
}

impl Shared {
    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The call, its failure as the errno the process sees.
    async fn call(&self, op: Op) -> Result<Answer, Errno> {
        self.client.call(op).await.map_err(|e| errno(&e))
    }

    async fn attr(&self, ino: u64, op: Op) -> Result<FileAttr, Errno> {
        match self.call(op).await? {
            Answer::Attr(a) => self.file_attr(ino, &a),
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

    /// A new name in `parent` answered with `attr`: the kernel gets its entry.
    fn entry(&self, parent: u64, name: &[u8], attr: &Attr) -> Result<FileAttr, Errno> {
        let ino = self
            .inodes()
            .remember(parent, name)
            .map_err(Errno::from_i32)?;
        self.file_attr(ino, attr)
            .inspect_err(|_| self.inodes().forget(ino, 1))
    }
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
            }),
            rt,
        }
    }

    /// Runs `answer` on the runtime with the shared state: the FUSE loop goes on at once.
    fn answer<F, Fut>(&self, answer: F)
    where
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(answer(self.shared.clone()));
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

    /// A request whose answer is a new entry `name` in `parent`.
    fn new_entry(&self, parent: INodeNo, name: &OsStr, op: Op, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        self.answer(move |s| async move {
            let attr = match s.call(op).await {
                Ok(Answer::Attr(a)) => a,
                Ok(_) => return reply.error(Errno::EIO),
                Err(e) => return reply.error(e),
            };
            match s.entry(parent.0, &name, &attr) {
                Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    /// A request answered with nothing but success.
    fn done(&self, op: Op, reply: ReplyEmpty, then: impl FnOnce(&Shared) + Send + 'static) {
        self.answer(move |s| async move {
            match s.call(op).await {
                Ok(Answer::Done) => {
                    then(&s);
                    reply.ok()
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
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
        let _ = config.set_max_readahead(MAX_READAHEAD);
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
        let path = resolve!(reply, self.child(parent, name));
        self.new_entry(parent, name, Op::Lookup { path }, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.shared.inodes().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
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
        self.answer(move |s| async move {
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
        self.answer(move |s| async move {
            let op = Op::Create {
                path,
                flags: libc::O_WRONLY | libc::O_EXCL,
                mode: mode & 0o7777,
            };
            let (fh, attr) = match s.call(op).await {
                Ok(Answer::Created { fh, attr }) => (fh, attr),
                Ok(_) => return reply.error(Errno::EIO),
                Err(e) => return reply.error(e),
            };
            let _ = s.call(Op::Release { fh }).await;
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
        self.new_entry(parent, name, op, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let path = resolve!(reply, self.child(parent, name));
        let name = name.as_bytes().to_vec();
        self.done(Op::Unlink { path }, reply, move |s| {
            s.inodes().unlinked(parent.0, &name)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let path = resolve!(reply, self.child(parent, name));
        let name = name.as_bytes().to_vec();
        self.done(Op::Rmdir { path }, reply, move |s| {
            s.inodes().unlinked(parent.0, &name)
        });
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
        self.new_entry(parent, link_name, Op::Symlink { path, target }, reply);
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
        let op = Op::Rename {
            from,
            to,
            flags: flags.bits(),
        };
        self.done(op, reply, move |s| {
            s.inodes()
                .renamed(parent.0, &name, newparent.0, &newname, exchange)
        });
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
        self.new_entry(newparent, newname, Op::Link { from, to }, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let path = resolve!(reply, self.path(ino));
        self.answer(move |s| async move {
            match s
                .call(Op::Open {
                    path,
                    flags: flags.0,
                })
                .await
            {
                Ok(Answer::Handle(fh)) => {
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
                }
                Ok(_) => reply.error(Errno::EIO),
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
        let name = name.as_bytes().to_vec();
        let op = Op::Create {
            path,
            flags: flags & !libc::O_CREAT,
            mode: mode & 0o7777,
        };
        self.answer(move |s| async move {
            let (fh, attr) = match s.call(op).await {
                Ok(Answer::Created { fh, attr }) => (fh, attr),
                Ok(_) => return reply.error(Errno::EIO),
                Err(e) => return reply.error(e),
            };
            match s.entry(parent.0, &name, &attr) {
                Ok(a) => {
                    let keep = FopenFlags::FOPEN_KEEP_CACHE;
                    reply.created(&TTL, &a, Generation(0), FileHandle(fh), keep)
                }
                Err(e) => {
                    // The kernel never learns the handle: close it on the laptop.
                    let _ = s.call(Op::Release { fh }).await;
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
        self.answer(move |s| async move {
            // The kernel asks at most max_pages at once; the wire carries MAX_IO a frame. A
            // short answer is the end of the file.
            let mut data: Vec<u8> = Vec::new();
            while data.len() < size as usize {
                let want = (size - data.len() as u32).min(proto::MAX_IO);
                let op = Op::Read {
                    fh: fh.0,
                    offset: offset.saturating_add(data.len() as u64),
                    size: want,
                };
                match s.call(op).await {
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
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // max_write is MAX_IO: the kernel never sends more.
        let Some(chunk) = data.get(..data.len().min(proto::MAX_IO as usize)) else {
            return reply.error(Errno::EIO);
        };
        let op = Op::Write {
            fh: fh.0,
            offset,
            data: chunk.to_vec(),
        };
        let len = chunk.len();
        self.answer(move |s| async move {
            match s.call(op).await {
                Ok(Answer::Written(n)) if n as usize <= len => reply.written(n),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are on the laptop when answered: nothing is held here.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // close(2) has returned already; the handle is closed on the laptop meanwhile.
        reply.ok();
        self.answer(move |s| async move {
            let _ = s.call(Op::Release { fh: fh.0 }).await;
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
        self.done(Op::Fsync { fh: fh.0, datasync }, reply, |_| {});
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let path = resolve!(reply, self.path(ino));
        self.answer(move |s| async move {
            match s.call(Op::Opendir { path }).await {
                Ok(Answer::Handle(fh)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
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
            let entries = match s.call(Op::Readdir { fh: fh.0, offset }).await {
                Ok(Answer::Entries(e)) => e,
                Ok(_) => return reply.error(Errno::EIO),
                Err(e) => return reply.error(e),
            };
            for e in entries {
                let Some(kind) = e.attr.and_then(|a| s.file_attr(0, &a).ok()).map(|a| a.kind)
                else {
                    continue;
                };
                if !valid_name(&e.name) {
                    continue;
                }
                // The number the kernel knows, if it knows one; any other is only shown.
                let known = match e.name.as_slice() {
                    b"." | b".." => Some(ino.0),
                    name => s.inodes().find(ino.0, name),
                };
                let shown = known.unwrap_or(u64::MAX);
                if reply.add(INodeNo(shown), e.offset, kind, OsStr::from_bytes(&e.name)) {
                    break;
                }
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
            let entries = match s.call(Op::Readdir { fh: fh.0, offset }).await {
                Ok(Answer::Entries(e)) => e,
                Ok(_) => return reply.error(Errno::EIO),
                Err(e) => return reply.error(e),
            };
            for e in entries {
                let Some(attr) = e.attr else { continue };
                if !valid_name(&e.name) {
                    continue;
                }
                let name = OsStr::from_bytes(&e.name);
                if matches!(e.name.as_slice(), b"." | b"..") {
                    // The kernel takes no lookup on these.
                    let Ok(a) = s.file_attr(ino.0, &attr) else {
                        continue;
                    };
                    if reply.add(INodeNo(ino.0), e.offset, name, &TTL, &a, Generation(0)) {
                        break;
                    }
                    continue;
                }
                let a = match s.entry(ino.0, &e.name, &attr) {
                    Ok(a) => a,
                    // Past the table's bound the listing ends here; the next call goes on.
                    Err(_) => break,
                };
                if reply.add(a.ino, e.offset, name, &TTL, &a, Generation(0)) {
                    // Not sent: the kernel takes no lookup on it.
                    s.inodes().forget(a.ino.0, 1);
                    break;
                }
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
        self.answer(move |s| async move {
            let _ = s.call(Op::Release { fh: fh.0 }).await;
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

/// A name the kernel may be given: one component (or a dot entry).
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.contains(&b'/') && !name.contains(&0)
}

/// A running FUSE session; [`FuseSession::abort`] (or dropping it) ends it.
pub struct FuseSession {
    conn: FuseConnection,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// Runs `fs` on `dev` (an open `/dev/fuse` whose connection `conn` is mounted, or about to
/// be) on a thread of its own.
pub fn run(fs: ConnectFs, dev: OwnedFd, conn: FuseConnection) -> io::Result<FuseSession> {
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
    Ok(FuseSession {
        conn,
        thread: Some(thread),
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
    use crate::connect::laptop::{Laptop, Tamper};

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
        tamper: Option<Tamper>,
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
        let mut laptop = Laptop::new(laptop_dir.path());
        laptop.tamper = tamper;
        let silent = laptop.silent.clone();
        let (ours, theirs) = tokio::io::duplex(1 << 20);
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
        // Listing with attributes stops at the bound too, and the mount still answers.
        let _ = std::fs::read_dir(m.dir()).unwrap().count();
        assert!(m.shared.inodes().len() <= 20);
        assert!(std::fs::metadata(m.dir()).is_ok());
    }

    #[test]
    fn nonsense_answers_are_errors_not_hangs() {
        let tamper: Tamper = Box::new(|op, result| match op {
            Op::Lookup { path } if path.0 == b"weird" => Err(100_000),
            Op::Lookup { path } if path.0 == b"nosys" => Err(libc::ENOSYS),
            Op::Lookup { path } if path.0 == b"kind" => Ok(Answer::Done),
            Op::Read { size, .. } => Ok(Answer::Data(vec![0; *size as usize + 1])),
            Op::Readlink { .. } => Ok(Answer::Bytes(vec![b'a'; 5000])),
            _ => result,
        });
        let Some(m) = mount_with(OWNER, Duration::from_secs(30), MAX_NODES, Some(tamper)) else {
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
