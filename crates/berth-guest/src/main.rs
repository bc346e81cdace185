//! `berth-guest`: the small static helper mounted read-only at `/.berth` in every container.
//!
//! It must run in any image, busybox included, so it is built statically (see
//! `scripts/build-guest`) and depends on no other Berth crate but the protocol it speaks
//! with the daemon (`berth-guest-proto`, libc only).
//!
//! `berth-guest init` is the container's PID 1: it keeps the container alive while no
//! session is open, starts each SSH session's process at the daemon's request (`spawn`),
//! reaps orphaned processes (a shell's background jobs are re-parented to it when the shell
//! exits) and exits on SIGTERM or SIGINT, so `docker stop` is quick. Signals are taken
//! synchronously with `sigwait` on the main thread (blocked in every thread), so no handler
//! code is needed.
//!
//! `berth-guest sftp-server` serves SFTP on stdin/stdout for images without an sftp-server;
//! `berth-guest tty-exec` sets a terminal's size and execs (for sessions through the engine,
//! the fallback for containers whose init predates `spawn`).
//!
//! Called as `daemon`, `nodaemon` or `stopnow` (the daemon mounts this binary under those
//! names on PATH), it sends that one word to the Berth daemon over `/.berth/run/guest.sock`,
//! a socket that belongs to this container alone, and prints the answer.

mod sftp;
mod spawn;

use std::process::ExitCode;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

use berth_guest_proto::words::{Answer, SOCKET_PATH as GUEST_SOCKET, Word};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let called = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if let Some(word) = Word::from_name(called) {
        return ask_daemon(word, args.len() > 1);
    }
    match args.get(1).map(String::as_str) {
        Some("init") => init(),
        Some("tty-exec") => tty_exec(args.get(2..).unwrap_or_default()),
        Some("sftp-server") => sftp::run(),
        Some("--version") => {
            println!("berth-guest {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: berth-guest init | sftp-server | tty-exec COLS ROWS CMD [ARG...]");
            ExitCode::from(2)
        }
    }
}

fn init() -> ExitCode {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(sig);
    }
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        eprintln!("berth-guest: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    // After the mask: the session threads inherit it, so these signals come only here.
    spawn::start();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => spawn::reap_children(),
            Ok(Signal::SIGTERM | Signal::SIGINT) => return ExitCode::SUCCESS,
            Ok(_) | Err(_) => {}
        }
    }
}

/// Sends `word` to the daemon and prints its one-line answer: `ok TEXT` (exit 0) or
/// `error TEXT` (exit 1).
fn ask_daemon(word: Word, extra_args: bool) -> ExitCode {
    let (line, word) = (word.line(), word.as_str());
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    if extra_args {
        eprintln!("usage: {word} (takes no arguments)");
        return ExitCode::from(2);
    }
    let mut stream = match UnixStream::connect(GUEST_SOCKET) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{word}: cannot reach the berth daemon ({GUEST_SOCKET}: {e})");
            return ExitCode::FAILURE;
        }
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    if let Err(e) = stream.write_all(line.as_bytes()) {
        eprintln!("{word}: cannot talk to the berth daemon: {e}");
        return ExitCode::FAILURE;
    }
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(n) if n > 0 => {}
        _ => {
            eprintln!("{word}: no answer from the berth daemon");
            return ExitCode::FAILURE;
        }
    }
    match Answer::parse(&line) {
        Some(Answer::Ok(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Some(Answer::Error(text)) => {
            eprintln!("{word}: {text}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("{word}: unexpected answer from the berth daemon");
            ExitCode::FAILURE
        }
    }
}

/// Sets the size of the terminal on stdin, then becomes CMD. The daemon starts TTY sessions
/// through this because engines before API 1.42 ignore the exec's initial console size, and
/// a resize sent after the start races with short commands (`ssh -t host stty size`).
fn tty_exec(args: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let [cols, rows, cmd, rest @ ..] = args else {
        eprintln!("usage: berth-guest tty-exec COLS ROWS CMD [ARG...]");
        return ExitCode::from(2);
    };
    let size = libc::winsize {
        ws_col: cols.parse().unwrap_or(80),
        ws_row: rows.parse().unwrap_or(24),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    #[allow(unsafe_code)]
    let r = unsafe { set_winsize(libc::STDIN_FILENO, &size) };
    if let Err(e) = r {
        eprintln!("berth-guest: cannot set the terminal size: {e}");
    }
    let err = std::process::Command::new(cmd).args(rest).exec();
    eprintln!("berth-guest: cannot run {cmd}: {err}");
    ExitCode::from(127)
}

nix::ioctl_write_ptr_bad!(
    /// TIOCSWINSZ: sets a terminal's size.
    set_winsize,
    libc::TIOCSWINSZ,
    libc::winsize
);
