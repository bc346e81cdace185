//! What one user's container is made with (issue 16): the server's `[limits]`, GPUs and
//! `[[mounts]]`, overridden by what `berth user set` stored for her. The lifecycle makes
//! containers from [`Effective`]; `berth user show` prints it with where each value comes
//! from and whether her container still has another.

use berth_proto::settings::{Gpus, Override, cpus_shown, memory_shown};
use berth_proto::{Effective as Shown, LimitsInfo, MountInfo, MountsInfo, Source};
use berth_runtime::{Applied, BindMount, GpuRequest, Limits};
use berth_store::{UserMount, UserSettings};

/// The server's side: `[limits]` (with the disk cap the engine enforces), `limits.gpus`,
/// and the `[[mounts]]` checked at start.
#[derive(Debug, Clone)]
pub struct Server {
    pub limits: Limits,
    pub gpus: Gpus,
    pub mounts: Vec<BindMount>,
}

/// One user's effective values, each with its source.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// Bytes; 0 is no limit.
    pub memory: (u64, Source),
    /// Nano-CPUs; 0 is no limit.
    pub cpus: (u64, Source),
    pub pids: (u32, Source),
    pub gpus: (Gpus, Source),
    /// The server's folders (but those whose target she has one of her own at), then hers.
    pub mounts: Vec<(BindMount, Source)>,
}

fn pick<T>(own: Option<T>, server: T) -> (T, Source) {
    match own {
        Some(v) => (v, Source::User),
        None => (server, Source::Server),
    }
}

/// `server` overridden by `user`'s own values.
pub fn effective(server: &Server, user: &UserSettings) -> Effective {
    let l = &server.limits;
    let unsigned = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
    let own: Vec<BindMount> = user.mounts.iter().map(bind_mount).collect();
    let mut mounts: Vec<(BindMount, Source)> = server
        .mounts
        .iter()
        .filter(|s| !own.iter().any(|o| o.target == s.target))
        .map(|m| (m.clone(), Source::Server))
        .collect();
    mounts.extend(own.into_iter().map(|m| (m, Source::User)));
    Effective {
        memory: pick(user.memory_bytes, unsigned(l.memory_bytes)),
        cpus: pick(user.nano_cpus, unsigned(l.nano_cpus)),
        pids: pick(
            user.pids,
            u32::try_from(l.pids).unwrap_or(berth_proto::settings::MAX_PIDS),
        ),
        gpus: pick(
            user.gpus.as_deref().and_then(|g| Gpus::parse(g).ok()),
            server.gpus.clone(),
        ),
        mounts,
    }
}

pub fn bind_mount(m: &UserMount) -> BindMount {
    BindMount {
        source: m.source.clone().into(),
        target: m.target.clone(),
        read_only: m.read_only,
    }
}

fn positive(v: u64) -> Option<i64> {
    (v > 0).then(|| i64::try_from(v).unwrap_or(i64::MAX))
}

impl Effective {
    /// The container's limits: these, with the server's console log and disk caps.
    pub fn limits(&self, server: &Limits) -> Limits {
        Limits {
            memory_bytes: positive(self.memory.0),
            nano_cpus: positive(self.cpus.0),
            pids: i64::from(self.pids.0),
            log_bytes: server.log_bytes,
            disk_bytes: server.disk_bytes,
        }
    }

    pub fn gpu_request(&self) -> Option<GpuRequest> {
        match &self.gpus.0 {
            Gpus::None => None,
            Gpus::All => Some(GpuRequest::All),
            Gpus::Devices(ids) => Some(GpuRequest::Devices(ids.clone())),
        }
    }

