//! The admin API: HTTP+JSON on a unix socket in the state directory, mode 0600, and every
//! request's peer checked to be root or the daemon's own user. Routes are listed in
//! `berth_proto::api`. Domain errors become wire errors in one place ([`AdminError`]'s
//! `IntoResponse`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use berth_proto::{
    AddKeysRequest, AddUserRequest, ApiError, AuthorizedKey, ContainerInfo, ContainerState,
    HealthInfo, ImageInfo, ImageName, KeyInfo, RemovedKeys, SessionInfo, StatusInfo, UserInfo,
    UserName,
};
use berth_runtime::{Runtime, RuntimeError};
use berth_store::{StoreError, UserRecord};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::audit::Event;
use crate::lifecycle::{LABEL_INSTANCE, LABEL_USER, Lifecycle, LifecycleError};

pub struct AdminState<R> {
    pub store: crate::store::AsyncStore,
    pub forwarding: berth_proto::ForwardingInfo,
    pub runtime: Arc<R>,
    pub lifecycle: Arc<Lifecycle<R>>,
    pub sessions: Arc<crate::sessions::Sessions>,
    /// Authenticated SSH connections: removing a key or a user ends theirs.
    pub connections: Arc<crate::connections::Connections>,
    pub listen: String,
    pub started: std::time::Instant,
    /// Held while a user is added or an image removed, so a user is never added with an
    /// image that is being removed.
    pub images: tokio::sync::Mutex<()>,
    /// The host firewall, for `berth status` (`None` in tests without one).
    pub firewall: Option<Arc<crate::firewall::Rules>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("permission denied: the admin API is for root")]
    Forbidden,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("image {0} is not present on this host")]
    ImageMissing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::moving::MoveError> for AdminError {
    fn from(e: crate::moving::MoveError) -> Self {
        use crate::moving::MoveError as M;
        match e {
            M::Bad(s) => Self::BadRequest(s),
            M::Conflict(s) => Self::Conflict(s),
            M::Lifecycle(e) => Self::Lifecycle(e),
            M::Store(e) => Self::Store(e),
            M::Runtime(e) => Self::Runtime(e),
            M::Io(e) => Self::Internal(e.to_string()),
        }
    }
}

impl AdminError {
    /// The store failed because its file system is full.
    fn disk_full(&self) -> bool {
        match self {
            Self::Store(e) | Self::Lifecycle(LifecycleError::Store(e)) => e.is_disk_full(),
            _ => false,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        if self.disk_full() {
            error!(error = %self, "admin request failed: the disk is full");
            return (
                StatusCode::INSUFFICIENT_STORAGE,
                Json(ApiError {
                    error: format!("disk full: cannot write the berth database ({self})"),
                    hint: Some(
                        "free space on the file system of berth's state directory; nothing was \
                         changed, and berth works again as soon as there is room"
                            .to_owned(),
                    ),
                }),
            )
                .into_response();
        }
        let (status, hint) = match &self {
            Self::Forbidden => (StatusCode::FORBIDDEN, Some("run the command as root".to_owned())),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, None),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, None),
            Self::Conflict(_) => (StatusCode::CONFLICT, None),
            Self::ImageMissing(_) => (
                StatusCode::BAD_REQUEST,
                Some(
                    "no registry may be reachable: import one with `berth image import ROOTFS.tar NAME` \
                     or `berth image bootstrap NAME` (see the README), then try again"
                        .to_owned(),
                ),
            ),
            Self::Store(e) => match e {
                StoreError::UserExists(_) | StoreError::KeyExists { .. } => (StatusCode::CONFLICT, None),
                StoreError::UserNotFound(_) | StoreError::KeyNotFound { .. } => (StatusCode::NOT_FOUND, None),
                StoreError::LastKey(_) => (StatusCode::CONFLICT, None),
                StoreError::Corrupt(_) | StoreError::Sqlite(_) | StoreError::Poisoned => {
                    (StatusCode::INTERNAL_SERVER_ERROR, Some("see the berth daemon log".to_owned()))
                }
            },
            Self::Lifecycle(LifecycleError::Store(StoreError::UserNotFound(_))) => (StatusCode::NOT_FOUND, None),
            Self::Lifecycle(LifecycleError::BadSetting(_)) => (StatusCode::BAD_REQUEST, None),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("see the berth daemon log".to_owned()),
            ),
            Self::Lifecycle(_) | Self::Runtime(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, Some("see the berth daemon log".to_owned()))
            }
        };
        if status.is_server_error() {
            error!(error = %self, "admin request failed");
        }
        (
            status,
            Json(ApiError {
                error: self.to_string(),
                hint,
            }),
        )
            .into_response()
    }
}

