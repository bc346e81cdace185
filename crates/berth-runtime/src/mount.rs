//! A FUSE mount that no host path ever shows, attached at a path inside one container (for
//! `berth connect`, issue 15).
//!
//! ```text
//!  fuse_mount ──> (/dev/fuse fd, DetachedMount) ──attach──> Attached ──detach / drop──> gone
//!                  │ for the FUSE server              │ in the container's mount namespace only
//!                  └─ FuseConnection::abort: every waiting and later request fails (ENOTCONN)
//! ```
//!
//! The mount is made with the new mount API (`fsopen("fuse")`, `fsconfig`, `fsmount`): it
//! exists first as a detached mount, an anonymous tree reachable only through its descriptor,
//! and is then moved (`move_mount`) straight into the container's mount namespace by a thread
//! that entered it. It is never attached anywhere in the host's namespace, not even for a
//! moment, and the container gets no capability, device or privilege for it.
//!
//! What holds:
//! - **Nothing waits on the FUSE server.** The kernel sends `FUSE_INIT` when the superblock is
//!   made (`FSCONFIG_CMD_CREATE`) and does not wait for the answer (`fuse_send_init` is a
//!   background request unless the server asked for a synchronous one with
//!   `FUSE_DEV_IOC_SYNC_INIT`, which we never do), so [`fuse_mount`] returns at once; a
//!   server reading the device finds INIT already queued. Nothing here ever looks inside
//!   the mount (only `statx` with `AT_STATX_DONT_SYNC`, answered from the kernel's cache).
//! - **The path is the container's.** It is resolved beneath the container's root, component
//!   by component, following no symlink at all (`openat2` with `RESOLVE_IN_ROOT |
//!   RESOLVE_NO_SYMLINKS`): what lands at `/a/b` is at `/a/b` in the container, never at a
//!   place a symlink of hers points to, so the caller's checks of the path string mean what
//!   they say. Missing directories are made (`mkdirat`, owned by the container's root).
//! - **It stays in the container.** The mount is refused on a mount that propagates
//!   (`shared:` in mountinfo: a mount below it would show in every peer, the host's
//!   included), and lookups never enter another FUSE mount (one served by a stalled peer
//!   would hold the thread).
//! - **It goes away.** [`Attached`] keeps the mount's own descriptor and the container's mount
//!   namespace: [`Attached::detach`] (or, best effort, dropping it) unmounts that very mount
//!   (`MNT_DETACH`), wherever it is now (a renamed parent does not hide it), also after the
//!   container stopped.
//!
//! Every thread that enters a container's namespace is one of [`crate::in_namespace`]'s,
//! counted and capped per owner and daemon-wide, and never waits on the user.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags, fsconfig_create,
    fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
};

use crate::{ContainerInit, Namespace, RootOwner, in_namespace};

/// How long [`attach`] may take in all (a wait for a namespace thread included).
pub const ATTACH_DEADLINE: Duration = Duration::from_secs(10);
/// How long [`Attached::detach`] may take in all.
pub const DETACH_DEADLINE: Duration = Duration::from_secs(10);
/// Path components of a mount point, at most.
const MAX_DEPTH: usize = 64;
/// The most of a container's mountinfo read (a container cannot make mounts of its own;
/// this is far beyond what an engine gives it).
const MAX_MOUNTINFO: u64 = 4 << 20;

/// What the FUSE mount is made with.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Who the mount belongs to: the container's root as the host sees it
    /// ([`ContainerInit::root_owner`]). With `allow_other` and `default_permissions` every
    /// process in the container may use it, under ordinary permission checks.
    pub owner: RootOwner,
    /// Permission bits of the mount's root until the server's first answer (`rootmode`).
    pub root_perms: u32,
    /// The largest read the kernel asks for (`max_read`), in bytes; `None`: the kernel's.
    pub max_read: Option<u32>,
    /// The mount's source as mountinfo shows it, e.g. `berth-connect:alice`. At most 64
    /// bytes, no whitespace, commas or NUL.
    pub source: String,
}

