//! Names that reach Docker or the store: user names and image references.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "invalid user name {0:?}: use 1-32 characters, a lower-case letter or _ first, then lower-case letters, digits, _ or -"
    )]
    User(String),
    #[error("invalid image name {0:?}: expected a Docker image reference such as debian:bookworm")]
    Image(String),
}

/// A user name as Berth accepts it: `[a-z_][a-z0-9_-]{0,31}`, the portable subset of
/// POSIX user names that is also valid inside a Docker container name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(String);

impl UserName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let mut chars = s.chars();
        let first_ok = matches!(chars.next(), Some('a'..='z' | '_'));
        let rest_ok = chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'));
        if first_ok && rest_ok && s.len() <= 32 {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::User(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<UserName> for String {
    fn from(n: UserName) -> String {
        n.0
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Docker image reference (`name[:tag]`, `registry/name[:tag]`, `name@sha256:...`).
/// Only the character set and length are checked here; whether the image exists is the
/// runtime's question.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageName(String);

impl ImageName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, '.' | '_' | '-' | '/' | ':' | '@')
                    || (c.is_ascii_uppercase() && s.contains(':'))
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::Image(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as the engine lists it: see [`full_image_name`].
    pub fn full(&self) -> String {
        full_image_name(&self.0)
    }
}

/// `name` as the engine lists it: `repo` means `repo:latest`; a name with a tag or a digest
/// stays as it is (a registry's port, `host:5000/repo`, is not a tag).
pub fn full_image_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

impl TryFrom<String> for ImageName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<ImageName> for String {
    fn from(n: ImageName) -> String {
        n.0
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for good in ["alice", "_svc", "a", "bob-2", "x_y", &"a".repeat(32)] {
            assert!(UserName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Alice",
            "1abc",
            "-a",
            "a b",
            "a.b",
            "é",
            "../x",
            &"a".repeat(33),
        ] {
            assert_eq!(
                UserName::parse(bad),
                Err(NameError::User(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn full_names_get_latest_only_without_a_tag_or_digest() {
        for (name, full) in [
            ("debian", "debian:latest"),
            ("debian:12", "debian:12"),
            ("host:5000/team/img", "host:5000/team/img:latest"),
            ("host:5000/team/img:v1", "host:5000/team/img:v1"),
            ("img@sha256:abc", "img@sha256:abc"),
        ] {
            assert_eq!(full_image_name(name), full);
            assert_eq!(ImageName::parse(name).unwrap().full(), full);
        }
    }

    #[test]
    fn image_names() {
        for good in [
            "busybox",
            "debian:bookworm",
            "reg.io:5000/a/b:v1",
            "berth/alice:latest",
        ] {
            assert!(ImageName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "-x", ":tag", "x;rm", "a\nb"] {
            assert!(ImageName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_validates() {
        let r: Result<UserName, _> = serde_json::from_str("\"Bad Name\"");
        assert!(r.is_err());
        let ok: UserName = serde_json::from_str("\"carol\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.as_str(), "carol");
    }
}
