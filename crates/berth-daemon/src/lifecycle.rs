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

use berth_proto::UserName;
use berth_runtime::{ContainerInfo, ContainerSpec, Limits, Runtime, RuntimeError};
use berth_store::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::blocking;

/// Container label keys.
pub const LABEL_USER: &str = "berth.user";
pub const LABEL_INSTANCE: &str = "berth.instance";

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
}

/// Fixed settings for every container this manager makes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prefix: String,
    pub instance: String,
    pub network: String,
    pub guest_dir: PathBuf,
    pub limits: Limits,
    pub idle_stop: Duration,
    pub stop_timeout_secs: i32,
}

enum Request {
    Acquire {
        reply: oneshot::Sender<Result<Lease, LifecycleError>>,
    },
    Release,
    /// Adopt a container found running at daemon start: arm the grace timer.
    Adopt,
    Remove {
        reply: oneshot::Sender<Result<(), LifecycleError>>,
    },
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
    store: Store,
    settings: Settings,
    owners: Mutex<HashMap<UserName, Owner>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl<R: Runtime> Lifecycle<R> {
    pub fn new(runtime: Arc<R>, store: Store, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            store,
            settings,
            owners: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        })
    }

    pub fn container_name(&self, user: &UserName) -> String {
        format!("{}{}", self.settings.prefix, user)
    }

    pub fn instance(&self) -> &str {
        &self.settings.instance
    }

    /// A running container for `user`, and a lease that keeps it running.
    pub async fn acquire(self: &Arc<Self>, user: &UserName) -> Result<Lease, LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(user, Request::Acquire { reply })?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// Stops and removes `user`'s container, then deletes the user from the store.
    pub async fn remove(self: &Arc<Self>, user: &UserName) -> Result<(), LifecycleError> {
        let (reply, rx) = oneshot::channel();
        self.send(user, Request::Remove { reply })?;
        let r = rx.await.map_err(|_| LifecycleError::ShuttingDown)?;
        if r.is_ok()
            && let Ok(mut owners) = self.owners.lock()
            && owners.get(user).is_some_and(|o| o.tx.is_closed())
        {
            owners.remove(user);
        }
        r
    }

    /// Open sessions of `user` (0 when no owner runs).
    pub fn sessions(&self, user: &UserName) -> u32 {
        self.owners
            .lock()
            .ok()
            .and_then(|o| o.get(user).map(|o| *o.sessions.borrow()))
            .unwrap_or(0)
    }

    /// Looks at the engine once after a daemon start: running containers of this instance
    /// are adopted (their grace timer starts); containers whose user is unknown are left
    /// alone and reported.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), LifecycleError> {
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
                Some(u) => {
                    let store = self.store.clone();
                    let u2 = u.clone();
                    blocking(move || store.user(&u2)).await.is_ok()
                }
                None => false,
            };
            match (user, known) {
                (Some(u), true) if c.running => {
                    info!(user = %u, container = %c.name, "adopting running container");
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
        owner.tx.send(req).map_err(|_| LifecycleError::ShuttingDown)
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
            stop_at: None,
        };
        self.tracker
            .spawn(task.run(rx).instrument(info_span!("owner", user = %user)));
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
    stop_at: Option<Instant>,
}

impl<R: Runtime> OwnerTask<R> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        loop {
            let deadline = self.stop_at;
            let req = tokio::select! {
                () = self.lc.cancel.cancelled() => return,
                req = rx.recv() => req,
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.stop_at = None;
                    self.idle_stop().await;
                    continue;
                }
            };
            let Some(req) = req else { return };
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
                Request::Adopt => self.arm_if_idle(),
                Request::Remove { reply } => {
                    let r = self.remove().await;
                    let removed = r.is_ok();
                    let _ = reply.send(r);
                    if removed {
                        // The user is gone; requests still queued fail with a dropped reply.
                        return;
                    }
                }
            }
            self.sessions_tx.send_replace(self.sessions);
        }
    }

    fn arm_if_idle(&mut self) {
        if self.sessions == 0 {
            self.stop_at = Some(Instant::now() + self.lc.settings.idle_stop);
        }
    }

    async fn ensure_running(&mut self) -> Result<String, LifecycleError> {
        let rt = &self.lc.runtime;
        let existing = rt.inspect(&self.name).await?;
        let info = match existing {
            Some(info) => {
                self.check_ours(&info)?;
                info
            }
            None => {
                let store = self.lc.store.clone();
                let user = self.user.clone();
                let record = blocking(move || store.user(&user)).await?;
                let image = record.committed_image.unwrap_or(record.image);
                let spec = self.spec(image.as_str());
                let id = rt.create(&spec).await?;
                info!(target: "audit", event = "container_create", user = %self.user, container = %self.name, image = %image, "container created");
                ContainerInfo {
                    id,
                    name: self.name.clone(),
                    running: false,
                    labels: spec.labels,
                }
            }
        };
        if !info.running {
            rt.start(&info.id).await?;
            info!(target: "audit", event = "container_start", user = %self.user, container = %self.name, "container started");
        }
        Ok(info.id)
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

    fn spec(&self, image: &str) -> ContainerSpec {
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
            limits: s.limits.clone(),
            network: s.network.clone(),
        }
    }

    async fn idle_stop(&mut self) {
        if self.sessions > 0 {
            return;
        }
        let store = self.lc.store.clone();
        let user = self.user.clone();
        match blocking(move || store.user(&user)).await {
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
                    Ok(()) => {
                        info!(target: "audit", event = "container_stop", user = %self.user, container = %self.name, reason = "idle", "container stopped")
                    }
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

    async fn remove(&mut self) -> Result<(), LifecycleError> {
        self.stop_at = None;
        let rt = &self.lc.runtime;
        if let Some(info) = rt.inspect(&self.name).await? {
            self.check_ours(&info)?;
            if info.running {
                rt.stop(&info.id, self.lc.settings.stop_timeout_secs)
                    .await?;
            }
            rt.remove(&info.id).await?;
            info!(target: "audit", event = "container_remove", user = %self.user, container = %self.name, "container removed");
        }
        let store = self.lc.store.clone();
        let user = self.user.clone();
        blocking(move || store.remove_user(&user)).await?;
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
