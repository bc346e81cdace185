//! An in-memory [`Runtime`] for fast tests of the code above the runtime (behind the
//! `test-util` feature). Containers are records; an exec runs its command as a local
//! process, so sessions can be driven end to end without Docker. Counts every operation so
//! tests can assert, for example, that concurrent logins created one container.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use tokio_util::io::ReaderStream;

use crate::{
    ContainerInfo, ContainerInit, ContainerSpec, EngineVersion, NetworkSpec, Output, ProcessGuard,
    Runtime, RuntimeError, Session, SessionHandle, SessionSpec, TtySize,
};

/// A volume's labels and how many bytes it holds.
type FakeVolume = (HashMap<String, String>, u64);

#[derive(Default)]
pub struct FakeRuntime {
    containers: Mutex<HashMap<String, ContainerInfo>>,
    images: Mutex<HashSet<String>>,
    exits: Arc<Mutex<HashMap<String, i64>>>,
    next_id: AtomicUsize,
    /// How long a create takes, to widen race windows in tests.
    pub create_delay: Duration,
    pub creates: AtomicUsize,
    pub starts: AtomicUsize,
    pub stops: AtomicUsize,
    pub removes: AtomicUsize,
    pub network_ensures: AtomicUsize,
    pub reattaches: AtomicUsize,
    /// Networks made by `ensure_network`, with their labels.
    networks: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Set by [`FakeRuntime::vanish_networks`]: creates and starts fail with
    /// [`RuntimeError::NetworkNotFound`] until the next `ensure_network`.
    network_gone: AtomicBool,
    /// Set by [`FakeRuntime::set_engine_down`]: every call fails with
    /// [`RuntimeError::Unavailable`].
    engine_down: AtomicBool,
    /// What each container (by name) was given, as the engine would report it.
    applied: Mutex<HashMap<String, crate::Applied>>,
    /// Set by [`FakeRuntime::set_gpus`]: the engine has the NVIDIA runtime.
    gpus: AtomicBool,
    pub updates: AtomicUsize,
    pub inspects: AtomicUsize,
    pub commits: AtomicUsize,
    /// Disk measurements asked for; and whether they fail.
    pub disk_measures: AtomicUsize,
    pub disk_fails: std::sync::atomic::AtomicBool,
    /// Volumes by name, with their labels and what they hold ([`FakeRuntime::set_volume_bytes`]).
    volumes: Mutex<HashMap<String, FakeVolume>>,
    /// Root's home in each image, by image name ([`FakeRuntime::set_root_home`]); `/root`
    /// for an image not named.
    homes: Mutex<HashMap<String, Option<String>>>,
    /// What each container's writable layer and each image holds, for `disk_usage`.
    layer_bytes: Mutex<HashMap<String, u64>>,
    image_bytes: Mutex<HashMap<String, u64>>,
}

impl FakeRuntime {
    pub fn with_images(images: &[&str]) -> Self {
        let rt = Self::default();
        if let Ok(mut i) = rt.images.lock() {
            i.extend(images.iter().map(|s| (*s).to_owned()));
        }
        rt
    }

    pub fn with_create_delay(mut self, delay: Duration) -> Self {
        self.create_delay = delay;
        self
    }

    /// Puts a container in place as if someone else had made it.
    pub fn insert(&self, info: ContainerInfo) {
        if let Ok(mut c) = self.containers.lock() {
            c.insert(info.name.clone(), info);
        }
    }

    /// As if the engine stopped answering (`down`) or came back.
    pub fn set_engine_down(&self, down: bool) {
        self.engine_down.store(down, Ordering::SeqCst);
    }

    fn up(&self) -> Result<(), RuntimeError> {
        if self.engine_down.load(Ordering::SeqCst) {
            Err(RuntimeError::Unavailable("the fake engine is down".into()))
        } else {
            Ok(())
        }
    }

    /// As if the engine had the NVIDIA container runtime (`on`) or not.
    pub fn set_gpus(&self, on: bool) {
        self.gpus.store(on, Ordering::SeqCst);
    }

