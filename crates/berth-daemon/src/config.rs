//! The daemon's configuration: one typed tree, defaults in one place ([`Config::default`]),
//! unknown keys refused with their name. Read from TOML (`/etc/berth/berth.toml` when
//! present), then overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/berth.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("invalid config {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the SSH gateway listens on.
    pub listen: SocketAddr,
    /// Database, host key, admin socket and guest files live here.
    pub state_dir: PathBuf,
    /// The Docker engine's socket.
    pub docker_socket: PathBuf,
    /// Seconds a container keeps running after its last session closes.
    pub idle_stop_seconds: u64,
    /// Seconds `docker stop` waits before killing a container.
    pub stop_timeout_seconds: u32,
    /// Container names are this prefix followed by the user name.
    pub container_prefix: String,
    /// `commit` saves a user's container as the image `REPOSITORY:USER`.
    pub commit_repository: String,
    /// The Docker network users' containers join (created with inter-container traffic off).
    pub network: String,
    /// The static `berth-guest` helper; default: `berth-guest` next to the `berth` binary.
    pub guest_binary: Option<PathBuf>,
    /// Server-wide forwarding switches; each user may be set apart (`berth user set`).
    pub allow_tcp_forwarding: bool,
    pub allow_agent_forwarding: bool,
    pub allow_x11_forwarding: bool,
    /// Client environment variables accepted into sessions (`NAME` or `PREFIX*`).
    pub accept_env: Vec<String>,
    /// CA public keys whose user certificates log in (OpenSSH's TrustedUserCAKeys).
    pub trusted_user_ca_keys: Option<PathBuf>,
    /// Keys and certificates refused whatever else says (OpenSSH's RevokedKeys): public
    /// keys, one per line, or a KRL made by `ssh-keygen -k`.
    pub revoked_keys: Option<PathBuf>,
    /// Key exchange algorithms offered, most preferred first (OpenSSH's KexAlgorithms).
    pub kex_algorithms: Vec<String>,
    /// Ciphers offered (OpenSSH's Ciphers).
    pub ciphers: Vec<String>,
    /// MACs offered with the non-AEAD ciphers (OpenSSH's MACs).
    pub macs: Vec<String>,
    pub keepalive_interval_seconds: u64,
    pub keepalive_max: usize,
    /// Authenticated SSH connections open at once, all users together.
    pub max_connections: usize,
    /// Unauthenticated connections: past START, new ones are dropped with a probability
    /// rising from RATE % to 100 % at FULL (OpenSSH's MaxStartups), as "START:RATE:FULL".
    pub max_startups: String,
    /// Unauthenticated connections one source (an IPv4 address or an IPv6 /64) may hold.
    pub per_source_max_startups: usize,
    /// Addresses or ranges never penalised for failed logins (their connections still count
    /// as startups), like OpenSSH's PerSourcePenaltyExemptList.
    pub penalty_exempt: Vec<String>,
    /// Seconds a client has to authenticate.
    pub login_grace_seconds: u64,
    /// Sessions one SSH connection may have open at once.
    pub max_sessions: usize,
    /// Connections from one address that may fail to log in per minute before further
    /// connections from it are closed at once; 0 = no limit.
    pub max_auth_failures_per_minute: usize,
    /// The audit log (`STATE/audit.log`, one JSON line per event) is rotated past this many
    /// MiB; one older file (`audit.log.1`) is kept.
    pub audit_max_mb: u64,
    /// Serve Prometheus metrics at `http://ADDRESS/metrics`; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Memory per container in MiB (swap included); 0 = no limit.
    pub memory_mb: u64,
    /// CPUs per container (e.g. 1.5); 0 = no limit.
    pub cpus: f64,
    /// Processes per container.
    pub pids: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 2222)),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            docker_socket: PathBuf::from("/var/run/docker.sock"),
            idle_stop_seconds: 10,
            stop_timeout_seconds: 10,
            container_prefix: "berth-".into(),
            commit_repository: "berth/users".into(),
            network: "berth".into(),
            guest_binary: None,
            allow_tcp_forwarding: true,
            allow_agent_forwarding: true,
            allow_x11_forwarding: true,
            accept_env: vec!["LANG".into(), "LC_*".into()],
            trusted_user_ca_keys: None,
            revoked_keys: None,
            kex_algorithms: owned(berth_ssh::algorithms::DEFAULT_KEX),
            ciphers: owned(berth_ssh::algorithms::DEFAULT_CIPHERS),
            macs: owned(berth_ssh::algorithms::DEFAULT_MACS),
            keepalive_interval_seconds: 15,
            keepalive_max: 4,
            max_connections: 1000,
            max_startups: "10:30:100".into(),
            per_source_max_startups: 10,
            penalty_exempt: Vec::new(),
            login_grace_seconds: 30,
            max_sessions: 10,
            max_auth_failures_per_minute: 30,
            audit_max_mb: 64,
            metrics_listen: None,
            limits: LimitsConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            memory_mb: 2048,
            cpus: 1.0,
            pids: 1024,
        }
    }
}

