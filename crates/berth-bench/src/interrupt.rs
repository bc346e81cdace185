//! Ctrl-C without losing the cleanup: SIGINT, SIGTERM and SIGHUP are blocked in every
//! thread and taken by one thread with `sigwait`, which raises a flag the measurements check
//! between runs; the run then unwinds through the `Drop`s that stop the servers and remove
//! the containers. A second signal exits at once (the next run removes what is left).
//!
//! Children are spawned in their own process groups, so the terminal's Ctrl-C reaches only
//! this process; `std::process::Command` clears the blocked mask in every child.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};
use nix::sys::signal::{SigSet, Signal};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Must run before any other thread exists (threads inherit the mask).
pub fn install() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("berth-bench: {sig} again: exiting without cleanup");
                std::process::exit(130);
            }
            eprintln!("berth-bench: {sig}: stopping after this step and cleaning up");
        }
    });
    Ok(())
}

pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
