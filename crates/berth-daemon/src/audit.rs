//! The audit log: one JSON object per line for every login, session, container change and
//! admin change, appended to `STATE/audit.log` (size-bounded: past the bound the file becomes
//! `audit.log.1`, the older ones move up to `audit.log.4` and the oldest goes) and sent to the
//! `audit` log target.
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
use tracing::{error, info};

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
    /// Records of `user`'s own doing past her budget for a minute (see [`USER_BUDGET`]),
    /// counted and written once that minute is over.
    AuditSuppressed {
        user: String,
        count: u64,
        /// The minute they were suppressed in (RFC 3339, its start).
        minute: String,
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
    /// A laptop directory mounted in a user's container (`berth connect`), and its end.
    MountStart {
        user: String,
        path: String,
    },
    MountEnd {
        user: String,
        path: String,
    },
    /// A user was refused a connection, session or forwarded connection for holding all
    /// she may (`[limits]`).
    LimitReached {
        user: String,
        what: &'static str,
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
        /// The whole image, and what this commit added to it.
        size_bytes: u64,
        added_bytes: u64,
        layers: usize,
        /// Made anew in one layer: the container's image was too deep.
        flattened: bool,
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
    /// `berth user export`: her archive was made (`bytes` long).
    UserExport {
        user: String,
        bytes: u64,
    },
    /// `berth user import`: she was recreated from an archive of `bytes`.
    UserImport {
        user: String,
        bytes: u64,
    },
    /// A user's home volume removed with her (`berth user rm --purge-data`).
    HomeRemove {
        user: String,
        volume: String,
    },
    /// `berth user set --image`/`--drop-commit`: her base image now, and the committed
    /// image she no longer has, if any.
    UserImage {
        user: String,
        image: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        dropped_commit: Option<String>,
    },
    UserForwarding {
        user: String,
        tcp: Option<bool>,
        agent: Option<bool>,
        x11: Option<bool>,
    },
    /// What `berth user set` stored for a user apart from the server, after the change
    /// (absent: the server's value; 0: no limit).
    UserSettings {
        user: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        memory_bytes: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        nano_cpus: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pids: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gpus: Option<String>,
        mounts: Vec<String>,
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
    /// The open file and its length so far, and whether the last write failed.
    file: Mutex<FileState>,
    /// Per-user budgets for records a user's own actions make.
    budgets: Mutex<Budgets>,
}

#[derive(Default)]
struct FileState {
    open: Option<(std::fs::File, u64)>,
    /// The last write failed (a full disk): said once in the daemon's log, and once more
    /// when writing works again.
    failing: bool,
}

/// Records a user's own actions may write per minute by default (logins, sessions, host
/// words, forwardings, daemon mode, her container's starts and stops): enough for any real
/// use, few enough that no loop of hers rotates other records (her login's among them) out
/// of the file. What is past it is counted, and the count written once the minute is over.
/// The config's `audit_user_budget`.
pub const USER_BUDGET: u64 = 600;

/// A user's own records in an hour, at most, as a multiple of her minute's budget: a loop
/// that keeps to the minute's budget for hours still does not fill the file (at the
/// default, about 2 MB an hour, so some six days to push a record of hers out of the
/// five files kept, where the minute's budget alone took ten hours).
const HOUR_BUDGETS: u64 = 10;

/// Rotated files kept (`audit.log.1` the newest): with `audit.log`, five times
/// `audit_max_mb`.
pub const ROTATED_KEPT: usize = 4;

/// Users tracked at once; past it, entries of minutes gone by are dropped.
const MAX_TRACKED: usize = 10_000;

struct Budgets {
    per_minute: u64,
    by_user: std::collections::HashMap<String, Budget>,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            per_minute: USER_BUDGET,
            by_user: Default::default(),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Budget {
    minute: u64,
    written: u64,
    suppressed: u64,
    /// The hour of `minute`, and the records written in it.
    hour: u64,
    hour_written: u64,
}

impl Budgets {
    /// Whether `user` may write one more record in `minute`; and the count suppressed in a
    /// minute of hers now over, with that minute.
    fn take(&mut self, user: &str, minute: u64) -> (bool, Option<(u64, u64)>) {
        if self.by_user.len() >= MAX_TRACKED && !self.by_user.contains_key(user) {
            // Entries whose minute is over and that owe no count go first.
            self.by_user
                .retain(|_, b| b.minute == minute || b.suppressed > 0);
        }
        let b = self.by_user.entry(user.to_owned()).or_default();
        let mut over = None;
        if b.minute != minute {
            if b.suppressed > 0 {
                over = Some((b.suppressed, b.minute));
            }
            let hour = minute / 60;
            let hour_written = if b.hour == hour { b.hour_written } else { 0 };
            *b = Budget {
                minute,
                hour,
                hour_written,
                ..Budget::default()
            };
        }
        if b.written < self.per_minute
            && b.hour_written < self.per_minute.saturating_mul(HOUR_BUDGETS)
        {
            b.written += 1;
            b.hour_written += 1;
            (true, over)
        } else {
            b.suppressed += 1;
            (false, over)
        }
    }
}

impl Event {
    /// The user whose own actions made this record, for records that count against her
    /// budget. Admin changes, container creation, removal and commits are never suppressed.
    fn budgeted_user(&self) -> Option<&str> {
        match self {
            Self::LoginAccepted { user, .. }
            | Self::SessionStart { user, .. }
            | Self::SessionEnd { user, .. }
            | Self::SessionRefused { user, .. }
            | Self::HostWord { user, .. }
            | Self::ForwardOpen { user, .. }
            | Self::ForwardRefused { user, .. }
            | Self::LimitReached { user, .. }
            | Self::MountStart { user, .. }
            | Self::MountEnd { user, .. }
            | Self::DaemonMode { user, .. }
            | Self::ContainerStart { user, .. }
            | Self::ContainerStop { user, .. } => Some(user),
            _ => None,
        }
    }
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
            file: Mutex::new(FileState {
                open: Some((file, len)),
                failing: false,
            }),
            budgets: Mutex::default(),
        })
    }

    /// Sets how many records of a user's own doing are written per minute.
    #[must_use]
    pub fn with_user_budget(self, per_minute: u64) -> Self {
        if let Ok(mut b) = self.budgets.lock() {
            b.per_minute = per_minute;
        }
        self
    }

    /// An audit log that only goes to the `audit` log target (tests, tools).
    pub fn log_only() -> Self {
        Self {
            path: None,
            max_bytes: 0,
            file: Mutex::default(),
            budgets: Mutex::default(),
        }
    }

    /// Records `event`: the one writer of audit records. A user's own records past her
    /// budget are only counted (see [`USER_BUDGET`]).
    pub fn record(&self, event: Event) {
        if let Some(user) = event.budgeted_user() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() / 60);
            let (write, over) = self
                .budgets
                .lock()
                .map_or((true, None), |mut b| b.take(user, now));
            if let Some((count, minute)) = over {
                let start = std::time::UNIX_EPOCH + std::time::Duration::from_secs(minute * 60);
                self.write(Event::AuditSuppressed {
                    user: user.to_owned(),
                    count,
                    minute: humantime::format_rfc3339_seconds(start).to_string(),
                });
            }
            if !write {
                return;
            }
        }
        self.write(event);
    }

    fn write(&self, event: Event) {
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
        let state = &mut *guard;
        match self.append(path, &mut state.open, &text) {
            Ok(()) if state.failing => {
                state.failing = false;
                info!(path = %path.display(), "the audit log is written again");
            }
            Ok(()) => {}
            Err(e) => {
                // Reopened at the next record, which starts on a line of its own.
                state.open = None;
                if !state.failing {
                    state.failing = true;
                    error!(
                        error = %e,
                        path = %path.display(),
                        "cannot write the audit log (disk full?); its records go to this log \
                         only, until it can be written again (said once)"
                    );
                }
            }
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
                // Full: it becomes `.1`, `.1` becomes `.2`... (the oldest goes); a failed
                // re-open leaves no handle, and the next record tries again.
                *file = None;
                let nth = |n: usize| {
                    let mut p = path.as_os_str().to_owned();
                    if n > 0 {
                        p.push(format!(".{n}"));
                    }
                    PathBuf::from(p)
                };
                for n in (1..=ROTATED_KEPT).rev() {
                    match std::fs::rename(nth(n - 1), nth(n)) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && n > 1 => {}
                        r => r?,
                    }
                }
                *file = Some((open(path)?, 0));
            }
            None => {
                // A record cut short by a failed write (a full disk) is cut off: every
                // line of the file stays one whole JSON record.
                let len = cut_torn_tail(path)?;
                *file = Some((open(path)?, len));
            }
        }
        if let Some((f, len)) = file {
            f.write_all(line.as_bytes())?;
            *len += n;
        }
        Ok(())
    }
}

