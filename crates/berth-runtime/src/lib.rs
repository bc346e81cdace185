//! The container runtime: the [`Runtime`] trait the lifecycle manager drives, and its Docker
//! Engine implementation ([`DockerRuntime`], bollard over the unix socket, API version
//! negotiated so Debian bookworm's engine 20.10 / API 1.41 works). Sessions ("execs") are
//! started by the container's own init where it can (`guest`), through the engine otherwise.
//!
//! Holds no user policy: which image, which limits and when to stop are the caller's. What
//! it does guarantee: an exec's processes never outlive the [`Session`] that started them
//! unless they finished on their own ([`ProcessGuard`]), and TTY output reaches the caller
//! as raw bytes (no guessing at Docker's stream framing).

mod docker;
mod exec;
#[cfg(feature = "test-util")]
mod fake;
mod init;
pub mod mount;
mod process;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::AsyncWrite;

pub use docker::DockerRuntime;
#[cfg(feature = "test-util")]
pub use fake::FakeRuntime;
pub use init::InitSession;
pub use process::ProcessGuard;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the Docker engine is not reachable: {0}")]
    Unavailable(String),
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("container {0} not found")]
    ContainerNotFound(String),
    /// The container's network is gone (`docker network rm`, a prune): the caller can
    /// re-ensure it with [`Runtime::ensure_network`] and try again.
    #[error("network not found: {0}")]
    NetworkNotFound(String),
    #[error("docker engine API {0} is too old; Berth needs 1.41 or newer")]
    TooOld(String),
    /// The container runs in the host's network namespace: nothing is done in it.
    #[error("container {0} shares the host's network namespace")]
    HostNamespace(String),
    /// Starting or running a session failed outside the engine: the container's init, the
    /// terminal, the session's pipes.
    #[error("session: {0}")]
    Session(String),
    #[error("docker: {0}")]
    Docker(String),
    /// Refused before anything was done, for the reason given (said to the user as is).
    #[error("{0}")]
    Refused(String),
}

/// A running container's init, opened ([`Runtime::open_init`]): its network namespace and its
/// root directory, both known to be that init's and not the host's.
#[derive(Debug)]
pub struct ContainerInit {
    /// `/proc/PID/ns/net`, for [`sockets_in_netns`].
    pub ns: std::fs::File,
    /// `/proc/PID/root`: paths in the container are resolved beneath it, never above.
    pub root: std::fs::File,
    init: process::Identity,
    container: String,
}

impl ContainerInit {
    /// Who the container's root is on the host: the host UID and GID that its init's user
    /// namespace maps ID 0 to (`0:0` without one; e.g. `100000:100000` under Docker's
    /// `userns-remap`). What the daemon makes for the container (its sockets, its
    /// terminals) belongs to that owner, or the container's root cannot use it. Read from
    /// the init itself, so it is right whatever the engine's configuration; `None` when
    /// the init is gone or maps no root.
    pub fn root_owner(&self) -> Option<RootOwner> {
        root_owner_of(self.init, &self.container)
    }

    /// `/proc/PID/ns/mnt`: the container's mount namespace (for [`mount::attach`]), checked
    /// after the open to still be this init's. `None` when the init is gone.
    pub fn mount_ns(&self) -> Option<std::fs::File> {
        let ns = std::fs::File::open(format!("/proc/{}/ns/mnt", self.init.pid)).ok()?;
        self.init.alive(&self.container).then_some(ns)
    }

    /// Local TCP ports of the sockets in the container's network namespace (its
    /// `/proc/net/tcp` and `tcp6`, read from the host, checked to still be this init's).
    /// The container decides how long those tables are (a process of it may open a hundred
    /// thousand sockets: 28 MB, and 1.5 s of the kernel's time to list), so each is read
    /// only up to [`TCP_TABLE_BYTES`]; a port past that is not seen. Blocking: call it off
    /// the async workers.
    pub fn tcp_ports_in_use(&self) -> std::collections::HashSet<u16> {
        let open = |f: &str| std::fs::File::open(format!("/proc/{}/net/{f}", self.init.pid)).ok();
        let files = [open("tcp"), open("tcp6")];
        if !self.init.alive(&self.container) {
            return Default::default();
        }
        files
            .into_iter()
            .flatten()
            .flat_map(|f| ports_in_table(f, TCP_TABLE_BYTES))
            .collect()
    }
}

