//! `berth-bench`: Berth against OpenSSH on the same machine, in one run.
//!
//! It starts a private OpenSSH `sshd` on loopback as the baseline and the release `berth
//! daemon` with a temporary state directory, adds users with the real CLI, then measures
//! with the stock OpenSSH client (same key type, key exchange and cipher for both): warm,
//! cold and first logins, keystroke echo in a PTY, throughput by `scp` and `ssh cat`, many
//! logins at once, many idle sessions, and the daemon's memory at rest. Berth and its
//! baseline take turns run by run, so that other load on the machine hits both alike.
//!
//! Results go to stdout (a table), to `results.json` and, when asked, into the generated
//! block of `docs/benchmarks.md`. Everything it started or made (processes, containers,
//! images, network, temporary files) is stopped or removed on the way out, error or
//! Ctrl-C included. `scripts/bench` installs what is missing, builds, and runs it.

mod client;
mod connect;
mod crowd;
mod echo;
mod engine;
mod figure;
mod flood;
mod hoard;
mod interrupt;
mod login;
mod machine;
mod procfs;
mod report;
mod rig;
mod servers;
mod stats;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

use crate::figure::Figure;
use crate::machine::Machine;
use crate::report::{Results, Settings};
use crate::rig::{Options, Rig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Daemon memory at rest.
    Memory,
    /// Warm, cold and first logins.
    Login,
    /// Keystroke echo in a PTY.
    Echo,
    /// scp and ssh cat throughput.
    Transfer,
    /// Many simultaneous logins.
    Crowd,
    /// Many idle sessions.
    Idle,
    /// A login while strangers flood the port.
    Flood,
    /// Memory and descriptors while clients push stdin that is never read.
    Hoard,
    /// `berth connect` against sshfs: throughput, untar, find, git, make.
    Connect,
}

#[derive(Parser)]
#[command(
    name = "berth-bench",
    about = "Benchmarks Berth against OpenSSH on this machine (run by scripts/bench, as root)"
)]
struct Args {
    /// The `berth` binary (release build)
    #[arg(long, value_name = "FILE")]
    berth: PathBuf,
    /// The static `berth-guest` helper
    #[arg(long, value_name = "FILE")]
    guest: PathBuf,
    /// OpenSSH's server, run privately on loopback as the baseline
    #[arg(long, value_name = "FILE", default_value = "/usr/sbin/sshd")]
    sshd: PathBuf,
    #[arg(long, value_name = "FILE", default_value = "/var/run/docker.sock")]
    docker_socket: PathBuf,
    #[arg(long, default_value = "berth-test/busybox:latest")]
    busybox_image: String,
    #[arg(long, default_value = "berth-test/debian:bookworm-tools-git")]
    debian_image: String,
    /// Small N and 100 MiB instead of 1 GiB, for development
    #[arg(long)]
    quick: bool,
    /// Runs per latency figure [default: 20; --quick: 5]
    #[arg(long)]
    runs: Option<usize>,
    /// Keystrokes per side [default: 10 × runs]
    #[arg(long)]
    keystrokes: Option<usize>,
    /// Size of the throughput file in MiB [default: 1024; --quick: 100]
    #[arg(long, value_name = "MIB")]
    data_mib: Option<u64>,
    /// Rounds of the throughput cases [default: 5; --quick: 2]
    #[arg(long)]
    data_rounds: Option<usize>,
    /// Rounds of the connect part [default: 2; --quick: 1]
    #[arg(long)]
    connect_rounds: Option<usize>,
    /// MiB written and read through connect and sshfs [default: 256; --quick: 64]
    #[arg(long, value_name = "MIB")]
    connect_mib: Option<u64>,
    /// Users logging in at once
    #[arg(long, default_value_t = 100)]
    crowd: usize,
    /// Rounds of the simultaneous logins, containers running [default: 3; --quick: 1]
    #[arg(long)]
    crowd_rounds: Option<usize>,
    /// Rounds of the simultaneous logins with the containers stopped (each also starts them
    /// all through the engine's API) [default: 2; --quick: 1]
    #[arg(long)]
    cold_rounds: Option<usize>,
    /// Idle sessions held open
    #[arg(long, default_value_t = 500)]
    idle_sessions: usize,
    /// Seconds CPU is watched at rest [default: 30; --quick: 10]
    #[arg(long)]
    rest_seconds: Option<u64>,
    /// Measure only these parts
    #[arg(long, value_delimiter = ',')]
    only: Vec<Part>,
    /// Where results.json goes
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Refresh the generated block of this Markdown page (docs/benchmarks.md)
    #[arg(long, value_name = "FILE")]
    doc: Option<PathBuf>,
    /// Keep the daemons' logs in DIR/logs (set BERTH_LOG for Berth's detail)
    #[arg(long)]
    keep_logs: bool,
    /// The command line the report names as the one that made it
    #[arg(long, default_value = "scripts/bench")]
    command: String,
}

impl Args {
    fn settings(&self) -> Settings {
        let q = self.quick;
        let runs = self.runs.unwrap_or(if q { 5 } else { 20 });
        Settings {
            quick: q,
            runs,
            keystrokes: self.keystrokes.unwrap_or(10 * runs),
            data_mib: self.data_mib.unwrap_or(if q { 100 } else { 1024 }),
            data_rounds: self.data_rounds.unwrap_or(if q { 2 } else { 5 }),
            connect_rounds: self.connect_rounds.unwrap_or(if q { 1 } else { 2 }),
            connect_mib: self.connect_mib.unwrap_or(if q { 64 } else { 256 }),
            crowd: self.crowd,
            crowd_rounds: self.crowd_rounds.unwrap_or(if q { 1 } else { 3 }),
            cold_rounds: self.cold_rounds.unwrap_or(if q { 1 } else { 2 }),
            idle_sessions: self.idle_sessions,
            rest_seconds: self.rest_seconds.unwrap_or(if q { 10 } else { 30 }),
            cipher: client::CIPHER,
            kex: client::KEX,
            key: "Ed25519",
        }
    }

