//! `berth config ...`: the files an installer writes and the settings a script reads, from
//! the binary that reads them (so `install.sh` carries no copy that could drift).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use berth_daemon::Config;
use berth_daemon::config::DEFAULT_CONFIG_PATH;

use crate::Failure;

#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the commented default config
    ///
    /// Every setting is commented out with its default, but --listen and --state-dir, which
    /// are set.
    Default {
        /// Address the SSH gateway listens on
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<SocketAddr>,
    },
    /// Print one effective setting, for a script
    ///
    /// A string as it is, a list one item a line, a number or a boolean as TOML writes it,
    /// nothing for an optional setting that is unset.
    Get {
        /// The setting's name, as in the config file (a table's key as TABLE.KEY)
        key: String,
        /// Config file [default: /etc/berth/berth.toml when present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Read what can be read of an invalid config (the default for each setting it gets
        /// wrong) instead of refusing it
        #[arg(long)]
        lenient: bool,
    },
    /// Print the systemd unit that runs the daemon
    Unit {
        /// The berth binary the unit runs [default: this one]
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
        /// The config file it reads
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

pub fn run(cmd: ConfigCommand, state_dir: Option<PathBuf>) -> Result<(), Failure> {
    match cmd {
        ConfigCommand::Default { listen } => {
            let mut config = Config::default();
            if let Some(l) = listen {
                config.listen = l;
            }
            if let Some(d) = state_dir {
                config.state_dir = d;
            }
            print!("{}", config.to_commented_toml());
            Ok(())
        }
        ConfigCommand::Get {
            key,
            config,
            lenient,
        } => {
            let mut config = if lenient {
                salvage(config.as_deref())?
            } else {
                Config::load(config.as_deref()).map_err(|e| Failure::new(e.to_string()))?
            };
            if let Some(d) = state_dir {
                config.state_dir = d;
            }
            let value = config.get(&key).map_err(|e| Failure {
                message: e,
                hint: Some("`berth config default` lists every setting".into()),
                code: 1,
            })?;
            if let Some(v) = value {
                println!("{v}");
            }
            Ok(())
        }
        ConfigCommand::Unit { binary, config } => {
            let binary = match binary {
                Some(b) => b,
                None => std::env::current_exe()
                    .map_err(|e| Failure::new(format!("cannot locate this binary: {e}")))?,
            };
            print!("{}", unit(&binary, &config)?);
            Ok(())
        }
    }
}

/// The config at `path` (the default path when absent, all defaults when that is missing),
/// read with [`Config::salvage`].
fn salvage(path: Option<&Path>) -> Result<Config, Failure> {
    let path = path.unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(e) => {
            return Err(Failure::new(format!(
                "cannot read config {}: {e}",
                path.display()
            )));
        }
    };
    Config::salvage(&text)
        .map_err(|e| Failure::new(format!("config {} is not TOML: {e}", path.display())))
}

/// The unit: the daemon after the engine, restarted when it fails, with the descriptor
/// limit it raises its soft limit to.
fn unit(binary: &Path, config: &Path) -> Result<String, Failure> {
    for p in [binary, config] {
        // systemd splits ExecStart= at spaces and expands `$` and `%`: a path is written as
        // it is or not at all.
        let plain = p.is_absolute()
            && p.to_str().is_some_and(|s| {
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-+@,:".contains(c))
            });
        if !plain {
            return Err(Failure::new(format!(
                "{} cannot be written in a systemd unit: use an absolute path of letters, digits and / . _ - + @ , :",
                p.display()
            )));
        }
    }
    Ok(format!(
        "[Unit]
Description=Berth: personal containers reached with plain ssh
Documentation=man:berth(1) man:berth.toml(5)
After=network-online.target docker.service
Wants=network-online.target docker.service

[Service]
ExecStart={} daemon --config {}
Restart=on-failure
RestartSec=2
TimeoutStopSec=60
# Every connection and session holds descriptors; the daemon raises its soft limit to this.
LimitNOFILE=1048576
# A backstop: the daemon holds at most input_buffer_mb (512 MiB) of client input and stays
# near 100 MiB under 40 flooded sessions; a fault past this restarts the daemon rather than
# letting the kernel's OOM killer end every user's containers.
MemoryMax=2G

[Install]
WantedBy=multi-user.target
",
        binary.display(),
        config.display()
    ))
}