/// The host IDs of a container's root (see [`ContainerInit::root_owner`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootOwner {
    pub uid: u32,
    pub gid: u32,
}

/// The root owner of init `init` of container `container`, read from its `uid_map` and
/// `gid_map` and checked to still be that init's afterwards.
fn root_owner_of(init: process::Identity, container: &str) -> Option<RootOwner> {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/{}/{f}", init.pid)).ok();
    let (uids, gids) = (read("uid_map")?, read("gid_map")?);
    if !init.alive(container) {
        return None;
    }
    Some(RootOwner {
        uid: host_id_of_root(&uids)?,
        gid: host_id_of_root(&gids)?,
    })
}

/// The outside ID that ID 0 maps to in text of the `/proc/PID/uid_map` format (lines of
/// `inside outside count`; read by a process outside the namespace, the outside IDs are
/// that reader's). `None` when no line maps 0.
fn host_id_of_root(map: &str) -> Option<u32> {
    map.lines().find_map(|l| {
        let mut f = l.split_whitespace().map(str::parse::<u32>);
        match (f.next(), f.next(), f.next()) {
            (Some(Ok(0)), Some(Ok(outside)), Some(Ok(count))) if count > 0 => Some(outside),
            _ => None,
        }
    })
}

/// Whether the engine runs containers in user namespaces (`userns-remap`): their root is
/// then an unprivileged host UID, with kernel limits of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserNamespaces {
    Off,
    /// On; with the host UID of containers' root where the engine says it.
    On {
        root_uid: Option<u32>,
    },
}

impl std::fmt::Display for UserNamespaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::On {
                root_uid: Some(uid),
            } => {
                write!(f, "on (userns-remap: container root is host UID {uid})")
            }
            Self::On { root_uid: None } => write!(f, "on (userns-remap)"),
            Self::Off => write!(
                f,
                "off: container root is the host's root for per-UID kernel limits; \
                 turn on userns-remap (see the README)"
            ),
        }
    }
}

/// The most of a container's `/proc/net/tcp` (or `tcp6`) read: about 7,000 sockets.
pub const TCP_TABLE_BYTES: u64 = 1 << 20;

/// The local ports in the whole lines of the first `cap` bytes of `table`.
fn ports_in_table(table: impl std::io::Read, cap: u64) -> std::collections::HashSet<u16> {
    let mut bytes = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(table, cap), &mut bytes);
    // A line cut by the cap would give a wrong port.
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(whole);
    ports_in_use(&String::from_utf8_lossy(&bytes))
}

/// Local ports of every socket in text of the `/proc/net/tcp` format.
fn ports_in_use(text: &str) -> std::collections::HashSet<u16> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|local| local.rsplit_once(':'))
        .filter_map(|(_, port)| u16::from_str_radix(port, 16).ok())
        .collect()
}

/// What the lifecycle manager asks for when it creates a user's container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub hostname: String,
    pub labels: HashMap<String, String>,
    /// Host directory bind-mounted read-only at `/.berth`; must hold `berth-guest`.
    pub guest_dir: PathBuf,
    pub limits: Limits,
    /// The Docker network to attach to, by name (the user's own, see [`NetworkSpec`]; by
    /// name so that a network re-created under the same name is found again).
    pub network: String,
    /// Further bind mounts.
    pub mounts: Vec<BindMount>,
    /// GPUs asked of the NVIDIA container runtime (a device request); `None`: none.
    pub gpus: Option<GpuRequest>,
    /// Named volumes (made beforehand with [`Runtime::ensure_volume`]). An empty volume
    /// gets the image's content of its target at the first mount (the engine copies it).
    pub volumes: Vec<VolumeMount>,
}

/// A named volume mounted in a container, read-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub name: String,
    pub target: String,
}

/// A named volume to make ([`Runtime::ensure_volume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub labels: HashMap<String, String>,
    /// At most this many bytes (the local driver's `size` option, which the engine enforces
    /// with xfs project quotas); a volume is made without it where the engine refuses it.
    pub size_bytes: Option<u64>,
}

/// GPUs for a container: a device request of driver `nvidia` with capability `gpu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    All,
    /// Device indices or UUIDs.
    Devices(Vec<String>),
}

