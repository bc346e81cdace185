//! [`Runtime`] on the Docker Engine API.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use bollard::exec::CreateExecOptions;
use bollard::models::{
    ContainerConfig, ContainerCreateBody, ContainerSummaryStateEnum, ContainerUpdateBody,
    DeviceRequest, HostConfig, HostConfigLogConfig, Ipam, IpamConfig, Mount, MountType,
    NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest,
};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder, ResizeExecOptions,
    StopContainerOptionsBuilder,
};

use crate::exec::{demux_output, raw_output, start_attached};
use crate::process::Identity;
use crate::{
    Applied, BindMount, ByteStream, CommitInfo, ContainerDisk, ContainerInfo, ContainerInit,
    ContainerSpec, DiskQuota, DiskUsage, EngineVersion, GpuRequest, GpuSupport, ImageDisk,
    ImageSummary, MAX_LAYERS, NetworkSpec, ProcessGuard, Runtime, RuntimeError, Session,
    SessionHandle, SessionSpec, TtySize, UserNamespaces, VolumeDisk, VolumeMount, VolumeSpec, init,
};

/// `/etc/passwd` of an image, read at most this far ([`Runtime::root_home`]).
const PASSWD_MAX: usize = 1 << 20;
/// Where a volume is mounted in the helper container that reads or fills it.
const VOLUME_HELPER_MOUNT: &str = "/berth-volume";
/// What the engine answers to a `system df` while another one runs.
const DF_BUSY: &str = "a disk usage operation is already running";
/// How long a `system df` is asked again while another one runs.
const DF_BUSY_FOR: Duration = Duration::from_secs(60);
/// The engine's `system df` answer, read at most this far.
const DF_MAX: usize = 64 << 20;

/// Where the guest directory is mounted in every container.
pub const GUEST_MOUNT: &str = "/.berth";

/// The device driver, and the engine's runtime, of NVIDIA GPUs.
const NVIDIA: &str = "nvidia";

#[cfg(test)]
mod tests {
    use bollard::models::ContainerConfig;

    #[test]
    fn a_flattened_image_keeps_the_containers_config_and_nothing_can_inject_an_instruction() {
        let config = ContainerConfig {
            env: Some(vec![
                "PATH=/usr/bin:/bin".into(),
                "Q=a \"quoted\" $HOME \\ value".into(),
                "BAD=two\nlines".into(),
                "bad key=x".into(),
            ]),
            cmd: Some(vec![
                "sh".into(),
                "-c".into(),
                "echo \"hi\"\nUSER evil".into(),
            ]),
            entrypoint: Some(vec!["/.berth/berth-guest".into(), "init".into()]),
            working_dir: Some("/root".into()),
            user: Some("0:0".into()),
            labels: Some([("berth.user".to_owned(), "al\"ice".to_owned())].into()),
            exposed_ports: Some(vec!["80/tcp".into()]),
            volumes: Some(vec!["/data".into()]),
            ..Default::default()
        };
        let changes = super::changes_for(&config);
        assert_eq!(
            changes,
            [
                r#"ENV PATH="/usr/bin:/bin""#,
                r#"ENV Q="a \"quoted\" \$HOME \\ value""#,
                r#"CMD ["sh","-c","echo \"hi\"\nUSER evil"]"#,
                r#"ENTRYPOINT ["/.berth/berth-guest","init"]"#,
                r#"WORKDIR "/root""#,
                r#"USER "0:0""#,
                r#"LABEL "berth.user"="al\"ice""#,
                r#"EXPOSE 80/tcp"#,
                r#"VOLUME ["/data"]"#,
            ]
        );
        assert!(changes.iter().all(|c| !c.contains('\n')));
    }

    #[test]
    fn roots_home_is_read_from_the_images_passwd() {
        let home = super::root_home_in_passwd;
        assert_eq!(
            home("root:x:0:0:root:/root:/bin/sh\nbin:x:1:1::/bin:\n").as_deref(),
            Some("/root")
        );
        assert_eq!(
            home("daemon:x:1:1::/x:\nroot:x:0:0::/home/root:/bin/sh").as_deref(),
            Some("/home/root")
        );
        assert_eq!(home("rootish:x:0:0::/r:/bin/sh\nroot:x"), None);
        assert_eq!(home(""), None);
        let mut header = ::tar::Header::new_gnu();
        header.set_size(30);
        header.set_mode(0o644);
        header.set_cksum();
        let mut b = ::tar::Builder::new(Vec::new());
        b.append_data(
            &mut header,
            "passwd",
            &b"root:x:0:0:root:/root:/bin/sh\n"[..],
        )
        .unwrap();
        let tar = b.into_inner().unwrap();
        assert_eq!(
            super::passwd_from_tar(&tar).as_deref(),
            Some("root:x:0:0:root:/root:/bin/sh\n")
        );
        assert_eq!(super::passwd_from_tar(b"not a tar"), None);
    }

