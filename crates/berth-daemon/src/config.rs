//! The daemon's configuration: one typed tree, defaults in one place ([`Config::default`]),
//! unknown keys refused with their name. Read from TOML (`/etc/berth/berth.toml` when
//! present), then overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/berth.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";

/// Every entry Berth makes in the state directory: the daemon's (the database and its
/// journal files, the instance id, the audit log and its older file, the host key, the admin
/// socket, the lock, the guest helper's directory, the containers' run directories) and
/// install.sh's (a background daemon's pid file and log). `berth purge` removes these and
/// nothing else, so a `state_dir` pointed at the wrong place never costs anybody's files.
pub const STATE_ENTRIES: &[&str] = &[
    "berth.db",
    "berth.db-wal",
    "berth.db-shm",
    "berth.db-journal",
    "instance",
    "audit.log",
    "audit.log.1",
    "audit.log.2",
    "audit.log.3",
    "audit.log.4",
    "host_ed25519_key",
    "host_ed25519_key.pub",
    "admin.sock",
    "daemon.lock",
    "berth.pid",
    "berth.log",
    "guest",
    "run",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("invalid config {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The daemon's settings. What each one means, as an admin reads it, is written once: in
/// [`SETTINGS`], from which `berth config default` prints the commented default config (a
/// test fails for a field it does not document).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub docker_socket: PathBuf,
    pub idle_stop_seconds: u64,
    pub stop_timeout_seconds: u32,
    pub container_prefix: String,
    pub commit_repository: String,
    /// Each user's home is a Docker volume of her own (issue 16).
    pub home_volume: bool,
    pub network: String,
    /// Unset: `berth-guest` next to the running `berth` binary ([`Config::guest_source`]).
    pub guest_binary: Option<PathBuf>,
    pub allow_tcp_forwarding: bool,
    pub allow_agent_forwarding: bool,
    pub allow_x11_forwarding: bool,
    pub accept_env: Vec<String>,
    pub trusted_user_ca_keys: Option<PathBuf>,
    pub revoked_keys: Option<PathBuf>,
    pub kex_algorithms: Vec<String>,
    pub ciphers: Vec<String>,
    pub macs: Vec<String>,
    pub keepalive_interval_seconds: u64,
    pub keepalive_max: usize,
    pub max_connections: usize,
    /// "START:RATE:FULL", parsed by [`Config::door`].
    pub max_startups: String,
    pub per_source_max_startups: usize,
    pub penalty_exempt: Vec<String>,
    pub login_grace_seconds: u64,
    pub max_sessions: usize,
    pub input_buffer_mb: u64,
    pub max_auth_failures_per_minute: usize,
    pub audit_max_mb: u64,
    pub audit_user_budget: u64,
    pub metrics_listen: Option<SocketAddr>,
    pub limits: LimitsConfig,
    pub isolation: IsolationConfig,
    /// Server-wide shared folders (`[[mounts]]`), in every user's new containers.
    pub mounts: Vec<MountConfig>,
}

/// One `[[mounts]]` entry: host `source` bind-mounted at `target` in every user's new
/// container. The source's rules (no system tree, no Docker data, ...) are checked at start
/// ([`crate::mounts::SourceRules`]); the target's when the config is read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    pub source: PathBuf,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// The `[isolation]` table (see [`SETTINGS`]): each user's own network, and what the host
/// firewall lets containers reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IsolationConfig {
    pub pool: String,
    pub subnet_prefix: u8,
    pub firewall: bool,
    pub host_access: bool,
    /// `PROTO:[ADDRESS:]PORT[-PORT]`, parsed by [`crate::firewall::Allow`].
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        Self {
            pool: "10.213.0.0/16".into(),
            subnet_prefix: 28,
            firewall: true,
            host_access: false,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// The `[limits]` table (see [`SETTINGS`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: u32,
    pub log_mb: u64,
    pub connections: usize,
    pub sessions: usize,
    pub forwards: usize,
    pub input_buffer_mb: u64,
    pub disk_gb: f64,
    /// `none`, `all` or device ids, parsed by [`berth_proto::settings::Gpus`].
    pub gpus: String,
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
            home_volume: true,
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
            input_buffer_mb: 512,
            max_auth_failures_per_minute: 30,
            audit_max_mb: 64,
            audit_user_budget: 600,
            metrics_listen: None,
            limits: LimitsConfig::default(),
            isolation: IsolationConfig::default(),
            mounts: Vec::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            memory_mb: 2048,
            cpus: 1.0,
            pids: 1024,
            log_mb: 10,
            connections: 32,
            sessions: 64,
            forwards: 256,
            input_buffer_mb: 64,
            disk_gb: 0.0,
            gpus: "none".into(),
        }
    }
}