/// The subtype every mount made here carries: the container sees `fuse.berth-connect`.
pub const SUBTYPE: &str = "berth-connect";

/// A FUSE mount that is attached nowhere yet: only its descriptor reaches it. Dropping it
/// dissolves the mount (and, with no server left, the file system).
#[derive(Debug)]
pub struct DetachedMount {
    fd: OwnedFd,
    connection: FuseConnection,
}

impl DetachedMount {
    /// The mount's FUSE connection.
    pub fn connection(&self) -> FuseConnection {
        self.connection
    }
}

/// A FUSE connection, by its number (its superblock's device number, as the kernel's FUSE
/// control file system names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuseConnection(pub u32);

impl FuseConnection {
    /// Aborts the connection: every request waiting on the server, and every later one,
    /// fails with `ENOTCONN`, and the server's reads of the device end (`ENODEV`). Done
    /// through a detached mount of the FUSE control file system (`fusectl`), so it needs no
    /// `/sys/fs/fuse/connections` on the host. A connection that is already gone is not an
    /// error.
    pub fn abort(self) -> io::Result<()> {
        let ctl = fsopen("fusectl", FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(|e| err("cannot open the FUSE control file system", e))?;
        fsconfig_create(&ctl).map_err(|e| err("cannot make the FUSE control file system", e))?;
        let mnt = fsmount(
            &ctl,
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NODEV
                | MountAttrFlags::MOUNT_ATTR_NOEXEC,
        )
        .map_err(|e| err("cannot mount the FUSE control file system", e))?;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV;
        let abort = match rustix::fs::openat2(
            &mnt,
            format!("{}/abort", self.0),
            OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        ) {
            Ok(f) => f,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(err("cannot open the connection's abort file", e)),
        };
        match rustix::io::write(&abort, b"1") {
            Ok(_) | Err(rustix::io::Errno::NODEV) => Ok(()),
            Err(e) => Err(err("cannot abort the FUSE connection", e)),
        }
    }
}

impl FuseConnection {
    /// The setting of how far the kernel reads ahead of a process reading a file of this
    /// mount in order: the mount's backing device info, which the kernel names by the
    /// superblock's number (`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`), made with the
    /// superblock and gone with it. Open it while the mount is certainly there (its
    /// descriptor held): the open file stays this mount's, and once the superblock is gone a
    /// write fails (`ENODEV`) instead of reaching a mount that took the number since. On a
    /// host whose `/sys` is read-only this fails.
    pub fn read_ahead(self) -> io::Result<ReadAhead> {
        let (major, minor) = (self.0 >> 20, self.0 & 0xf_ffff);
        let file = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
        let fd = rustix::fs::open(
            file.as_str(),
            OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| err("cannot open the mount's read_ahead_kb", e))?;
        Ok(ReadAhead(fd))
    }
}

/// A FUSE mount's readahead setting ([`FuseConnection::read_ahead`]).
#[derive(Debug)]
pub struct ReadAhead(OwnedFd);

impl ReadAhead {
    /// Sets it to `bytes` (rounded down to KiB). Every FUSE mount starts with the kernel's
    /// 128 KiB, and the server's answer to `FUSE_INIT` can only lower it (`max_readahead`,
    /// which may not exceed what the kernel offered): so this is for after INIT is answered.
    pub fn set(&self, bytes: u32) -> io::Result<()> {
        rustix::io::write(&self.0, (bytes / 1024).to_string().as_bytes())
            .map_err(|e| err("cannot set the mount's readahead", e))?;
        Ok(())
    }
}

/// Makes a FUSE mount attached nowhere; returns the `/dev/fuse` descriptor for the FUSE
/// server (blocking, close-on-exec; `FUSE_INIT` is already queued on it) and the mount.
/// Never waits on the server (see the module's notes).
pub fn fuse_mount(opts: &FuseOptions) -> io::Result<(OwnedFd, DetachedMount)> {
    if opts.source.is_empty()
        || opts.source.len() > 64
        || opts
            .source
            .bytes()
            .any(|b| b == b',' || b == 0 || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad FUSE mount source name",
        ));
    }
    let dev = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| err("cannot open /dev/fuse", e))?;
    let fs = fsopen("fuse", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| err("cannot open a FUSE file system", e))?;
    let set = |key: &str, value: String| {
        fsconfig_set_string(&fs, key, value.as_str())
            .map_err(|e| err(&format!("FUSE option {key}"), e))
    };
    set("fd", dev.as_raw_fd().to_string())?;
    set(
        "rootmode",
        format!("{:o}", 0o040_000 | (opts.root_perms & 0o7777)),
    )?;
    set("user_id", opts.owner.uid.to_string())?;
    set("group_id", opts.owner.gid.to_string())?;
    if let Some(max_read) = opts.max_read {
        set("max_read", max_read.to_string())?;
    }
    set("source", opts.source.clone())?;
    set("subtype", SUBTYPE.to_owned())?;
    for flag in ["allow_other", "default_permissions"] {
        fsconfig_set_flag(&fs, flag).map_err(|e| err(&format!("FUSE option {flag}"), e))?;
    }
    // Makes the superblock and queues FUSE_INIT on `dev`, without waiting for its answer.
    fsconfig_create(&fs).map_err(|e| err("cannot make the FUSE file system", e))?;
    let fd = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(|e| err("cannot mount the FUSE file system", e))?;
    // The superblock's device number (the kernel's own, not asked of the server).
    let st = rustix::fs::statx(
        &fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
        StatxFlags::BASIC_STATS,
    )
    .map_err(|e| err("cannot stat the FUSE mount", e))?;
    let connection = FuseConnection((st.stx_dev_major << 20) | st.stx_dev_minor);
    Ok((dev, DetachedMount { fd, connection }))
}

