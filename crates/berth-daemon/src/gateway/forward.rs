//! The forwarding kinds, each confined to the user's own container: `-L` and `-R` to TCP
//! ports (made in the container's network namespace) and to Unix sockets (paths resolved
//! beneath the container's root, never the host's), the agent socket (`-A`) and X11
//! displays (`-X`). Adding a kind: its [`berth_ssh::Gateway`] method, its function here, its
//! [`berth_ssh::ForwardKind`] for the audit log.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockType};

use berth_proto::UserName;
use berth_runtime::{ContainerInit, RootOwner, Runtime, RuntimeError, sockets_in_netns};
use berth_ssh::X11Request;
use berth_ssh::{
    AgentListener, GuardedUnixListener, GuardedUnixStream, OpenError, RemoteListener,
    SocketListener, SocketTunnel, Tunnel,
};
use tracing::error;

use super::BerthGateway;
use berth_guest_proto::words::RUN_DIR;

use crate::lifecycle::LifecycleError;

/// X11 display numbers tried in the container, like sshd's X11DisplayOffset.
const X11_DISPLAYS: std::ops::Range<u16> = 10..100;
/// How long a `-L` name lookup in a container may take, all name servers together.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a `-L` connect may take, all addresses together.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long resolving a socket path in the container may take.
const PATH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest socket path accepted from a client.
const MAX_SOCKET_PATH: usize = 1024;
/// `-L` connects (name lookup included) one user may have under way at once; more wait for
/// one to finish, within their own deadline. An open tunnel does not count.
const CONNECTS_PER_USER: usize = 16;

impl<R: Runtime> BerthGateway<R> {
    /// Running container `container`'s init, opened: its network namespace and root.
    async fn container_init(&self, container: &str) -> Result<ContainerInit, OpenError> {
        match self.runtime.open_init(container).await {
            Ok(Some(init)) => Ok(init),
            Ok(None) => Err(OpenError("your container is not running".into())),
            Err(RuntimeError::HostNamespace(c)) => {
                error!(
                    container = c,
                    "container shares the host's network namespace; forwarding refused"
                );
                Err(OpenError(
                    "forwarding is not available for this container".into(),
                ))
            }
            Err(e) => Err(OpenError(LifecycleError::Runtime(e).for_user())),
        }
    }

    /// `ssh -R PORT:...`: listens on the container's loopback.
    pub(super) async fn listen_tcp(
        &self,
        user: &UserName,
        port: u16,
    ) -> Result<RemoteListener, OpenError> {
        let lease = self.lease(user).await?;
        let init = self.container_init(lease.container()).await?;
        let listener = tcp_socket_in(&init, user.as_str())
            .await
            .and_then(|s| listen_on(s, port))
            .map_err(|e| {
                OpenError(format!(
                    "cannot listen on port {port} in your container: {e}"
                ))
            })?;
        Ok(RemoteListener {
            listener,
            hold: Box::new(lease),
        })
    }

    /// `ssh -L ...:HOST:PORT`: connects as the container would.
    pub(super) async fn connect_tcp(
        &self,
        user: &UserName,
        host: &str,
        port: u16,
    ) -> Result<Tunnel, OpenError> {
        let lease = self.lease(user).await?;
        let init = self.container_init(lease.container()).await?;
        let stream = connect_in(&init, user, host, port)
            .await
            .map_err(|e| OpenError(format!("cannot connect to {host}:{port}: {e}")))?;
        Ok(Tunnel {
            stream,
            hold: Box::new(lease),
        })
    }