/// How the commented default config documents one setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// `key`, or `table.key` for a key of a table (`limits.pids`).
    pub key: &'static str,
    /// What it does, one comment line per line.
    pub help: &'static str,
    /// The value shown for a setting that is unset by default; a setting with a default
    /// shows that.
    pub example: Option<&'static str>,
}

const fn setting(key: &'static str, help: &'static str) -> Setting {
    Setting {
        key,
        help,
        example: None,
    }
}

const fn unset(key: &'static str, help: &'static str, example: &'static str) -> Setting {
    Setting {
        key,
        help,
        example: Some(example),
    }
}

/// The opening comment of the commented default config.
const HEADER: &str = "\
Berth daemon configuration (read by `berth daemon`; default path /etc/berth/berth.toml).
Every setting is shown commented out with its default value: uncomment a line to change it.
`berth daemon --check --config FILE` validates the file and prints the effective settings;
an unknown key is an error naming it. Restart the daemon after a change
(`systemctl restart berth`).";

/// The tables, each with the comment above its header line.
const TABLES: &[(&str, &str)] = &[
    (
        "limits",
        "Limits for each user: her container, and what she may hold open in the daemon. Keep the
[limits] line; uncomment keys below it.",
    ),
    (
        "isolation",
        "What a container can reach. Each user's container is alone on a bridge network of its own
(NETWORK-USER), so it cannot reach other users' containers nor resolve their names; the host
firewall (iptables, managed by the daemon) keeps it from every address of the host and from
link-local addresses (cloud metadata). Keep the [isolation] line; uncomment keys below it.",
    ),
];

