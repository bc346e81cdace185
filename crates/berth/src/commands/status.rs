//! `berth status` and `berth session kill ID`.

use std::path::PathBuf;

use berth_proto::{SessionInfo, StatusInfo};
use comfy_table::{Table, presets::NOTHING};

use super::{block_on, client};
use crate::Failure;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of tables
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum SessionCommand {
    /// List open sessions
    List {
        #[arg(long)]
        json: bool,
    },
    /// End a session: its processes get SIGHUP, then SIGKILL two seconds later
    Kill {
        /// The session's ID (see `berth status`)
        id: u64,
    },
}

pub fn status(args: StatusArgs, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    let c = client(state_dir);
    let st: StatusInfo = block_on(async { Ok(c.get("/status").await?) })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
        return Ok(());
    }
    let engine = match (&st.docker_version, &st.docker_error) {
        (Some(v), _) => format!("Docker {v}"),
        (None, Some(e)) => format!("NOT AVAILABLE ({e})"),
        (None, None) => "NOT AVAILABLE".into(),
    };
    let running = st.containers.iter().filter(|c| c.running).count();
    println!(
        "daemon:     running (berth {}, pid {}, up {}), ssh on {}",
        st.version,
        st.pid,
        humantime::format_duration(std::time::Duration::from_secs(st.uptime_seconds)),
        st.listen
    );
    println!("engine:     {engine}");
    println!("users:      {}", st.users);
    println!(
        "containers: {running} running, {} stopped",
        st.containers.len() - running
    );
    println!("sessions:   {}", st.sessions.len());
    println!(
        "load:       {} tasks, {} descriptors",
        st.tasks, st.descriptors
    );
    if let Some(b) = st.disk_bytes {
        println!(
            "disk use:   {} (containers, home volumes and committed images; measured at most \
             every {} s)",
            berth_daemon::disk::human_bytes(b),
            berth_daemon::disk::FRESH.as_secs()
        );
    }
    if let Some(q) = &st.disk_quota {
        println!("disk quota: {q}");
    }
    if let Some(i) = &st.isolation {
        println!("isolation:  {i}");
    }
    if let Some(u) = &st.user_namespaces {
        println!("user namespaces: {u}");
    }
    if let Some(g) = &st.gpus {
        println!("GPUs: {g}");
    }
    if !st.containers.is_empty() {
        let mut t = Table::new();
        t.load_style(NOTHING)
            .set_header(["USER", "CONTAINER", "STATE"]);
        for c in &st.containers {
            t.add_row([
                c.user.as_str(),
                c.name.as_str(),
                if c.running { "running" } else { "stopped" },
            ]);
        }
        println!("\n{}", t.trim_fmt());
    }
    if !st.sessions.is_empty() {
        println!("\n{}", sessions_table(&st.sessions));
    }
    Ok(())
}

fn sessions_table(sessions: &[SessionInfo]) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_header(["ID", "USER", "FROM", "SINCE", "COMMAND"]);
    for s in sessions {
        t.add_row([
            s.id.to_string(),
            s.user.clone(),
            s.from.clone(),
            s.since.clone(),
            s.command
                .chars()
                .filter(|c| !c.is_control())
                .take(60)
                .collect(),
        ]);
    }
    t.trim_fmt()
}

pub fn session(cmd: SessionCommand, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    let c = client(state_dir);
    match cmd {
        SessionCommand::List { json } => {
            let st: StatusInfo = block_on(async { Ok(c.get("/status").await?) })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st.sessions).unwrap_or_default()
                );
            } else if !st.sessions.is_empty() {
                println!("{}", sessions_table(&st.sessions));
            }
            Ok(())
        }
        SessionCommand::Kill { id } => {
            let s: SessionInfo =
                block_on(async { Ok(c.delete(&format!("/sessions/{id}")).await?) })?;
            let command: String = s.command.chars().filter(|c| !c.is_control()).collect();
            println!("killed session {} of {} ({command})", s.id, s.user);
            Ok(())
        }
    }
}
