//! The audit log: one JSON object per line for every login, session, container change and
//! admin change, appended to `STATE/audit.log` (size-bounded: past the bound the file becomes
//! `audit.log.1`, replacing the previous one) and sent to the `audit` log target.
//!
//! ```json
//! {"ts":"2026-11-28T21:40:00.123Z","event":"login_accepted","user":"alice","key":"SHA256:…","peer":"10.0.0.7:50122"}
//! ```
//!
//! Every record is an [`Event`]: adding an audit event is adding a variant there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{Map, Value};
use tracing::{info, warn};

/// Every audit record there is. Serialized with its name as `"event"` (snake case) and its
/// fields beside it; client-supplied text in them is bounded by whoever builds the event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    LoginAccepted {
        user: String,
        key: String,
        peer: String,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        certificate: Option<CertificateFields>,
    },
    LoginRefused {
        user: String,
        key: String,
        peer: String,
    },
    /// Refused logins past the minute's budget, written once the minute is over.
    LoginRefusedSuppressed {
        count: u32,
    },
    SessionStart {
        id: u64,
        user: String,
        peer: String,
        command: String,
    },
    SessionEnd {
        id: u64,
        user: String,
        exit: Option<u32>,
    },
    SessionRefused {
        user: String,
        peer: String,
        reason: String,
    },
    SessionKill {
        id: u64,
        user: String,
        command: String,
    },
    HostWord {
        user: String,
        word: &'static str,
    },
    /// A forwarding opened: `-L`/`-R` (TCP or Unix socket), an agent or an X11 connection.
    ForwardOpen {
        user: String,
        kind: &'static str,
        target: String,
    },
    ForwardRefused {
        user: String,
        kind: &'static str,
        target: String,
        reason: String,
    },
    ContainerCreate {
        user: String,
        container: String,
        image: String,
    },
    ContainerStart {
        user: String,
        container: String,
    },
    ContainerStop {
        user: String,
        container: String,
        reason: &'static str,
    },
    ContainerRemove {
        user: String,
        container: String,
    },
    ContainerCommit {
        user: String,
        container: String,
        image: String,
        id: String,
    },
    DaemonMode {
        user: String,
        on: bool,
    },
    /// A user's committed image removed by the lifecycle (`user` set), or an image removed
    /// by the admin (`id` set).
    ImageRemove {
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        image: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    ImageImport {
        image: String,
        id: String,
    },
    UserAdd {
        user: String,
        image: String,
        keys: usize,
    },
    UserRemove {
        user: String,
    },
    UserForwarding {
        user: String,
        tcp: Option<bool>,
        agent: Option<bool>,
        x11: Option<bool>,
    },
    KeyAdd {
        user: String,
        keys: usize,
    },
    KeyRemove {
        user: String,
        key: String,
    },
    /// A user's SSH connections ended by the admin: her key (`key`) or she was removed, or
    /// she was kicked.
    ConnectionsClosed {
        user: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        connections: usize,
        reason: &'static str,
    },
}

/// What a certificate login adds to its record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertificateFields {
    pub cert_key_id: String,
    pub cert_serial: u64,
    pub cert_ca: String,
}

pub struct Audit {
    path: Option<PathBuf>,
    max_bytes: u64,
    /// The open file and its length so far.
    file: Mutex<Option<(std::fs::File, u64)>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("path", &self.path).finish()
    }
}

impl Audit {
    /// An audit log appending to `path`, rotated past `max_bytes`.
    pub fn to_file(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path: Some(path.to_owned()),
            max_bytes,
            file: Mutex::new(Some((file, len))),
        })
    }

    /// An audit log that only goes to the `audit` log target (tests, tools).
    pub fn log_only() -> Self {
        Self {
            path: None,
            max_bytes: 0,
            file: Mutex::new(None),
        }
    }

    /// Records `event`: the one writer of audit records.
    pub fn record(&self, event: Event) {
        let mut line = Map::new();
        line.insert(
            "ts".into(),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        if let Ok(Value::Object(f)) = serde_json::to_value(&event) {
            line.extend(f);
        }
        let text = Value::Object(line).to_string();
        info!(target: "audit", "{text}");
        let Some(path) = &self.path else { return };
        let Ok(mut guard) = self.file.lock() else {
            return;
        };
        if let Err(e) = self.append(path, &mut guard, &text) {
            warn!(error = %e, path = %path.display(), "cannot write the audit log");
        }
    }

    fn append(
        &self,
        path: &Path,
        file: &mut Option<(std::fs::File, u64)>,
        text: &str,
    ) -> std::io::Result<()> {
        let line = format!("{text}\n");
        let n = line.len() as u64;
        match file {
            Some((_, len)) if *len + n <= self.max_bytes => {}
            Some(_) => {
                // Full: it becomes `.1`; a failed re-open leaves no handle, and the next
                // record tries again.
                *file = None;
                let mut old = path.as_os_str().to_owned();
                old.push(".1");
                std::fs::rename(path, old)?;
                *file = Some((open(path)?, 0));
            }
            None => {
                let f = open(path)?;
                let len = f.metadata()?.len();
                *file = Some((f, len));
            }
        }
        if let Some((f, len)) = file {
            f.write_all(line.as_bytes())?;
            *len += n;
        }
        Ok(())
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_and_the_file_rotates_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::to_file(&path, 400).unwrap();
        for i in 0..10 {
            audit.record(Event::SessionEnd {
                id: i,
                user: "alice".into(),
                exit: Some(0),
            });
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.path().join("audit.log.1")).unwrap();
        assert!(now.len() <= 400 && old.len() <= 400, "{now}\n{old}");
        let lines: Vec<Value> = old
            .lines()
            .chain(now.lines())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let last = lines.last().unwrap();
        assert_eq!(last["event"], "session_end");
        assert_eq!(last["user"], "alice");
        assert_eq!(last["id"], 9);
        assert_eq!(last["exit"], 0);
        assert!(last["ts"].as_str().unwrap().ends_with('Z'));
        // Numbers are consecutive across the two files: nothing lost at the rotation.
        let ns: Vec<i64> = lines.iter().map(|l| l["id"].as_i64().unwrap()).collect();
        assert!(ns.windows(2).all(|w| w[1] == w[0] + 1), "{ns:?}");
    }

    #[test]
    fn events_are_named_in_snake_case_with_their_fields_beside() {
        let cert = Event::LoginAccepted {
            user: "alice".into(),
            key: "SHA256:x".into(),
            peer: "-".into(),
            certificate: Some(CertificateFields {
                cert_key_id: "alice@laptop".into(),
                cert_serial: 7,
                cert_ca: "SHA256:ca".into(),
            }),
        };
        let v = serde_json::to_value(&cert).unwrap();
        assert_eq!(v["event"], "login_accepted");
        assert_eq!(v["cert_serial"], 7);
        let plain = Event::LoginAccepted {
            user: "alice".into(),
            key: "SHA256:x".into(),
            peer: "-".into(),
            certificate: None,
        };
        let v = serde_json::to_value(&plain).unwrap();
        assert!(v.get("cert_key_id").is_none(), "{v}");
        let v = serde_json::to_value(Event::ForwardRefused {
            user: "bob".into(),
            kind: "local",
            target: "db:5432".into(),
            reason: "tcp forwarding is off for this user".into(),
        })
        .unwrap();
        assert_eq!(v["event"], "forward_refused");
        assert_eq!(v["kind"], "local");
    }
}
