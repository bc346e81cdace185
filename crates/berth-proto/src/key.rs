//! Public keys in OpenSSH `authorized_keys` format.

use serde::{Deserialize, Serialize};
use ssh_key::{HashAlg, PublicKey};

/// Why a line of a key file was refused. `line` counts from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("line {line}: not a public key ({reason})")]
    NotAKey { line: usize, reason: String },
    #[error("line {line}: key options ({options}) are not supported; give the bare key")]
    Options { line: usize, options: String },
    #[error("no public key found")]
    Empty,
}

/// One validated public key, kept as its canonical OpenSSH text plus its SHA-256
/// fingerprint (the form `ssh-keygen -lf` prints). Keys are compared by fingerprint, never
/// by text, since the comment is not part of the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizedKey {
    pub openssh: String,
    pub fingerprint: String,
    pub algorithm: String,
    pub comment: String,
}

impl AuthorizedKey {
    pub fn from_public_key(key: &PublicKey) -> Self {
        let mut bare = key.clone();
        bare.set_comment("");
        Self {
            openssh: bare.to_openssh().unwrap_or_default(),
            fingerprint: fingerprint(key),
            algorithm: key.algorithm().to_string(),
            comment: key.comment().as_str_lossy().to_owned(),
        }
    }

    /// Parses one OpenSSH public key line (`TYPE BASE64 [COMMENT]`).
    pub fn parse_line(line: &str) -> Result<Self, String> {
        let key = PublicKey::from_openssh(line.trim()).map_err(|e| e.to_string())?;
        Ok(Self::from_public_key(&key))
    }
}

/// The `SHA256:...` fingerprint of a key, as `ssh-keygen -lf` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Parses the text of an `authorized_keys` file: one key per line, blank lines and `#`
/// comments skipped. Lines with options (`restrict,command=...`) are refused rather than
/// silently stripped, so an admin never believes a restriction applies when it does not.
pub fn parse_authorized_keys(text: &str) -> Result<Vec<AuthorizedKey>, KeyError> {
    let mut keys = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lineno = i + 1;
        match AuthorizedKey::parse_line(line) {
            Ok(k) => keys.push(k),
            Err(reason) => {
                // Distinguish "options in front of a valid key" from garbage.
                if let Some((opts, rest)) = line.split_once(char::is_whitespace)
                    && AuthorizedKey::parse_line(rest).is_ok()
                {
                    return Err(KeyError::Options {
                        line: lineno,
                        options: opts.to_owned(),
                    });
                }
                return Err(KeyError::NotAKey {
                    line: lineno,
                    reason,
                });
            }
        }
    }
    if keys.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop";

    #[test]
    fn parses_and_fingerprints() {
        let keys = parse_authorized_keys(&format!("# mine\n\n{ED}\n")).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
        assert_eq!(keys[0].comment, "alice@laptop");
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert!(!keys[0].openssh.contains("alice@laptop"));
    }

    #[test]
    fn names_the_bad_line() {
        let err = parse_authorized_keys(&format!("{ED}\nhello world\n")).unwrap_err();
        assert!(matches!(err, KeyError::NotAKey { line: 2, .. }), "{err}");
        let err = parse_authorized_keys(&format!("restrict {ED}\n")).unwrap_err();
        assert_eq!(
            err,
            KeyError::Options {
                line: 1,
                options: "restrict".into()
            }
        );
        assert_eq!(
            parse_authorized_keys("\n# nothing\n").unwrap_err(),
            KeyError::Empty
        );
    }

    #[test]
    fn private_key_is_not_a_public_key() {
        let err = parse_authorized_keys("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n").unwrap_err();
        assert!(matches!(err, KeyError::NotAKey { line: 1, .. }));
    }
}
