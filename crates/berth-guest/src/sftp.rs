//! `berth-guest sftp-server`: an SFTP (version 3) server on stdin/stdout for images that
//! bring none (busybox). The daemon runs it in the container as root, so the container's
//! root *is* the filesystem it serves: no path checks are needed beyond what the kernel
//! does for root in the container. Protocol handling is russh-sftp's; this is the file
//! system side.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status,
    StatusCode, Version,
};
use russh_sftp::server::{Handler, StatusReply};

enum Open {
    /// Read and written with positioned I/O (`pread`/`pwrite`), on the runtime's own thread:
    /// page-cache I/O is microseconds, and this process serves one client. The path is kept
    /// for `copy-data`, which refuses to copy a file onto itself.
    File {
        file: std::fs::File,
        path: PathBuf,
        append: bool,
    },
    /// A directory being listed: read from the kernel a batch per READDIR (a reply must stay
    /// under the client's 256 KiB packet limit), so a huge directory is never held whole.
    Dir {
        path: PathBuf,
        entries: std::fs::ReadDir,
        /// `.` and `..` first, as `readdir(3)` gives them to OpenSSH's server.
        dots: Vec<&'static str>,
        names: Names,
    },
}

/// Entries per READDIR reply, as OpenSSH's sftp-server sends.
const READDIR_BATCH: usize = 100;
/// The largest packet this server takes or sends, as OpenSSH's (`SFTP_MAX_MSG_LENGTH`).
const MAX_MSG: u64 = 256 * 1024;
/// The READ and WRITE lengths it advertises (`limits@openssh.com`). OpenSSH's server offers
/// 255 KiB and its client then sends writes that large; this server (russh-sftp, one packet
/// at a time) moves data faster in 32 KiB requests, the client's own default without the
/// extension (measured with `scripts/bench --only transfer`: 1 GiB by scp into busybox at
/// 0.83-0.98x of OpenSSH's with 255 KiB, 1.10x with 32 KiB). Larger requests are still
/// served (a READ up to 256 KiB).
const MAX_RW: u64 = 32 * 1024;
/// `/etc/passwd` or `/etc/group` bigger than this is not read (names fall back to numbers).
const MAX_ID_FILE: u64 = 1 << 20;

/// The extensions announced in SSH_FXP_VERSION, with the versions OpenSSH's server gives.
const EXTENSIONS: &[(&str, &str)] = &[
    ("posix-rename@openssh.com", "1"),
    ("statvfs@openssh.com", "2"),
    ("fstatvfs@openssh.com", "2"),
    ("hardlink@openssh.com", "1"),
    ("fsync@openssh.com", "1"),
    ("lsetstat@openssh.com", "1"),
    ("limits@openssh.com", "1"),
    ("expand-path@openssh.com", "1"),
    ("copy-data", "1"),
    ("home-directory", "1"),
    ("users-groups-by-id@openssh.com", "1"),
];

/// User and group names from the container's own `/etc/passwd` and `/etc/group` (this
/// helper is static, so glibc's NSS is not available, and the container's files are the
/// truth for its users anyway).
#[derive(Default, Clone)]
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    homes: HashMap<String, String>,
}

impl Names {
    fn load() -> Self {
        let mut n = Self::default();
        for fields in id_file("/etc/passwd") {
            if let (Some(name), Some(uid)) = (fields.first(), fields.get(2)) {
                if let Ok(uid) = uid.parse() {
                    n.users.entry(uid).or_insert_with(|| name.clone());
                }
                if let Some(home) = fields.get(5) {
                    n.homes.entry(name.clone()).or_insert_with(|| home.clone());
                }
            }
        }
        for fields in id_file("/etc/group") {
            if let (Some(name), Some(Ok(gid))) = (fields.first(), fields.get(2).map(|g| g.parse()))
            {
                n.groups.entry(gid).or_insert_with(|| name.clone());
            }
        }
        n
    }
}

/// The `:`-separated lines of a passwd-format file, or none when it is missing or too big.
fn id_file(path: &str) -> Vec<Vec<String>> {
    use std::io::Read;
    let mut text = String::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_ID_FILE).read_to_string(&mut text));
    if read.is_err() {
        return Vec::new();
    }
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_owned).collect())
        .collect()
}

pub struct Sftp {
    cwd: PathBuf,
    handles: HashMap<String, Open>,
    next: u64,
}

impl Sftp {
    pub fn new() -> Self {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        Self {
            cwd,
            handles: HashMap::new(),
            next: 0,
        }
    }

    /// `p` from the working directory, as the kernel will resolve it (`link/..` is where
    /// the link's target's parent is, as for OpenSSH's server: not taken apart as text).
    fn path(&self, p: &str) -> PathBuf {
        self.cwd.join(if p.is_empty() { "." } else { p })
    }