/// Every setting, in the order of the commented default config, with what an admin reads
/// about it. The values are not here: they are [`Config::default`]'s.
pub const SETTINGS: &[Setting] = &[
    setting(
        "listen",
        "Address and port the SSH gateway listens on (users run `ssh -p PORT user@host`).",
    ),
    setting(
        "state_dir",
        "Database, host key (0600), admin socket and the guest helper's files live here.",
    ),
    setting("docker_socket", "The Docker engine's socket."),
    setting(
        "idle_stop_seconds",
        "Seconds a container keeps running after its last session closes; a login cancels the stop.",
    ),
    setting(
        "stop_timeout_seconds",
        "Seconds `docker stop` waits after SIGTERM before it kills a container.",
    ),
    setting(
        "container_prefix",
        "Container names are this prefix followed by the user name.",
    ),
    setting(
        "commit_repository",
        "`commit` saves a user's container as the image REPOSITORY:USER.",
    ),
    setting(
        "home_volume",
        "Each user's home (root's home in her image, usually /root) is a Docker volume of her own,\nPREFIXhome-USER: it starts with the image's files there and outlives her container (`remove`,\na new image, a daemon restart; `berth user rm` keeps it unless --purge-data). `commit` saves\nthe container without it. false: the home lives in the container, as everything else.",
    ),
    setting(
        "network",
        "Name of Berth's Docker networks: each user's container joins NETWORK-USER, a bridge of its own.",
    ),
    unset(
        "guest_binary",
        "The static berth-guest helper; by default the berth-guest next to the berth binary, else\n../libexec/berth/berth-guest from it (/usr/libexec/berth/berth-guest for the package).",
        "\"/usr/local/bin/berth-guest\"",
    ),
    setting(
        "allow_tcp_forwarding",
        "Allow ssh -L and -R (server-wide; `berth user set NAME --tcp-forwarding` sets one user apart).",
    ),
    setting(
        "allow_agent_forwarding",
        "Allow ssh -A agent forwarding (server-wide; `berth user set` sets one user apart).",
    ),
    setting(
        "allow_x11_forwarding",
        "Allow ssh -X, which needs xauth in the image (server-wide; `berth user set` sets one user apart).",
    ),
    setting(
        "accept_env",
        "Client environment variables passed into sessions (NAME or PREFIX*), like sshd's AcceptEnv.",
    ),
    unset(
        "trusted_user_ca_keys",
        "CA public keys (one per line) whose user certificates log in as the Berth user their
principals name, if that user exists (OpenSSH's TrustedUserCAKeys); off when unset.",
        "\"/etc/berth/user_ca.pub\"",
    ),
    unset(
        "revoked_keys",
        "Keys and certificates refused whatever else says (OpenSSH's RevokedKeys): public keys, one
per line, or a KRL made by `ssh-keygen -k`. Read again whenever it changes; off when unset.",
        "\"/etc/berth/revoked_keys\"",
    ),
    setting(
        "kex_algorithms",
        "Key exchange algorithms offered, most preferred first (OpenSSH's KexAlgorithms). The default
has no finite-field Diffie-Hellman: add e.g. \"diffie-hellman-group14-sha256\" only for a client
that has nothing else. `berth daemon --check` refuses a name Berth does not implement and lists those it does.",
    ),
    setting("ciphers", "Ciphers offered (OpenSSH's Ciphers): AEAD, then CTR."),
    setting(
        "macs",
        "MACs offered with the CTR ciphers (OpenSSH's MACs): encrypt-then-MAC SHA-2 only.",
    ),
    setting(
        "keepalive_interval_seconds",
        "Seconds between keepalive probes to a client that is silent.",
    ),
    setting(
        "keepalive_max",
        "A client that misses this many keepalive probes in a row is gone; its programs are killed.",
    ),
    setting(
        "max_connections",
        "Authenticated SSH connections open at once, all users together (unauthenticated ones are
limited apart, below, so a flood of them never keeps out a user who has a key).",
    ),
    setting(
        "max_startups",
        "Unauthenticated connections, as START:RATE:FULL: past START, new ones are dropped with a
probability rising from RATE % to 100 % at FULL (OpenSSH's MaxStartups).",
    ),
    setting(
        "per_source_max_startups",
        "Unauthenticated connections one source (an IPv4 address, or an IPv6 /64) may hold.",
    ),
    setting(
        "login_grace_seconds",
        "Seconds a client has to authenticate before its connection is closed.",
    ),
    setting(
        "max_sessions",
        "Sessions one SSH connection may have open at once (OpenSSH's MaxSessions).",
    ),
    setting(
        "input_buffer_mb",
        "Client input (stdin, tunnel bytes) the daemon may hold for all channels together, in MiB.
A channel's window grows from 64 KiB to 2 MiB while this and its user's limits.input_buffer_mb
allow; past them channels keep working with the small window (slower, never refused).",
    ),
    setting(
        "max_auth_failures_per_minute",
        "Failures per minute from one source (connections that end without logging in, or that ask for
more than per_source_max_startups) before its connections are closed at once; 0 = no limit.",
    ),
    setting(
        "penalty_exempt",
        "Addresses or ranges never penalised for failures, e.g. [\"10.0.0.0/8\", \"2001:db8::/32\"]
(OpenSSH's PerSourcePenaltyExemptList); their connections still count as startups.",
    ),
    setting(
        "audit_max_mb",
        "The audit log (STATE/audit.log, one JSON line per event) is rotated past this many MiB; one older file is kept.",
    ),
    setting(
        "audit_user_budget",
        "Audit records one user's own doing may write per minute (logins, sessions, host words,
forwardings); past it they are counted (audit_suppressed). Admin changes are never suppressed.",
    ),
    setting(
        "mounts",
        "Shared folders in every user's new container, one [[mounts]] table each (after all other
settings), e.g.
  [[mounts]]
  source = \"/srv/datasets\"
  target = \"/datasets\"
  read_only = true
read_only is false unless set. `berth user set NAME --mount SOURCE:TARGET[:ro]` adds one user's
own. A source may not be /, a system tree (/etc, /usr, /bin, /sbin, /lib*, /boot, /root, /proc,
/sys, /dev, /run), the whole of /home or /tmp, the Docker socket or data root, Berth's
state_dir, nor hold one of them; symlinks are resolved first. A bad entry stops the daemon.",
    ),
    unset(
        "metrics_listen",
        "Serve Prometheus metrics at http://ADDRESS/metrics; off when unset (example below).",
        "\"127.0.0.1:9100\"",
    ),
    setting(
        "limits.memory_mb",
        "Memory per container in MiB, swap included; 0 = no limit.",
    ),
    setting("limits.cpus", "CPUs per container (e.g. 1.5); 0 = no limit."),
    setting("limits.pids", "Processes per container (at least 16)."),
    setting(
        "limits.log_mb",
        "What a container writes to its console is kept by Docker up to this many MiB (two files\n\
of half of it, the older one dropped); 0 = nothing is kept (Docker's `none` log driver).",
    ),
    setting(
        "limits.disk_gb",
        "Disk per container in GiB (e.g. 0.5): what a user writes beyond her image fails with\n\
\"no space left on device\". Needs a storage driver with quotas (overlay2 on xfs mounted with\n\
pquota; btrfs, zfs, devicemapper); elsewhere containers are made without it and `berth status`\n\
says why. 0 = no limit. Each user's use is reported either way (`berth user list`).",
    ),
    setting(
        "limits.gpus",
        "GPUs each container gets through the NVIDIA container runtime: \"none\", \"all\", or device
indices or UUIDs as nvidia-smi -L lists them, e.g. \"0,2\" (`berth user set NAME --gpus` sets one
user apart). The engine needs the runtime (`docker info` lists a runtime named nvidia: install
nvidia-container-toolkit, then `nvidia-ctk runtime configure --runtime=docker`); without it
`berth status` says GPUs are not available and a user with GPUs is told so at login.",
    ),
    setting(
        "limits.connections",
        "Authenticated SSH connections one user may have open at once; past it a login is told
\"too many connections\" and closed.",
    ),
    setting(
        "limits.sessions",
        "Sessions (shells, commands, sftp) one user may have open at once, all connections together.",
    ),
    setting(
        "limits.forwards",
        "Forwarded connections one user may have open at once: -L/-D tunnels and connections to her
-R ports and sockets, agent socket and X11 displays.",
    ),
    setting(
        "limits.input_buffer_mb",
        "Client input the daemon may hold for one user's channels, in MiB (see input_buffer_mb).",
    ),
    setting(
        "isolation.pool",
        "IPv4 range the users' networks take their subnets from (one block each, the lowest free one);
it must not overlap any network the host reaches.",
    ),
    setting(
        "isolation.subnet_prefix",
        "Prefix length of each user's subnet (28: 16 addresses, 4096 users in a /16).",
    ),
    setting(
        "isolation.firewall",
        "Install the host firewall rules at start (iptables chains BERTH-IN-* and BERTH-FWD-*); false
leaves the host open to the containers (`berth status` says so). `berth purge` removes them.",
    ),
    setting(
        "isolation.host_access",
        "Let containers reach every service of the host (all its addresses, not only loopback).",
    ),
    setting(
        "isolation.allow",
        "Host services containers may reach, as \"PROTO:PORT\", \"PROTO:PORT-PORT\" or
\"PROTO:ADDRESS:PORT\" (PROTO tcp or udp), e.g. [\"tcp:5432\", \"udp:10.0.0.1:53\"].",
    ),
    setting(
        "isolation.deny",
        "Further IPv4 ranges containers must not reach, e.g. [\"10.0.0.0/8\"] for the LAN
(169.254.0.0/16, where cloud metadata lives, is always denied).",
    ),
];

