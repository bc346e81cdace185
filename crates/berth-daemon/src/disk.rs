//! Per-user disk: the cap each container is created with where the engine can enforce one
//! (`[limits] disk_gb`), what the admin is told where it cannot, and each user's disk use
//! (her container's writable layer), measured off every login's path.
//!
//! Measuring asks the engine to walk every writable layer, which takes long on a big
//! server: it runs in a task of its own, one at a time, at most every [`FRESH`], under a
//! deadline; a reader waits briefly for a due measurement and otherwise gets the last one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_runtime::{DiskQuota, Runtime};
use tokio::sync::watch;

/// A measurement younger than this is served as it is.
const FRESH: Duration = Duration::from_secs(15);
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

#[derive(Default)]
struct Usage {
    /// Bytes by user name.
    by_user: HashMap<String, u64>,
    at: Option<Instant>,
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

    /// Each user's disk use in bytes, as last measured, without waiting.
    pub fn last(&self) -> HashMap<String, u64> {
        self.usage
            .lock()
            .map(|u| u.by_user.clone())
            .unwrap_or_default()
    }

    /// Each user's disk use in bytes, as last measured. Starts a measurement when the last
    /// is older than [`FRESH`] and waits a little for it; never longer than
    /// [`READER_WAIT`].
    pub async fn usage<R: Runtime>(
        self: &std::sync::Arc<Self>,
        runtime: &std::sync::Arc<R>,
        label: (&'static str, String),
    ) -> HashMap<String, u64> {
        let stale = self
            .usage
            .lock()
            .map_or(true, |u| u.at.is_none_or(|t| t.elapsed() >= FRESH));
        if stale {
            let mut rx = self.measured.subscribe();
            if let Ok(guard) = self.measuring.clone().try_lock_owned() {
                let me = self.clone();
                let runtime = runtime.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    me.measure(&*runtime, label).await;
                });
            }
            let _ = tokio::time::timeout(READER_WAIT, rx.changed()).await;
        }
        self.usage
            .lock()
            .map(|u| u.by_user.clone())
            .unwrap_or_default()
    }

    async fn measure<R: Runtime>(&self, runtime: &R, (key, value): (&'static str, String)) {
        let found = tokio::time::timeout(MEASURE_DEADLINE, runtime.disk_usage(key, &value)).await;
        let list = match found {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot measure the containers' disk use");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "measuring the containers' disk use took over {}s; given up",
                    MEASURE_DEADLINE.as_secs()
                );
                return;
            }
        };
        let mut by_user: HashMap<String, u64> = HashMap::new();
        for c in list {
            if let Some(u) = c.labels.get(crate::lifecycle::LABEL_USER) {
                *by_user.entry(u.clone()).or_default() += c.bytes;
            }
        }
        if let Ok(mut u) = self.usage.lock() {
            *u = Usage {
                by_user,
                at: Some(Instant::now()),
            };
        }
        self.measured.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
