//! A test laptop: serves a directory on the wire, plainly (no confinement: the tests are its
//! only users), until `berth_connect::serve` replaces it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_connect::client::Wire;
use berth_connect::proto::{
    Answer, Attr, DirAfter, DirEntry, Op, RelPath, SetTime, Statfs, Time, ToDaemon, ToLaptop,
};
use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;

enum Handle {
    File(File),
    Dir(PathBuf, Vec<(Vec<u8>, u64)>),
}

pub struct Laptop {
    root: PathBuf,
    handles: HashMap<u64, Handle>,
    next: u64,
    /// The count of directories' attributes read after a change.
    dir_reads: u64,
    /// While set, requests are read and never answered.
    pub silent: Arc<AtomicBool>,
    /// Changes an answer before it is sent (a hostile laptop).
    pub tamper: Option<Tamper>,
    /// Holds writes back (until 16 are held, or 20 ms pass with nothing new), answering
    /// whatever else comes meanwhile, then does them last first: a laptop whose workers
    /// finish in any order.
    pub reorder: bool,
}

pub type Tamper = Box<dyn Fn(&Op, Result<Answer, i32>) -> Result<Answer, i32> + Send>;

fn attr(m: &std::fs::Metadata) -> Attr {
    Attr {
        ino: m.ino(),
        size: m.size(),
        blocks: m.blocks(),
        atime: Time {
            secs: m.atime(),
            nanos: m.atime_nsec() as u32,
        },
        mtime: Time {
            secs: m.mtime(),
            nanos: m.mtime_nsec() as u32,
        },
        ctime: Time {
            secs: m.ctime(),
            nanos: m.ctime_nsec() as u32,
        },
        mode: m.mode(),
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev(),
        blksize: m.blksize() as u32,
    }
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn nix_errno(e: nix::Error) -> i32 {
    e as i32
}

fn timespec(t: Option<SetTime>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(SetTime::Now) => TimeSpec::UTIME_NOW,
        Some(SetTime::At(t)) => TimeSpec::new(t.secs, i64::from(t.nanos)),
    }
}

