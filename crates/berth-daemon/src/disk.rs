//! Per-user disk: the cap each container is created with where the engine can enforce one
//! (`[limits] disk_gb`), what the admin is told where it cannot, and each user's disk use
//! (her container's writable layer, her home volume and her committed image), measured
//! off every login's path.
//!
//! Measuring asks the engine for `docker system df -v`, which walks every writable layer
//! and volume and takes long on a big server: it runs in a task of its own, one at a time,
//! at most every [`FRESH`], under a deadline; a reader waits briefly for a due measurement
//! and otherwise gets the last one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// The runtime's clock (the same as std's, but one tests can move).
use tokio::time::Instant;

use berth_runtime::{DiskQuota, Runtime};
use tokio::sync::watch;

/// A measurement younger than this is served as it is.
pub const FRESH: Duration = Duration::from_secs(30);
/// How long one measurement may take before it is given up.
const MEASURE_DEADLINE: Duration = Duration::from_secs(120);
/// How long a reader waits for a measurement it started.
const READER_WAIT: Duration = Duration::from_secs(2);
/// How long the start-up question about quotas may take.
const QUOTA_DEADLINE: Duration = Duration::from_secs(30);

/// What `berth status` and `berth daemon --check` say about the disk quota.
#[derive(Debug, Clone, PartialEq)]
pub enum Quota {
    /// `limits.disk_gb = 0`.
    Off,
    Enforced {
        bytes: u64,
        driver: String,
    },
    NotEnforced {
        reason: String,
    },
}

impl Quota {
    /// Asks the engine whether it can enforce `bytes` per container (`None`: off).
    pub async fn probe<R: Runtime>(runtime: &R, bytes: Option<u64>) -> Self {
        let Some(bytes) = bytes else {
            return Self::Off;
        };
        match tokio::time::timeout(QUOTA_DEADLINE, runtime.disk_quota()).await {
            Ok(Ok(DiskQuota::Enforced { driver })) => Self::Enforced { bytes, driver },
            Ok(Ok(DiskQuota::NotEnforced { reason })) => Self::NotEnforced { reason },
            Ok(Err(e)) => Self::NotEnforced {
                reason: format!("cannot ask the engine: {e}"),
            },
            Err(_) => Self::NotEnforced {
                reason: "the engine did not answer in time".into(),
            },
        }
    }

    /// The cap containers are created with.
    pub fn bytes(&self) -> Option<u64> {
        match self {
            Self::Enforced { bytes, .. } => Some(*bytes),
            Self::Off | Self::NotEnforced { .. } => None,
        }
    }

    /// One line for the admin.
    pub fn describe(&self) -> String {
        match self {
            Self::Off => "off (limits.disk_gb = 0); per-user use is still reported".into(),
            Self::Enforced { bytes, driver } => {
                format!("{} per container ({driver})", human_bytes(*bytes))
            }
            Self::NotEnforced { reason } => format!("not enforced: {reason}"),
        }
    }
}