/// A FUSE mount attached in a container. Detach it with [`Attached::detach`]; dropping it
/// detaches it too, on a thread of its own, without reporting.
#[derive(Debug)]
pub struct Attached {
    inner: Option<Inner>,
    at: PathBuf,
    connection: FuseConnection,
    owner: String,
}

#[derive(Debug)]
struct Inner {
    /// The container's mount namespace: kept, so the mount can be found and removed even
    /// after the container stopped.
    ns: File,
    /// The host's `/proc`.
    proc: OwnedFd,
    /// The mount itself (its root); `umount2` goes through it, not through a path the user
    /// can rename.
    mount: OwnedFd,
    /// The directories made for it, taken away with it.
    made: Option<Made>,
}

/// Directories `attach` made on the way to a mount: `names`, each in the one before, the
/// first in `base`.
#[derive(Debug)]
struct Made {
    /// The directory the first was made in (opened then: a directory of no FUSE mount).
    base: OwnedFd,
    names: Vec<CString>,
}

impl Made {
    /// Removes the made directories that are empty, deepest first, resolving each parent
    /// again from `base` without following a symlink or crossing a mount; stops at the
    /// first that cannot go (not empty, in use, replaced, moved).
    ///
    /// Never by path from the container's root, and never into another mount: she may
    /// have moved things (renaming a parent of a mountpoint is allowed), and a name looked
    /// up inside a `berth connect` mount waits on her laptop, which answers when it likes.
    fn remove(&self) {
        let how = ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV;
        for depth in (0..self.names.len()).rev() {
            let Some((name, above)) = self.names.get(..=depth).and_then(<[CString]>::split_last)
            else {
                return;
            };
            let mut parent = std::path::PathBuf::from(".");
            for c in above {
                parent.push(std::ffi::OsStr::from_bytes(c.as_bytes()));
            }
            let Ok(dir) = rustix::fs::openat2(
                &self.base,
                &parent,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                how,
            ) else {
                return;
            };
            if rustix::fs::unlinkat(&dir, name.as_c_str(), AtFlags::REMOVEDIR).is_err() {
                return;
            }
        }
    }
}

impl Attached {
    /// Where it is in the container.
    pub fn path(&self) -> &Path {
        &self.at
    }

    pub fn connection(&self) -> FuseConnection {
        self.connection
    }

