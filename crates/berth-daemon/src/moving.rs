//! Moving a user between Berth hosts (issue 16): `berth user export NAME FILE` writes one tar
//! holding [`MANIFEST`] (her settings and keys), [`IMAGE`] (her committed image as `docker
//! save` writes it, when she has one) and [`HOME`] (her home volume's content, when she has
//! one); `berth user import FILE` recreates her from it.
//!
//! The archive is hostile input. It is spooled to a directory of its own under the state
//! directory, at most [`ARCHIVE_MAX`] bytes; only those three names are taken, each once, as
//! regular files, each copied to a file whose name Berth chooses (no name in the archive
//! ever becomes a path); the manifest is at most [`MANIFEST_MAX`] bytes and every value in it
//! is checked as `berth user add`/`set` check theirs; the saved image must hold exactly the
//! one image the manifest names (its `manifest.json`, read first); the home's tar is
//! extracted by the engine inside a helper container's root, so no entry lands outside it.
//! Everything is checked before anything is made, and what was made is taken back when a
//! later step fails: a bad archive changes nothing.

use std::io::Read;
use std::path::{Path, PathBuf};

use berth_proto::settings::{Gpus, MAX_CPUS, MAX_MEMORY, MAX_PIDS, MIN_MEMORY, MIN_PIDS};
use berth_proto::{AuthorizedKey, ImageName, UserName};
use berth_runtime::Runtime;
use berth_store::{Forwarding, UserMount, UserSettings};
use serde::{Deserialize, Serialize};

use crate::lifecycle::Lifecycle;

pub const MANIFEST: &str = "berth-user.json";
pub const IMAGE: &str = "image.tar";
pub const HOME: &str = "home.tar";
/// The manifest, at most.
const MANIFEST_MAX: u64 = 1 << 20;
/// A saved image's own `manifest.json`, at most.
const IMAGE_MANIFEST_MAX: u64 = 1 << 20;
/// An archive, at most (1 TiB).
pub const ARCHIVE_MAX: u64 = 1 << 40;
/// Keys in a manifest, at most.
const MAX_KEYS: usize = 1000;

