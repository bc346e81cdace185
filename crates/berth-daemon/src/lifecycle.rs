//! The lifecycle manager: one owner task per user, fed by a queue, is the only code that
//! creates, starts, stops or removes that user's container. Requests are handled one at a
//! time, so concurrent first logins create one container and a login that races a stop
//! waits for the stop and then starts the container again.
//!
//! ```text
//!  absent ──acquire──► running ──last lease dropped──► grace ──timer, not daemon mode──► stopped
//!                        ▲  ▲                            │                                │
//!                        │  └────────── acquire ─────────┘                                │
//!                        └───────────────────────── acquire ──────────────────────────────┘
//!  any ──remove──► container gone, user deleted from the store
//! ```
//!
//! A [`Lease`] is one open session: the owner counts them, and dropping one (however the
//! session ended) gives it back. The count is published on a `watch` channel for listings.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_guest_proto::words::{RUN_DIR, Word};
use berth_proto::{ImageName, UserName};
use berth_runtime::{
    BindMount, ContainerInfo, ContainerSpec, Limits, NetworkSpec, Runtime, RuntimeError,
    VolumeMount, VolumeSpec,
};
use berth_store::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::audit::Event;

/// Container label keys.
pub const LABEL_USER: &str = "berth.user";
pub const LABEL_INSTANCE: &str = "berth.instance";
/// On a user's home volume (with [`LABEL_USER`] and [`LABEL_INSTANCE`]).
pub const LABEL_HOME: &str = "berth.home";

/// Where a home goes when the image's `/etc/passwd` names none that can be mounted over.
pub const DEFAULT_HOME: &str = "/root";
/// How long reading an image's `/etc/passwd` may take.
const HOME_PROBE_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("container {0} exists but was not made by this Berth instance")]
    Foreign(String),
    #[error("the lifecycle manager is shutting down")]
    ShuttingDown,
    #[error("there is no container to {0} yet; log in once to create it")]
    NoContainer(&'static str),
    #[error("cannot serve the guest socket: {0}")]
    GuestSocket(std::io::Error),
    #[error("no free port in the dynamic range")]
    NoFreePort,
    /// The configured commit repository does not make an image name.
    #[error("bad image name {0}")]
    BadImageName(String),
    /// The user is set to have GPUs and the engine has no NVIDIA container runtime.
    #[error("the user is set to have GPUs but the engine has no NVIDIA container runtime")]
    NoGpuRuntime,
    /// A shared folder's source is refused now (checked again at every create).
    #[error("shared folder refused: {0}")]
    MountRefused(String),
    /// A `berth user set` change that cannot be made; nothing was changed.
    #[error("{0}")]
    BadSetting(String),
}

impl LifecycleError {
    /// The one line a user reads about this failure (at login, for a host word or a
    /// forwarding); details stay in the daemon's log.
    pub fn for_user(&self) -> String {
        match self {
            Self::Runtime(RuntimeError::Unavailable(_)) => {
                "the container engine is not available right now; try again later".into()
            }
            Self::Runtime(RuntimeError::ImageNotFound(_)) => {
                "your container's image is missing on this server; ask the administrator".into()
            }
            Self::Runtime(RuntimeError::Refused(why)) => why.clone(),
            Self::ShuttingDown => "the server is shutting down; try again later".into(),
            Self::NoContainer(_) | Self::NoFreePort | Self::BadSetting(_) => self.to_string(),
            Self::NoGpuRuntime => "your account is set to use GPUs, but this server has no NVIDIA \
                                   container runtime; ask the administrator"
                .into(),
            Self::MountRefused(_) => "a shared folder of your account cannot be mounted; ask the \
                                      administrator (details are in the berth log)"
                .into(),
            Self::Runtime(_)
            | Self::Store(_)
            | Self::Foreign(_)
            | Self::GuestSocket(_)
            | Self::BadImageName(_) => {
                "your container could not be used; ask the administrator (details are in the berth log)"
                    .into()
            }
        }
    }
}

/// Fixed settings for every container this manager makes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prefix: String,
    pub instance: String,
    /// Each user's own network; re-ensured before a container is created or started.
    pub network: NetworkSettings,
    pub guest_dir: PathBuf,
    /// The server's limits, GPUs and shared folders; each user's own values override them
    /// ([`crate::user_settings`]).
    pub server: crate::user_settings::Server,
    /// Whether the engine can give containers GPUs (asked at start).
    pub gpu_support: berth_runtime::GpuSupport,
    /// What a shared folder's source may be; checked again at every create.
    pub sources: Arc<crate::mounts::SourceRules>,
    pub idle_stop: Duration,
    pub stop_timeout_secs: i32,
    /// Host directory holding one `USER/guest.sock` per user (see [`crate::words_socket`]).
    pub run_dir: PathBuf,
    /// The guest helper, also mounted as `daemon`, `nodaemon` and `stopnow` on PATH.
    pub guest_binary: PathBuf,
    /// Commits are saved as `REPOSITORY/USER:latest`.
    pub commit_repository: String,
    /// Each user's home is a volume of her own (`home_volume`, on by default).
    pub home_volume: bool,
    /// Where container changes are recorded.
    pub audit: Arc<crate::audit::Audit>,
}

/// Where users' networks come from ([`crate::Config::network_settings`]).
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// The configured network name: user `alice`'s network is `NAME-alice`. Before issue 14
    /// every container joined the network `NAME` itself; such a container moves to its
    /// user's network when it is next started.
    pub name: String,
    pub pool: ipnet::Ipv4Net,
    pub prefix_len: u8,
    pub bridge_prefix: String,
}

/// The label on every network Berth makes: the configured network name.
pub const LABEL_NETWORK: &str = "berth.network";

impl NetworkSettings {
    pub fn user_network(&self, user: &UserName) -> String {
        format!("{}-{user}", self.name)
    }

    fn spec(&self, user: &UserName, instance: &str) -> NetworkSpec {
        NetworkSpec {
            name: self.user_network(user),
            pool: self.pool,
            prefix_len: self.prefix_len,
            bridge_prefix: self.bridge_prefix.clone(),
            labels: HashMap::from([
                (LABEL_NETWORK.to_owned(), self.name.clone()),
                (LABEL_INSTANCE.to_owned(), instance.to_owned()),
                (LABEL_USER.to_owned(), user.to_string()),
            ]),
        }
    }
}

impl Settings {
    /// Settings for a manager driven by tests and tools over a fake runtime: containers
    /// `t-USER` of instance `inst` on network `net`, no real guest helper, commits to
    /// `berth/users`, sockets under `run_dir`.
    pub fn for_tests(
        run_dir: PathBuf,
        idle_stop: Duration,
        audit: Arc<crate::audit::Audit>,
    ) -> Self {
        Self {
            prefix: "t-".into(),
            instance: "inst".into(),
            network: NetworkSettings {
                name: "net".into(),
                pool: ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 213, 0, 0), 16)
                    .unwrap_or_default(),
                prefix_len: 28,
                bridge_prefix: "net-".into(),
            },
            guest_dir: PathBuf::from("/nonexistent"),
            server: crate::user_settings::Server {
                limits: Limits {
                    memory_bytes: None,
                    nano_cpus: None,
                    pids: 100,
                    log_bytes: None,
                    disk_bytes: None,
                },
                gpus: berth_proto::settings::Gpus::None,
                mounts: Vec::new(),
            },
            gpu_support: berth_runtime::GpuSupport::NotAvailable,
            sources: Arc::new(crate::mounts::SourceRules::new(
                &run_dir,
                std::path::Path::new("/var/run/docker.sock"),
                std::path::Path::new("/var/lib/docker"),
            )),
            idle_stop,
            stop_timeout_secs: 1,
            run_dir,
            guest_binary: PathBuf::from("/nonexistent/berth-guest"),
            commit_repository: "berth/users".into(),
            home_volume: true,
            audit,
        }
    }
}

enum Request {
    Acquire {
        reply: oneshot::Sender<Result<Lease, LifecycleError>>,
    },
    Release,
    /// An SSH connection of this user is open (a `Hold`): no idle stop meanwhile, even
    /// with no session (`ssh -N -L ...`).
    Hold,
    Unhold,
    /// Adopt a container found running at daemon start: arm the grace timer.
    Adopt,
    Remove {
        keep_image: bool,
        purge_data: bool,
        reply: oneshot::Sender<Result<Removed, LifecycleError>>,
    },
    /// Stop the container now; open sessions end with it.
    Stop {
        reply: oneshot::Sender<Result<bool, LifecycleError>>,
    },
    /// Remove the container (stopping it first), keeping the user and her image.
    RemoveContainer {
        reply: oneshot::Sender<Result<bool, LifecycleError>>,
    },
    Commit {
        reply: oneshot::Sender<Result<Committed, LifecycleError>>,
    },
    SetDaemonMode {
        on: bool,
        reply: oneshot::Sender<Result<(), LifecycleError>>,
    },
    /// `berth user set`: stored, memory and CPUs applied to her container at once. (Boxed:
    /// every message of the queue is as large as its largest kind, and the queue's blocks of
    /// 32 live as long as the user.)
    SetSettings {
        change: Box<crate::user_settings::Change>,
        reply: oneshot::Sender<Result<(), LifecycleError>>,
    },
}