/// The connecting process's credentials (SO_PEERCRED).
#[derive(Clone, Debug)]
pub struct Peer {
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(s: IncomingStream<'_, UnixListener>) -> Self {
        Self {
            uid: s.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// The layer every route goes through: the peer must be root or the daemon's own user. A
/// handler cannot forget it, because no handler does it.
async fn require_root(
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let me = nix::unistd::geteuid().as_raw();
    match peer.uid {
        Some(uid) if uid == 0 || uid == me => next.run(request).await,
        _ => AdminError::Forbidden.into_response(),
    }
}

type AppState<R> = State<Arc<AdminState<R>>>;
type Result<T> = std::result::Result<T, AdminError>;

pub async fn serve<R: Runtime>(
    listener: UnixListener,
    state: Arc<AdminState<R>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/health", get(health::<R>))
        .route("/v1/users", get(list_users::<R>).post(add_user::<R>))
        .route(
            "/v1/users/{name}",
            get(show_user::<R>).delete(remove_user::<R>),
        )
        .route(
            "/v1/users/{name}/keys",
            get(list_keys::<R>).post(add_keys::<R>),
        )
        .route(
            "/v1/users/{name}/keys/{fingerprint}",
            delete(remove_key::<R>),
        )
        .route(
            "/v1/users/{name}/forwarding",
            axum::routing::post(set_forwarding::<R>),
        )
        .route(
            "/v1/users/{name}/settings",
            axum::routing::post(set_settings::<R>),
        )
        .route("/v1/status", get(status::<R>))
        .route("/v1/images", get(list_images::<R>).post(import_image::<R>))
        .route("/v1/images/{name}", delete(remove_image::<R>))
        .route("/v1/users/{name}/kick", axum::routing::post(kick_user::<R>))
        .route("/v1/users/{name}/export", get(export_user::<R>))
        .route("/v1/users/import", axum::routing::post(import_user::<R>))
        .route("/v1/sessions/{id}", delete(kill_session::<R>))
        .route_layer(axum::middleware::from_fn(require_root))
        .with_state(state);
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the socket, replacing a stale one, and makes it 0600. It lives in the 0700 state
/// directory, so nobody else can reach it even before the chmod.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn parse_name(name: &str) -> Result<UserName> {
    UserName::parse(name).map_err(|e| AdminError::BadRequest(e.to_string()))
}

fn body<T>(b: std::result::Result<Json<T>, JsonRejection>) -> Result<T> {
    b.map(|Json(v)| v)
        .map_err(|e| AdminError::BadRequest(format!("bad request body: {}", e.body_text())))
}

/// Keys arriving from a client are parsed again here: the fingerprint the store keeps is
/// always computed by the daemon.
/// The longest key comment kept, in characters.
pub(crate) const MAX_KEY_COMMENT: usize = 256;

/// `text` without control characters (a terminal's escape sequences start with one), at
/// most `max` characters.
pub(crate) fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

fn revalidate(keys: &[AuthorizedKey]) -> Result<Vec<AuthorizedKey>> {
    if keys.is_empty() {
        return Err(AdminError::BadRequest(
            "at least one public key is required".into(),
        ));
    }
    keys.iter()
        .map(|k| {
            let mut parsed = AuthorizedKey::parse_line(&k.openssh)
                .map_err(|e| AdminError::BadRequest(format!("not a public key: {e}")))?;
            // Printed to the admin's terminal by `user key list`: no escape sequences (a
            // user hands the admin her .pub file), and a line's worth.
            parsed.comment = printable(&k.comment, MAX_KEY_COMMENT);
            Ok(parsed)
        })
        .collect()
}

async fn health<R: Runtime>(State(st): AppState<R>) -> Result<Json<HealthInfo>> {
    let v = st.runtime.version().await?;
    Ok(Json(HealthInfo {
        version: berth_proto::VERSION_LONG.to_owned(),
        listen: st.listen.clone(),
        docker_version: v.version,
        docker_api_version: v.api_version,
    }))
}

async fn status<R: Runtime>(State(st): AppState<R>) -> Result<Json<StatusInfo>> {
    let users = st.store.users().await?.len();
    let (docker_version, docker_error) = match st.runtime.version().await {
        Ok(v) => (Some(v.version), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let containers = if docker_error.is_none() {
        st.runtime
            .list(LABEL_INSTANCE, st.lifecycle.instance())
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut containers: Vec<ContainerInfo> = containers
        .into_iter()
        .map(|c| ContainerInfo {
            user: c.labels.get(LABEL_USER).cloned().unwrap_or_default(),
            name: c.name,
            running: c.running,
        })
        .collect();
    containers.sort_by(|a, b| a.user.cmp(&b.user));
    let user_namespaces = match docker_error {
        None => Some(crate::user_namespaces(&*st.runtime).await),
        Some(_) => None,
    };
    Ok(Json(StatusInfo {
        version: berth_proto::VERSION_LONG.to_owned(),
        pid: std::process::id(),
        listen: st.listen.clone(),
        uptime_seconds: st.started.elapsed().as_secs(),
        docker_version,
        docker_error,
        users,
        containers,
        sessions: st.sessions.list(),
        // The daemon's runtime's, not this admin thread's own.
        tasks: st.lifecycle.spawner().metrics().num_alive_tasks(),
        descriptors: std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count),
        disk_quota: Some(st.lifecycle.disk().quota().describe()),
        isolation: match &st.firewall {
            Some(f) => Some(f.state().await),
            None => None,
        },
        user_namespaces,
        gpus: Some(st.lifecycle.gpu_support().to_string()),
        disk_bytes: disk_total(&st).await,
    }))
}

/// Every user's disk use together, as last measured (waited for briefly when old; see
/// [`crate::disk`]); `None` before the first measurement.
async fn disk_total<R: Runtime>(st: &AdminState<R>) -> Option<u64> {
    let usage = st.lifecycle.disk_usage().await;
    st.lifecycle
        .disk()
        .measured()
        .then(|| crate::disk::total(&usage))
}

async fn kill_session<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<SessionInfo>> {
    let missing = || AdminError::NotFound(format!("no open session {id}"));
    let n: u64 = id.parse().map_err(|_| missing())?;
    let info = st.sessions.kill(n).map_err(|e| match e {
        crate::sessions::KillError::NoSuchSession => missing(),
        crate::sessions::KillError::NothingToSignal(s) => AdminError::Conflict(format!(
            "session {n} of {} ({}) has no process berth can signal (it may be ending); \
             nothing was signalled (berth user kick {} ends all of the user's connections)",
            s.user,
            printable(&s.command, 200),
            s.user
        )),
    })?;
    st.lifecycle.audit().record(Event::SessionKill {
        id: n,
        user: info.user.clone(),
        command: info.command.clone(),
    });
    Ok(Json(info))
}

async fn image_infos<R: Runtime>(st: &AdminState<R>) -> Result<Vec<ImageInfo>> {
    image_infos_for(st, true).await
}

/// The engine's images; with `with_users`, each with the users who need it (one inspection
/// per distinct image the users name), else with none (one engine call, for a Tab).
async fn image_infos_for<R: Runtime>(
    st: &AdminState<R>,
    with_users: bool,
) -> Result<Vec<ImageInfo>> {
    let images = st.runtime.list_images().await?;
    let users = if with_users {
        st.store.users().await?
    } else {
        Vec::new()
    };
    // Each user's images (hers and her commit's) by the id they name now, so a user who
    // wrote `docker.io/library/debian:12` is found on `debian:12`.
    let mut needs: Vec<(String, String, String)> = Vec::new(); // (user, full name, id)
    let mut ids: std::collections::HashMap<String, Option<String>> = Default::default();
    for u in &users {
        for name in std::iter::once(&u.image).chain(u.committed_image.as_ref()) {
            let full = name.full();
            if !ids.contains_key(&full) {
                let id = st.runtime.image_id(&full).await?;
                ids.insert(full.clone(), id);
            }
            if let Some(Some(id)) = ids.get(&full) {
                needs.push((u.name.to_string(), full, id.clone()));
            }
        }
    }
    let mut out: Vec<ImageInfo> = Vec::new();
    for i in images {
        for t in &i.tags {
            // Removing one of several tags of an image only untags it: only the users who
            // named this tag need it. The last tag carries the image itself.
            let mut users: Vec<String> = needs
                .iter()
                .filter(|(_, full, id)| *id == i.id && (full == t || i.tags.len() == 1))
                .map(|(u, _, _)| u.clone())
                .collect();
            users.dedup();
            out.push(ImageInfo {
                name: t.clone(),
                id: i.id.clone(),
                size_bytes: i.size,
                created: i.created,
                users,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `GET /images?users=false`: the names alone, without finding who needs each image (shell
/// completion asks so: a Tab has a short deadline, and a server with many users' commits
/// would make it one engine inspection per image).
#[derive(serde::Deserialize)]
struct ImagesQuery {
    users: Option<bool>,
}

async fn list_images<R: Runtime>(
    State(st): AppState<R>,
    Query(q): Query<ImagesQuery>,
) -> Result<Json<Vec<ImageInfo>>> {
    Ok(Json(image_infos_for(&st, q.users != Some(false)).await?))
}

#[derive(serde::Deserialize)]
struct ImportQuery {
    name: String,
}

/// Imports the request body, a root file system tar, as image `name` (`docker import`).
async fn import_image<R: Runtime>(
    State(st): AppState<R>,
    Query(q): Query<ImportQuery>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<ImageInfo>)> {
    use futures_util::TryStreamExt;
    let name = ImageName::parse(&q.name).map_err(|e| AdminError::BadRequest(e.to_string()))?;
    let full = name.full();
    if st.runtime.image_exists(&full).await? {
        return Err(AdminError::Conflict(format!(
            "image {full} already exists; remove it first (berth image rm {full})"
        )));
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let id = st
        .runtime
        .import_image(&full, Box::pin(stream))
        .await
        .map_err(|e| AdminError::BadRequest(format!("cannot import {full}: {e}")))?;
    st.lifecycle.audit().record(Event::ImageImport {
        image: full.clone(),
        id: id.clone(),
    });
    let info = image_infos(&st)
        .await?
        .into_iter()
        .find(|i| i.name == full)
        .ok_or_else(|| AdminError::NotFound(format!("image {full} vanished after its import")))?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn remove_image<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ImageInfo>> {
    let full = berth_proto::full_image_name(&name);
    let _images = st.images.lock().await;
    let info = image_infos(&st)
        .await?
        .into_iter()
        .find(|i| i.name == full)
        .ok_or_else(|| AdminError::NotFound(format!("no image {full}")))?;
    if !info.users.is_empty() {
        return Err(AdminError::Conflict(format!(
            "image {full} is used by {}; remove or move those users first",
            info.users.join(", ")
        )));
    }
    st.runtime
        .remove_image(&full)
        .await
        .map_err(|e| AdminError::Conflict(format!("cannot remove image {full}: {e}")))?;
    st.lifecycle.audit().record(Event::ImageRemove {
        user: None,
        image: full.clone(),
        id: Some(info.id.clone()),
    });
    Ok(Json(info))
}

/// What the admin sees of one user.
async fn user_info<R: Runtime>(st: &AdminState<R>, user: UserRecord) -> Result<UserInfo> {
    let containers = st
        .runtime
        .list(LABEL_INSTANCE, st.lifecycle.instance())
        .await?;
    let disk = st.lifecycle.disk().last();
    Ok(describe(st, &containers, &disk, user))
}

/// What the admin sees of `users`, with a fresh measurement of the disk use when the last is old (waited
/// for briefly: see [`crate::disk`]).
async fn user_infos_measured<R: Runtime>(
    st: &AdminState<R>,
    users: Vec<UserRecord>,
) -> Result<Vec<UserInfo>> {
    let containers = st
        .runtime
        .list(LABEL_INSTANCE, st.lifecycle.instance())
        .await?;
    let disk = st.lifecycle.disk_usage().await;
    Ok(users
        .into_iter()
        .map(|u| describe(st, &containers, &disk, u))
        .collect())
}

fn describe<R: Runtime>(
    st: &AdminState<R>,
    containers: &[berth_runtime::ContainerInfo],
    disk: &std::collections::HashMap<String, crate::disk::UserDisk>,
    u: UserRecord,
) -> UserInfo {
    let used = disk.get(u.name.as_str()).copied();
    let state = containers
        .iter()
        .find(|c| c.labels.get(LABEL_USER).map(String::as_str) == Some(u.name.as_str()))
        .map_or(ContainerState::Absent, |c| {
            if c.running {
                ContainerState::Running
            } else {
                ContainerState::Stopped
            }
        });
    UserInfo {
        container_name: st.lifecycle.container_name(&u.name),
        sessions: st.lifecycle.sessions(&u.name),
        disk_bytes: used.map(|d| d.total()),
        disk: used.map(|d| berth_proto::DiskInfo {
            container: d.container,
            home: d.home,
            image: d.image,
        }),
        home: None,
        name: u.name,
        image: u.image,
        committed_image: u.committed_image,
        container: state,
        daemon_mode: u.daemon_mode,
        keys: u.keys,
        forwarding: crate::gateway::effective_forwarding(st.forwarding, u.forwarding),
        limits: None,
        mounts: None,
    }
}

/// [`describe`] with her effective limits, GPUs and shared folders, and whether her
/// container has them (one engine call: `user show` and `user set` only).
async fn with_settings<R: Runtime>(st: &AdminState<R>, mut info: UserInfo) -> Result<UserInfo> {
    let own = st.store.settings(&info.name).await?;
    let effective = crate::user_settings::effective(st.lifecycle.server(), &own);
    let applied = st
        .runtime
        .applied(&st.lifecycle.container_name(&info.name))
        .await?;
    let (limits, mounts) = effective.info(applied.as_ref());
    info.limits = Some(limits);
    info.mounts = Some(mounts);
    info.home = home_info(st, &info, applied.as_ref()).await?;
    Ok(info)
}

/// Her home volume, if she has one: where her container has it and its size.
async fn home_info<R: Runtime>(
    st: &AdminState<R>,
    info: &UserInfo,
    applied: Option<&berth_runtime::Applied>,
) -> Result<Option<berth_proto::HomeInfo>> {
    let Some(volume) = st.lifecycle.home_volume_of(&info.name).await? else {
        return Ok(None);
    };
    let target = applied
        .and_then(|a| a.volumes.iter().find(|v| v.name == volume))
        .map(|v| v.target.clone());
    Ok(Some(berth_proto::HomeInfo {
        volume,
        target,
        bytes: info.disk.map(|d| d.home),
        removed: false,
    }))
}

/// `GET /users?measured=false`: the disk use as last measured, without waiting for a new
/// measurement (shell completion asks so, and has two seconds for its answer).
#[derive(serde::Deserialize)]
struct ListQuery {
    measured: Option<bool>,
}

async fn list_users<R: Runtime>(
    State(st): AppState<R>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<UserInfo>>> {
    let users = st.store.users().await?;
    if q.measured == Some(false) {
        let containers = st
            .runtime
            .list(LABEL_INSTANCE, st.lifecycle.instance())
            .await?;
        let disk = st.lifecycle.disk().last();
        return Ok(Json(
            users
                .into_iter()
                .map(|u| describe(&st, &containers, &disk, u))
                .collect(),
        ));
    }
    Ok(Json(user_infos_measured(&st, users).await?))
}

async fn show_user<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<UserInfo>> {
    let name = parse_name(&name)?;
    let user = st.store.user(&name).await?;
    let mut infos = user_infos_measured(&st, vec![user]).await?;
    let info = infos
        .pop()
        .ok_or_else(|| AdminError::NotFound(format!("user {name} not found")))?;
    Ok(Json(with_settings(&st, info).await?))
}

async fn add_user<R: Runtime>(
    State(st): AppState<R>,
    req: std::result::Result<Json<AddUserRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<UserInfo>)> {
    let req = body(req)?;
    let keys = revalidate(&req.keys)?;
    let _images = st.images.lock().await;
    if !st.runtime.image_exists(req.image.as_str()).await? {
        return Err(AdminError::ImageMissing(req.image.to_string()));
    }
    if saved_image(&st, &req.name, &req.image).await? {
        return Err(AdminError::BadRequest(format!(
            "image {} is a user's own saved image (her next commit replaces it); give {} an image \
             of their own (berth image ls lists them)",
            req.image, req.name
        )));
    }
    let record = st.store.add_user(&req.name, &req.image, keys).await?;
    st.lifecycle.audit().record(Event::UserAdd {
        user: record.name.to_string(),
        image: record.image.to_string(),
        keys: record.keys,
    });
    let mut info = user_info(&st, record).await?;
    // A home volume kept from an earlier user of that name is hers now: said by the client.
    if st.lifecycle.home_volume_on() {
        info.home = home_info(&st, &info, None).await?;
    }
    Ok((StatusCode::CREATED, Json(info)))
}

#[derive(serde::Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    keep_image: bool,
    /// Her home volume goes too.
    #[serde(default)]
    purge_data: bool,
}

async fn remove_user<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Json<UserInfo>> {
    let name = parse_name(&name)?;
    let user = st.store.user(&name).await?;
    let mut before = user_info(&st, user).await?;
    let removed = st
        .lifecycle
        .remove(&name, q.keep_image, q.purge_data)
        .await?;
    st.lifecycle.audit().record(Event::UserRemove {
        user: name.to_string(),
    });
    if let Some(volume) = &removed.home
        && removed.home_removed
    {
        st.lifecycle.audit().record(Event::HomeRemove {
            user: name.to_string(),
            volume: volume.clone(),
        });
    }
    before.home = removed.home.map(|volume| berth_proto::HomeInfo {
        volume,
        target: None,
        bytes: before.disk.map(|d| d.home),
        removed: removed.home_removed,
    });
    revoke(&st, &name, None, "user_removed");
    Ok(Json(before))
}

async fn set_forwarding<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
    req: std::result::Result<Json<berth_proto::SetForwardingRequest>, JsonRejection>,
) -> Result<Json<UserInfo>> {
    let name = parse_name(&name)?;
    let req = body(req)?;
    let n = name.clone();
    let user = st
        .store
        .run(move |store| {
            let mut f = store.user(&n)?.forwarding;
            if let Some(s) = req.tcp {
                f.tcp = s.as_option();
            }
            if let Some(s) = req.agent {
                f.agent = s.as_option();
            }
            if let Some(s) = req.x11 {
                f.x11 = s.as_option();
            }
            store.set_forwarding(&n, f)?;
            store.user(&n)
        })
        .await?;
    st.lifecycle.audit().record(Event::UserForwarding {
        user: name.to_string(),
        tcp: user.forwarding.tcp,
        agent: user.forwarding.agent,
        x11: user.forwarding.x11,
    });
    Ok(Json(user_info(&st, user).await?))
}

/// `berth user set NAME --memory/--cpus/--pids/--gpus/--mount/--unmount`. Every value is
/// checked (a shared folder's source against the host, on a blocking thread) before her
/// lifecycle owner applies the change; the first bad one is the one line of the refusal,
/// and nothing is changed.
async fn set_settings<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
    req: std::result::Result<Json<berth_proto::SetSettingsRequest>, JsonRejection>,
) -> Result<Json<UserInfo>> {
    use berth_proto::settings::{Gpus, MountSpec, parse_cpus, parse_memory, parse_pids};
    let name = parse_name(&name)?;
    let req = body(req)?;
    if req.is_empty() {
        return Err(AdminError::BadRequest(
            "nothing to set: give --memory, --cpus, --pids, --gpus, --mount, --unmount, --image \
             or --drop-commit"
                .into(),
        ));
    }
    if req.mount.len() + req.unmount.len() > crate::mounts::MAX_USER_MOUNTS * 2 {
        return Err(AdminError::BadRequest(
            "too many --mount and --unmount at once".into(),
        ));
    }
    st.store.user(&name).await?;
    let bad = AdminError::BadRequest;
    let mut change = crate::user_settings::Change {
        memory: req
            .memory
            .as_deref()
            .map(parse_memory)
            .transpose()
            .map_err(bad)?,
        cpus: req
            .cpus
            .as_deref()
            .map(parse_cpus)
            .transpose()
            .map_err(bad)?,
        pids: req
            .pids
            .as_deref()
            .map(parse_pids)
            .transpose()
            .map_err(bad)?,
        gpus: req
            .gpus
            .as_deref()
            .map(Gpus::parse_override)
            .transpose()
            .map_err(bad)?,
        ..Default::default()
    };
    // The engine refuses more CPUs than the host has (and the live update would fail).
    if let Some(berth_proto::settings::Override::Set(nano)) = change.cpus
        && let Ok(n) = std::thread::available_parallelism()
        && nano
            > u64::try_from(n.get())
                .unwrap_or(u64::MAX)
                .saturating_mul(1_000_000_000)
    {
        return Err(bad(format!(
            "cpus {} is more than the {n} CPUs of this host",
            req.cpus.as_deref().unwrap_or_default()
        )));
    }
    for t in &req.unmount {
        let target = crate::mounts::check_target(t).map_err(bad)?;
        change.unmount.push(target);
    }
    let mut wanted = Vec::new();
    for m in &req.mount {
        let spec = MountSpec::parse(m).map_err(bad)?;
        let target = crate::mounts::check_target(&spec.target).map_err(bad)?;
        if wanted
            .iter()
            .any(|(_, t, _): &(String, String, bool)| *t == target)
        {
            return Err(bad(format!("two shared folders at {target}")));
        }
        wanted.push((spec.source, target, spec.read_only));
    }
    let rules = st.lifecycle.sources().clone();
    change.mount = tokio::task::spawn_blocking(move || {
        wanted
            .into_iter()
            .map(|(source, target, read_only)| {
                Ok(berth_runtime::BindMount {
                    source: rules.check(std::path::Path::new(&source))?,
                    target,
                    read_only,
                })
            })
            .collect::<std::result::Result<Vec<_>, String>>()
    })
    .await
    .map_err(|e| bad(e.to_string()))?
    .map_err(bad)?;
    // The images lock is held from the check to the change, so the image cannot be removed
    // (`berth image rm`) in between.
    let _images = st.images.lock().await;
    if let Some(image) = &req.image {
        change.image = Some(check_image(&st, &name, image).await?);
    }
    change.drop_commit = req.drop_commit;
    st.lifecycle.set_settings(&name, change).await?;
    let user = st.store.user(&name).await?;
    let info = user_info(&st, user).await?;
    Ok(Json(with_settings(&st, info).await?))
}

/// `image` as a user's base image: a name, not a user's own saved image, present in the
/// engine.
async fn check_image<R: Runtime>(
    st: &AdminState<R>,
    user: &UserName,
    image: &str,
) -> Result<ImageName> {
    let image = ImageName::parse(image).map_err(|e| AdminError::BadRequest(e.to_string()))?;
    if !st.runtime.image_exists(image.as_str()).await? {
        return Err(AdminError::ImageMissing(image.to_string()));
    }
    if saved_image(st, user, &image).await? {
        return Err(AdminError::BadRequest(format!(
            "image {image} is a user's own saved image (her next commit replaces it); give {user} \
             an image of their own (berth image ls lists them)"
        )));
    }
    Ok(image)
}

/// Whether `image`, as `user`'s base image, would be a saved image of another user's (or of
/// anyone's, by the name the next commit moves): named as one (`REPOSITORY:USER`), or, by its
/// ID or another tag, a commit of this instance's that another user who still exists made
/// (each commit keeps her container's labels: her name and the instance). A removed user's
/// image the admin kept (`user rm --keep-image`), or the user's own older commit, may be
/// given.
async fn saved_image<R: Runtime>(
    st: &AdminState<R>,
    user: &UserName,
    image: &ImageName,
) -> Result<bool> {
    use crate::lifecycle::{LABEL_INSTANCE, LABEL_USER};
    if st.lifecycle.is_commit_image(image) {
        return Ok(true);
    }
    let Some(labels) = st.runtime.image_labels(image.as_str()).await? else {
        return Ok(false);
    };
    if labels.get(LABEL_INSTANCE).map(String::as_str) != Some(st.lifecycle.instance()) {
        return Ok(false);
    }
    let Some(maker) = labels.get(LABEL_USER).and_then(|u| UserName::parse(u).ok()) else {
        return Ok(false);
    };
    if maker == *user {
        return Ok(false);
    }
    match st.store.user(&maker).await {
        Ok(_) => Ok(true),
        Err(berth_store::StoreError::UserNotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn list_keys<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Vec<KeyInfo>>> {
    let name = parse_name(&name)?;
    Ok(Json(st.store.keys(&name).await?))
}

async fn add_keys<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
    req: std::result::Result<Json<AddKeysRequest>, JsonRejection>,
) -> Result<Json<Vec<KeyInfo>>> {
    let name = parse_name(&name)?;
    let keys = revalidate(&body(req)?.keys)?;
    let n = name.clone();
    let count = keys.len();
    let all = st
        .store
        .run(move |store| {
            store.add_keys(&n, &keys)?;
            store.keys(&n)
        })
        .await?;
    st.lifecycle.audit().record(Event::KeyAdd {
        user: name.to_string(),
        keys: count,
    });
    Ok(Json(all))
}

async fn remove_key<R: Runtime>(
    State(st): AppState<R>,
    UrlPath((name, fingerprint)): UrlPath<(String, String)>,
) -> Result<Json<RemovedKeys>> {
    let name = parse_name(&name)?;
    let n = name.clone();
    let (removed, remaining) = st
        .store
        .run(move |store| {
            let k = store.remove_key(&n, &fingerprint)?;
            Ok((k, store.keys(&n)?.len()))
        })
        .await?;
    st.lifecycle.audit().record(Event::KeyRemove {
        user: name.to_string(),
        key: removed.fingerprint.to_string(),
    });
    revoke(&st, &name, Some(&removed.fingerprint), "key_removed");
    Ok(Json(RemovedKeys {
        removed: vec![removed],
        remaining,
    }))
}

/// Ends `user`'s SSH connections (those made with key `fingerprint`, when given), audited;
/// returns how many.
fn revoke<R: Runtime>(
    st: &AdminState<R>,
    user: &UserName,
    fingerprint: Option<&str>,
    reason: &'static str,
) -> usize {
    let connections = st.connections.revoke(user.as_str(), fingerprint);
    if connections > 0 {
        st.lifecycle.audit().record(Event::ConnectionsClosed {
            user: user.to_string(),
            key: fingerprint.map(str::to_owned),
            connections,
            reason,
        });
    }
    connections
}

/// `berth user export NAME FILE`: her archive, made in a scratch directory of the state
/// directory (removed once it is sent).
async fn export_user<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response> {
    use futures_util::StreamExt;
    let name = parse_name(&name)?;
    st.store.user(&name).await?;
    let dir =
        crate::moving::scratch(&st.lifecycle).map_err(|e| AdminError::Internal(e.to_string()))?;
    // Its own task: a client that goes away mid-way leaves no helper container or scratch
    // directory behind (the task ends, and drops them).
    let task = {
        let (st, name) = (st.clone(), name.clone());
        tokio::spawn(async move {
            let r =
                crate::moving::export(&st.lifecycle, &*st.runtime, &st.store, &name, dir.path())
                    .await;
            r.map(|path| (dir, path))
        })
    };
    let (dir, path) = task
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))??;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    st.lifecycle.audit().record(Event::UserExport {
        user: name.to_string(),
        bytes: len,
    });
    // The scratch directory goes when the body has been sent (or dropped).
    let stream = tokio_util::io::ReaderStream::new(file).map(move |c| {
        let _keep = &dir;
        c
    });
    Ok((
        [
            ("content-type", "application/x-tar".to_owned()),
            ("content-length", len.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// `berth user import FILE`: the request body is a user's archive ([`crate::moving`]).
async fn import_user<R: Runtime>(
    State(st): AppState<R>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<crate::moving::Imported>)> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let internal = |e: std::io::Error| AdminError::Internal(e.to_string());
    let dir = crate::moving::scratch(&st.lifecycle).map_err(internal)?;
    let archive = dir.path().join("user.tar");
    let mut out = tokio::fs::File::create(&archive).await.map_err(internal)?;
    let mut stream = body.into_data_stream();
    let mut n = 0_u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| AdminError::BadRequest(format!("reading the archive: {e}")))?;
        n = n.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
        if n > crate::moving::ARCHIVE_MAX {
            return Err(AdminError::BadRequest(format!(
                "the archive is over {} bytes",
                crate::moving::ARCHIVE_MAX
            )));
        }
        out.write_all(&chunk).await.map_err(internal)?;
    }
    out.sync_all().await.map_err(internal)?;
    drop(out);
    // Its own task from here: a client that goes away mid-way does not cut the import
    // short; it completes, or takes back what it made.
    let task = {
        let st = st.clone();
        tokio::spawn(async move {
            let (path, scratch) = (archive.clone(), dir.path().to_owned());
            let server = st.lifecycle.server().clone();
            let (unpacked, checked) = tokio::task::spawn_blocking(move || {
                let u = crate::moving::unpack(&path, &scratch)?;
                std::fs::remove_file(&path)?;
                let c = crate::moving::check(&u.manifest, &server)?;
                Ok::<_, crate::moving::MoveError>((u, c))
            })
            .await
            .map_err(|e| AdminError::Internal(e.to_string()))??;
            let _images = st.images.lock().await;
            let not_carried_over = checked.left_out.clone();
            let name =
                crate::moving::import(&st.lifecycle, &*st.runtime, &st.store, unpacked, checked)
                    .await?;
            drop(dir);
            st.lifecycle.audit().record(Event::UserImport {
                user: name.to_string(),
                bytes: n,
            });
            Ok::<_, AdminError>((name, not_carried_over))
        })
    };
    let (name, not_carried_over) = task
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))??;
    let user = st.store.user(&name).await?;
    let info = user_info(&st, user).await?;
    Ok((
        StatusCode::CREATED,
        Json(crate::moving::Imported {
            user: with_settings(&st, info).await?,
            not_carried_over,
        }),
    ))
}

/// `berth user kick NAME`: ends every SSH connection of the user now.
async fn kick_user<R: Runtime>(
    State(st): AppState<R>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<berth_proto::KickedInfo>> {
    let name = parse_name(&name)?;
    st.store.user(&name).await?;
    let connections = revoke(&st, &name, None, "kick");
    Ok(Json(berth_proto::KickedInfo {
        user: name,
        connections,
    }))
}