    /// Removes the mount from the container (lazily: processes using it keep their files
    /// until they close them; with the connection aborted, they get `ENOTCONN`).
    pub async fn detach(mut self) -> io::Result<()> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        let ns = inner.ns.try_clone()?;
        let work = in_namespace(ns, Namespace::Mount, &self.owner, move || {
            unmount(&inner.proc, &inner.mount)?;
            if let Some(made) = &inner.made {
                made.remove();
            }
            Ok(())
        });
        tokio::time::timeout(DETACH_DEADLINE, work)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "unmount in the container: timed out",
                ))
            })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        // Not counted against the namespace threads: a drop cannot wait for a slot, and this
        // thread waits on nothing (a lazy unmount asks nothing of the FUSE server). A mount
        // left behind would stay in the container until it stops.
        let spawned = std::thread::Builder::new()
            .name("berth-umount".into())
            .spawn(move || {
                let r = crate::enter(&inner.ns, Namespace::Mount)
                    .and_then(|()| unmount(&inner.proc, &inner.mount));
                if r.is_ok()
                    && let Some(made) = &inner.made
                {
                    made.remove();
                }
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot remove a mount from a container");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to remove a mount from a container");
        }
    }
}

/// Unmounts `mount` (its root's descriptor) from the calling thread's mount namespace,
/// lazily. The path given to `umount2` is the descriptor's magic link, relative to the
/// host's `/proc/self/fd` made the working directory: after `setns`, "/" is the container's,
/// whose `/proc` is her own. Already gone is not an error.
fn unmount(proc: &OwnedFd, mount: &OwnedFd) -> io::Result<()> {
    let fds = rustix::fs::openat(
        proc,
        "self/fd",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("cannot open /proc", e))?;
    rustix::process::fchdir(&fds).map_err(|e| err("cannot enter /proc", e))?;
    match rustix::mount::unmount(mount.as_raw_fd().to_string().as_str(), UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
        Err(e) => Err(err("cannot unmount in the container", e)),
    }
}

/// The host's `/proc`, opened while the thread is still in the host's mount namespace.
fn host_proc() -> io::Result<OwnedFd> {
    rustix::fs::open(
        "/proc",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err("cannot open /proc", e))
}

/// Attaches `mount` at `at` (absolute) in the mount namespace of container init `init`, for
/// `owner` (the user: the namespace threads are counted against her). Missing directories
/// on the way, `at` included, are made. One deadline, [`ATTACH_DEADLINE`], for all of it.
/// A mount of ours already at `at` whose connection `live` does not know (its daemon ended
/// without taking it out) is taken out first; any other FUSE mount there refuses.
/// Errors are one line saying what failed.
pub async fn attach(
    init: &ContainerInit,
    owner: &str,
    mount: DetachedMount,
    at: &Path,
    live: Live,
) -> io::Result<Attached> {
    let deadline = Instant::now() + ATTACH_DEADLINE;
    let components = components(at)?;
    let not_running = || io::Error::new(io::ErrorKind::NotFound, "the container is not running");
    let ns = init.mount_ns().ok_or_else(not_running)?;
    let root_owner = init.root_owner().ok_or_else(not_running)?;
    let same = |a: &File, b: &File| {
        use std::os::unix::fs::MetadataExt;
        matches!((a.metadata(), b.metadata()), (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()))
    };
    if File::open("/proc/self/ns/mnt").is_ok_and(|host| same(&host, &ns)) {
        return Err(io::Error::other(
            "the container shares the host's mount namespace",
        ));
    }
    let root = init.root.try_clone()?;
    // The host's /proc, opened before the thread enters the container's namespace (whose
    // "/proc" is the container's own, and may be anything she mounted there).
    let proc = host_proc()?;
    let connection = mount.connection;
    let ns_kept = ns.try_clone()?;
    let at_buf = at.to_path_buf();
    let owner_name = owner.to_owned();
    let work = in_namespace(ns, Namespace::Mount, owner, move || {
        let (target, made) = make_target(&root, &proc, &components, root_owner, deadline, &live)?;
        if Instant::now() > deadline {
            return Err(timed_out());
        }
        move_mount(
            &mount.fd,
            "",
            &target,
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(|e| err("cannot attach the mount in the container", e))?;
        // The mount went onto the directory `target` holds, wherever that is now: she may
        // have renamed it, or one above it, since it was looked up (`renameat2` with
        // `RENAME_EXCHANGE`, in a loop), and then the mount would not be where the path the
        // caller checked leads. It is looked up again: anywhere else, it is taken out.
        let landed = lands_at(&root, &proc, &components, &mount.fd).unwrap_or(false);
        // From here on, dropping it (the caller gave up waiting) unmounts it again.
        let attached = Attached {
            inner: Some(Inner {
                ns: ns_kept,
                proc,
                mount: mount.fd,
                made: made.map(|(base, from)| Made {
                    base,
                    names: components.get(from..).unwrap_or_default().to_vec(),
                }),
            }),
            at: at_buf,
            connection,
            owner: owner_name,
        };
        if !landed {
            let shown = attached.at.display().to_string();
            drop(attached);
            return Err(io::Error::other(format!(
                "{shown} was moved in the container while it was mounted; nothing is mounted"
            )));
        }
        Ok(attached)
    });
    tokio::time::timeout_at(deadline.into(), work)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "mounting in the container took too long",
    )
}