/// Truncates the file at `path` (if any) after its last newline; returns its length then.
fn cut_torn_tail(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // A record is far shorter than this: its start is within the tail read.
    let tail = len.min(256 * 1024);
    f.seek(SeekFrom::Start(len - tail))?;
    let mut buf = Vec::new();
    (&mut f).take(tail).read_to_end(&mut buf)?;
    if buf.last().is_none_or(|b| *b == b'\n') {
        return Ok(len);
    }
    let keep = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => len - tail + i as u64 + 1,
        None if tail == len => 0,
        // No newline in the tail: not a torn record of ours; leave the file alone.
        None => return Ok(len),
    };
    f.set_len(keep)?;
    Ok(keep)
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
    fn a_record_torn_by_a_full_disk_is_cut_off_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "{\"a\":1}\n{\"event\":\"lo").unwrap();
        assert_eq!(cut_torn_tail(&path).unwrap(), 8);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        assert_eq!(cut_torn_tail(&path).unwrap(), 8);
        std::fs::write(&path, "{\"ev").unwrap();
        assert_eq!(cut_torn_tail(&path).unwrap(), 0);
        assert_eq!(cut_torn_tail(&dir.path().join("none")).unwrap(), 0);
    }

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

    #[test]
    fn a_users_own_records_past_her_budget_are_counted_not_written() {
        let mut b = Budgets::default();
        let written = (0..USER_BUDGET + 50)
            .filter(|_| b.take("alice", 7).0)
            .count();
        assert_eq!(written as u64, USER_BUDGET);
        // bob's budget is his own.
        assert_eq!(b.take("bob", 7), (true, None));
        // The next minute: the count is due, once.
        assert_eq!(b.take("alice", 8), (true, Some((50, 7))));
        assert_eq!(b.take("alice", 8), (true, None));
    }

    #[test]
    fn a_user_keeping_to_her_minutes_budget_is_held_to_ten_of_them_an_hour() {
        let mut b = Budgets::default();
        let mut written = 0u64;
        // An hour of minutes 120..180, each filled to the budget and past it.
        for minute in 120..180 {
            written += (0..USER_BUDGET + 10)
                .filter(|_| b.take("alice", minute).0)
                .count() as u64;
        }
        assert_eq!(written, USER_BUDGET * HOUR_BUDGETS);
        // The next hour starts afresh; the minute past the cap owes its count.
        let (ok, over) = b.take("alice", 180);
        assert!(ok);
        assert_eq!(over, Some((USER_BUDGET + 10, 179)));
    }

    #[test]
    fn rotation_keeps_four_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::to_file(&path, 300).unwrap();
        for n in 0..40 {
            audit.record(Event::UserRemove {
                user: format!("u{n}"),
            });
        }
        let name = |n: usize| dir.path().join(format!("audit.log.{n}"));
        for n in 1..=ROTATED_KEPT {
            assert!(name(n).exists(), "no audit.log.{n}");
        }
        assert!(!name(ROTATED_KEPT + 1).exists());
        // Newest first: the current file, then .1, .2...
        let first = |p: &Path| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_owned()
        };
        let n = |l: String| -> u32 {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            v["user"].as_str().unwrap()[1..].parse().unwrap()
        };
        assert!(n(first(&path)) > n(first(&name(1))));
        for k in 1..ROTATED_KEPT {
            assert!(n(first(&name(k))) > n(first(&name(k + 1))));
        }
    }

    #[test]
    fn the_login_survives_a_flood_of_the_users_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::to_file(&path, 1 << 20).unwrap();
        audit.record(Event::LoginAccepted {
            user: "alice".into(),
            key: "SHA256:k".into(),
            peer: "-".into(),
            certificate: None,
        });
        for _ in 0..20_000 {
            audit.record(Event::HostWord {
                user: "alice".into(),
                word: "port",
            });
        }
        // An admin change is never suppressed.
        audit.record(Event::UserRemove { user: "bob".into() });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().next().unwrap().contains("login_accepted"));
        assert!(
            text.lines().count() <= USER_BUDGET as usize + 2,
            "{}",
            text.lines().count()
        );
        assert!(text.lines().last().unwrap().contains("user_remove"));
    }
}
