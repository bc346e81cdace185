//! `berth image ...`: make images without a registry (debootstrap, or any root file system
//! tarball), list them with their users, remove one nobody needs.
//!
//! The root file system is streamed to the daemon, which imports it (`docker import`); the
//! CLI never talks to Docker itself.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_proto::{ImageInfo, ImageName};
use comfy_table::{Table, presets::NOTHING};
use indicatif::{ProgressBar, ProgressStyle};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use super::{block_on, client};
use crate::Failure;

const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Make a Debian image with debootstrap (needs root and a Debian mirror, no registry)
    Bootstrap {
        /// Name of the new image, e.g. berth/debian:bookworm
        name: String,
        /// Debian release
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Extra packages, comma-separated (e.g. openssh-sftp-server,rsync,vim)
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// Debian mirror
        #[arg(long, default_value = DEFAULT_MIRROR, env = "BERTH_DEBIAN_MIRROR")]
        mirror: String,
    },
    /// Import a root file system tarball (.tar, .tar.gz, .tar.xz) as an image
    Import { file: PathBuf, name: String },
    /// List local images, their size and the users whose containers are made from them
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image no user needs
    Rm { name: String },
}

pub fn run(cmd: ImageCommand, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    let c = client(state_dir);
    match cmd {
        ImageCommand::List { json } => {
            let images: Vec<ImageInfo> = block_on(async { Ok(c.get("/images").await?) })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&images).unwrap_or_default()
                );
                return Ok(());
            }
            let mut t = Table::new();
            t.load_style(NOTHING)
                .set_header(["IMAGE", "SIZE", "CREATED", "USERS"]);
            for i in images {
                let created = std::time::UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(i.created).unwrap_or(0));
                t.add_row([
                    i.name,
                    human_size(i.size_bytes),
                    humantime::format_rfc3339_seconds(created).to_string(),
                    if i.users.is_empty() {
                        "-".into()
                    } else {
                        i.users.join(",")
                    },
                ]);
            }
            println!("{}", t.trim_fmt());
            Ok(())
        }
        ImageCommand::Rm { name } => {
            let path = format!("/images/{}", utf8_percent_encode(&name, NON_ALPHANUMERIC));
            let i: ImageInfo = block_on(async { Ok(c.delete(&path).await?) })?;
            println!("removed image {} ({})", i.name, short_id(&i.id));
            Ok(())
        }
        ImageCommand::Import { file, name } => {
            let name = image_name(&name)?;
            let f = std::fs::File::open(&file)
                .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?;
            // Refusals the daemon would make before reading the upload are made here first:
            // a request refused mid-upload ends as a broken connection, not a clear line.
            refuse_existing(&c, &name)?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let bar = ProgressBar::new(len).with_style(bytes_style());
            bar.set_message(format!("importing {name}"));
            let info = block_on(async {
                let reader = bar.wrap_async_read(tokio::fs::File::from_std(f));
                let stream = tokio_util::io::ReaderStream::new(reader);
                Ok(c.post_stream(&import_path(&name), stream).await?)
            });
            bar.finish_and_clear();
            print_imported(&info?);
            Ok(())
        }
        ImageCommand::Bootstrap {
            name,
            suite,
            include,
            mirror,
        } => bootstrap(&c, &image_name(&name)?, &suite, &include, &mirror),
    }
}

/// Fails when image `name` exists already (or the daemon does not answer).
fn refuse_existing(c: &berth_proto::AdminClient, name: &ImageName) -> Result<(), Failure> {
    let images: Vec<ImageInfo> = block_on(async { Ok(c.get("/images").await?) })?;
    let full = name.full();
    if images.iter().any(|i| i.name == full) {
        return Err(Failure {
            message: format!("image {full} already exists"),
            hint: Some(format!("remove it first with `berth image rm {full}`")),
            code: 1,
        });
    }
    Ok(())
}

fn image_name(s: &str) -> Result<ImageName, Failure> {
    ImageName::parse(s).map_err(|e| Failure::new(e.to_string()))
}