/// The components of absolute path `at`, each a plain name.
fn components(at: &Path) -> io::Result<Vec<CString>> {
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("mount path {what}"));
    if !at.is_absolute() {
        return Err(bad("is not absolute"));
    }
    let mut names = Vec::new();
    for c in at.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(name) => {
                names.push(CString::new(name.as_bytes()).map_err(|_| bad("contains NUL"))?)
            }
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("contains . or .."));
            }
        }
    }
    if names.is_empty() {
        return Err(bad("is /"));
    }
    if names.len() > MAX_DEPTH {
        return Err(bad("is too deep"));
    }
    Ok(names)
}

/// In the container's mount namespace: opens (`O_PATH`) the directory at `components`
/// beneath `root`, making what is missing, and checks that a mount may go there. With the
/// directory, when it made any: the one it made the first in, and that first's depth.
fn make_target(
    root: &File,
    proc: &OwnedFd,
    components: &[CString],
    owner: RootOwner,
    deadline: Instant,
    live: &Live,
) -> io::Result<(OwnedFd, Option<(OwnedFd, usize)>)> {
    let mounts = Mountinfo::read(proc)?;
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let open_dir = |dir: &OwnedFd, name: &CString| {
        rustix::fs::openat2(
            dir,
            name.as_c_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        )
    };
    let mut dir: OwnedFd = rustix::fs::openat2(
        root,
        c".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        how,
    )
    .map_err(|e| err("cannot open the container's root", e))?;
    let mut shown = String::new();
    let mut parent = None;
    let mut made = None;
    for (depth, name) in components.iter().enumerate() {
        if Instant::now() > deadline {
            return Err(timed_out());
        }
        shown.push('/');
        shown.push_str(&name.to_string_lossy());
        // Never look up a name inside another FUSE mount: its server (a laptop) answers
        // when it likes. (Its type is read from the mount table: `fstatfs` would ask the
        // server.) A mount that is not in the table is not entered either.
        if mounts
            .fs_type(mount_id(&dir)?)
            .is_none_or(|t| t.starts_with("fuse"))
        {
            let parent = match shown.rsplit_once('/') {
                Some(("", _)) | None => "/",
                Some((p, _)) => p,
            };
            return Err(io::Error::other(format!(
                "cannot mount beneath {parent}: it is a FUSE mount"
            )));
        }
        let next = match open_dir(&dir, name) {
            Err(rustix::io::Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, name.as_c_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) => {
                        let dir_made = open_dir(&dir, name).map_err(|e| {
                            err(&format!("cannot open {shown} in the container"), e)
                        })?;
                        // Made by the host's root: given to the container's root, or under a
                        // user namespace she could not use it.
                        rustix::fs::chownat(
                            &dir_made,
                            "",
                            Some(rustix::fs::Uid::from_raw(owner.uid)),
                            Some(rustix::fs::Gid::from_raw(owner.gid)),
                            AtFlags::EMPTY_PATH,
                        )
                        .map_err(|e| {
                            err(&format!("cannot give {shown} to the container's root"), e)
                        })?;
                        if made.is_none() {
                            made = Some((dir.try_clone()?, depth));
                        }
                        Ok(dir_made)
                    }
                    Err(rustix::io::Errno::EXIST) => open_dir(&dir, name),
                    Err(e) => {
                        return Err(err(&format!("cannot make {shown} in the container"), e));
                    }
                }
            }
            r => r,
        };
        let next = next.map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
                io::Error::other(format!("{shown} is a symlink in the container"))
            }
            rustix::io::Errno::NOTDIR => {
                io::Error::other(format!("{shown} is not a directory in the container"))
            }
            e => err(&format!("cannot open {shown} in the container"), e),
        })?;
        parent = Some((std::mem::replace(&mut dir, next), name));
    }
    // A mount below a shared mount appears in all its peers (the host's, maybe): refused.
    // So is one on top of another FUSE mount (another `berth connect` at the same path),
    // unless it is one of ours whose server is gone (the daemon that served it ended
    // without taking it out): then it is taken out first.
    let mut id = mount_id(&dir)?;
    if mounts.fs_type(id) == Some(SUBTYPE_TYPE)
        && let Some((up, name)) = &parent
        && !live(connection_of(&dir)?)
    {
        unmount(proc, &dir)?;
        dir = open_dir(up, name).map_err(|e| err(&format!("cannot open {shown} again"), e))?;
        id = mount_id(&dir)?;
        tracing::info!(path = %shown, "a berth connect mount left by an earlier daemon taken out");
    }
    if mounts.fs_type(id).is_some_and(|t| t.starts_with("fuse")) {
        return Err(io::Error::other(format!(
            "{shown} is a FUSE mount in the container already"
        )));
    }
    match mounts.shared(id) {
        Some(false) => Ok((dir, made)),
        Some(true) => Err(io::Error::other(format!(
            "{shown} is on a shared mount in the container (it would show outside it)"
        ))),
        None => Err(io::Error::other(format!(
            "{shown}: its mount is not in the container's mount table"
        ))),
    }
}

