//! The gateway's Ed25519 host key: made at first start, reused afterwards so clients'
//! `known_hosts` entries stay valid.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read host key {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("cannot write host key {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("host key {} is readable by others (mode {mode:o}); it must be 0600", path.display())]
    Permissions { path: PathBuf, mode: u32 },
}

pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, HostKeyError> {
    if path.exists() {
        let mode = std::fs::metadata(path)
            .map_err(|e| HostKeyError::Read {
                path: path.to_owned(),
                reason: e.to_string(),
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(HostKeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        return PrivateKey::read_openssh_file(path).map_err(|e| HostKeyError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        });
    }
    let write_err = |e: &dyn std::fmt::Display| HostKeyError::Write {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let key = PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519)
        .map_err(|e| write_err(&e))?;
    // ssh-key creates the file with mode 0600.
    key.write_openssh_file(path, LineEnding::LF)
        .map_err(|e| write_err(&e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| write_err(&e))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempdir();
        let path = dir.join("host_ed25519_key");
        let a = load_or_create_host_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_host_key(&path).unwrap();
        assert_eq!(a.public_key().key_data(), b.public_key().key_data());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_host_key(&path),
            Err(HostKeyError::Permissions { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-hostkey-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