    /// Runs `f` on socket path `path` beneath the root of `user`'s running container (off
    /// the runtime, with a deadline); returns what it made and the lease that keeps the
    /// container up. `doing` says what failed, for the user.
    async fn in_root<T: Send + 'static>(
        &self,
        user: &UserName,
        path: &str,
        doing: &str,
        f: impl FnOnce(&std::fs::File, &str, RootOwner) -> std::io::Result<T> + Send + 'static,
    ) -> Result<(T, crate::lifecycle::Lease), OpenError> {
        check_socket_path(path)?;
        let lease = self.lease(user).await?;
        let init = self.container_init(lease.container()).await?;
        let owner = root_owner(&init)?;
        let p = path.to_owned();
        let made = off_thread(user.as_str(), move || f(&init.root, &p, owner))
            .await
            .map_err(|e| OpenError(format!("cannot {doing} {path} in your container: {e}")))?;
        Ok((made, lease))
    }

    /// `ssh -L ...:/PATH`: connects to the Unix socket at PATH in the container.
    pub(super) async fn connect_unix(
        &self,
        user: &UserName,
        path: &str,
    ) -> Result<SocketTunnel, OpenError> {
        let (socket, lease) = self
            .in_root(user, path, "connect to", |root, path, _| {
                open_socket_in_root(root, path)
            })
            .await?;
        let stream = connect_to(&socket)
            .await
            .map_err(|e| OpenError(format!("cannot connect to {path}: {e}")))?;
        Ok(SocketTunnel {
            stream,
            hold: Box::new(lease),
        })
    }

    /// `ssh -R /PATH:...`: makes a Unix socket at PATH in the container (mode 0600, like
    /// sshd's StreamLocalBindMask), removed when the forward ends.
    pub(super) async fn listen_unix(
        &self,
        user: &UserName,
        path: &str,
    ) -> Result<SocketListener, OpenError> {
        let ((listener, made), lease) = self.in_root(user, path, "listen on", bind_in_root).await?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map(GuardedUnixListener::new)
            .map_err(|e| OpenError(format!("cannot listen on {path}: {e}")))?;
        Ok(SocketListener {
            listener,
            hold: Box::new((made, lease)),
        })
    }

    /// `ssh -A`: a fresh socket in the user's own run directory, which only her container
    /// mounts (at `/.berth/run`), owned by her container's root (on the host, that is the
    /// daemon's root only without a user namespace). The container is started to learn who
    /// that is (the session that asked for the agent starts it anyway); the session's own
    /// lease keeps it up.
    pub(super) async fn agent_socket(&self, user: &UserName) -> Result<AgentListener, OpenError> {
        use std::os::unix::fs::PermissionsExt;
        let lease = self.lease(user).await?;
        let owner = root_owner(&self.container_init(lease.container()).await?)?;
        drop(lease);
        let dir = self.lifecycle.run_dir().join(user.as_str());
        let fail = |e: std::io::Error| {
            error!(user = %user, error = %e, "cannot make an agent socket");
            OpenError("agent forwarding is not available".into())
        };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let file = format!("agent-{:016x}.sock", random_u64());
        let path = dir.join(&file);
        let listener = tokio::net::UnixListener::bind(&path)
            .map(GuardedUnixListener::new)
            .map_err(fail)?;
        let remove = RemoveOnDrop(path);
        std::fs::set_permissions(&remove.0, std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
        std::os::unix::fs::lchown(&remove.0, Some(owner.uid), Some(owner.gid)).map_err(fail)?;
        Ok(AgentListener {
            listener,
            path_in_container: format!("{RUN_DIR}/{file}"),
            hold: Box::new(remove),
        })
    }

    /// `ssh -X`: picks a free X11 display number (10 and up, as sshd does) in the container
    /// and listens on its TCP port on the container's loopback.
    pub(super) async fn x11_display(
        &self,
        user: &UserName,
        container: &str,
        x: &X11Request,
    ) -> Result<(u16, tokio::net::TcpListener), OpenError> {
        let valid = !x.auth_protocol.is_empty()
            && x.auth_protocol.len() <= 64
            && x.auth_protocol
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !x.auth_cookie.is_empty()
            && x.auth_cookie.len() <= 256
            && x.auth_cookie.chars().all(|c| c.is_ascii_hexdigit());
        if !valid {
            return Err(OpenError("bad X11 request".into()));
        }
        let init = self.container_init(container).await?;
        let failed = |e: std::io::Error| OpenError(format!("X11 forwarding failed: {e}"));
        // One socket, offered each display's port in turn (a failed bind leaves it unbound).
        let socket = tcp_socket_in(&init, user.as_str()).await.map_err(failed)?;
        socket.set_reuseaddr(true).map_err(failed)?;
        let n = X11_DISPLAYS
            .into_iter()
            .find(|n| {
                socket
                    .bind((std::net::Ipv4Addr::LOCALHOST, 6000 + n).into())
                    .is_ok()
            })
            .ok_or_else(|| failed(std::io::Error::other("no free X11 display")))?;
        let listener = socket.listen(LISTEN_BACKLOG).map_err(failed)?;
        Ok((n, listener))
    }
}