/// `1.5 GiB`-style sizes (powers of 1024, as `disk_gb` counts).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss, reason = "a size for people to read")]
    let mut v = n as f64;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if unit == "B" {
        format!("{n} B")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// The quota in force and the last measurement of every user's disk use.
pub struct Disk {
    quota: Mutex<Quota>,
    usage: Mutex<Usage>,
    /// Bumped after every measurement, for readers waiting on one.
    measured: watch::Sender<u64>,
    /// Held by the measurement under way.
    measuring: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// One user's disk use, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserDisk {
    /// Her container's writable layer.
    pub container: u64,
    /// Her home volume.
    pub home: u64,
    /// What only her committed image holds (its layers shared with other images are not
    /// counted: they are her base image's).
    pub image: u64,
}

impl UserDisk {
    pub fn total(&self) -> u64 {
        self.container
            .saturating_add(self.home)
            .saturating_add(self.image)
    }
}

/// Every user's disk use together.
pub fn total(usage: &HashMap<String, UserDisk>) -> u64 {
    usage.values().fold(0, |n, u| n.saturating_add(u.total()))
}

#[derive(Default)]
struct Usage {
    by_user: HashMap<String, UserDisk>,
    at: Option<Instant>,
    /// No measurement starts before this ([`next_after`]).
    next: Option<Instant>,
    /// Measurements in a row that failed or were given up.
    failures: u32,
}

/// When the next measurement may start, after one that took `took` and `failures` in a row
/// before it now failed too (or none, when it worked): the engine spends at most about a
/// quarter of its time walking the containers' files, and half as often again after each
/// failure, up to an hour between tries. (Her files decide how long a walk takes: without
/// this, twenty million empty files kept it walking without a pause, given up and asked
/// again at every scrape.)
fn next_after(now: Instant, took: Duration, failures: u32) -> Instant {
    let calm = FRESH.max(took.saturating_mul(3));
    let backoff = calm.saturating_mul(1u32 << failures.min(7));
    now + backoff.min(Duration::from_secs(3600))
}

/// What [`Disk::usage`] measures: this instance's containers and volumes, and the images
/// of its commit repository.
#[derive(Debug, Clone)]
pub struct Scope {
    /// `(key, value)` of the label on this instance's containers and volumes.
    pub label: (&'static str, String),
    /// Users' commits are `REPOSITORY:USER`.
    pub commit_repository: String,
}

impl Default for Disk {
    fn default() -> Self {
        Self {
            quota: Mutex::new(Quota::Off),
            usage: Mutex::default(),
            measured: watch::channel(0).0,
            measuring: Default::default(),
        }
    }
}

impl Disk {
    pub fn set_quota(&self, q: Quota) {
        if let Ok(mut quota) = self.quota.lock() {
            *quota = q;
        }
    }

    pub fn quota(&self) -> Quota {
        self.quota.lock().map_or_else(|_| Quota::Off, |q| q.clone())
    }

    /// Whether a measurement has been made yet.
    pub fn measured(&self) -> bool {
        self.usage.lock().is_ok_and(|u| u.at.is_some())
    }

    /// Each user's disk use, as last measured, without waiting.
    pub fn last(&self) -> HashMap<String, UserDisk> {
        self.usage
            .lock()
            .map(|u| u.by_user.clone())
            .unwrap_or_default()
    }

    /// Each user's disk use, as last measured. Starts a measurement when the last is older
    /// than [`FRESH`] and waits a little for it; never longer than [`READER_WAIT`].
    pub async fn usage<R: Runtime>(
        self: &std::sync::Arc<Self>,
        runtime: &std::sync::Arc<R>,
        scope: Scope,
    ) -> HashMap<String, UserDisk> {
        let stale = self.usage.lock().map_or(true, |u| {
            u.at.is_none_or(|t| t.elapsed() >= FRESH) && u.next.is_none_or(|n| Instant::now() >= n)
        });
        if stale {
            let mut rx = self.measured.subscribe();
            if let Ok(guard) = self.measuring.clone().try_lock_owned() {
                let me = self.clone();
                let runtime = runtime.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    me.measure(&*runtime, scope).await;
                });
            }
            let _ = tokio::time::timeout(READER_WAIT, rx.changed()).await;
        }
        self.usage
            .lock()
            .map(|u| u.by_user.clone())
            .unwrap_or_default()
    }

    async fn measure<R: Runtime>(&self, runtime: &R, scope: Scope) {
        let (key, value) = &scope.label;
        let started = Instant::now();
        let found = tokio::time::timeout(MEASURE_DEADLINE, runtime.disk_usage(key, value)).await;
        let failed = |u: &mut Usage| {
            u.failures = u.failures.saturating_add(1);
            u.next = Some(next_after(Instant::now(), started.elapsed(), u.failures));
        };
        let found = match found {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot measure the containers' disk use");
                if let Ok(mut u) = self.usage.lock() {
                    failed(&mut u);
                }
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "measuring the containers' disk use took over {}s; given up",
                    MEASURE_DEADLINE.as_secs()
                );
                if let Ok(mut u) = self.usage.lock() {
                    failed(&mut u);
                }
                return;
            }
        };
        let by_user = by_user(&found, &scope.commit_repository);
        if let Ok(mut u) = self.usage.lock() {
            let now = Instant::now();
            *u = Usage {
                by_user,
                at: Some(now),
                next: Some(next_after(now, started.elapsed(), 0)),
                failures: 0,
            };
        }
        self.measured.send_modify(|n| *n += 1);
    }
}