    /// What `user show` prints; `applied` is what her container has, if she has one.
    pub fn info(&self, applied: Option<&Applied>) -> (LimitsInfo, MountsInfo) {
        let differs = |same: bool| applied.is_some() && !same;
        let a = applied;
        let memory = Shown {
            value: self.memory.0,
            shown: memory_shown(self.memory.0),
            source: self.memory.1,
            pending: differs(a.is_some_and(|a| a.memory_bytes == positive(self.memory.0))),
        };
        let cpus = Shown {
            value: self.cpus.0,
            shown: cpus_shown(self.cpus.0),
            source: self.cpus.1,
            pending: differs(a.is_some_and(|a| a.nano_cpus == positive(self.cpus.0))),
        };
        let pids = Shown {
            value: self.pids.0,
            shown: self.pids.0.to_string(),
            source: self.pids.1,
            pending: differs(a.is_some_and(|a| a.pids == Some(i64::from(self.pids.0)))),
        };
        let gpus = Shown {
            value: self.gpus.0.to_string(),
            shown: self.gpus.0.to_string(),
            source: self.gpus.1,
            pending: differs(a.is_some_and(|a| a.gpus == self.gpu_request())),
        };
        let mut want: Vec<&BindMount> = self.mounts.iter().map(|(m, _)| m).collect();
        let mut have: Vec<&BindMount> = a
            .map(|a| {
                a.mounts
                    .iter()
                    .filter(|m| !is_berths_own(&m.target))
                    .collect()
            })
            .unwrap_or_default();
        let key = |m: &&BindMount| m.target.clone();
        want.sort_by_key(key);
        have.sort_by_key(key);
        let mounts = MountsInfo {
            mounts: self
                .mounts
                .iter()
                .map(|(m, origin)| MountInfo {
                    source: m.source.display().to_string(),
                    target: m.target.clone(),
                    read_only: m.read_only,
                    origin: *origin,
                })
                .collect(),
            pending: differs(want == have),
        };
        (
            LimitsInfo {
                memory,
                cpus,
                pids,
                gpus,
            },
            mounts,
        )
    }
}

/// Mounts every container gets from Berth itself (the guest's run directory, its words on
/// PATH), apart from the shared folders. A shared folder's target is never there: both
/// trees are refused by [`crate::mounts::check_target`].
fn is_berths_own(target: &str) -> bool {
    target.starts_with("/.berth") || target.starts_with("/usr/")
}

/// A change `berth user set` asks for, parsed and with its sources checked (by the admin
/// API); applied to her stored values by her lifecycle owner ([`apply`]).
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub memory: Option<Override<u64>>,
    pub cpus: Option<Override<u64>>,
    pub pids: Option<Override<u32>>,
    pub gpus: Option<Override<Gpus>>,
    /// Added, or replacing hers at the same target.
    pub mount: Vec<BindMount>,
    /// Targets, normalised.
    pub unmount: Vec<String>,
    /// Her base image, checked to be present in the engine.
    pub image: Option<berth_proto::ImageName>,
    /// Forget her committed image.
    pub drop_commit: bool,
}

impl Change {
    /// Whether it touches what [`apply`] changes (limits, GPUs, folders).
    pub fn touches_settings(&self) -> bool {
        self.memory.is_some()
            || self.cpus.is_some()
            || self.pids.is_some()
            || self.gpus.is_some()
            || !self.mount.is_empty()
            || !self.unmount.is_empty()
    }

    /// Whether it touches memory or CPUs, which apply to a running container at once.
    pub fn is_live(&self) -> bool {
        self.memory.is_some() || self.cpus.is_some()
    }
}

