//! The served directory: each [`Op`] as the syscalls that do it on the laptop, confined
//! beneath the directory.
//!
//! Confinement rests on one rule: a path from the wire is only ever resolved by
//! `openat2(root, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so `..`, absolute symlinks
//! and symlinks pointing out (in any component, however they change meanwhile) land beneath
//! the directory as if it were `/`. An operation on a name resolves the *parent* that way
//! and gives the last component, which is one name without `/`, to the `*at` syscall with
//! the parent's descriptor; a last component that is a symlink is never followed (the
//! container's kernel follows links itself, in the container's view, and asks again).
//!
//! Everything here blocks; [`super::serve`] runs it on blocking threads.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::dir::{Dir, OwningIter};
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{self, FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, UnlinkatFlags};

use crate::proto::{
    Answer, Attr, DirAfter, DirEntry, MAX_HEAD, MAX_IO, Op, READDIR_BYTES, RelPath, SetTime,
    Statfs, Time,
};

/// Handles (files and directories) open at once; one more is `EMFILE`.
pub const MAX_HANDLES: usize = 1024;

/// The most one `pwrite` to a regular file writes. A recent kernel (this bench machine's
/// 6.18, on ext4) gives a buffered write page-cache folios as large as the write. Folios of 128 KiB and more
/// come out of the high-order free blocks that a virtual machine's free page reporting
/// (virtio-balloon) hands back to its host, and every page of them is then faulted in by the
/// host while the kernel copies: 512 MiB written in 256 KiB `pwrite`s took 0.28–1.09 s of
/// system time on this bench's machine, in 32 KiB ones 0.13–0.25 s (docs/benchmarks.md).
/// OpenSSH's `sftp-server` writes what sshfs sends, 32 KiB at a time.
const WRITE_PIECE: usize = 32 * 1024;

/// What an entry costs in a readdir answer besides its name (an [`Attr`] is at most about
/// 170 bytes of varints, the offset 10, framing a few).
const ENTRY_OVERHEAD: usize = 200;

/// The flags of `Open`/`Create` taken from the daemon; the rest (`O_CREAT` on `Open`,
/// `O_PATH`, `O_TMPFILE`, `O_DIRECTORY`, `O_DIRECT`, ...) is dropped.
const OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_NONBLOCK;

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// An open file or directory of the daemon's.
enum Handle {
    File {
        fd: OwnedFd,
        /// A FIFO: reads and writes wait in `poll` (cancellable), not in the syscall.
        fifo: bool,
        /// The daemon asked for `O_NONBLOCK`: a FIFO that is not ready says `EAGAIN`.
        nonblock: bool,
        /// Opened with `O_APPEND`, `O_SYNC` or `O_DSYNC`: each write is one `pwrite`, never
        /// pieces (an append stays whole against other writers on the laptop; a synchronous
        /// write is one commit to the disk, not eight).
        whole: bool,
        /// Held by a write through this handle for its `pwrite`s. The kernel serialises
        /// writes to one file on the inode's lock anyway, and its waiters spin on a CPU while
        /// the holder copies (`rwsem_spin_on_owner`): with the daemon's writes behind, up to
        /// [`super::WORKERS`] of one handle's writes arrive at once. Waiting here sleeps.
        /// (Writes through other handles of the same file still meet in the kernel.)
        writing: Mutex<()>,
    },
    Dir {
        /// Opened from the path; entries are `lstat`'ed against it, listings re-opened
        /// from it.
        fd: OwnedFd,
        listing: Mutex<Listing>,
    },
}

/// A directory being listed. Offsets are entry counts: the entry at `offset` n is the n-th
/// (`.` and `..` are left out: the daemon makes its own, and the root's `..` is outside).
#[derive(Default)]
struct Listing {
    stream: Option<OwningIter>,
    /// Entries of `stream` given out so far.
    pos: u64,
    /// An entry read from `stream` that did not fit in the last answer.
    held: Option<CString>,
}

