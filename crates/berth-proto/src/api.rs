//! Admin API bodies (HTTP+JSON over the admin socket). Routes, all under `/v1`:
//!
//! | method | path                          | body → reply                      |
//! |--------|-------------------------------|-----------------------------------|
//! | GET    | /health                       | → [`HealthInfo`]                  |
//! | GET    | /users                        | → `[UserInfo]`                    |
//! | POST   | /users                        | [`AddUserRequest`] → [`UserInfo`] |
//! | GET    | /users/{name}                 | → [`UserInfo`]                    |
//! | DELETE | /users/{name}[?keep_image=true][&purge_data=true] | → [`UserInfo`] (as it was; `home.removed` says what became of her home volume) |
//! | POST   | /users/{name}/forwarding      | [`SetForwardingRequest`] → [`UserInfo`] |
//! | POST   | /users/{name}/settings        | [`SetSettingsRequest`] → [`UserInfo`] |
//! | GET    | /users/{name}/keys            | → `[KeyInfo]`                     |
//! | POST   | /users/{name}/keys            | [`AddKeysRequest`] → `[KeyInfo]`  |
//! | DELETE | /users/{name}/keys/{fp}       | → [`RemovedKeys`]                 |
//! | POST   | /users/{name}/kick            | → [`KickedInfo`]                  |
//! | GET    | /users/{name}/export          | → her archive (a tar: settings, keys, committed image, home) |
//! | POST   | /users/import                 | a user's archive → [`UserInfo`]   |
//! | GET    | /status                       | → [`StatusInfo`]                  |
//! | DELETE | /sessions/{id}                | → [`SessionInfo`] (killed)        |
//! | GET    | /images                       | → `[ImageInfo]`                   |
//! | POST   | /images?name=NAME             | root file system tar → [`ImageInfo`] |
//! | DELETE | /images/{name}                | → [`ImageInfo`] (as it was)       |
//!
//! Every error is a non-2xx status with an [`ApiError`] body.

use serde::{Deserialize, Serialize};

use crate::{AuthorizedKey, ImageName, UserName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Absent,
    Running,
    Stopped,
}

impl ContainerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: UserName,
    pub image: ImageName,
    /// The image her last `commit` made; her next new container is made from it.
    #[serde(default)]
    pub committed_image: Option<ImageName>,
    pub container: ContainerState,
    pub container_name: String,
    pub sessions: u32,
    pub daemon_mode: bool,
    pub keys: usize,
    /// Effective forwarding switches (the user's own, or the server-wide default).
    #[serde(default)]
    pub forwarding: ForwardingInfo,
    /// Her disk use in bytes, as last measured (the measurement is slow and runs apart):
    /// her container's writable layer, her home volume and her committed image; `None`
    /// before the first measurement, or when she has none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// [`Self::disk_bytes`], part by part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskInfo>,
    /// Her home volume, when she has one (given by `user show`, `user set` and `user rm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<HomeInfo>,
    /// Her effective limits and GPUs, each with where it comes from; given by `user show`
    /// and `user set` (not by `user list`, which asks the engine nothing per user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsInfo>,
    /// Her shared folders, the server's and her own (with `limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<MountsInfo>,
}

/// One user's disk use in bytes, part by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Her container's writable layer.
    pub container: u64,
    /// Her home volume.
    pub home: u64,
    /// What only her committed image holds (not the layers it shares with her base image).
    pub image: u64,
}

/// A user's home volume: a Docker volume of her own mounted at root's home in her
/// container, kept across `remove`, a new image and `user rm` (unless `--purge-data`), and
/// not part of what `commit` saves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeInfo {
    pub volume: String,
    /// Where her container has it; `None` with no container (or one made without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Its size as last measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// In the reply to `DELETE /users/{name}`: it was removed (`purge_data`); otherwise it
    /// is kept, and a user added again under the same name gets it back.
    #[serde(default)]
    pub removed: bool,
}

/// Where an effective value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `berth user set`.
    User,
    /// `berth.toml`.
    Server,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Server => "server",
        }
    }
}

/// One effective setting of a user's container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effective<T> {
    pub value: T,
    /// As people read it: `8 GiB`, `4`, `no limit`, `0,2`.
    pub shown: String,
    pub source: Source,
    /// Her container exists and differs: it gets the value when it is re-created.
    #[serde(default)]
    pub pending: bool,
}