/// Who the container's root is on the host (see [`ContainerInit::root_owner`]).
fn root_owner(init: &ContainerInit) -> Result<RootOwner, OpenError> {
    init.root_owner()
        .ok_or_else(|| OpenError("your container is not running".into()))
}

/// Path lookups of one user's that may be running at once. A lookup in her container can
/// take as long as her container makes it (a path through a `berth connect` mount whose
/// laptop stopped answering waits for that mount's deadline), and each holds a thread of the
/// blocking pool the whole daemon shares (the store's calls run there too): past this she
/// is refused, never anybody else slowed.
const PATH_LOOKUPS_PER_USER: usize = 4;

static PATH_LOOKUPS: std::sync::Mutex<
    Option<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>,
> = std::sync::Mutex::new(None);

/// Runs file system work in `user`'s container's tree off the runtime's workers, with a
/// deadline (a user's container decides how long its paths take to resolve). Her slot is
/// held by the thread itself, so one given up on still counts until it really ends.
async fn off_thread<T: Send + 'static>(
    user: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let busy = || std::io::Error::other("too many path lookups of yours are under way");
    let slots = PATH_LOOKUPS.lock().map_err(|_| busy()).map(|mut m| {
        let m = m.get_or_insert_with(Default::default);
        m.retain(|_, s| std::sync::Arc::strong_count(s) > 1);
        m.entry(user.to_owned())
            .or_insert_with(|| {
                std::sync::Arc::new(tokio::sync::Semaphore::new(PATH_LOOKUPS_PER_USER))
            })
            .clone()
    })?;
    let slot = slots.try_acquire_owned().map_err(|_| busy())?;
    let work = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        f()
    });
    match tokio::time::timeout(PATH_TIMEOUT, work).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the path did not resolve in time",
        )),
    }
}

/// A non-blocking unix stream socket that refuses descriptors (where the kernel can).
fn unix_socket() -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let _ = berth_guest_proto::fds::refuse_descriptors(sock.as_fd());
    Ok(sock)
}

/// Connects to the socket `handle` (an `O_PATH` descriptor of it) names, from a socket that
/// refuses descriptors before it is connected: the magic link names the inode that was
/// checked, wherever it is, with no path lookup.
async fn connect_to(handle: &OwnedFd) -> std::io::Result<GuardedUnixStream> {
    use nix::sys::socket::UnixAddr;
    let sock = unix_socket()?;
    let addr = UnixAddr::new(format!("/proc/self/fd/{}", handle.as_raw_fd()).as_str())?;
    match nix::sys::socket::connect(sock.as_raw_fd(), &addr) {
        Ok(()) => {}
        // A listener whose backlog is full: refused rather than waited for.
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(std::io::Error::other("the socket's listener is busy"));
        }
        Err(e) => return Err(e.into()),
    }
    let stream = tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(sock))?;
    Ok(GuardedUnixStream::new(stream))
}