/// What removing a user did with her home volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Her home volume, if she had one.
    pub home: Option<String>,
    /// It was removed (`--purge-data`); otherwise it is kept, for a user of the same name.
    pub home_removed: bool,
}

/// The image a commit made.
#[derive(Debug, Clone)]
pub struct Committed {
    pub image: String,
    pub id: String,
    /// Its size, its layers, what the commit added and whether it was flattened.
    pub info: berth_runtime::CommitInfo,
}

/// An open SSH connection's claim: while it lasts, the container is not stopped for being
/// idle. It does not start the container and is not counted as a session.
pub struct Hold {
    tx: mpsc::UnboundedSender<Request>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.tx.send(Request::Unhold);
    }
}

/// One open session's hold on a running container.
pub struct Lease {
    container: String,
    tx: mpsc::UnboundedSender<Request>,
}

impl Lease {
    pub fn container(&self) -> &str {
        &self.container
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.tx.send(Request::Release);
    }
}

struct Owner {
    tx: mpsc::UnboundedSender<Request>,
    sessions: watch::Receiver<u32>,
}

pub struct Lifecycle<R> {
    runtime: Arc<R>,
    store: crate::store::AsyncStore,
    settings: Settings,
    owners: Mutex<HashMap<UserName, Owner>>,
    tracker: TaskTracker,
    /// The daemon's runtime, where every owner runs, whichever thread asked first (the
    /// admin socket has a runtime of its own).
    spawner: tokio::runtime::Handle,
    cancel: CancellationToken,
    disk: Arc<crate::disk::Disk>,
}

impl<R: Runtime> Lifecycle<R> {
    /// The disk quota in force and the users' disk use.
    pub fn disk(&self) -> &Arc<crate::disk::Disk> {
        &self.disk
    }

    /// Each user's disk use (her container's writable layer, home volume and committed
    /// image), as last measured; waits briefly for a new measurement when the last is old
    /// (see [`crate::disk`]).
    pub async fn disk_usage(&self) -> HashMap<String, crate::disk::UserDisk> {
        self.disk
            .usage(
                &self.runtime,
                crate::disk::Scope {
                    label: (LABEL_INSTANCE, self.settings.instance.clone()),
                    commit_repository: self.settings.commit_repository.clone(),
                },
            )
            .await
    }

    /// The audit log container changes go to (shared with the gateway and admin API).
    pub fn audit(&self) -> &crate::audit::Audit {
        &self.settings.audit
    }

    /// Called on the daemon's runtime: its owners run there (panics outside a runtime).
    pub fn new(runtime: Arc<R>, store: Store, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            store: crate::store::AsyncStore::new(store),
            settings,
            owners: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            spawner: tokio::runtime::Handle::current(),
            cancel: CancellationToken::new(),
            disk: Default::default(),
        })
    }

    /// The daemon's runtime (where the SSH connections, sessions and owners run).
    pub fn spawner(&self) -> &tokio::runtime::Handle {
        &self.spawner
    }

    pub fn container_name(&self, user: &UserName) -> String {
        format!("{}{}", self.settings.prefix, user)
    }

    pub fn instance(&self) -> &str {
        &self.settings.instance
    }

    /// `user`'s home volume: `PREFIX` `home-` `USER` (the container prefix keeps two Berth
    /// instances on one engine apart).
    pub fn home_volume(&self, user: &UserName) -> String {
        format!("{}home-{user}", self.settings.prefix)
    }

    /// The volume `user`'s home is made as: labelled hers, this instance's and a home; as
    /// big as `disk_gb` where that is enforced.
    pub fn home_volume_spec(&self, user: &UserName) -> VolumeSpec {
        VolumeSpec {
            name: self.home_volume(user),
            labels: HashMap::from([
                (LABEL_USER.to_owned(), user.to_string()),
                (LABEL_INSTANCE.to_owned(), self.settings.instance.clone()),
                (LABEL_HOME.to_owned(), "1".to_owned()),
            ]),
            // Where `disk_gb` is enforced, her home is capped alike (only a new volume).
            size_bytes: self.disk.quota().bytes(),
        }
    }

    /// The image `user`'s `commit` makes: `REPOSITORY:USER`.
    pub fn commit_image_name(&self, user: &UserName) -> String {
        format!("{}:{user}", self.settings.commit_repository)
    }

    /// Whether users' homes are volumes of their own (`home_volume`).
    pub fn home_volume_on(&self) -> bool {
        self.settings.home_volume
    }

    /// `user`'s home volume if it exists and is hers.
    pub async fn home_volume_of(&self, user: &UserName) -> Result<Option<String>, LifecycleError> {
        let name = self.home_volume(user);
        let labels = self.runtime.volume_labels(&name).await?;
        Ok(labels
            .filter(|l| l.get(LABEL_USER).map(String::as_str) == Some(user.as_str()))
            .map(|_| name))
    }

    /// Whether volume `name` is `user`'s home made by this instance: its labels
    /// [`LABEL_USER`], [`LABEL_INSTANCE`] and [`LABEL_HOME`] all say so.
    pub async fn is_own_home(&self, name: &str, user: &UserName) -> Result<bool, LifecycleError> {
        let Some(labels) = self.runtime.volume_labels(name).await? else {
            return Ok(false);
        };
        let is = |k: &str, v: &str| labels.get(k).map(String::as_str) == Some(v);
        Ok(is(LABEL_USER, user.as_str())
            && is(LABEL_INSTANCE, &self.settings.instance)
            && is(LABEL_HOME, "1"))
    }

    /// Whether `image` is one of the images users' `commit` makes (`REPOSITORY:USER`): those
    /// belong to the user who made them, and her next commit moves the tag.
    pub fn is_commit_image(&self, image: &ImageName) -> bool {
        let plain = |s: &str| {
            let s = s.strip_prefix("docker.io/").unwrap_or(s);
            s.strip_prefix("library/").unwrap_or(s).to_owned()
        };
        let full = image.full();
        let repository = full
            .split('@')
            .next()
            .and_then(|s| s.rsplit_once(':').map(|(r, _)| r))
            .unwrap_or(&full);
        plain(repository) == plain(&self.settings.commit_repository)
    }

    /// A running container for `user`, and a lease that keeps it running.
    pub async fn acquire(self: &Arc<Self>, user: &UserName) -> Result<Lease, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(user, Request::Acquire { reply })?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// Stops and removes `user`'s container, then deletes the user from the store, and her
    /// committed image unless `keep_image`. Her home volume is kept unless `purge_data`.
    pub async fn remove(
        self: &Arc<Self>,
        user: &UserName,
        keep_image: bool,
        purge_data: bool,
    ) -> Result<Removed, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(
            user,
            Request::Remove {
                keep_image,
                purge_data,
                reply,
            },
        )?;
        let r = rx.await.map_err(|_| LifecycleError::ShuttingDown)?;
        if r.is_ok()
            && let Ok(mut owners) = self.owners.lock()
            && owners.get(user).is_some_and(|o| o.tx.is_closed())
        {
            owners.remove(user);
        }
        r
    }

    /// Keeps `user`'s container from idle stops while the returned value lives.
    pub fn hold(self: &Arc<Self>, user: &UserName) -> Result<Hold, LifecycleError> {
        let tx = self.owner_tx(user)?;
        tx.send(Request::Hold)
            .map_err(|_| LifecycleError::ShuttingDown)?;
        Ok(Hold { tx })
    }

    /// Stops `user`'s container now. `Ok(false)`: it was not running.
    pub async fn stop(self: &Arc<Self>, user: &UserName) -> Result<bool, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(user, Request::Stop { reply })?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// Removes `user`'s container, keeping the user and her images. `Ok(false)`: there was
    /// none.
    pub async fn remove_container(
        self: &Arc<Self>,
        user: &UserName,
    ) -> Result<bool, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(user, Request::RemoveContainer { reply })?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// Saves `user`'s container as her image; her next new container is made from it.
    pub async fn commit(self: &Arc<Self>, user: &UserName) -> Result<Committed, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(user, Request::Commit { reply })?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// Daemon mode: the container keeps running with no session open.
    pub async fn set_daemon_mode(
        self: &Arc<Self>,
        user: &UserName,
        on: bool,
    ) -> Result<(), LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(user, Request::SetDaemonMode { on, reply })?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// Changes what `user`'s containers are made with (`berth user set`); memory and CPU
    /// limits are applied to her container at once (the engine cannot lift a limit from a
    /// container: "no limit" waits for a new one). A change that cannot be made changes
    /// nothing.
    pub async fn set_settings(
        self: &Arc<Self>,
        user: &UserName,
        change: crate::user_settings::Change,
    ) -> Result<(), LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(
            user,
            Request::SetSettings {
                change: Box::new(change),
                reply,
            },
        )?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// The server's limits, GPUs and shared folders.
    pub fn server(&self) -> &crate::user_settings::Server {
        &self.settings.server
    }

    pub fn gpu_support(&self) -> &berth_runtime::GpuSupport {
        &self.settings.gpu_support
    }

    /// The rules a shared folder's source is checked by.
    pub fn sources(&self) -> &Arc<crate::mounts::SourceRules> {
        &self.settings.sources
    }

    /// The host directory whose `USER/` subdirectory is `/.berth/run` in USER's container.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.settings.run_dir
    }

    pub fn idle_stop(&self) -> Duration {
        self.settings.idle_stop
    }

    /// Open sessions of `user` (0 when no owner runs).
    pub fn sessions(&self, user: &UserName) -> u32 {
        self.owners
            .lock()
            .ok()
            .and_then(|o| {
                o.get(user)
                    .filter(|o| !o.tx.is_closed())
                    .map(|o| *o.sessions.borrow())
            })
            .unwrap_or(0)
    }

    /// Looks at the engine once after a daemon start: running containers of this instance
    /// are adopted (their grace timer starts); containers whose user is unknown are left
    /// alone and reported.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), LifecycleError> {
        // Helper containers a killed daemon left (an export or import cut short).
        match berth_runtime::remove_leftover_helpers(&*self.runtime).await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "left-over helper containers removed"),
            Err(e) => warn!(error = %e, "cannot remove left-over helper containers"),
        }
        let found = self
            .runtime
            .list(LABEL_INSTANCE, &self.settings.instance)
            .await?;
        for c in found {
            let user = c
                .labels
                .get(LABEL_USER)
                .and_then(|u| UserName::parse(u).ok());
            let known = match &user {
                Some(u) => self.store.exists(u).await,
                None => false,
            };
            match (user, known) {
                (Some(u), true) if c.running => {
                    // Sessions of a daemon that died without ending them (kill -9): their
                    // clients are gone, so they get the hang-up sshd would give them.
                    let hung_up = self.runtime.hang_up_sessions(&c.id).await.unwrap_or(0);
                    info!(user = %u, container = %c.name, orphaned_sessions = hung_up, "adopting running container");
                    self.send(&u, Request::Adopt)?;
                }
                (Some(_), true) => {}
                _ => warn!(container = %c.name, "container has no known user; leaving it alone"),
            }
        }
        Ok(())
    }

    /// Stops accepting requests; owners finish the operation in hand and exit. Containers
    /// are left as they are: the next start adopts them (see [`Self::reconcile`]).
    pub async fn shutdown(&self) {
        self.tracker.close();
        self.cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("lifecycle owners did not finish in time");
        }
    }

    fn send(self: &Arc<Self>, user: &UserName, req: Request) -> Result<(), LifecycleError> {
        self.owner_tx(user)?
            .send(req)
            .map_err(|_| LifecycleError::ShuttingDown)
    }

    /// The queue of `user`'s owner, which is started if none runs.
    fn owner_tx(
        self: &Arc<Self>,
        user: &UserName,
    ) -> Result<mpsc::UnboundedSender<Request>, LifecycleError> {
        let mut owners = self
            .owners
            .lock()
            .map_err(|_| LifecycleError::ShuttingDown)?;
        if self.tracker.is_closed() {
            return Err(LifecycleError::ShuttingDown);
        }
        let owner = owners
            .entry(user.clone())
            .or_insert_with(|| self.spawn_owner(user.clone()));
        if owner.tx.is_closed() {
            // That owner ended (its user was removed); a user of the same name starts afresh.
            *owner = self.spawn_owner(user.clone());
        }
        Ok(owner.tx.clone())
    }

    fn spawn_owner(self: &Arc<Self>, user: UserName) -> Owner {
        let (tx, rx) = mpsc::unbounded_channel();
        let (sessions_tx, sessions) = watch::channel(0);
        let task = OwnerTask {
            lc: self.clone(),
            name: self.container_name(&user),
            user: user.clone(),
            tx: tx.clone(),
            sessions: 0,
            sessions_tx,
            holds: 0,
            stop_at: None,
            guest: None,
            committing: None,
            running: None,
        };
        self.tracker.spawn_on(
            // Her owner outlives whatever first needed it: its span has no parent.
            task.run(rx)
                .instrument(info_span!(parent: None, "owner", user = %user)),
            &self.spawner,
        );
        Owner { tx, sessions }
    }
}

