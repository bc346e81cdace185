//! The results: a table on stdout, `results.json`, and the generated part of
//! `docs/benchmarks.md` (between two markers; the prose around it is kept).

use std::path::Path;

use anyhow::{Context, Result};
use comfy_table::{Table, presets::ASCII_MARKDOWN};
use serde::Serialize;

use crate::figure::Figure;
use crate::machine::Machine;
use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub runs: usize,
    pub keystrokes: usize,
    pub data_mib: u64,
    pub data_rounds: usize,
    pub connect_rounds: usize,
    pub connect_mib: u64,
    pub crowd: usize,
    pub crowd_rounds: usize,
    pub cold_rounds: usize,
    pub idle_sessions: usize,
    pub rest_seconds: u64,
    pub cipher: &'static str,
    pub kex: &'static str,
    pub key: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub met: Option<bool>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub started: String,
    pub finished: String,
    pub command: String,
    pub machine: Machine,
    pub settings: Settings,
    pub figures: Vec<Figure>,
    pub targets: Vec<Target>,
}

/// A number with as many decimals as its size deserves.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: Option<&Summary>, unit: &str, percentiles: bool) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 => format!("{} {unit}", num(s.median)),
        Some(s) if percentiles => format!(
            "p50 {} · p99 {} {unit} ({}–{})",
            num(s.median),
            num(s.p99),
            num(s.min),
            num(s.max)
        ),
        Some(s) => format!("{} {unit} ({}–{})", num(s.median), num(s.min), num(s.max)),
    }
}

fn n_of(f: &Figure) -> String {
    match (&f.berth, &f.baseline) {
        (Some(b), Some(o)) if b.n == o.n => b.n.to_string(),
        (Some(b), Some(o)) => format!("{} / {}", b.n, o.n),
        (Some(b), None) => b.n.to_string(),
        (None, Some(o)) => format!("— / {}", o.n),
        (None, None) => "—".into(),
    }
}

fn ratio(f: &Figure) -> String {
    f.ratio.map_or_else(|| "—".into(), |r| format!("{r:.2}×"))
}

/// The table, as Markdown (which also reads well on a terminal).
pub fn table(figures: &[Figure]) -> String {
    let mut t = Table::new();
    t.load_style(ASCII_MARKDOWN).set_header([
        "figure",
        "Berth: median (min–max)",
        "baseline: median (min–max)",
        "Berth / baseline",
        "N",
    ]);
    for f in figures {
        let baseline = match &f.baseline {
            None if f.baseline_name == "—" => "—".to_owned(),
            b => format!(
                "{}: {}",
                f.baseline_name,
                cell(b.as_ref(), f.unit, f.percentiles)
            ),
        };
        let title = if f.error.is_some() {
            format!("{} **(failed, see below)**", f.title)
        } else {
            f.title.clone()
        };
        t.add_row([
            title,
            cell(f.berth.as_ref(), f.unit, f.percentiles),
            baseline,
            ratio(f),
            n_of(f),
        ]);
    }
    let mut out = t.to_string();
    for f in figures {
        if let Some(e) = &f.error {
            out.push_str(&format!("\n\n`{}` failed: {e}", f.id));
        }
    }
    out
}

fn find<'a>(figures: &'a [Figure], id: &str) -> Option<&'a Figure> {
    figures.iter().find(|f| f.id == id)
}