    fn insert(&mut self, open: Open) -> String {
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), open);
        h
    }

    /// `copy-data`: `read_len` bytes (0: to the end) of one open file at `read_off` into
    /// another at `write_off` (at its end when opened for append), on the server's side.
    fn copy_data(
        &self,
        from: &str,
        mut read_off: u64,
        read_len: u64,
        to: &str,
        mut write_off: u64,
    ) -> Result<(), StatusReply> {
        let (
            Some(Open::File {
                file: src,
                path: src_path,
                ..
            }),
            Some(Open::File {
                file: dst,
                path: dst_path,
                append,
            }),
        ) = (self.handles.get(from), self.handles.get(to))
        else {
            return Err(status(StatusCode::Failure));
        };
        if from == to || src_path == dst_path {
            return Err(status(StatusCode::Failure));
        }
        let until_eof = read_len == 0;
        let mut left = if until_eof {
            u64::MAX - read_off
        } else {
            read_len
        };
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            let n = src.read_at(chunk, read_off).map_err(|e| io(&e))?;
            if n == 0 {
                return if until_eof {
                    Ok(())
                } else {
                    Err(status(StatusCode::Eof))
                };
            }
            let data = chunk.get(..n).unwrap_or_default();
            if *append {
                use std::io::Write;
                (&*dst).write_all(data)
            } else {
                dst.write_all_at(data, write_off)
            }
            .map_err(|e| io(&e))?;
            read_off += n as u64;
            write_off += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    fn file(&mut self, handle: &str) -> Result<&mut std::fs::File, StatusReply> {
        match self.handles.get_mut(handle) {
            Some(Open::File { file, .. }) => Ok(file),
            _ => Err(status(StatusCode::Failure)),
        }
    }
}

/// Reads one SSH `string` as raw bytes off the front of `buf`.
fn ssh_bytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = buf.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let (s, rest) = rest.split_at_checked(len)?;
    *buf = rest;
    Some(s)
}

/// Reads one SSH `string` (u32 length, then bytes) off the front of `buf`.
fn ssh_string(buf: &mut &[u8]) -> Option<String> {
    let (len, rest) = buf.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let (s, rest) = rest.split_at_checked(len)?;
    *buf = rest;
    String::from_utf8(s.to_vec()).ok()
}

fn ssh_u64(buf: &mut &[u8]) -> Option<u64> {
    let (n, rest) = buf.split_first_chunk::<8>()?;
    *buf = rest;
    Some(u64::from_be_bytes(*n))
}

fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s);
}

/// The text OpenSSH's server sends with each status code.
fn message(code: StatusCode) -> &'static str {
    match code {
        StatusCode::Ok => "Success",
        StatusCode::Eof => "End of file",
        StatusCode::NoSuchFile => "No such file",
        StatusCode::PermissionDenied => "Permission denied",
        StatusCode::Failure => "Failure",
        StatusCode::BadMessage => "Bad message",
        StatusCode::NoConnection => "No connection",
        StatusCode::ConnectionLost => "Connection lost",
        StatusCode::OpUnsupported => "Operation unsupported",
    }
}

fn status(code: StatusCode) -> StatusReply {
    StatusReply::new(code).with_message(message(code))
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: message(StatusCode::Ok).into(),
        language_tag: "en-US".into(),
    }
}

/// errno to SFTP status, as OpenSSH's `errno_to_portable`.
fn io(e: &std::io::Error) -> StatusReply {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::EBADF | libc::ELOOP) => StatusCode::NoSuchFile,
        Some(libc::EPERM | libc::EACCES | libc::EFAULT) => StatusCode::PermissionDenied,
        Some(libc::ENAMETOOLONG | libc::EINVAL) => StatusCode::BadMessage,
        Some(libc::ENOSYS) => StatusCode::OpUnsupported,
        Some(_) => StatusCode::Failure,
        None => match e.kind() {
            ErrorKind::NotFound => StatusCode::NoSuchFile,
            ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
            _ => StatusCode::Failure,
        },
    };
    status(code)
}