/// What moves with a user, besides her image and home.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    /// Her base image: it must be present on the new host.
    pub image: String,
    /// The tag [`IMAGE`] holds, when she has a committed image.
    pub committed_image: Option<String>,
    pub daemon_mode: bool,
    pub tcp_forwarding: Option<bool>,
    pub agent_forwarding: Option<bool>,
    pub x11_forwarding: Option<bool>,
    pub memory_bytes: Option<u64>,
    pub nano_cpus: Option<u64>,
    pub pids: Option<u32>,
    pub gpus: Option<String>,
    /// `(source, target, read_only)`.
    pub mounts: Vec<(String, String, bool)>,
    /// `authorized_keys` lines.
    pub keys: Vec<String>,
    /// [`HOME`] is in the archive.
    pub home: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The archive or a value in it is not one Berth takes; nothing was changed.
    #[error("{0}")]
    Bad(String),
    /// Something on this host is in the way; nothing was changed.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Lifecycle(#[from] crate::lifecycle::LifecycleError),
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error(transparent)]
    Runtime(#[from] berth_runtime::RuntimeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A directory of its own for one export or import, under the state directory; removed
/// when dropped.
pub fn scratch(lc: &Lifecycle<impl Runtime>) -> std::io::Result<tempfile::TempDir> {
    let state = lc.run_dir().parent().unwrap_or(lc.run_dir());
    tempfile::Builder::new().prefix("moving-").tempdir_in(state)
}

/// Writes `user`'s archive into `dir`; returns its path.
pub async fn export<R: Runtime>(
    lc: &Lifecycle<R>,
    runtime: &R,
    store: &crate::store::AsyncStore,
    user: &UserName,
    dir: &Path,
) -> Result<PathBuf, MoveError> {
    let u = user.clone();
    let (record, settings, keys) = store
        .run(move |s| Ok((s.user(&u)?, s.settings(&u)?, s.authorized_keys(&u)?)))
        .await?;
    let image_path = dir.join(IMAGE);
    if let Some(committed) = &record.committed_image {
        let mut f = tokio::fs::File::create(&image_path).await?;
        runtime.save_image(committed.as_str(), &mut f).await?;
    }
    let home = lc.home_volume_of(user).await?;
    let home_path = dir.join(HOME);
    if let Some(volume) = &home {
        // The helper is never started: any image of hers will do.
        let helper = record.committed_image.as_ref().unwrap_or(&record.image);
        let mut f = tokio::fs::File::create(&home_path).await?;
        runtime
            .export_volume(volume, helper.as_str(), &mut f)
            .await?;
    }
    let manifest = Manifest {
        version: 1,
        name: user.to_string(),
        image: record.image.to_string(),
        committed_image: record.committed_image.as_ref().map(ToString::to_string),
        daemon_mode: record.daemon_mode,
        tcp_forwarding: record.forwarding.tcp,
        agent_forwarding: record.forwarding.agent,
        x11_forwarding: record.forwarding.x11,
        memory_bytes: settings.memory_bytes,
        nano_cpus: settings.nano_cpus,
        pids: settings.pids,
        gpus: settings.gpus.clone(),
        mounts: settings
            .mounts
            .iter()
            .map(|m| (m.source.clone(), m.target.clone(), m.read_only))
            .collect(),
        keys: keys
            .iter()
            .map(|k| format!("{} {}", k.openssh, k.comment).trim().to_owned())
            .collect(),
        home: home.is_some(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    let out = dir.join("user.tar");
    let (with_image, with_home) = (record.committed_image.is_some(), home.is_some());
    let archive = out.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut b = tar::Builder::new(std::fs::File::create(&archive)?);
        let mut header = tar::Header::new_gnu();
        header.set_size(u64::try_from(json.len()).unwrap_or(0));
        header.set_mode(0o600);
        header.set_cksum();
        b.append_data(&mut header, MANIFEST, json.as_slice())?;
        if with_image {
            b.append_path_with_name(&image_path, IMAGE)?;
            std::fs::remove_file(&image_path)?;
        }
        if with_home {
            b.append_path_with_name(&home_path, HOME)?;
            std::fs::remove_file(&home_path)?;
        }
        b.into_inner()?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(out)
}

/// The parts of an archive, taken apart in `dir` ([`unpack`]).
#[derive(Debug)]
pub struct Unpacked {
    pub manifest: Manifest,
    pub image: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

/// Takes archive `archive` apart into `dir` (blocking): only [`MANIFEST`], [`IMAGE`] and
/// [`HOME`], once each, regular files; the manifest parsed, the saved image checked to hold
/// exactly the image the manifest names.
pub fn unpack(archive: &Path, dir: &Path) -> Result<Unpacked, MoveError> {
    let bad = |s: String| MoveError::Bad(format!("not a berth user archive: {s}"));
    let mut a = tar::Archive::new(std::fs::File::open(archive)?);
    let (mut manifest, mut image, mut home) = (None, None, None);
    for entry in a.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| bad(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if !entry.header().entry_type().is_file() {
            return Err(bad(format!("{name:?} is not a regular file")));
        }
        let slot = match name.as_str() {
            MANIFEST => None,
            IMAGE => Some((&mut image, IMAGE)),
            HOME => Some((&mut home, HOME)),
            _ => return Err(bad(format!("unexpected entry {name:?}"))),
        };
        match slot {
            None => {
                if manifest.is_some() {
                    return Err(bad(format!("{MANIFEST} twice")));
                }
                let mut text = String::new();
                entry
                    .by_ref()
                    .take(MANIFEST_MAX + 1)
                    .read_to_string(&mut text)
                    .map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
                if u64::try_from(text.len()).unwrap_or(u64::MAX) > MANIFEST_MAX {
                    return Err(bad(format!("{MANIFEST} is over {MANIFEST_MAX} bytes")));
                }
                let m: Manifest =
                    serde_json::from_str(&text).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
                manifest = Some(m);
            }
            Some((slot, file)) => {
                if slot.is_some() {
                    return Err(bad(format!("{file} twice")));
                }
                let path = dir.join(file);
                let mut out = std::fs::File::create(&path)?;
                std::io::copy(&mut entry, &mut out)?;
                *slot = Some(path);
            }
        }
    }
    let manifest = manifest.ok_or_else(|| bad(format!("no {MANIFEST}")))?;
    if manifest.version != 1 {
        return Err(bad(format!(
            "version {} (this berth reads version 1)",
            manifest.version
        )));
    }
    match (&manifest.committed_image, &image) {
        (Some(tag), Some(path)) => check_saved_image(path, tag)?,
        (None, None) => {}
        _ => return Err(bad(format!("{IMAGE} and the committed image disagree"))),
    }
    if manifest.home != home.is_some() {
        return Err(bad(format!("{HOME} and the manifest disagree")));
    }
    Ok(Unpacked {
        manifest,
        image,
        home,
    })
}

/// A `docker save` tar must hold exactly one image, tagged `tag` and nothing else: loading
/// it can then only add that tag.
fn check_saved_image(path: &Path, tag: &str) -> Result<(), MoveError> {
    let bad = |s: String| MoveError::Bad(format!("{IMAGE}: {s}"));
    let mut a = tar::Archive::new(std::fs::File::open(path)?);
    let mut found = None;
    for entry in a.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let name = entry.path().map_err(|e| bad(e.to_string()))?;
        // The engine loads by `manifest.json` when there is one (its legacy `repositories`
        // file is then not read), so that is the one to check.
        if name != Path::new("manifest.json") {
            continue;
        }
        let mut text = String::new();
        entry
            .by_ref()
            .take(IMAGE_MANIFEST_MAX)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?;
        if found.is_some() {
            return Err(bad("manifest.json twice".into()));
        }
        found = Some(text);
    }
    let text = found.ok_or_else(|| bad("no manifest.json".into()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let tags: Vec<&str> = match v.as_array().map(Vec::as_slice) {
        Some([one]) => one
            .get("RepoTags")
            .and_then(serde_json::Value::as_array)
            .map(|t| t.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default(),
        _ => return Err(bad("it must hold exactly one image".into())),
    };
    if tags != [tag] {
        return Err(bad(format!("it is tagged {tags:?}, not [{tag:?}]")));
    }
    Ok(())
}

/// The manifest's values, each checked as `berth user add` and `set` check theirs.
pub struct Checked {
    pub name: UserName,
    pub image: ImageName,
    pub keys: Vec<AuthorizedKey>,
    pub settings: UserSettings,
    pub forwarding: Forwarding,
    pub daemon_mode: bool,
}

/// Checks every value of `m` (blocking: shared folders' sources are resolved).
pub fn check(m: &Manifest, sources: &crate::mounts::SourceRules) -> Result<Checked, MoveError> {
    let bad = |s: String| MoveError::Bad(format!("{MANIFEST}: {s}"));
    let name = UserName::parse(&m.name).map_err(|e| bad(e.to_string()))?;
    let image = ImageName::parse(&m.image).map_err(|e| bad(e.to_string()))?;
    if m.keys.is_empty() || m.keys.len() > MAX_KEYS {
        return Err(bad(format!("{} keys", m.keys.len())));
    }
    let keys = m
        .keys
        .iter()
        .map(|line| {
            let mut k = AuthorizedKey::parse_line(line).map_err(|e| bad(format!("key: {e}")))?;
            k.comment = line
                .split_whitespace()
                .skip(2)
                .collect::<Vec<_>>()
                .join(" ");
            Ok(k)
        })
        .collect::<Result<Vec<_>, MoveError>>()?;
    if let Some(b) = m.memory_bytes
        && b != 0
        && !(MIN_MEMORY..=MAX_MEMORY).contains(&b)
    {
        return Err(bad(format!("memory {b} is out of range")));
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a bound"
    )]
    let max_nano = (MAX_CPUS * 1e9) as u64;
    if m.nano_cpus.is_some_and(|n| n > max_nano) {
        return Err(bad("cpus out of range".into()));
    }
    if m.pids.is_some_and(|p| !(MIN_PIDS..=MAX_PIDS).contains(&p)) {
        return Err(bad("pids out of range".into()));
    }
    if let Some(g) = &m.gpus {
        Gpus::parse(g).map_err(bad)?;
    }
    if m.mounts.len() > crate::mounts::MAX_USER_MOUNTS {
        return Err(bad(format!("{} shared folders", m.mounts.len())));
    }
    let mut mounts = Vec::new();
    for (source, target, read_only) in &m.mounts {
        let target = crate::mounts::check_target(target).map_err(bad)?;
        let source = sources
            .check(Path::new(source))
            .map_err(|e| MoveError::Conflict(format!("shared folder {target}: {e}")))?;
        mounts.push(UserMount {
            source: source.display().to_string(),
            target,
            read_only: *read_only,
        });
    }
    Ok(Checked {
        name,
        image,
        keys,
        settings: UserSettings {
            memory_bytes: m.memory_bytes,
            nano_cpus: m.nano_cpus,
            pids: m.pids,
            gpus: m.gpus.clone(),
            mounts,
        },
        forwarding: Forwarding {
            tcp: m.tcp_forwarding,
            agent: m.agent_forwarding,
            x11: m.x11_forwarding,
        },
        daemon_mode: m.daemon_mode,
    })
}

/// A file as the engine reads it.
fn stream_of(file: tokio::fs::File) -> berth_runtime::ByteStream {
    Box::pin(tokio_util::io::ReaderStream::new(file))
}

/// Recreates the user of `u` on this host; what was made is taken back when a step fails.
pub async fn import<R: Runtime>(
    lc: &Lifecycle<R>,
    runtime: &R,
    store: &crate::store::AsyncStore,
    u: Unpacked,
    c: Checked,
) -> Result<UserName, MoveError> {
    let name = c.name.clone();
    if store.exists(&name).await {
        return Err(MoveError::Conflict(format!("user {name} already exists")));
    }
    if lc.is_commit_image(&c.image) || !runtime.image_exists(c.image.as_str()).await? {
        return Err(MoveError::Conflict(format!(
            "her image {} is not present on this host; import it first (berth image import)",
            c.image
        )));
    }
    let local = lc.commit_image_name(&name);
    if u.image.is_some() && runtime.image_exists(&local).await? {
        return Err(MoveError::Conflict(format!(
            "image {local} exists already; remove it first (berth image rm {local})"
        )));
    }
    let volume = lc.home_volume(&name);
    if u.home.is_some() && runtime.volume_labels(&volume).await?.is_some() {
        return Err(MoveError::Conflict(format!(
            "volume {volume} exists already (a removed user's home?); remove it first \
             (docker volume rm {volume})"
        )));
    }
    let mut undo = Undo::default();
    let r = async {
        let mut committed = None;
        if let (Some(path), Some(tag)) = (&u.image, &u.manifest.committed_image) {
            let foreign_existed = runtime.image_exists(tag).await?;
            runtime
                .load_image(stream_of(tokio::fs::File::open(path).await?))
                .await?;
            let (repo, t) = local.rsplit_once(':').unwrap_or((&local, "latest"));
            runtime.tag_image(tag, repo, t).await?;
            undo.images.push(local.clone());
            if !foreign_existed && *tag != local {
                runtime.remove_image(tag).await?;
            }
            committed = Some(ImageName::parse(&local).map_err(|e| MoveError::Bad(e.to_string()))?);
        }
        if let Some(path) = &u.home {
            runtime.ensure_volume(&lc.home_volume_spec(&name)).await?;
            undo.volume = Some(volume.clone());
            runtime
                .import_volume(
                    &volume,
                    c.image.as_str(),
                    stream_of(tokio::fs::File::open(path).await?),
                )
                .await?;
        }
        let c2 = (
            c.name.clone(),
            c.image.clone(),
            c.keys.clone(),
            c.settings.clone(),
            c.forwarding,
            c.daemon_mode,
        );
        store
            .run(move |s| {
                let (name, image, keys, settings, forwarding, daemon_mode) = c2;
                s.add_user(&name, &image, &keys)?;
                let r = (|| {
                    s.set_settings(&name, &settings)?;
                    s.set_forwarding(&name, forwarding)?;
                    s.set_daemon_mode(&name, daemon_mode)?;
                    s.set_committed_image(&name, committed.as_ref())
                })();
                if r.is_err() {
                    let _ = s.remove_user(&name);
                }
                r
            })
            .await?;
        Ok::<(), MoveError>(())
    }
    .await;
    if let Err(e) = r {
        undo.run(runtime).await;
        return Err(e);
    }
    Ok(name)
}

/// What an import made, to take back.
#[derive(Default)]
struct Undo {
    images: Vec<String>,
    volume: Option<String>,
}

impl Undo {
    async fn run<R: Runtime>(self, runtime: &R) {
        if let Some(v) = &self.volume
            && let Err(e) = runtime.remove_volume(v).await
        {
            tracing::warn!(volume = %v, error = %e, "a failed import left a volume behind");
        }
        for i in &self.images {
            if let Err(e) = runtime.remove_image(i).await {
                tracing::warn!(image = %i, error = %e, "a failed import left an image behind");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, entries: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("a.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap();
        path
    }

    fn manifest() -> Manifest {
        Manifest {
            version: 1,
            name: "alice".into(),
            image: "busybox".into(),
            committed_image: None,
            daemon_mode: false,
            tcp_forwarding: None,
            agent_forwarding: None,
            x11_forwarding: None,
            memory_bytes: None,
            nano_cpus: None,
            pids: None,
            gpus: None,
            mounts: vec![],
            keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b".into()],
            home: false,
        }
    }

    #[test]
    fn a_bad_archive_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let json = serde_json::to_vec(&manifest()).unwrap();
        let ok = archive(dir.path(), &[(MANIFEST, &json)]);
        let u = unpack(&ok, dir.path()).unwrap();
        assert_eq!(u.manifest, manifest());
        let refused = |entries: &[(&str, &[u8])], want: &str| {
            let d = tempfile::tempdir().unwrap();
            let a = archive(d.path(), entries);
            let e = unpack(&a, d.path()).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        refused(
            &[(MANIFEST, &json), ("etc/passwd", b"x")],
            "unexpected entry",
        );
        refused(&[(MANIFEST, &json), (MANIFEST, &json)], "twice");
        refused(&[(HOME, b"x")], "no berth-user.json");
        refused(&[(MANIFEST, b"{\"version\": 1}")], "berth-user.json");
        refused(&[(MANIFEST, &json), (HOME, b"")], "disagree");
        let mut m = manifest();
        m.committed_image = Some("b/users:alice".into());
        let json2 = serde_json::to_vec(&m).unwrap();
        refused(&[(MANIFEST, &json2)], "disagree");
        let big = vec![b' '; (MANIFEST_MAX + 10) as usize];
        refused(&[(MANIFEST, &big)], "over");
        // A saved image that would tag something else.
        let inner_dir = tempfile::tempdir().unwrap();
        let inner = archive(
            inner_dir.path(),
            &[("manifest.json", b"[{\"RepoTags\": [\"debian:12\"]}]")],
        );
        let inner = std::fs::read(inner).unwrap();
        refused(&[(MANIFEST, &json2), (IMAGE, &inner)], "not [");
    }

    #[test]
    fn manifest_values_are_checked() {
        let rules = crate::mounts::SourceRules::new(
            Path::new("/var/lib/berth"),
            Path::new("/var/run/docker.sock"),
            Path::new("/var/lib/docker"),
        );
        assert!(check(&manifest(), &rules).is_ok());
        let mut m = manifest();
        m.name = "../x".into();
        assert!(check(&m, &rules).is_err());
        let mut m = manifest();
        m.keys = vec![];
        assert!(check(&m, &rules).is_err());
        let mut m = manifest();
        m.pids = Some(1);
        assert!(check(&m, &rules).is_err());
        let mut m = manifest();
        m.mounts = vec![("/etc".into(), "/x".into(), false)];
        assert!(check(&m, &rules).is_err());
        let mut m = manifest();
        m.gpus = Some("$(x)".into());
        assert!(check(&m, &rules).is_err());
    }
}