/// The targets, judged on this run's figures.
pub fn targets(figures: &[Figure]) -> Vec<Target> {
    let mut out = Vec::new();
    if let Some(f) = find(figures, "warm_login") {
        out.push(Target {
            what: "warm login at or under OpenSSH's login to the host".into(),
            met: f.ratio.filter(|_| f.error.is_none()).map(|r| r <= 1.0),
            detail: format!("median ratio {}", ratio(f)),
        });
    }
    for id in ["scp_busybox", "scp_debian"] {
        if let Some(f) = find(figures, id) {
            out.push(Target {
                what: format!("{id}: throughput at least 90% of OpenSSH's"),
                met: f.ratio.filter(|_| f.error.is_none()).map(|r| r >= 0.9),
                detail: format!("median ratio {}", ratio(f)),
            });
        }
    }
    // Issue 18: no figure behind OpenSSH.
    let at_most = |id: &str, what: &str, limit: f64, out: &mut Vec<Target>| {
        if let Some(f) = find(figures, id) {
            out.push(Target {
                what: format!("{id}: {what}"),
                met: f.ratio.filter(|_| f.error.is_none()).map(|r| r <= limit),
                detail: format!("median ratio {}", ratio(f)),
            });
        }
    };
    if let Some(f) = find(figures, "ssh_cat") {
        out.push(Target {
            what: "ssh_cat: throughput at least OpenSSH's".into(),
            met: f.ratio.filter(|_| f.error.is_none()).map(|r| r >= 1.0),
            detail: format!("median ratio {}", ratio(f)),
        });
    }
    at_most(
        "keystroke_echo",
        "echo at most OpenSSH's (≤ 1.0×)",
        1.0,
        &mut out,
    );
    at_most(
        "daemon_memory_at_rest",
        "RSS at rest at most the listening sshd's (≤ 1.0×)",
        1.0,
        &mut out,
    );
    at_most(
        "daemon_memory_after_load",
        "RSS after the load at most 1.5× the same daemon's RSS at rest before it",
        1.5,
        &mut out,
    );
    if let Some(f) = find(figures, "crowd_warm") {
        let p99 = match (&f.berth, &f.baseline) {
            (Some(b), Some(o)) if o.p99 > 0.0 => Some(b.p99 / o.p99),
            _ => None,
        };
        out.push(Target {
            what: "crowd_warm: p50 and p99 at most OpenSSH's (≤ 1.0×)".into(),
            met: f
                .ratio
                .zip(p99)
                .filter(|_| f.error.is_none())
                .map(|(r, p)| r <= 1.0 && p <= 1.0),
            detail: format!(
                "p50 ratio {}, p99 ratio {}",
                ratio(f),
                p99.map_or_else(|| "—".into(), |p| format!("{p:.2}×"))
            ),
        });
    }
    if let Some(f) = find(figures, "crowd_cold_docker") {
        // Berth's part of a cold login in the crowd: what it takes beyond Docker's start.
        let part = match (&f.berth, &f.baseline) {
            (Some(b), Some(o)) if b.median > 0.0 => Some((b.median - o.median) / b.median),
            _ => None,
        };
        out.push(Target {
            what: "crowd_cold: Berth's part at most 10% of a cold login in the crowd".into(),
            met: part.filter(|_| f.error.is_none()).map(|p| p <= 0.10),
            detail: part.map_or_else(
                || "—".into(),
                |p| format!("Berth's part {:.0}% (p50 {})", p * 100.0, ratio(f)),
            ),
        });
    }
    for id in ["crowd_warm", "crowd_cold"] {
        if let Some(f) = find(figures, id) {
            out.push(Target {
                what: format!("{id}: every simultaneous login succeeds"),
                met: Some(f.error.is_none() && f.berth.is_some()),
                detail: f.error.clone().unwrap_or_else(|| {
                    format!(
                        "{} logins, all exited 0",
                        f.berth.as_ref().map_or(0, |b| b.n)
                    )
                }),
            });
        }
    }
    for f in figures.iter().filter(|f| is_connect(f)) {
        let (what, met) = if f.higher_is_better {
            ("throughput at least sshfs's", f.ratio.map(|r| r >= 1.0))
        } else {
            ("time at most sshfs's (≤ 1.0×)", f.ratio.map(|r| r <= 1.0))
        };
        out.push(Target {
            what: format!("{}: {what}", f.id),
            met: met.filter(|_| f.error.is_none()),
            detail: format!("median ratio {}", ratio(f)),
        });
    }
    if let Some(f) = find(figures, "login_under_flood") {
        let all = f.error.is_none() && f.note.contains("logins refused: Berth 0,");
        let p99 = f.berth.as_ref().map_or(f64::INFINITY, |b| b.p99);
        out.push(Target {
            what: "login_under_flood: every login of a user with a key succeeds, each under 2 s"
                .into(),
            met: Some(all && p99 < 2000.0),
            detail: format!(
                "Berth p99 {p99:.0} ms; {}",
                f.note.rsplit("; ").next().unwrap_or_default()
            ),
        });
    }
    out
}

/// A figure of the `connect` part (reported in its own block of the page).
fn is_connect(f: &Figure) -> bool {
    f.id.starts_with("connect_")
}

fn targets_text(targets: &[Target]) -> String {
    targets
        .iter()
        .map(|t| {
            let mark = match t.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "not measured",
            };
            format!("- {}: **{mark}** ({})\n", t.what, t.detail)
        })
        .collect()
}