/// Each user's share of what the engine measured.
fn by_user(found: &berth_runtime::DiskUsage, commit_repository: &str) -> HashMap<String, UserDisk> {
    use crate::lifecycle::{LABEL_HOME, LABEL_USER};
    let mut by_user: HashMap<String, UserDisk> = HashMap::new();
    for c in &found.containers {
        if let Some(u) = c.labels.get(LABEL_USER) {
            let e = by_user.entry(u.clone()).or_default();
            e.container = e.container.saturating_add(c.bytes);
        }
    }
    for v in &found.volumes {
        if let (Some(u), Some(_)) = (v.labels.get(LABEL_USER), v.labels.get(LABEL_HOME)) {
            let e = by_user.entry(u.clone()).or_default();
            e.home = e.home.saturating_add(v.bytes);
        }
    }
    // The engine names images as they were tagged: `REPOSITORY:USER`.
    let prefix = format!("{commit_repository}:");
    for i in &found.images {
        let user = i
            .tags
            .iter()
            .find_map(|t| t.strip_prefix(&prefix).map(str::to_owned));
        if let Some(u) = user {
            let e = by_user.entry(u).or_default();
            e.image = e.image.saturating_add(i.bytes);
        }
    }
    by_user
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A measurement that fails (or is given up) is not asked for again at the next read:
    /// after FRESH, then twice as long, and so on; one that works, not before three times
    /// what it took (nor FRESH).
    #[tokio::test(start_paused = true)]
    async fn measurements_that_fail_are_tried_again_less_and_less_often() {
        use berth_runtime::FakeRuntime;
        let rt = std::sync::Arc::new(FakeRuntime::with_images(&[]));
        rt.disk_fails
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let disk = std::sync::Arc::new(Disk::default());
        let scope = Scope {
            label: ("berth.instance", "i".into()),
            commit_repository: "b/users".into(),
        };
        let asked = || FakeRuntime::count(&rt.disk_measures);
        // A reader every 5 s or so (a scrape), for a minute and a half.
        let start = Instant::now();
        let mut at = Vec::new();
        while start.elapsed() < Duration::from_secs(90) {
            let before = asked();
            let t = start.elapsed().as_secs();
            disk.usage(&rt, scope.clone()).await;
            tokio::task::yield_now().await;
            if asked() > before {
                at.push(t);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        // At the start, then once 60 s after the first failure (FRESH doubled) had passed,
        // not at every read.
        assert!(
            at.len() == 2 && at[0] == 0 && (60..70).contains(&at[1]),
            "{at:?}"
        );
        assert_eq!(
            next_after(Instant::now(), Duration::from_secs(100), 0) - Instant::now(),
            Duration::from_secs(300)
        );
        assert_eq!(
            next_after(Instant::now(), Duration::from_secs(100), 20) - Instant::now(),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn each_user_is_given_her_layer_home_and_commit() {
        let labels = |u: &str, home: bool| {
            let mut l = HashMap::from([("berth.user".to_owned(), u.to_owned())]);
            if home {
                l.insert("berth.home".into(), "1".into());
            }
            l
        };
        let found = berth_runtime::DiskUsage {
            containers: vec![berth_runtime::ContainerDisk {
                name: "b-alice".into(),
                labels: labels("alice", false),
                bytes: 1,
            }],
            volumes: vec![
                berth_runtime::VolumeDisk {
                    name: "b-home-alice".into(),
                    labels: labels("alice", true),
                    bytes: 20,
                },
                berth_runtime::VolumeDisk {
                    name: "b-home-bob".into(),
                    labels: labels("bob", true),
                    bytes: 5,
                },
                berth_runtime::VolumeDisk {
                    name: "not-a-home".into(),
                    labels: labels("bob", false),
                    bytes: 1000,
                },
            ],
            images: vec![
                berth_runtime::ImageDisk {
                    id: "sha256:a".into(),
                    tags: vec!["b/users:alice".into()],
                    bytes: 300,
                },
                berth_runtime::ImageDisk {
                    id: "sha256:d".into(),
                    tags: vec!["debian:12".into(), "b/usersx:carol".into()],
                    bytes: 4000,
                },
            ],
        };
        let u = by_user(&found, "b/users");
        assert_eq!(
            u["alice"],
            UserDisk {
                container: 1,
                home: 20,
                image: 300
            }
        );
        assert_eq!(u["bob"].total(), 5);
        assert_eq!(u.len(), 2);
        assert_eq!(total(&u), 326);
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }

    #[test]
    fn the_admin_is_told_what_holds() {
        assert_eq!(
            Quota::Enforced {
                bytes: 2 << 30,
                driver: "overlay2".into()
            }
            .describe(),
            "2.0 GiB per container (overlay2)"
        );
        let q = Quota::NotEnforced {
            reason: "overlay2 on extfs has no project quotas".into(),
        };
        assert_eq!(q.bytes(), None);
        assert!(q.describe().starts_with("not enforced: overlay2 on extfs"));
    }
}