/// Whether `components`, looked up again from `root` as [`make_target`] looks them up (no
/// symlink, never inside a FUSE mount), now lead to the root of `mount`.
fn lands_at(
    root: &File,
    proc: &OwnedFd,
    components: &[CString],
    mount: &OwnedFd,
) -> io::Result<bool> {
    let mounts = Mountinfo::read(proc)?;
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let open = |dir: &dyn AsFd, name: &std::ffi::CStr| {
        rustix::fs::openat2(
            dir,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        )
    };
    let mut dir = open(root, c".")?;
    for name in components {
        if mounts
            .fs_type(mount_id(&dir)?)
            .is_none_or(|t| t.starts_with("fuse"))
        {
            return Ok(false);
        }
        dir = match open(&dir, name.as_c_str()) {
            Ok(d) => d,
            Err(_) => return Ok(false),
        };
    }
    Ok(mount_id(&dir)? == mount_id(mount)?)
}

/// Whether a FUSE connection is one the caller serves.
pub type Live = std::sync::Arc<dyn Fn(FuseConnection) -> bool + Send + Sync>;

/// The type of our mounts in the mount table.
const SUBTYPE_TYPE: &str = "fuse.berth-connect";

/// The FUSE connection of the mount `fd` is the root of, without asking its server.
fn connection_of(fd: &impl AsFd) -> io::Result<FuseConnection> {
    let st = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
        StatxFlags::BASIC_STATS,
    )
    .map_err(|e| err("cannot stat a mount in the container", e))?;
    // The kernel's own device number, as /sys/fs/fuse/connections names it (and as
    // `berth_guest_proto::fds::serve` takes it): FUSE's are anonymous, major 0.
    Ok(FuseConnection((st.stx_dev_major << 20) | st.stx_dev_minor))
}

