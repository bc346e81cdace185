//! The host firewall that keeps users' containers from the host (issue 14, point 6).
//!
//! Each user's container is alone on a bridge of its own whose name starts with the
//! daemon's bridge prefix (`berth-0`, `berth-1`, ...; see [`crate::Config::bridge_prefix`]),
//! so one rule per chain matches them all with iptables' `+` wildcard:
//!
//! ```text
//! INPUT       -i berth-+ -j BERTH-IN-berth     (iptables and ip6tables)
//!   BERTH-IN-berth:  ESTABLISHED,RELATED accept; [isolation] allow entries accept; reject
//! DOCKER-USER -i berth-+ -j BERTH-FWD-berth    (FORWARD when Docker made no DOCKER-USER)
//!   BERTH-FWD-berth: to 169.254.0.0/16 and [isolation] deny ranges reject;
//!                    to another Berth bridge reject
//! ```
//!
//! INPUT is what a packet to any address of the host goes through, whichever interface the
//! address is on (the bridge gateway, other bridges, the LAN address): a container reaches
//! none of them. Loopback inside the container is its own. Everything else (the internet)
//! is forwarded as Docker does. Berth touches only its own chains and the jumps to them: at
//! start it makes them what the config says (idempotently, without a moment of no rules
//! when nothing changed), `berth purge` removes them. Every `iptables` run has a deadline.

use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;