impl Config {
    /// Reads `path`; a missing default path means "all defaults", a missing explicit path
    /// is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(e) => {
                return Err(ConfigError::Read {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        Self::parse(&text).map_err(|reason| ConfigError::Parse { path, reason })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| {
            // Name the line: serde's message alone does not say which key a bad value is for.
            match e.span().and_then(|span| {
                let line_no = text.get(..span.start)?.matches('\n').count() + 1;
                let line = text.lines().nth(line_no - 1)?.trim();
                Some((line_no, line))
            }) {
                Some((n, line)) => format!("line {n} (`{line}`): {}", e.message()),
                None => e.message().to_owned(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The `berth-guest` helper the daemon installs: `guest_binary`, or the file next to
    /// the running `berth` binary.
    pub fn guest_source(&self) -> std::io::Result<PathBuf> {
        if let Some(p) = &self.guest_binary {
            return Ok(p.clone());
        }
        let exe = std::env::current_exe()?;
        Ok(exe
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .join("berth-guest"))
    }

    /// The algorithm lists, checked against what the SSH crate implements.
    pub fn algorithms(&self) -> Result<berth_ssh::Algorithms, String> {
        berth_ssh::Algorithms::parse(&self.kex_algorithms, &self.ciphers, &self.macs)
    }

    /// The door's admission settings, checked.
    pub fn door(&self) -> Result<berth_ssh::DoorConfig, String> {
        let startups = self
            .max_startups
            .parse::<berth_ssh::Startups>()
            .map_err(|e| format!("max_startups: {e}"))?;
        if self.per_source_max_startups == 0 {
            return Err("per_source_max_startups must be at least 1".into());
        }
        let exempt = self
            .penalty_exempt
            .iter()
            .map(|n| n.parse().map_err(|e| format!("penalty_exempt: {e}")))
            .collect::<Result<_, String>>()?;
        Ok(berth_ssh::DoorConfig {
            startups,
            per_source: self.per_source_max_startups,
            failures_per_minute: self.max_auth_failures_per_minute,
            exempt,
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        self.algorithms()?;
        self.door()?;
        if self.keepalive_interval_seconds == 0 || self.keepalive_max == 0 {
            return Err("keepalive_interval_seconds and keepalive_max must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_sessions == 0 || self.login_grace_seconds == 0 {
            return Err(
                "max_connections, max_sessions and login_grace_seconds must be at least 1".into(),
            );
        }
        if self.audit_max_mb == 0 {
            return Err("audit_max_mb must be at least 1".into());
        }
        if !(0.0..=1024.0).contains(&self.limits.cpus) || self.limits.cpus.is_nan() {
            return Err(format!(
                "limits.cpus = {} is out of range",
                self.limits.cpus
            ));
        }
        if self.limits.pids < 16 {
            return Err(format!(
                "limits.pids = {} is too low (at least 16)",
                self.limits.pids
            ));
        }
        let prefix_ok = !self.container_prefix.is_empty()
            && self.container_prefix.len() <= 32
            && self
                .container_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && self
                .container_prefix
                .starts_with(|c: char| c.is_ascii_alphanumeric());
        if !prefix_ok {
            return Err(format!(
                "container_prefix {:?} is not a valid container name start",
                self.container_prefix
            ));
        }
        if !valid_repository(&self.commit_repository) {
            return Err(format!(
                "commit_repository {:?} is not a valid image repository",
                self.commit_repository
            ));
        }
        Ok(())
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join(berth_proto::ADMIN_SOCKET)
    }

    /// The effective settings as TOML, for `berth daemon --check`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Docker's grammar for a repository: `/`-separated components of lower-case letters and
/// digits, joined inside a component by one `.`, one or two `_`, or any number of `-`.
fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 200
        && repo.split('/').all(|part| {
            let bytes = part.as_bytes();
            let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
                return false;
            }
            part.split(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                .filter(|sep| !sep.is_empty())
                .all(|sep| sep == "." || sep == "_" || sep == "__" || sep.chars().all(|c| c == '-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("idle_stop_secs = 3\n").unwrap_err();
        assert!(err.contains("idle_stop_secs"), "{err}");
        let err = Config::parse("[limits]\nmemory = 3\n").unwrap_err();
        assert!(err.contains("memory"), "{err}");
    }

    #[test]
    fn bad_values_refused() {
        assert!(Config::parse("listen = \"nope\"\n").is_err());
        assert!(Config::parse("[limits]\npids = 1\n").is_err());
        assert!(Config::parse("container_prefix = \"a b\"\n").is_err());
        let err = Config::parse("max_startups = \"30:10\"\n").unwrap_err();
        assert!(err.contains("max_startups"), "{err}");
        let err = Config::parse("penalty_exempt = [\"10.0.0.0/40\"]\n").unwrap_err();
        assert!(err.contains("penalty_exempt"), "{err}");
        Config::parse("penalty_exempt = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n").unwrap();
        let err = Config::parse("kex_algorithms = [\"diffie-hellman-group99\"]\n").unwrap_err();
        assert!(
            err.contains("kex_algorithms: \"diffie-hellman-group99\""),
            "{err}"
        );
        let c = Config::parse("idle_stop_seconds = 3\n[limits]\ncpus = 0.5\n").unwrap();
        assert_eq!(c.idle_stop_seconds, 3);
        assert_eq!(c.limits.cpus, 0.5);
    }

    #[test]
    fn repositories() {
        for good in ["berth", "berth/users", "a.b/c-d/e__f", "x--y"] {
            assert!(valid_repository(good), "{good}");
        }
        for bad in [
            "", "Berth", "berth/", "/x", "a_-b", "a..b", "_a", "a:b", "a@b", "a b",
        ] {
            assert!(!valid_repository(bad), "{bad}");
        }
    }

    #[test]
    fn round_trips() {
        let c = Config::default();
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }
}