    fn wants(&self, p: Part) -> bool {
        self.only.is_empty() || self.only.contains(&p)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Raises the open-file limit to its hard limit (500 sessions are ~1500 descriptors in the
/// daemon and as many in the harness); the servers inherit it.
fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// Runs the benchmark; `Ok(false)` when a figure failed.
fn run(args: &Args) -> Result<bool> {
    interrupt::install()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("berth-bench must run as root (it runs sshd and the daemon, and talks to Docker)");
    }
    for f in [&args.berth, &args.guest, &args.sshd] {
        if !rig::executable(f) {
            bail!("{} is not an executable file", f.display());
        }
    }
    let nofile = raise_nofile()?;
    let needed = 4 * args.idle_sessions as u64 + 256;
    if nofile < needed {
        bail!("the open-file limit is {nofile}; {needed} are needed (raise the hard limit)");
    }
    let settings = args.settings();
    let started = machine::now_utc();
    let mut rig = Rig::new(&Options {
        berth: args.berth.clone(),
        guest: args.guest.clone(),
        sshd: args.sshd.clone(),
        docker_socket: args.docker_socket.clone(),
        busybox: args.busybox_image.clone(),
        debian: args.debian_image.clone(),
        keep_logs: args.keep_logs.then(|| args.out.join("logs")),
    })?;
    let mut machine = Machine::describe(&rig.engine, &args.berth, &args.sshd);
    let mut figures: Vec<Figure> = Vec::new();
    // Each step says when it starts, and how long the run has taken so far: where a run's
    // minutes go.
    let run_started = std::time::Instant::now();
    let step = |name: &str| {
        eprintln!(
            "berth-bench: {name} (at {:.0} s)",
            run_started.elapsed().as_secs_f64()
        );
    };

    if args.wants(Part::Login) {
        step("warm logins");
        figures.extend(login::warm(&rig, settings.runs));
        step("cold and first logins");
        figures.extend(login::cold_and_first(&rig, settings.runs));
    }
    if args.wants(Part::Echo) {
        interrupt::check()?;
        step("keystroke echo");
        figures.extend(echo::keystrokes(&rig, settings.keystrokes));
    }
    if args.wants(Part::Transfer) {
        interrupt::check()?;
        step("throughput");
        figures.extend(transfer::throughput(
            &rig,
            settings.data_mib,
            settings.data_rounds,
        ));
    }
    if args.wants(Part::Connect) {
        interrupt::check()?;
        step("berth connect against sshfs");
        figures.extend(connect::figures(
            &rig,
            settings.connect_mib,
            settings.connect_rounds,
        ));
    }
    // Idle sessions before the bursts: the daemon's heap has not yet grown for 100
    // simultaneous handshakes, so session memory is not hidden in freed space.
    if args.wants(Part::Idle) {
        interrupt::check()?;
        step("idle sessions");
        figures.extend(crowd::idle(
            &mut rig,
            settings.crowd,
            settings.idle_sessions,
            Duration::from_secs(settings.rest_seconds),
        ));
    }
    if args.wants(Part::Crowd) {
        interrupt::check()?;
        step("simultaneous logins");
        figures.extend(crowd::simultaneous(
            &mut rig,
            settings.crowd,
            settings.crowd_rounds,
            settings.cold_rounds,
        ));
    }
    if args.wants(Part::Flood) {
        interrupt::check()?;
        step("a login under a flood");
        figures.extend(flood::figures(&mut rig, settings.runs));
    }
    if args.wants(Part::Hoard) {
        interrupt::check()?;
        step("clients pushing stdin nobody reads");
        figures.extend(hoard::figures(&mut rig));
    }
    if args.wants(Part::Memory) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        figures.push(
            Figure::new(
                "daemon_memory_at_rest",
                "daemon memory at rest (RSS after start, no user, no session)",
                "MiB",
                "OpenSSH",
            )
            .note("OpenSSH: the RSS of its listening sshd")
            .with(
                vec![mib(rig.berth_at_start.rss_kib)],
                vec![mib(rig.sshd_at_start.rss_kib)],
                Ok(()),
            ),
        );
        let now = rig.berth_pid().and_then(procfs::memory);
        let f = Figure::new(
            "daemon_memory_after_run",
            "daemon memory at rest after the run (all users, containers running, no session)",
            "MiB",
            "—",
        );
        figures.push(match now {
            Ok(m) => f.with(vec![mib(m.rss_kib)], vec![], Ok(())),
            Err(e) => f.failed(&e),
        });
    }
    drop(rig);
    machine.load_at_end = machine::loadavg();
    let results = Results {
        started,
        finished: machine::now_utc(),
        command: args.command.clone(),
        machine,
        targets: report::targets(&figures),
        settings,
        figures,
    };
    report::print(&results);
    let json = args.out.join("results.json");
    report::write_json(&results, &json)?;
    eprintln!(
        "\nberth-bench: wrote {} (the run took {:.0} s)",
        json.display(),
        run_started.elapsed().as_secs_f64()
    );
    if let Some(doc) = &args.doc {
        report::write_doc(&results, doc)?;
        eprintln!("berth-bench: refreshed {}", doc.display());
    }
    Ok(results.figures.iter().all(|f| f.error.is_none()))
}