/// How long one `iptables` run may take, waiting for the xtables lock included.
const DEADLINE: Duration = Duration::from_secs(15);
/// Always refused: link-local, where cloud metadata services answer (169.254.169.254).
const LINK_LOCAL: &str = "169.254.0.0/16";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A host service containers may reach: `PROTO:[ADDRESS:]PORT[-PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub proto: Proto,
    pub address: Option<Ipv4Addr>,
    pub ports: (u16, u16),
}

impl FromStr for Allow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let shape = "expected PROTO:PORT, PROTO:PORT-PORT or PROTO:ADDRESS:PORT (PROTO tcp or udp)";
        let mut parts = s.split(':');
        let (proto, first, second) = (parts.next(), parts.next(), parts.next());
        if parts.next().is_some() {
            return Err(shape.into());
        }
        let proto = match proto {
            Some("tcp") => Proto::Tcp,
            Some("udp") => Proto::Udp,
            _ => return Err(shape.into()),
        };
        let (address, ports) = match (first, second) {
            (Some(p), None) => (None, p),
            (Some(a), Some(p)) => (
                Some(
                    a.parse::<Ipv4Addr>()
                        .map_err(|_| format!("{a:?} is not an IPv4 address; {shape}"))?,
                ),
                p,
            ),
            _ => return Err(shape.into()),
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{p:?} is not a port; {shape}"))
        };
        let ports = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(ports)?, port(ports)?),
        };
        if ports.0 > ports.1 {
            return Err(format!("port range {}-{} is empty", ports.0, ports.1));
        }
        Ok(Self {
            proto,
            address,
            ports,
        })
    }
}

impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{proto}:")?;
        if let Some(a) = self.address {
            write!(f, "{a}:")?;
        }
        match self.ports {
            (a, b) if a == b => write!(f, "{a}"),
            (a, b) => write!(f, "{a}-{b}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FirewallError(String);

/// The rules of one daemon, from its config ([`crate::Config::firewall_rules`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// `false`: nothing is installed, and what an earlier start installed is removed.
    pub enabled: bool,
    /// The bridges' name prefix (`berth-`).
    pub bridges: String,
    pub host_access: bool,
    pub allow: Vec<Allow>,
    pub deny: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn bin(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

/// The output of an `iptables` run that succeeded; `Err` carries what it said.
async fn iptables(family: Family, args: &[String]) -> Result<String, FirewallError> {
    let mut cmd = tokio::process::Command::new(family.bin());
    cmd.args(["-w", "10"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .map_err(|_| {
            FirewallError(format!(
                "{} {} did not finish within {}s",
                family.bin(),
                args.join(" "),
                DEADLINE.as_secs()
            ))
        })?
        .map_err(|e| FirewallError(format!("cannot run {}: {e}", family.bin())))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FirewallError(format!(
            "{} {}: {}",
            family.bin(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// A chain of ours and the one jump to it from `parent`.
struct Chain {
    family: Family,
    parent: String,
    name: String,
    rules: Vec<Vec<String>>,
}

impl Rules {
    fn tag(&self) -> &str {
        self.bridges.trim_end_matches('-')
    }

    fn jump(&self, chain: &str) -> Vec<String> {
        words(&format!("-i {}+ -j {chain}", self.bridges))
    }

    /// Where Docker lets admins filter forwarded traffic; FORWARD itself when the engine
    /// made no DOCKER-USER (`"iptables": false`).
    async fn forward_parent() -> &'static str {
        let probe = words("-S DOCKER-USER");
        if iptables(Family::V4, &probe).await.is_ok() {
            "DOCKER-USER"
        } else {
            "FORWARD"
        }
    }

    async fn chains(&self) -> Vec<Chain> {
        let mut input = vec![words(
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        )];
        let mut input6 = input.clone();
        if !self.host_access {
            for a in &self.allow {
                let proto = match a.proto {
                    Proto::Tcp => "tcp",
                    Proto::Udp => "udp",
                };
                let dest = a.address.map(|d| format!("-d {d}/32 ")).unwrap_or_default();
                let rule = words(&format!(
                    "-p {proto} {dest}-m {proto} --dport {}:{} -j ACCEPT",
                    a.ports.0, a.ports.1
                ));
                if a.address.is_none() {
                    input6.push(rule.clone());
                }
                input.push(rule);
            }
            input.push(words("-j REJECT"));
            input6.push(words("-j REJECT"));
        }
        let mut forward: Vec<Vec<String>> = std::iter::once(LINK_LOCAL.to_owned())
            .chain(self.deny.iter().map(ToString::to_string))
            .map(|net| words(&format!("-d {net} -j REJECT")))
            .collect();
        forward.push(words(&format!("-o {}+ -j REJECT", self.bridges)));
        vec![
            Chain {
                family: Family::V4,
                parent: "INPUT".into(),
                name: format!("BERTH-IN-{}", self.tag()),
                rules: input,
            },
            Chain {
                family: Family::V6,
                parent: "INPUT".into(),
                name: format!("BERTH-IN-{}", self.tag()),
                rules: input6,
            },
            Chain {
                family: Family::V4,
                parent: Self::forward_parent().await.into(),
                name: format!("BERTH-FWD-{}", self.tag()),
                rules: forward,
            },
        ]
    }

    /// Whether `chain` holds exactly its rules (each present, no others) and is jumped to.
    async fn in_place(&self, chain: &Chain) -> Result<(), String> {
        let listed = iptables(chain.family, &[String::from("-S"), chain.name.clone()])
            .await
            .map_err(|e| {
                if e.0.starts_with("cannot run") || e.0.contains("did not finish") {
                    e.0
                } else {
                    format!(
                        "chain {} is missing (the daemon installs it when it starts)",
                        chain.name
                    )
                }
            })?;
        for rule in &chain.rules {
            let mut check = vec!["-C".to_owned(), chain.name.clone()];
            check.extend(rule.iter().cloned());
            if iptables(chain.family, &check).await.is_err() {
                return Err(format!("{} lacks `{}`", chain.name, rule.join(" ")));
            }
        }
        if listed.lines().count() != chain.rules.len() + 1 {
            return Err(format!(
                "{} holds rules Berth did not put there",
                chain.name
            ));
        }
        let mut check = vec!["-C".to_owned(), chain.parent.clone()];
        check.extend(self.jump(&chain.name));
        if iptables(chain.family, &check).await.is_err() {
            return Err(format!("{} does not jump to {}", chain.parent, chain.name));
        }
        Ok(())
    }

    /// Makes the chains what the config says. IPv6 is best effort (Berth's networks have no
    /// IPv6; see `docs/design.md`): its failure is warned about and reported, not an error.
    pub async fn ensure(&self) -> Result<Ensured, FirewallError> {
        let mut done = Ensured {
            changed: false,
            complete: true,
        };
        if !self.enabled {
            done.changed = self.remove().await? > 0;
            return Ok(done);
        }
        for chain in self.chains().await {
            let r = self.ensure_chain(&chain).await;
            match (r, chain.family) {
                (Ok(c), _) => done.changed |= c,
                (Err(e), Family::V6) => {
                    tracing::warn!(error = %e, "IPv6 firewall rules not installed");
                    done.complete = false;
                }
                (Err(e), Family::V4) => return Err(e),
            }
        }
        Ok(done)
    }

    async fn ensure_chain(&self, chain: &Chain) -> Result<bool, FirewallError> {
        if self.in_place(chain).await.is_ok() {
            return Ok(false);
        }
        let f = chain.family;
        let name = chain.name.clone();
        if iptables(f, &["-S".into(), name.clone()]).await.is_err() {
            iptables(f, &["-N".into(), name.clone()]).await?;
        }
        iptables(f, &["-F".into(), name.clone()]).await?;
        for rule in &chain.rules {
            let mut add = vec!["-A".to_owned(), name.clone()];
            add.extend(rule.iter().cloned());
            iptables(f, &add).await?;
        }
        let mut check = vec!["-C".to_owned(), chain.parent.clone()];
        check.extend(self.jump(&name));
        if iptables(f, &check).await.is_err() {
            let mut insert = vec!["-I".to_owned(), chain.parent.clone(), "1".to_owned()];
            insert.extend(self.jump(&name));
            iptables(f, &insert).await?;
        }
        Ok(true)
    }

    /// Removes this daemon's chains and the jumps to them, wherever they are; what is not
    /// there is not an error. Returns how many chains were removed.
    pub async fn remove(&self) -> Result<usize, FirewallError> {
        let mut removed = 0;
        let chains = [
            (Family::V4, format!("BERTH-IN-{}", self.tag()), "INPUT"),
            (Family::V6, format!("BERTH-IN-{}", self.tag()), "INPUT"),
            (
                Family::V4,
                format!("BERTH-FWD-{}", self.tag()),
                "DOCKER-USER",
            ),
            (Family::V4, format!("BERTH-FWD-{}", self.tag()), "FORWARD"),
        ];
        for (f, name, parent) in chains {
            let mut delete = vec!["-D".to_owned(), parent.to_owned()];
            delete.extend(self.jump(&name));
            // Each run deletes one copy; a handful were never put there by Berth.
            for _ in 0..8 {
                if iptables(f, &delete).await.is_err() {
                    break;
                }
            }
            if iptables(f, &["-S".into(), name.clone()]).await.is_err() {
                continue;
            }
            iptables(f, &["-F".into(), name.clone()]).await?;
            // Still jumped to from the other parent: removed on its round.
            if iptables(f, &["-X".into(), name.clone()]).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Puts the rules back, every `every`, until `shutdown`, when something else changed
    /// them. While the tables fingerprint as they did around the last check that found every
    /// rule in place ([`Watch`]), that is all a round costs: two `iptables` runs instead of
    /// the rule-by-rule check's 13 (with the default settings), each reading the host's
    /// whole ruleset.
    pub async fn keep(self: std::sync::Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        let mut watch = Watch::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let before = self.fingerprint().await;
            if !watch.must_check(before) {
                continue;
            }
            match self.ensure().await {
                Ok(done) => {
                    if done.changed {
                        tracing::warn!(
                            "the host firewall's rules for the containers had changed; put back"
                        );
                    }
                    let after = if done.whole() {
                        self.fingerprint().await
                    } else {
                        None
                    };
                    watch.checked(before, after, done.whole());
                }
                Err(e) => {
                    watch.checked(before, None, false);
                    tracing::error!(error = %e, "cannot put back the host firewall's rules");
                }
            }
        }
    }

    /// A fingerprint of both families' filter tables as `iptables -S` prints them (two runs,
    /// however many rules Berth's chains hold); `None` when IPv4's cannot be listed.
    async fn fingerprint(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let v4 = iptables(Family::V4, &words("-S")).await.ok()?;
        // No IPv6 tables is a state like another (its rules are best effort).
        let v6 = iptables(Family::V6, &words("-S"))
            .await
            .unwrap_or_else(|e| e.0);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (v4, v6).hash(&mut h);
        Some(h.finish())
    }

    /// One line for `berth status` and `--check`: whether the isolation is in force.
    pub async fn state(&self) -> String {
        if !self.enabled {
            return "NOT in force: [isolation] firewall = false (containers reach the host)".into();
        }
        for chain in self.chains().await {
            if let Err(e) = self.in_place(&chain).await {
                if matches!(chain.family, Family::V6) {
                    continue;
                }
                return format!("NOT in force: {e}");
            }
        }
        let mut line = format!("in force on bridges {}+", self.bridges);
        if self.host_access {
            line.push_str("; host open to containers ([isolation] host_access = true)");
        } else if self.allow.is_empty() {
            line.push_str("; host closed");
        } else {
            let allow: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
            line.push_str(&format!("; host closed but {}", allow.join(", ")));
        }
        let deny: Vec<String> = std::iter::once(LINK_LOCAL.to_owned())
            .chain(self.deny.iter().map(ToString::to_string))
            .collect();
        line.push_str(&format!("; denied {}", deny.join(", ")));
        line
    }
}

/// What [`Rules::ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ensured {
    /// Something had to be put back (or, with the firewall off, removed).
    pub changed: bool,
    /// Every chain holds its rules (false: IPv6's could not be installed).
    pub complete: bool,
}

