//! What an admin sets per user (`berth user set`, issue 16) and the server's `[limits]`
//! share: memory, CPUs, processes, GPUs, and shared folders (`SRC:DST[:ro]`). Each value is
//! parsed here once, for the daemon's config and for the admin API, with one line naming
//! what to change when it is not one.

use std::fmt;

/// A per-user value: one of her own, or the server's (`default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Override<T> {
    Default,
    Set(T),
}

impl<T> Override<T> {
    pub fn into_option(self) -> Option<T> {
        match self {
            Self::Default => None,
            Self::Set(v) => Some(v),
        }
    }
}

/// Memory a container may use, at least this (a login needs some).
pub const MIN_MEMORY: u64 = 16 << 20;
/// ... and at most this (1 PiB: past any machine, within the engine's `i64`).
pub const MAX_MEMORY: u64 = 1 << 50;
/// Processes per container: the config's own lower bound, and the kernel's `pid_max` ceiling.
pub const MIN_PIDS: u32 = 16;
pub const MAX_PIDS: u32 = 4_194_304;
/// CPUs per container, at most (as `limits.cpus`).
pub const MAX_CPUS: f64 = 1024.0;
/// GPU device ids in one list, at most.
const MAX_GPU_IDS: usize = 64;

/// `--memory`: a size (`8G`, `512M`, `1.5GiB`; binary units, as Docker's `--memory`),
/// `none` (no limit) or `default`. Bytes; 0 is no limit.
pub fn parse_memory(s: &str) -> Result<Override<u64>, String> {
    let bad = || {
        format!("memory {s:?} is not a size: give e.g. 8G or 512M (at least 16M), none or default")
    };
    match s {
        "default" => return Ok(Override::Default),
        "none" => return Ok(Override::Set(0)),
        _ => {}
    }
    let lower = s.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (number, unit) = match body.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (body.get(..i).unwrap_or(""), Some(c)),
        _ => (body, None),
    };
    let shift = match unit {
        None => 0,
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some(_) => return Err(bad()),
    };
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    #[allow(clippy::cast_precision_loss, reason = "a bound, not a value")]
    let bytes = value * (1_u64 << shift) as f64;
    #[allow(clippy::cast_precision_loss, reason = "bounds")]
    if !bytes.is_finite() || bytes < MIN_MEMORY as f64 || bytes > MAX_MEMORY as f64 {
        return Err(format!(
            "memory {s:?} is out of range: give at least 16M and at most 1024T, none or default"
        ));
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked range"
    )]
    Ok(Override::Set(bytes as u64))
}

/// `--cpus`: a number of CPUs (`4`, `0.5`; at least 0.01), `none` or `default`. Nano-CPUs,
/// as the engine counts them; 0 is no limit.
pub fn parse_cpus(s: &str) -> Result<Override<u64>, String> {
    match s {
        "default" => return Ok(Override::Default),
        "none" => return Ok(Override::Set(0)),
        _ => {}
    }
    let bad = || {
        format!(
            "cpus {s:?} is not a number of CPUs: give e.g. 4 or 0.5 (at most 1024), none or default"
        )
    };
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let v: f64 = s.parse().map_err(|_| bad())?;
    if !(0.01..=MAX_CPUS).contains(&v) {
        return Err(bad());
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked range"
    )]
    Ok(Override::Set((v * 1e9).round() as u64))
}

/// `--pids`: processes in the container (16 to 4194304), or `default`.
pub fn parse_pids(s: &str) -> Result<Override<u32>, String> {
    if s == "default" {
        return Ok(Override::Default);
    }
    match s.parse::<u32>() {
        Ok(n) if (MIN_PIDS..=MAX_PIDS).contains(&n) && s.chars().all(|c| c.is_ascii_digit()) => {
            Ok(Override::Set(n))
        }
        _ => Err(format!(
            "pids {s:?} is not a number of processes from 16 to 4194304 (or default)"
        )),
    }
}

/// GPUs handed to a container through the NVIDIA container runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    None,
    All,
    /// Device indices or UUIDs (`0,2`, `GPU-3a1f...`), as `nvidia-smi -L` lists them.
    Devices(Vec<String>),
}

impl Gpus {
    /// `none`, `all`, or a comma-separated list of device indices or UUIDs.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => return Ok(Self::None),
            "all" => return Ok(Self::All),
            _ => {}
        }
        let ids: Vec<String> = s.split(',').map(|d| d.trim().to_owned()).collect();
        let valid = |d: &String| {
            !d.is_empty()
                && d.len() <= 64
                && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if ids.is_empty() || ids.len() > MAX_GPU_IDS || !ids.iter().all(valid) {
            return Err(format!(
                "gpus {s:?} is not all, none or a list of GPU indices or UUIDs such as 0,2"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = ids.iter().find(|d| !seen.insert(d.as_str())) {
            return Err(format!("gpus {s:?} names GPU {dup} twice"));
        }
        Ok(Self::Devices(ids))
    }

    /// `--gpus`: as [`Gpus::parse`], or `default`.
    pub fn parse_override(s: &str) -> Result<Override<Self>, String> {
        if s == "default" {
            Ok(Override::Default)
        } else {
            Self::parse(s).map(Override::Set)
        }
    }
}

impl fmt::Display for Gpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::All => f.write_str("all"),
            Self::Devices(ids) => f.write_str(&ids.join(",")),
        }
    }
}

