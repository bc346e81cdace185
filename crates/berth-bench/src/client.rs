//! The stock OpenSSH client, pointed at either server with exactly the same options: same
//! key type (Ed25519), same key exchange, same cipher, no user config, no multiplexing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// The cipher both servers are held to: OpenSSH's own first choice.
pub const CIPHER: &str = "chacha20-poly1305@openssh.com";
pub const KEX: &str = "curve25519-sha256";

/// A user on a server: who to log in as, where, with which key.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
}

impl Endpoint {
    pub fn new(port: u16, user: &str, key: &Path) -> Self {
        Self {
            port,
            user: user.to_owned(),
            key: key.to_owned(),
        }
    }

    /// The `-o` options every client here gets (without the `-o`s), for tools that take
    /// them one by one (`berth connect -o`, `sshfs -o`).
    pub fn ssh_options() -> Vec<String> {
        [
            "IdentitiesOnly=yes".to_owned(),
            "BatchMode=yes".into(),
            "StrictHostKeyChecking=no".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "LogLevel=ERROR".into(),
            format!("Ciphers={CIPHER}"),
            format!("KexAlgorithms={KEX}"),
            "HostKeyAlgorithms=ssh-ed25519".into(),
            "Compression=no".into(),
            "ConnectTimeout=60".into(),
            "ServerAliveInterval=0".into(),
        ]
        .into()
    }

    fn options(&self) -> Vec<String> {
        let mut v: Vec<String> = vec!["-F".into(), "/dev/null".into()];
        v.extend(
            [
                "IdentitiesOnly=yes".to_owned(),
                "BatchMode=yes".into(),
                "StrictHostKeyChecking=no".into(),
                "UserKnownHostsFile=/dev/null".into(),
                "GlobalKnownHostsFile=/dev/null".into(),
                "LogLevel=ERROR".into(),
                format!("Ciphers={CIPHER}"),
                format!("KexAlgorithms={KEX}"),
                "HostKeyAlgorithms=ssh-ed25519".into(),
                "PubkeyAcceptedAlgorithms=ssh-ed25519".into(),
                "Compression=no".into(),
                "ControlMaster=no".into(),
                "ControlPath=none".into(),
                "ConnectTimeout=60".into(),
                "ServerAliveInterval=0".into(),
            ]
            .into_iter()
            .flat_map(|o| ["-o".to_owned(), o]),
        );
        v.push("-i".into());
        v.push(self.key.to_string_lossy().into_owned());
        v
    }

    fn target(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }

    /// `ssh [EXTRA...] user@127.0.0.1`; add the command with `.arg`.
    pub fn ssh(&self, extra: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.options())
            .arg("-p")
            .arg(self.port.to_string())
            .args(extra)
            .arg(self.target());
        c
    }

    /// `scp LOCAL user@127.0.0.1:REMOTE` (SFTP protocol, OpenSSH's default since 9.0).
    pub fn scp_to(&self, local: &Path, remote: &str) -> Command {
        let mut c = Command::new("scp");
        c.args(self.options())
            .arg("-q")
            .arg("-P")
            .arg(self.port.to_string())
            .arg(local)
            .arg(format!("{}:{remote}", self.target()));
        c
    }

    /// Runs `ssh user@host CMD` and returns its stdout; fails unless it exits 0.
    pub fn run(&self, cmd: &str) -> Result<String> {
        let out = self.ssh(&[]).arg(cmd).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "ssh {} {cmd:?}: {}: {}",
                self.target(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Runs `cmd` to completion (stdin from /dev/null unless already set, stdout discarded) and
/// returns its wall time; fails unless it exits 0.
pub fn timed(cmd: &mut Command) -> Result<Duration> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let start = Instant::now();
    let out = cmd.output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Seconds as milliseconds, the unit latencies are reported in.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
