//! The machine the figures come from: what the report prints above the table.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::engine::Engine;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub os: String,
    pub kernel: String,
    pub docker: String,
    pub openssh_client: String,
    pub openssh_server: String,
    pub berth: String,
    /// `/proc/loadavg` when the run began and when it ended: other work on the machine.
    pub load_at_start: String,
    pub load_at_end: String,
}

impl Machine {
    pub fn describe(engine: &Engine, berth: &Path, sshd: &Path) -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        let docker = engine
            .version()
            .ok()
            .and_then(|v| {
                Some(format!(
                    "{} (API {})",
                    v.get("Version")?.as_str()?,
                    v.get("ApiVersion")?.as_str()?
                ))
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_default(),
            memory_gib: mem_kib / 1024.0 / 1024.0,
            os,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            docker,
            openssh_client: first_line(Command::new("ssh").arg("-V")),
            openssh_server: first_line(Command::new(sshd).arg("-V")),
            berth: first_line(Command::new(berth).arg("--version")),
            load_at_start: loadavg(),
            load_at_end: String::new(),
        }
    }
}

pub fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The first line a command prints, on stdout or stderr (`ssh -V` uses stderr; `sshd -V`
/// prints its version as part of a usage message and exits 1).
fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text.lines()
                .find(|l| !l.trim().is_empty() && !l.starts_with("unknown option"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The UTC time now, as `2026-01-02T03:04:05Z`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_time_has_the_shape() {
        let t = super::now_utc();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
