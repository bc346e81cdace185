//! The audit log: one JSON object per line for every login, session, container change and
//! admin change, appended to `STATE/audit.log` (size-bounded: past the bound the file becomes
//! `audit.log.1`, replacing the previous one) and sent to the `audit` log target.
//!
//! ```json
//! {"ts":"2026-11-28T21:40:00.123Z","event":"login_accepted","user":"alice","key":"SHA256:…","peer":"10.0.0.7:50122"}
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};
use tracing::{info, warn};

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

    /// Records `event` with `fields` (an object; other values are ignored).
    pub fn record(&self, event: &str, fields: Value) {
        let mut line = Map::new();
        line.insert(
            "ts".into(),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("event".into(), event.into());
        if let Value::Object(f) = fields {
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
            audit.record(
                "login_accepted",
                serde_json::json!({"user": "alice", "n": i}),
            );
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
        assert_eq!(last["event"], "login_accepted");
        assert_eq!(last["user"], "alice");
        assert_eq!(last["n"], 9);
        assert!(last["ts"].as_str().unwrap().ends_with('Z'));
        // Numbers are consecutive across the two files: nothing lost at the rotation.
        let ns: Vec<i64> = lines.iter().map(|l| l["n"].as_i64().unwrap()).collect();
        assert!(ns.windows(2).all(|w| w[1] == w[0] + 1), "{ns:?}");
    }
}