impl Listing {
    fn rewind(&mut self, dir: &OwnedFd) -> Result<(), Errno> {
        let fd = fcntl::openat(
            dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        self.stream = Some(Dir::from_fd(fd)?.into_iter());
        self.pos = 0;
        self.held = None;
        Ok(())
    }

    fn next_name(&mut self) -> Result<Option<CString>, Errno> {
        if let Some(name) = self.held.take() {
            return Ok(Some(name));
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        for entry in stream.by_ref() {
            let name = entry?.file_name().to_owned();
            if name.as_bytes() != b"." && name.as_bytes() != b".." {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    fn read(&mut self, dir: &OwnedFd, offset: u64) -> Result<Vec<DirEntry>, Errno> {
        if self.stream.is_none() || offset < self.pos {
            self.rewind(dir)?;
        }
        while self.pos < offset {
            if self.next_name()?.is_none() {
                return Ok(Vec::new());
            }
            self.pos += 1;
        }
        let mut entries = Vec::new();
        let mut bytes = 0;
        while let Some(name) = self.next_name()? {
            let cost = name.as_bytes().len() + ENTRY_OVERHEAD;
            if bytes + cost > READDIR_BYTES {
                self.held = Some(name);
                break;
            }
            bytes += cost;
            self.pos += 1;
            let attr = stat::fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .ok()
                .map(|st| attr(&st));
            entries.push(DirEntry {
                name: name.into_bytes(),
                offset: self.pos,
                attr,
            });
        }
        Ok(entries)
    }
}

/// The served directory and the daemon's handles in it.
pub struct Fs {
    /// `O_PATH | O_DIRECTORY`: every path is resolved beneath it.
    root: OwnedFd,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
    /// Readable (hung up) once `serve` ends: FIFO waits give up.
    cancel: OwnedFd,
    /// The count of directories' attributes read after a change ([`Fs::after`]).
    dir_reads: Mutex<u64>,
}

impl Fs {
    /// `cancel`: a pipe's read end whose write end is closed when serving ends.
    pub fn new(root: OwnedFd, cancel: OwnedFd) -> Result<Self, Errno> {
        let st = stat::fstat(&root)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        Ok(Self {
            root,
            handles: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            cancel,
            dir_reads: Mutex::new(0),
        })
    }

    /// Whether `op`, on the handle it names, may wait on a FIFO (and so should not take a
    /// place among the ordinary blocking calls).
    pub fn may_wait(&self, op: &Op) -> bool {
        match op {
            Op::Read { fh, .. } | Op::Write { fh, .. } => matches!(
                self.handle(*fh).as_deref(),
                Ok(Handle::File { fifo: true, .. })
            ),
            _ => false,
        }
    }

    /// Does `op`; an `Err` is the errno of the syscall that failed.
    pub fn op(&self, op: Op) -> Result<Answer, Errno> {
        if !paths_valid(&op) {
            return Err(Errno::EINVAL);
        }
        match op {
            Op::Lookup { path } | Op::Getattr { path, fh: None } => {
                self.lstat(&path).map(Answer::Attr)
            }
            Op::Getattr { fh: Some(fh), .. } => {
                let h = self.handle(fh)?;
                Ok(Answer::Attr(attr(&stat::fstat(h.fd())?)))
            }
            Op::Setattr {
                path,
                fh,
                mode,
                size,
                atime,
                mtime,
            } => self.setattr(&path, fh, mode, size, atime, mtime),
            Op::Readlink { path } => {
                let (dir, name) = self.parent(&path, Errno::EINVAL)?;
                let target = fcntl::readlinkat(&dir, name.as_c_str())?;
                Ok(Answer::Bytes(OsString::into_vec(target)))
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.parent(&path, Errno::EEXIST)?;
                stat::mkdirat(&dir, name.as_c_str(), mode_bits(mode, true))?;
                self.entry(&dir, &name)
            }
            Op::Unlink { path } => {
                let (dir, name) = self.parent(&path, Errno::EBUSY)?;
                unistd::unlinkat(&dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
                Ok(Answer::Removed {
                    dir: self.after(&dir),
                })
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent(&path, Errno::EBUSY)?;
                unistd::unlinkat(&dir, name.as_c_str(), UnlinkatFlags::RemoveDir)?;
                Ok(Answer::Removed {
                    dir: self.after(&dir),
                })
            }
            Op::Symlink { path, target } => {
                if target.is_empty() || target.len() >= libc::PATH_MAX as usize {
                    return Err(Errno::EINVAL);
                }
                let target = CString::new(target).map_err(|_| Errno::EINVAL)?;
                let (dir, name) = self.parent(&path, Errno::EEXIST)?;
                unistd::symlinkat(target.as_c_str(), &dir, name.as_c_str())?;
                self.entry(&dir, &name)
            }
            Op::Rename { from, to, flags } => {
                let flags = RenameFlags::from_bits(flags)
                    .filter(|f| {
                        (*f - (RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE))
                            .is_empty()
                    })
                    .ok_or(Errno::EINVAL)?;
                let (from_dir, from_name) = self.parent(&from, Errno::EBUSY)?;
                let (to_dir, to_name) = self.parent(&to, Errno::EBUSY)?;
                fcntl::renameat2(
                    &from_dir,
                    from_name.as_c_str(),
                    &to_dir,
                    to_name.as_c_str(),
                    flags,
                )?;
                Ok(Answer::Renamed {
                    from: self.after(&from_dir),
                    to: self.after(&to_dir),
                })
            }
            Op::Link { from, to } => {
                let (from_dir, from_name) = self.parent(&from, Errno::EPERM)?;
                let (to_dir, to_name) = self.parent(&to, Errno::EEXIST)?;
                // No AT_SYMLINK_FOLLOW: a symlink is linked itself, never its target.
                unistd::linkat(
                    &from_dir,
                    from_name.as_c_str(),
                    &to_dir,
                    to_name.as_c_str(),
                    AtFlags::empty(),
                )?;
                self.entry(&to_dir, &to_name)
            }
            Op::Open { path, flags, head } => {
                let flags = flags & OPEN_FLAGS;
                let (st, fh) = self.open(&self.root, &c_path(&path)?, flags, None)?;
                let regular =
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG;
                let readable = flags & libc::O_ACCMODE != libc::O_WRONLY;
                // Only a whole file, read whole: a longer one would be sent again by the
                // reads that follow, and a read that fails or finds the file changed size is
                // left untold (the daemon's read asks again, and gets any error then). Only a
                // file with one name: the daemon drops a head when the file changes through
                // the mount, which it knows by name.
                let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
                let one_name = st.st_nlink == 1;
                let head = (head > 0
                    && regular
                    && readable
                    && one_name
                    && size <= u64::from(head.min(MAX_HEAD)))
                .then(|| self.handle(fh).ok())
                .flatten()
                .and_then(|h| self.read(&h, 0, head.min(MAX_HEAD)).ok())
                .filter(|data| data.len() as u64 == size)
                .map(crate::proto::ByteBuf::from);
                Ok(Answer::Opened { fh, head })
            }
            Op::Create { path, flags, mode } => {
                let flags = (flags & (OPEN_FLAGS | libc::O_EXCL)) | libc::O_CREAT;
                // Opened beneath its directory, the one whose attributes are read after.
                let (dir, name) = self.parent(&path, Errno::EISDIR)?;
                let (st, fh) = self.open(&dir, &name, flags, Some(mode))?;
                Ok(Answer::Created {
                    fh,
                    attr: attr(&st),
                    dir: self.after(&dir),
                })
            }
            Op::Read { fh, offset, size } => {
                let h = self.handle(fh)?;
                self.read(&h, offset, size.min(MAX_IO)).map(Answer::Data)
            }
            Op::Write { fh, offset, data } => {
                let h = self.handle(fh)?;
                let n = self.write(&h, offset, &data)?;
                Ok(Answer::Written(u32::try_from(n).unwrap_or(u32::MAX)))
            }
            Op::Fsync { fh, datasync } => {
                let h = self.handle(fh)?;
                if datasync {
                    unistd::fdatasync(h.fd())?;
                } else {
                    unistd::fsync(h.fd())?;
                }
                Ok(Answer::Done)
            }
            Op::Release { fh, attr: with } => {
                // The descriptor closes when the last call using it ends.
                let h = self.handles().remove(&fh).ok_or(Errno::EBADF)?;
                Ok(
                    match with.then(|| stat::fstat(h.fd())).and_then(Result::ok) {
                        Some(st) => Answer::Attr(attr(&st)),
                        None => Answer::Done,
                    },
                )
            }
            Op::Opendir { path } => {
                self.room()?;
                let how = OpenHow::new()
                    .flags(
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    )
                    .resolve(resolve());
                let fd = fcntl::openat2(&self.root, c_path(&path)?.as_c_str(), how)?;
                self.insert(Handle::Dir {
                    fd,
                    listing: Mutex::default(),
                })
                .map(Answer::Handle)
            }
            Op::Readdir { fh, offset } => match &*self.handle(fh)? {
                Handle::Dir { fd, listing } => lock(listing).read(fd, offset).map(Answer::Entries),
                Handle::File { .. } => Err(Errno::ENOTDIR),
            },
            Op::Statfs => {
                let s = nix::sys::statvfs::fstatvfs(&self.root)?;
                Ok(Answer::Statfs(Statfs {
                    blocks: s.blocks(),
                    bfree: s.blocks_free(),
                    bavail: s.blocks_available(),
                    files: s.files(),
                    ffree: s.files_free(),
                    bsize: u32::try_from(s.block_size()).unwrap_or(u32::MAX),
                    namelen: u32::try_from(s.name_max()).unwrap_or(u32::MAX),
                    frsize: u32::try_from(s.fragment_size()).unwrap_or(u32::MAX),
                }))
            }
        }
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        lock(&self.handles)
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        self.handles().get(&fh).cloned().ok_or(Errno::EBADF)
    }

    fn room(&self) -> Result<(), Errno> {
        if self.handles().len() >= MAX_HANDLES {
            Err(Errno::EMFILE)
        } else {
            Ok(())
        }
    }

    fn insert(&self, handle: Handle) -> Result<u64, Errno> {
        let mut handles = self.handles();
        if handles.len() >= MAX_HANDLES {
            return Err(Errno::EMFILE);
        }
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        handles.insert(fh, Arc::new(handle));
        Ok(fh)
    }

    /// The parent directory of `path`, resolved beneath the root, and its last component;
    /// `on_root` when `path` is the root itself (which has no name to act on).
    fn parent(&self, path: &RelPath, on_root: Errno) -> Result<(OwnedFd, CString), Errno> {
        if !path.is_valid() {
            return Err(Errno::EINVAL);
        }
        if path.0.is_empty() {
            return Err(on_root);
        }
        let mut parts = path.0.rsplitn(2, |&b| b == b'/');
        let name = parts.next().unwrap_or_default();
        let parent = parts.next().unwrap_or(b".");
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(resolve());
        let parent = CString::new(parent).map_err(|_| Errno::EINVAL)?;
        let dir = fcntl::openat2(&self.root, parent.as_c_str(), how)?;
        let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
        Ok((dir, name))
    }

    fn lstat(&self, path: &RelPath) -> Result<Attr, Errno> {
        if path.0.is_empty() {
            return Ok(attr(&stat::fstat(&self.root)?));
        }
        let (dir, name) = self.parent(path, Errno::EINVAL)?;
        self.lstat_at(&dir, &name)
    }

    /// The answer to a new name `name` in `dir`.
    fn entry(&self, dir: &OwnedFd, name: &CString) -> Result<Answer, Errno> {
        Ok(Answer::Entry {
            attr: self.lstat_at(dir, name)?,
            dir: self.after(dir),
        })
    }

    /// `dir`'s attributes after a change in it, numbered with the read ([`DirAfter`]): the
    /// count is taken under the same lock as the read, so a higher one is a later read.
    fn after(&self, dir: &OwnedFd) -> Option<Box<DirAfter>> {
        let mut reads = lock(&self.dir_reads);
        let st = stat::fstat(dir).ok()?;
        *reads += 1;
        Some(Box::new(DirAfter {
            seq: *reads,
            attr: attr(&st),
        }))
    }

    fn lstat_at(&self, dir: &OwnedFd, name: &CString) -> Result<Attr, Errno> {
        Ok(attr(&stat::fstatat(
            dir,
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?))
    }

    /// Opens (or creates) the file at `path` beneath `base` (the root, or a directory
    /// resolved beneath it) and keeps it as a handle. Never follows a last component that is
    /// a symlink; never blocks on a FIFO; refuses devices (like a `nodev` mount).
    fn open(
        &self,
        base: &OwnedFd,
        path: &CString,
        flags: i32,
        create: Option<u32>,
    ) -> Result<(FileStat, u64), Errno> {
        self.room()?;
        let nonblock = flags & libc::O_NONBLOCK != 0;
        let whole = flags & (libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC) != 0;
        let flags = OFlag::from_bits_truncate(flags)
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK;
        let mut how = OpenHow::new().flags(flags).resolve(resolve());
        if let Some(mode) = create {
            how = how.mode(mode_bits(mode, false));
        }
        let fd = fcntl::openat2(base, path.as_c_str(), how)?;
        let st = stat::fstat(&fd)?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let fifo = kind == SFlag::S_IFIFO;
        if kind == SFlag::S_IFCHR || kind == SFlag::S_IFBLK {
            return Err(Errno::EACCES);
        }
        if !fifo && !nonblock {
            fcntl::fcntl(&fd, fcntl::FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        }
        let fh = self.insert(Handle::File {
            fd,
            fifo,
            nonblock,
            whole,
            writing: Mutex::new(()),
        })?;
        Ok((st, fh))
    }

    fn setattr(
        &self,
        path: &RelPath,
        fh: Option<u64>,
        mode: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    ) -> Result<Answer, Errno> {
        let size = size
            .map(|s| i64::try_from(s).map_err(|_| Errno::EFBIG))
            .transpose()?;
        let times = match (atime, mtime) {
            (None, None) => None,
            (a, m) => Some((time_spec(a)?, time_spec(m)?)),
        };
        if let Some(fh) = fh {
            let h = self.handle(fh)?;
            let fd = h.fd();
            if let Some(mode) = mode {
                stat::fchmod(fd, mode_bits(mode, is_dir(&stat::fstat(fd)?)))?;
            }
            if let Some(size) = size {
                unistd::ftruncate(fd, size)?;
            }
            if let Some((a, m)) = times {
                stat::futimens(fd, &a, &m)?;
            }
            return Ok(Answer::Attr(attr(&stat::fstat(fd)?)));
        }
        if path.0.is_empty() {
            // `.` of the root's descriptor is the root itself (no name, no link to follow);
            // no read permission needed, as with `chmod(2)`.
            if size.is_some() {
                return Err(Errno::EISDIR);
            }
            if let Some(mode) = mode {
                let mode = mode_bits(mode, true);
                stat::fchmodat(&self.root, ".", mode, FchmodatFlags::FollowSymlink)?;
            }
            if let Some((a, m)) = times {
                stat::utimensat(&self.root, ".", &a, &m, UtimensatFlags::FollowSymlink)?;
            }
            return self.lstat(path).map(Answer::Attr);
        }
        let (dir, name) = self.parent(path, Errno::EINVAL)?;
        if let Some(mode) = mode {
            let st = stat::fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            // With NOFOLLOW, libc changes the file through an `O_PATH` descriptor of the
            // name (or `fchmodat2`), so a symlink swapped in meanwhile is never followed; on
            // a symlink it is EOPNOTSUPP, as Linux has no symlink modes.
            stat::fchmodat(
                &dir,
                name.as_c_str(),
                mode_bits(mode, is_dir(&st)),
                FchmodatFlags::NoFollowSymlink,
            )?;
        }
        if let Some(size) = size {
            let fd = fcntl::openat(
                &dir,
                name.as_c_str(),
                OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_NOCTTY
                    | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            let kind = SFlag::from_bits_truncate(stat::fstat(&fd)?.st_mode) & SFlag::S_IFMT;
            if kind != SFlag::S_IFREG {
                return Err(Errno::EINVAL);
            }
            unistd::ftruncate(&fd, size)?;
        }
        if let Some((a, m)) = times {
            stat::utimensat(
                &dir,
                name.as_c_str(),
                &a,
                &m,
                UtimensatFlags::NoFollowSymlink,
            )?;
        }
        self.lstat_at(&dir, &name).map(Answer::Attr)
    }

    fn read(&self, h: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let Handle::File {
            fd, fifo, nonblock, ..
        } = h
        else {
            return Err(Errno::EISDIR);
        };
        let mut buf = vec![0u8; size as usize];
        if *fifo {
            // A read that finds no writer says end of file at once, even before any writer
            // came (which a blocking open would have waited for); `poll` says ready only
            // for data or once a writer has come and gone, so wait in it first.
            if !nonblock {
                self.wait(fd.as_fd(), PollFlags::POLLIN)?;
            }
            let n = loop {
                match unistd::read(fd, &mut buf) {
                    Err(Errno::EAGAIN) if !nonblock => self.wait(fd.as_fd(), PollFlags::POLLIN)?,
                    Err(Errno::EINTR) => {}
                    r => break r?,
                }
            };
            buf.truncate(n);
            return Ok(buf);
        }
        // Fewer bytes only at the end of the file.
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            let at = offset
                .checked_add(done as u64)
                .and_then(|o| i64::try_from(o).ok())
                .ok_or(Errno::EINVAL)?;
            match nix::sys::uio::pread(fd, rest, at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn write(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let Handle::File {
            fd,
            fifo,
            nonblock,
            whole,
            writing,
        } = h
        else {
            return Err(Errno::EISDIR);
        };
        let _one_at_a_time = (!*fifo).then(|| lock(writing));
        let mut done = 0;
        while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
            let r = if *fifo {
                unistd::write(fd, rest)
            } else {
                // On an O_APPEND descriptor Linux appends whatever the offset.
                let at = offset
                    .checked_add(done as u64)
                    .and_then(|o| i64::try_from(o).ok())
                    .ok_or(Errno::EFBIG)?;
                nix::sys::uio::pwrite(fd, piece(rest, *whole), at)
            };
            match r {
                // Nothing written of something: a file system that takes no more.
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if *fifo && !nonblock && done == 0 => {
                    self.wait(fd.as_fd(), PollFlags::POLLOUT)?;
                }
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    /// Waits until `fd` is ready for `events`, or serving ends (`EINTR`), or for as long as
    /// the daemon waits for an answer ([`FIFO_WAIT`]; `EAGAIN` then: it has given up).
    fn wait(&self, fd: BorrowedFd<'_>, events: PollFlags) -> Result<(), Errno> {
        let end = std::time::Instant::now() + FIFO_WAIT;
        loop {
            let mut fds = [
                PollFd::new(fd, events),
                PollFd::new(self.cancel.as_fd(), PollFlags::POLLIN),
            ];
            let left = end.saturating_duration_since(std::time::Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match nix::poll::poll(&mut fds, timeout) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(0) => return Err(Errno::EAGAIN),
                Ok(_) => {}
            }
            let [ready, cancelled] = fds.map(|f| f.any().unwrap_or(false));
            if cancelled {
                return Err(Errno::EINTR);
            }
            if ready {
                return Ok(());
            }
        }
    }
}

/// The longest a read or write of a FIFO waits for the other side: the daemon's deadline for
/// an answer, after which nobody waits for this one.
const FIFO_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Handle {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Handle::File { fd, .. } | Handle::Dir { fd, .. } => fd.as_fd(),
        }
    }
}

/// What the next `pwrite` of a regular file's write takes of `rest`: at most
/// [`WRITE_PIECE`], or all of it on a handle whose writes stay `whole`.
fn piece(rest: &[u8], whole: bool) -> &[u8] {
    match whole {
        true => rest,
        false => rest.get(..WRITE_PIECE).unwrap_or(rest),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether every path of `op` has [`RelPath`]'s shape (even one an operation on a handle
/// does not use).
fn paths_valid(op: &Op) -> bool {
    match op {
        Op::Lookup { path }
        | Op::Getattr { path, .. }
        | Op::Setattr { path, .. }
        | Op::Readlink { path }
        | Op::Mkdir { path, .. }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::Symlink { path, .. }
        | Op::Open { path, .. }
        | Op::Create { path, .. }
        | Op::Opendir { path } => path.is_valid(),
        Op::Rename { from, to, .. } | Op::Link { from, to } => from.is_valid() && to.is_valid(),
        Op::Read { .. }
        | Op::Write { .. }
        | Op::Fsync { .. }
        | Op::Release { .. }
        | Op::Readdir { .. }
        | Op::Statfs => true,
    }
}

/// `path` for `openat2` beneath the root (the root itself is `.`).
fn c_path(path: &RelPath) -> Result<CString, Errno> {
    if !path.is_valid() {
        return Err(Errno::EINVAL);
    }
    if path.0.is_empty() {
        return Ok(c".".to_owned());
    }
    CString::new(path.0.clone()).map_err(|_| Errno::EINVAL)
}

/// Permission bits as asked, but never set-user-ID, nor set-group-ID on anything but a
/// directory (where it only passes the group on): a program in the container must not leave
/// a program that runs as the laptop's user for the laptop's *other* users.
fn mode_bits(mode: u32, dir: bool) -> Mode {
    let keep = if dir { 0o3777 } else { 0o1777 };
    Mode::from_bits_truncate(mode & keep)
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

fn time_spec(t: Option<SetTime>) -> Result<TimeSpec, Errno> {
    Ok(match t {
        None => TimeSpec::UTIME_OMIT,
        Some(SetTime::Now) => TimeSpec::UTIME_NOW,
        Some(SetTime::At(Time { secs, nanos })) => {
            if nanos >= 1_000_000_000 {
                return Err(Errno::EINVAL);
            }
            TimeSpec::new(secs, i64::from(nanos))
        }
    })
}

fn attr(st: &FileStat) -> Attr {
    let time = |secs: i64, nanos: i64| Time {
        secs,
        nanos: u32::try_from(nanos).unwrap_or(0),
    };
    Attr {
        ino: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        mode: st.st_mode,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        blksize: u32::try_from(st.st_blksize).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_write_goes_in_pieces_unless_it_must_stay_whole() {
        let data = vec![0u8; 3 * WRITE_PIECE + 5];
        assert_eq!(piece(&data, false).len(), WRITE_PIECE);
        assert_eq!(piece(&data[..5], false).len(), 5);
        assert_eq!(piece(&data[..WRITE_PIECE], false).len(), WRITE_PIECE);
        assert_eq!(piece(&data, true).len(), data.len());
    }
}
