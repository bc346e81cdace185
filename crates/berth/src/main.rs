//! `berth`: the one binary. `berth daemon` runs the server; every other command is a thin
//! client of the daemon's admin socket. Parsing, logging setup and exit codes live here;
//! the work is in the library crates.
//!
//! Exit codes: 0 success, 1 the request was refused or failed, 2 usage error, 3 the daemon
//! is not running (or its socket is not reachable).

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Personal, persistent containers reached with plain ssh"
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
    let cli = Cli::parse();
    let state_dir = cli.state_dir;
    let result = match cli.command {
        Command::Daemon(args) => commands::daemon::run(args, state_dir),
        Command::User(cmd) => commands::user::run(cmd, state_dir),
        Command::Image(cmd) => commands::image::run(cmd, state_dir),
        Command::Status(args) => commands::status::status(args, state_dir),
        Command::Session(cmd) => commands::status::session(cmd, state_dir),
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