/// A user's effective limits (`[limits]` unless `berth user set` says otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitsInfo {
    /// Bytes; 0 is no limit.
    pub memory: Effective<u64>,
    /// Nano-CPUs; 0 is no limit.
    pub cpus: Effective<u64>,
    pub pids: Effective<u32>,
    /// `none`, `all` or device ids (`0,2`).
    pub gpus: Effective<String>,
}

/// A user's shared folders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountsInfo {
    pub mounts: Vec<MountInfo>,
    /// Her container exists and its folders differ: the change waits for a new container.
    pub pending: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub source: String,
    pub target: String,
    pub read_only: bool,
    pub origin: Source,
}

/// `berth user set NAME --memory/--cpus/--pids/--gpus/--mount/--unmount`: absent fields stay
/// as they are; `default` returns a value to the server's. Values are the command line's
/// text, parsed by the daemon ([`crate::settings`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetSettingsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
    /// `SOURCE:TARGET[:ro]`, each added (or replacing hers at the same target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount: Vec<String>,
    /// Targets of her shared folders to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmount: Vec<String>,
    /// Her base image, for her next new container (it must be present in the engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Forget her committed image: her next new container is made from her base image;
    /// the committed image is removed unless something still uses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_commit: bool,
}

impl SetSettingsRequest {
    pub fn is_empty(&self) -> bool {
        self.memory.is_none()
            && self.cpus.is_none()
            && self.pids.is_none()
            && self.gpus.is_none()
            && self.mount.is_empty()
            && self.unmount.is_empty()
            && self.image.is_none()
            && !self.drop_commit
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardingInfo {
    pub tcp: bool,
    pub agent: bool,
    pub x11: bool,
}

/// One per-user switch: on, off, or follow the server's setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
    Default,
}

impl Switch {
    pub fn as_option(self) -> Option<bool> {
        match self {
            Self::On => Some(true),
            Self::Off => Some(false),
            Self::Default => None,
        }
    }
}

/// Changes to a user's forwarding switches; absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetForwardingRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Switch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<Switch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x11: Option<Switch>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddUserRequest {
    pub name: UserName,
    pub image: ImageName,
    pub keys: Vec<AuthorizedKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddKeysRequest {
    pub keys: Vec<AuthorizedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub fingerprint: String,
    pub algorithm: String,
    pub comment: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemovedKeys {
    pub removed: Vec<KeyInfo>,
    pub remaining: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthInfo {
    pub version: String,
    pub listen: String,
    pub docker_version: String,
    pub docker_api_version: String,
}

/// The body of every admin API error: one line naming the object, and optionally what to
/// do next.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// One open session (`berth status`, `berth session kill ID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: u64,
    pub user: String,
    /// The client's address, `-` when unknown.
    pub from: String,
    /// When it started, RFC 3339 (UTC).
    pub since: String,
    /// `shell`, `sftp`, or the command line.
    pub command: String,
}

/// A container of this Berth instance, as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub user: String,
    pub name: String,
    pub running: bool,
}

/// `GET /v1/status`: the daemon, its engine, users, containers and sessions at a glance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub pid: u32,
    pub listen: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// The engine's version, or `None` with `docker_error` when it does not answer.
    pub docker_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_error: Option<String>,
    pub users: usize,
    pub containers: Vec<ContainerInfo>,
    pub sessions: Vec<SessionInfo>,
    /// The daemon's own load: tasks alive and descriptors open (what a user's doing may not
    /// leave behind).
    #[serde(default)]
    pub tasks: usize,
    #[serde(default)]
    pub descriptors: usize,
    /// The per-container disk quota: its size, or why it is not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_quota: Option<String>,
    /// Whether the host firewall keeps containers from the host, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    /// Whether the engine runs containers in user namespaces (`userns-remap`), and what
    /// that means; `None` when the engine does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_namespaces: Option<String>,
    /// Whether containers can be given GPUs: `available (NVIDIA container runtime)` or
    /// `not available (no NVIDIA container runtime)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
    /// Every user's disk use together (containers' writable layers, home volumes and
    /// committed images), as last measured; `None` before the first measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// A local image (`berth image list`) and the users whose containers are made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    pub size_bytes: u64,
    /// Seconds since the epoch.
    pub created: i64,
    pub users: Vec<String>,
}

/// `POST /v1/users/{name}/kick`: the user's SSH connections that were ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KickedInfo {
    pub user: UserName,
    pub connections: usize,
}
