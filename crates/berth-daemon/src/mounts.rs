//! Shared folders (issue 16): which host directories may be bind-mounted into users'
//! containers, and where. A container's root is root on the host's files it is given, so a
//! source that is, or holds, the host's system, the Docker engine's data or socket, or
//! Berth's own state would hand over the host; such a source is refused with the rule it
//! breaks. Sources are resolved first (`canonicalize`), so a symlink is judged by what it
//! points at, and the resolved path is what the engine is given. Targets follow the rules
//! of `berth connect`'s mounts ([`berth_connect::target::check`]).
//!
//! The check is made when the admin sets a folder and again when a container is made (a
//! directory can be swapped for a symlink in between); what is left is the moment between
//! that second check and the engine's mount.

use std::path::{Component, Path, PathBuf};

use berth_runtime::BindMount;

use crate::config::MountConfig;

/// `[[mounts]]` entries, at most.
pub const MAX_SERVER_MOUNTS: usize = 64;
/// Shared folders of one user's own, at most.
pub const MAX_USER_MOUNTS: usize = 32;

/// Host trees a source may be neither in nor equal to: the system, the kernel's views, and
/// what the host's root runs or installs from (software in `/opt`, the system's state in
/// `/var/lib`, cron's and the mail's spools, apt's package cache): a container's root who
/// could write there would have the host. `/lib*` is every top-level directory whose name
/// starts with `lib`.
const SYSTEM: &[&str] = &[
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/boot",
    "/root",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/opt",
    "/var/lib",
    "/var/spool",
    "/var/cache",
];

/// Directories that hold many people's files: a directory beneath one may be shared, the
/// whole may not (every user's home; every user's sockets and agent connections; every
/// share and disk mounted there).
const WHOLE: &[&str] = &["/home", "/tmp", "/var/tmp", "/mnt", "/media", "/srv"];

/// How an `[[mounts]]` entry is named in an error: `[[mounts]] entry 2 (source "/etc",
/// target "/x")`, counted from 1 as people count.
pub fn entry_name(index: usize, m: &MountConfig) -> String {
    format!(
        "[[mounts]] entry {} (source {:?}, target {:?})",
        index + 1,
        m.source.display().to_string(),
        m.target
    )
}

/// A target: as `berth connect`'s (absolute, no `.`/`..`, not on or beneath the container's
/// system trees nor `/.berth`, not the whole of `/home`, `/root`, `/tmp`...). Returns it
/// normalised.
pub fn check_target(target: &str) -> Result<String, String> {
    berth_connect::target::check(target.as_bytes())
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| format!("target {}", e.0))
}

/// The host paths no shared folder may be, hold, or be beneath, besides the system.
#[derive(Debug, Clone)]
pub struct SourceRules {
    /// (path, what it is), resolved where they exist.
    protected: Vec<(PathBuf, &'static str)>,
}

impl SourceRules {
    /// Rules for a daemon whose state is in `state_dir`, whose engine listens on
    /// `docker_socket` and keeps its data in `data_root` (the engine's `DockerRootDir`).
    pub fn new(state_dir: &Path, docker_socket: &Path, data_root: &Path) -> Self {
        let mut protected = Vec::new();
        let mut add = |p: &Path, what: &'static str| {
            protected.push((p.to_owned(), what));
            if let Ok(real) = p.canonicalize() {
                protected.push((real, what));
            }
        };
        add(state_dir, "Berth's state directory");
        add(docker_socket, "the Docker socket");
        add(data_root, "the Docker engine's data root");
        add(
            Path::new("/var/lib/docker"),
            "the Docker engine's data root",
        );
        add(Path::new("/var/lib/containerd"), "containerd's data root");
        add(
            Path::new(crate::config::DEFAULT_STATE_DIR),
            "Berth's state directory",
        );
        Self { protected }
    }