fn import_path(name: &ImageName) -> String {
    format!(
        "/images?name={}",
        utf8_percent_encode(name.as_str(), NON_ALPHANUMERIC)
    )
}

fn print_imported(i: &ImageInfo) {
    println!(
        "imported {} ({}, {})",
        i.name,
        short_id(&i.id),
        human_size(i.size_bytes)
    );
}

fn short_id(id: &str) -> &str {
    let id = id.trim_start_matches("sha256:");
    id.get(..12).unwrap_or(id)
}

fn human_size(n: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let f = n as f64;
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", f / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", f / 1e6),
        _ => format!("{:.2} GB", f / 1e9),
    }
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// debootstrap into a temporary directory (progress from its `--debian-installer` protocol),
/// then the tree as a tar stream to the daemon.
fn bootstrap(
    c: &berth_proto::AdminClient,
    name: &ImageName,
    suite: &str,
    include: &[String],
    mirror: &str,
) -> Result<(), Failure> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure::new(
            "berth image bootstrap must run as root (debootstrap needs it)",
        ));
    }
    let valid_word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "+-.".contains(ch))
            && !s.starts_with('-')
    };
    if !valid_word(suite) {
        return Err(Failure::new(format!("bad suite name {suite:?}")));
    }
    if let Some(bad) = include.iter().find(|p| !valid_word(p)) {
        return Err(Failure::new(format!("bad package name {bad:?}")));
    }
    // Fail before minutes of work: the daemon answers and the name is free.
    refuse_existing(c, name)?;
    let work = tempfile::Builder::new()
        .prefix("berth-bootstrap-")
        .tempdir_in("/var/tmp")
        .map_err(|e| Failure::new(format!("cannot make a work directory in /var/tmp: {e}")))?;
    let root = work.path().join("root");
    let log = work.path().join("debootstrap.log");
    let mut cmd = Command::new("sh");
    // debootstrap's installer protocol goes to fd 3 (progress, info, errors); its full
    // output to the log.
    cmd.arg("-c")
        .arg("log=$1; shift; exec debootstrap --debian-installer \"$@\" 3>&1 >\"$log\" 2>&1")
        .arg("sh")
        .arg(&log)
        .arg("--variant=minbase");
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.arg(suite).arg(&root).arg(mirror);
    if which("debootstrap").is_none() {
        return Err(Failure {
            message: "debootstrap is not installed".into(),
            hint: Some("install it with `apt-get install debootstrap`".into()),
            code: 1,
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Failure::new(format!("cannot run debootstrap: {e}")))?;
    let bar = ProgressBar::new(100).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message(format!("debootstrap {suite} from {mirror}"));
    let mut error = None;
    if let Some(out) = child.stdout.take() {
        let mut msg = Message::default();
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            match msg.feed(&line) {
                Some(Event::Progress(now, end)) => {
                    bar.set_length(end.max(1));
                    bar.set_position(now.min(end));
                }
                Some(Event::Info(text)) => bar.set_message(text),
                Some(Event::Warning(text)) => bar.println(format!("warning: {text}")),
                Some(Event::Error(text)) => error = Some(text),
                None => {}
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| Failure::new(format!("debootstrap: {e}")))?;
    bar.finish_and_clear();
    if !status.success() {
        // Kept under a fresh name (created exclusively: no file of anybody else's is written).
        let kept = tempfile::Builder::new()
            .prefix("berth-bootstrap-")
            .suffix(".log")
            .tempfile_in("/var/tmp")
            .ok()
            .and_then(|mut f| {
                let mut log = std::fs::File::open(&log).ok()?;
                std::io::copy(&mut log, f.as_file_mut()).ok()?;
                f.keep().ok().map(|(_, p)| p)
            })
            .unwrap_or(log.clone());
        return Err(Failure {
            message: format!(
                "debootstrap failed: {}",
                error.unwrap_or_else(|| format!("exit status {status}"))
            ),
            hint: Some(format!(
                "its full output is in {} (is {mirror} reachable, and {suite} a release it has?)",
                kept.display()
            )),
            code: 1,
        });
    }
    import_tree(c, name, &root)
}

/// Streams `root` as a tar to the daemon's import.
fn import_tree(c: &berth_proto::AdminClient, name: &ImageName, root: &Path) -> Result<(), Failure> {
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "-C"])
        .arg(root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Failure::new(format!("cannot run tar: {e}")))?;
    let out = tar
        .stdout
        .take()
        .ok_or_else(|| Failure::new("tar has no output"))?;
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} {bytes} {binary_bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message(format!("importing {name}"));
    let info = block_on(async {
        let out = tokio::process::ChildStdout::from_std(out)
            .map_err(|e| Failure::new(format!("tar: {e}")))?;
        let stream = tokio_util::io::ReaderStream::new(bar.wrap_async_read(out));
        Ok(c.post_stream(&import_path(name), stream).await?)
    });
    bar.finish_and_clear();
    let tar_status = tar.wait();
    let info: ImageInfo = info?;
    if !tar_status.is_ok_and(|s| s.success()) {
        // What was imported is a partial tree: it must not stay under the name.
        let path = format!(
            "/images/{}",
            utf8_percent_encode(&info.name, NON_ALPHANUMERIC)
        );
        let _ = block_on(async { Ok(c.delete::<ImageInfo>(&path).await?) });
        return Err(Failure::new(format!(
            "tar failed while {} was imported; the image was removed",
            info.name
        )));
    }
    print_imported(&info);
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// One thing debootstrap's installer protocol reported.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Progress(u64, u64),
    Info(String),
    Warning(String),
    Error(String),
}