fn nix_io(e: nix::errno::Errno) -> StatusReply {
    io(&std::io::Error::from(e))
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn attrs(meta: &std::fs::Metadata) -> FileAttributes {
    let mut a = FileAttributes::from(meta);
    // Keep the real file type (symlinks, devices) that the conversion flattens.
    a.permissions = Some(meta.mode());
    a
}

/// `ls -l`'s mode column, as BSD `strmode` (which OpenSSH's server uses) without its
/// trailing space.
fn strmode(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let bit = |b: u32, c: char| if mode & b != 0 { c } else { '-' };
    let special = |x: u32, s: u32, on: char, off: char| match (mode & x != 0, mode & s != 0) {
        (true, true) => on,
        (false, true) => off,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T'),
    ]
    .iter()
    .collect()
}

/// The long name of a directory entry, formatted as OpenSSH's server formats it
/// (`ls_file`): mode, link count, owner and group names (numbers when unknown), size, and
/// the date as `ls` shows it, time of day within six months, the year otherwise.
fn longname(name: &str, meta: &std::fs::Metadata, names: &Names, now: i64) -> String {
    let user = names
        .users
        .get(&meta.uid())
        .cloned()
        .unwrap_or_else(|| meta.uid().to_string());
    let group = names
        .groups
        .get(&meta.gid())
        .cloned()
        .unwrap_or_else(|| meta.gid().to_string());
    let mtime = meta.mtime();
    let when = chrono::DateTime::from_timestamp(mtime, 0)
        .map(|t| t.with_timezone(&chrono::Local))
        .map(|t| {
            if now - 365 * 24 * 60 * 60 / 2 < mtime && now >= mtime {
                t.format("%b %e %H:%M").to_string()
            } else {
                t.format("%b %e  %Y").to_string()
            }
        })
        .unwrap_or_default();
    format!(
        "{} {:>3} {:<8} {:<8} {:>8} {} {}",
        strmode(meta.mode()),
        meta.nlink(),
        user,
        group,
        meta.size(),
        when,
        name
    )
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn file_times(a: &FileAttributes) -> Option<std::fs::FileTimes> {
    let (at, mt) = (a.atime?, a.mtime?);
    Some(
        std::fs::FileTimes::new()
            .set_accessed(UNIX_EPOCH + Duration::from_secs(u64::from(at)))
            .set_modified(UNIX_EPOCH + Duration::from_secs(u64::from(mt))),
    )
}

/// SETSTAT: size, mode, times, then owner, in OpenSSH's order (following symlinks). By path,
/// as OpenSSH's `truncate` and `utimes`: the file is never opened (a FIFO's open would wait
/// for a writer, and this server answers one request at a time; a device's would run its
/// driver).
async fn apply(path: &Path, a: &FileAttributes) -> Result<(), StatusReply> {
    if let Some(size) = a.size {
        let size = i64::try_from(size).map_err(|_| status(StatusCode::BadMessage))?;
        nix::unistd::truncate(path, size).map_err(nix_io)?;
    }
    if let Some(mode) = a.permissions {
        tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
            .await
            .map_err(|e| io(&e))?;
    }
    if let (Some(at), Some(mt)) = (a.atime, a.mtime) {
        let ts = |s: u32| nix::sys::time::TimeSpec::new(i64::from(s), 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &ts(at),
            &ts(mt),
            nix::sys::stat::UtimensatFlags::FollowSymlink,
        )
        .map_err(nix_io)?;
    }
    if a.uid.is_some() || a.gid.is_some() {
        std::os::unix::fs::chown(path, a.uid, a.gid).map_err(|e| io(&e))?;
    }
    Ok(())
}

/// `lsetstat@openssh.com`: as SETSTAT on the link itself; a size is a bad message.
fn apply_nofollow(path: &Path, a: &FileAttributes) -> Result<(), StatusReply> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags, fchmodat, utimensat};
    use nix::sys::time::TimeSpec;
    if a.size.is_some() {
        return Err(status(StatusCode::BadMessage));
    }
    let mut result = Ok(());
    if let Some(mode) = a.permissions
        && let Err(e) = fchmodat(
            nix::fcntl::AT_FDCWD,
            path,
            Mode::from_bits_truncate(mode & 0o7777),
            FchmodatFlags::NoFollowSymlink,
        )
    {
        result = Err(nix_io(e));
    }
    if let (Some(at), Some(mt)) = (a.atime, a.mtime) {
        let ts = |s: u32| TimeSpec::new(i64::from(s), 0);
        if let Err(e) = utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &ts(at),
            &ts(mt),
            UtimensatFlags::NoFollowSymlink,
        ) {
            result = Err(nix_io(e));
        }
    }
    if (a.uid.is_some() || a.gid.is_some())
        && let Err(e) = nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            a.uid.map(nix::unistd::Uid::from_raw),
            a.gid.map(nix::unistd::Gid::from_raw),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    {
        result = Err(nix_io(e));
    }
    result
}