/// A socket path from a client: absolute (there is no working directory to be relative
/// to), no NUL, bounded.
fn check_socket_path(path: &str) -> Result<(), OpenError> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > MAX_SOCKET_PATH {
        return Err(OpenError(format!(
            "socket path {:?} must be absolute (and at most {MAX_SOCKET_PATH} bytes)",
            path.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// Opens `path` beneath `root` without following anything out of it: `..`, absolute
/// symlinks and magic links (`/proc/*/root`) all stay inside. `O_PATH` opens nothing.
fn open_in_root(
    root: &std::fs::File,
    path: &str,
    flags: nix::fcntl::OFlag,
) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    Ok(nix::fcntl::openat2(root.as_fd(), path, how)?)
}

/// The Unix socket at `path` in the container whose root is `root`, as an `O_PATH` handle
/// checked to be a socket.
fn open_socket_in_root(root: &std::fs::File, path: &str) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::FileTypeExt;
    let fd = open_in_root(root, path, nix::fcntl::OFlag::empty())?;
    let file = std::fs::File::from(fd);
    if !file.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::other("not a socket"));
    }
    Ok(OwnedFd::from(file))
}

/// A socket this daemon made in a container, removed when dropped if it is still the one
/// made (the user may have replaced it meanwhile: then hers stays).
struct MadeSocket {
    dir: OwnedFd,
    name: String,
    id: (u64, u64),
}

impl Drop for MadeSocket {
    fn drop(&mut self) {
        use nix::unistd::UnlinkatFlags;
        let same = quiet_stat_at(&self.dir, &self.name).is_some_and(|id| id == self.id);
        if same {
            let _ =
                nix::unistd::unlinkat(&self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// The device and inode of `name` in `dir`, not followed if a symlink, without asking any
/// file system for fresh attributes: this runs on a runtime worker (a forward's drop), and
/// she may have put a `berth connect` mount where the socket was, whose server (the daemon,
/// asking her laptop) would need a worker to answer (`AT_STATX_DONT_SYNC`: what the kernel
/// holds, enough for a device and an inode, which never change).
fn quiet_stat_at(dir: &OwnedFd, name: &str) -> Option<(u64, u64)> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: statx writes one statx struct to the pointer, valid for the call; `name` is a
    // NUL-terminated string that outlives it.
    #[allow(unsafe_code)]
    let st = unsafe {
        let mut st: libc::statx = std::mem::zeroed();
        (libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC,
            libc::STATX_INO,
            &mut st,
        ) == 0)
            .then_some(st)?
    };
    let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
    Some((dev, st.stx_ino))
}

/// Makes a listening Unix socket at `path` beneath `root` (its directory resolved as in
/// [`open_in_root`], the socket created in it by name: never through a symlink), mode 0600,
/// owned by `owner` (the container's root, as sshd gives the socket to its user).
fn bind_in_root(
    root: &std::fs::File,
    path: &str,
    owner: RootOwner,
) -> std::io::Result<(std::os::unix::net::UnixListener, MadeSocket)> {
    use nix::sys::socket::UnixAddr;
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
    let (parent, name) = path
        .rsplit_once('/')
        .ok_or_else(|| invalid("not absolute"))?;
    if name.is_empty() || name == "." || name == ".." {
        return Err(invalid("names a directory, not a socket"));
    }
    let dir = open_in_root(
        root,
        if parent.is_empty() { "/" } else { parent },
        nix::fcntl::OFlag::O_DIRECTORY,
    )?;
    let addr = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd());
    // sun_path holds 108 bytes with its NUL.
    if addr.len() > 107 {
        return Err(invalid("the socket's file name is too long"));
    }
    let sock = unix_socket()?;
    // The file's mode comes from the socket's own inode at bind: 0600, whatever the umask.
    nix::sys::stat::fchmod(&sock, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    nix::sys::socket::bind(sock.as_raw_fd(), &UnixAddr::new(addr.as_str())?)?;
    // The file just made, by a handle (not followed if it was swapped for a symlink):
    // what is removed later and what is given to the container's root.
    let file = nix::fcntl::openat(
        &dir,
        name,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let st = nix::sys::stat::fstat(&file)?;
    // Swapped meanwhile (she may rename in that directory) for what is not a socket: never
    // given to her.
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(std::io::Error::other(
            "the socket's file was replaced while it was made",
        ));
    }
    let made = MadeSocket {
        dir,
        name: name.to_owned(),
        id: (st.st_dev, st.st_ino),
    };
    nix::unistd::fchownat(
        &file,
        "",
        Some(nix::unistd::Uid::from_raw(owner.uid)),
        Some(nix::unistd::Gid::from_raw(owner.gid)),
        nix::fcntl::AtFlags::AT_EMPTY_PATH,
    )?;
    nix::sys::socket::listen(&sock, nix::sys::socket::Backlog::new(128)?)?;
    Ok((std::os::unix::net::UnixListener::from(sock), made))
}

/// Removes a file when dropped (a session's agent socket).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A random number for names that must not be guessed or collide (not for keys).
fn random_u64() -> u64 {
    // The kernel's generator does not fail on Linux ≥ 3.17; the time is a last resort.
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    })
}

