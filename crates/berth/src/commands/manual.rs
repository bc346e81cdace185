//! `berth man PAGE`: the manual pages in roff, rendered from the definitions the binary
//! itself runs on, so they cannot drift from it: berth(1) from the clap commands (every
//! subcommand with its synopsis and options), berth.toml(5) from the commented default
//! config that `berth config default` prints (every setting, its explanation and default).

use std::io::Write as _;

use berth_daemon::Config;
use berth_daemon::config::{DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR};
use clap::Command;
use clap_mangen::Man;
use roff::{Roff, bold, italic, roman};

use crate::Failure;

#[derive(clap::Args)]
pub struct Args {
    /// The page: berth (the CLI, section 1) or berth.toml (the config file, section 5)
    page: Page,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Page {
    Berth,
    #[value(name = "berth.toml")]
    BerthToml,
}

pub fn run(args: Args, cli: Command) -> Result<(), Failure> {
    let page = match args.page {
        Page::Berth => berth_1(cli),
        Page::BerthToml => berth_toml_5(),
    };
    std::io::stdout()
        .write_all(page.as_bytes())
        .map_err(|e| Failure::new(format!("cannot write the page: {e}")))
}

/// The date of the commit the binary was built from (the pages change with the source, not
/// with the day they are rendered), empty when unknown.
fn date() -> &'static str {
    berth_proto::COMMIT.split_once(' ').map_or("", |(_, d)| d)
}

fn man(cmd: Command, title: &str, section: &str) -> Man {
    Man::new(cmd)
        .title(title)
        .section(section)
        .date(date())
        .source(format!("berth {}", berth_proto::VERSION))
        .manual("Berth Manual")
}