/// The longest time a `*_seconds` key may give: a year.
const MAX_SECONDS: u64 = 365 * 24 * 60 * 60;

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
        // Times are added to the clock's now: a "never" such as i64::MAX seconds would
        // overflow it (and panic the task that adds it). A year is as long as any needs.
        for (key, value) in [
            ("idle_stop_seconds", self.idle_stop_seconds),
            ("stop_timeout_seconds", u64::from(self.stop_timeout_seconds)),
            (
                "keepalive_interval_seconds",
                self.keepalive_interval_seconds,
            ),
            ("login_grace_seconds", self.login_grace_seconds),
        ] {
            if value > MAX_SECONDS {
                return Err(format!(
                    "{key} = {value} is out of range (at most {MAX_SECONDS}, a year)"
                ));
            }
        }
        if self.audit_max_mb == 0 {
            return Err("audit_max_mb must be at least 1".into());
        }
        if self.audit_user_budget < 10 {
            return Err("audit_user_budget must be at least 10".into());
        }
        if !(0.0..=1024.0).contains(&self.limits.cpus) || self.limits.cpus.is_nan() {
            return Err(format!(
                "limits.cpus = {} is out of range",
                self.limits.cpus
            ));
        }
        if self.limits.connections == 0 || self.limits.sessions == 0 || self.limits.forwards == 0 {
            return Err(
                "limits.connections, limits.sessions and limits.forwards must be at least 1".into(),
            );
        }
        if !(0.0..=1_000_000.0).contains(&self.limits.disk_gb) || self.limits.disk_gb.is_nan() {
            return Err(format!(
                "limits.disk_gb = {} is out of range",
                self.limits.disk_gb
            ));
        }
        berth_proto::settings::Gpus::parse(&self.limits.gpus).map_err(|e| format!("limits.{e}"))?;
        self.check_mounts()?;
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
        self.network_settings()?;
        self.firewall_rules()?;
        if !valid_repository(&self.commit_repository) {
            return Err(format!(
                "commit_repository {:?} is not a valid image repository",
                self.commit_repository
            ));
        }
        Ok(())
    }

    /// The `[[mounts]]` entries' shape: an absolute source, a target a user's could be
    /// (`berth_connect::target::check`), no target twice. Their sources are checked against
    /// the host at start ([`crate::mounts::SourceRules`]).
    fn check_mounts(&self) -> Result<(), String> {
        if self.mounts.len() > crate::mounts::MAX_SERVER_MOUNTS {
            return Err(format!(
                "[[mounts]]: {} entries, at most {} are allowed",
                self.mounts.len(),
                crate::mounts::MAX_SERVER_MOUNTS
            ));
        }
        let mut targets = std::collections::HashSet::new();
        for (i, m) in self.mounts.iter().enumerate() {
            let entry = crate::mounts::entry_name(i, m);
            if !m.source.is_absolute() {
                return Err(format!("{entry}: the source must be an absolute path"));
            }
            let target =
                crate::mounts::check_target(&m.target).map_err(|e| format!("{entry}: {e}"))?;
            if !targets.insert(target) {
                return Err(format!("{entry}: another entry has the same target"));
            }
        }
        Ok(())
    }

    /// The network name and its users' address pool, checked.
    pub fn network_settings(&self) -> Result<crate::lifecycle::NetworkSettings, String> {
        let name_ok = !self.network.is_empty()
            && self.network.len() <= 40
            && self
                .network
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && self
                .network
                .starts_with(|c: char| c.is_ascii_alphanumeric());
        if !name_ok {
            return Err(format!(
                "network {:?} is not a valid network name",
                self.network
            ));
        }
        let iso = &self.isolation;
        let pool: ipnet::Ipv4Net = iso
            .pool
            .parse()
            .map_err(|e| format!("isolation.pool {:?}: {e}", iso.pool))?;
        // At most 2^20 blocks: the bridge's name ends in the block's index in hex (5
        // digits), after a prefix of at most 8, within Linux's 15.
        if !(pool.prefix_len()..=29).contains(&iso.subnet_prefix)
            || iso.subnet_prefix - pool.prefix_len() > 20
        {
            return Err(format!(
                "isolation.subnet_prefix = {} does not fit isolation.pool {pool} (from /{} to /29, at most 20 bits more)",
                iso.subnet_prefix,
                pool.prefix_len()
            ));
        }
        Ok(crate::lifecycle::NetworkSettings {
            name: self.network.clone(),
            pool: pool.trunc(),
            prefix_len: iso.subnet_prefix,
            bridge_prefix: self.bridge_prefix(),
        })
    }

    /// The start of Berth's bridges' names, one per network name (so concurrent daemons
    /// with networks of their own never share a bridge or a firewall rule): the name itself
    /// when it is short, else `b` and a hash of it; then `-`.
    pub fn bridge_prefix(&self) -> String {
        let n = &self.network;
        if n.len() <= 6
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return format!("{n}-");
        }
        // FNV-1a: stable across releases, unlike std's hasher.
        let hash = n.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        format!("b{:06x}-", hash & 0x00ff_ffff)
    }

    /// The host firewall the daemon installs, checked.
    pub fn firewall_rules(&self) -> Result<crate::firewall::Rules, String> {
        let iso = &self.isolation;
        let allow = iso
            .allow
            .iter()
            .map(|a| a.parse().map_err(|e| format!("isolation.allow {a:?}: {e}")))
            .collect::<Result<_, String>>()?;
        let deny = iso
            .deny
            .iter()
            .map(|d| {
                d.parse::<ipnet::Ipv4Net>()
                    .map_err(|e| format!("isolation.deny {d:?}: {e} (an IPv4 range)"))
            })
            .collect::<Result<_, String>>()?;
        Ok(crate::firewall::Rules {
            enabled: iso.firewall,
            bridges: self.bridge_prefix(),
            host_access: iso.host_access,
            allow,
            deny,
        })
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join(berth_proto::ADMIN_SOCKET)
    }

    /// The effective settings as TOML, for `berth daemon --check`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The config as a commented file, for `berth config default`: every setting in
    /// [`SETTINGS`] under its explanation, commented out with its default (or an example,
    /// when unset by default), except those where `self` differs from the defaults, which
    /// are set. So `Config::default().to_commented_toml()` sets nothing.
    pub fn to_commented_toml(&self) -> String {
        let ours = self.table();
        let defaults = Self::default().table();
        let mut out = String::new();
        push_comment(&mut out, HEADER);
        let mut table = "";
        for s in SETTINGS {
            let (t, key) = s.key.split_once('.').unwrap_or(("", s.key));
            if t != table {
                table = t;
                out.push('\n');
                if let Some((_, help)) = TABLES.iter().find(|(name, _)| *name == t) {
                    push_comment(&mut out, help);
                }
                out.push_str(&format!("[{t}]\n"));
            }
            out.push('\n');
            push_comment(&mut out, s.help);
            let value = lookup(&ours, s.key);
            let default = lookup(&defaults, s.key);
            match value {
                Some(v) if value != default => out.push_str(&format!("{key} = {v}\n")),
                _ => {
                    let shown = default.map(ToString::to_string);
                    let shown = shown.as_deref().or(s.example).unwrap_or_default();
                    out.push_str(&format!("# {key} = {shown}\n"));
                }
            }
        }
        out
    }

    /// One effective setting by its name in [`SETTINGS`] (`state_dir`, `limits.pids`), as
    /// text for a script: a string as it is, a list one item a line, a number or a boolean
    /// as TOML writes it; `None` for an optional setting that is unset.
    pub fn get(&self, key: &str) -> Result<Option<String>, String> {
        if !SETTINGS.iter().any(|s| s.key == key) {
            return Err(format!("no setting is named {key}"));
        }
        let text = |v: &toml::Value| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Ok(lookup(&self.table(), key).map(|v| match v {
            toml::Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join("\n"),
            other => text(other),
        }))
    }

    /// What can be read of a config that does not load (an unknown key, a value of the wrong
    /// type): every setting the file gives a value of the right type, the default for the
    /// rest; not validated. For uninstalling with a broken config; only a file that is not
    /// TOML at all is refused.
    pub fn salvage(text: &str) -> Result<Self, String> {
        let file: toml::Table = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let reads = |t: toml::Table| toml::Value::Table(t).try_into::<Self>().is_ok();
        let mut kept = toml::Table::new();
        for (key, value) in file {
            let value = match value {
                toml::Value::Table(inner) => {
                    let mut sub = toml::Table::new();
                    for (k, v) in inner {
                        let one = toml::Table::from_iter([(k.clone(), v.clone())]);
                        if reads(toml::Table::from_iter([(
                            key.clone(),
                            toml::Value::Table(one),
                        )])) {
                            sub.insert(k, v);
                        }
                    }
                    toml::Value::Table(sub)
                }
                v => v,
            };
            if reads(toml::Table::from_iter([(key.clone(), value.clone())])) {
                kept.insert(key, value);
            }
        }
        toml::Value::Table(kept)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_owned())
    }

    fn table(&self) -> toml::Table {
        match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        }
    }
}