/// The id of the mount `fd` is on, without asking its file system anything.
fn mount_id(fd: &impl AsFd) -> io::Result<u64> {
    rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
        StatxFlags::MNT_ID,
    )
    .map(|st| st.stx_mnt_id)
    .map_err(|e| err("cannot stat a directory in the container", e))
}

/// The calling thread's mount table, as much of it as matters here.
struct Mountinfo(std::collections::HashMap<u64, (bool, String)>);

impl Mountinfo {
    /// Reads `thread-self/mountinfo` beneath the host's `/proc` (`proc`): the mounts of the
    /// thread's namespace as seen from its root.
    fn read(proc: &OwnedFd) -> io::Result<Self> {
        use std::io::Read;
        let f = rustix::fs::openat(
            proc,
            "thread-self/mountinfo",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err("cannot read the container's mount table", e))?;
        let mut text = String::new();
        File::from(f)
            .take(MAX_MOUNTINFO)
            .read_to_string(&mut text)?;
        Ok(Self::parse(&text))
    }

    /// Lines of `/proc/PID/mountinfo`: `id parent maj:min root point options [optional...]
    /// - type source super-options`.
    fn parse(text: &str) -> Self {
        let mounts = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(' ');
                let id = fields.next()?.parse::<u64>().ok()?;
                let mut fields = fields.skip(5);
                let mut shared = false;
                for f in fields.by_ref() {
                    if f == "-" {
                        break;
                    }
                    shared |= f.starts_with("shared:");
                }
                Some((id, (shared, fields.next()?.to_owned())))
            })
            .collect();
        Self(mounts)
    }

    fn fs_type(&self, id: u64) -> Option<&str> {
        self.0.get(&id).map(|(_, t)| t.as_str())
    }

    fn shared(&self, id: u64) -> Option<bool> {
        self.0.get(&id).map(|(s, _)| *s)
    }
}