/// What a container was given, as the engine says ([`Runtime::applied`]): the limits in
/// force now (memory and CPUs change under a running container, [`Runtime::update_limits`]),
/// its GPUs and its bind mounts (as made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids: Option<i64>,
    pub gpus: Option<GpuRequest>,
    /// Every bind mount but the guest directory at `/.berth`.
    pub mounts: Vec<BindMount>,
    /// Its named volumes.
    pub volumes: Vec<VolumeMount>,
}

/// Whether the engine can give containers GPUs ([`Runtime::gpu_support`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSupport {
    /// The engine has the NVIDIA container runtime (`docker info`'s runtimes name `nvidia`).
    Available,
    NotAvailable,
}

impl std::fmt::Display for GpuSupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Available => f.write_str("available (NVIDIA container runtime)"),
            Self::NotAvailable => f.write_str("not available (no NVIDIA container runtime)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids: i64,
    /// The container's console log kept by the engine, at most (two rotated files);
    /// `None`: none is kept (the `none` log driver).
    pub log_bytes: Option<u64>,
    /// The container's writable layer, at most (Docker's `--storage-opt size=`), where
    /// the engine can enforce it ([`Runtime::disk_quota`]); `None`: no limit.
    pub disk_bytes: Option<u64>,
}

/// Layers a commit's image may have: a commit whose container's image has this many is
/// flattened into one layer. Docker refuses containers past 125 layers (overlay2 stacks
/// at most 128 lower directories), so a user who commits often would end up locked out.
pub const MAX_LAYERS: usize = 100;

/// What a commit made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub id: String,
    /// The whole image, its parents' layers included.
    pub size_bytes: u64,
    /// What this commit added (the new layer; the whole image when flattened).
    pub added_bytes: u64,
    /// Layers of the new image.
    pub layers: usize,
    /// The container's image was [`MAX_LAYERS`] deep: the image was made anew from the
    /// container's whole file system, in one layer.
    pub flattened: bool,
}

/// Whether the engine can cap a container's writable layer ([`Limits::disk_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskQuota {
    /// It can: containers are created with the cap.
    Enforced { driver: String },
    /// It cannot; what the admin reads, with what to do about it.
    NotEnforced { reason: String },
}

/// One container's disk use: its writable layer (`docker ps --size`'s first number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDisk {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub bytes: u64,
}

/// One named volume's disk use (`docker system df -v`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub bytes: u64,
}

/// One image's disk use: what only it holds (its size less the layers it shares with
/// other images), by its `repo:tag` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDisk {
    pub id: String,
    pub tags: Vec<String>,
    pub bytes: u64,
}

/// What [`Runtime::disk_usage`] measured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// The containers carrying the label asked for.
    pub containers: Vec<ContainerDisk>,
    /// The volumes carrying the label asked for.
    pub volumes: Vec<VolumeDisk>,
    /// Every local image.
    pub images: Vec<ImageDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub running: bool,
    pub labels: HashMap<String, String>,
    /// The names of the networks it is attached to.
    pub networks: Vec<String>,
}

/// One user's own bridge network ([`Runtime::ensure_network`]): nobody else's container is
/// on it, so Docker's DNS knows no other user's name and no other container shares its L2
/// segment. Its subnet is taken from `pool` by Berth, not from Docker's few default pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    /// The subnets of users' networks are blocks of `pool`...
    pub pool: ipnet::Ipv4Net,
    /// ...of this prefix length (`/28`: the gateway, the container, room to spare).
    pub prefix_len: u8,
    /// The bridge interface is named this followed by the block's index in the pool, in
    /// hex, so one firewall rule (`-i PREFIX+`) matches every user's bridge. At most 10
    /// characters: Linux names have at most 15.
    pub bridge_prefix: String,
    pub labels: HashMap<String, String>,
}