    /// `source` as it may be shared: resolved, an existing directory or file, and none of
    /// the refused ones. The error is one line naming the rule.
    pub fn check(&self, source: &Path) -> Result<PathBuf, String> {
        let shown = source.display();
        if !source.is_absolute() {
            return Err(format!("cannot share {shown}: give an absolute path"));
        }
        let real = source.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("cannot share {shown}: it does not exist"),
            _ => format!("cannot share {shown}: {e}"),
        })?;
        let via = if real == source {
            String::new()
        } else {
            format!(" (it resolves to {})", real.display())
        };
        let refuse = |rule: String| Err(format!("cannot share {shown}{via}: {rule}"));
        if real == Path::new("/") {
            return refuse("it is the host's root directory".into());
        }
        let top = match real.components().nth(1) {
            Some(Component::Normal(c)) => c.to_string_lossy().into_owned(),
            _ => String::new(),
        };
        if let Some(tree) = SYSTEM
            .iter()
            .find(|t| real.starts_with(t))
            .map(|t| (*t).to_owned())
            .or_else(|| top.starts_with("lib").then(|| format!("/{top}")))
        {
            return refuse(format!(
                "it is in the host's system tree {tree}; share a directory such as /srv/NAME"
            ));
        }
        if let Some(w) = WHOLE.iter().find(|w| real == Path::new(w)) {
            return refuse(format!(
                "it is the whole of {w}, which holds other people's files; share a directory beneath it"
            ));
        }
        for (p, what) in &self.protected {
            if real.starts_with(p) {
                return refuse(format!("it is in {what} ({})", p.display()));
            }
            if p.starts_with(&real) {
                return refuse(format!("it holds {what} ({})", p.display()));
            }
        }
        let meta = std::fs::metadata(&real).map_err(|e| format!("cannot share {shown}: {e}"))?;
        if !meta.is_dir() && !meta.is_file() {
            return refuse("it is neither a directory nor a regular file".into());
        }
        Ok(real)
    }

    /// The `[[mounts]]` entries as bind mounts, each source checked and resolved; the
    /// first bad one is named.
    pub fn server_mounts(&self, entries: &[MountConfig]) -> Result<Vec<BindMount>, String> {
        entries
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let entry = entry_name(i, m);
                let source = self.check(&m.source).map_err(|e| format!("{entry}: {e}"))?;
                let target = check_target(&m.target).map_err(|e| format!("{entry}: {e}"))?;
                Ok(BindMount {
                    source,
                    target,
                    read_only: m.read_only,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules(dir: &Path) -> SourceRules {
        SourceRules::new(
            &dir.join("state"),
            Path::new("/var/run/docker.sock"),
            &dir.join("docker-root"),
        )
    }

    #[test]
    fn system_trees_engine_and_state_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state/run")).unwrap();
        std::fs::create_dir_all(dir.path().join("docker-root")).unwrap();
        std::fs::create_dir_all(dir.path().join("ok/data")).unwrap();
        let r = rules(dir.path());
        for (path, rule) in [
            ("/", "root directory"),
            ("/etc", "system tree /etc"),
            ("/usr/share", "system tree /usr"),
            ("/proc/self", "system tree /proc"),
            ("/sys", "system tree /sys"),
            ("/dev", "system tree /dev"),
            ("/home", "whole of /home"),
            ("/tmp", "whole of /tmp"),
            ("/var/run/docker.sock", "system tree /run"),
            ("/opt", "system tree /opt"),
            ("/var/spool", "system tree /var/spool"),
            ("/var/cache", "system tree /var/cache"),
            ("/var/lib", "system tree /var/lib"),
            ("/srv", "whole of /srv"),
            ("/mnt", "whole of /mnt"),
        ] {
            let e = r.check(Path::new(path)).unwrap_err();
            assert!(e.contains(rule), "{path}: {e}");
        }
        if Path::new("/lib").exists() {
            let e = r.check(Path::new("/lib")).unwrap_err();
            assert!(e.contains("system tree /"), "{e}");
        }
        let state = dir.path().join("state/run");
        let e = r.check(&state).unwrap_err();
        assert!(e.contains("Berth's state directory"), "{e}");
        // A directory holding the state directory or the engine's data hands them over too.
        let e = r.check(dir.path()).unwrap_err();
        assert!(e.contains("it holds"), "{e}");
        let e = r.check(&dir.path().join("docker-root")).unwrap_err();
        assert!(e.contains("data root"), "{e}");
        let e = r.check(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        assert!(r.check(Path::new("relative")).is_err());
        // A symlink is judged by what it points at, and named with it.
        let link = dir.path().join("ok/root");
        std::os::unix::fs::symlink("/", &link).unwrap();
        let e = r.check(&link).unwrap_err();
        assert!(
            e.contains("resolves to /") && e.contains("root directory"),
            "{e}"
        );
        // An ordinary directory is taken, resolved.
        assert_eq!(
            r.check(&dir.path().join("ok/./data")).unwrap(),
            dir.path().join("ok/data").canonicalize().unwrap()
        );
    }

    #[test]
    fn targets_follow_the_connect_rules() {
        assert_eq!(check_target("/datasets/").unwrap(), "/datasets");
        for bad in [
            "/",
            "/etc/x",
            "/.berth",
            "/.berth/run",
            "/home",
            "rel",
            "/a/../b",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }
}
