//! `berth-guest sftp-server`: an SFTP (version 3) server on stdin/stdout for images that
//! bring none (busybox). The daemon runs it in the container as root, so the container's
//! root *is* the filesystem it serves: no path checks are needed beyond what the kernel
//! does for root in the container. Protocol handling is russh-sftp's; this is the file
//! system side.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode, Version,
};
use russh_sftp::server::{Handler, StatusReply};

enum Open {
    /// Read and written with positioned I/O (`pread`/`pwrite`), on the runtime's own thread:
    /// page-cache I/O is microseconds, and this process serves one client.
    File(std::fs::File),
    /// A directory's entries still to hand out, a batch per READDIR (a reply must stay
    /// under the client's 256 KiB packet limit), then end of directory.
    Dir(Vec<File>),
}

/// Entries per READDIR reply, as OpenSSH's sftp-server sends.
const READDIR_BATCH: usize = 100;

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

    fn path(&self, p: &str) -> PathBuf {
        normalize(&self.cwd.join(if p.is_empty() { "." } else { p }))
    }

    fn insert(&mut self, open: Open) -> String {
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), open);
        h
    }

    fn file(&mut self, handle: &str) -> Result<&mut std::fs::File, StatusReply> {
        match self.handles.get_mut(handle) {
            Some(Open::File(f)) => Ok(f),
            _ => Err(StatusReply::new(StatusCode::Failure).with_message("bad handle")),
        }
    }
}

/// Reads one SSH `string` (u32 length, then bytes) off the front of `buf`.
fn ssh_string(buf: &mut &[u8]) -> Option<String> {
    let (len, rest) = buf.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let (s, rest) = rest.split_at_checked(len)?;
    *buf = rest;
    String::from_utf8(s.to_vec()).ok()
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

fn io(e: &std::io::Error) -> StatusReply {
    let code = match e.kind() {
        ErrorKind::NotFound => StatusCode::NoSuchFile,
        ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    StatusReply::new(code).with_message(e.to_string())
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

async fn apply(path: &Path, a: &FileAttributes) -> Result<(), StatusReply> {
    if let Some(size) = a.size {
        let f = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .map_err(|e| io(&e))?;
        f.set_len(size).await.map_err(|e| io(&e))?;
    }
    if let Some(mode) = a.permissions {
        tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
            .await
            .map_err(|e| io(&e))?;
    }
    if a.uid.is_some() || a.gid.is_some() {
        std::os::unix::fs::chown(path, a.uid, a.gid).map_err(|e| io(&e))?;
    }
    if let (Some(at), Some(mt)) = (a.atime, a.mtime) {
        let times = std::fs::FileTimes::new()
            .set_accessed(UNIX_EPOCH + Duration::from_secs(u64::from(at)))
            .set_modified(UNIX_EPOCH + Duration::from_secs(u64::from(mt)));
        std::fs::File::open(path)
            .and_then(|f| f.set_times(times))
            .map_err(|e| io(&e))?;
    }
    Ok(())
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
        // Rename that replaces the target, which sshfs and editors' "save by rename" need.
        v.extensions
            .insert("posix-rename@openssh.com".into(), "1".into());
        Ok(v)
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, Self::Error> {
        match request.as_str() {
            "posix-rename@openssh.com" => {
                let mut rest = data.as_slice();
                let (Some(old), Some(new)) = (ssh_string(&mut rest), ssh_string(&mut rest)) else {
                    return Err(StatusReply::new(StatusCode::BadMessage));
                };
                let (from, to) = (self.path(&old), self.path(&new));
                tokio::fs::rename(from, to).await.map_err(|e| io(&e))?;
                Ok(Packet::Status(ok(id)))
            }
            _ => Err(StatusReply::new(StatusCode::OpUnsupported)),
        }
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        a: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = self.path(&filename);
        let mut o = std::fs::OpenOptions::new();
        o.read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE) || pflags.contains(OpenFlags::APPEND))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(a.permissions.map_or(0o644, |m| m & 0o7777));
        if pflags.contains(OpenFlags::CREATE) {
            if pflags.contains(OpenFlags::EXCLUDE) {
                o.create_new(true);
            } else {
                o.create(true);
            }
        }
        let f = o.open(&path).map_err(|e| io(&e))?;
        Ok(Handle {
            id,
            handle: self.insert(Open::File(f)),
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::File(_)) => Ok(ok(id)),
            Some(Open::Dir(_)) => Ok(ok(id)),
            None => Err(StatusReply::new(StatusCode::Failure).with_message("bad handle")),
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
        let want = usize::try_from(len.min(256 * 1024)).unwrap_or(0);
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
        if a.uid.is_some() || a.gid.is_some() {
            std::os::unix::fs::fchown(&*f, a.uid, a.gid).map_err(|e| io(&e))?;
        }
        if let (Some(at), Some(mt)) = (a.atime, a.mtime) {
            let times = std::fs::FileTimes::new()
                .set_accessed(UNIX_EPOCH + Duration::from_secs(u64::from(at)))
                .set_modified(UNIX_EPOCH + Duration::from_secs(u64::from(mt)));
            f.set_times(times).map_err(|e| io(&e))?;
        }
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let dir = self.path(&path);
        let mut rd = tokio::fs::read_dir(&dir).await.map_err(|e| io(&e))?;
        let mut files = Vec::new();
        for name in [".", ".."] {
            if let Ok(meta) = tokio::fs::metadata(dir.join(name)).await {
                files.push(File::new(name, attrs(&meta)));
            }
        }
        while let Some(entry) = rd.next_entry().await.map_err(|e| io(&e))? {
            if let Ok(meta) = entry.metadata().await {
                files.push(File::new(entry.file_name().to_string_lossy(), attrs(&meta)));
            }
        }
        Ok(Handle {
            id,
            handle: {
                files.reverse(); // handed out from the end
                self.insert(Open::Dir(files))
            },
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir(entries)) if !entries.is_empty() => {
                let at = entries.len().saturating_sub(READDIR_BATCH);
                let mut files = entries.split_off(at);
                files.reverse();
                Ok(Name { id, files })
            }
            Some(Open::Dir(_)) => Err(StatusReply::new(StatusCode::Eof)),
            _ => Err(StatusReply::new(StatusCode::Failure).with_message("bad handle")),
        }
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
        let p = self.path(&path);
        tokio::fs::create_dir(&p).await.map_err(|e| io(&e))?;
        if let Some(mode) = a.permissions {
            let _ = tokio::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o7777))
                .await;
        }
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
        let real = tokio::fs::canonicalize(&p).await.unwrap_or(p);
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
            return Err(StatusReply::new(StatusCode::Failure).with_message("target exists"));
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
        let stream = Ended {
            io: tokio::io::join(stdin(), stdout()),
            _done: done_tx,
        };
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

/// A stream that reports, by being dropped, that the SFTP server is done with it.
struct Ended<S> {
    io: S,
    _done: tokio::sync::oneshot::Sender<()>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Ended<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
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
