//! `berth completions SHELL` and the completion engine behind it. The script a shell sources
//! is small: at each Tab it asks this binary (`BERTH_COMPLETE=SHELL berth -- WORDS...`), so
//! subcommands and flags always match the installed binary, and user, image and session
//! names come from the running daemon. Asking the daemon never holds the shell up: no
//! daemon, a socket only root may open, or a daemon that does not answer within [`DEADLINE`]
//! all mean no names, at once.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use berth_proto::{ImageInfo, StatusInfo, UserInfo};
use clap::Command;
use clap_complete::env::{CompleteEnv, EnvCompleter};
use clap_complete::{ArgValueCandidates, CompletionCandidate};

use crate::Failure;

/// The variable that makes `berth` answer a completion request instead of running.
pub const VAR: &str = "BERTH_COMPLETE";

/// How long a Tab may wait for the daemon's names. Image names come from the engine, which a
/// busy machine (builds, many containers starting) can keep past a second.
const DEADLINE: Duration = Duration::from_millis(2000);

#[derive(clap::Args)]
pub struct Args {
    /// The shell to print the completion script for
    shell: Shell,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Prints the script that registers `berth`'s completions with `args.shell`.
pub fn run(args: Args) -> Result<(), Failure> {
    let shell: &dyn EnvCompleter = match args.shell {
        Shell::Bash => &clap_complete::env::Bash,
        Shell::Zsh => &clap_complete::env::Zsh,
        Shell::Fish => &clap_complete::env::Fish,
    };
    let mut script = Vec::new();
    // The script calls `berth` by name (found on PATH), never by the path this copy was run
    // from: a package builds its scripts with a binary that is not where it installs it.
    shell
        .write_registration(VAR, "berth", "berth", "berth", &mut script)
        .and_then(|()| std::io::stdout().write_all(&script))
        .map_err(|e| Failure::new(format!("cannot write the completion script: {e}")))
}

/// When a shell's completion script made this call, answers it and exits; otherwise returns.
pub fn answer_if_asked(factory: fn() -> Command) {
    CompleteEnv::with_factory(move || with_candidates(factory(), ""))
        .var(VAR)
        .completer("berth")
        .complete();
}

/// Where an argument's values come from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Names {
    Users,
    Images,
    Sessions,
}

/// Which arguments complete from the daemon: a user's name under `user` (but the new one of
/// `user add`), an image, a session's id.
fn names_for(path: &str, arg: &str) -> Option<Names> {
    match (path, arg) {
        (_, "image") | ("image rm", "name") => Some(Names::Images),
        ("session kill", "id") => Some(Names::Sessions),
        ("user add", _) => None,
        (p, "name") if p.starts_with("user ") => Some(Names::Users),
        _ => None,
    }
}

/// `cmd` (at `path`, e.g. `user key rm`) with the daemon's names attached to every argument
/// [`names_for`] names, in it and its subcommands.
fn with_candidates(mut cmd: Command, path: &str) -> Command {
    let args: Vec<(String, Names)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let id = a.get_id().as_str();
            names_for(path, id).map(|n| (id.to_owned(), n))
        })
        .collect();
    for (id, names) in args {
        cmd = cmd.mut_arg(id, |a| {
            a.add(ArgValueCandidates::new(move || ask_daemon(names)))
        });
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for sub in subs {
        let sub_path = if path.is_empty() {
            sub.clone()
        } else {
            format!("{path} {sub}")
        };
        cmd = cmd.mut_subcommand(sub, |c| with_candidates(c, &sub_path));
    }
    cmd
}

/// The daemon's names, or none when it does not answer in time. The state directory is
/// `BERTH_STATE_DIR` or the default (a `--state-dir` on the line being completed is not seen).
fn ask_daemon(names: Names) -> Vec<CompletionCandidate> {
    let client = super::client(std::env::var_os("BERTH_STATE_DIR").map(PathBuf::from));
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let ask = async {
        let found: Vec<CompletionCandidate> = match names {
            Names::Users => client
                .get::<Vec<UserInfo>>("/users?measured=false")
                .await
                .ok()?
                .into_iter()
                .map(|u| {
                    CompletionCandidate::new(u.name.as_str())
                        .help(Some(u.image.as_str().to_owned().into()))
                })
                .collect(),
            Names::Images => client
                .get::<Vec<ImageInfo>>("/images?users=false")
                .await
                .ok()?
                .into_iter()
                .map(|i| CompletionCandidate::new(i.name))
                .collect(),
            Names::Sessions => client
                .get::<StatusInfo>("/status")
                .await
                .ok()?
                .sessions
                .into_iter()
                .map(|s| {
                    CompletionCandidate::new(s.id.to_string())
                        .help(Some(format!("{} {}", s.user, s.command).into()))
                })
                .collect(),
        };
        Some(found)
    };
    rt.block_on(async { tokio::time::timeout(DEADLINE, ask).await })
        .ok()
        .flatten()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument that should complete from the daemon does, and no other.
    #[test]
    fn names_are_attached_where_they_belong() {
        fn walk(cmd: &Command, path: &str, out: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if a.get::<ArgValueCandidates>().is_some() {
                    out.push(format!("{path} <{}>", a.get_id()));
                }
            }
            for s in cmd.get_subcommands() {
                let p = format!("{path} {}", s.get_name()).trim().to_owned();
                walk(s, &p, out);
            }
        }
        let cmd = with_candidates(<crate::Cli as clap::CommandFactory>::command(), "");
        let mut found = Vec::new();
        walk(&cmd, "", &mut found);
        for expected in [
            "user add <image>",
            "user rm <name>",
            "user show <name>",
            "user set <name>",
            "user key add <name>",
            "user key rm <name>",
            "user key list <name>",
            "image rm <name>",
            "session kill <id>",
        ] {
            assert!(found.iter().any(|f| f == expected), "{expected}: {found:?}");
        }
        assert!(!found.iter().any(|f| f == "user add <name>"), "{found:?}");
        assert!(
            !found.iter().any(|f| f.starts_with("image import")),
            "{found:?}"
        );
    }
}