impl NetworkSpec {
    /// The `index`th block of the pool and its bridge's name, if the pool has that many.
    pub fn block(&self, index: u32) -> Option<(ipnet::Ipv4Net, String)> {
        let net = self
            .pool
            .subnets(self.prefix_len)
            .ok()?
            .nth(index as usize)?;
        Some((net, format!("{}{index:x}", self.bridge_prefix)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// `Some` runs the command on a TTY of that size.
    pub tty: Option<TtySize>,
}

/// One chunk of an exec's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

pub type OutputStream = Pin<Box<dyn Stream<Item = Result<Output, RuntimeError>> + Send>>;

/// Writes to a session's input without waiting: the bytes the input took at once, or
/// `WouldBlock`. For a caller that writes from a loop that must never wait (the SSH
/// connection's own, as a keystroke arrives).
pub type WriteNow = std::sync::Arc<dyn Fn(&[u8]) -> std::io::Result<usize> + Send + Sync>;

/// Reads a session's output as an `AsyncRead` would (nothing read means its end), for a
/// caller that polls it from its own loop.
pub type ReadNow = std::sync::Arc<
    dyn Fn(
            &mut std::task::Context<'_>,
            &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>>
        + Send
        + Sync,
>;

/// A started exec. Dropping it kills whatever of the exec's process tree still runs, unless
/// [`ProcessGuard::finished`] was called after the exit code was read.
pub struct Session {
    /// For logs.
    pub id: String,
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    /// The same input as `stdin`, written without waiting, where the input allows it (a
    /// terminal). Its writes must never overtake a write to `stdin` not yet finished.
    pub stdin_now: Option<WriteNow>,
    /// The same output as `output` (all of it on stdout), where it can be polled outside a
    /// stream (a terminal). Whoever polls it must not poll `output`.
    pub output_now: Option<ReadNow>,
    pub output: OutputStream,
    pub guard: ProcessGuard,
    /// Resizes it and waits for its end ([`Runtime::resize_session`], [`Runtime::session_exit_code`]).
    pub handle: SessionHandle,
}

/// How a started exec is addressed.
#[derive(Debug, Clone)]
pub enum SessionHandle {
    /// An engine exec, by id.
    Engine(String),
    /// A session the container's init started; the connection to init closes when the last
    /// clone is dropped.
    Init(std::sync::Arc<InitSession>),
}

/// A local image as `docker images` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub id: String,
    /// `repo:tag` names; empty for an untagged image.
    pub tags: Vec<String>,
    pub size: u64,
    /// Seconds since the epoch.
    pub created: i64,
}

/// A stream of bytes handed to the engine (an image's root file system tar).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

#[derive(Debug, Clone)]
pub struct EngineVersion {
    pub version: String,
    pub api_version: String,
}

/// Every container operation Berth needs. Implemented for Docker; kept narrow so a fake can
/// stand in for it in fast tests.
pub trait Runtime: Send + Sync + 'static {
    fn version(&self) -> impl Future<Output = Result<EngineVersion, RuntimeError>> + Send;
    fn image_exists(&self, image: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// Makes sure network `spec.name` exists (made with the lowest free block of the pool,
    /// inter-container traffic and IPv6 off); returns its id.
    fn ensure_network(
        &self,
        spec: &NetworkSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Attaches stopped container `id` to network `network` (by name) in place of every
    /// network it is attached to (`from`, as [`ContainerInfo::networks`] says): a container
    /// of an older Berth on the shared network moves to its user's own, and after a network
    /// was removed and made again, a container that still names the old one can start. The
    /// container itself, and so the user's files in it, is kept.
    fn reattach_network(
        &self,
        id: &str,
        from: &[String],
        network: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes network `name`; a missing one is not an error, one still in use is.
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// The names of the networks carrying label `key=value`.
    fn list_networks(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;
    /// The container named `name`, if it exists.
    fn inspect(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, RuntimeError>> + Send;
    /// Whether container `id` is known to run without asking the engine: a session was
    /// started in it through its init, and that init is still the same live process in it.
    /// `false` means "ask the engine", not "stopped".
    fn known_running(&self, _id: &str) -> bool {
        false
    }
    /// All containers carrying label `key=value`, running or not.
    fn list(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Sets container `id`'s memory (swap included) and CPU limits, running or not; `None`
    /// leaves that one as it is (the engine cannot lift a limit from a container: that
    /// takes a new one).
    fn update_limits(
        &self,
        id: &str,
        memory_bytes: Option<i64>,
        nano_cpus: Option<i64>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// What container `name` was given ([`Applied`]); `None` when there is no such container.
    fn applied(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Applied>, RuntimeError>> + Send;
    /// Whether containers can be given GPUs.
    fn gpu_support(&self) -> impl Future<Output = Result<GpuSupport, RuntimeError>> + Send;
    /// The engine's data root (`docker info`'s `DockerRootDir`), never to be shared with a
    /// container.
    fn data_root(&self) -> impl Future<Output = Result<PathBuf, RuntimeError>> + Send;
    fn stop(
        &self,
        id: &str,
        timeout_secs: i32,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn start_session(
        &self,
        container: &str,
        spec: SessionSpec,
    ) -> impl Future<Output = Result<Session, RuntimeError>> + Send;
    fn resize_session(
        &self,
        exec: &SessionHandle,
        size: TtySize,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// The exit code of an exec, once it has ended. An engine exec's end can lag the end of
    /// its output stream (waited for, bounded); a session started by init is waited for
    /// until it ends, as sshd waits for its sessions' processes.
    fn session_exit_code(
        &self,
        exec: &SessionHandle,
    ) -> impl Future<Output = Result<i64, RuntimeError>> + Send;
    /// Saves the container as image `repo:tag`. The container keeps running and is not
    /// paused (a paused container would refuse new sessions). Never makes an image deeper
    /// than [`MAX_LAYERS`]: past it, the image is flattened.
    fn commit(
        &self,
        container: &str,
        repo: &str,
        tag: &str,
    ) -> impl Future<Output = Result<CommitInfo, RuntimeError>> + Send;
    /// Whether containers created with [`Limits::disk_bytes`] get that cap. Asked once at
    /// start: a create never fails for want of a quota (see [`Runtime::create`]).
    fn disk_quota(&self) -> impl Future<Output = Result<DiskQuota, RuntimeError>> + Send;
    /// Whether the engine runs containers in user namespaces (Docker's `userns-remap`).
    fn user_namespaces(&self) -> impl Future<Output = Result<UserNamespaces, RuntimeError>> + Send {
        async { Ok(UserNamespaces::Off) }
    }
    /// The disk use of every container and volume carrying label `key=value`, and of
    /// every image (`docker system df -v`). Slow (the engine walks each writable layer and
    /// volume): never on a login's path.
    fn disk_usage(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<DiskUsage, RuntimeError>> + Send;
    /// Root's home directory in image `image`, as the image's `/etc/passwd` says (read from
    /// a container made from it and never started); `None` when the image has no such
    /// file or no root in it. The text is the image's: hostile until checked.
    fn root_home(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<String>, RuntimeError>> + Send;
    /// Makes volume `spec.name` unless it exists; returns the labels it has (those of
    /// `spec` when it was made now).
    fn ensure_volume(
        &self,
        spec: &VolumeSpec,
    ) -> impl Future<Output = Result<HashMap<String, String>, RuntimeError>> + Send;
    /// The names of the volumes carrying label `key=value`.
    fn list_volumes(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;
    /// Writes image `image` as `docker save` does (a tar holding `manifest.json`) to `out`;
    /// returns the bytes written.
    fn save_image(
        &self,
        image: &str,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> impl Future<Output = Result<u64, RuntimeError>> + Send;
    /// Loads the images of a `docker save` tar (`docker load`).
    fn load_image(&self, tar: ByteStream) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Tags image `image` as `repo:tag`.
    fn tag_image(
        &self,
        image: &str,
        repo: &str,
        tag: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Writes volume `volume`'s content as a tar (names relative to its root) to `out`,
    /// read through a container made from `image` and never started; returns the bytes
    /// written.
    fn export_volume(
        &self,
        volume: &str,
        image: &str,
        out: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> impl Future<Output = Result<u64, RuntimeError>> + Send;
    /// Extracts `tar` into volume `volume`, through a container made from `image` and never
    /// started. The engine extracts inside that container's root: no entry, whatever its
    /// name or links, lands outside it.
    fn import_volume(
        &self,
        volume: &str,
        image: &str,
        tar: ByteStream,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Volume `name`'s labels, if it exists.
    fn volume_labels(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<HashMap<String, String>>, RuntimeError>> + Send;
    /// Removes volume `name`; `Ok(false)`: there was none. One still in use is an error.
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// The id of image `image`, if present.
    fn image_id(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<String>, RuntimeError>> + Send;
    /// The labels of image `image`, if present.
    fn image_labels(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<HashMap<String, String>>, RuntimeError>> + Send;
    /// Every local image.
    fn list_images(&self) -> impl Future<Output = Result<Vec<ImageSummary>, RuntimeError>> + Send;
    /// The ids of the images that carry every one of `labels` (`key`, `value`) and that no tag
    /// or digest names and nothing is built on (the engine's "dangling" ones). The images
    /// Berth commits inherit the labels of the user's container (her name, the instance).
    fn dangling_images(
        &self,
        labels: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;
    /// Imports a root file system tar (`docker import`) as image `name` (`repo:tag`);
    /// returns the new image's id.
    fn import_image(
        &self,
        name: &str,
        rootfs: ByteStream,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Removes an image; a missing one is not an error.
    fn remove_image(&self, image: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Hangs up the execs still running in `container` (SIGHUP to each exec's own process,
    /// like a shell whose terminal went away); returns how many. For sessions a previous
    /// daemon started and could not end (it was killed).
    fn hang_up_sessions(
        &self,
        container: &str,
    ) -> impl Future<Output = Result<usize, RuntimeError>> + Send;
    /// Running container `container`'s (id) init, opened: the one way into a container's
    /// namespaces and file system. `None` when it is not running.
    fn open_init(
        &self,
        container: &str,
    ) -> impl Future<Output = Result<Option<ContainerInit>, RuntimeError>> + Send;
}

/// Threads that may be inside containers' namespaces at once, daemon-wide, and for any one
/// owner (a user): one user cannot take them all. Each such thread only makes sockets or
/// attaches and detaches a mount (none of which waits on anything a user controls) and ends,
/// so a slot is held for microseconds.
const NETNS_THREADS: usize = 64;
const NETNS_THREADS_PER_OWNER: usize = 8;
/// Sockets made in one go, at most.
const NETNS_SOCKETS: usize = 8;
/// How long to wait for a namespace thread before giving up.
const NETNS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

static NETNS_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(NETNS_THREADS);
type Slots = std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>;
static NETNS_SLOTS_BY_OWNER: std::sync::Mutex<Option<Slots>> = std::sync::Mutex::new(None);

/// A socket to make in a container's network namespace ([`sockets_in_netns`]).
pub type SocketKind = (nix::sys::socket::AddressFamily, nix::sys::socket::SockType);

/// Makes sockets of `kinds` inside network namespace `ns` (a container's, opened by
/// [`Runtime::open_init`]) for `owner` (the user it is done for: the accounting is hers),
/// non-blocking and close-on-exec. That is all that happens inside the namespace: a socket
/// belongs to the namespace it was made in for good, so binding, connecting, name lookups
/// and handshakes are done with it outside, on the runtime, each with its own deadline (a
/// connect to a target that never answers holds a socket, never a thread). Abstract unix
/// socket names are those of the socket's namespace too.
pub async fn sockets_in_netns(
    ns: &std::fs::File,
    owner: &str,
    kinds: &[SocketKind],
) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{SockFlag, socket};
    if kinds.len() > NETNS_SOCKETS {
        return Err(std::io::Error::other("too many sockets asked for at once"));
    }
    let kinds = kinds.to_vec();
    in_namespace(ns.try_clone()?, Namespace::Net, owner, move || {
        kinds
            .into_iter()
            .map(|(family, kind)| {
                socket(
                    family,
                    kind,
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .collect()
    })
    .await
}

/// Which kind of namespace [`in_namespace`] enters.
#[derive(Debug, Clone, Copy)]
enum Namespace {
    Net,
    /// A mount namespace: the thread first stops sharing its root and working directory
    /// with the process (`unshare(CLONE_FS)`), which `setns` requires; `setns` then sets
    /// them to the namespace's root.
    Mount,
}

/// Runs `f` on a thread of its own inside namespace `ns` (of kind `kind`). A dedicated thread
/// because `setns` moves the calling thread for good; never a pool's. At most a few such
/// threads run at once, and fewer per owner; `f` must not wait on anything a user controls
/// (see [`sockets_in_netns`]). If the caller stops waiting, what `f` returns is dropped on
/// that thread, inside the namespace.
async fn in_namespace<T: Send + 'static>(
    ns: std::fs::File,
    kind: Namespace,
    owner: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let busy = || std::io::Error::other("too many container namespace operations at once");
    let mine = NETNS_SLOTS_BY_OWNER
        .lock()
        .map_err(|_| busy())
        .map(|mut m| {
            let m = m.get_or_insert_with(Default::default);
            m.retain(|_, s| std::sync::Arc::strong_count(s) > 1);
            m.entry(owner.to_owned())
                .or_insert_with(|| {
                    std::sync::Arc::new(tokio::sync::Semaphore::new(NETNS_THREADS_PER_OWNER))
                })
                .clone()
        })?;
    // Both permits go with the thread: they are given back when the thread ends, not when
    // the waiting task is dropped.
    let own = tokio::time::timeout(NETNS_WAIT, mine.acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(std::io::Error::other)?;
    let any = tokio::time::timeout(NETNS_WAIT, NETNS_SLOTS.acquire())
        .await
        .map_err(|_| busy())?
        .map_err(std::io::Error::other)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-ns".into())
        .spawn(move || {
            let _permits = (own, any);
            let _ = tx.send(enter(&ns, kind).and_then(|()| f()));
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("namespace thread ended"))?
}

/// Moves the calling thread into namespace `ns` of kind `kind`.
fn enter(ns: &std::fs::File, kind: Namespace) -> std::io::Result<()> {
    use nix::sched::CloneFlags;
    let flags = match kind {
        Namespace::Net => CloneFlags::CLONE_NEWNET,
        Namespace::Mount => {
            nix::sched::unshare(CloneFlags::CLONE_FS)?;
            CloneFlags::CLONE_NEWNS
        }
    };
    Ok(nix::sched::setns(ns, flags)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_ports_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 00000000:C350 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert_eq!(
            super::ports_in_use(text),
            [8080, 50000].into_iter().collect()
        );
        assert!(super::ports_in_use("").is_empty());
    }

    #[test]
    fn a_tcp_table_is_read_only_to_its_cap_and_in_whole_lines() {
        let head = "  sl  local_address rem_address   st\n";
        let line = |i: u16| format!("{i:4}: 0100007F:{:04X} 00000000:0000 0A\n", 1000 + i);
        let mut table = head.to_owned();
        for i in 0..10_000 {
            table.push_str(&line(i));
        }
        let cap = (head.len() + 100 * line(0).len() + 20) as u64;
        let ports = super::ports_in_table(std::io::Cursor::new(table.clone()), cap);
        // The hundred whole lines within the cap, and nothing of the line it cuts.
        assert_eq!(ports, (1000..1100).collect());
        assert_eq!(
            super::ports_in_table(std::io::Cursor::new(table), u64::MAX).len(),
            10_000
        );
    }

    #[test]
    fn root_is_found_in_an_id_map() {
        let host = super::host_id_of_root;
        // No user namespace; Docker's userns-remap; a map with more lines; no root mapped.
        assert_eq!(host("         0          0 4294967295\n"), Some(0));
        assert_eq!(host("         0     100000      65536\n"), Some(100000));
        assert_eq!(host("1 200001 999\n0 200000 1\n"), Some(200000));
        assert_eq!(host("1 200001 999\n"), None);
        assert_eq!(host("0 5 0\n"), None);
        assert_eq!(host("garbage\n"), None);
    }
}

#[cfg(test)]
mod network_tests {
    use super::NetworkSpec;

    #[test]
    fn blocks_of_the_pool_are_numbered_and_name_their_bridge() {
        let spec = NetworkSpec {
            name: "berth-alice".into(),
            pool: "10.213.0.0/16".parse().unwrap(),
            prefix_len: 28,
            bridge_prefix: "berth-".into(),
            labels: Default::default(),
        };
        assert_eq!(
            spec.block(0),
            Some(("10.213.0.0/28".parse().unwrap(), "berth-0".into()))
        );
        assert_eq!(
            spec.block(4095),
            Some(("10.213.255.240/28".parse().unwrap(), "berth-fff".into()))
        );
        assert_eq!(spec.block(4096), None);
    }
}

/// The label of the short-lived containers Berth makes to read an image or a volume (never
/// started): `berth-volume-helper-PID-N`, `berth-home-probe-PID-N`, `berth-quota-probe-PID`.
pub const LABEL_PROBE: &str = "berth.probe";

/// Removes the helper containers ([`LABEL_PROBE`]) whose daemon (the PID in their name) is
/// gone: what a killed daemon left. Returns how many were removed.
pub async fn remove_leftover_helpers<R: Runtime>(rt: &R) -> Result<usize, RuntimeError> {
    let mut n = 0;
    for c in rt.list(LABEL_PROBE, "1").await? {
        let pid = [
            "berth-volume-helper-",
            "berth-home-probe-",
            "berth-quota-probe-",
        ]
        .iter()
        .find_map(|p| c.name.strip_prefix(p))
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        rt.remove(&c.id).await?;
        n += 1;
    }
    Ok(n)
}