    /// Root's home in `image`'s `/etc/passwd` (`None`: no such file).
    pub fn set_root_home(&self, image: &str, home: Option<&str>) {
        if let Ok(mut h) = self.homes.lock() {
            h.insert(image.to_owned(), home.map(str::to_owned));
        }
    }

    /// As if volume `name` held `bytes`.
    pub fn set_volume_bytes(&self, name: &str, bytes: u64) {
        if let Ok(mut v) = self.volumes.lock()
            && let Some(v) = v.get_mut(name)
        {
            v.1 = bytes;
        }
    }

    /// As if container `name`'s writable layer held `bytes`.
    pub fn set_layer_bytes(&self, name: &str, bytes: u64) {
        if let Ok(mut l) = self.layer_bytes.lock() {
            l.insert(name.to_owned(), bytes);
        }
    }

    /// As if image `name` held `bytes` of its own.
    pub fn set_image_bytes(&self, name: &str, bytes: u64) {
        if let Ok(mut i) = self.image_bytes.lock() {
            i.insert(name.to_owned(), bytes);
        }
    }

    /// The named volumes container `name` was made with.
    pub fn applied_volumes(&self, name: &str) -> Vec<crate::VolumeMount> {
        self.applied
            .lock()
            .ok()
            .and_then(|a| a.get(name).map(|a| a.volumes.clone()))
            .unwrap_or_default()
    }

    /// The volumes there are, by name.
    pub fn volume_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .volumes
            .lock()
            .map(|v| v.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Adds image `name`, as a commit or a pull would.
    pub fn add_image(&self, name: &str) {
        if let Ok(mut i) = self.images.lock() {
            i.insert(name.to_owned());
        }
    }

    /// The spec's part the engine keeps, as [`Runtime::applied`] gives it.
    fn applied_of(spec: &ContainerSpec) -> crate::Applied {
        crate::Applied {
            memory_bytes: spec.limits.memory_bytes,
            nano_cpus: spec.limits.nano_cpus,
            pids: Some(spec.limits.pids),
            gpus: spec.gpus.clone(),
            mounts: spec.mounts.clone(),
            volumes: spec.volumes.clone(),
        }
    }

    /// As `docker network rm` under a running daemon.
    pub fn vanish_networks(&self) {
        self.network_gone.store(true, Ordering::SeqCst);
    }

    fn network_present(&self, name: &str) -> Result<(), RuntimeError> {
        if self.network_gone.load(Ordering::SeqCst) {
            Err(RuntimeError::NetworkNotFound(format!(
                "network {name} not found"
            )))
        } else {
            Ok(())
        }
    }

    pub fn container(&self, name: &str) -> Option<ContainerInfo> {
        self.containers.lock().ok()?.get(name).cloned()
    }

    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut HashMap<String, ContainerInfo>) -> T,
    ) -> Result<T, RuntimeError> {
        self.up()?;
        let mut c = self
            .containers
            .lock()
            .map_err(|_| RuntimeError::Docker("fake poisoned".into()))?;
        Ok(f(&mut c))
    }

    fn by_id<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerInfo) -> T,
    ) -> Result<T, RuntimeError> {
        self.with(|c| c.values_mut().find(|i| i.id == id || i.name == id).map(f))?
            .ok_or_else(|| RuntimeError::ContainerNotFound(id.to_owned()))
    }
}

impl Runtime for FakeRuntime {
    async fn version(&self) -> Result<EngineVersion, RuntimeError> {
        self.up()?;
        Ok(EngineVersion {
            version: "fake".into(),
            api_version: "1.41".into(),
        })
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        self.up()?;
        Ok(self
            .images
            .lock()
            .map(|i| i.contains(image))
            .unwrap_or(false))
    }