impl Ensured {
    /// Every rule was found in place, none had to be put back.
    pub fn whole(self) -> bool {
        self.complete && !self.changed
    }
}

/// What the periodic check ([`Rules::keep`]) remembers: the tables' fingerprint around the
/// last check that found every rule in place. While the tables list the same, nothing
/// (Berth's rules included) has changed since, and the rule-by-rule check is skipped.
#[derive(Debug, Default)]
struct Watch {
    whole: Option<u64>,
}

impl Watch {
    /// Whether the rules must be checked one by one, the tables fingerprinted as `now`.
    fn must_check(&self, now: Option<u64>) -> bool {
        now.is_none() || now != self.whole
    }

    /// What a check found (`whole`: every rule in place, none put back), the tables
    /// fingerprinted just `before` it began and just `after` it ended. Remembered only when
    /// both agree: a change made during the check, even one that put Berth's rules back
    /// before the check looked, then makes the next check go rule by rule again.
    fn checked(&mut self, before: Option<u64>, after: Option<u64>, whole: bool) {
        self.whole = if whole && before == after {
            before
        } else {
            None
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_are_checked_again_only_once_the_tables_changed() {
        let mut w = Watch::default();
        assert!(w.must_check(Some(1)), "never checked yet");
        w.checked(Some(1), Some(1), true);
        assert!(
            !w.must_check(Some(1)),
            "nothing changed since a check found them whole"
        );
        assert!(w.must_check(Some(2)), "the tables changed");
        assert!(w.must_check(None), "the tables could not be listed");
        // A check that had to put rules back (or could not put IPv6's): the tables are
        // checked again next time, even if they list as before it.
        w.checked(Some(2), Some(2), false);
        assert!(w.must_check(Some(2)));
        assert!(w.must_check(Some(3)));
        // The tables changed while the check ran (someone put the rules back just before
        // it looked): what they listed before it is not known to be whole.
        w.checked(Some(4), Some(5), true);
        assert!(w.must_check(Some(4)));
        assert!(w.must_check(Some(5)));
        // A check of tables that could not be listed remembers nothing.
        w.checked(None, None, true);
        assert!(w.must_check(None));
        assert!(w.must_check(Some(3)));
    }

    #[test]
    fn allow_entries_parse_and_print_back() {
        for ok in ["tcp:5432", "udp:53", "tcp:8000-8010", "tcp:10.0.0.5:22"] {
            assert_eq!(ok.parse::<Allow>().unwrap().to_string(), ok);
        }
        for bad in [
            "5432",
            "icmp:1",
            "tcp:",
            "tcp:0",
            "tcp:70000",
            "tcp:10-5",
            "tcp:host:22",
            "tcp:1.2.3.4:5:6",
            "tcp:-j ACCEPT",
        ] {
            assert!(bad.parse::<Allow>().is_err(), "{bad}");
        }
    }
}
