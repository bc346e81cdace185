//! Moving a user between Berth hosts (issue 16): `berth user export NAME FILE` writes one tar
//! holding [`MANIFEST`] (her settings and keys), [`IMAGE`] (her committed image as `docker
//! save` writes it, when she has one) and [`HOME`] (her home volume's content, when she has
//! one); `berth user import FILE` recreates her from it.
//!
//! The archive is hostile input. It is spooled to a directory of its own under the state
//! directory, at most [`ARCHIVE_MAX`] bytes; only those three names are taken, each once, as
//! regular files, each copied to a file whose name Berth chooses (no name in the archive
//! ever becomes a path); the manifest is at most [`MANIFEST_MAX`] bytes and every value in it
//! is checked as `berth user add`/`set` check theirs, and what is the new host's admin's to
//! give (shared folders, GPUs, more than the server's limits, forwarding) is left out; the
//! saved image is rewritten to load untagged ([`untagged_image`]) and tagged by its ID as
//! hers only; the home's tar holds no device node or FIFO, and is extracted by the engine
//! inside a helper container's root, so no entry lands outside it.
//! Everything is checked before anything is made, and what was made is taken back when a
//! later step fails: a bad archive changes nothing.

use std::io::Read;
use std::path::{Path, PathBuf};

use berth_proto::settings::{Gpus, MAX_CPUS, MAX_MEMORY, MAX_PIDS, MIN_MEMORY, MIN_PIDS};
use berth_proto::{AuthorizedKey, ImageName, UserName};
use berth_runtime::Runtime;
use berth_store::{Forwarding, UserSettings};
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
    // Room for the parts and the archive made of them (each part is removed once in it):
    // about twice her image and her home, as last measured.
    let measured = lc
        .disk()
        .last()
        .get(user.as_str())
        .copied()
        .unwrap_or_default();
    let image_bytes = match &record.committed_image {
        Some(c) => {
            let id = runtime.image_id(c.as_str()).await?;
            runtime
                .list_images()
                .await?
                .into_iter()
                .find(|i| Some(&i.id) == id.as_ref())
                .map_or(0, |i| i.size)
        }
        None => 0,
    };
    check_room(
        dir,
        image_bytes.saturating_add(measured.home).saturating_mul(2),
    )?;
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

/// Refuses when the file system of `dir` has less than `need` bytes free for Berth.
fn check_room(dir: &Path, need: u64) -> Result<(), MoveError> {
    let st = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < need {
        return Err(MoveError::Conflict(format!(
            "not enough room to make the archive in {}: it needs about {}, {} are free; free \
             space on that file system first",
            dir.display(),
            crate::disk::human_bytes(need),
            crate::disk::human_bytes(free)
        )));
    }
    Ok(())
}

/// The parts of an archive, taken apart in `dir` ([`unpack`]).
#[derive(Debug)]
pub struct Unpacked {
    pub manifest: Manifest,
    /// The saved image, rewritten to load untagged ([`untagged_image`]), and its ID.
    pub image: Option<(PathBuf, String)>,
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
                std::io::copy(&mut entry, &mut out).map_err(|e| cut(e, file))?;
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
    let image = match (&manifest.committed_image, image) {
        (Some(tag), Some(path)) => {
            // Her commit on the old host is `REPOSITORY:NAME`, hers alone.
            let own = ImageName::parse(tag).ok().is_some_and(|i| {
                let full = i.full();
                !full.contains('@')
                    && full.rsplit_once(':').is_some_and(|(r, t)| {
                        t == manifest.name && !r.is_empty() && !t.contains('/')
                    })
            });
            if !own {
                return Err(bad(format!(
                    "the committed image {tag:?} is not {}'s own commit",
                    manifest.name
                )));
            }
            let clean = dir.join("image-untagged.tar");
            let id = untagged_image(&path, &clean)?;
            std::fs::remove_file(&path)?;
            Some((clean, id))
        }
        (None, None) => None,
        _ => return Err(bad(format!("{IMAGE} and the committed image disagree"))),
    };
    if manifest.home != home.is_some() {
        return Err(bad(format!("{HOME} and the manifest disagree")));
    }
    if let Some(h) = &home {
        check_home(h)?;
    }
    Ok(Unpacked {
        manifest,
        image,
        home,
    })
}

