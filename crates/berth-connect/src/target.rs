//! Where a laptop's directory may appear in a container: its own absolute path, unless that
//! would shadow what the container runs on. Both ends check (the laptop to say so before
//! connecting, the daemon because the laptop is not to be trusted).

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Trees a mount may be neither on nor beneath: the system, the kernel's views, and
/// Berth's own directory in the container.
const SYSTEM: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run",
    "/sbin", "/sys", "/usr", "/var/lib", "/var/run", "/.berth",
];

/// Top-level directories that may hold a mount beneath them but not be replaced whole.
const WHOLE: &[&str] = &[
    "/home", "/root", "/tmp", "/var", "/opt", "/srv", "/mnt", "/media",
];

/// The most bytes a mount path may have.
const MAX_PATH: usize = 1024;

/// Why a path cannot be a mount point, in one line for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// `path` as a mount point: absolute, no `.`/`..`/empty components, valid as a file name
/// on Linux, and not one of the system trees. Returns it normalised (no trailing `/`).
pub fn check(path: &[u8]) -> Result<PathBuf, Refused> {
    let shown = String::from_utf8_lossy(path);
    if path.is_empty() || path.len() > MAX_PATH || path.contains(&0) {
        return Err(Refused(format!(
            "{shown:?} is not a path a directory can be mounted at"
        )));
    }
    let p = Path::new(std::ffi::OsStr::from_bytes(path));
    if !p.is_absolute() {
        return Err(Refused(format!("{shown} is not an absolute path")));
    }
    // `Path::components` drops `.` and repeated `/`; look at the bytes for those.
    if path
        .split(|&b| b == b'/')
        .skip(1)
        .any(|c| c == b"." || c == b"..")
        || p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(Refused(format!("{shown} has . or .. in it")));
    }
    let clean: PathBuf = p.components().collect();
    if clean == Path::new("/") {
        return Err(Refused(
            "/ cannot be mounted over: choose a directory".into(),
        ));
    }
    for s in SYSTEM {
        if clean.starts_with(s) {
            return Err(Refused(format!(
                "{} would shadow the container's system ({s}): choose a directory elsewhere, e.g. under your home",
                clean.display()
            )));
        }
    }
    for w in WHOLE {
        if clean == Path::new(w) {
            return Err(Refused(format!(
                "{} would replace the container's whole {w}: choose a directory beneath it",
                clean.display()
            )));
        }
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ordinary_directories_are_taken_as_they_are() {
        for (given, want) in [
            ("/home/alice/src/app", "/home/alice/src/app"),
            ("/home/alice/my dir/é", "/home/alice/my dir/é"),
            ("/data/x/", "/data/x"),
            ("/tmp/a", "/tmp/a"),
            ("/root/work", "/root/work"),
            ("/home//alice", "/home/alice"),
            ("/usrdata", "/usrdata"),
        ] {
            assert_eq!(check(given.as_bytes()).unwrap(), Path::new(want), "{given}");
        }
    }

    #[test]
    fn system_trees_and_odd_paths_are_refused() {
        for bad in [
            "",
            "/",
            "relative/dir",
            "/home/../etc",
            "/home/./alice",
            "/proc",
            "/proc/1",
            "/sys/fs",
            "/dev/shm",
            "/etc",
            "/usr/local/src",
            "/bin",
            "/.berth",
            "/.berth/run",
            "/home",
            "/root",
            "/tmp",
            "/var",
            "/var/lib/docker",
            "/run/user/1000",
            "/lib64",
        ] {
            assert!(check(bad.as_bytes()).is_err(), "{bad:?} was taken");
        }
        assert!(check(b"/home/a\0b").is_err());
        assert!(check(&[b'/'; 2000]).is_err());
        assert!(
            check(b"/etc/x").unwrap_err().0.contains("system"),
            "the line names the rule"
        );
    }
}