    #[test]
    fn disk_use_is_read_from_the_engines_df() {
        let df = serde_json::json!({
            "Containers": [
                {"Names": ["/b-alice"], "Labels": {"i": "x", "berth.user": "alice"}, "SizeRw": 10},
                {"Names": ["/other"], "Labels": {}, "SizeRw": 99}
            ],
            "Volumes": [
                {"Name": "b-home-alice", "Labels": {"i": "x"}, "UsageData": {"Size": 20, "RefCount": 1}},
                {"Name": "new", "Labels": {"i": "x"}, "UsageData": {"Size": -1, "RefCount": 0}},
                {"Name": "theirs", "Labels": null, "UsageData": {"Size": 5}}
            ],
            "Images": [
                {"Id": "sha256:a", "RepoTags": ["b/users:alice"], "Size": 100, "SharedSize": 70}
            ]
        });
        let u = super::usage_from_df(&df, "i", "x");
        assert_eq!(u.containers.len(), 1);
        assert_eq!(
            (u.containers[0].name.as_str(), u.containers[0].bytes),
            ("b-alice", 10)
        );
        let v: Vec<(&str, u64)> = u
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.bytes))
            .collect();
        assert_eq!(v, [("b-home-alice", 20), ("new", 0)]);
        assert_eq!(u.images[0].bytes, 30);
        assert_eq!(u.images[0].tags, ["b/users:alice"]);
        assert_eq!(
            super::usage_from_df(&serde_json::json!({}), "i", "x"),
            Default::default()
        );
    }

    #[test]
    fn sortable_times_order_like_times() {
        let a = super::sortable_time("2026-11-28T18:46:05.6962Z");
        let b = super::sortable_time("2026-11-28T18:46:05.696220123Z");
        let c = super::sortable_time("2026-11-28T18:46:05.7Z");
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(
            super::sortable_time("2026-11-28T18:46:05Z"),
            "2026-11-28T18:46:05Z"
        );
    }
}

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    socket: PathBuf,
    api_version: String,
    /// Running containers' init processes, by container id, so that a session's start needs
    /// no engine call (each use checks the process is still that init).
    inits: std::sync::Arc<std::sync::Mutex<HashMap<String, Identity>>>,
    /// Held while a network is made: two of this daemon's never take the same block.
    network_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl DockerRuntime {
    /// Refuses a commit whose copy would not fit: what the engine copies is every file's full
    /// length (a sparse file of hers, `truncate -s 20T`, takes no room in her layer but all
    /// of it in the image's), more than her disk quota allows her layer, or more than the
    /// engine's data root has free (less a reserve: a twentieth of it, at least 1 GiB). The
    /// image's layer is under no quota: the disk every user's containers are on would fill.
    async fn room_for_commit(
        &self,
        c: &bollard::models::ContainerInspectResponse,
        flatten: bool,
    ) -> Result<(), RuntimeError> {
        const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
        // The engine says -1 (or nothing) when it could not measure: then nobody knows what
        // the copy would take, and it is not made.
        let bytes = |v: Option<i64>| {
            v.and_then(|s| u64::try_from(s).ok()).ok_or_else(|| {
                RuntimeError::Refused(
                    "the server cannot tell how much your container's changes come to, so \
                     they were not saved; ask the administrator (details are in the berth log)"
                        .into(),
                )
            })
        };
        let changes = bytes(c.size_rw)?;
        let copied = if flatten {
            bytes(c.size_root_fs)?
        } else {
            changes
        };
        #[allow(clippy::cast_precision_loss, reason = "shown in GiB")]
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / GIB);
        let quota = c
            .host_config
            .as_ref()
            .and_then(|h| h.storage_opt.as_ref())
            .and_then(|o| o.get("size"))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(quota) = quota
            && changes > quota
        {
            return Err(RuntimeError::Refused(format!(
                "your container's changes come to {} counted in full (a sparse file counts \
                 whole, as a commit copies it), more than your disk limit of {}; nothing was \
                 saved",
                gib(changes),
                gib(quota)
            )));
        }
        let info = self.docker.info().await.map_err(map_err)?;
        let root = info
            .docker_root_dir
            .unwrap_or_else(|| "/var/lib/docker".into());
        let asked = root.clone();
        let st = tokio::task::spawn_blocking(move || rustix::fs::statvfs(asked.as_str()))
            .await
            .map_err(|e| RuntimeError::Docker(e.to_string()))?;
        match st {
            Ok(st) => {
                let total = st.f_blocks.saturating_mul(st.f_frsize);
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                let room = free.saturating_sub((total / 20).max(1 << 30));
                if copied > room {
                    return Err(RuntimeError::Refused(format!(
                        "your container's changes come to {} counted in full (a sparse file \
                         counts whole, as a commit copies it), more than the server's disk has \
                         room for ({}); nothing was saved",
                        gib(copied),
                        gib(room)
                    )));
                }
            }
            // The engine's data root is not where this daemon can see it (another mount
            // namespace, a remote engine): only the quota was checked.
            Err(e) => tracing::warn!(
                root = %root,
                error = %e,
                "cannot see the engine's free disk; a commit is checked against the disk limit only"
            ),
        }
        Ok(())
    }
}