/// `key` or `table.key` in `t`.
fn lookup<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    match key.split_once('.') {
        Some((table, key)) => t.get(table)?.as_table()?.get(key),
        None => t.get(key),
    }
}

fn push_comment(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
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
        // A "never" that would overflow the clock when added to it.
        for key in [
            "idle_stop_seconds",
            "login_grace_seconds",
            "keepalive_interval_seconds",
        ] {
            let err = Config::parse(&format!("{key} = 9223372036854775807\n")).unwrap_err();
            assert!(err.contains(key) && err.contains("out of range"), "{err}");
        }
        Config::parse("idle_stop_seconds = 31536000\n").unwrap();
        let c = Config::parse("idle_stop_seconds = 3\n[limits]\ncpus = 0.5\n").unwrap();
        assert_eq!(c.idle_stop_seconds, 3);
        assert_eq!(c.limits.cpus, 0.5);
    }

    #[test]
    fn isolation_settings_are_checked() {
        let c = Config::parse("[isolation]\nallow = [\"tcp:5432\"]\ndeny = [\"10.0.0.0/8\"]\n")
            .unwrap();
        let rules = c.firewall_rules().unwrap();
        assert_eq!(rules.allow.len(), 1);
        assert_eq!(rules.bridges, "berth-");
        for bad in [
            "[isolation]\nallow = [\"tcp:-j ACCEPT\"]\n",
            "[isolation]\ndeny = [\"10.0.0.0/40\"]\n",
            "[isolation]\npool = \"10.213.0.0\"\n",
            "[isolation]\nsubnet_prefix = 30\n",
            "[isolation]\npool = \"10.0.0.0/8\"\nsubnet_prefix = 29\n",
            "network = \"a b\"\n",
        ] {
            let err = Config::parse(bad).unwrap_err();
            assert!(
                err.contains("isolation") || err.contains("network"),
                "{err}"
            );
        }
        // Each test daemon's network gets bridges of its own, within Linux's 15 characters.
        let long = Config::parse("network = \"bt1234567x12-net\"\n").unwrap();
        let prefix = long.bridge_prefix();
        assert!(prefix.starts_with('b') && prefix.len() == 8, "{prefix}");
        let other = Config::parse("network = \"bt1234567x13-net\"\n").unwrap();
        assert_ne!(other.bridge_prefix(), prefix);
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

    /// The fields serde knows in `text`'s table, from its message for an unknown one.
    fn fields_of(text: &str) -> Vec<String> {
        let err = Config::parse(text).unwrap_err();
        let (_, list) = err.split_once("expected one of ").unwrap();
        list.split(", ")
            .map(|f| f.trim().trim_matches('`').to_owned())
            .collect()
    }

    #[test]
    fn settings_document_every_field_once() {
        let mut fields = Vec::new();
        for f in fields_of("zzz = 1\n") {
            if TABLES.iter().any(|(t, _)| *t == f) {
                for k in fields_of(&format!("[{f}]\nzzz = 1\n")) {
                    fields.push(format!("{f}.{k}"));
                }
            } else {
                fields.push(f);
            }
        }
        let mut documented: Vec<String> = SETTINGS.iter().map(|s| s.key.to_owned()).collect();
        fields.sort();
        documented.sort();
        assert_eq!(documented, fields);
        // An example is shown exactly for the settings unset by default.
        let defaults = Config::default().table();
        for s in SETTINGS {
            assert_eq!(
                lookup(&defaults, s.key).is_none(),
                s.example.is_some(),
                "{}",
                s.key
            );
        }
    }

    #[test]
    fn commented_default_is_all_defaults_and_uncommented_the_examples() {
        let text = Config::default().to_commented_toml();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
        let is_setting = |line: &str| {
            SETTINGS.iter().any(|s| {
                let key = s.key.rsplit('.').next().unwrap();
                line.starts_with(&format!("{key} = "))
            })
        };
        // Every line is a comment, a blank or a table header; each setting appears once.
        let mut shown = 0;
        for line in text.lines() {
            assert!(
                line.is_empty()
                    || line.starts_with("# ")
                    || line == "[limits]"
                    || line == "[isolation]",
                "{line}"
            );
            if line.strip_prefix("# ").is_some_and(is_setting) {
                shown += 1;
            }
        }
        assert_eq!(shown, SETTINGS.len(), "{text}");
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(kv) if is_setting(kv) => format!("{kv}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        let all = Config::parse(&uncommented).unwrap();
        let (all, defaults) = (all.table(), Config::default().table());
        for s in SETTINGS {
            let expected = match s.example {
                Some(e) => e.parse::<toml::Value>().unwrap(),
                None => lookup(&defaults, s.key).unwrap().clone(),
            };
            assert_eq!(lookup(&all, s.key), Some(&expected), "{}", s.key);
        }
    }

    #[test]
    fn settings_apart_from_the_defaults_are_set() {
        let c = Config {
            listen: "127.0.0.1:2200".parse().unwrap(),
            state_dir: "/srv/berth \"x\"".into(),
            metrics_listen: Some("127.0.0.1:9200".parse().unwrap()),
            limits: LimitsConfig {
                pids: 99,
                ..Default::default()
            },
            ..Default::default()
        };
        let text = c.to_commented_toml();
        let set: Vec<&str> = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            set,
            [
                "listen = \"127.0.0.1:2200\"",
                "state_dir = '/srv/berth \"x\"'",
                "metrics_listen = \"127.0.0.1:9200\"",
                "[limits]",
                "pids = 99",
                "[isolation]",
            ]
        );
        assert_eq!(Config::parse(&text).unwrap(), c);
    }

    #[test]
    fn get_gives_one_setting_as_text() {
        let c = Config::default();
        assert_eq!(c.get("state_dir").unwrap().unwrap(), "/var/lib/berth");
        assert_eq!(c.get("listen").unwrap().unwrap(), "0.0.0.0:2222");
        assert_eq!(c.get("accept_env").unwrap().unwrap(), "LANG\nLC_*");
        assert_eq!(c.get("limits.cpus").unwrap().unwrap(), "1.0");
        assert_eq!(c.get("allow_x11_forwarding").unwrap().unwrap(), "true");
        assert_eq!(c.get("metrics_listen").unwrap(), None);
        assert_eq!(c.get("limits").unwrap_err(), "no setting is named limits");
        assert!(c.get("nope").is_err());
    }

    #[test]
    fn salvage_keeps_what_reads() {
        let c = Config::salvage(
            "state_dir = \"/srv/b\"\nbogus = 1\nidle_stop_seconds = \"x\"\n\
             [limits]\npids = 3\nmem = 1\n[other]\na = 1\n",
        )
        .unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/b"));
        assert_eq!(c.idle_stop_seconds, 10);
        assert_eq!(c.limits.pids, 3);
        assert!(Config::salvage("state_dir = \n").is_err());
    }

    #[test]
    fn round_trips() {
        let c = Config::default();
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }
}