/// An archive that ends early (or is not a tar) is a bad archive; other I/O errors are
/// this host's.
fn cut(e: std::io::Error, what: &str) -> MoveError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::InvalidData | ErrorKind::Other => {
            MoveError::Bad(format!("not a berth user archive: {what}: {e}"))
        }
        _ => MoveError::Io(e),
    }
}

/// The home's tar holds files, directories and links only: no device nodes or FIFOs
/// (read from the headers, before the engine unpacks anything).
fn check_home(path: &Path) -> Result<(), MoveError> {
    let bad = |s: String| MoveError::Bad(format!("not a berth user archive: {HOME}: {s}"));
    let mut a = tar::Archive::new(std::fs::File::open(path)?);
    for entry in a.entries().map_err(|e| bad(e.to_string()))? {
        let entry = entry.map_err(|e| bad(e.to_string()))?;
        let t = entry.header().entry_type();
        if t.is_character_special() || t.is_block_special() || t.is_fifo() {
            let name = entry
                .path()
                .map(|p| shown(&p.to_string_lossy()))
                .unwrap_or_default();
            return Err(bad(format!("{name:?} is a device node or FIFO")));
        }
    }
    Ok(())
}

/// `path` with `.` components dropped, or `None` when it is empty, absolute or climbs
/// (`..`): the name the engine would take it as.
fn normalise(path: &Path) -> Option<String> {
    use std::path::Component;
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_str()?.to_owned()),
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Link target `target` of an entry in directory `dir`, resolved (`..` climbs within the
/// tar only), or `None` when it leaves the tar.
fn resolve(dir: &Path, target: &Path) -> Option<String> {
    use std::path::Component;
    let mut parts: Vec<String> = Vec::new();
    for c in dir.components().chain(target.components()) {
        match c {
            Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_str()?.to_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a name in a `docker save` tar may be: its own files, and the blobs of the legacy
/// (`HEX/layer.tar`, `HEX.json`) and the OCI layout (`blobs/sha256/HEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SavedName {
    Dir,
    File,
    /// Dropped: the tags of the legacy format.
    Repositories,
    Manifest,
    Index,
}

fn saved_name(name: &str) -> Option<SavedName> {
    let parts: Vec<&str> = name.split('/').collect();
    Some(match parts.as_slice() {
        ["manifest.json"] => SavedName::Manifest,
        ["index.json"] => SavedName::Index,
        ["repositories"] => SavedName::Repositories,
        ["oci-layout"] => SavedName::File,
        [f] if f.strip_suffix(".json").is_some_and(is_hex64) => SavedName::File,
        [d] if is_hex64(d) => SavedName::Dir,
        [d, "VERSION" | "json" | "layer.tar"] if is_hex64(d) => SavedName::File,
        ["blobs"] | ["blobs", "sha256"] => SavedName::Dir,
        ["blobs", "sha256", b] if is_hex64(b) => SavedName::File,
        _ => return None,
    })
}

/// Reads a small JSON file of the saved image.
fn small_json(entry: &mut impl Read, name: &str) -> Result<serde_json::Value, MoveError> {
    let bad = |s: String| MoveError::Bad(format!("{IMAGE}: {name}: {s}"));
    let mut text = String::new();
    entry
        .take(IMAGE_MANIFEST_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if u64::try_from(text.len()).unwrap_or(u64::MAX) > IMAGE_MANIFEST_MAX {
        return Err(bad(format!("over {IMAGE_MANIFEST_MAX} bytes")));
    }
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

/// The saved image `saved`, written again to `out` so that loading it tags nothing:
/// every name normalised and known, each once; `repositories` left out; `manifest.json`
/// holding exactly one image, rewritten with its config and layers only (no `RepoTags`);
/// the name annotations of `index.json` dropped. Returns the image's ID (its config's
/// digest), by which Berth tags it itself.
pub fn untagged_image(saved: &Path, out: &Path) -> Result<String, MoveError> {
    let bad = |s: String| MoveError::Bad(format!("{IMAGE}: {s}"));
    let mut a = tar::Archive::new(std::fs::File::open(saved)?);
    let mut b = tar::Builder::new(std::fs::File::create(out)?);
    let mut seen = std::collections::HashSet::new();
    let mut files = std::collections::HashSet::new();
    let mut config = None;
    let mut layers = Vec::new();
    for entry in a.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let raw = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let name = normalise(&raw).ok_or_else(|| bad(format!("entry {raw:?}")))?;
        let kind = saved_name(&name).ok_or_else(|| bad(format!("unexpected entry {raw:?}")))?;
        if !seen.insert(name.clone()) {
            return Err(bad(format!("{name:?} twice")));
        }
        let t = entry.header().entry_type();
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        match kind {
            SavedName::Dir => {
                if !t.is_dir() {
                    return Err(bad(format!("{name:?} is not a directory")));
                }
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, format!("{name}/"), std::io::empty())?;
            }
            _ if t.is_symlink() && name.ends_with("/layer.tar") => {
                // The legacy format links a layer saved once already.
                let target = entry
                    .link_name()
                    .map_err(|e| bad(e.to_string()))?
                    .ok_or_else(|| bad(format!("{name:?}: a link to nothing")))?;
                let dir = Path::new(&name).parent().unwrap_or(Path::new(""));
                let to = resolve(dir, &target)
                    .filter(|t| t.ends_with("/layer.tar") && saved_name(t).is_some())
                    .ok_or_else(|| bad(format!("{name:?} links to {target:?}")))?;
                let rel = format!("../{to}");
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, &name, &rel)?;
                files.insert(name);
            }
            _ if !t.is_file() => return Err(bad(format!("{name:?} is not a regular file"))),
            SavedName::Repositories => {}
            SavedName::Manifest => {
                let v = small_json(&mut entry, &name)?;
                let one = match v.as_array().map(Vec::as_slice) {
                    Some([one]) => one,
                    _ => return Err(bad("it must hold exactly one image".into())),
                };
                let c = one
                    .get("Config")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|c| normalise(Path::new(c)))
                    .ok_or_else(|| bad("manifest.json: no Config".into()))?;
                let l: Vec<String> = one
                    .get("Layers")
                    .and_then(serde_json::Value::as_array)
                    .ok_or_else(|| bad("manifest.json: no Layers".into()))?
                    .iter()
                    .map(|l| l.as_str().and_then(|l| normalise(Path::new(l))))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("manifest.json: a bad layer".into()))?;
                let clean = serde_json::json!([{"Config": c, "RepoTags": [], "Layers": l}]);
                config = Some(c);
                layers = l;
                let data = serde_json::to_vec(&clean).map_err(std::io::Error::other)?;
                h.set_size(u64::try_from(data.len()).unwrap_or(0));
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, &name, data.as_slice())?;
            }
            SavedName::Index => {
                let mut v = small_json(&mut entry, &name)?;
                for m in v
                    .get_mut("manifests")
                    .and_then(serde_json::Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(a) = m
                        .get_mut("annotations")
                        .and_then(serde_json::Value::as_object_mut)
                    {
                        a.remove("io.containerd.image.name");
                        a.remove("org.opencontainers.image.ref.name");
                    }
                }
                let data = serde_json::to_vec(&v).map_err(std::io::Error::other)?;
                h.set_size(u64::try_from(data.len()).unwrap_or(0));
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, &name, data.as_slice())?;
            }
            SavedName::File => {
                h.set_size(entry.header().size().map_err(|e| bad(e.to_string()))?);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, &name, &mut entry)
                    .map_err(|e| cut(e, IMAGE))?;
                files.insert(name);
            }
        }
    }
    b.into_inner()?.sync_all()?;
    let config = config.ok_or_else(|| bad("no manifest.json".into()))?;
    for f in std::iter::once(&config).chain(&layers) {
        if !files.contains(f) {
            return Err(bad(format!(
                "manifest.json names {f:?}, which it does not hold"
            )));
        }
    }
    let id = config
        .strip_prefix("blobs/sha256/")
        .or_else(|| config.strip_suffix(".json"))
        .filter(|h| is_hex64(h))
        .ok_or_else(|| bad(format!("config {config:?}")))?;
    Ok(format!("sha256:{id}"))
}

