//! The host words: the seed's commands, answered by the daemon itself when they are a
//! session's whole command line. Adding one: a [`HostWord`] variant, its line in [`HELP`],
//! its arm in [`BerthGateway::host_word`].

use berth_proto::UserName;
use berth_runtime::Runtime;
use tracing::error;

use super::BerthGateway;
use crate::audit::Event;
use crate::lifecycle::LifecycleError;

/// The seed's words. Anything else, `commit now` included, runs in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostWord {
    Commit,
    Stop,
    Remove,
    Port,
    Freeport,
    Status,
    Help,
}

impl HostWord {
    pub const ALL: [Self; 7] = [
        Self::Commit,
        Self::Stop,
        Self::Remove,
        Self::Port,
        Self::Freeport,
        Self::Status,
        Self::Help,
    ];

    pub fn parse(cmd: &str) -> Option<Self> {
        let cmd = cmd.trim();
        Self::ALL.into_iter().find(|w| w.as_str() == cmd)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Stop => "stop",
            Self::Remove => "remove",
            Self::Port => "port",
            Self::Freeport => "freeport",
            Self::Status => "status",
            Self::Help => "help",
        }
    }
}

pub const HELP: &str = "\
commands run by berth itself (the whole command line is the word):
  commit    save your container as your own image; new containers are made from it
            (your home, when it is a volume of its own, is not in the image: it stays as it is)
  stop      stop your container now (your open sessions end)
  remove    remove your container (your image and your home volume stay); the next login
            makes a fresh one
  port      the port this server's SSH listens on (also $SSH_PORT in every session)
  freeport  a TCP port free right now in your container, for ssh -R PORT:...
  status    your container's state, sessions, daemon mode and image
  help      this text
inside your container:
  daemon    keep your container running when no session is open
  nodaemon  stop it again a few seconds after your last session
  stopnow   stop your container now
";

/// Ports `freeport` picks from (the IANA dynamic range).
const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// What a host word printed, and its exit code.
pub struct WordOutput {
    pub stdout: String,
    pub stderr: String,
    pub code: u32,
}

impl<R: Runtime> BerthGateway<R> {
    /// Runs a host word for `user` (audited).
    pub(super) async fn host_word(&self, user: &UserName, word: HostWord) -> WordOutput {
        self.lifecycle.audit().record(Event::HostWord {
            user: user.to_string(),
            word: word.as_str(),
        });
        let lc = &self.lifecycle;
        let result: Result<(String, String), LifecycleError> = match word {
            HostWord::Help => Ok((HELP.to_owned(), String::new())),
            HostWord::Port => Ok((format!("{}\n", self.port), String::new())),
            HostWord::Commit => lc.commit(user).await.map(|c| {
                (
                    format!("{}\n", c.id),
                    format!(
                        "saved your container as {} ({}{}, {} in all, {} layer{}); your next new container is made from it\n",
                        c.image,
                        crate::disk::human_bytes(c.info.added_bytes),
                        if c.info.flattened { " after flattening it into one layer" } else { " added" },
                        crate::disk::human_bytes(c.info.size_bytes),
                        c.info.layers,
                        if c.info.layers == 1 { "" } else { "s" },
                    ),
                )
            }),
            HostWord::Stop => lc.stop(user).await.map(|stopped| {
                let msg = if stopped {
                    "stopped your container"
                } else {
                    "your container is not running"
                };
                (format!("{msg}\n"), String::new())
            }),
            HostWord::Remove => lc.remove_container(user).await.map(|removed| {
                let msg = if removed {
                    "removed your container; your next login creates a fresh one from your image"
                } else {
                    "you have no container"
                };
                (format!("{msg}\n"), String::new())
            }),
            HostWord::Freeport => self
                .free_port(user)
                .await
                .map(|p| (format!("{p}\n"), String::new())),
            HostWord::Status => self.status(user).await.map(|s| (s, String::new())),
        };
        match result {
            Ok((stdout, stderr)) => WordOutput {
                stdout,
                stderr,
                code: 0,
            },
            Err(e) => {
                error!(user = %user, word = word.as_str(), error = %e, "host-side command failed");
                WordOutput {
                    stdout: String::new(),
                    stderr: format!("berth: {} failed: {}\n", word.as_str(), e.for_user()),
                    code: 1,
                }
            }
        }
    }

    async fn status(&self, user: &UserName) -> Result<String, LifecycleError> {
        let name = self.lifecycle.container_name(user);
        let state = match self.runtime.inspect(&name).await? {
            Some(c) if c.running => "running",
            Some(_) => "stopped",
            None => "absent",
        };
        let record = self.store.user(user).await?;
        let mut s = format!(
            "container: {name} ({state})\nsessions: {}\ndaemon mode: {}\nimage: {}\n",
            self.lifecycle.sessions(user),
            if record.daemon_mode { "on" } else { "off" },
            record.image
        );
        if let Some(c) = record.committed_image {
            s.push_str(&format!(
                "committed image: {c} (new containers are made from it)\n"
            ));
        }
        Ok(s)
    }

    /// A port in the dynamic range that nothing in the user's container is bound to now
    /// (read from the container's own `/proc/net/tcp*`, seen from the host).
    async fn free_port(&self, user: &UserName) -> Result<u16, LifecycleError> {
        let name = self.lifecycle.container_name(user);
        let used = match self.runtime.inspect(&name).await? {
            Some(c) if c.running => match self.runtime.open_init(&c.id).await? {
                // Reading her tables takes as long as she made them: off the workers.
                Some(init) => tokio::task::spawn_blocking(move || init.tcp_ports_in_use())
                    .await
                    .unwrap_or_default(),
                None => Default::default(),
            },
            _ => Default::default(),
        };
        let span = u64::from(DYNAMIC_PORTS.end() - DYNAMIC_PORTS.start()) + 1;
        let start = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                % span
        };
        (0..span)
            .filter_map(|i| u16::try_from((start + i) % span).ok())
            .map(|off| DYNAMIC_PORTS.start() + off)
            .find(|p| !used.contains(p))
            .ok_or(LifecycleError::NoFreePort)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_words_are_whole_commands_only() {
        assert_eq!(HostWord::parse("commit"), Some(HostWord::Commit));
        assert_eq!(HostWord::parse("  stop \n"), Some(HostWord::Stop));
        for other in [
            "commit now",
            "stop;",
            "Commit",
            "echo stop",
            "",
            "remove -f",
            "help me",
        ] {
            assert_eq!(HostWord::parse(other), None, "{other:?}");
        }
        for w in HostWord::ALL {
            assert_eq!(HostWord::parse(w.as_str()), Some(w));
            assert!(
                HELP.contains(&format!("  {}", w.as_str())),
                "help lacks {}",
                w.as_str()
            );
        }
    }
}