/// The SSH_FXP_EXTENDED_REPLY of `statvfs@openssh.com` and `fstatvfs@openssh.com`.
fn statvfs_reply(id: u32, st: &nix::sys::statvfs::Statvfs) -> Packet {
    use nix::sys::statvfs::FsFlags;
    let mut flag = 0;
    if st.flags().contains(FsFlags::ST_RDONLY) {
        flag |= 1;
    }
    if st.flags().contains(FsFlags::ST_NOSUID) {
        flag |= 2;
    }
    let mut data = Vec::with_capacity(88);
    #[allow(
        clippy::useless_conversion,
        reason = "the field types differ between targets"
    )]
    for n in [
        u64::from(st.block_size()),
        u64::from(st.fragment_size()),
        u64::from(st.blocks()),
        u64::from(st.blocks_free()),
        u64::from(st.blocks_available()),
        u64::from(st.files()),
        u64::from(st.files_free()),
        u64::from(st.files_available()),
        u64::from(st.filesystem_id()),
        flag,
        u64::from(st.name_max()),
    ] {
        put_u64(&mut data, n);
    }
    Packet::ExtendedReply(ExtendedReply { id, data })
}

/// A Name reply with one entry and no attributes (REALPATH's shape).
fn one_name(id: u32, path: &Path) -> Packet {
    Packet::Name(Name {
        id,
        files: vec![File::dummy(path.to_string_lossy())],
    })
}