fn err(what: &str, e: rustix::io::Errno) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Puts the calling thread in a mount namespace of its own whose mounts propagate
    /// nowhere (run as root).
    fn private_mount_namespace() {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS | nix::sched::CloneFlags::CLONE_NEWNS)
            .unwrap();
        rustix::mount::mount_change(
            "/",
            rustix::mount::MountPropagationFlags::PRIVATE
                | rustix::mount::MountPropagationFlags::REC,
        )
        .unwrap();
    }

    /// `Made::remove`, on directories made as `attach` makes them, in a mount namespace of
    /// the test's own thread (run as root).
    fn made_and_removed(after_making: impl FnOnce(&Path) + Send + 'static) -> String {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().to_owned();
        std::thread::spawn(move || {
            private_mount_namespace();
            std::fs::create_dir_all(t.join("s/x/a")).unwrap();
            let base =
                rustix::fs::open(&t, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
            let made = Made {
                base,
                names: [c"s", c"x", c"a"].map(CString::from).to_vec(),
            };
            after_making(&t);
            made.remove();
            // What is left, seen from inside the namespace (its mounts go with the thread).
            let left = std::process::Command::new("find").arg(&t).output().unwrap();
            String::from_utf8(left.stdout).unwrap()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn made_directories_are_removed_deepest_first() {
        let left = made_and_removed(|_| {});
        assert_eq!(left.lines().count(), 1, "{left}");
    }

    /// She may move things: `mv /s /old; mv /p /s` puts another mount (a `berth connect`
    /// one, whose laptop answers lookups when it likes) where a made directory was. The
    /// removal never looks up a name inside it.
    #[test]
    fn removing_made_directories_never_enters_another_mount() {
        let left = made_and_removed(|t| {
            std::fs::create_dir_all(t.join("p/x")).unwrap();
            rustix::mount::mount(
                "none",
                t.join("p/x"),
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                None,
            )
            .unwrap();
            std::fs::create_dir(t.join("p/x/a")).unwrap();
            std::fs::rename(t.join("s"), t.join("old")).unwrap();
            std::fs::rename(t.join("p"), t.join("s")).unwrap();
        });
        assert!(
            left.contains("/s/x/a\n"),
            "removed inside the other mount:\n{left}"
        );
        // Hers, moved away, are left as they are.
        assert!(left.contains("/old/x/a\n"), "{left}");
    }

    /// A mount attached through a directory's handle lands wherever that directory has been
    /// moved to meanwhile: `lands_at` tells, by the path the handle was looked up by.
    #[test]
    fn a_mount_is_found_only_where_its_path_leads() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().to_owned();
        let found = std::thread::spawn(move || {
            private_mount_namespace();
            let root = File::open(&t).unwrap();
            let proc = host_proc().unwrap();
            let names = [c"home", c"x"].map(CString::from).to_vec();
            let attach = |moved: bool| {
                std::fs::create_dir_all(t.join("home/x")).unwrap();
                let target = rustix::fs::open(
                    t.join("home/x"),
                    OFlags::PATH | OFlags::DIRECTORY,
                    Mode::empty(),
                )
                .unwrap();
                if moved {
                    // Her exchange, between the lookup and the attach.
                    std::fs::create_dir_all(t.join("other")).unwrap();
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        t.join("home/x"),
                        rustix::fs::CWD,
                        t.join("other"),
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                }
                let fs = rustix::mount::fsopen("tmpfs", rustix::mount::FsOpenFlags::FSOPEN_CLOEXEC)
                    .unwrap();
                rustix::mount::fsconfig_create(&fs).unwrap();
                let mount = rustix::mount::fsmount(
                    &fs,
                    rustix::mount::FsMountFlags::FSMOUNT_CLOEXEC,
                    rustix::mount::MountAttrFlags::empty(),
                )
                .unwrap();
                rustix::mount::move_mount(
                    &mount,
                    "",
                    &target,
                    "",
                    MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH
                        | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
                )
                .unwrap();
                let landed = lands_at(&root, &proc, &names, &mount).unwrap();
                unmount(&proc, &mount).unwrap();
                std::fs::remove_dir_all(t.join("home")).unwrap();
                let _ = std::fs::remove_dir_all(t.join("other"));
                landed
            };
            (attach(false), attach(true))
        })
        .join()
        .unwrap();
        assert_eq!(found, (true, false));
    }

    #[test]
    fn mountinfo_lines_give_type_and_propagation() {
        let text = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
40 36 0:50 / /a\\040b rw,nosuid,nodev - fuse.berth-connect berth-connect:alice rw,user_id=0
garbage
";
        let m = Mountinfo::parse(text);
        assert_eq!(m.fs_type(22), Some("proc"));
        assert_eq!(m.shared(22), Some(true));
        assert_eq!(m.fs_type(36), Some("ext3"));
        assert_eq!(m.shared(36), Some(false));
        assert_eq!(m.fs_type(40), Some("fuse.berth-connect"));
        assert_eq!(m.shared(99), None);
    }

    #[test]
    fn mount_paths_are_absolute_plain_names() {
        let names = components(Path::new("/a b/é/deep/")).unwrap();
        assert_eq!(names.len(), 3);
        assert_eq!(names[1].as_bytes(), "é".as_bytes());
        for bad in ["", "/", "a/b", "/a/../b", "/.."] {
            assert!(components(Path::new(bad)).is_err(), "{bad:?}");
        }
        // `Path::components` drops an inner `.`: the same directory.
        assert_eq!(components(Path::new("/a/./b")).unwrap().len(), 2);
        let deep = "/a".repeat(MAX_DEPTH + 1);
        assert!(components(Path::new(&deep)).is_err());
    }

    #[test]
    fn bad_source_names_are_refused_before_anything_is_opened() {
        for source in ["", "a,b", "a b", "a\0b", &"x".repeat(65)] {
            let opts = FuseOptions {
                owner: RootOwner { uid: 0, gid: 0 },
                root_perms: 0o755,
                max_read: None,
                source: source.to_owned(),
            };
            assert_eq!(
                fuse_mount(&opts).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }
}