/// Assembles the protocol's multi-line messages: `I: NAME`, `IA: arg`…, `IF: format`
/// (and `W`, `E`), and `P: now end NAME` for progress.
#[derive(Default)]
struct Message {
    args: Vec<String>,
}

impl Message {
    fn feed(&mut self, line: &str) -> Option<Event> {
        let (tag, rest) = line.split_once(": ").unwrap_or((line, ""));
        match tag {
            "P" => {
                let mut it = rest.split_whitespace();
                let now = it.next()?.parse().ok()?;
                let end = it.next()?.parse().ok()?;
                Some(Event::Progress(now, end))
            }
            "I" | "W" | "E" => {
                self.args.clear();
                None
            }
            "IA" | "WA" | "EA" | "PA" => {
                self.args.push(rest.to_owned());
                None
            }
            "IF" | "WF" | "EF" => {
                let mut args = std::mem::take(&mut self.args).into_iter();
                let mut text = String::new();
                let mut parts = rest.split("%s");
                if let Some(first) = parts.next() {
                    text.push_str(first);
                }
                for part in parts {
                    text.push_str(&args.next().unwrap_or_default());
                    text.push_str(part);
                }
                let text = text.replace("%%", "%");
                Some(match tag {
                    "IF" => Event::Info(text),
                    "WF" => Event::Warning(text),
                    _ => Event::Error(text),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installer_protocol_is_assembled_into_events() {
        let mut m = Message::default();
        let lines = [
            "P: 10 100 DOWNREL",
            "PA: x",
            "PF: Retrieving %s",
            "I: RETRIEVING",
            "IA: libc6",
            "IF: Retrieving %s",
            "E: NOTFOUND",
            "EA: http://127.0.0.1:1/debian/dists/bookworm/InRelease",
            "EF: Failed getting release file %s",
        ];
        let events: Vec<Event> = lines.iter().filter_map(|l| m.feed(l)).collect();
        assert_eq!(
            events,
            vec![
                Event::Progress(10, 100),
                Event::Info("Retrieving libc6".into()),
                Event::Error(
                    "Failed getting release file http://127.0.0.1:1/debian/dists/bookworm/InRelease"
                        .into()
                ),
            ]
        );
    }

    #[test]
    fn sizes_read_like_docker_images() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_980_000), "2.0 MB");
        assert_eq!(human_size(499_000_000), "499.0 MB");
    }
}
