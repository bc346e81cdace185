//! `berth user ...`: add, remove, list and show users, and manage their keys.

use std::path::{Path, PathBuf};

use berth_proto::{
    AddKeysRequest, AddUserRequest, AuthorizedKey, Effective, ImageName, KeyInfo, RemovedKeys,
    SetForwardingRequest, SetSettingsRequest, Switch, UserInfo, UserName, parse_authorized_keys,
};
use comfy_table::{Table, presets::NOTHING};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use super::{block_on, client};
use crate::Failure;

#[derive(clap::Subcommand)]
pub enum UserCommand {
    /// Add a user who logs in with the given keys into a container made from IMAGE
    Add {
        name: String,
        /// Image of the user's container (must be present locally)
        #[arg(long)]
        image: String,
        /// Public key file in authorized_keys format (repeatable)
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Remove a user: stops and removes the container, then the user and her committed image;
    /// her home volume is kept (a user added again under the same name gets it back) unless
    /// --purge-data
    Rm {
        name: String,
        /// Keep the image her `commit` made
        #[arg(long)]
        keep_image: bool,
        /// Remove her home volume too (her files in it are gone for good)
        #[arg(long)]
        purge_data: bool,
    },
    /// End every SSH connection of a user now (her sessions, forwards and agent sockets);
    /// her keys stay, so she can log in again
    Kick { name: String },
    /// Write one archive (a tar) with everything of a user: settings, keys, her committed
    /// image and her home volume's files; `berth user import` on another host recreates her
    Export {
        name: String,
        /// The archive to write (must not exist)
        file: PathBuf,
    },
    /// Recreate a user from an archive `berth user export` wrote (her base image must be
    /// present on this host)
    Import { file: PathBuf },
    /// List users
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one user
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Manage a user's keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Set what a user gets apart from the server's config: forwarding switches, limits, GPUs,
    /// shared folders and her image (`default` returns a value to the server's). Memory and
    /// CPUs apply to her running container at once; pids, GPUs, folders and the image from her
    /// next new container
    Set {
        name: String,
        /// Her base image, for her next new container (must be present locally). Her
        /// committed image, if any, is kept and still used until --drop-commit; her home
        /// volume comes along either way
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
        /// Forget her committed image (removed unless still in use): her next new container
        /// is made from her base image
        #[arg(long)]
        drop_commit: bool,
        /// Memory, swap included: e.g. 8G or 512M, none, or default
        #[arg(long, value_name = "SIZE|none|default")]
        memory: Option<String>,
        /// CPUs: e.g. 4 or 0.5, none, or default
        #[arg(long, value_name = "N|none|default")]
        cpus: Option<String>,
        /// Processes in her container (16 to 4194304), or default
        #[arg(long, value_name = "N|default")]
        pids: Option<String>,
        /// GPUs through the NVIDIA container runtime: all, none, device ids (0,2), or default
        #[arg(long, value_name = "all|none|IDS|default")]
        gpus: Option<String>,
        /// Share a host directory (or file) with her: SOURCE:TARGET, or SOURCE:TARGET:ro for
        /// read-only (repeatable)
        #[arg(long, value_name = "SOURCE:TARGET[:ro]")]
        mount: Vec<String>,
        /// Stop sharing the folder at TARGET with her (repeatable)
        #[arg(long, value_name = "TARGET")]
        unmount: Vec<String>,
        /// ssh -L and -R
        #[arg(long, value_name = "on|off|default")]
        tcp_forwarding: Option<SwitchArg>,
        /// ssh -A
        #[arg(long, value_name = "on|off|default")]
        agent_forwarding: Option<SwitchArg>,
        /// ssh -X
        #[arg(long, value_name = "on|off|default")]
        x11_forwarding: Option<SwitchArg>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SwitchArg {
    On,
    Off,
    Default,
}

impl From<SwitchArg> for Switch {
    fn from(s: SwitchArg) -> Self {
        match s {
            SwitchArg::On => Switch::On,
            SwitchArg::Off => Switch::Off,
            SwitchArg::Default => Switch::Default,
        }
    }
}

#[derive(clap::Subcommand)]
pub enum KeyCommand {
    /// Add keys from files in authorized_keys format
    Add {
        name: String,
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Remove a key, given by fingerprint (SHA256:...) or by a file holding it
    Rm { name: String, key: String },
    /// List a user's keys
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: UserCommand, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    let c = client(state_dir);
    match cmd {
        UserCommand::Add { name, image, keys } => {
            let name = user_name(&name)?;
            let image = ImageName::parse(&image).map_err(|e| Failure::new(e.to_string()))?;
            let keys = read_key_files(&keys)?;
            let req = AddUserRequest { name, image, keys };
            let info: UserInfo = block_on(async { Ok(c.post("/users", &req).await?) })?;
            eprintln!(
                "added user {} (image {}, {} key(s))",
                info.name, info.image, info.keys
            );
            if let Some(home) = &info.home {
                eprintln!(
                    "reusing the home volume {} kept from an earlier user {}",
                    home.volume, info.name
                );
            }
            Ok(())
        }
        UserCommand::Rm {
            name,
            keep_image,
            purge_data,
        } => {
            let name = user_name(&name)?;
            let path = format!("/users/{name}?keep_image={keep_image}&purge_data={purge_data}");
            let info: UserInfo = block_on(async { Ok(c.delete(&path).await?) })?;
            match (&info.committed_image, keep_image) {
                (Some(img), true) => {
                    eprintln!("removed user {name} and their container; kept image {img}")
                }
                (Some(img), false) => {
                    eprintln!("removed user {name}, their container and image {img}")
                }
                (None, _) => eprintln!("removed user {name} and their container"),
            }
            match &info.home {
                Some(h) if h.removed => eprintln!("removed their home volume {}", h.volume),
                Some(h) => eprintln!(
                    "kept their home volume {} (berth user add {name} gives it back; \
                     docker volume rm {} deletes it)",
                    h.volume, h.volume
                ),
                None => {}
            }
            Ok(())
        }
        UserCommand::Export { name, file } => export(&c, &user_name(&name)?, &file),
        UserCommand::Import { file } => import(&c, &file),
        UserCommand::Kick { name } => {
            let name = user_name(&name)?;
            let info: berth_proto::KickedInfo =
                block_on(async { Ok(c.post(&format!("/users/{name}/kick"), &()).await?) })?;
            eprintln!(
                "kicked {}: {} connection(s) closed",
                info.user, info.connections
            );
            Ok(())
        }
        UserCommand::List { json } => {
            let users: Vec<UserInfo> = block_on(async { Ok(c.get("/users").await?) })?;
            if json {
                print_json(&users)
            } else {
                print_users(&users);
                Ok(())
            }
        }
        UserCommand::Show { name, json } => {
            let name = user_name(&name)?;
            let user: UserInfo = block_on(async { Ok(c.get(&format!("/users/{name}")).await?) })?;
            if json {
                print_json(&user)
            } else {
                println!("name:       {}", user.name);
                println!("image:      {}", user.image);
                if let Some(img) = &user.committed_image {
                    println!(
                        "committed:  {img} (her next new container is made from it; \
                         berth user set {} --drop-commit forgets it)",
                        user.name
                    );
                }
                println!(
                    "container:  {} ({})",
                    user.container_name,
                    user.container.as_str()
                );
                println!("sessions:   {}", user.sessions);
                println!("disk:       {}", disk_parts(&user));
                match &user.home {
                    Some(h) => println!(
                        "home:       volume {}{}, {} (kept across remove, a new image and \
                         user rm; not in commits)",
                        h.volume,
                        h.target
                            .as_deref()
                            .map(|t| format!(" at {t}"))
                            .unwrap_or_default(),
                        disk(h.bytes)
                    ),
                    None => println!("home:       in the container (no home volume)"),
                }
                println!(
                    "daemon:     {}",
                    if user.daemon_mode { "on" } else { "off" }
                );
                println!("keys:       {}", user.keys);
                let onoff = |b: bool| if b { "on" } else { "off" };
                println!(
                    "forwarding: tcp {}, agent {}, x11 {}",
                    onoff(user.forwarding.tcp),
                    onoff(user.forwarding.agent),
                    onoff(user.forwarding.x11)
                );
                print_settings(&user);
                Ok(())
            }
        }
        UserCommand::Key(k) => run_key(k, &c),
        UserCommand::Set {
            name,
            tcp_forwarding,
            agent_forwarding,
            x11_forwarding,
            memory,
            cpus,
            pids,
            gpus,
            mount,
            unmount,
            image,
            drop_commit,
        } => {
            let name = user_name(&name)?;
            let settings = SetSettingsRequest {
                memory,
                cpus,
                pids,
                gpus,
                mount,
                unmount,
                image,
                drop_commit,
            };
            let switches =
                tcp_forwarding.is_some() || agent_forwarding.is_some() || x11_forwarding.is_some();
            if !switches && settings.is_empty() {
                let mut f = Failure::new("nothing to set");
                f.hint = Some(
                    "give --memory, --cpus, --pids, --gpus, --mount, --unmount, --image, \
                     --drop-commit, --tcp-forwarding, --agent-forwarding or --x11-forwarding"
                        .into(),
                );
                f.code = 2;
                return Err(f);
            }
            // Settings first: they are the ones a value can be refused for, and a refusal
            // changes nothing.
            if !settings.is_empty() {
                let u: UserInfo = block_on(async {
                    Ok(c.post(&format!("/users/{name}/settings"), &settings)
                        .await?)
                })?;
                print_changed(&u, &settings);
            }
            if !switches {
                return Ok(());
            }
            let req = SetForwardingRequest {
                tcp: tcp_forwarding.map(Into::into),
                agent: agent_forwarding.map(Into::into),
                x11: x11_forwarding.map(Into::into),
            };
            let u: UserInfo =
                block_on(async { Ok(c.post(&format!("/users/{name}/forwarding"), &req).await?) })?;
            let onoff = |b: bool| if b { "on" } else { "off" };
            eprintln!(
                "{name}: tcp forwarding {}, agent forwarding {}, x11 forwarding {}",
                onoff(u.forwarding.tcp),
                onoff(u.forwarding.agent),
                onoff(u.forwarding.x11)
            );
            Ok(())
        }
    }
}

/// One effective value as `user show` prints it: `8 GiB (user)`, and whether her container
/// waits for it.
fn shown<T>(e: &Effective<T>) -> String {
    let pending = if e.pending {
        ", pending until the container is re-created"
    } else {
        ""
    };
    format!("{} ({}){pending}", e.shown, e.source.as_str())
}

fn print_settings(user: &UserInfo) {
    if let Some(l) = &user.limits {
        println!("memory:     {}", shown(&l.memory));
        println!("cpus:       {}", shown(&l.cpus));
        println!("pids:       {}", shown(&l.pids));
        println!("gpus:       {}", shown(&l.gpus));
    }
    if let Some(m) = &user.mounts {
        if m.mounts.is_empty() {
            println!("mounts:     none");
        }
        for (i, f) in m.mounts.iter().enumerate() {
            println!(
                "{}{} -> {} ({}, {})",
                if i == 0 {
                    "mounts:     "
                } else {
                    "            "
                },
                f.source,
                f.target,
                if f.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                f.origin.as_str()
            );
        }
        if m.pending {
            println!("            pending until the container is re-created");
        }
    }
}

/// What `user set` changed, one line each, on stderr.
fn print_changed(u: &UserInfo, req: &SetSettingsRequest) {
    let name = &u.name;
    if req.image.is_some() {
        eprintln!("{name}: image {} for her next new container", u.image);
    }
    match (&u.committed_image, req.drop_commit) {
        (None, true) => eprintln!(
            "{name}: committed image forgotten; her next new container is made from {}",
            u.image
        ),
        (Some(c), _) if req.image.is_some() => eprintln!(
            "{name}: her committed image {c} is kept and still used (--drop-commit forgets it)"
        ),
        _ => {}
    }
    if (req.image.is_some() || req.drop_commit)
        && u.container != berth_proto::ContainerState::Absent
    {
        eprintln!(
            "{name}: her container was made from the old image: it is used until it is re-created"
        );
    }
    let live = |e: &Effective<u64>| {
        if e.pending || u.container == berth_proto::ContainerState::Absent {
            String::new()
        } else {
            ", applied to the container now".to_owned()
        }
    };
    if let Some(l) = &u.limits {
        if req.memory.is_some() {
            eprintln!("{name}: memory {}{}", shown(&l.memory), live(&l.memory));
        }
        if req.cpus.is_some() {
            eprintln!("{name}: cpus {}{}", shown(&l.cpus), live(&l.cpus));
        }
        if req.pids.is_some() {
            eprintln!("{name}: pids {}", shown(&l.pids));
        }
        if req.gpus.is_some() {
            eprintln!("{name}: gpus {}", shown(&l.gpus));
        }
    }
    if let Some(m) = &u.mounts
        && (!req.mount.is_empty() || !req.unmount.is_empty())
    {
        let own: Vec<String> = m
            .mounts
            .iter()
            .filter(|f| f.origin == berth_proto::Source::User)
            .map(|f| {
                format!(
                    "{}:{}{}",
                    f.source,
                    f.target,
                    if f.read_only { ":ro" } else { "" }
                )
            })
            .collect();
        eprintln!(
            "{name}: shared folders of her own: {}{}",
            if own.is_empty() {
                "none".to_owned()
            } else {
                own.join(", ")
            },
            if m.pending {
                " (pending until the container is re-created)"
            } else {
                ""
            }
        );
    }
}

fn run_key(cmd: KeyCommand, c: &berth_proto::AdminClient) -> Result<(), Failure> {
    match cmd {
        KeyCommand::Add { name, keys } => {
            let name = user_name(&name)?;
            let keys = read_key_files(&keys)?;
            let n = keys.len();
            let req = AddKeysRequest { keys };
            let _: Vec<KeyInfo> =
                block_on(async { Ok(c.post(&format!("/users/{name}/keys"), &req).await?) })?;
            eprintln!("added {n} key(s) to {name}");
            Ok(())
        }
        KeyCommand::Rm { name, key } => {
            let name = user_name(&name)?;
            let fingerprints = if key.starts_with("SHA256:") {
                vec![key]
            } else {
                read_key_files(&[PathBuf::from(&key)])?
                    .into_iter()
                    .map(|k| k.fingerprint)
                    .collect()
            };
            for fp in fingerprints {
                let path = format!(
                    "/users/{name}/keys/{}",
                    utf8_percent_encode(&fp, NON_ALPHANUMERIC)
                );
                let r: RemovedKeys = block_on(async { Ok(c.delete(&path).await?) })?;
                for k in r.removed {
                    eprintln!(
                        "removed key {} from {name} ({} left)",
                        k.fingerprint, r.remaining
                    );
                }
            }
            Ok(())
        }
        KeyCommand::List { name, json } => {
            let name = user_name(&name)?;
            let keys: Vec<KeyInfo> =
                block_on(async { Ok(c.get(&format!("/users/{name}/keys")).await?) })?;
            if json {
                return print_json(&keys);
            }
            let mut t = Table::new();
            t.load_style(NOTHING)
                .set_header(["FINGERPRINT", "TYPE", "COMMENT"]);
            for k in keys {
                // Kept printable by the daemon; a comment stored before it was is made so here.
                let comment: String = k.comment.chars().filter(|c| !c.is_control()).collect();
                t.add_row([k.fingerprint, k.algorithm, comment]);
            }
            println!("{}", t.trim_fmt());
            Ok(())
        }
    }
}

fn bytes_bar(len: u64, msg: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// What an archive holds, by entry: `settings and keys 1.2 KiB, image 10.0 MiB, home 2.0 MiB`.
fn archive_parts(file: &Path) -> String {
    let h = berth_daemon::disk::human_bytes;
    let Ok(f) = std::fs::File::open(file) else {
        return String::new();
    };
    let mut a = tar::Archive::new(f);
    let Ok(entries) = a.entries() else {
        return String::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let size = e.header().size().ok()?;
            let name = e.path().ok()?.to_string_lossy().into_owned();
            let what = match name.as_str() {
                berth_daemon::moving::MANIFEST => "settings and keys",
                berth_daemon::moving::IMAGE => "committed image",
                berth_daemon::moving::HOME => "home",
                _ => return None,
            };
            Some(format!("{what} {}", h(size)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn export(c: &berth_proto::AdminClient, name: &UserName, file: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    // Her keys, image and files: for the admin's eyes only.
    let out = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| {
            Failure::new(format!(
                "cannot write {}: {}",
                file.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    "it exists already".to_owned()
                } else {
                    io_reason(&e)
                }
            ))
        })?;
    eprintln!("exporting {name}: saving her image and home on the server first...");
    let bar = bytes_bar(0, format!("exporting {name}"));
    let r = block_on(async {
        let mut f =
            tokio::fs::File::from_std(out.try_clone().map_err(|e| Failure::new(e.to_string()))?);
        Ok(
            c.download(&format!("/users/{name}/export"), &mut f, |n, len| {
                if let Some(l) = len {
                    bar.set_length(l);
                }
                bar.set_position(n);
            })
            .await?,
        )
    });
    bar.finish_and_clear();
    let n = match r.and_then(|n| {
        out.sync_all()
            .map_err(|e| Failure::new(format!("cannot write {}: {e}", file.display())))?;
        Ok(n)
    }) {
        Ok(n) => n,
        Err(e) => {
            drop(out);
            let _ = std::fs::remove_file(file);
            return Err(e);
        }
    };
    eprintln!(
        "exported {name} to {} ({}: {})",
        file.display(),
        berth_daemon::disk::human_bytes(n),
        archive_parts(file)
    );
    Ok(())
}

fn import(c: &berth_proto::AdminClient, file: &Path) -> Result<(), Failure> {
    let f = std::fs::File::open(file)
        .map_err(|e| Failure::new(format!("cannot read {}: {}", file.display(), io_reason(&e))))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let parts = archive_parts(file);
    let bar = bytes_bar(len, format!("importing {}", file.display()));
    let info: Result<berth_daemon::moving::Imported, Failure> = block_on(async {
        let reader = bar.wrap_async_read(tokio::fs::File::from_std(f));
        let stream = tokio_util::io::ReaderStream::new(reader);
        Ok(c.post_stream("/users/import", stream).await?)
    });
    bar.finish_and_clear();
    let imported = info?;
    let u = imported.user;
    eprintln!(
        "imported user {} from {} ({}: {}); image {}{}{}",
        u.name,
        file.display(),
        berth_daemon::disk::human_bytes(len),
        parts,
        u.image,
        u.committed_image
            .as_ref()
            .map(|c| format!(", committed image {c}"))
            .unwrap_or_default(),
        u.home
            .as_ref()
            .map(|h| format!(", home volume {}", h.volume))
            .unwrap_or_default(),
    );
    for line in &imported.not_carried_over {
        eprintln!("not carried over: {line}");
    }
    Ok(())
}

fn user_name(s: &str) -> Result<UserName, Failure> {
    UserName::parse(s).map_err(|e| Failure::new(e.to_string()))
}

/// Reads and parses every key file; the first bad file or line stops everything, so
/// nothing is sent to the daemon.
fn read_key_files(paths: &[PathBuf]) -> Result<Vec<AuthorizedKey>, Failure> {
    let mut keys = Vec::new();
    for path in paths {
        keys.extend(read_key_file(path)?);
    }
    Ok(keys)
}

fn read_key_file(path: &Path) -> Result<Vec<AuthorizedKey>, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::new(format!(
            "cannot read key file {}: {}",
            path.display(),
            io_reason(&e)
        ))
    })?;
    parse_authorized_keys(&text).map_err(|e| {
        let mut f = Failure::new(format!("key file {}: {e}", path.display()));
        f.hint = Some(
            "give an OpenSSH public key file (e.g. ~/.ssh/id_ed25519.pub), not a private key"
                .into(),
        );
        f
    })
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failure::new(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn print_users(users: &[UserInfo]) {
    let mut t = Table::new();
    t.load_style(NOTHING).set_header([
        "NAME",
        "IMAGE",
        "CONTAINER",
        "DISK",
        "SESSIONS",
        "DAEMON",
        "KEYS",
    ]);
    for u in users {
        t.add_row([
            u.name.to_string(),
            u.image.to_string(),
            u.container.as_str().to_owned(),
            disk(u.disk_bytes),
            u.sessions.to_string(),
            if u.daemon_mode { "on" } else { "off" }.to_owned(),
            u.keys.to_string(),
        ]);
    }
    println!("{}", t.trim_fmt());
}

/// A disk use as the tables show it: `-` before it is measured.
fn disk(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), berth_daemon::disk::human_bytes)
}

/// Her disk use and its parts: `12.0 MiB (container 1.0 MiB, home 10.0 MiB, saved image
/// 1.0 MiB)`.
fn disk_parts(u: &UserInfo) -> String {
    let h = berth_daemon::disk::human_bytes;
    match u.disk {
        Some(d) => format!(
            "{} (container {}, home {}, saved image {})",
            disk(u.disk_bytes),
            h(d.container),
            h(d.home),
            h(d.image)
        ),
        None => disk(u.disk_bytes),
    }
}