struct OwnerTask<R> {
    lc: Arc<Lifecycle<R>>,
    user: UserName,
    name: String,
    /// Cloned into leases.
    tx: mpsc::UnboundedSender<Request>,
    sessions: u32,
    sessions_tx: watch::Sender<u32>,
    /// Open SSH connections of the user (not counted as sessions).
    holds: u32,
    stop_at: Option<Instant>,
    /// Serves this user's guest socket while the owner lives.
    guest: Option<AbortOnDropHandle<()>>,
    /// A commit running beside the queue.
    committing: Option<tokio::task::JoinHandle<()>>,
    /// The id of the container last found running (and checked as ours): while the runtime
    /// knows it still runs, a login needs no inspect.
    running: Option<String>,
}

/// Whether an owner goes on after a request.
#[derive(PartialEq)]
enum Served {
    GoOn,
    /// The user is gone; requests still queued fail with a dropped reply.
    Removed,
}

impl<R: Runtime> OwnerTask<R> {
    /// Every user's owner waits here for as long as the daemon runs, so what it holds while
    /// waiting is kept small: each step that waits on the engine is boxed, allocated only
    /// while it runs. Inline, the largest (several KiB) was held by every owner for good,
    /// allocated at the user's first login among the buffers of the logins around it.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        loop {
            let deadline = self.stop_at;
            let req = tokio::select! {
                () = self.lc.cancel.cancelled() => return,
                req = rx.recv() => req,
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.stop_at = None;
                    Box::pin(self.idle_stop()).await;
                    continue;
                }
            };
            let Some(req) = req else { return };
            if Box::pin(self.serve(req)).await == Served::Removed {
                return;
            }
            self.sessions_tx.send_replace(self.sessions);
        }
    }

    async fn serve(&mut self, req: Request) -> Served {
        match req {
            Request::Acquire { reply } => {
                self.stop_at = None;
                match self.ensure_running().await {
                    Ok(id) => {
                        self.sessions += 1;
                        let lease = Lease {
                            container: id,
                            tx: self.tx.clone(),
                        };
                        // A requester that gave up drops the lease, which releases it.
                        let _ = reply.send(Ok(lease));
                    }
                    Err(e) => {
                        error!(error = %e, "cannot provide a running container");
                        let _ = reply.send(Err(e));
                        self.arm_if_idle();
                    }
                }
            }
            Request::Release => {
                self.sessions = self.sessions.saturating_sub(1);
                self.arm_if_idle();
            }
            Request::Hold => {
                self.holds += 1;
                self.stop_at = None;
            }
            Request::Unhold => {
                self.holds = self.holds.saturating_sub(1);
                self.arm_if_idle();
            }
            Request::Adopt => {
                if let Err(e) = self.serve_guest() {
                    error!(error = %e, "adopted container has no guest socket");
                }
                self.arm_if_idle();
            }
            Request::Stop { reply } => {
                self.stop_at = None;
                self.finish_commit().await;
                let r = self.stop_now("stop").await;
                if r.is_err() {
                    self.arm_if_idle();
                }
                let _ = reply.send(r);
            }
            Request::RemoveContainer { reply } => {
                self.stop_at = None;
                self.finish_commit().await;
                let r = self.remove_container().await;
                if r.is_err() {
                    self.arm_if_idle();
                }
                let _ = reply.send(r);
            }
            // Asked for by a session that has ended since (she opens a channel, asks for a
            // commit, closes it, and again): not made. Each would copy her whole container,
            // one after the other, long after she stopped asking.
            Request::Commit { reply } if reply.is_closed() => {}
            Request::Commit { reply } => self.start_commit(reply).await,
            Request::SetDaemonMode { on, reply } => {
                let r = self.set_daemon_mode(on).await;
                let _ = reply.send(r);
            }
            Request::SetSettings { change, reply } => {
                let r = self.set_settings(*change).await;
                let _ = reply.send(r);
            }
            Request::Remove {
                keep_image,
                purge_data,
                reply,
            } => {
                self.finish_commit().await;
                let r = self.remove(keep_image, purge_data).await;
                let removed = r.is_ok();
                let _ = reply.send(r);
                if removed {
                    return Served::Removed;
                }
            }
        }
        Served::GoOn
    }

    fn arm_if_idle(&mut self) {
        if self.sessions == 0 && self.holds == 0 {
            self.stop_at = Some(Instant::now() + self.lc.settings.idle_stop);
        }
    }

    async fn ensure_running(&mut self) -> Result<String, LifecycleError> {
        // The guest socket's directory is a bind source: it must exist before create.
        self.serve_guest()?;
        let rt = self.lc.runtime.clone();
        // A warm login asks the engine nothing: the container this owner last found running
        // (checked as ours then) still runs while its init does. 100 logins at once were 100
        // inspects for dockerd to answer on the same two cores.
        if let Some(id) = &self.running
            && rt.known_running(id)
        {
            return Ok(id.clone());
        }
        self.running = None;
        let existing = rt.inspect(&self.name).await?;
        if let Some(info) = &existing {
            self.check_ours(info)?;
            if info.running {
                self.running = Some(info.id.clone());
                return Ok(info.id.clone());
            }
        }
        // A container is created or started only on the user's own network.
        let network = self.ensure_network().await?;
        let info = match existing {
            Some(info) => info,
            None => {
                let user = self.user.clone();
                let (record, own) = self
                    .lc
                    .store
                    .run(move |s| Ok((s.user(&user)?, s.settings(&user)?)))
                    .await?;
                let image = record.committed_image.unwrap_or(record.image);
                let effective = crate::user_settings::effective(&self.lc.settings.server, &own);
                if effective.gpu_request().is_some()
                    && self.lc.settings.gpu_support != berth_runtime::GpuSupport::Available
                {
                    return Err(LifecycleError::NoGpuRuntime);
                }
                let folders = self.shared_folders(&effective).await?;
                let volumes = if self.lc.settings.home_volume {
                    vec![self.home(image.as_str(), &folders).await?]
                } else {
                    Vec::new()
                };
                let mut spec = self.spec(image.as_str(), &effective, folders);
                spec.volumes = volumes;
                let id = match rt.create(&spec).await {
                    Err(RuntimeError::NetworkNotFound(e)) => {
                        warn!(network = %network, error = %e, "the user's network is gone; making it again");
                        self.ensure_network().await?;
                        rt.create(&spec).await?
                    }
                    r => r?,
                };
                self.lc.settings.audit.record(Event::ContainerCreate {
                    user: self.user.to_string(),
                    container: self.name.clone(),
                    image: image.to_string(),
                });
                ContainerInfo {
                    id,
                    name: self.name.clone(),
                    running: false,
                    labels: spec.labels,
                    networks: vec![network.clone()],
                }
            }
        };
        if !info.running {
            if info.networks != [network.as_str()] {
                // A container of an older Berth, on the shared network: it moves to the
                // user's own, keeping everything in it.
                rt.reattach_network(&info.id, &info.networks, &network)
                    .await?;
                info!(from = ?info.networks, to = %network, "container moved to the user's own network");
                self.remove_shared_network(&info.networks).await;
            }
            match rt.start(&info.id).await {
                Err(RuntimeError::NetworkNotFound(e)) => {
                    warn!(network = %network, error = %e, "the user's network is gone; making it again");
                    self.ensure_network().await?;
                    rt.reattach_network(&info.id, &[], &network).await?;
                    rt.start(&info.id).await?;
                }
                r => r?,
            }
            self.lc.settings.audit.record(Event::ContainerStart {
                user: self.user.to_string(),
                container: self.name.clone(),
            });
        }
        self.running = Some(info.id.clone());
        Ok(info.id)
    }

    /// Makes sure the user's own network exists (made again after a `docker network rm` or
    /// a prune); returns its name.
    async fn ensure_network(&self) -> Result<String, LifecycleError> {
        let s = &self.lc.settings;
        let spec = s.network.spec(&self.user, &s.instance);
        self.lc.runtime.ensure_network(&spec).await?;
        Ok(spec.name)
    }

    /// The network every container shared before issue 14, once the last container on it
    /// has left (the engine refuses while any is attached).
    async fn remove_shared_network(&self, left: &[String]) {
        let shared = &self.lc.settings.network.name;
        if left.iter().any(|n| n == shared) && self.lc.runtime.remove_network(shared).await.is_ok()
        {
            info!(network = %shared, "the shared network of an older Berth is removed");
        }
    }

    fn check_ours(&self, info: &ContainerInfo) -> Result<(), LifecycleError> {
        let ours = info.labels.get(LABEL_INSTANCE) == Some(&self.lc.settings.instance)
            && info.labels.get(LABEL_USER).map(String::as_str) == Some(self.user.as_str());
        if ours {
            Ok(())
        } else {
            Err(LifecycleError::Foreign(info.name.clone()))
        }
    }

    /// The user's shared folders, each source checked again (a directory may have become a
    /// symlink since it was set) and resolved.
    async fn shared_folders(
        &self,
        effective: &crate::user_settings::Effective,
    ) -> Result<Vec<BindMount>, LifecycleError> {
        let rules = self.lc.settings.sources.clone();
        let wanted: Vec<BindMount> = effective.mounts.iter().map(|(m, _)| m.clone()).collect();
        let checked = tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|m| {
                    Ok(BindMount {
                        source: rules.check(&m.source)?,
                        ..m
                    })
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .await
        .map_err(|e| LifecycleError::MountRefused(e.to_string()))?;
        checked.map_err(|e| {
            error!(error = %e, "a shared folder is refused; no container made");
            LifecycleError::MountRefused(e)
        })
    }

    fn spec(
        &self,
        image: &str,
        effective: &crate::user_settings::Effective,
        folders: Vec<BindMount>,
    ) -> ContainerSpec {
        let s = &self.lc.settings;
        ContainerSpec {
            name: self.name.clone(),
            image: image.to_owned(),
            hostname: self.user.to_string(),
            labels: HashMap::from([
                (LABEL_USER.to_owned(), self.user.to_string()),
                (LABEL_INSTANCE.to_owned(), s.instance.clone()),
            ]),
            guest_dir: s.guest_dir.clone(),
            limits: effective.limits(&s.server.limits),
            gpus: effective.gpu_request(),
            network: s.network.user_network(&self.user),
            mounts: std::iter::once(BindMount {
                source: s.run_dir.join(self.user.as_str()),
                target: RUN_DIR.to_owned(),
                read_only: true,
            })
            .chain(Word::ALL.iter().map(|w| BindMount {
                source: s.guest_binary.clone(),
                target: format!("/usr/local/bin/{}", w.as_str()),
                read_only: true,
            }))
            .chain(folders)
            .collect(),
            volumes: Vec::new(),
        }
    }

    /// The user's home volume (made when missing) and where it goes: root's home in
    /// `image`'s `/etc/passwd` where that can be mounted over, else [`DEFAULT_HOME`]. A
    /// volume of that name that is not hers is never used.
    async fn home(
        &self,
        image: &str,
        folders: &[BindMount],
    ) -> Result<VolumeMount, LifecycleError> {
        let rt = &self.lc.runtime;
        let target = match tokio::time::timeout(HOME_PROBE_DEADLINE, rt.root_home(image)).await {
            Ok(Ok(home)) => home_target(home.as_deref()),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                warn!(
                    image,
                    "reading the image's /etc/passwd took too long; home at {DEFAULT_HOME}"
                );
                DEFAULT_HOME.to_owned()
            }
        };
        if let Some(f) = folders.iter().find(|f| f.target == target) {
            return Err(LifecycleError::MountRefused(format!(
                "the shared folder {} is at {target}, where the home volume goes",
                f.source.display()
            )));
        }
        let spec = self.lc.home_volume_spec(&self.user);
        let name = spec.name.clone();
        let labels = rt.ensure_volume(&spec).await?;
        if labels.get(LABEL_USER).map(String::as_str) != Some(self.user.as_str()) {
            return Err(LifecycleError::Foreign(name));
        }
        Ok(VolumeMount { name, target })
    }

    async fn idle_stop(&mut self) {
        if self.sessions > 0 || self.holds > 0 {
            return;
        }
        match self.lc.store.user(&self.user).await {
            Ok(u) if u.daemon_mode => return,
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read user settings; stopping anyway"),
        }
        match self.lc.runtime.inspect(&self.name).await {
            Ok(Some(info)) if info.running && self.check_ours(&info).is_ok() => {
                match self
                    .lc
                    .runtime
                    .stop(&info.id, self.lc.settings.stop_timeout_secs)
                    .await
                {
                    Ok(()) => self.lc.settings.audit.record(Event::ContainerStop {
                        user: self.user.to_string(),
                        container: self.name.clone(),
                        reason: "idle",
                    }),
                    Err(e) => {
                        error!(error = %e, "idle stop failed; trying again after the grace period");
                        self.arm_if_idle();
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                error!(error = %e, "idle stop: cannot inspect the container; trying again later");
                self.arm_if_idle();
            }
        }
    }

    async fn remove(
        &mut self,
        keep_image: bool,
        purge_data: bool,
    ) -> Result<Removed, LifecycleError> {
        self.stop_at = None;
        self.remove_container().await?;
        let network = self.lc.settings.network.user_network(&self.user);
        if let Err(e) = self.lc.runtime.remove_network(&network).await {
            warn!(network = %network, error = %e, "the user's network is left behind");
        }
        let home = self.lc.home_volume_of(&self.user).await?;
        let record = self.lc.store.user(&self.user).await?;
        if !keep_image
            && let Some(image) = &record.committed_image
            && !self.named_by_another_user(image).await?
        {
            self.lc.runtime.remove_image(image.as_str()).await?;
            self.lc.settings.audit.record(Event::ImageRemove {
                user: Some(self.user.to_string()),
                image: image.to_string(),
                id: None,
            });
        }
        self.lc.store.remove_user(&self.user).await?;
        self.guest = None;
        let _ = std::fs::remove_dir_all(self.lc.settings.run_dir.join(self.user.as_str()));
        // Her data goes last, once nothing else of hers can fail, and only a volume that is
        // this instance's home of hers by every label.
        let mut home_removed = false;
        if let Some(name) = &home {
            if purge_data {
                if self.lc.is_own_home(name, &self.user).await? {
                    match self.lc.runtime.remove_volume(name).await {
                        Ok(r) => home_removed = r,
                        Err(e) => warn!(volume = %name, error = %e, "her home volume is kept"),
                    }
                } else {
                    warn!(volume = %name, "not this instance's home volume: kept");
                }
            }
            info!(volume = %name, removed = home_removed, "home volume");
        }
        Ok(Removed { home, home_removed })
    }

    /// Whether a user other than this one is set to `image` (as her image or her commit).
    async fn named_by_another_user(&self, image: &ImageName) -> Result<bool, LifecycleError> {
        let full = image.full();
        let users = self.lc.store.users().await?;
        let other = users.iter().find(|u| {
            u.name != self.user
                && (u.image.full() == full
                    || u.committed_image.as_ref().is_some_and(|c| c.full() == full))
        });
        if let Some(u) = other {
            warn!(image = %full, other = %u.name, "image kept: another user is set to it");
        }
        Ok(other.is_some())
    }

    /// Removes the container if there is one (stopping it first).
    async fn remove_container(&mut self) -> Result<bool, LifecycleError> {
        let rt = &self.lc.runtime;
        let Some(info) = rt.inspect(&self.name).await? else {
            return Ok(false);
        };
        self.check_ours(&info)?;
        if info.running {
            rt.stop(&info.id, self.lc.settings.stop_timeout_secs)
                .await?;
        }
        rt.remove(&info.id).await?;
        self.lc.settings.audit.record(Event::ContainerRemove {
            user: self.user.to_string(),
            container: self.name.clone(),
        });
        self.remove_dropped_commit().await;
        self.remove_orphaned_commits().await;
        Ok(true)
    }

    /// Her earlier commits that no tag names any more: a commit replaces her image, and the
    /// one it replaces is removed then unless her container was made from it; once that
    /// container is gone, nothing else would remove it (hundreds of MB each for a Debian
    /// user). Found by the labels a commit inherits from her container (set by the daemon,
    /// not by her); the engine refuses (and it is kept) while a container uses one or a
    /// later image is built on it, and removing the last of those takes its untagged
    /// parents with it. An image some user is set to by its id (`--image sha256:...`, an
    /// admin going back to an earlier commit) is kept.
    async fn remove_orphaned_commits(&self) {
        let labels = [
            (LABEL_INSTANCE, self.lc.instance()),
            (LABEL_USER, self.user.as_str()),
        ];
        let orphans = match self.lc.runtime.dangling_images(&labels).await {
            Ok(ids) if ids.is_empty() => return,
            Ok(ids) => ids,
            Err(e) => {
                debug!(error = %e, "earlier commits not looked for");
                return;
            }
        };
        let Ok(users) = self.lc.store.users().await else {
            return;
        };
        let named: Vec<String> = users
            .iter()
            .flat_map(|u| [Some(&u.image), u.committed_image.as_ref()])
            .flatten()
            .filter_map(|i| id_prefix(i.as_str()))
            .collect();
        for id in orphans {
            let hex = id.strip_prefix("sha256:").unwrap_or(&id);
            if named.iter().any(|n| hex.starts_with(n.as_str())) {
                info!(image = %id, "an earlier commit a user is set to by its id: kept");
                continue;
            }
            match self.lc.runtime.remove_image(&id).await {
                Ok(()) => self.lc.settings.audit.record(Event::ImageRemove {
                    user: Some(self.user.to_string()),
                    image: id.clone(),
                    id: Some(id),
                }),
                Err(e) => debug!(image = %id, error = %e, "an earlier commit kept"),
            }
        }
    }

    /// Her commit's image once she no longer has it (`--drop-commit` while her container,
    /// made from it, kept it): removed with the container it was kept for.
    async fn remove_dropped_commit(&self) {
        let image = format!("{}:{}", self.lc.settings.commit_repository, self.user);
        let Ok(record) = self.lc.store.user(&self.user).await else {
            return;
        };
        if record.committed_image.is_some()
            || !self.lc.runtime.image_exists(&image).await.unwrap_or(false)
        {
            return;
        }
        let Ok(parsed) = ImageName::parse(&image) else {
            return;
        };
        if self.named_by_another_user(&parsed).await.unwrap_or(true) {
            return;
        }
        match self.lc.runtime.remove_image(&image).await {
            Ok(()) => self.lc.settings.audit.record(Event::ImageRemove {
                user: Some(self.user.to_string()),
                image,
                id: None,
            }),
            Err(e) => tracing::debug!(image = %image, error = %e, "dropped commit kept"),
        }
    }

    /// Stops the container if it runs; `reason` goes to the audit log.
    async fn stop_now(&mut self, reason: &'static str) -> Result<bool, LifecycleError> {
        let rt = &self.lc.runtime;
        match rt.inspect(&self.name).await? {
            Some(info) if info.running => {
                self.check_ours(&info)?;
                rt.stop(&info.id, self.lc.settings.stop_timeout_secs)
                    .await?;
                self.lc.settings.audit.record(Event::ContainerStop {
                    user: self.user.to_string(),
                    container: self.name.clone(),
                    reason,
                });
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Starts a commit in its own task, so that logins and the rest of the queue are not
    /// held up while a big container is copied. One commit at a time: a second waits for
    /// the first. Stop and remove wait for a running commit to finish.
    async fn start_commit(&mut self, reply: oneshot::Sender<Result<Committed, LifecycleError>>) {
        self.finish_commit().await;
        // Its asker may have gone while the commit before it ran.
        if reply.is_closed() {
            return;
        }
        let info = match self.lc.runtime.inspect(&self.name).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                let _ = reply.send(Err(LifecycleError::NoContainer("commit")));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        if let Err(e) = self.check_ours(&info) {
            let _ = reply.send(Err(e));
            return;
        }
        let lc = self.lc.clone();
        let user = self.user.clone();
        let name = self.name.clone();
        let task = tokio::spawn(
            async move {
                let r = commit(&lc, &user, &name, &info.id).await;
                let _ = reply.send(r);
            }
            .in_current_span(),
        );
        self.committing = Some(task);
    }

    async fn finish_commit(&mut self) {
        if let Some(task) = self.committing.take() {
            let _ = task.await;
        }
    }

    async fn set_settings(
        &mut self,
        change: crate::user_settings::Change,
    ) -> Result<(), LifecycleError> {
        if change.touches_settings() {
            self.set_limits_and_folders(&change).await?;
        }
        if change.image.is_some() || change.drop_commit {
            // A commit still running would set her committed image again when it ends.
            self.finish_commit().await;
            self.set_image(change.image.as_ref(), change.drop_commit)
                .await?;
        }
        Ok(())
    }

    /// `berth user set --image IMG [--drop-commit]`: her base image for her next new
    /// container; her committed image is kept (her next container is still made from it)
    /// unless `drop_commit`, which removes it unless another user is set to it or a
    /// container still uses it.
    async fn set_image(
        &mut self,
        image: Option<&ImageName>,
        drop_commit: bool,
    ) -> Result<(), LifecycleError> {
        let (user, new) = (self.user.clone(), image.cloned());
        let (record, dropped) = self
            .lc
            .store
            .run(move |s| {
                let before = s.user(&user)?;
                if let Some(image) = &new {
                    s.set_image(&user, image)?;
                }
                let dropped = if drop_commit {
                    s.set_committed_image(&user, None)?;
                    before.committed_image
                } else {
                    None
                };
                Ok((s.user(&user)?, dropped))
            })
            .await?;
        self.lc.settings.audit.record(Event::UserImage {
            user: self.user.to_string(),
            image: record.image.to_string(),
            dropped_commit: dropped.as_ref().map(ToString::to_string),
        });
        if let Some(old) = &dropped
            && !self.named_by_another_user(old).await?
        {
            match self.lc.runtime.remove_image(old.as_str()).await {
                Ok(()) => self.lc.settings.audit.record(Event::ImageRemove {
                    user: Some(self.user.to_string()),
                    image: old.to_string(),
                    id: None,
                }),
                // Her container was made from it: it goes with the container.
                Err(e) => info!(image = %old, error = %e, "dropped commit kept: still in use"),
            }
        }
        Ok(())
    }

    async fn set_limits_and_folders(
        &mut self,
        change: &crate::user_settings::Change,
    ) -> Result<(), LifecycleError> {
        let server = &self.lc.settings.server;
        let current = self.lc.store.settings(&self.user).await?;
        let targets: Vec<String> = server.mounts.iter().map(|m| m.target.clone()).collect();
        let new = crate::user_settings::apply(&self.user, &current, change, &targets)
            .map_err(LifecycleError::BadSetting)?;
        if change.is_live() {
            self.apply_live(&new).await?;
        }
        let (user, stored) = (self.user.clone(), new.clone());
        self.lc
            .store
            .run(move |s| s.set_settings(&user, &stored))
            .await?;
        self.lc.settings.audit.record(Event::UserSettings {
            user: self.user.to_string(),
            memory_bytes: new.memory_bytes,
            nano_cpus: new.nano_cpus,
            pids: new.pids,
            gpus: new.gpus.clone(),
            mounts: new
                .mounts
                .iter()
                .map(|m| {
                    format!(
                        "{}:{}{}",
                        m.source,
                        m.target,
                        if m.read_only { ":ro" } else { "" }
                    )
                })
                .collect(),
        });
        Ok(())
    }

    /// Sets the container's memory and CPU limits to those of `new`, where they are limits
    /// and differ from what it has.
    async fn apply_live(&self, new: &berth_store::UserSettings) -> Result<(), LifecycleError> {
        let rt = &self.lc.runtime;
        let Some(info) = rt.inspect(&self.name).await? else {
            return Ok(());
        };
        self.check_ours(&info)?;
        let Some(applied) = rt.applied(&self.name).await? else {
            return Ok(());
        };
        let want = crate::user_settings::effective(&self.lc.settings.server, new)
            .limits(&self.lc.settings.server.limits);
        let change = |want: Option<i64>, have: Option<i64>| want.filter(|w| Some(*w) != have);
        let memory = change(want.memory_bytes, applied.memory_bytes);
        let cpus = change(want.nano_cpus, applied.nano_cpus);
        if memory.is_some() || cpus.is_some() {
            rt.update_limits(&info.id, memory, cpus).await?;
            info!(?memory, ?cpus, "limits applied to the container");
        }
        Ok(())
    }

    async fn set_daemon_mode(&mut self, on: bool) -> Result<(), LifecycleError> {
        let user = self.user.clone();
        let changed = self
            .lc
            .store
            .run(move |store| {
                let was = store.user(&user)?.daemon_mode;
                if was != on {
                    store.set_daemon_mode(&user, on)?;
                }
                Ok(was != on)
            })
            .await?;
        if changed {
            self.lc.settings.audit.record(Event::DaemonMode {
                user: self.user.to_string(),
                on,
            });
        }
        if on {
            self.stop_at = None;
        } else {
            self.arm_if_idle();
        }
        Ok(())
    }

    /// Starts serving this user's guest socket unless it is served already. The socket's
    /// directory is what the container mounts, so a socket made again after a daemon
    /// restart appears in a running container.
    fn serve_guest(&mut self) -> Result<(), LifecycleError> {
        if self.guest.as_ref().is_some_and(|g| !g.is_finished()) {
            return Ok(());
        }
        let dir = self.lc.settings.run_dir.join(self.user.as_str());
        let listener = crate::words_socket::bind(&dir).map_err(LifecycleError::GuestSocket)?;
        let handle = tokio::spawn(
            crate::words_socket::serve(listener, self.lc.clone(), self.user.clone())
                .instrument(info_span!("guest", user = %self.user)),
        );
        self.guest = Some(AbortOnDropHandle::new(handle));
        Ok(())
    }
}

/// Saves container `id` of `user` as `REPOSITORY:USER` (a tag accepts every Berth user
/// name; a repository path component does not) and records it as her image. The image it
/// replaces is removed when nothing uses it any more, so commits do not pile up.
async fn commit<R: Runtime>(
    lc: &Lifecycle<R>,
    user: &UserName,
    name: &str,
    id: &str,
) -> Result<Committed, LifecycleError> {
    let repo = &lc.settings.commit_repository;
    let image = format!("{repo}:{user}");
    let parsed = ImageName::parse(&image)
        .map_err(|e| LifecycleError::BadImageName(format!("{image}: {e}")))?;
    let previous = lc.runtime.image_id(&image).await?;
    let info = lc.runtime.commit(id, repo, user.as_str()).await?;
    let new_id = info.id.clone();
    lc.store.set_committed_image(user, Some(parsed)).await?;
    lc.settings.audit.record(Event::ContainerCommit {
        user: user.to_string(),
        container: name.to_string(),
        image: image.to_string(),
        id: new_id.to_string(),
        size_bytes: info.size_bytes,
        added_bytes: info.added_bytes,
        layers: info.layers,
        flattened: info.flattened,
    });
    if let Some(old) = previous.filter(|old| *old != new_id)
        && let Err(e) = lc.runtime.remove_image(&old).await
    {
        // Still used (her container was made from it): it goes when the container does.
        tracing::debug!(image = %old, error = %e, "previous commit kept");
    }
    Ok(Committed {
        image,
        id: new_id,
        info,
    })
}

/// The hex digits of an image named by its id (`sha256:HEX` or bare `HEX`, at least 12 of
/// them, as the engine accepts a prefix), lower-cased; `None` for a name.
fn id_prefix(name: &str) -> Option<String> {
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    (hex.len() >= 12 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// Where a home volume goes, given root's home in the image's `/etc/passwd`: there when
/// it is a directory that may be mounted over (see [`crate::mounts::check_target`]; `/root`
/// itself may), else [`DEFAULT_HOME`].
fn home_target(home: Option<&str>) -> String {
    match home {
        Some(DEFAULT_HOME) | None => DEFAULT_HOME.to_owned(),
        Some(h) => crate::mounts::check_target(h).unwrap_or_else(|e| {
            warn!(home = %h.escape_debug(), error = %e, "root's home in the image cannot take a volume; home at {DEFAULT_HOME}");
            DEFAULT_HOME.to_owned()
        }),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use berth_proto::{AuthorizedKey, ImageName};
    use berth_runtime::FakeRuntime;

    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl t";

    fn setup(
        idle_ms: u64,
        rt: FakeRuntime,
        users: &[&str],
    ) -> (Arc<Lifecycle<FakeRuntime>>, Arc<FakeRuntime>, Store) {
        let store = Store::open_in_memory().unwrap();
        for u in users {
            store
                .add_user(
                    &UserName::parse(u).unwrap(),
                    &ImageName::parse("img").unwrap(),
                    &[AuthorizedKey::parse_line(KEY).unwrap()],
                )
                .unwrap();
        }
        let rt = Arc::new(rt);
        let run_dir = std::env::temp_dir().join(format!(
            "berth-lc-{}-{}",
            std::process::id(),
            RUN_DIRS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let settings = Settings::for_tests(
            run_dir,
            Duration::from_millis(idle_ms),
            Arc::new(crate::audit::Audit::log_only()),
        );
        (
            Lifecycle::new(rt.clone(), store.clone(), settings),
            rt,
            store,
        )
    }

    static RUN_DIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn alice() -> UserName {
        UserName::parse("alice").unwrap()
    }

    fn running(rt: &FakeRuntime, name: &str) -> Option<bool> {
        rt.container(name).map(|c| c.running)
    }

    async fn settle(lc: &Arc<Lifecycle<FakeRuntime>>, user: &UserName, n: u32) {
        for _ in 0..100 {
            if lc.sessions(user) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("sessions never reached {n}");
    }

    /// The admin socket has a runtime of its own. An owner that one of its requests starts
    /// must still run on the daemon's runtime, or her logins would wait on a thread that is
    /// serving something else (or nothing, as here).
    #[test]
    fn an_owner_started_from_another_runtime_runs_on_the_daemon_s() {
        let daemon = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (lc, rt, _store) = daemon
            .block_on(async { setup(60_000, FakeRuntime::with_images(&["img"]), &["alice"]) });
        let admin = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Her owner starts at the admin runtime's request; nothing drives that runtime after.
        let hold = admin.block_on(async { lc.hold(&alice()).unwrap() });
        let lease = daemon
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), lc.acquire(&alice())).await
            })
            .expect("her owner never answered: it runs on a runtime nobody drives")
            .unwrap();
        assert_eq!(running(&rt, "t-alice"), Some(true));
        daemon.block_on(async move {
            drop(lease);
            drop(hold);
            settle(&lc, &alice(), 0).await;
        });
    }

    #[test]
    fn an_image_named_by_its_id_is_known_by_its_digits() {
        let full = "sha256:53a8808dfb33c0ffee00112233445566778899aabbccddeeff0011223344556";
        assert_eq!(id_prefix(full).as_deref(), full.strip_prefix("sha256:"));
        assert_eq!(id_prefix("53A8808DFB33").as_deref(), Some("53a8808dfb33"));
        // Names, short ids (the engine wants 12 digits at least) and tags are not ids.
        for name in [
            "debian:12",
            "berth/users:alice",
            "53a8808",
            "53a8808dfb33:latest",
            "cafe",
        ] {
            assert_eq!(id_prefix(name), None, "{name}");
        }
    }

    #[test]
    fn commit_images_are_known_by_their_repository_under_any_spelling() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (lc, _, _) = setup(50, FakeRuntime::with_images(&["img"]), &[]);
        let is = |s: &str| lc.is_commit_image(&ImageName::parse(s).unwrap());
        assert!(is("berth/users:alice"));
        assert!(is("docker.io/berth/users:alice"));
        assert!(is("berth/users"));
        assert!(!is("berth/users-x:alice"));
        assert!(!is("debian:12"));
        assert!(!is("berth/usersalice"));
    }

    /// Bytes of the future `f` returns.
    fn future_size<A, B, F, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// What every user's owner holds for as long as the daemon runs: its task's future while
    /// it waits, and its queue, whose blocks hold 32 requests each.
    #[test]
    fn an_owner_waiting_holds_little() {
        let docker = future_size(OwnerTask::<berth_runtime::DockerRuntime>::run);
        let fake = future_size(OwnerTask::<FakeRuntime>::run);
        assert!(docker <= 1024, "an owner's task holds {docker} bytes");
        assert!(fake <= 1024, "an owner's task holds {fake} bytes");
        let request = std::mem::size_of::<Request>();
        assert!(request <= 32, "a request is {request} bytes");
    }

    /// A commit asked for by a session that is gone by the time its turn comes is not made
    /// (she could queue them by the thousand, each a copy of her whole container).
    #[tokio::test(start_paused = true)]
    async fn a_commit_nobody_waits_for_any_more_is_not_made() {
        let (lc, rt, _) = setup(1000, FakeRuntime::with_images(&["img"]), &["alice"]);
        let lease = lc.acquire(&alice()).await.unwrap();
        for _ in 0..50 {
            // Asked (queued at the first poll), then given up at once.
            let _ = tokio::time::timeout(Duration::ZERO, lc.commit(&alice())).await;
        }
        lc.commit(&alice()).await.unwrap();
        assert_eq!(FakeRuntime::count(&rt.commits), 1);
        drop(lease);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_acquires_create_one_container() {
        let rt = FakeRuntime::with_images(&["img"]).with_create_delay(Duration::from_millis(50));
        let (lc, rt, _) = setup(100, rt, &["alice"]);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let lc = lc.clone();
                tokio::spawn(async move { lc.acquire(&alice()).await })
            })
            .collect();
        let mut leases = Vec::new();
        for t in tasks {
            leases.push(t.await.unwrap().unwrap());
        }
        assert_eq!(FakeRuntime::count(&rt.creates), 1);
        assert!(
            leases
                .iter()
                .all(|l| l.container() == leases[0].container())
        );
        settle(&lc, &alice(), 20).await;
        drop(leases);
        settle(&lc, &alice(), 0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(running(&rt, "t-alice"), Some(false));
        assert_eq!(FakeRuntime::count(&rt.stops), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_warm_login_asks_the_engine_nothing_until_the_container_stops() {
        let (lc, rt, _) = setup(50, FakeRuntime::with_images(&["img"]), &["alice"]);
        let first = lc.acquire(&alice()).await.unwrap();
        let asked = FakeRuntime::count(&rt.inspects);
        for _ in 0..5 {
            drop(lc.acquire(&alice()).await.unwrap());
        }
        assert_eq!(
            FakeRuntime::count(&rt.inspects),
            asked,
            "a warm login inspected"
        );
        drop(first);
        settle(&lc, &alice(), 0).await;
        // Stopped behind the owner's back: the next login asks, and starts it again.
        let mut info = rt.container("t-alice").unwrap();
        info.running = false;
        rt.insert(info);
        let lease = lc.acquire(&alice()).await.unwrap();
        assert!(FakeRuntime::count(&rt.inspects) > asked);
        assert_eq!(running(&rt, "t-alice"), Some(true));
        assert_eq!(FakeRuntime::count(&rt.starts), 2);
        drop(lease);
    }

    #[tokio::test(start_paused = true)]
    async fn each_user_has_a_network_of_her_own_made_again_when_removed() {
        let (lc, rt, _) = setup(50, FakeRuntime::with_images(&["img"]), &["alice"]);
        // Gone before the first login: made before the create.
        rt.vanish_networks();
        drop(lc.acquire(&alice()).await.unwrap());
        assert_eq!(FakeRuntime::count(&rt.creates), 1);
        assert_eq!(rt.container("t-alice").unwrap().networks, ["net-alice"]);
        assert_eq!(
            rt.list_networks(LABEL_USER, "alice").await.unwrap(),
            ["net-alice"]
        );
        settle(&lc, &alice(), 0).await;
        assert!(wait_stopped(&rt, "t-alice").await);
        // Gone under a stopped container: made again before the start.
        rt.vanish_networks();
        let lease = lc.acquire(&alice()).await.unwrap();
        assert_eq!(running(&rt, "t-alice"), Some(true));
        drop(lease);
        settle(&lc, &alice(), 0).await;
        assert!(wait_stopped(&rt, "t-alice").await);
        // Her network goes with her.
        lc.remove(&alice(), false, false).await.unwrap();
        assert!(
            rt.list_networks(LABEL_USER, "alice")
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_on_the_shared_network_moves_to_its_users_own_when_started() {
        let rt = FakeRuntime::with_images(&["img"]);
        rt.insert(ContainerInfo {
            id: "old".into(),
            name: "t-alice".into(),
            running: false,
            labels: HashMap::from([
                (LABEL_USER.to_owned(), "alice".to_owned()),
                (LABEL_INSTANCE.to_owned(), "inst".to_owned()),
            ]),
            networks: vec!["net".into()],
        });
        let (lc, rt, _) = setup(50, rt, &["alice"]);
        let lease = lc.acquire(&alice()).await.unwrap();
        assert_eq!(lease.container(), "old");
        assert_eq!(FakeRuntime::count(&rt.reattaches), 1);
        assert_eq!(rt.container("t-alice").unwrap().networks, ["net-alice"]);
        drop(lease);
        settle(&lc, &alice(), 0).await;
        assert!(wait_stopped(&rt, "t-alice").await);
        // Already on its own: not moved again.
        drop(lc.acquire(&alice()).await.unwrap());
        assert_eq!(FakeRuntime::count(&rt.reattaches), 1);
    }

    async fn wait_stopped(rt: &FakeRuntime, name: &str) -> bool {
        for _ in 0..100 {
            if running(rt, name) == Some(false) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(start_paused = true)]
    async fn an_acquire_in_the_grace_period_cancels_the_stop() {
        let (lc, rt, _) = setup(300, FakeRuntime::with_images(&["img"]), &["alice"]);
        drop(lc.acquire(&alice()).await.unwrap());
        tokio::time::sleep(Duration::from_millis(150)).await;
        let lease = lc.acquire(&alice()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            running(&rt, "t-alice"),
            Some(true),
            "stopped under an open session"
        );
        assert_eq!(FakeRuntime::count(&rt.stops), 0);
        drop(lease);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(running(&rt, "t-alice"), Some(false));
        // The next acquire starts the same container again.
        let _lease = lc.acquire(&alice()).await.unwrap();
        assert_eq!(running(&rt, "t-alice"), Some(true));
        assert_eq!(FakeRuntime::count(&rt.creates), 1);
        assert_eq!(FakeRuntime::count(&rt.starts), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_defers_the_idle_stop_without_counting_as_a_session() {
        let (lc, rt, _) = setup(100, FakeRuntime::with_images(&["img"]), &["alice"]);
        let hold = lc.hold(&alice()).unwrap();
        drop(lc.acquire(&alice()).await.unwrap());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(running(&rt, "t-alice"), Some(true));
        assert_eq!(lc.sessions(&alice()), 0);
        drop(hold);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(running(&rt, "t-alice"), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn daemon_mode_keeps_it_running() {
        let (lc, rt, store) = setup(50, FakeRuntime::with_images(&["img"]), &["alice"]);
        drop(lc.acquire(&alice()).await.unwrap());
        let conn_store = store.clone();
        tokio::task::spawn_blocking(move || conn_store.set_daemon_mode(&alice(), true))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(running(&rt, "t-alice"), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn remove_with_sessions_open_and_after() {
        let (lc, rt, store) = setup(50, FakeRuntime::with_images(&["img"]), &["alice"]);
        let lease = lc.acquire(&alice()).await.unwrap();
        lc.remove(&alice(), false, false).await.unwrap();
        assert!(rt.container("t-alice").is_none());
        assert!(matches!(
            store.user(&alice()),
            Err(StoreError::UserNotFound(_))
        ));
        drop(lease); // a late release must not upset anything
        // A new acquire fails: the user is gone, and no container is made.
        let err = lc.acquire(&alice()).await.err().unwrap();
        assert!(
            matches!(err, LifecycleError::Store(StoreError::UserNotFound(_))),
            "{err}"
        );
        assert!(rt.container("t-alice").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_foreign_container_is_never_touched() {
        let rt = FakeRuntime::with_images(&["img"]);
        rt.insert(ContainerInfo {
            id: "other".into(),
            name: "t-alice".into(),
            running: true,
            labels: HashMap::from([(LABEL_USER.to_owned(), "alice".to_owned())]),
            networks: vec![],
        });
        let (lc, rt, _) = setup(50, rt, &["alice"]);
        assert!(matches!(
            lc.acquire(&alice()).await,
            Err(LifecycleError::Foreign(_))
        ));
        assert!(matches!(
            lc.remove(&alice(), false, false).await,
            Err(LifecycleError::Foreign(_))
        ));
        assert_eq!(running(&rt, "t-alice"), Some(true));
        assert_eq!(
            FakeRuntime::count(&rt.stops) + FakeRuntime::count(&rt.removes),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn missing_image_fails_cleanly() {
        let (lc, rt, _) = setup(50, FakeRuntime::with_images(&[]), &["alice"]);
        let err = lc.acquire(&alice()).await.err().unwrap();
        assert!(
            matches!(err, LifecycleError::Runtime(RuntimeError::ImageNotFound(_))),
            "{err}"
        );
        assert!(rt.container("t-alice").is_none());
        assert_eq!(lc.sessions(&alice()), 0);
    }

    fn volumes_of(rt: &FakeRuntime, name: &str) -> Vec<VolumeMount> {
        rt.applied_volumes(name)
    }

    #[tokio::test(start_paused = true)]
    async fn the_home_volume_is_made_once_and_outlives_container_and_user() {
        let (lc, rt, store) = setup(50, FakeRuntime::with_images(&["img"]), &["alice"]);
        drop(lc.acquire(&alice()).await.unwrap());
        let home = VolumeMount {
            name: "t-home-alice".into(),
            target: "/root".into(),
        };
        assert_eq!(volumes_of(&rt, "t-alice"), std::slice::from_ref(&home));
        let labels = rt.volume_labels("t-home-alice").await.unwrap().unwrap();
        assert_eq!(labels.get(LABEL_USER).map(String::as_str), Some("alice"));
        assert_eq!(labels.get(LABEL_INSTANCE).map(String::as_str), Some("inst"));
        assert!(labels.contains_key(LABEL_HOME));
        // A new container gets the same volume.
        assert!(lc.remove_container(&alice()).await.unwrap());
        drop(lc.acquire(&alice()).await.unwrap());
        assert_eq!(volumes_of(&rt, "t-alice"), std::slice::from_ref(&home));
        assert_eq!(rt.volume_names(), ["t-home-alice"]);
        // `user rm` keeps it; she gets it back when she is added again.
        let removed = lc.remove(&alice(), false, false).await.unwrap();
        assert_eq!(
            removed,
            Removed {
                home: Some("t-home-alice".into()),
                home_removed: false
            }
        );
        assert_eq!(rt.volume_names(), ["t-home-alice"]);
        store
            .add_user(
                &alice(),
                &ImageName::parse("img").unwrap(),
                &[AuthorizedKey::parse_line(KEY).unwrap()],
            )
            .unwrap();
        drop(lc.acquire(&alice()).await.unwrap());
        assert_eq!(volumes_of(&rt, "t-alice"), [home]);
        // --purge-data: gone with her.
        let removed = lc.remove(&alice(), false, true).await.unwrap();
        assert!(removed.home_removed);
        assert!(rt.volume_names().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_home_goes_where_the_images_passwd_says_when_it_may() {
        let rt = FakeRuntime::with_images(&["img"]);
        rt.set_root_home("img", Some("/home/admin"));
        let (lc, rt, _) = setup(50, rt, &["alice"]);
        drop(lc.acquire(&alice()).await.unwrap());
        assert_eq!(volumes_of(&rt, "t-alice")[0].target, "/home/admin");
        // A home that would shadow the system, or none at all: /root.
        for home in [
            Some("/etc"),
            Some("/"),
            Some("../x"),
            Some("/usr/lib"),
            None,
        ] {
            rt.set_root_home("img", home);
            lc.remove_container(&alice()).await.unwrap();
            drop(lc.acquire(&alice()).await.unwrap());
            assert_eq!(volumes_of(&rt, "t-alice")[0].target, "/root", "{home:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_volume_of_that_name_that_is_not_hers_is_never_used() {
        let rt = FakeRuntime::with_images(&["img"]);
        rt.ensure_volume(&VolumeSpec {
            name: "t-home-alice".into(),
            labels: HashMap::from([(LABEL_USER.to_owned(), "bob".to_owned())]),
            size_bytes: None,
        })
        .await
        .unwrap();
        let (lc, rt, _) = setup(50, rt, &["alice"]);
        let err = lc.acquire(&alice()).await.err().unwrap();
        assert!(matches!(err, LifecycleError::Foreign(_)), "{err}");
        assert!(rt.container("t-alice").is_none());
        // Nor removed with her.
        let removed = lc.remove(&alice(), false, true).await.unwrap();
        assert_eq!(removed.home, None);
        assert_eq!(rt.volume_names(), ["t-home-alice"]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_home_volumes_the_home_is_the_containers() {
        let store = Store::open_in_memory().unwrap();
        store
            .add_user(
                &alice(),
                &ImageName::parse("img").unwrap(),
                &[AuthorizedKey::parse_line(KEY).unwrap()],
            )
            .unwrap();
        let rt = Arc::new(FakeRuntime::with_images(&["img"]));
        let mut settings = Settings::for_tests(
            std::env::temp_dir().join(format!("berth-lc-nohome-{}", std::process::id())),
            Duration::from_millis(50),
            Arc::new(crate::audit::Audit::log_only()),
        );
        settings.home_volume = false;
        let lc = Lifecycle::new(rt.clone(), store, settings);
        drop(lc.acquire(&alice()).await.unwrap());
        assert!(volumes_of(&rt, "t-alice").is_empty());
        assert!(rt.volume_names().is_empty());
        assert_eq!(
            lc.remove(&alice(), false, true).await.unwrap(),
            Removed {
                home: None,
                home_removed: false
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn another_image_keeps_the_commit_until_it_is_dropped() {
        let (lc, rt, store) = setup(50, FakeRuntime::with_images(&["img", "img2"]), &["alice"]);
        drop(lc.acquire(&alice()).await.unwrap());
        let c = lc.commit(&alice()).await.unwrap();
        assert_eq!(c.image, "berth/users:alice");
        let change = |image: Option<&str>, drop_commit| crate::user_settings::Change {
            image: image.map(|i| ImageName::parse(i).unwrap()),
            drop_commit,
            ..Default::default()
        };
        lc.set_settings(&alice(), change(Some("img2"), false))
            .await
            .unwrap();
        let u = store.user(&alice()).unwrap();
        assert_eq!(u.image.as_str(), "img2");
        assert_eq!(
            u.committed_image.as_ref().map(ImageName::as_str),
            Some("berth/users:alice")
        );
        assert!(rt.image_exists("berth/users:alice").await.unwrap());
        // Her next new container is still made from her commit, with her home.
        lc.remove_container(&alice()).await.unwrap();
        drop(lc.acquire(&alice()).await.unwrap());
        assert_eq!(volumes_of(&rt, "t-alice")[0].name, "t-home-alice");
        lc.set_settings(&alice(), change(None, true)).await.unwrap();
        let u = store.user(&alice()).unwrap();
        assert_eq!((u.image.as_str(), u.committed_image), ("img2", None));
        assert!(!rt.image_exists("berth/users:alice").await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_adopts_own_running_containers_only() {
        let rt = FakeRuntime::with_images(&["img"]);
        let labels = |u: &str| {
            HashMap::from([
                (LABEL_USER.to_owned(), u.to_owned()),
                (LABEL_INSTANCE.to_owned(), "inst".to_owned()),
            ])
        };
        rt.insert(ContainerInfo {
            id: "a".into(),
            name: "t-alice".into(),
            running: true,
            labels: labels("alice"),
            networks: vec![],
        });
        rt.insert(ContainerInfo {
            id: "g".into(),
            name: "t-ghost".into(),
            running: true,
            labels: labels("ghost"),
            networks: vec![],
        });
        let (lc, rt, _) = setup(50, rt, &["alice"]);
        lc.reconcile().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            running(&rt, "t-alice"),
            Some(false),
            "adopted container not stopped after the grace"
        );
        assert_eq!(
            running(&rt, "t-ghost"),
            Some(true),
            "a container of an unknown user was touched"
        );
    }
}
