//! Keystroke echo in a PTY: `ssh -tt` runs in a pseudo-terminal of ours with bash on the
//! other side (the Debian image on Berth, the host's on OpenSSH); one byte is written and
//! the time until the terminal shows it back is taken. The two sessions are open at the
//! same time and take turns, keystroke by keystroke.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, poll};
use nix::pty::{Winsize, openpty};

use crate::client::{Endpoint, ms};
use crate::figure::{Figure, interleave};
use crate::procfs;
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
        // terminal emulator would give it. Not made a process group leader first: setsid
        // would then fork, its parent exit at once, and the ssh under it be left behind
        // (one per run) where `Drop` cannot reach it; as it is, setsid becomes ssh, the pid
        // spawned.
        let cmd = e.ssh(&["-tt"]);
        let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
        let mut cmd = std::process::Command::new("setsid");
        cmd.arg("-c")
            .arg("ssh")
            .args(args)
            .env("TERM", "xterm")
            .stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave));
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

/// The echo figure, and what serving the keystrokes cost each server: CPU time and context
/// switches per keystroke, from the scheduler's own counters (repeatable where the latency's
/// spread between runs is larger than most changes). Berth: every thread of the daemon;
/// OpenSSH: the sshd processes of the session (its listener, monitor and session process).
/// Neither counts the shell, the client or the terminal.
pub fn keystrokes(rig: &Rig, n: usize) -> Vec<Figure> {
    let f = Figure::new(
        "keystroke_echo",
        "keystroke echo in a PTY (bash): Debian container vs the host",
        "ms",
        "OpenSSH",
    );
    let cpu = Figure::new(
        "keystroke_cpu",
        "CPU time of the server per keystroke (echo and erase)",
        "µs",
        "OpenSSH",
    )
    .note("scheduler run time of the daemon's threads; OpenSSH: its session's sshd processes");
    let switches = Figure::new(
        "keystroke_switches",
        "context switches of the server per keystroke (echo and erase)",
        "switches",
        "OpenSSH",
    );
    let (mut b, mut o) = (Vec::new(), Vec::new());
    let (mut bw, mut ow) = (Vec::new(), Vec::new());
    let outcome = (|| {
        let berth_pids = vec![rig.berth_pid()?];
        let mut berth = Terminal::open(&rig.bob)?;
        let mut openssh = Terminal::open(&rig.root)?;
        let sshd_pids: Vec<u32> = procfs::tree(rig.openssh.pid())
            .into_iter()
            .filter(|(_, comm)| comm.starts_with("sshd"))
            .map(|(pid, _)| pid)
            .collect();
        // A few untimed strokes first, then the measured ones, with a pause between. The
        // work is counted per keystroke, around the keystroke alone (not the pauses).
        for _ in 0..5 {
            berth.keystroke()?;
            openssh.keystroke()?;
        }
        let counted = |pids: &[u32], t: &mut Terminal, work: &mut Vec<procfs::Work>| {
            let before = procfs::work_of(pids);
            let took = t.keystroke()?;
            work.push(before.until(procfs::work_of(pids)));
            Ok::<f64, anyhow::Error>(took)
        };
        let r = interleave(
            n,
            &mut b,
            &mut o,
            || {
                pause();
                counted(&berth_pids, &mut berth, &mut bw)
            },
            || {
                pause();
                counted(&sshd_pids, &mut openssh, &mut ow)
            },
        );
        berth.close();
        openssh.close();
        r
    })();
    let us = |w: &[procfs::Work]| w.iter().map(|w| w.cpu_ns as f64 / 1000.0).collect();
    let sw = |w: &[procfs::Work]| w.iter().map(|w| w.switches as f64).collect();
    let failed = outcome.as_ref().err().map(|e| anyhow::anyhow!("{e:#}"));
    let again = || {
        failed
            .as_ref()
            .map_or(Ok(()), |e| Err(anyhow::anyhow!("{e:#}")))
    };
    vec![
        f.with(b, o, outcome),
        cpu.with(us(&bw), us(&ow), again()),
        switches.with(sw(&bw), sw(&ow), again()),
    ]
}

/// A typist's pause, so that no keystroke rides on the previous one's packets.
fn pause() {
    std::thread::sleep(Duration::from_millis(20));
}