fn machine_text(m: &Machine) -> String {
    format!(
        "- CPU: {} × {}\n- memory: {:.1} GiB\n- OS: {}, kernel {}\n- Docker: {}\n- OpenSSH: {} (client), {} (server)\n- Berth: {}\n- load average at start / end: {} / {}\n",
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.os,
        m.kernel,
        m.docker,
        m.openssh_client,
        m.openssh_server,
        m.berth,
        m.load_at_start,
        m.load_at_end
    )
}

fn connect_settings_text(s: &Settings) -> String {
    format!(
        "{} rounds (alternating which side goes first), {} MiB written and read; sshfs with its default options; every ssh (Berth's connect, sshfs's, the bench's) uses `-o Ciphers={} -o KexAlgorithms={}`, {} keys.",
        s.connect_rounds, s.connect_mib, s.cipher, s.kex, s.key
    )
}

fn settings_text(s: &Settings) -> String {
    format!(
        "N = {} per latency figure (alternating Berth and baseline), {} keystrokes, {} rounds of {} MiB, {} users at once × {} rounds ({} with the containers stopped), {} idle sessions over a {} s rest window; every client uses `-o Ciphers={} -o KexAlgorithms={}`, {} keys.",
        s.runs,
        s.keystrokes,
        s.data_rounds,
        s.data_mib,
        s.crowd,
        s.crowd_rounds,
        s.cold_rounds,
        s.idle_sessions,
        s.rest_seconds,
        s.cipher,
        s.kex,
        s.key
    )
}

/// Prints the report to stdout.
pub fn print(r: &Results) {
    println!();
    println!("{}", table(&r.figures));
    println!();
    println!("{}", settings_text(&r.settings));
    if r.figures.iter().any(is_connect) {
        println!();
        println!("{}", connect_settings_text(&r.settings));
    }
    println!();
    print!("{}", targets_text(&r.targets));
}

pub fn write_json(r: &Results, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

const BEGIN: &str = "<!-- berth-bench:begin -->";
const END: &str = "<!-- berth-bench:end -->";
const CONNECT_BEGIN: &str = "<!-- berth-bench:connect:begin -->";
const CONNECT_END: &str = "<!-- berth-bench:connect:end -->";

fn generated(
    r: &Results,
    (begin, end): (&str, &str),
    figures: &[Figure],
    settings: &str,
    targets: &[Target],
) -> String {
    format!(
        "{begin}\n<!-- written by `{}`; edits between these markers are replaced by the next run -->\n\n\
         Last run: {} to {}, `{}`.\n\n{}\n\n{settings}\n\n### The machine\n\n{}\n### Targets\n\n{}{end}",
        r.command,
        r.started,
        r.finished,
        r.command,
        table(figures),
        machine_text(&r.machine),
        targets_text(targets),
    )
}

/// `old` with the block between `begin` and `end` replaced, or `None` without one.
fn replace_block(old: &str, (begin, end): (&str, &str), block: &str) -> Option<String> {
    match (old.find(begin), old.find(end)) {
        (Some(a), Some(b)) if a < b => Some(format!(
            "{}{block}{}",
            old.get(..a).unwrap_or_default(),
            old.get(b + end.len()..).unwrap_or_default()
        )),
        _ => None,
    }
}

/// Replaces the generated blocks of `path` (or writes a new page with them): the connect
/// part's figures go to their own block, the rest to the main one; a block with no figure
/// in this run is left as it was.
pub fn write_doc(r: &Results, path: &Path) -> Result<()> {
    let (connect, main): (Vec<Figure>, Vec<Figure>) =
        r.figures.iter().cloned().partition(is_connect);
    let (connect_targets, main_targets): (Vec<Target>, Vec<Target>) = r
        .targets
        .iter()
        .cloned()
        .partition(|t| t.what.starts_with("connect_"));
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    if !main.is_empty() {
        let block = generated(
            r,
            (BEGIN, END),
            &main,
            &settings_text(&r.settings),
            &main_targets,
        );
        text = replace_block(&text, (BEGIN, END), &block).unwrap_or_else(|| {
            format!("{text}# Benchmarks: Berth against OpenSSH\n\n## Results\n\n{block}\n")
        });
    }
    if !connect.is_empty() {
        let block = generated(
            r,
            (CONNECT_BEGIN, CONNECT_END),
            &connect,
            &connect_settings_text(&r.settings),
            &connect_targets,
        );
        text = replace_block(&text, (CONNECT_BEGIN, CONNECT_END), &block)
            .unwrap_or_else(|| format!("{text}\n## berth connect against sshfs\n\n{block}\n"));
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