/// The backlog of a listener made in a container (std's).
const LISTEN_BACKLOG: u32 = 128;

/// An IPv4 TCP socket made in `init`'s network namespace for `owner`, to be bound or
/// connected from here.
async fn tcp_socket_in(
    init: &ContainerInit,
    owner: &str,
) -> std::io::Result<tokio::net::TcpSocket> {
    let kind = (AddressFamily::Inet, SockType::Stream);
    let fd = sockets_in_netns(&init.ns, owner, &[kind])
        .await?
        .pop()
        .ok_or_else(|| std::io::Error::other("no socket made"))?;
    Ok(tokio::net::TcpSocket::from_std_stream(fd.into()))
}

/// Listens with `socket` on `port` of its namespace's loopback (`-R`).
fn listen_on(socket: tokio::net::TcpSocket, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    socket.set_reuseaddr(true)?;
    socket.bind((std::net::Ipv4Addr::LOCALHOST, port).into())?;
    socket.listen(LISTEN_BACKLOG)
}

/// The `-L` connects of each user under way ([`CONNECTS_PER_USER`]).
type Connecting = std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>;
static CONNECTING: std::sync::Mutex<Option<Connecting>> = std::sync::Mutex::new(None);

/// `user`'s share of [`CONNECTS_PER_USER`].
fn connect_slots(user: &UserName) -> std::io::Result<std::sync::Arc<tokio::sync::Semaphore>> {
    let mut all = CONNECTING
        .lock()
        .map_err(|_| std::io::Error::other("connect accounting unavailable"))?;
    let all = all.get_or_insert_with(Default::default);
    all.retain(|_, s| std::sync::Arc::strong_count(s) > 1);
    Ok(all
        .entry(user.as_str().to_owned())
        .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTS_PER_USER)))
        .clone())
}

