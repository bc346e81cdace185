//! Keystroke echo in a PTY: `ssh -tt` runs in a pseudo-terminal of ours with bash on the
//! other side (the Debian image on Berth, the host's on OpenSSH); one byte is written and
//! the time until the terminal shows it back is taken. The two sessions are open at the
//! same time and take turns, keystroke by keystroke.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, poll};
use nix::pty::{Winsize, openpty};

use crate::client::{Endpoint, ms};
use crate::figure::{Figure, interleave};
use crate::rig::Rig;

/// An interactive `ssh -tt` session on a terminal of ours.
struct Terminal {
    child: Child,
    master: File,
    seen: Vec<u8>,
}

impl Terminal {
    fn open(e: &Endpoint) -> Result<Self> {
        let ws = Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(&ws, None)?;
        // setsid -c: a session of its own with the pty as controlling terminal, as a
        // terminal emulator would give it.
        let cmd = e.ssh(&["-tt"]);
        let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
        let mut cmd = std::process::Command::new("setsid");
        cmd.arg("-c")
            .arg("ssh")
            .args(args)
            .env("TERM", "xterm")
            .stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave))
            .process_group(0);
        let child = cmd.spawn().context("cannot run setsid ssh")?;
        let mut t = Self {
            child,
            master: File::from(pty.master),
            seen: Vec::new(),
        };
        // The prompt may be anything: wait for the output of a command instead (the typed
        // line shows `$((6*7))`, only the output shows 42), then for the prompt to settle.
        t.send(b"echo BENCH$((6*7))READY\r")?;
        t.wait_for(b"BENCH42READY", Duration::from_secs(60))?;
        t.drain(Duration::from_millis(300))?;
        Ok(t)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.master.write_all(bytes)?;
        Ok(())
    }

    /// Reads what is there within `timeout`; false when nothing came.
    fn read_some(&mut self, timeout: Duration) -> Result<bool> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let ready = {
            let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, ms)?
        };
        if ready == 0 {
            return Ok(false);
        }
        let mut buf = [0u8; 4096];
        let n = self.master.read(&mut buf)?;
        if n == 0 {
            bail!("the session ended");
        }
        self.seen
            .extend_from_slice(buf.get(..n).unwrap_or_default());
        Ok(true)
    }

    /// Waits until `needle` has appeared in the output; returns when it did.
    fn wait_for(&mut self, needle: &[u8], timeout: Duration) -> Result<Instant> {
        let end = Instant::now() + timeout;
        loop {
            if self.seen.windows(needle.len()).any(|w| w == needle) {
                return Ok(Instant::now());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {:?} from the terminal; it showed {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.seen)
                );
            }
            self.read_some(left)?;
        }
    }

    /// Reads until the terminal has been quiet for `quiet`, then forgets what it showed.
    fn drain(&mut self, quiet: Duration) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(10);
        while self.read_some(quiet)? && Instant::now() < end {}
        self.seen.clear();
        Ok(())
    }

    /// One keystroke: the time from writing it to seeing it echoed; then erased again.
    fn keystroke(&mut self) -> Result<f64> {
        self.seen.clear();
        let t = Instant::now();
        self.send(b"x")?;
        let echoed = self.wait_for(b"x", Duration::from_secs(10))?;
        let took = echoed.duration_since(t);
        self.send(b"\x7f")?;
        self.drain(Duration::from_millis(30))?;
        Ok(ms(took))
    }

    /// Logs out the way a user would; whatever is left is killed on drop.
    fn close(mut self) {
        let _ = self.send(b"\x15exit\r");
        let end = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
            let _ = self.read_some(Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn keystrokes(rig: &Rig, n: usize) -> Figure {
    let f = Figure::new(
        "keystroke_echo",
        "keystroke echo in a PTY (bash): Debian container vs the host",
        "ms",
        "OpenSSH",
    );
    let (mut b, mut o) = (Vec::new(), Vec::new());
    let outcome = (|| {
        let mut berth = Terminal::open(&rig.bob)?;
        let mut openssh = Terminal::open(&rig.root)?;
        // A few untimed strokes first, then the measured ones, with a pause between.
        for _ in 0..5 {
            berth.keystroke()?;
            openssh.keystroke()?;
        }
        let r = interleave(
            n,
            &mut b,
            &mut o,
            || {
                pause();
                berth.keystroke()
            },
            || {
                pause();
                openssh.keystroke()
            },
        );
        berth.close();
        openssh.close();
        r
    })();
    f.with(b, o, outcome)
}

/// A typist's pause, so that no keystroke rides on the previous one's packets.
fn pause() {
    std::thread::sleep(Duration::from_millis(20));
}
