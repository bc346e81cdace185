//! `berth`: the one binary. `berth daemon` runs the server; `berth config` and `berth purge`
//! are what an installer needs from it with no daemon running (the default config, one
//! setting, the systemd unit; removing an installation); every other command is a thin
//! client of the daemon's admin socket; `berth completions` and `berth man` print what a
//! package installs for shells and `man`, made from the definitions below. Parsing, logging setup and exit codes live here;
//! the work is in the library crates.
//!
//! Exit codes: 0 success, 1 the request was refused or failed, 2 usage error, 3 the daemon
//! is not running (or its socket is not reachable). A command whose output pipe closes is
//! ended by SIGPIPE, as `ls | head` is.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth",
    version = berth_proto::VERSION_LONG,
    about = "Personal, persistent containers reached with plain ssh",
    long_about = "Berth gives every user of a Linux server a personal, persistent container \
that she reaches with plain ssh: `berth daemon` is the SSH server (on its own port, 2222 by \
default) and the only program that talks to Docker; her container is made from the image the \
admin chose at her first login, started at the next, stopped a few seconds after her last \
session. The other commands manage users, keys, images and sessions through the daemon's \
root-only admin socket."
)]
struct Cli {
    /// State directory of the daemon (its admin socket lives there)
    #[arg(long, global = true, env = "BERTH_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground: SSH gateway, lifecycle manager, admin socket
    Daemon(commands::daemon::Args),
    /// Manage users: add, rm, list, show, key
    #[command(subcommand)]
    User(commands::user::UserCommand),
    /// Images: bootstrap (debootstrap), import, list, rm
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Daemon health, Docker engine, users, containers and open sessions
    Status(commands::status::StatusArgs),
    /// Open sessions: list, kill
    #[command(subcommand)]
    Session(commands::status::SessionCommand),
    /// The commented default config, one effective setting, the systemd unit
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
    /// Remove this installation's containers, committed images and state (daemon stopped)
    Purge(commands::purge::Args),
    /// Print the completion script for bash, zsh or fish (names come from the daemon)
    Completions(commands::completions::Args),
    /// Print a manual page (roff): berth(1) or berth.toml(5)
    Man(commands::manual::Args),
    /// On your laptop: mount local directories at the same paths in your container and run
    /// a command there (or a login shell), over your own ssh
    Connect(commands::connect::Args),
}

/// A failure the CLI reports: one line, an optional hint, an exit code.
pub struct Failure {
    pub message: String,
    pub hint: Option<String>,
    pub code: u8,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            code: 1,
        }
    }
}

impl From<berth_proto::ClientError> for Failure {
    fn from(e: berth_proto::ClientError) -> Self {
        let code = match e {
            berth_proto::ClientError::NotRunning { .. } => 3,
            _ => 1,
        };
        Self {
            hint: e.hint(),
            message: e.to_string(),
            code,
        }
    }
}

fn main() -> ExitCode {
    commands::completions::answer_if_asked(Cli::command);
    let cli = Cli::parse_from(as_berth_args(std::env::args_os()));
    if !matches!(&cli.command, Command::Daemon(a) if a.serves()) {
        end_quietly_on_closed_pipe();
    }
    let state_dir = cli.state_dir;
    let result = match cli.command {
        Command::Daemon(args) => commands::daemon::run(args, state_dir),
        Command::User(cmd) => commands::user::run(cmd, state_dir),
        Command::Image(cmd) => commands::image::run(cmd, state_dir),
        Command::Status(args) => commands::status::status(args, state_dir),
        Command::Session(cmd) => commands::status::session(cmd, state_dir),
        Command::Config(cmd) => commands::config::run(cmd, state_dir),
        Command::Purge(args) => commands::purge::run(args, state_dir),
        Command::Completions(args) => commands::completions::run(args),
        Command::Man(args) => commands::manual::run(args, Cli::command()),
        Command::Connect(args) => return commands::connect::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            if let Some(h) = f.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(f.code)
        }
    }
}

/// Run as `connect` (a link named like the original tools' `connect.sh`), `berth` is `berth
/// connect`.
fn as_berth_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.collect();
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_os_string());
    if invoked_as.is_some_and(|n| n == "connect" || n == "connect.sh") {
        args.insert(1, "connect".into());
    }
    args
}

/// A command whose reader has gone (`berth user list | head -1`) ends at its next write,
/// killed by SIGPIPE as `ls | head` is, instead of panicking in `println!` (Rust starts
/// programs with SIGPIPE ignored). Not for the daemon: it keeps SIGPIPE ignored and handles
/// EPIPE on each connection, which a signal would end all at once.
#[allow(
    unsafe_code,
    reason = "no safe way to set a signal disposition on stable Rust"
)]
fn end_quietly_on_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: `signal` is unsafe because a handler runs in signal context and may race with
    // other threads changing dispositions. SIG_DFL installs no handler (no code of ours runs
    // on SIGPIPE), and this runs first in `main`, before any other thread exists.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