impl DockerRuntime {
    /// Connects to the engine on `socket` and negotiates the API version down to what the
    /// engine speaks. Refuses engines below API 1.41 (Docker 20.10).
    pub async fn connect(socket: PathBuf) -> Result<Self, RuntimeError> {
        let path = socket.to_string_lossy().into_owned();
        let docker = Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| RuntimeError::Unavailable(e.to_string()))?
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
        let v = docker.client_version();
        let api_version = format!("{}.{}", v.major_version, v.minor_version);
        if (v.major_version, v.minor_version) < (1, 41) {
            return Err(RuntimeError::TooOld(api_version));
        }
        Ok(Self {
            docker,
            socket,
            api_version,
            inits: Default::default(),
            network_lock: Default::default(),
        })
    }

    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// `(id, created)` of the networks named exactly `name`, oldest first.
    async fn networks_named(&self, name: &str) -> Result<Vec<(String, String)>, RuntimeError> {
        let filters = HashMap::from([("name".to_owned(), vec![name.to_owned()])]);
        let opts = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let nets = self
            .docker
            .list_networks(Some(opts))
            .await
            .map_err(map_err)?;
        let mut found: Vec<(String, String)> = nets
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| {
                Some((
                    n.id?,
                    sortable_time(n.created.as_deref().unwrap_or_default()),
                ))
            })
            .collect();
        found.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        Ok(found)
    }

    /// The oldest network named exactly `name`. Engines before API 1.44 accept duplicate
    /// names, so two daemons could each make one: the others are removed (unused yet).
    async fn oldest_network(&self, name: &str) -> Result<Option<String>, RuntimeError> {
        let found = self.networks_named(name).await?;
        let Some((keep, extra)) = found.split_first() else {
            return Ok(None);
        };
        for (id, _) in extra {
            let _ = self.docker.remove_network(id).await;
        }
        Ok(Some(keep.0.clone()))
    }

    /// The IPv4 subnets of every network on the engine (Berth's or not).
    async fn subnets_in_use(&self) -> Result<Vec<ipnet::Ipv4Net>, RuntimeError> {
        let nets = self
            .docker
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await
            .map_err(map_err)?;
        Ok(nets
            .into_iter()
            .filter_map(|n| n.ipam?.config)
            .flatten()
            .filter_map(|c| c.subnet?.parse().ok())
            .collect())
    }

    /// The init of running container `container` (its id), from the cache when it is still
    /// that process.
    /// Container `container`'s init as last reached, while it is still that live process.
    fn cached_init(&self, container: &str) -> Option<Identity> {
        let cached = self
            .inits
            .lock()
            .ok()
            .and_then(|m| m.get(container).copied());
        cached.filter(|i| i.alive(container))
    }

    async fn init(&self, container: &str) -> Result<Option<Identity>, RuntimeError> {
        if let Some(init) = self.cached_init(container) {
            return Ok(Some(init));
        }
        let Some(pid) = self.init_pid(container).await? else {
            return Ok(None);
        };
        let init = Identity::of(pid).filter(|i| i.alive(container));
        if let (Some(i), Ok(mut m)) = (init, self.inits.lock()) {
            m.retain(|c, i| i.alive(c));
            m.insert(container.to_owned(), i);
        }
        Ok(init)
    }

    /// The host PID of a running container's init process, as the engine says.
    async fn init_pid(&self, container: &str) -> Result<Option<i32>, RuntimeError> {
        match self.docker.inspect_container(container, None).await {
            Ok(c) => Ok(c
                .state
                .filter(|s| s.running == Some(true))
                .and_then(|s| s.pid)
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 0)),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// The host PID of a just-started exec. The engine answers the attach (101) before the
    /// process exists, so this waits (bounded) until it has a PID or has already ended.
    /// A container made from `image`, never started, with volume `volume` at
    /// [`VOLUME_HELPER_MOUNT`]; returns its name. The caller removes it.
    async fn volume_helper(&self, volume: &str, image: &str) -> Result<String, RuntimeError> {
        static HELPERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = HELPERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("berth-volume-helper-{}-{n}", std::process::id());
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["/nonexistent".into()]),
            entrypoint: Some(vec![]),
            labels: Some(HashMap::from([("berth.probe".to_owned(), "1".to_owned())])),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                mounts: Some(vec![Mount {
                    typ: Some(MountType::VOLUME),
                    source: Some(volume.to_owned()),
                    target: Some(VOLUME_HELPER_MOUNT.into()),
                    read_only: Some(false),
                    volume_options: Some(bollard::models::MountVolumeOptions {
                        no_copy: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        self.docker
            .create_container(Some(opts), body)
            .await
            .map_err(map_container_err)?;
        Ok(name)
    }

    /// GETs `path` of the engine's API and parses the answer as JSON, read at most `limit`
    /// bytes far. For answers whose shape bollard's models no longer know: `system df`
    /// changed its shape in API 1.52, so it is asked in 1.51 at most.
    async fn get_json(&self, path: &str, limit: usize) -> Result<serde_json::Value, RuntimeError> {
        use http_body_util::{BodyExt, Empty, Limited};
        let version = match self.api_version.split_once('.') {
            Some(("1", minor)) if minor.parse::<u32>().is_ok_and(|m| m > 51) => "1.51",
            _ => self.api_version.as_str(),
        };
        let unavailable = |e: std::io::Error| RuntimeError::Unavailable(e.to_string());
        let io = hyper_util::rt::TokioIo::new(
            tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(unavailable)?,
        );
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| RuntimeError::Docker(format!("{path}: {e}")))?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get(format!("/v{version}{path}"))
            .header("host", "docker")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| RuntimeError::Docker(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| RuntimeError::Docker(format!("{path}: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| RuntimeError::Docker(format!("{path}: {e}")))?
            .to_bytes();
        conn.abort();
        if !status.is_success() {
            return Err(RuntimeError::Docker(format!(
                "{path}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        serde_json::from_slice(&body).map_err(|e| RuntimeError::Docker(format!("{path}: {e}")))
    }

    async fn exec_pid(&self, exec_id: &str) -> Result<Option<i32>, RuntimeError> {
        for _ in 0..1000 {
            let st = self.docker.inspect_exec(exec_id).await.map_err(map_err)?;
            if let Some(pid) = st
                .pid
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 0)
            {
                return Ok(Some(pid));
            }
            if st.running == Some(false) && st.exit_code.is_some() {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err(RuntimeError::Docker(format!(
            "exec {exec_id} did not start"
        )))
    }
}

/// What `system df` (API 1.51 and older: `Containers`, `Volumes`, `Images`) says of the
/// containers and volumes labelled `key=value`, and of every image.
fn usage_from_df(df: &serde_json::Value, key: &str, value: &str) -> DiskUsage {
    use serde_json::Value;
    let items = |k: &str| {
        df.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let labels = |v: &Value, k: &str| -> HashMap<String, String> {
        v.get(k)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let bytes = |v: Option<&Value>| {
        v.and_then(Value::as_i64)
            .and_then(|n| u64::try_from(n).ok())
    };
    let labelled = |l: &HashMap<String, String>| l.get(key).map(String::as_str) == Some(value);
    let containers = items("Containers")
        .iter()
        .map(|c| ContainerDisk {
            name: c
                .get("Names")
                .and_then(|n| n.get(0))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            labels: labels(c, "Labels"),
            bytes: bytes(c.get("SizeRw")).unwrap_or(0),
        })
        .filter(|c| labelled(&c.labels))
        .collect();
    let volumes = items("Volumes")
        .iter()
        .map(|v| VolumeDisk {
            name: v
                .get("Name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            labels: labels(v, "Labels"),
            // -1 while the engine has not measured it.
            bytes: bytes(v.get("UsageData").and_then(|u| u.get("Size"))).unwrap_or(0),
        })
        .filter(|v| labelled(&v.labels))
        .collect();
    let images = items("Images")
        .iter()
        .map(|i| {
            let size = bytes(i.get("Size")).unwrap_or(0);
            let shared = bytes(i.get("SharedSize")).unwrap_or(0);
            ImageDisk {
                id: i
                    .get("Id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                tags: i
                    .get("RepoTags")
                    .and_then(Value::as_array)
                    .map(|t| {
                        t.iter()
                            .filter_map(|t| Some(t.as_str()?.to_owned()))
                            .collect()
                    })
                    .unwrap_or_default(),
                bytes: size.saturating_sub(shared),
            }
        })
        .collect();
    DiskUsage {
        containers,
        volumes,
        images,
    }
}

/// The text of the first file in `tar` (what the engine's archive API gives for one file),
/// if it is a regular file of at most [`PASSWD_MAX`] bytes.
fn passwd_from_tar(tar: &[u8]) -> Option<String> {
    use std::io::Read;
    let mut archive = ::tar::Archive::new(tar);
    let entry = archive.entries().ok()?.next()?.ok()?;
    if !entry.header().entry_type().is_file() {
        return None;
    }
    let mut text = String::new();
    entry
        .take(u64::try_from(PASSWD_MAX).unwrap_or(u64::MAX))
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// A helper container (never started) that is removed when this is dropped without
/// [`HelperGuard::done`]: a request cut short, or a deadline, leaves none behind.
struct HelperGuard {
    docker: Docker,
    name: Option<String>,
}

impl HelperGuard {
    fn new(docker: &Docker, name: &str) -> Self {
        Self {
            docker: docker.clone(),
            name: Some(name.to_owned()),
        }
    }

    /// The caller removed it.
    fn done(mut self) {
        self.name = None;
    }
}

impl Drop for HelperGuard {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let docker = self.docker.clone();
        handle.spawn(async move {
            let opts = RemoveContainerOptionsBuilder::default().force(true).build();
            if let Err(e) = docker.remove_container(&name, Some(opts)).await
                && !is_404(&e)
            {
                tracing::warn!(container = %name, error = %e, "a helper container is left behind");
            }
        });
    }
}

/// Root's home in text of the `/etc/passwd` format: the sixth field of the first line of
/// user `root`.
fn root_home_in_passwd(passwd: &str) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        match f.as_slice() {
            ["root", _, _, _, _, home, ..] => Some((*home).to_owned()),
            _ => None,
        }
    })
}

fn overlaps(a: &ipnet::Ipv4Net, b: &ipnet::Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// RFC 3339 time with its fraction padded to nanoseconds, so that string order is time
/// order (Docker trims trailing zeros: `...05.6962Z` vs `...05.696220123Z`).
fn sortable_time(t: &str) -> String {
    match t.split_once('.') {
        Some((secs, rest)) => {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let zone = rest.get(digits.len()..).unwrap_or_default();
            format!("{secs}.{digits:0<9}{zone}")
        }
        None => t.to_owned(),
    }
}

fn map_err(e: bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError {
            status_code: 404,
            message,
        } => RuntimeError::ContainerNotFound(message),
        E::DockerResponseServerError { message, .. } => RuntimeError::Docker(message),
        E::IOError { err } => RuntimeError::Unavailable(err.to_string()),
        E::HyperResponseError { err } => RuntimeError::Unavailable(err.to_string()),
        E::RequestTimeoutError => RuntimeError::Unavailable("request timed out".into()),
        // The socket is gone (dockerd stopped) or refuses connections (restarting).
        E::SocketNotFoundError(path) => RuntimeError::Unavailable(format!("no socket at {path}")),
        E::HyperLegacyError { err } => RuntimeError::Unavailable(err.to_string()),
        other => RuntimeError::Docker(other.to_string()),
    }
}

/// Like [`map_err`], but a 404 that names a network (create or start of a container whose
/// network was removed: "network berth not found") is [`RuntimeError::NetworkNotFound`].
fn map_container_err(e: bollard::errors::Error) -> RuntimeError {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            message,
        } if message.contains("network") => RuntimeError::NetworkNotFound(message),
        e => map_err(e),
    }
}

/// The `changes` of a `docker import` that give the new image `config` (what `docker
/// commit` would have kept): exec-form JSON where Dockerfile takes it, quoted and escaped
/// strings elsewhere. Entries that cannot be written as one safe line (a control character,
/// an odd key) are left out: each change is one Dockerfile line, and the engine joins them.
fn changes_for(config: &ContainerConfig) -> Vec<String> {
    fn quoted(s: &str) -> Option<String> {
        if s.chars().any(char::is_control) {
            return None;
        }
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            if matches!(c, '"' | '\\' | '$') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        Some(out)
    }
    fn json(v: &[String]) -> Option<String> {
        serde_json::to_string(v).ok()
    }
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
    };
    let mut out = Vec::new();
    for e in config.env.iter().flatten() {
        if let Some((k, v)) = e.split_once('=')
            && plain(k)
            && let Some(v) = quoted(v)
        {
            out.push(format!("ENV {k}={v}"));
        }
    }
    if let Some(cmd) = config
        .cmd
        .as_deref()
        .filter(|c| !c.is_empty())
        .and_then(json)
    {
        out.push(format!("CMD {cmd}"));
    }
    if let Some(ep) = config
        .entrypoint
        .as_deref()
        .filter(|c| !c.is_empty())
        .and_then(json)
    {
        out.push(format!("ENTRYPOINT {ep}"));
    }
    if let Some(w) = config
        .working_dir
        .as_deref()
        .filter(|w| !w.is_empty())
        .and_then(quoted)
    {
        out.push(format!("WORKDIR {w}"));
    }
    if let Some(u) = config
        .user
        .as_deref()
        .filter(|u| !u.is_empty())
        .and_then(quoted)
    {
        out.push(format!("USER {u}"));
    }
    let mut labels: Vec<_> = config.labels.iter().flatten().collect();
    labels.sort();
    for (k, v) in labels {
        if let (Some(k), Some(v)) = (quoted(k), quoted(v)) {
            out.push(format!("LABEL {k}={v}"));
        }
    }
    for p in config.exposed_ports.iter().flatten() {
        if plain(p) {
            out.push(format!("EXPOSE {p}"));
        }
    }
    if let Some(v) = config
        .volumes
        .as_deref()
        .filter(|v| !v.is_empty())
        .and_then(json)
    {
        out.push(format!("VOLUME {v}"));
    }
    out
}

/// An engine's refusal of a size limit on a container's writable layer.
fn is_storage_opt_refusal(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Docker(m) if m.contains("storage-opt") || m.contains("storage opt"))
}

fn is_404(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl Runtime for DockerRuntime {
    async fn version(&self) -> Result<EngineVersion, RuntimeError> {
        let v = self.docker.version().await.map_err(map_err)?;
        Ok(EngineVersion {
            version: v.version.unwrap_or_default(),
            api_version: self.api_version.clone(),
        })
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_404(&e) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<String, RuntimeError> {
        // One creation at a time in this daemon; another daemon on the engine may still take
        // the same block first, which the engine refuses as an overlap: then the next one.
        let _one = self.network_lock.lock().await;
        // Blocks the engine refused as overlapping though no listed network has them (one
        // being made or removed by someone else): the next round takes the next block.
        let mut refused = Vec::new();
        for _ in 0..16 {
            if let Some(id) = self.oldest_network(&spec.name).await? {
                return Ok(id);
            }
            let mut used = self.subnets_in_use().await?;
            used.extend(refused.iter().copied());
            let Some((index, subnet, bridge)) = (0..)
                .map_while(|i| spec.block(i).map(|(net, bridge)| (i, net, bridge)))
                .find(|(_, net, _)| !used.iter().any(|u| overlaps(u, net)))
            else {
                return Err(RuntimeError::Docker(format!(
                    "no free /{} left in the users' address pool {} for network {}",
                    spec.prefix_len, spec.pool, spec.name
                )));
            };
            let req = NetworkCreateRequest {
                name: spec.name.clone(),
                driver: Some("bridge".into()),
                // Berth's networks are IPv4 only: the firewall rules are written for IPv4.
                enable_ipv6: Some(false),
                ipam: Some(Ipam {
                    config: Some(vec![IpamConfig {
                        subnet: Some(subnet.to_string()),
                        // Named, so that `docker network inspect` shows it.
                        gateway: subnet.hosts().next().map(|g| g.to_string()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                options: Some(HashMap::from([
                    // Nobody else's container is on it; off all the same.
                    (
                        "com.docker.network.bridge.enable_icc".to_owned(),
                        "false".to_owned(),
                    ),
                    ("com.docker.network.bridge.name".to_owned(), bridge.clone()),
                ])),
                labels: Some(spec.labels.clone()),
                ..Default::default()
            };
            match self.docker.create_network(req).await {
                Ok(_) => {
                    tracing::info!(network = %spec.name, %subnet, %bridge, index, "network created");
                }
                // Made by someone else meanwhile: found on the next round.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) => {}
                Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                    if message.contains("overlap") || message.contains("already exists") =>
                {
                    tracing::debug!(network = %spec.name, %subnet, error = %message, "block taken meanwhile");
                    refused.push(subnet);
                }
                Err(e) => return Err(map_err(e)),
            }
        }
        Err(RuntimeError::Docker(format!(
            "network {} could not be created: every block tried was taken meanwhile",
            spec.name
        )))
    }

    async fn reattach_network(
        &self,
        id: &str,
        from: &[String],
        network: &str,
    ) -> Result<(), RuntimeError> {
        // `network` itself too: after it was removed and made again, the container's
        // endpoint names the removed one; a forced disconnect by name drops it (an error
        // means there was nothing to drop).
        for old in from.iter().map(String::as_str).chain([network]) {
            let gone = NetworkDisconnectRequest {
                container: id.to_owned(),
                force: Some(true),
            };
            if let Err(e) = self.docker.disconnect_network(old, gone).await {
                tracing::debug!(network = old, error = %e, "disconnect");
            }
        }
        let join = NetworkConnectRequest {
            container: id.to_owned(),
            endpoint_config: None,
        };
        match self.docker.connect_network(network, join).await {
            Ok(()) => Ok(()),
            // Already attached (the engine found the new network by name itself).
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 403, ..
            }) => Ok(()),
            Err(e) => Err(map_container_err(e)),
        }
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        for (id, _) in self.networks_named(name).await? {
            match self.docker.remove_network(&id).await {
                Ok(()) => {}
                Err(e) if is_404(&e) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
        Ok(())
    }

    async fn list_networks(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{key}={value}")])]);
        let opts = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let nets = self
            .docker
            .list_networks(Some(opts))
            .await
            .map_err(map_err)?;
        Ok(nets.into_iter().filter_map(|n| n.name).collect())
    }

    fn known_running(&self, id: &str) -> bool {
        self.cached_init(id).is_some()
    }

    async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        match self.docker.inspect_container(name, None).await {
            Ok(c) => Ok(Some(ContainerInfo {
                id: c.id.unwrap_or_default(),
                name: c
                    .name
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                running: c.state.and_then(|s| s.running).unwrap_or(false),
                labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
                networks: c
                    .network_settings
                    .and_then(|n| n.networks)
                    .map(|n| n.into_keys().collect())
                    .unwrap_or_default(),
            })),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn list(&self, key: &str, value: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{key}={value}")])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(map_err)?;
        Ok(list
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                labels: c.labels.unwrap_or_default(),
                networks: c
                    .network_settings
                    .and_then(|n| n.networks)
                    .map(|n| n.into_keys().collect())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        if !self.image_exists(&spec.image).await? {
            return Err(RuntimeError::ImageNotFound(spec.image.clone()));
        }
        let host = HostConfig {
            memory: spec.limits.memory_bytes,
            memory_swap: spec.limits.memory_bytes,
            nano_cpus: spec.limits.nano_cpus,
            pids_limit: Some(spec.limits.pids),
            // A user writing to her init's stdout fills the engine's disk otherwise.
            log_config: Some(match spec.limits.log_bytes {
                Some(bytes) => HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_owned(), (bytes / 2).max(1024).to_string()),
                        ("max-file".to_owned(), "2".to_owned()),
                    ])),
                },
                None => HostConfigLogConfig {
                    typ: Some("none".into()),
                    config: None,
                },
            }),
            storage_opt: spec
                .limits
                .disk_bytes
                .map(|b| HashMap::from([("size".to_owned(), b.to_string())])),
            device_requests: spec.gpus.as_ref().map(|g| {
                vec![DeviceRequest {
                    driver: Some(NVIDIA.into()),
                    count: matches!(g, GpuRequest::All).then_some(-1),
                    device_ids: match g {
                        GpuRequest::All => None,
                        GpuRequest::Devices(ids) => Some(ids.clone()),
                    },
                    capabilities: Some(vec![vec!["gpu".into()]]),
                    options: None,
                }]
            }),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            // Raw sockets would let a user spoof ARP on a bridge (each user has her own since
            // issue 14; kept off all the same); ping still works through the unprivileged
            // ICMP socket range.
            cap_drop: Some(vec!["NET_RAW".into()]),
            privileged: Some(false),
            network_mode: Some(spec.network.clone()),
            mounts: Some(
                std::iter::once(Mount {
                    typ: Some(MountType::BIND),
                    source: Some(spec.guest_dir.to_string_lossy().into_owned()),
                    target: Some(GUEST_MOUNT.into()),
                    read_only: Some(true),
                    ..Default::default()
                })
                .chain(spec.mounts.iter().map(|m| Mount {
                    typ: Some(MountType::BIND),
                    source: Some(m.source.to_string_lossy().into_owned()),
                    target: Some(m.target.clone()),
                    read_only: Some(m.read_only),
                    ..Default::default()
                }))
                // The engine copies the image's content of the target into an empty volume
                // at its first mount (no `nocopy`).
                .chain(spec.volumes.iter().map(|v| Mount {
                    typ: Some(MountType::VOLUME),
                    source: Some(v.name.clone()),
                    target: Some(v.target.clone()),
                    read_only: Some(false),
                    ..Default::default()
                }))
                .collect(),
            ),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            hostname: Some(spec.hostname.clone()),
            labels: Some(spec.labels.clone()),
            user: Some("0:0".into()),
            working_dir: Some("/root".into()),
            entrypoint: Some(vec![format!("{GUEST_MOUNT}/berth-guest"), "init".into()]),
            cmd: Some(vec![]),
            env: Some(vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ]),
            host_config: Some(host),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        match self
            .docker
            .create_container(Some(opts.clone()), body.clone())
            .await
            .map_err(map_container_err)
        {
            Ok(resp) => Ok(resp.id),
            // The engine changed under the daemon (its data root moved off a file system
            // with quotas): the user still gets her container, without the cap.
            Err(e) if spec.limits.disk_bytes.is_some() && is_storage_opt_refusal(&e) => {
                tracing::warn!(error = %e, "the engine refuses the disk quota; container created without it");
                let mut body = body;
                if let Some(h) = body.host_config.as_mut() {
                    h.storage_opt = None;
                }
                let resp = self
                    .docker
                    .create_container(Some(opts), body)
                    .await
                    .map_err(map_container_err)?;
                Ok(resp.id)
            }
            Err(e) => Err(e),
        }
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        match self.docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            // 304: already running.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(map_container_err(e)),
        }
    }

    async fn update_limits(
        &self,
        id: &str,
        memory_bytes: Option<i64>,
        nano_cpus: Option<i64>,
    ) -> Result<(), RuntimeError> {
        let body = ContainerUpdateBody {
            memory: memory_bytes,
            // Swap included, as at create; set together so that neither is below the other.
            memory_swap: memory_bytes,
            nano_cpus,
            ..Default::default()
        };
        self.docker
            .update_container(id, body)
            .await
            .map_err(map_container_err)?;
        Ok(())
    }

    async fn applied(&self, name: &str) -> Result<Option<Applied>, RuntimeError> {
        let c = match self.docker.inspect_container(name, None).await {
            Ok(c) => c,
            Err(e) if is_404(&e) => return Ok(None),
            Err(e) => return Err(map_err(e)),
        };
        let h = c.host_config.unwrap_or_default();
        let positive = |v: Option<i64>| v.filter(|v| *v > 0);
        let gpus = h
            .device_requests
            .unwrap_or_default()
            .into_iter()
            .find(|d| d.driver.as_deref() == Some(NVIDIA))
            .map(|d| match d.device_ids {
                Some(ids) if !ids.is_empty() => GpuRequest::Devices(ids),
                _ => GpuRequest::All,
            });
        let all = h.mounts.unwrap_or_default();
        let volumes = all
            .iter()
            .filter(|m| m.typ == Some(MountType::VOLUME))
            .filter_map(|m| {
                Some(VolumeMount {
                    name: m.source.clone()?,
                    target: m.target.clone()?,
                })
            })
            .collect();
        let mounts = all
            .into_iter()
            .filter(|m| m.typ == Some(MountType::BIND))
            .filter_map(|m| {
                Some(BindMount {
                    source: PathBuf::from(m.source?),
                    target: m.target?,
                    read_only: m.read_only.unwrap_or(false),
                })
            })
            .filter(|m| m.target != GUEST_MOUNT)
            .collect();
        Ok(Some(Applied {
            memory_bytes: positive(h.memory),
            nano_cpus: positive(h.nano_cpus),
            pids: positive(h.pids_limit),
            gpus,
            mounts,
            volumes,
        }))
    }

    async fn gpu_support(&self) -> Result<GpuSupport, RuntimeError> {
        let info = self.docker.info().await.map_err(map_err)?;
        Ok(if info.runtimes.unwrap_or_default().contains_key(NVIDIA) {
            GpuSupport::Available
        } else {
            GpuSupport::NotAvailable
        })
    }

    async fn data_root(&self) -> Result<PathBuf, RuntimeError> {
        let info = self.docker.info().await.map_err(map_err)?;
        Ok(PathBuf::from(
            info.docker_root_dir
                .unwrap_or_else(|| "/var/lib/docker".into()),
        ))
    }

    async fn stop(&self, id: &str, timeout_secs: i32) -> Result<(), RuntimeError> {
        let opts = StopContainerOptionsBuilder::default()
            .t(timeout_secs)
            .build();
        let docker = self.docker.clone().with_timeout(Duration::from_secs(
            u64::try_from(timeout_secs).unwrap_or(0) + 120,
        ));
        match docker.stop_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_404(&e) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn start_session(
        &self,
        container: &str,
        spec: SessionSpec,
    ) -> Result<Session, RuntimeError> {
        // The container's init starts the session when it can (no engine on the data path);
        // an init from an older Berth cannot, and the engine does it.
        if let Some(init) = self.init(container).await?
            && let Some(exec) = init::spawn(init, container, &spec).await?
        {
            return Ok(exec);
        }
        let tty = spec.tty.is_some();
        let cmd = match spec.tty {
            // The guest sets the TTY size before the command runs: engine 20.10 ignores the
            // exec's ConsoleSize, and a resize after the start races with short commands.
            Some(size) => [
                vec![
                    format!("{GUEST_MOUNT}/berth-guest"),
                    "tty-exec".to_owned(),
                    size.cols.to_string(),
                    size.rows.to_string(),
                ],
                spec.cmd,
            ]
            .concat(),
            None => spec.cmd,
        };
        let created = self
            .docker
            .create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(cmd),
                    env: Some(spec.env),
                    user: Some("0:0".to_owned()),
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(tty),
                    ..Default::default()
                },
            )
            .await
            .map_err(map_err)?;
        let io = start_attached(&self.socket, &self.api_version, &created.id, tty).await?;
        let pid = self.exec_pid(&created.id).await?;
        let guard = pid
            .map(|p| ProcessGuard::new(p, container))
            .unwrap_or_default();
        tracing::debug!(exec = %created.id, pid = ?guard.pid(), "exec started");
        let (reader, writer) = tokio::io::split(io);
        let output = if tty {
            raw_output(reader)
        } else {
            demux_output(reader)
        };
        Ok(Session {
            handle: SessionHandle::Engine(created.id.clone()),
            id: created.id,
            stdin: Box::pin(writer),
            stdin_now: None,
            output_now: None,
            output,
            guard,
        })
    }

    async fn resize_session(
        &self,
        exec: &SessionHandle,
        size: TtySize,
    ) -> Result<(), RuntimeError> {
        let exec_id = match exec {
            SessionHandle::Engine(id) => id,
            SessionHandle::Init(g) => return g.resize(size),
        };
        let opts = ResizeExecOptions {
            h: i32::from(size.rows),
            w: i32::from(size.cols),
        };
        self.docker
            .resize_exec(exec_id, opts)
            .await
            .map_err(map_err)
    }

    async fn commit(
        &self,
        container: &str,
        repo: &str,
        tag: &str,
    ) -> Result<CommitInfo, RuntimeError> {
        // With sizes: what the commit will copy, counted as the engine will copy it.
        let sized = bollard::query_parameters::InspectContainerOptionsBuilder::default()
            .size(true)
            .build();
        let c = self
            .docker
            .clone()
            .with_timeout(Duration::from_secs(3600))
            .inspect_container(container, Some(sized))
            .await
            .map_err(map_err)?;
        let parent = match c.image.as_deref() {
            Some(image) => Some(self.docker.inspect_image(image).await.map_err(map_err)?),
            None => None,
        };
        let layers_of = |i: &bollard::models::ImageInspect| {
            i.root_fs
                .as_ref()
                .and_then(|r| r.layers.as_ref())
                .map_or(0, Vec::len)
        };
        let size_of = |i: &bollard::models::ImageInspect| {
            i.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)
        };
        let flatten = parent.as_ref().is_some_and(|p| layers_of(p) >= MAX_LAYERS);
        self.room_for_commit(&c, flatten).await?;
        // A big container takes a while to copy: allow well past the default timeout.
        let docker = self.docker.clone().with_timeout(Duration::from_secs(3600));
        let id = if flatten {
            use futures_util::{StreamExt, TryStreamExt};
            // The container's whole file system, straight into a new one-layer image that
            // keeps what a commit keeps of the container's settings.
            let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
                .from_src("-")
                .repo(repo)
                .tag(tag)
                .message("berth commit (flattened)")
                .changes(changes_for(&c.config.clone().unwrap_or_default()))
                .build();
            let rootfs = docker
                .export_container(container)
                .map(|r| r.map_err(std::io::Error::other));
            let mut progress =
                docker.create_image(Some(opts), Some(bollard::body_try_stream(rootfs)), None);
            while let Some(p) = progress.try_next().await.map_err(map_err)? {
                if let Some(message) = p.error_detail.and_then(|d| d.message) {
                    return Err(RuntimeError::Docker(format!(
                        "flattening the commit: {message}"
                    )));
                }
            }
            self.image_id(&format!("{repo}:{tag}"))
                .await?
                .ok_or_else(|| {
                    RuntimeError::Docker(format!("the engine did not create image {repo}:{tag}"))
                })?
        } else {
            let opts = CommitContainerOptionsBuilder::default()
                .container(container)
                .repo(repo)
                .tag(tag)
                .comment("berth commit")
                // Not paused: a paused container refuses new execs (logins) meanwhile.
                .pause(false)
                .build();
            docker
                .commit_container(opts, ContainerConfig::default())
                .await
                .map_err(map_err)?
                .id
        };
        let made = self.docker.inspect_image(&id).await.map_err(map_err)?;
        let size_bytes = size_of(&made);
        Ok(CommitInfo {
            id,
            size_bytes,
            added_bytes: match (&parent, flatten) {
                (Some(p), false) => size_bytes.saturating_sub(size_of(p)),
                _ => size_bytes,
            },
            layers: layers_of(&made),
            flattened: flatten,
        })
    }

    async fn disk_quota(&self) -> Result<DiskQuota, RuntimeError> {
        let info = self.docker.info().await.map_err(map_err)?;
        let driver = info.driver.unwrap_or_default();
        let root = info
            .docker_root_dir
            .unwrap_or_else(|| "/var/lib/docker".into());
        let backing = info
            .driver_status
            .unwrap_or_default()
            .into_iter()
            .find(|kv| kv.first().map(String::as_str) == Some("Backing Filesystem"))
            .and_then(|kv| kv.get(1).cloned())
            .unwrap_or_default();
        let fix = format!("put {root} on xfs mounted with pquota");
        match driver.as_str() {
            "overlay2" | "vfs" if backing != "xfs" => {
                return Ok(DiskQuota::NotEnforced {
                    reason: format!("{driver} on {backing} has no project quotas; {fix}"),
                });
            }
            "overlay2" | "vfs" | "btrfs" | "zfs" | "devicemapper" => {}
            other => {
                return Ok(DiskQuota::NotEnforced {
                    reason: format!(
                        "the {other} storage driver cannot cap a container's disk; use overlay2 and {fix}"
                    ),
                });
            }
        }
        // The engine is the judge: a container made (not started) with a size limit.
        let Some(image) = self.list_images().await?.into_iter().next() else {
            return Ok(DiskQuota::NotEnforced {
                reason: "unknown until an image is present (no image to try a container with)"
                    .into(),
            });
        };
        let body = ContainerCreateBody {
            image: Some(image.id),
            cmd: Some(vec!["/nonexistent".into()]),
            labels: Some(HashMap::from([("berth.probe".to_owned(), "1".to_owned())])),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                // Devicemapper refuses less than its base size (10 GB by default).
                storage_opt: Some(HashMap::from([("size".to_owned(), "100G".to_owned())])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("berth-quota-probe-{}", std::process::id());
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let made = self.docker.create_container(Some(opts), body).await;
        let _ = self.remove(&name).await;
        match made.map_err(map_err) {
            Ok(_) => Ok(DiskQuota::Enforced { driver }),
            Err(e @ RuntimeError::Docker(_)) => Ok(DiskQuota::NotEnforced {
                reason: if driver == "overlay2" {
                    format!("overlay2 on xfs without project quotas ({e}); {fix}")
                } else {
                    format!("the engine refuses a size limit ({e})")
                },
            }),
            Err(e) => Err(e),
        }
    }

    async fn user_namespaces(&self) -> Result<UserNamespaces, RuntimeError> {
        let info = self.docker.info().await.map_err(map_err)?;
        let on = info
            .security_options
            .unwrap_or_default()
            .iter()
            .any(|o| o.split(',').any(|kv| kv == "name=userns"));
        if !on {
            return Ok(UserNamespaces::Off);
        }
        // Under userns-remap the engine keeps its data in `ROOT/UID.GID`.
        let root_uid = info.docker_root_dir.as_deref().and_then(|d| {
            let last = d.rsplit('/').next()?;
            last.split_once('.')?.0.parse().ok()
        });
        Ok(UserNamespaces::On { root_uid })
    }

    async fn disk_usage(&self, key: &str, value: &str) -> Result<DiskUsage, RuntimeError> {
        // The engine runs one `system df` at a time and refuses the others ("a disk usage
        // operation is already running"): someone's `docker system df`, another tool's.
        // Asked again until the one running has ended, for a while.
        let until = tokio::time::Instant::now() + DF_BUSY_FOR;
        loop {
            match self.get_json("/system/df", DF_MAX).await {
                Ok(df) => return Ok(usage_from_df(&df, key, value)),
                Err(RuntimeError::Docker(e))
                    if e.contains(DF_BUSY) && tokio::time::Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn root_home(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        use futures_util::StreamExt;
        static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        if !self.image_exists(image).await? {
            return Err(RuntimeError::ImageNotFound(image.to_owned()));
        }
        // A container made from the image and never started: its files are the image's.
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["/nonexistent".into()]),
            entrypoint: Some(vec![]),
            labels: Some(HashMap::from([("berth.probe".to_owned(), "1".to_owned())])),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("berth-home-probe-{}-{n}", std::process::id());
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        self.docker
            .create_container(Some(opts), body)
            .await
            .map_err(map_err)?;
        let guard = HelperGuard::new(&self.docker, &name);
        let opts = bollard::query_parameters::DownloadFromContainerOptionsBuilder::default()
            .path("/etc/passwd")
            .build();
        let mut stream = self.docker.download_from_container(&name, Some(opts));
        let mut tar = Vec::new();
        let mut read = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) if tar.len() + c.len() <= PASSWD_MAX + 64 * 1024 => tar.extend_from_slice(&c),
                Ok(_) => {
                    read = Err(RuntimeError::Docker(format!(
                        "{image}: /etc/passwd is over {PASSWD_MAX} bytes"
                    )));
                    break;
                }
                Err(e) if is_404(&e) => break,
                Err(e) => {
                    read = Err(map_err(e));
                    break;
                }
            }
        }
        drop(stream);
        let _ = self.remove(&name).await;
        guard.done();
        read?;
        if tar.is_empty() {
            return Ok(None);
        }
        Ok(passwd_from_tar(&tar).and_then(|p| root_home_in_passwd(&p)))
    }

    async fn ensure_volume(
        &self,
        spec: &VolumeSpec,
    ) -> Result<HashMap<String, String>, RuntimeError> {
        if let Some(labels) = self.volume_labels(&spec.name).await? {
            return Ok(labels);
        }
        let request = |size: Option<u64>| bollard::models::VolumeCreateRequest {
            name: Some(spec.name.clone()),
            labels: Some(spec.labels.clone()),
            driver_opts: size.map(|b| HashMap::from([("size".to_owned(), b.to_string())])),
            ..Default::default()
        };
        let made = match self.docker.create_volume(request(spec.size_bytes)).await {
            Ok(made) => made,
            // Only xfs with project quotas takes a size: elsewhere the volume is made
            // without one, as a container is without its storage option.
            Err(e) if spec.size_bytes.is_some() && !is_404(&e) => {
                tracing::warn!(volume = %spec.name, error = %e, "the engine refuses a size for the volume; made without it");
                self.docker
                    .create_volume(request(None))
                    .await
                    .map_err(map_err)?
            }
            Err(e) => return Err(map_err(e)),
        };
        Ok(made.labels)
    }

    async fn save_image(
        &self,
        image: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, RuntimeError> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let docker = self.docker.clone().with_timeout(Duration::from_secs(3600));
        let mut stream = docker.export_image(image);
        let mut n = 0_u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(map_err)?;
            out.write_all(&chunk)
                .await
                .map_err(|e| RuntimeError::Docker(format!("saving {image}: {e}")))?;
            n += u64::try_from(chunk.len()).unwrap_or(0);
        }
        out.flush()
            .await
            .map_err(|e| RuntimeError::Docker(format!("saving {image}: {e}")))?;
        Ok(n)
    }

    async fn load_image(&self, tar: ByteStream) -> Result<(), RuntimeError> {
        use futures_util::TryStreamExt;
        let docker = self.docker.clone().with_timeout(Duration::from_secs(3600));
        let opts = bollard::query_parameters::ImportImageOptionsBuilder::default()
            .quiet(true)
            .build();
        let mut progress = docker.import_image(opts, bollard::body_try_stream(tar), None);
        while let Some(p) = progress.try_next().await.map_err(map_err)? {
            if let Some(message) = p.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::Docker(format!("loading an image: {message}")));
            }
        }
        Ok(())
    }

    async fn tag_image(&self, image: &str, repo: &str, tag: &str) -> Result<(), RuntimeError> {
        let opts = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(tag)
            .build();
        self.docker
            .tag_image(image, Some(opts))
            .await
            .map_err(map_err)
    }

    async fn export_volume(
        &self,
        volume: &str,
        image: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, RuntimeError> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let helper = self.volume_helper(volume, image).await?;
        let guard = HelperGuard::new(&self.docker, &helper);
        let opts = bollard::query_parameters::DownloadFromContainerOptionsBuilder::default()
            .path(&format!("{VOLUME_HELPER_MOUNT}/."))
            .build();
        let docker = self.docker.clone().with_timeout(Duration::from_secs(3600));
        let mut stream = docker.download_from_container(&helper, Some(opts));
        let mut n = 0_u64;
        let mut result = Ok(());
        while let Some(chunk) = stream.next().await {
            let written = match chunk {
                Ok(c) => out.write_all(&c).await.map(|()| c.len()),
                Err(e) => {
                    result = Err(map_err(e));
                    break;
                }
            };
            match written {
                Ok(len) => n += u64::try_from(len).unwrap_or(0),
                Err(e) => {
                    result = Err(RuntimeError::Docker(format!("exporting {volume}: {e}")));
                    break;
                }
            }
        }
        drop(stream);
        let _ = self.remove(&helper).await;
        guard.done();
        result?;
        out.flush()
            .await
            .map_err(|e| RuntimeError::Docker(format!("exporting {volume}: {e}")))?;
        Ok(n)
    }

    async fn import_volume(
        &self,
        volume: &str,
        image: &str,
        tar: ByteStream,
    ) -> Result<(), RuntimeError> {
        let helper = self.volume_helper(volume, image).await?;
        let guard = HelperGuard::new(&self.docker, &helper);
        let opts = bollard::query_parameters::UploadToContainerOptionsBuilder::default()
            .path(VOLUME_HELPER_MOUNT)
            .build();
        let docker = self.docker.clone().with_timeout(Duration::from_secs(3600));
        let r = docker
            .upload_to_container(&helper, Some(opts), bollard::body_try_stream(tar))
            .await
            .map_err(map_err);
        let _ = self.remove(&helper).await;
        guard.done();
        r
    }

    async fn list_volumes(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{key}={value}")])]);
        let opts = bollard::query_parameters::ListVolumesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_volumes(Some(opts))
            .await
            .map_err(map_err)?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    async fn volume_labels(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        match self.docker.inspect_volume(name).await {
            Ok(v) => Ok(Some(v.labels)),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn remove_volume(&self, name: &str) -> Result<bool, RuntimeError> {
        match self
            .docker
            .remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>)
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_404(&e) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn image_labels(
        &self,
        image: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(i.config.and_then(|c| c.labels).unwrap_or_default())),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn list_images(&self) -> Result<Vec<ImageSummary>, RuntimeError> {
        let list = self
            .docker
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(map_err)?;
        Ok(list
            .into_iter()
            .map(|i| ImageSummary {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                size: u64::try_from(i.size).unwrap_or(0),
                created: i.created,
            })
            .collect())
    }

    async fn dangling_images(&self, labels: &[(&str, &str)]) -> Result<Vec<String>, RuntimeError> {
        let filters = HashMap::from([
            ("dangling".to_owned(), vec!["true".to_owned()]),
            (
                "label".to_owned(),
                labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            ),
        ]);
        let opts = bollard::query_parameters::ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let list = self.docker.list_images(Some(opts)).await.map_err(map_err)?;
        // The engine's filter, checked again: an image any tag or digest names is never one.
        Ok(list
            .into_iter()
            .filter(|i| {
                i.repo_tags.iter().all(|t| t == "<none>:<none>")
                    && i.repo_digests.iter().all(|d| d == "<none>@<none>")
                    && labels
                        .iter()
                        .all(|(k, v)| i.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|i| i.id)
            .collect())
    }

    async fn import_image(&self, name: &str, rootfs: ByteStream) -> Result<String, RuntimeError> {
        use futures_util::TryStreamExt;
        // `repo:tag`: the tag is what follows the last `:` after the last `/`.
        let (repo, tag) = match name.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, t),
            _ => (name, "latest"),
        };
        let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(tag)
            .message("berth image import")
            .build();
        // A big root file system takes a while: allow well past the default timeout.
        let docker = self.docker.clone().with_timeout(Duration::from_secs(3600));
        let mut progress =
            docker.create_image(Some(opts), Some(bollard::body_try_stream(rootfs)), None);
        while progress.try_next().await.map_err(map_err)?.is_some() {}
        self.image_id(name)
            .await?
            .ok_or_else(|| RuntimeError::Docker(format!("the engine did not create image {name}")))
    }

    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        match self
            .docker
            .remove_image(
                image,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_404(&e) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn hang_up_sessions(&self, container: &str) -> Result<usize, RuntimeError> {
        let c = match self.docker.inspect_container(container, None).await {
            Ok(c) => c,
            Err(e) if is_404(&e) => return Ok(0),
            Err(e) => return Err(map_err(e)),
        };
        let Some(id) = c.id.filter(|id| !id.is_empty()) else {
            return Ok(0);
        };
        let mut n = 0;
        for exec in c.exec_ids.unwrap_or_default() {
            let Ok(x) = self.docker.inspect_exec(&exec).await else {
                continue;
            };
            if x.running == Some(true)
                && let Some(pid) = x.pid.and_then(|p| i32::try_from(p).ok())
                && pid > 0
                && crate::process::hang_up(pid, &id)
            {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn open_init(&self, container: &str) -> Result<Option<ContainerInit>, RuntimeError> {
        match self.init(container).await? {
            Some(init) => init::open(init, container).map(Some),
            None => Ok(None),
        }
    }

    async fn session_exit_code(&self, exec: &SessionHandle) -> Result<i64, RuntimeError> {
        let exec_id = match exec {
            SessionHandle::Engine(id) => id,
            SessionHandle::Init(g) => return g.exit_code().await,
        };
        for _ in 0..200 {
            let st = self.docker.inspect_exec(exec_id).await.map_err(map_err)?;
            if st.running != Some(true) {
                return Ok(st.exit_code.unwrap_or(-1));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(RuntimeError::Docker(format!(
            "exec {exec_id} did not report an exit code"
        )))
    }
}