/// A shared folder as `berth user set --mount` gives it: `SOURCE:TARGET[:ro|:rw]`. Only the
/// shape is checked here; which sources and targets are allowed is the daemon's to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl MountSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("mount {s:?}: {why}; give SOURCE:TARGET or SOURCE:TARGET:ro");
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, read_only) = match parts.as_slice() {
            [source, target] => (*source, *target, false),
            [source, target, "ro"] => (*source, *target, true),
            [source, target, "rw"] => (*source, *target, false),
            [_, _, other] => return Err(bad(&format!("{other:?} is not ro or rw"))),
            _ => return Err(bad("paths with ':' in them cannot be shared")),
        };
        if !source.starts_with('/') || !target.starts_with('/') {
            return Err(bad("both paths must be absolute"));
        }
        Ok(Self {
            source: source.to_owned(),
            target: target.to_owned(),
            read_only,
        })
    }
}

impl fmt::Display for MountSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.target)?;
        if self.read_only {
            f.write_str(":ro")?;
        }
        Ok(())
    }
}

/// Memory as `user show` prints it: `8 GiB`, `512 MiB`, `1.5 GiB`, or `no limit` for 0.
pub fn memory_shown(bytes: u64) -> String {
    if bytes == 0 {
        return "no limit".into();
    }
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift {
            if bytes.is_multiple_of(1 << shift) {
                return format!("{} {unit}", bytes >> shift);
            }
            #[allow(clippy::cast_precision_loss, reason = "a size for people to read")]
            let v = bytes as f64 / (1_u64 << shift) as f64;
            return format!("{v:.2} {unit}");
        }
    }
    format!("{bytes} B")
}

/// CPUs as `user show` prints them: `4`, `0.5`, or `no limit` for 0.
pub fn cpus_shown(nano: u64) -> String {
    if nano == 0 {
        return "no limit".into();
    }
    #[allow(clippy::cast_precision_loss, reason = "a number for people to read")]
    let v = nano as f64 / 1e9;
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn memory_sizes() {
        let set = |s: &str| parse_memory(s).unwrap().into_option().unwrap();
        assert_eq!(set("8G"), 8 << 30);
        assert_eq!(set("8g"), 8 << 30);
        assert_eq!(set("8GiB"), 8 << 30);
        assert_eq!(set("512M"), 512 << 20);
        assert_eq!(set("1.5G"), 3 << 29);
        assert_eq!(set("none"), 0);
        assert_eq!(parse_memory("default").unwrap(), Override::Default);
        for bad in [
            "", "8X", "G", "-1G", "1M", "8 G", "1e3G", "2000T", "nan", "8GG",
        ] {
            let e = parse_memory(bad).unwrap_err();
            assert!(e.starts_with("memory "), "{bad}: {e}");
        }
        assert_eq!(memory_shown(8 << 30), "8 GiB");
        assert_eq!(memory_shown(3 << 29), "1.50 GiB");
        assert_eq!(memory_shown(0), "no limit");
    }

    #[test]
    fn cpus_and_pids() {
        assert_eq!(parse_cpus("4").unwrap(), Override::Set(4_000_000_000));
        assert_eq!(parse_cpus("0.5").unwrap(), Override::Set(500_000_000));
        assert_eq!(parse_cpus("none").unwrap(), Override::Set(0));
        for bad in ["0", "-1", "1025", "x", "", "1e2", "inf"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(cpus_shown(4_000_000_000), "4");
        assert_eq!(cpus_shown(1_500_000_000), "1.5");
        assert_eq!(parse_pids("4096").unwrap(), Override::Set(4096));
        assert_eq!(parse_pids("default").unwrap(), Override::Default);
        for bad in ["15", "+20", "5000000", "x", ""] {
            assert!(parse_pids(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gpus() {
        assert_eq!(Gpus::parse("all").unwrap(), Gpus::All);
        assert_eq!(Gpus::parse("none").unwrap(), Gpus::None);
        assert_eq!(
            Gpus::parse("0,2").unwrap(),
            Gpus::Devices(vec!["0".into(), "2".into()])
        );
        assert_eq!(Gpus::parse("0,2").unwrap().to_string(), "0,2");
        for bad in ["", "0,,1", "0,0", "a b", "0;1", "$(x)"] {
            assert!(Gpus::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_specs() {
        let m = MountSpec::parse("/srv/a:/project:ro").unwrap();
        assert_eq!(
            (m.source.as_str(), m.target.as_str(), m.read_only),
            ("/srv/a", "/project", true)
        );
        assert!(!MountSpec::parse("/srv/a:/project").unwrap().read_only);
        assert_eq!(m.to_string(), "/srv/a:/project:ro");
        for bad in ["/srv/a", "srv:/p", "/s:p", "/s:/p:x", "/a:/b:/c:ro", ""] {
            assert!(MountSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