/// `current` changed by `change`; a refusal names what to change. `server_targets` are the
/// `[[mounts]]` targets, which a user's own folder may not take.
pub fn apply(
    user: &berth_proto::UserName,
    current: &UserSettings,
    change: &Change,
    server_targets: &[String],
) -> Result<UserSettings, String> {
    let mut s = current.clone();
    if let Some(m) = &change.memory {
        s.memory_bytes = m.clone().into_option();
    }
    if let Some(c) = &change.cpus {
        s.nano_cpus = c.clone().into_option();
    }
    if let Some(p) = &change.pids {
        s.pids = p.clone().into_option();
    }
    if let Some(g) = &change.gpus {
        s.gpus = g.clone().into_option().map(|g| g.to_string());
    }
    for t in &change.unmount {
        let before = s.mounts.len();
        s.mounts.retain(|m| &m.target != t);
        if s.mounts.len() == before {
            let hint = if server_targets.contains(t) {
                " (it is a server-wide one, from [[mounts]] in berth.toml)"
            } else {
                ""
            };
            return Err(format!(
                "{user} has no shared folder of her own at {t}{hint}"
            ));
        }
    }
    for m in &change.mount {
        if server_targets.contains(&m.target) {
            return Err(format!(
                "{} is a server-wide shared folder's target ([[mounts]] in berth.toml); choose another target",
                m.target
            ));
        }
        s.mounts.retain(|o| o.target != m.target);
        s.mounts.push(UserMount {
            source: m.source.display().to_string(),
            target: m.target.clone(),
            read_only: m.read_only,
        });
    }
    if s.mounts.len() > crate::mounts::MAX_USER_MOUNTS {
        return Err(format!(
            "{user} would have {} shared folders of her own; at most {} are allowed",
            s.mounts.len(),
            crate::mounts::MAX_USER_MOUNTS
        ));
    }
    s.mounts.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn server() -> Server {
        Server {
            limits: Limits {
                memory_bytes: Some(4 << 30),
                nano_cpus: Some(1_000_000_000),
                pids: 1024,
                log_bytes: Some(1 << 20),
                disk_bytes: None,
            },
            gpus: Gpus::None,
            mounts: vec![BindMount {
                source: "/srv/datasets".into(),
                target: "/datasets".into(),
                read_only: true,
            }],
        }
    }

    #[test]
    fn user_values_override_the_servers_and_say_so() {
        let alice = berth_proto::UserName::parse("alice").unwrap();
        let change = Change {
            memory: Some(Override::Set(8 << 30)),
            pids: Some(Override::Set(4096)),
            gpus: Some(Override::Set(Gpus::All)),
            mount: vec![BindMount {
                source: "/srv/a".into(),
                target: "/project".into(),
                read_only: false,
            }],
            ..Default::default()
        };
        let s = apply(
            &alice,
            &UserSettings::default(),
            &change,
            &["/datasets".into()],
        )
        .unwrap();
        let e = effective(&server(), &s);
        assert_eq!(e.memory, (8 << 30, Source::User));
        assert_eq!(e.cpus, (1_000_000_000, Source::Server));
        assert_eq!(e.pids, (4096, Source::User));
        assert_eq!(e.gpu_request(), Some(GpuRequest::All));
        assert_eq!(e.mounts.len(), 2);
        let limits = e.limits(&server().limits);
        assert_eq!(limits.memory_bytes, Some(8 << 30));
        assert_eq!(limits.log_bytes, Some(1 << 20));
        // A container made with the server's values: each of hers is pending.
        let old = Applied {
            memory_bytes: Some(4 << 30),
            nano_cpus: Some(1_000_000_000),
            pids: Some(1024),
            gpus: None,
            mounts: vec![
                BindMount {
                    source: "/srv/datasets".into(),
                    target: "/datasets".into(),
                    read_only: true,
                },
                BindMount {
                    source: "/state/run/alice".into(),
                    target: "/.berth/run".into(),
                    read_only: true,
                },
            ],
            volumes: vec![],
        };
        let (l, m) = e.info(Some(&old));
        assert!(l.memory.pending && l.pids.pending && l.gpus.pending && m.pending);
        assert!(!l.cpus.pending);
        assert_eq!(l.memory.shown, "8 GiB");
        // No container: nothing pending.
        let (l, m) = e.info(None);
        assert!(!l.memory.pending && !m.pending);
        // `default` returns to the server's values.
        let back = Change {
            memory: Some(Override::Default),
            pids: Some(Override::Default),
            gpus: Some(Override::Default),
            unmount: vec!["/project".into()],
            ..Default::default()
        };
        let s = apply(&alice, &s, &back, &["/datasets".into()]).unwrap();
        assert_eq!(s, UserSettings::default());
        let (l, m) = effective(&server(), &s).info(Some(&old));
        assert!(!l.memory.pending && !l.pids.pending && !l.gpus.pending && !m.pending);
        assert_eq!(l.memory.source, Source::Server);
    }

    #[test]
    fn refusals_name_what_to_change() {
        let alice = berth_proto::UserName::parse("alice").unwrap();
        let e = apply(
            &alice,
            &UserSettings::default(),
            &Change {
                unmount: vec!["/nope".into()],
                ..Default::default()
            },
            &[],
        )
        .unwrap_err();
        assert_eq!(e, "alice has no shared folder of her own at /nope");
        let e = apply(
            &alice,
            &UserSettings::default(),
            &Change {
                mount: vec![BindMount {
                    source: "/srv/x".into(),
                    target: "/datasets".into(),
                    read_only: false,
                }],
                ..Default::default()
            },
            &["/datasets".into()],
        )
        .unwrap_err();
        assert!(e.contains("server-wide"), "{e}");
    }
}
