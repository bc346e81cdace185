//! The words protocol: what a process in a user's container may ask the daemon.
//!
//! The daemon serves one unix socket per container, at `STATE/run/USER/`[`SOCKET_FILE`] on
//! the host, mounted read-only at [`RUN_DIR`] in that container only. The guest helper,
//! called as one of the [`Word`]s (the daemon mounts it under those names on PATH), writes
//! the word and a newline; the daemon answers one line, `ok TEXT` or `error TEXT`
//! ([`Answer`]). Which user a request is for comes from which socket it arrived on, never
//! from what was sent.

/// Where each container sees its own run directory (the words socket, forwarded agents).
pub const RUN_DIR: &str = "/.berth/run";
/// The words socket's file name in that directory.
pub const SOCKET_FILE: &str = "guest.sock";
/// The words socket as the container sees it.
pub const SOCKET_PATH: &str = "/.berth/run/guest.sock";
/// The longest request line the daemon reads, newline included.
pub const MAX_LINE: usize = 64;

/// What a container may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Word {
    /// Keep the container running when no session is open.
    Daemon,
    /// Stop it again a while after the last session.
    NoDaemon,
    /// Stop it now.
    StopNow,
}

impl Word {
    pub const ALL: [Self; 3] = [Self::Daemon, Self::NoDaemon, Self::StopNow];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Daemon => "daemon",
            Self::NoDaemon => "nodaemon",
            Self::StopNow => "stopnow",
        }
    }

    /// The word a helper called `name` stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == name)
    }

    /// A request line: the word alone, with its newline (`\r\n` accepted).
    pub fn parse_line(line: &str) -> Option<Self> {
        Self::from_name(line.strip_suffix('\n')?.trim_end_matches('\r'))
    }

    /// The request line for this word.
    pub fn line(self) -> String {
        format!("{}\n", self.as_str())
    }
}

/// The daemon's one-line answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok(String),
    Error(String),
}

impl Answer {
    /// The answer line, newline included (newlines in the text become spaces).
    pub fn line(&self) -> String {
        let (kind, text) = match self {
            Self::Ok(t) => ("ok", t),
            Self::Error(t) => ("error", t),
        };
        format!("{kind} {}\n", text.replace(['\n', '\r'], " "))
    }

    pub fn parse(line: &str) -> Option<Self> {
        match line.trim_end_matches(['\n', '\r']).split_once(' ')? {
            ("ok", text) => Some(Self::Ok(text.to_owned())),
            ("error", text) => Some(Self::Error(text.to_owned())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_three_words_each_alone_on_its_line() {
        for w in Word::ALL {
            assert_eq!(Word::parse_line(&w.line()), Some(w));
            assert_eq!(Word::from_name(w.as_str()), Some(w));
        }
        assert_eq!(Word::parse_line("nodaemon\r\n"), Some(Word::NoDaemon));
        for bad in [
            "",
            "\n",
            "daemon",
            "daemon alice\n",
            "DAEMON\n",
            "stop\n",
            "daemon\0\n",
            "\u{feff}daemon\n",
        ] {
            assert_eq!(Word::parse_line(bad), None, "{bad:?}");
        }
        assert!(SOCKET_PATH.starts_with(RUN_DIR) && SOCKET_PATH.ends_with(SOCKET_FILE));
    }

    #[test]
    fn answers_are_one_line_each_way() {
        let a = Answer::Error("two\nlines".into());
        assert_eq!(a.line(), "error two lines\n");
        assert_eq!(
            Answer::parse(&a.line()),
            Some(Answer::Error("two lines".into()))
        );
        assert_eq!(Answer::parse("ok fine\n"), Some(Answer::Ok("fine".into())));
        assert_eq!(Answer::parse("maybe so\n"), None);
    }
}