/// Connects to `host:port` as the container `init` would, for `user`. `localhost` is the
/// container's loopback; other names are resolved as the container resolves them (its
/// `/etc/hosts`, then its name servers), see [`crate::resolve`]. Only the sockets are made
/// in the container's namespace; the lookup and the connects run here, asynchronously, each
/// under its deadline, and at most [`CONNECTS_PER_USER`] of a user's at once.
async fn connect_in(
    init: &ContainerInit,
    user: &UserName,
    host: &str,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use tokio::time::{Instant, timeout_at};
    let start = Instant::now();
    // Shared with the thread that reads her container's name files, which keeps it until it
    // ends: a read given up on still counts.
    let slot = std::sync::Arc::new(
        timeout_at(
            start + CONNECT_TIMEOUT,
            connect_slots(user)?.acquire_owned(),
        )
        .await
        .map_err(|_| std::io::Error::other("too many of your connections are being opened"))?
        .map_err(std::io::Error::other)?,
    );
    let addrs: Vec<SocketAddr> = if host == "localhost" {
        vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ]
    } else if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        vec![SocketAddr::new(ip, port)]
    } else {
        let deadline = Instant::now() + RESOLVE_TIMEOUT;
        crate::resolve::resolve_in_container(
            &init.ns,
            &init.root,
            user.as_str(),
            host,
            deadline,
            slot.clone(),
        )
        .await?
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
    };
    let kinds: Vec<_> = addrs
        .iter()
        .map(|a| match a {
            SocketAddr::V4(_) => (AddressFamily::Inet, SockType::Stream),
            SocketAddr::V6(_) => (AddressFamily::Inet6, SockType::Stream),
        })
        .collect();
    // One connect budget for all addresses.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let sockets = timeout_at(deadline, sockets_in_netns(&init.ns, user.as_str(), &kinds))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for (addr, fd) in addrs.into_iter().zip(sockets) {
        let socket = tokio::net::TcpSocket::from_std_stream(fd.into());
        match timeout_at(deadline, socket.connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection timed out",
                ));
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_must_be_absolute_and_bounded() {
        assert!(check_socket_path("/run/app.sock").is_ok());
        for bad in [
            "run/app.sock",
            "",
            "/a\0b",
            &format!("/{}", "x".repeat(2000)),
        ] {
            assert!(check_socket_path(bad).is_err(), "{bad:?}");
        }
    }

    /// A tree standing for a container's root, with a socket, an escape by symlink and a
    /// socket outside it.
    #[test]
    fn sockets_are_found_and_made_inside_the_root_only() -> std::io::Result<()> {
        let outside = tempfile::tempdir()?;
        let host_sock = outside.path().join("host.sock");
        let _host = std::os::unix::net::UnixListener::bind(&host_sock)?;
        let root_dir = tempfile::tempdir()?;
        let root = std::fs::File::open(root_dir.path())?;
        std::fs::create_dir(root_dir.path().join("run"))?;
        let inside = std::os::unix::net::UnixListener::bind(root_dir.path().join("run/app.sock"))?;
        // An absolute symlink to the host's socket resolves inside the root: not found.
        std::os::unix::fs::symlink(&host_sock, root_dir.path().join("run/escape.sock"))?;
        std::os::unix::fs::symlink("../../../../..", root_dir.path().join("run/up"))?;

        let fd = open_socket_in_root(&root, "/run/app.sock")?;
        let c =
            std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let (_, _) = inside.accept()?;
        drop(c);
        assert!(open_socket_in_root(&root, "/run/escape.sock").is_err());
        let via_dots = format!("/run/up{}", host_sock.display());
        assert!(open_socket_in_root(&root, &via_dots).is_err());
        assert!(open_socket_in_root(&root, "/proc/self/root/etc/passwd").is_err());
        // Not a socket.
        std::fs::write(root_dir.path().join("run/file"), b"x")?;
        assert!(open_socket_in_root(&root, "/run/file").is_err());

        // Made inside, through a directory symlink that points "outside": still inside.
        std::os::unix::fs::symlink(outside.path(), root_dir.path().join("out"))?;
        let made_at = root_dir
            .path()
            .join(outside.path().strip_prefix("/").unwrap());
        std::fs::create_dir_all(&made_at)?;
        // Given to the container's root (someone else than us, where we may chown).
        let owner = if nix::unistd::geteuid().is_root() {
            RootOwner {
                uid: 100_000,
                gid: 100_001,
            }
        } else {
            RootOwner {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }
        };
        let (listener, made) = bind_in_root(&root, "/out/new.sock", owner)?;
        assert!(made_at.join("new.sock").exists());
        assert!(!outside.path().join("new.sock").exists());
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(made_at.join("new.sock"))?;
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid));
        // An existing file is not replaced.
        assert!(bind_in_root(&root, "/run/app.sock", owner).is_err());
        drop(listener);
        drop(made);
        assert!(
            !made_at.join("new.sock").exists(),
            "removed when the forward ends"
        );
        Ok(())
    }
}