impl Laptop {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            handles: HashMap::new(),
            next: 1,
            dir_reads: 0,
            silent: Arc::new(AtomicBool::new(false)),
            tamper: None,
            reorder: false,
        }
    }

    fn full(&self, p: &RelPath) -> Result<PathBuf, i32> {
        if !p.is_valid() {
            return Err(libc::EINVAL);
        }
        Ok(self.root.join(std::ffi::OsStr::from_bytes(&p.0)))
    }

    fn lstat(&self, p: &Path) -> Result<Answer, i32> {
        std::fs::symlink_metadata(p)
            .map(|m| Answer::Attr(attr(&m)))
            .map_err(errno)
    }

    /// The attributes of `p`'s directory after a change of `p`, numbered.
    fn after(&mut self, p: &Path) -> Option<Box<DirAfter>> {
        let m = std::fs::symlink_metadata(p.parent()?).ok()?;
        self.dir_reads += 1;
        Some(Box::new(DirAfter {
            seq: self.dir_reads,
            attr: attr(&m),
        }))
    }

    /// The answer to the new name `p`.
    fn entry(&mut self, p: &Path) -> Result<Answer, i32> {
        let Answer::Attr(attr) = self.lstat(p)? else {
            return Err(libc::EIO);
        };
        let dir = self.after(p);
        Ok(Answer::Entry { attr, dir })
    }

    fn file(&self, fh: u64) -> Result<&File, i32> {
        match self.handles.get(&fh) {
            Some(Handle::File(f)) => Ok(f),
            _ => Err(libc::EBADF),
        }
    }

    fn handle(&mut self, h: Handle) -> u64 {
        let fh = self.next;
        self.next += 1;
        self.handles.insert(fh, h);
        fh
    }

    fn open(&self, p: &Path, flags: i32, mode: u32) -> Result<File, i32> {
        let fd = nix::fcntl::open(
            p,
            OFlag::from_bits_truncate(flags) | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(nix_errno)?;
        Ok(File::from(fd))
    }

    pub fn answer(&mut self, op: Op) -> Result<Answer, i32> {
        match op {
            Op::Lookup { path } => self.lstat(&self.full(&path)?),
            Op::Getattr { path, fh } => match fh {
                Some(fh) => self
                    .file(fh)?
                    .metadata()
                    .map(|m| Answer::Attr(attr(&m)))
                    .map_err(errno),
                None => self.lstat(&self.full(&path)?),
            },
            Op::Setattr {
                path,
                fh,
                mode,
                size,
                atime,
                mtime,
            } => {
                let p = self.full(&path)?;
                if let Some(mode) = mode {
                    std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(mode),
                    )
                    .map_err(errno)?;
                }
                if let Some(size) = size {
                    match fh {
                        Some(fh) => self.file(fh)?.set_len(size).map_err(errno)?,
                        None => nix::unistd::truncate(&p, size as i64).map_err(nix_errno)?,
                    }
                }
                if atime.is_some() || mtime.is_some() {
                    nix::sys::stat::utimensat(
                        nix::fcntl::AT_FDCWD,
                        &p,
                        &timespec(atime),
                        &timespec(mtime),
                        UtimensatFlags::NoFollowSymlink,
                    )
                    .map_err(nix_errno)?;
                }
                self.lstat(&p)
            }
            Op::Readlink { path } => std::fs::read_link(self.full(&path)?)
                .map(|t| Answer::Bytes(t.as_os_str().as_bytes().to_vec()))
                .map_err(errno),
            Op::Mkdir { path, mode } => {
                let p = self.full(&path)?;
                std::fs::DirBuilder::new()
                    .mode(mode)
                    .create(&p)
                    .map_err(errno)?;
                self.entry(&p)
            }
            Op::Unlink { path } => {
                let p = self.full(&path)?;
                std::fs::remove_file(&p).map_err(errno)?;
                Ok(Answer::Removed {
                    dir: self.after(&p),
                })
            }
            Op::Rmdir { path } => {
                let p = self.full(&path)?;
                std::fs::remove_dir(&p).map_err(errno)?;
                Ok(Answer::Removed {
                    dir: self.after(&p),
                })
            }
            Op::Symlink { path, target } => {
                let p = self.full(&path)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &p)
                    .map_err(errno)?;
                self.entry(&p)
            }
            Op::Rename { from, to, flags } => {
                let (from, to) = (self.full(&from)?, self.full(&to)?);
                nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &from,
                    nix::fcntl::AT_FDCWD,
                    &to,
                    RenameFlags::from_bits_truncate(flags),
                )
                .map_err(nix_errno)?;
                Ok(Answer::Renamed {
                    from: self.after(&from),
                    to: self.after(&to),
                })
            }
            Op::Link { from, to } => {
                let t = self.full(&to)?;
                std::fs::hard_link(self.full(&from)?, &t).map_err(errno)?;
                self.entry(&t)
            }
            Op::Open { path, flags, head } => {
                let f = self.open(&self.full(&path)?, flags & !libc::O_CREAT, 0)?;
                let meta = f.metadata().map_err(errno)?;
                let head = (head > 0
                    && flags & libc::O_ACCMODE != libc::O_WRONLY
                    && meta.is_file()
                    && meta.nlink() == 1
                    && meta.len() <= u64::from(head.min(berth_connect::proto::MAX_HEAD)))
                .then(|| {
                    let mut buf = vec![0; head.min(berth_connect::proto::MAX_HEAD) as usize];
                    let mut got = 0;
                    while got < buf.len() {
                        match f.read_at(&mut buf[got..], got as u64) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got += n,
                        }
                    }
                    buf.truncate(got);
                    berth_connect::proto::ByteBuf::from(buf)
                })
                .filter(|h| h.len() as u64 == meta.len());
                let fh = self.handle(Handle::File(f));
                Ok(Answer::Opened { fh, head })
            }
            Op::Create { path, flags, mode } => {
                let p = self.full(&path)?;
                let f = self.open(&p, flags | libc::O_CREAT, mode)?;
                let a = attr(&f.metadata().map_err(errno)?);
                let fh = self.handle(Handle::File(f));
                let dir = self.after(&p);
                Ok(Answer::Created { fh, attr: a, dir })
            }
            Op::Read { fh, offset, size } => {
                let f = self.file(fh)?;
                let mut buf = vec![0; size as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(errno(e)),
                    }
                }
                buf.truncate(got);
                Ok(Answer::Data(buf))
            }
            Op::Write { fh, offset, data } => {
                self.file(fh)?.write_all_at(&data, offset).map_err(errno)?;
                Ok(Answer::Written(data.len() as u32))
            }
            Op::Fsync { fh, .. } => self
                .file(fh)?
                .sync_all()
                .map(|()| Answer::Done)
                .map_err(errno),
            Op::Release { fh, attr: with } => {
                let h = self.handles.remove(&fh).ok_or(libc::EBADF)?;
                let meta = match h {
                    Handle::File(f) if with => f.metadata().ok(),
                    _ => None,
                };
                Ok(meta.map_or(Answer::Done, |m| Answer::Attr(attr(&m))))
            }
            Op::Opendir { path } => {
                let p = self.full(&path)?;
                let mut names: Vec<Vec<u8>> = vec![b".".to_vec(), b"..".to_vec()];
                for e in std::fs::read_dir(&p).map_err(errno)? {
                    names.push(e.map_err(errno)?.file_name().as_bytes().to_vec());
                }
                let listing = names
                    .into_iter()
                    .enumerate()
                    .map(|(i, n)| (n, i as u64 + 1))
                    .collect();
                Ok(Answer::Handle(self.handle(Handle::Dir(p, listing))))
            }
            Op::Readdir { fh, offset } => {
                let Some(Handle::Dir(dir, listing)) = self.handles.get(&fh) else {
                    return Err(libc::EBADF);
                };
                let mut out = Vec::new();
                let mut bytes = 0;
                // As much as the real laptop answers at once.
                for (name, off) in listing.iter().filter(|(_, o)| *o > offset) {
                    bytes += name.len() + 200;
                    if bytes > berth_connect::proto::READDIR_BYTES {
                        break;
                    }
                    let a = std::fs::symlink_metadata(dir.join(std::ffi::OsStr::from_bytes(name)))
                        .ok()
                        .map(|m| attr(&m));
                    out.push(DirEntry {
                        name: name.clone(),
                        offset: *off,
                        attr: a,
                    });
                }
                Ok(Answer::Entries(out))
            }
            Op::Statfs => {
                let s = nix::sys::statvfs::statvfs(&self.root).map_err(nix_errno)?;
                Ok(Answer::Statfs(Statfs {
                    blocks: s.blocks(),
                    bfree: s.blocks_free(),
                    bavail: s.blocks_available(),
                    files: s.files(),
                    ffree: s.files_free(),
                    bsize: s.block_size() as u32,
                    namelen: s.name_max() as u32,
                    frsize: s.fragment_size() as u32,
                }))
            }
        }
    }

    /// Answers requests on `stream` until it ends.
    pub async fn serve(mut self, stream: tokio::io::DuplexStream) {
        let (r, w) = tokio::io::split(stream);
        let mut wire = Wire::new(r, w);
        let mut held: Vec<(u64, Op)> = Vec::new();
        loop {
            let next = if held.is_empty() {
                wire.recv::<ToLaptop>().await
            } else {
                let wait = std::time::Duration::from_millis(20);
                match tokio::time::timeout(wait, wire.recv::<ToLaptop>()).await {
                    Ok(next) => next,
                    Err(_) => {
                        if !self.answer_held(&mut wire, &mut held).await {
                            return;
                        }
                        continue;
                    }
                }
            };
            let Ok(Some(ToLaptop::Request { id, op })) = next else {
                return;
            };
            if self.silent.load(Ordering::SeqCst) {
                continue;
            }
            if self.reorder && matches!(op, Op::Write { .. }) && held.len() < 16 {
                held.push((id, op));
                continue;
            }
            if !self.reply(&mut wire, id, op).await {
                return;
            }
        }
    }

    async fn answer_held<R, W>(&mut self, wire: &mut Wire<R, W>, held: &mut Vec<(u64, Op)>) -> bool
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        while let Some((id, op)) = held.pop() {
            if !self.reply(wire, id, op).await {
                return false;
            }
        }
        true
    }

    async fn reply<R, W>(&mut self, wire: &mut Wire<R, W>, id: u64, op: Op) -> bool
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let asked = op.clone();
        let result = self.answer(op);
        let result = match &self.tamper {
            Some(tamper) => tamper(&asked, result),
            None => result,
        };
        wire.send(&ToDaemon::Reply { id, result }).await.is_ok()
    }
}