    async fn ensure_network(&self, spec: &NetworkSpec) -> Result<String, RuntimeError> {
        self.up()?;
        self.network_gone.store(false, Ordering::SeqCst);
        self.network_ensures.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut n) = self.networks.lock() {
            n.entry(spec.name.clone())
                .or_insert_with(|| spec.labels.clone());
        }
        Ok(format!("net-{}", spec.name))
    }

    async fn reattach_network(
        &self,
        id: &str,
        _from: &[String],
        network: &str,
    ) -> Result<(), RuntimeError> {
        self.network_present(network)?;
        self.by_id(id, |i| i.networks = vec![network.to_owned()])?;
        self.reattaches.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        let used = self.with(|c| c.values().any(|i| i.networks.iter().any(|n| n == name)))?;
        if used {
            return Err(RuntimeError::Docker(format!(
                "network {name} has active endpoints"
            )));
        }
        if let Ok(mut n) = self.networks.lock() {
            n.remove(name);
        }
        Ok(())
    }

    async fn list_networks(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        self.up()?;
        Ok(self
            .networks
            .lock()
            .map(|n| {
                n.iter()
                    .filter(|(_, l)| l.get(key).map(String::as_str) == Some(value))
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// A running container's init counts as reached and alive (the fake has no processes).
    fn known_running(&self, id: &str) -> bool {
        self.containers
            .lock()
            .is_ok_and(|c| c.values().any(|i| i.id == id && i.running))
    }

    async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        self.inspects.fetch_add(1, Ordering::SeqCst);
        self.with(|c| c.get(name).cloned())
    }

    async fn list(&self, key: &str, value: &str) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.with(|c| {
            c.values()
                .filter(|i| i.labels.get(key).map(String::as_str) == Some(value))
                .cloned()
                .collect()
        })
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        tokio::time::sleep(self.create_delay).await;
        if !self.image_exists(&spec.image).await? {
            return Err(RuntimeError::ImageNotFound(spec.image.clone()));
        }
        self.network_present(&spec.network)?;
        if let Some(v) = spec.volumes.iter().find(|v| {
            self.volumes
                .lock()
                .map_or(true, |vols| !vols.contains_key(&v.name))
        }) {
            return Err(RuntimeError::Docker(format!("no such volume: {}", v.name)));
        }
        let id = format!("fake{:060}", self.next_id.fetch_add(1, Ordering::SeqCst));
        let info = ContainerInfo {
            id: id.clone(),
            name: spec.name.clone(),
            running: false,
            labels: spec.labels.clone(),
            networks: vec![spec.network.clone()],
        };
        let created = self.with(|c| {
            if c.contains_key(&spec.name) {
                false
            } else {
                c.insert(spec.name.clone(), info);
                true
            }
        })?;
        if !created {
            return Err(RuntimeError::Docker(format!(
                "conflict: name {} in use",
                spec.name
            )));
        }
        if let Ok(mut a) = self.applied.lock() {
            a.insert(spec.name.clone(), Self::applied_of(spec));
        }
        self.creates.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }

    async fn update_limits(
        &self,
        id: &str,
        memory_bytes: Option<i64>,
        nano_cpus: Option<i64>,
    ) -> Result<(), RuntimeError> {
        let name = self.by_id(id, |i| i.name.clone())?;
        if let Ok(mut a) = self.applied.lock()
            && let Some(a) = a.get_mut(&name)
        {
            if memory_bytes.is_some() {
                a.memory_bytes = memory_bytes;
            }
            if nano_cpus.is_some() {
                a.nano_cpus = nano_cpus;
            }
        }
        self.updates.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn applied(&self, name: &str) -> Result<Option<crate::Applied>, RuntimeError> {
        if self.inspect(name).await?.is_none() {
            return Ok(None);
        }
        Ok(self.applied.lock().ok().and_then(|a| a.get(name).cloned()))
    }

    async fn gpu_support(&self) -> Result<crate::GpuSupport, RuntimeError> {
        self.up()?;
        Ok(if self.gpus.load(Ordering::SeqCst) {
            crate::GpuSupport::Available
        } else {
            crate::GpuSupport::NotAvailable
        })
    }

    async fn data_root(&self) -> Result<std::path::PathBuf, RuntimeError> {
        self.up()?;
        Ok("/var/lib/docker".into())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.network_present(id)?;
        self.by_id(id, |i| i.running = true)?;
        self.starts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn stop(&self, id: &str, _timeout_secs: i32) -> Result<(), RuntimeError> {
        self.by_id(id, |i| i.running = false)?;
        self.stops.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|c| c.retain(|_, i| i.id != id))?;
        self.removes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn start_session(
        &self,
        container: &str,
        spec: SessionSpec,
    ) -> Result<Session, RuntimeError> {
        if !self.by_id(container, |i| i.running)? {
            return Err(RuntimeError::Docker("container is not running".into()));
        }
        let (program, args) = spec
            .cmd
            .split_first()
            .ok_or_else(|| RuntimeError::Docker("empty command".into()))?;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env_clear()
            .envs(spec.env.iter().filter_map(|kv| kv.split_once('=')))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RuntimeError::Docker(e.to_string()))?;
        let id = format!("exec{}", self.next_id.fetch_add(1, Ordering::SeqCst));
        let io = |e: std::io::Error| RuntimeError::Docker(e.to_string());
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| RuntimeError::Docker("no stdin".into()))?;
        let out = ReaderStream::new(
            child
                .stdout
                .take()
                .ok_or_else(|| RuntimeError::Docker("no stdout".into()))?,
        )
        .map(move |r| r.map(Output::Stdout).map_err(io));
        let err = ReaderStream::new(
            child
                .stderr
                .take()
                .ok_or_else(|| RuntimeError::Docker("no stderr".into()))?,
        )
        .map(move |r| r.map(Output::Stderr).map_err(io));
        // The exit code is recorded once the output has ended, as with Docker.
        let exits = self.exits.clone();
        let exec_id = id.clone();
        let record = stream::once(async move {
            let code = child
                .wait()
                .await
                .ok()
                .and_then(|s| s.code())
                .map_or(-1, i64::from);
            if let Ok(mut e) = exits.lock() {
                e.insert(exec_id, code);
            }
        })
        .filter_map(|()| async { None });
        let output = stream::select(out, err).chain(record);
        let guard = ProcessGuard::default();
        Ok(Session {
            handle: SessionHandle::Engine(id.clone()),
            id,
            stdin: Box::pin(stdin),
            stdin_now: None,
            output_now: None,
            output: Box::pin(output),
            guard,
        })
    }

    async fn commit(
        &self,
        container: &str,
        repo: &str,
        tag: &str,
    ) -> Result<crate::CommitInfo, RuntimeError> {
        self.by_id(container, |_| ())?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        let image = format!("{repo}:{tag}");
        if let Ok(mut i) = self.images.lock() {
            i.insert(image);
        }
        Ok(crate::CommitInfo {
            id: format!("sha256:fake{}", self.next_id.fetch_add(1, Ordering::SeqCst)),
            size_bytes: 0,
            added_bytes: 0,
            layers: 1,
            flattened: false,
        })
    }

    async fn disk_quota(&self) -> Result<crate::DiskQuota, RuntimeError> {
        self.up()?;
        Ok(crate::DiskQuota::NotEnforced {
            reason: "the fake engine keeps no files".into(),
        })
    }

    async fn disk_usage(&self, key: &str, value: &str) -> Result<crate::DiskUsage, RuntimeError> {
        self.disk_measures.fetch_add(1, Ordering::SeqCst);
        if self.disk_fails.load(Ordering::SeqCst) {
            return Err(RuntimeError::Docker("system df: already running".into()));
        }
        let layers = self
            .layer_bytes
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        let containers = self
            .list(key, value)
            .await?
            .into_iter()
            .map(|c| crate::ContainerDisk {
                bytes: layers.get(&c.name).copied().unwrap_or(0),
                name: c.name,
                labels: c.labels,
            })
            .collect();
        let volumes = self
            .volumes
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(_, (l, _))| l.get(key).map(String::as_str) == Some(value))
                    .map(|(name, (labels, bytes))| crate::VolumeDisk {
                        name: name.clone(),
                        labels: labels.clone(),
                        bytes: *bytes,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sizes = self
            .image_bytes
            .lock()
            .map(|i| i.clone())
            .unwrap_or_default();
        let images = self
            .images
            .lock()
            .map(|i| {
                i.iter()
                    .map(|name| crate::ImageDisk {
                        id: format!("sha256:{name}"),
                        tags: vec![name.clone()],
                        bytes: sizes.get(name).copied().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(crate::DiskUsage {
            containers,
            volumes,
            images,
        })
    }

    async fn root_home(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        if !self.image_exists(image).await? {
            return Err(RuntimeError::ImageNotFound(image.to_owned()));
        }
        Ok(self
            .homes
            .lock()
            .ok()
            .and_then(|h| h.get(image).cloned())
            .unwrap_or_else(|| Some("/root".into())))
    }

    async fn ensure_volume(
        &self,
        spec: &crate::VolumeSpec,
    ) -> Result<HashMap<String, String>, RuntimeError> {
        self.up()?;
        let mut v = self
            .volumes
            .lock()
            .map_err(|_| RuntimeError::Docker("fake poisoned".into()))?;
        Ok(v.entry(spec.name.clone())
            .or_insert_with(|| (spec.labels.clone(), 0))
            .0
            .clone())
    }

    async fn save_image(
        &self,
        image: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, RuntimeError> {
        use tokio::io::AsyncWriteExt;
        if !self.image_exists(image).await? {
            return Err(RuntimeError::ImageNotFound(image.to_owned()));
        }
        out.write_all(image.as_bytes())
            .await
            .map_err(|e| RuntimeError::Docker(e.to_string()))?;
        Ok(u64::try_from(image.len()).unwrap_or(0))
    }

    async fn load_image(&self, mut tar: crate::ByteStream) -> Result<(), RuntimeError> {
        use futures_util::StreamExt;
        while let Some(chunk) = tar.next().await {
            chunk.map_err(|e| RuntimeError::Docker(e.to_string()))?;
        }
        Ok(())
    }

    async fn tag_image(&self, image: &str, repo: &str, tag: &str) -> Result<(), RuntimeError> {
        if !self.image_exists(image).await? {
            return Err(RuntimeError::ImageNotFound(image.to_owned()));
        }
        self.add_image(&format!("{repo}:{tag}"));
        Ok(())
    }

    async fn export_volume(
        &self,
        volume: &str,
        _image: &str,
        _out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, RuntimeError> {
        match self.volume_labels(volume).await? {
            Some(_) => Ok(0),
            None => Err(RuntimeError::Docker(format!("no such volume: {volume}"))),
        }
    }

    async fn import_volume(
        &self,
        volume: &str,
        _image: &str,
        mut tar: crate::ByteStream,
    ) -> Result<(), RuntimeError> {
        use futures_util::StreamExt;
        if self.volume_labels(volume).await?.is_none() {
            return Err(RuntimeError::Docker(format!("no such volume: {volume}")));
        }
        while let Some(chunk) = tar.next().await {
            chunk.map_err(|e| RuntimeError::Docker(e.to_string()))?;
        }
        Ok(())
    }

    async fn list_volumes(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        self.up()?;
        Ok(self
            .volumes
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(_, (l, _))| l.get(key).map(String::as_str) == Some(value))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn volume_labels(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        self.up()?;
        Ok(self
            .volumes
            .lock()
            .ok()
            .and_then(|v| v.get(name).map(|(l, _)| l.clone())))
    }

    async fn remove_volume(&self, name: &str) -> Result<bool, RuntimeError> {
        self.up()?;
        let in_use = self.applied.lock().is_ok_and(|a| {
            a.iter().any(|(c, a)| {
                a.volumes.iter().any(|v| v.name == name)
                    && self.containers.lock().is_ok_and(|cs| cs.contains_key(c))
            })
        });
        if in_use {
            return Err(RuntimeError::Docker(format!("volume {name} is in use")));
        }
        Ok(self
            .volumes
            .lock()
            .is_ok_and(|mut v| v.remove(name).is_some()))
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        Ok(self
            .image_exists(image)
            .await?
            .then(|| format!("sha256:{image}")))
    }

    async fn image_labels(
        &self,
        image: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        Ok(self.image_exists(image).await?.then(HashMap::new))
    }

    async fn list_images(&self) -> Result<Vec<crate::ImageSummary>, RuntimeError> {
        let images = self.images.lock().map(|i| i.clone()).unwrap_or_default();
        Ok(images
            .into_iter()
            .map(|name| crate::ImageSummary {
                id: format!("sha256:{name}"),
                tags: vec![name],
                size: 0,
                created: 0,
            })
            .collect())
    }

    async fn dangling_images(&self, _labels: &[(&str, &str)]) -> Result<Vec<String>, RuntimeError> {
        // Every fake image is named.
        Ok(Vec::new())
    }

    async fn import_image(
        &self,
        name: &str,
        mut rootfs: crate::ByteStream,
    ) -> Result<String, RuntimeError> {
        use futures_util::StreamExt;
        while let Some(chunk) = rootfs.next().await {
            chunk.map_err(|e| RuntimeError::Docker(e.to_string()))?;
        }
        if let Ok(mut i) = self.images.lock() {
            i.insert(name.to_owned());
        }
        Ok(format!("sha256:{name}"))
    }

    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        if let Ok(mut i) = self.images.lock() {
            i.remove(image);
        }
        Ok(())
    }

    async fn hang_up_sessions(&self, container: &str) -> Result<usize, RuntimeError> {
        // No process stands behind a fake container.
        self.by_id(container, |_| 0)
    }

    async fn open_init(&self, container: &str) -> Result<Option<ContainerInit>, RuntimeError> {
        // No process stands behind a fake container.
        self.by_id(container, |_| None)
    }

    async fn resize_session(
        &self,
        _exec: &SessionHandle,
        _size: TtySize,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn session_exit_code(&self, exec: &SessionHandle) -> Result<i64, RuntimeError> {
        let SessionHandle::Engine(exec_id) = exec else {
            return Err(RuntimeError::Docker("not an exec of this runtime".into()));
        };
        Ok(self
            .exits
            .lock()
            .ok()
            .and_then(|e| e.get(exec_id).copied())
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::Limits;

    #[tokio::test]
    async fn exec_runs_and_reports_its_exit_code() {
        let rt = FakeRuntime::with_images(&["img"]);
        let spec = ContainerSpec {
            name: "c".into(),
            image: "img".into(),
            hostname: "c".into(),
            labels: HashMap::new(),
            guest_dir: PathBuf::new(),
            limits: Limits {
                memory_bytes: None,
                nano_cpus: None,
                pids: 10,
                log_bytes: None,
                disk_bytes: None,
            },
            network: "n".into(),
            mounts: vec![],
            gpus: None,
            volumes: vec![],
        };
        let id = rt.create(&spec).await.unwrap();
        assert!(
            rt.start_session(
                &id,
                SessionSpec {
                    cmd: vec!["true".into()],
                    env: vec![],
                    tty: None
                }
            )
            .await
            .is_err()
        );
        rt.start(&id).await.unwrap();
        let cmd = vec!["sh".into(), "-c".into(), "cat; echo err >&2; exit 3".into()];
        let mut exec = rt
            .start_session(
                &id,
                SessionSpec {
                    cmd,
                    env: vec![],
                    tty: None,
                },
            )
            .await
            .unwrap();
        exec.stdin.write_all(b"in").await.unwrap();
        exec.stdin.shutdown().await.unwrap();
        drop(exec.stdin);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(chunk) = exec.output.next().await {
            match chunk.unwrap() {
                Output::Stdout(b) => out.extend_from_slice(&b),
                Output::Stderr(b) => err.extend_from_slice(&b),
            }
        }
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"in"[..], &b"err\n"[..])
        );
        assert_eq!(rt.session_exit_code(&exec.handle).await.unwrap(), 3);
    }
}