/// Renders one part of a page with clap_mangen.
fn part(f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> String {
    let mut buf = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = f(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Every command that runs something (no subcommands of its own), depth first, in the order
/// `--help` lists them.
fn leaves(cmd: &Command, out: &mut Vec<Command>) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.has_subcommands() {
            leaves(sub, out);
        } else {
            out.push(sub.clone());
        }
    }
}

fn berth_1(cli: Command) -> String {
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let top = man(cli.clone(), "BERTH", "1");
    let mut page = String::new();
    page += &part(|w| top.render_title(w));
    page += &part(|w| top.render_name_section(w));
    page += &part(|w| top.render_synopsis_section(w));
    page += &part(|w| top.render_description_section(w));
    page += &part(|w| top.render_options_section(w));

    page += ".SH COMMANDS\n";
    let mut all = Vec::new();
    leaves(&cli, &mut all);
    for cmd in all {
        let name = cmd.get_bin_name().unwrap_or(cmd.get_name()).to_owned();
        // -h and the global --state-dir are on every command: said once, above.
        let mut cmd = cmd;
        for id in ["help", "state_dir"] {
            if cmd.get_arguments().any(|a| a.get_id() == id) {
                cmd = cmd.mut_arg(id, |a| a.hide(true));
            }
        }
        let sub = man(cmd.clone(), "BERTH", "1");
        page += &Roff::new().control("SS", [name.as_str()]).to_roff();
        let body = [
            part(|w| sub.render_synopsis_section(w)),
            part(|w| sub.render_description_section(w)),
            if cmd.get_arguments().any(|a| !a.is_hide_set()) {
                part(|w| sub.render_options_section(w))
            } else {
                String::new()
            },
        ];
        for text in body {
            for line in text.lines() {
                // Their own section headings become paragraphs under the command's.
                if line.starts_with(".SH ") {
                    page += ".PP\n";
                } else {
                    page += line;
                    page += "\n";
                }
            }
        }
    }
    page += &berth_1_tail();
    page
}

/// Exit status, environment, files, examples: what clap does not know.
fn berth_1_tail() -> String {
    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for (code, what) in [
        ("0", "success"),
        (
            "1",
            "the request was refused or failed (one error: line on stderr, maybe a hint: line)",
        ),
        ("2", "usage error"),
        (
            "3",
            "the daemon is not running (or its admin socket cannot be reached)",
        ),
    ] {
        r.control("TP", []).text([bold(code)]).text([roman(what)]);
    }
    r.control("PP", []).text([roman(
        "Data goes to stdout, messages to stderr. A command whose output pipe closes ends quietly.",
    )]);

    r.control("SH", ["ENVIRONMENT"]);
    for (var, what) in [
        (
            "BERTH_STATE_DIR",
            "the daemon's state directory, whose admin.sock the commands talk to (as --state-dir)",
        ),
        (
            "BERTH_LOG",
            "the daemon's log filter (tracing syntax), default info,russh=warn,bollard=warn",
        ),
        (
            "BERTH_DEBIAN_MIRROR",
            "the mirror berth image bootstrap uses (as --mirror)",
        ),
        (
            "BERTH_COMPLETE",
            "set by the shell completion scripts (berth completions) when they ask berth for candidates",
        ),
    ] {
        r.control("TP", []).text([bold(var)]).text([roman(what)]);
    }

    r.control("SH", ["FILES"]);
    let files = [
        (
            DEFAULT_CONFIG_PATH.to_owned(),
            "the daemon's configuration, see berth.toml(5); all defaults when missing".to_owned(),
        ),
        (
            DEFAULT_STATE_DIR.to_owned(),
            "the state directory (mode 0700): berth.db (users, keys, settings), \
             host_ed25519_key (the SSH host key, 0600), instance (this installation's id, on \
             its containers as the label berth.instance), admin.sock (the admin API, root \
             only), audit.log (one JSON object per event), run/ and guest/ (what containers \
             mount)"
                .to_owned(),
        ),
        (
            "berth.service".to_owned(),
            "the systemd unit that runs berth daemon (berth config unit prints it)".to_owned(),
        ),
    ];
    for (file, what) in files {
        r.control("TP", []).text([italic(file)]).text([roman(what)]);
    }

    r.control("SH", ["EXAMPLES"]);
    for (what, example) in [
        (
            "Add a user whose container is made from a Debian image; she logs in with plain ssh:",
            "berth user add alice --image berth/debian:bookworm --key alice.pub\nssh -p 2222 alice@server",
        ),
        (
            "Make that image without a registry (debootstrap):",
            "berth image bootstrap berth/debian:bookworm --include openssh-sftp-server,rsync",
        ),
        (
            "What runs, and ending one session:",
            "berth status\nberth session kill 17",
        ),
        (
            "Check a changed config before restarting the daemon:",
            "berth daemon --check --config /etc/berth/berth.toml",
        ),
        (
            "Remove everything of this installation (containers, committed images, state), the daemon stopped:",
            "systemctl stop berth\nberth purge --yes",
        ),
        (
            "Completions for the running shell (the package installs them for bash, zsh and fish):",
            "source <(berth completions bash)",
        ),
    ] {
        r.control("PP", []).text([roman(what)]);
        r.control("PP", []).control("RS", ["4"]).control("nf", []);
        for line in example.lines() {
            r.text([roman(line)]);
        }
        r.control("fi", []).control("RE", []);
    }

    r.control("SH", ["SEE ALSO"]);
    r.text([roman(
        "berth.toml(5), ssh(1), sftp(1), docker(1), systemctl(1); /usr/share/doc/berth/README.md",
    )]);
    r.to_roff()
}

fn berth_toml_5() -> String {
    let commented = Config::default().to_commented_toml();
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            "BERTH.TOML",
            "5",
            date(),
            &format!("berth {}", berth_proto::VERSION),
            "Berth Manual",
        ],
    );
    r.control("SH", ["NAME"]);
    r.text([roman("berth.toml - configuration of the Berth daemon")]);
    r.control("SH", ["SYNOPSIS"]);
    r.text([italic(DEFAULT_CONFIG_PATH)]);
    r.control("SH", ["DESCRIPTION"]);
    r.text([roman(
        "A TOML file read by berth daemon at start (the default path, or --config FILE). \
         Every setting is optional; an unknown key is an error naming it. \
         berth daemon --check validates a file and prints the effective settings, \
         berth config get KEY prints one, and berth config default prints the commented \
         default file this page is made from. Restart the daemon after a change.",
    )]);
    r.control("SH", ["SETTINGS"]);
    r.text([roman(
        "Each setting with its default; a setting shown with e.g. is unset by default.",
    )]);

    // The commented default: blocks of `# help` lines, each ended by `# key = value`; a
    // `[table]` line starts a table, after its own comment.
    let mut help: Vec<&str> = Vec::new();
    let mut table = String::new();
    let mut header_done = false;
    for line in commented.lines() {
        if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = t.to_owned();
            r.control("SS", [format!("[{t}]").as_str()]);
            r.text([roman(help.join(" "))]);
            help.clear();
            continue;
        }
        let Some(text) = line.strip_prefix("# ").or(line.strip_prefix('#')) else {
            if line.is_empty() && !header_done {
                // The file's opening comment is the description above.
                header_done = true;
                help.clear();
            }
            continue;
        };
        let setting = text.split_once(" = ").filter(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
        match setting {
            Some((key, value)) => {
                let full = if table.is_empty() {
                    key.to_owned()
                } else {
                    format!("{table}.{key}")
                };
                let unset = Config::default().get(&full).ok().flatten().is_none();
                r.control("TP", []);
                r.text([
                    bold(key),
                    roman(if unset { " (unset; e.g. " } else { " = " }),
                    italic(value),
                    roman(if unset { ")" } else { "" }),
                ]);
                r.text([roman(help.join(" "))]);
                help.clear();
            }
            None => help.push(text),
        }
    }

    r.control("SH", ["EXAMPLE"]);
    r.text([roman(
        "Listen on one address, keep containers a minute after the last session, smaller containers:",
    )]);
    r.control("PP", []).control("RS", ["4"]).control("nf", []);
    for line in [
        "listen = \"192.0.2.10:2222\"",
        "idle_stop_seconds = 60",
        "",
        "[limits]",
        "memory_mb = 1024",
        "cpus = 0.5",
    ] {
        r.text([roman(line)]);
    }
    r.control("fi", []).control("RE", []);
    r.control("SH", ["FILES"]);
    r.control("TP", []).text([italic(DEFAULT_CONFIG_PATH)]);
    r.text([roman(
        "this file; a package upgrade keeps an admin's edits (it is a conffile)",
    )]);
    r.control("SH", ["SEE ALSO"]);
    r.text([roman("berth(1)")]);
    r.to_roff()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting of the default config is on the page, with its default.
    #[test]
    fn berth_toml_lists_every_setting() {
        let page = berth_toml_5();
        for s in berth_daemon::config::SETTINGS {
            let key = s.key.rsplit('.').next().unwrap_or(s.key);
            assert!(
                page.contains(&format!("\\fB{key}\\fR")),
                "{key} missing from berth.toml(5)"
            );
        }
        assert!(page.contains("\\fBpids\\fR = \\fI1024\\fR"), "{page}");
        assert!(page.contains(".SS [limits]"), "{page}");
        assert!(
            page.contains("\\fBmetrics_listen\\fR (unset; e.g. "),
            "{page}"
        );
    }

    /// Every command that runs something has its own entry in berth(1).
    #[test]
    fn berth_lists_every_command() {
        let page = berth_1(<crate::Cli as clap::CommandFactory>::command());
        for cmd in [
            "berth user add",
            "berth user key rm",
            "berth image bootstrap",
            "berth purge",
            "berth completions",
            "berth man",
            "berth config unit",
        ] {
            assert!(
                page.contains(&format!(".SS \"{cmd}\"")) || page.contains(&format!(".SS {cmd}\n")),
                "{cmd} missing"
            );
        }
        for section in ["EXIT STATUS", "FILES", "EXAMPLES", "ENVIRONMENT"] {
            assert!(
                page.contains(&format!(".SH \"{section}\""))
                    || page.contains(&format!(".SH {section}\n")),
                "{section} missing"
            );
        }
    }
}