impl Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        let mut v = Version::new();
        for (name, version) in EXTENSIONS {
            v.extensions.insert((*name).into(), (*version).into());
        }
        Ok(v)
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, Self::Error> {
        let mut rest = data.as_slice();
        let bad = || status(StatusCode::BadMessage);
        match request.as_str() {
            // POSIX rename: replaces the target (sshfs and editors' "save by rename").
            "posix-rename@openssh.com" | "hardlink@openssh.com" => {
                let (Some(old), Some(new)) = (ssh_string(&mut rest), ssh_string(&mut rest)) else {
                    return Err(bad());
                };
                let (from, to) = (self.path(&old), self.path(&new));
                if request.starts_with("posix-rename") {
                    tokio::fs::rename(from, to).await
                } else {
                    tokio::fs::hard_link(from, to).await
                }
                .map_err(|e| io(&e))?;
                Ok(Packet::Status(ok(id)))
            }
            "statvfs@openssh.com" => {
                let path = ssh_string(&mut rest).ok_or_else(bad)?;
                let st = nix::sys::statvfs::statvfs(&self.path(&path)).map_err(nix_io)?;
                Ok(statvfs_reply(id, &st))
            }
            "fstatvfs@openssh.com" => {
                let handle = ssh_string(&mut rest).ok_or_else(bad)?;
                let st = match self.handles.get(&handle) {
                    Some(Open::File { file, .. }) => nix::sys::statvfs::fstatvfs(file),
                    Some(Open::Dir { path, .. }) => nix::sys::statvfs::statvfs(path.as_path()),
                    None => return Err(status(StatusCode::Failure)),
                }
                .map_err(nix_io)?;
                Ok(statvfs_reply(id, &st))
            }
            "fsync@openssh.com" => {
                let handle = ssh_string(&mut rest).ok_or_else(bad)?;
                match self.handles.get(&handle) {
                    Some(Open::File { file, .. }) => file.sync_all().map_err(|e| io(&e))?,
                    Some(Open::Dir { .. }) => return Err(status(StatusCode::OpUnsupported)),
                    None => return Err(status(StatusCode::NoSuchFile)),
                }
                Ok(Packet::Status(ok(id)))
            }
            "lsetstat@openssh.com" => {
                let path = ssh_string(&mut rest).ok_or_else(bad)?;
                let mut attrs = bytes::Bytes::copy_from_slice(rest);
                let a: FileAttributes =
                    russh_sftp::de::from_bytes(&mut attrs).map_err(|_| bad())?;
                apply_nofollow(&self.path(&path), &a)?;
                Ok(Packet::Status(ok(id)))
            }
            "limits@openssh.com" => {
                let nofile =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                        .map_or(0, |(soft, _)| soft.saturating_sub(5));
                let mut data = Vec::with_capacity(32);
                for n in [MAX_MSG, MAX_RW, MAX_RW, nofile] {
                    put_u64(&mut data, n);
                }
                Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
            }
            "expand-path@openssh.com" => {
                let path = ssh_string(&mut rest).ok_or_else(bad)?;
                let expanded = if path.is_empty() || path == "~" {
                    self.cwd.clone()
                } else if let Some(tail) = path.strip_prefix("~/") {
                    self.cwd.join(tail)
                } else if let Some(tilde) = path.strip_prefix('~') {
                    let (user, tail) = tilde.split_once('/').unwrap_or((tilde, ""));
                    let Some(home) = Names::load().homes.remove(user) else {
                        return Err(
                            StatusReply::new(StatusCode::NoSuchFile).with_message("no such user")
                        );
                    };
                    Path::new(&home).join(tail)
                } else {
                    self.cwd.join(&path)
                };
                let real = tokio::fs::canonicalize(&expanded)
                    .await
                    .map_err(|e| io(&e))?;
                Ok(one_name(id, &real))
            }
            "home-directory" => {
                let user = ssh_string(&mut rest).ok_or_else(bad)?;
                let home = Names::load()
                    .homes
                    .remove(&user)
                    .ok_or_else(|| status(StatusCode::Failure))?;
                Ok(one_name(id, Path::new(&home)))
            }
            "users-groups-by-id@openssh.com" => {
                let (Some(uids), Some(gids)) = (ssh_bytes(&mut rest), ssh_bytes(&mut rest)) else {
                    return Err(bad());
                };
                if uids.len() % 4 != 0 || gids.len() % 4 != 0 {
                    return Err(bad());
                }
                let names = Names::load();
                let list = |ids: &[u8], map: &HashMap<u32, String>| {
                    let mut out = Vec::new();
                    for id in ids.chunks_exact(4) {
                        let id = id.try_into().map_or(u32::MAX, u32::from_be_bytes);
                        put_string(&mut out, map.get(&id).map_or(&b""[..], |n| n.as_bytes()));
                    }
                    out
                };
                let mut data = Vec::new();
                put_string(&mut data, &list(uids, &names.users));
                put_string(&mut data, &list(gids, &names.groups));
                Ok(Packet::ExtendedReply(ExtendedReply { id, data }))
            }
            "copy-data" => {
                let (Some(from), Some(read_off), Some(read_len), Some(to), Some(write_off)) = (
                    ssh_string(&mut rest),
                    ssh_u64(&mut rest),
                    ssh_u64(&mut rest),
                    ssh_string(&mut rest),
                    ssh_u64(&mut rest),
                ) else {
                    return Err(bad());
                };
                self.copy_data(&from, read_off, read_len, &to, write_off)?;
                Ok(Packet::Status(ok(id)))
            }
            _ => Err(status(StatusCode::OpUnsupported)),
        }
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        a: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        use nix::fcntl::OFlag;
        let path = self.path(&filename);
        let append = pflags.contains(OpenFlags::APPEND);
        // The flags as OpenSSH's server maps them, straight to open(2): any mix the kernel
        // takes is taken (std's OpenOptions refuses some, such as append with truncate).
        let mut flags = match (
            pflags.contains(OpenFlags::READ),
            pflags.contains(OpenFlags::WRITE),
        ) {
            (true, true) => OFlag::O_RDWR,
            (false, true) => OFlag::O_WRONLY,
            _ => OFlag::O_RDONLY,
        } | OFlag::O_CLOEXEC;
        for (theirs, ours) in [
            (OpenFlags::APPEND, OFlag::O_APPEND),
            (OpenFlags::CREATE, OFlag::O_CREAT),
            (OpenFlags::TRUNCATE, OFlag::O_TRUNC),
            (OpenFlags::EXCLUDE, OFlag::O_EXCL),
        ] {
            if pflags.contains(theirs) {
                flags |= ours;
            }
        }
        // The client's mode or 0666; the umask applies, as for OpenSSH.
        let mode =
            nix::sys::stat::Mode::from_bits_truncate(a.permissions.map_or(0o666, |m| m & 0o7777));
        let file = std::fs::File::from(nix::fcntl::open(&path, flags, mode).map_err(nix_io)?);
        Ok(Handle {
            id,
            handle: self.insert(Open::File { file, path, append }),
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(status(StatusCode::Failure)),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let f = self.file(&handle)?;
        // As OpenSSH's server: a reply (the data and 13 bytes about it) stays within the
        // packet size both ends take.
        let want = usize::try_from(u64::from(len).min(MAX_MSG - 1024)).unwrap_or(0);
        let mut data = vec![0u8; want];
        let mut got = 0;
        while got < want {
            let n = f
                .read_at(data.get_mut(got..).unwrap_or_default(), offset + got as u64)
                .map_err(|e| io(&e))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 && want > 0 {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        data.truncate(got);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let f = self.file(&handle)?;
        f.write_all_at(&data, offset).map_err(|e| io(&e))?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = tokio::fs::symlink_metadata(self.path(&path))
            .await
            .map_err(|e| io(&e))?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = tokio::fs::metadata(self.path(&path))
            .await
            .map_err(|e| io(&e))?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let meta = self.file(&handle)?.metadata().map_err(|e| io(&e))?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        a: FileAttributes,
    ) -> Result<Status, Self::Error> {
        apply(&self.path(&path), &a).await.map(|()| ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        a: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let f = self.file(&handle)?;
        if let Some(size) = a.size {
            f.set_len(size).map_err(|e| io(&e))?;
        }
        if let Some(mode) = a.permissions {
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| io(&e))?;
        }
        if let Some(times) = file_times(&a) {
            f.set_times(times).map_err(|e| io(&e))?;
        }
        if a.uid.is_some() || a.gid.is_some() {
            std::os::unix::fs::fchown(&*f, a.uid, a.gid).map_err(|e| io(&e))?;
        }
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let path = self.path(&path);
        let entries = std::fs::read_dir(&path).map_err(|e| io(&e))?;
        let handle = self.insert(Open::Dir {
            path,
            entries,
            dots: vec!["..", "."],
            names: Names::load(),
        });
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Dir {
            path,
            entries,
            dots,
            names,
        }) = self.handles.get_mut(&handle)
        else {
            return Err(status(StatusCode::Failure));
        };
        let now = unix_now();
        let mut files = Vec::new();
        while files.len() < READDIR_BATCH {
            let (name, meta) = if let Some(dot) = dots.pop() {
                match std::fs::symlink_metadata(path.join(dot)) {
                    Ok(m) => (dot.to_owned(), m),
                    Err(_) => continue,
                }
            } else {
                match entries.next() {
                    None => break,
                    Some(Err(e)) => return Err(io(&e)),
                    Some(Ok(entry)) => match entry.metadata() {
                        Ok(m) => (entry.file_name().to_string_lossy().into_owned(), m),
                        // Gone since the directory was read.
                        Err(_) => continue,
                    },
                }
            };
            let mut file = File::new(name.as_str(), attrs(&meta));
            file.longname = longname(&name, &meta, names, now);
            files.push(file);
        }
        if files.is_empty() {
            return Err(status(StatusCode::Eof));
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        tokio::fs::remove_file(self.path(&filename))
            .await
            .map_err(|e| io(&e))
            .map(|()| ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        a: FileAttributes,
    ) -> Result<Status, Self::Error> {
        // As mkdir(2) with the client's mode or 0777; the umask applies, as for OpenSSH.
        std::fs::DirBuilder::new()
            .mode(a.permissions.map_or(0o777, |m| m & 0o7777))
            .create(self.path(&path))
            .map_err(|e| io(&e))?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        tokio::fs::remove_dir(self.path(&path))
            .await
            .map_err(|e| io(&e))
            .map(|()| ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = self.path(&path);
        let real = match tokio::fs::canonicalize(&p).await {
            Ok(real) => real,
            // Not there (yet): as a name, taken apart as text.
            Err(_) => normalize(&p),
        };
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        let (from, to) = (self.path(&oldpath), self.path(&newpath));
        // SFTP v3 rename does not replace an existing file.
        if tokio::fs::symlink_metadata(&to).await.is_ok() {
            return Err(status(StatusCode::Failure));
        }
        tokio::fs::rename(from, to)
            .await
            .map_err(|e| io(&e))
            .map(|()| ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = tokio::fs::read_link(self.path(&path))
            .await
            .map_err(|e| io(&e))?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        // OpenSSH sends the two paths in the reverse of the draft's order (target first);
        // its clients and server agree on that, and so does this server.
        let (target, link) = (linkpath, self.path(&targetpath));
        tokio::fs::symlink(target, link)
            .await
            .map_err(|e| io(&e))
            .map(|()| ok(id))
    }
}

/// Serves SFTP on stdin/stdout until the client closes it.
pub fn run() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth-guest sftp-server: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let stream = Ended::new(tokio::io::join(stdin(), stdout()), done_tx);
        russh_sftp::server::run(stream, Sftp::new()).await;
        // The server task drops the stream when the client is gone.
        let _ = done_rx.await;
    });
    std::process::ExitCode::SUCCESS
}

/// Standard input, read without a thread hop per read when it is a pipe (as a `docker exec`
/// gives it); tokio's `stdin()` otherwise.
fn stdin() -> std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>> {
    use std::os::fd::AsFd;
    std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
        .map_or_else(
            || Box::pin(tokio::io::stdin()) as std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
            |r| Box::pin(r),
        )
}

/// Standard output, likewise.
fn stdout() -> std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>> {
    use std::os::fd::AsFd;
    std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| tokio::net::unix::pipe::Sender::from_owned_fd(fd).ok())
        .map_or_else(
            || {
                Box::pin(tokio::io::stdout())
                    as std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>
            },
            |w| Box::pin(w),
        )
}

/// A stream that reports, by being dropped, that the SFTP server is done with it; and that
/// ends, as OpenSSH's server does, at a packet longer than [`MAX_MSG`]. (russh-sftp refuses
/// such a packet's length but goes on reading where its body starts, so the body's bytes,
/// a file's being written, would be read as requests.)
struct Ended<S> {
    io: S,
    _done: tokio::sync::oneshot::Sender<()>,
    frames: Frames,
}

impl<S> Ended<S> {
    fn new(io: S, done: tokio::sync::oneshot::Sender<()>) -> Self {
        Self {
            io,
            _done: done,
            frames: Frames::default(),
        }
    }
}

/// Where the client's stream is among its packets (`uint32` length, then that many bytes).
#[derive(Debug, Default)]
struct Frames {
    /// The length's bytes read so far, and how many.
    length: [u8; 4],
    have: usize,
    /// Body bytes still to come.
    body: u64,
    /// A packet too long was seen: the stream ends there.
    ended: bool,
}

impl Frames {
    /// Follows `bytes`, read next; the count of them to pass on (all, or those before the
    /// length of a packet too long, after which the stream has ended).
    fn follow(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.body > 0 {
                let take = usize::try_from(self.body)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                self.body -= take as u64;
                i += take;
                continue;
            }
            if let (Some(slot), Some(&b)) = (self.length.get_mut(self.have), bytes.get(i)) {
                *slot = b;
            }
            self.have += 1;
            i += 1;
            if self.have == 4 {
                self.have = 0;
                let len = u64::from(u32::from_be_bytes(self.length));
                if len > MAX_MSG {
                    self.ended = true;
                    // This length's bytes in `bytes`, and all after, are not passed on.
                    return i.saturating_sub(4);
                }
                self.body = len;
            }
        }
        bytes.len()
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Ended<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.frames.ended {
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        std::task::ready!(std::pin::Pin::new(&mut self.io).poll_read(cx, buf))?;
        let pass = self
            .frames
            .follow(buf.filled().get(before..).unwrap_or_default());
        buf.set_filled(before + pass);
        std::task::Poll::Ready(Ok(()))
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Ended<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_stream_ends_at_a_packet_too_long_whatever_the_reads() {
        let mut stream = Vec::new();
        for body in [&b"\x01abc"[..], &vec![7u8; 40_000]] {
            stream.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
            stream.extend_from_slice(body);
        }
        let good = stream.len();
        stream.extend_from_slice(&(300u32 * 1024).to_be_bytes());
        stream.extend_from_slice(&[9u8; 64]);
        // In reads of every size from 1 to 7 bytes, and whole.
        for chunk in (1..8).chain([stream.len()]) {
            let mut f = Frames::default();
            let mut passed = 0;
            for piece in stream.chunks(chunk) {
                if f.ended {
                    break;
                }
                passed += f.follow(piece);
            }
            assert!(f.ended, "chunk {chunk}");
            // The good packets and nothing of the long one's length but what came before
            // its read: at most 3 of its 4 bytes.
            assert!(
                passed >= good && passed < good + 4,
                "chunk {chunk}: {passed}"
            );
        }
    }

    #[tokio::test]
    async fn the_server_ends_at_a_packet_too_long() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        russh_sftp::server::run(Ended::new(server, done_tx), Sftp::new()).await;
        // A WRITE-sized packet past the limit, whose "body" is a run of valid requests
        // (here: INIT), as a file's bytes could be.
        let mut init = Vec::new();
        init.extend_from_slice(&5u32.to_be_bytes());
        init.push(1);
        init.extend_from_slice(&3u32.to_be_bytes());
        let mut packet = (300u32 * 1024).to_be_bytes().to_vec();
        for _ in 0..(300 * 1024 / init.len()) {
            packet.extend_from_slice(&init);
        }
        client.write_all(&packet).await.unwrap();
        // The server ends without a word (it read none of those INITs).
        tokio::time::timeout(std::time::Duration::from_secs(10), done_rx)
            .await
            .expect("the server went on")
            .ok();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            client.read_to_end(&mut out),
        )
        .await;
        assert!(out.is_empty(), "answered {} bytes", out.len());
    }

    /// SETSTAT of a FIFO nobody writes to: answered at once (its open would wait for a
    /// writer, holding the whole server).
    #[tokio::test]
    async fn setstat_never_opens_the_file() {
        let dir = std::env::temp_dir().join(format!("berth-sftp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("p");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let within = |f| tokio::time::timeout(std::time::Duration::from_secs(5), f);
        let times = FileAttributes {
            atime: Some(1_000_000),
            mtime: Some(2_000_000),
            ..FileAttributes::empty()
        };
        within(apply(&fifo, &times))
            .await
            .expect("the times waited on the FIFO")
            .unwrap();
        let meta = std::fs::metadata(&fifo).unwrap();
        assert_eq!(meta.mtime(), 2_000_000);
        let size = FileAttributes {
            size: Some(0),
            ..FileAttributes::empty()
        };
        // A FIFO has no size to set: refused, at once.
        assert!(
            within(apply(&fifo, &size))
                .await
                .expect("the size waited on the FIFO")
                .is_err()
        );
        // A file's size and times, as before.
        let file = dir.join("f");
        std::fs::write(&file, b"0123456789").unwrap();
        let both = FileAttributes {
            size: Some(4),
            atime: Some(1_000_000),
            mtime: Some(2_000_000),
            ..FileAttributes::empty()
        };
        apply(&file, &both).await.unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"0123");
        assert_eq!(std::fs::metadata(&file).unwrap().mtime(), 2_000_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Open flags go to open(2) as OpenSSH's server gives them, and paths are the kernel's
    /// to resolve (`..` after a symlink is the target's parent).
    #[tokio::test]
    async fn opens_take_what_open_takes_and_paths_are_resolved_by_the_kernel() {
        use russh_sftp::server::Handler;
        let dir = std::env::temp_dir().join(format!("berth-sftp-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::create_dir_all(dir.join("home")).unwrap();
        std::fs::write(dir.join("a/f"), b"in a").unwrap();
        std::fs::write(dir.join("home/f"), b"in home").unwrap();
        std::os::unix::fs::symlink(dir.join("a/b"), dir.join("home/link")).unwrap();
        let mut s = Sftp::new();
        s.cwd = dir.join("home");
        let none = FileAttributes::empty();
        // Append with truncate, and create without write: both taken by open(2).
        std::fs::write(dir.join("home/g"), b"old").unwrap();
        let h = s
            .open(
                1,
                "g".into(),
                OpenFlags::WRITE | OpenFlags::APPEND | OpenFlags::TRUNCATE,
                none.clone(),
            )
            .await
            .unwrap();
        s.close(2, h.handle).await.unwrap();
        assert_eq!(std::fs::read(dir.join("home/g")).unwrap(), b"");
        let h = s
            .open(
                3,
                "new".into(),
                OpenFlags::READ | OpenFlags::CREATE,
                none.clone(),
            )
            .await
            .unwrap();
        s.close(4, h.handle).await.unwrap();
        assert!(dir.join("home/new").exists());
        // `link/../f` is a/f, as the kernel (and OpenSSH's server) has it; not home/f.
        let h = s
            .open(5, "link/../f".into(), OpenFlags::READ, none)
            .await
            .unwrap();
        let data = s.read(6, h.handle.clone(), 0, 100).await.unwrap();
        assert_eq!(data.data, b"in a");
        s.close(7, h.handle).await.unwrap();
        let real = s.realpath(8, "link/../f".into()).await.unwrap();
        assert_eq!(real.files[0].filename, dir.join("a/f").to_string_lossy());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strmode_is_bsd_strmode() {
        assert_eq!(strmode(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(strmode(libc::S_IFDIR | 0o1777), "drwxrwxrwt");
        assert_eq!(strmode(libc::S_IFDIR | 0o1770), "drwxrwx--T");
        assert_eq!(strmode(libc::S_IFREG | 0o4755), "-rwsr-xr-x");
        assert_eq!(strmode(libc::S_IFREG | 0o6644), "-rwSr-Sr--");
        assert_eq!(strmode(libc::S_IFLNK | 0o777), "lrwxrwxrwx");
        assert_eq!(strmode(libc::S_IFIFO | 0o600), "prw-------");
    }

    #[test]
    fn longname_is_formatted_as_openssh_formats_it() {
        let dir = std::env::temp_dir().join(format!("berth-sftp-ln-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("old name");
        std::fs::write(&f, b"an old file\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::hard_link(&f, dir.join("link")).unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_577_934_240); // 2020-01-02 03:04 UTC
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_modified(t))
            .unwrap();
        let meta = std::fs::symlink_metadata(&f).unwrap();
        let mut names = Names::default();
        names.users.insert(meta.uid(), "someone".into());
        let now = 1_577_934_240 + 24 * 60 * 60;
        let group = meta.gid().to_string();
        // Within six months: the time of day (in local time, as `ls`); the year otherwise.
        let recent = longname("old name", &meta, &names, now);
        let local = chrono::DateTime::from_timestamp(1_577_934_240, 0)
            .unwrap()
            .with_timezone(&chrono::Local);
        assert_eq!(
            recent,
            format!(
                "-rw-r-----   2 someone  {group:<8}       12 {} old name",
                local.format("%b %e %H:%M")
            )
        );
        let old = longname("old name", &meta, &names, now + 365 * 24 * 60 * 60);
        assert!(
            old.ends_with(&format!("{}  2020 old name", local.format("%b %e"))),
            "{old}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