/// The manifest's values, each checked as `berth user add` and `set` check theirs.
pub struct Checked {
    pub name: UserName,
    pub image: ImageName,
    pub keys: Vec<AuthorizedKey>,
    pub settings: UserSettings,
    pub forwarding: Forwarding,
    pub daemon_mode: bool,
    /// What the archive held and this host does not take from it, one line each.
    pub left_out: Vec<String>,
}

/// What `berth user import` answers: the user as made, and what was not carried over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Imported {
    #[serde(flatten)]
    pub user: berth_proto::UserInfo,
    #[serde(default)]
    pub not_carried_over: Vec<String>,
}

/// A hostile string, printable on one line.
fn shown(s: &str) -> String {
    s.escape_debug().to_string()
}

/// Checks every value of `m`. What the archive cannot choose on this host is left out and
/// said in [`Checked::left_out`]: her shared folders and GPUs (host paths and devices are
/// the admin's to give here), limits above `server`'s (the server's apply), and
/// forwarding she was allowed beyond the server's default (only refusals are kept).
pub fn check(m: &Manifest, server: &crate::user_settings::Server) -> Result<Checked, MoveError> {
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
            // As `user add` keeps it: no control characters, a line's worth.
            k.comment = crate::admin::printable(
                &line
                    .split_whitespace()
                    .skip(2)
                    .collect::<Vec<_>>()
                    .join(" "),
                crate::admin::MAX_KEY_COMMENT,
            );
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
    let mut left_out = Vec::new();
    if !m.mounts.is_empty() {
        let list: Vec<String> = m
            .mounts
            .iter()
            .map(|(source, target, ro)| {
                format!(
                    "{}:{}{}",
                    shown(source),
                    shown(target),
                    if *ro { ":ro" } else { "" }
                )
            })
            .collect();
        left_out.push(format!(
            "mounts {} (set them again with berth user set)",
            list.join(", ")
        ));
    }
    if let Some(g) = &m.gpus {
        left_out.push(format!(
            "gpus {} (set them again with berth user set)",
            shown(g)
        ));
    }
    // A limit of hers above the server's (0 is none) is not taken: the server's applies.
    let above = |hers: u64, server: Option<i64>| match server.and_then(|s| u64::try_from(s).ok()) {
        Some(s) if s > 0 => hers == 0 || hers > s,
        _ => false,
    };
    let mut memory_bytes = m.memory_bytes;
    if let Some(b) = memory_bytes
        && above(b, server.limits.memory_bytes)
    {
        left_out.push(format!(
            "memory {} (above this server's limit, which applies)",
            if b == 0 {
                "unlimited".to_owned()
            } else {
                format!("{b} bytes")
            }
        ));
        memory_bytes = None;
    }
    let mut nano_cpus = m.nano_cpus;
    if let Some(n) = nano_cpus
        && above(n, server.limits.nano_cpus)
    {
        left_out.push(format!(
            "cpus {} (above this server's limit, which applies)",
            if n == 0 {
                "unlimited".to_owned()
            } else {
                format!("{}", n as f64 / 1e9)
            }
        ));
        nano_cpus = None;
    }
    let mut pids = m.pids;
    if let Some(p) = pids
        && above(u64::from(p), Some(server.limits.pids))
    {
        left_out.push(format!(
            "pids {p} (above this server's limit, which applies)"
        ));
        pids = None;
    }
    // Forwarding: her refusals are kept; what she was allowed apart is the admin's to give.
    let allowed: Vec<&str> = [
        ("tcp", m.tcp_forwarding),
        ("agent", m.agent_forwarding),
        ("x11", m.x11_forwarding),
    ]
    .iter()
    .filter(|(_, v)| *v == Some(true))
    .map(|(k, _)| *k)
    .collect();
    if !allowed.is_empty() {
        left_out.push(format!(
            "{} forwarding allowed for her alone (the server's default applies; set it again \
             with berth user set)",
            allowed.join(", ")
        ));
    }
    let refusal = |v: Option<bool>| v.filter(|v| !v);
    Ok(Checked {
        name,
        image,
        keys,
        settings: UserSettings {
            memory_bytes,
            nano_cpus,
            pids,
            gpus: None,
            mounts: Vec::new(),
        },
        forwarding: Forwarding {
            tcp: refusal(m.tcp_forwarding),
            agent: refusal(m.agent_forwarding),
            x11: refusal(m.x11_forwarding),
        },
        daemon_mode: m.daemon_mode,
        left_out,
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
    // A home kept from an earlier user of that name is never handed to an archive, with
    // or without a home of its own: her container would mount it.
    let volume = lc.home_volume(&name);
    if let Some(labels) = runtime.volume_labels(&volume).await? {
        let whose = labels
            .get(crate::lifecycle::LABEL_USER)
            .map(|u| format!(", kept from an earlier user {}", shown(u)))
            .unwrap_or_default();
        return Err(MoveError::Conflict(format!(
            "volume {volume} exists already{whose}; remove it (docker volume rm {volume}) and \
             import again, or give it to a new {name} with berth user add"
        )));
    }
    let mut undo = Undo::default();
    let r = async {
        let mut committed = None;
        if let Some((path, id)) = &u.image {
            // The tar loads untagged; Berth tags it by its ID, as hers only.
            let existed = runtime.image_exists(id).await?;
            if !existed {
                undo.images.push(id.clone());
            }
            runtime
                .load_image(stream_of(tokio::fs::File::open(path).await?))
                .await?;
            if runtime.image_id(&local).await?.is_some() {
                return Err(MoveError::Conflict(format!("image {local} exists already")));
            }
            undo.images.insert(0, local.clone());
            let (repo, t) = local.rsplit_once(':').unwrap_or((&local, "latest"));
            runtime.tag_image(id, repo, t).await?;
            if runtime.image_id(&local).await?.as_deref() != Some(id.as_str()) {
                return Err(MoveError::Bad(format!("{IMAGE}: it did not load as {id}")));
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
        // A committed image that is not hers.
        let inner_dir = tempfile::tempdir().unwrap();
        let saved = saved_image(inner_dir.path(), &[]);
        let mut m = manifest();
        m.committed_image = Some("debian:12".into());
        let json3 = serde_json::to_vec(&m).unwrap();
        refused(
            &[(MANIFEST, &json3), (IMAGE, &saved)],
            "not alice's own commit",
        );
        m.committed_image = Some("berth/users:bob".into());
        let json3 = serde_json::to_vec(&m).unwrap();
        refused(
            &[(MANIFEST, &json3), (IMAGE, &saved)],
            "not alice's own commit",
        );
        // A second manifest under another spelling, names that climb, unknown names.
        for (extra, want) in [
            ("./manifest.json", "twice"),
            ("x/../manifest.json", "entry"),
            ("/etc/passwd", "entry"),
            ("etc/passwd", "unexpected entry"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let saved = saved_image(d.path(), &[(extra, b"[{}]")]);
            refused(&[(MANIFEST, &json2), (IMAGE, &saved)], want);
        }
        // A good one is taken.
        let d = tempfile::tempdir().unwrap();
        let a = archive(d.path(), &[(MANIFEST, &json2), (IMAGE, &saved)]);
        let u = unpack(&a, d.path()).unwrap();
        assert_eq!(u.image.unwrap().1, format!("sha256:{}", HEX));
    }

    #[test]
    fn a_truncated_archive_or_a_home_with_devices_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut m = manifest();
        m.home = true;
        let json = serde_json::to_vec(&m).unwrap();
        let home = vec![7_u8; 10_000];
        let a = archive(d.path(), &[(MANIFEST, &json), (HOME, &home)]);
        let full = std::fs::read(&a).unwrap();
        std::fs::write(&a, &full[..full.len() / 2]).unwrap();
        let e = unpack(&a, d.path()).unwrap_err();
        assert!(matches!(e, MoveError::Bad(_)), "{e:?}");
        assert!(e.to_string().starts_with("not a berth user archive"), "{e}");
        // A home holding a device node, a FIFO.
        for t in [
            tar::EntryType::Char,
            tar::EntryType::Block,
            tar::EntryType::Fifo,
        ] {
            let d = tempfile::tempdir().unwrap();
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(t);
            h.set_size(0);
            h.set_mode(0o666);
            h.set_cksum();
            b.append_data(&mut h, "dev/x", std::io::empty()).unwrap();
            let home = b.into_inner().unwrap();
            let a = archive(d.path(), &[(MANIFEST, &json), (HOME, &home)]);
            let e = unpack(&a, d.path()).unwrap_err().to_string();
            assert!(e.contains("device node or FIFO"), "{e}");
        }
    }

    #[test]
    fn an_export_without_room_is_refused_before_it_starts() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_room(d.path(), 1).is_ok());
        let e = check_room(d.path(), u64::MAX).unwrap_err().to_string();
        assert!(
            e.starts_with("not enough room to make the archive in "),
            "{e}"
        );
    }

    const HEX: &str = "9a2f90d21f0e414452d7db9b0498bab0f2f5e281469ae2288d5096b78a33cb50";
    const LAYER: &str = "05177fda5c91a1cf46f30cba2f0b94433ab986b15690350b24d3c02b8866a72d";

    /// A legacy `docker save` tar tagged `debian:12`, with `extra` entries last.
    fn saved_image(dir: &Path, extra: &[(&str, &[u8])]) -> Vec<u8> {
        let manifest = format!(
            "[{{\"Config\":\"{HEX}.json\",\"RepoTags\":[\"debian:12\"],\
             \"Layers\":[\"{LAYER}/layer.tar\"],\"Parent\":\"sha256:{LAYER}\"}}]"
        );
        let repositories = format!("{{\"debian\":{{\"12\":\"{LAYER}\"}}}}");
        let (config, layer) = (format!("{HEX}.json"), format!("{LAYER}/layer.tar"));
        let mut entries: Vec<(&str, &[u8])> = vec![
            (&config, b"{}"),
            (&layer, b"layer"),
            ("manifest.json", manifest.as_bytes()),
            ("repositories", repositories.as_bytes()),
        ];
        entries.extend_from_slice(extra);
        let path = dir.join("raw.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            // Set by hand: the builder refuses names that climb.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap();
        std::fs::read(path).unwrap()
    }

    #[test]
    fn a_saved_image_loads_untagged() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("in.tar");
        std::fs::write(&raw, saved_image(d.path(), &[])).unwrap();
        let out = d.path().join("out.tar");
        assert_eq!(untagged_image(&raw, &out).unwrap(), format!("sha256:{HEX}"));
        let mut a = tar::Archive::new(std::fs::File::open(&out).unwrap());
        let mut names = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "manifest.json" {
                let mut t = String::new();
                e.read_to_string(&mut t).unwrap();
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v[0]["RepoTags"], serde_json::json!([]), "{t}");
                assert!(v[0].get("Parent").is_none(), "{t}");
            }
            names.push(name);
        }
        assert!(!names.contains(&"repositories".to_owned()), "{names:?}");
        assert!(names.contains(&"manifest.json".to_owned()), "{names:?}");
        // A manifest naming a layer it does not hold.
        let d2 = tempfile::tempdir().unwrap();
        let bad = d2.path().join("in.tar");
        let m = format!(
            "[{{\"Config\":\"{HEX}.json\",\"RepoTags\":[],\"Layers\":[\"{HEX}/layer.tar\"]}}]"
        );
        let mut b = tar::Builder::new(std::fs::File::create(&bad).unwrap());
        for (name, data) in [
            (format!("{HEX}.json"), &b"{}"[..]),
            ("manifest.json".into(), m.as_bytes()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.into_inner().unwrap();
        let e = untagged_image(&bad, &d2.path().join("o.tar"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not hold"), "{e}");
    }

    fn server() -> crate::user_settings::Server {
        crate::user_settings::Server {
            limits: berth_runtime::Limits {
                memory_bytes: Some(1 << 30),
                nano_cpus: Some(2_000_000_000),
                pids: 500,
                log_bytes: None,
                disk_bytes: None,
            },
            gpus: Gpus::None,
            mounts: Vec::new(),
        }
    }

    #[test]
    fn manifest_values_are_checked() {
        let s = server();
        let c = check(&manifest(), &s).unwrap();
        assert!(c.left_out.is_empty());
        let mut m = manifest();
        m.name = "../x".into();
        assert!(check(&m, &s).is_err());
        let mut m = manifest();
        m.keys = vec![];
        assert!(check(&m, &s).is_err());
        let mut m = manifest();
        m.pids = Some(1);
        assert!(check(&m, &s).is_err());
        let mut m = manifest();
        m.gpus = Some("$(x)".into());
        assert!(check(&m, &s).is_err());
        // A key's comment is kept as `user add` keeps it: no escape sequences, bounded.
        let mut m = manifest();
        let key = m.keys[0].rsplit_once(' ').unwrap().0.to_owned();
        m.keys = vec![format!(
            "{key} laptop\u{1b}]52;c;aGk=\u{7} {}",
            "x".repeat(5000)
        )];
        let c = check(&m, &s).unwrap();
        let comment = &c.keys[0].comment;
        assert!(comment.starts_with("laptop]52;c;aGk="), "{comment:?}");
        assert!(!comment.chars().any(char::is_control), "{comment:?}");
        assert_eq!(comment.chars().count(), crate::admin::MAX_KEY_COMMENT);
    }

    #[test]
    fn the_archive_chooses_no_host_paths_devices_or_more_than_the_server_gives() {
        let mut m = manifest();
        m.mounts = vec![
            ("/srv/x".into(), "/p".into(), false),
            ("/etc".into(), "/e".into(), true),
        ];
        m.gpus = Some("all".into());
        m.memory_bytes = Some(4 << 30);
        m.nano_cpus = Some(0);
        m.pids = Some(400);
        m.tcp_forwarding = Some(true);
        m.x11_forwarding = Some(false);
        let c = check(&m, &server()).unwrap();
        assert!(c.settings.mounts.is_empty());
        assert_eq!(c.settings.gpus, None);
        assert_eq!(c.settings.memory_bytes, None);
        assert_eq!(c.settings.nano_cpus, None);
        assert_eq!(c.settings.pids, Some(400));
        assert_eq!(c.forwarding.tcp, None);
        assert_eq!(c.forwarding.x11, Some(false));
        let said = c.left_out.join("\n");
        for want in [
            "mounts /srv/x:/p, /etc:/e:ro (set them again with berth user set)",
            "gpus all",
            "memory 4294967296 bytes",
            "cpus unlimited",
            "tcp forwarding",
        ] {
            assert!(said.contains(want), "{said}");
        }
        assert!(!said.contains("pids"), "{said}");
    }
}
