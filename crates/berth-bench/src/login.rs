//! Logins: warm (container running) against OpenSSH's login to the host; cold (container
//! stopped) and first (no container) against the floor, the same container work done
//! directly through the Docker API with no SSH at all.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::client::{Endpoint, ms, timed};
use crate::engine::{Engine, clone_body};
use crate::figure::{Figure, interleave};
use crate::rig::Rig;

/// `ssh USER@HOST true`, timed from spawning the client to its exit.
pub fn login(e: &Endpoint) -> Result<f64> {
    Ok(ms(timed(e.ssh(&[]).arg("true").stdin(Stdio::null()))?))
}

/// Warm logins against OpenSSH's, and the same samples against the floor of a warm login:
/// one Docker exec of `true` in alice's running container (exec create + start, attached
/// until it ends), measured in the same loop.
pub fn warm(rig: &Rig, runs: usize) -> Vec<Figure> {
    let container = rig.tag.container("alice");
    let exec = || -> Result<f64> {
        let t = Instant::now();
        let id = rig.engine.exec(&container, &["true"])?;
        let took = ms(t.elapsed());
        match rig.engine.exit_code(&id)? {
            0 => Ok(took),
            c => bail!("exec floor: `true` exited {c}"),
        }
    };
    let (mut b, mut o, mut f) = (Vec::new(), Vec::new(), Vec::new());
    let outcome = (|| {
        for _ in 0..3 {
            login(&rig.alice)?;
            login(&rig.root)?;
            exec()?;
        }
        interleave(
            runs,
            &mut b,
            &mut o,
            || login(&rig.alice),
            || {
                f.push(exec()?);
                login(&rig.root)
            },
        )
    })();
    let err = outcome.as_ref().err().map(|e| anyhow::anyhow!("{e:#}"));
    vec![
        Figure::new(
            "warm_login",
            "warm login: `ssh alice true` (container running) vs `ssh root@localhost true`",
            "ms",
            "OpenSSH",
        )
        .with(b.clone(), o, outcome),
        Figure::new(
            "warm_login_floor",
            "the same warm logins vs one Docker exec of `true` in the running container",
            "ms",
            "Docker floor",
        )
        .note("floor: exec create + start of `true` through the engine's API, attached until it ends; what every Berth session pays to Docker")
        .with(b, f, err.map_or(Ok(()), Err)),
    ]
}

/// The floor's container: made like alice's (same image, mounts, limits, network, init),
/// outside Berth's names.
struct Floor<'a> {
    engine: &'a Engine,
    name: String,
    body: Value,
}

impl<'a> Floor<'a> {
    fn new(rig: &'a Rig) -> Result<Self> {
        let original = rig
            .engine
            .inspect(&rig.tag.container("alice"))?
            .context("alice's container does not exist")?;
        let f = Self {
            engine: &rig.engine,
            name: rig.tag.floor(),
            body: clone_body(&original)?,
        };
        f.engine.remove(&f.name)?;
        f.engine.create(&f.name, &f.body)?;
        f.engine.start(&f.name)?;
        f.exec()?;
        Ok(f)
    }

    /// `true` through exec create + start, attached until it ends.
    fn exec(&self) -> Result<()> {
        let id = self.engine.exec(&self.name, &["true"])?;
        match self.engine.exit_code(&id)? {
            0 => Ok(()),
            c => bail!("floor exec exited {c}"),
        }
    }

    /// Stopped container: start + exec.
    fn cold(&self) -> Result<f64> {
        self.engine.stop(&self.name)?;
        settle();
        let t = Instant::now();
        self.engine.start(&self.name)?;
        self.exec()?;
        Ok(ms(t.elapsed()))
    }

    /// No container: create + start + exec.
    fn first(&self) -> Result<f64> {
        self.engine.remove(&self.name)?;
        settle();
        let t = Instant::now();
        self.engine.create(&self.name, &self.body)?;
        self.engine.start(&self.name)?;
        self.exec()?;
        Ok(ms(t.elapsed()))
    }
}

impl Drop for Floor<'_> {
    fn drop(&mut self) {
        let _ = self.engine.remove(&self.name);
    }
}

/// A moment for the engine to finish what it does after a stop or remove returned, given
/// to Berth and the floor alike.
fn settle() {
    std::thread::sleep(Duration::from_millis(200));
}

fn wait_for(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    while !f()? {
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn berth_cold(rig: &Rig) -> Result<f64> {
    let name = rig.tag.container("alice");
    rig.alice.run("stop")?;
    wait_for("alice's container to stop", || {
        Ok(rig.engine.running(&name)? == Some(false))
    })?;
    settle();
    let t = login(&rig.alice)?;
    if rig.engine.running(&name)? != Some(true) {
        bail!("alice's container is not running after a cold login");
    }
    Ok(t)
}

fn berth_first(rig: &Rig) -> Result<f64> {
    let name = rig.tag.container("alice");
    rig.alice.run("remove")?;
    wait_for("alice's container to go", || {
        Ok(rig.engine.inspect(&name)?.is_none())
    })?;
    settle();
    let t = login(&rig.alice)?;
    if rig.engine.running(&name)? != Some(true) {
        bail!("alice's container is not running after a first login");
    }
    Ok(t)
}

/// Cold and first logins, each next to its floor.
pub fn cold_and_first(rig: &Rig, runs: usize) -> Vec<Figure> {
    let cold = Figure::new(
        "cold_login",
        "cold login: `ssh alice true`, container stopped",
        "ms",
        "Docker floor",
    )
    .note("floor: POST /containers/{id}/start, then exec create + start of `true` until it ends, through the engine's API, on a container made like alice's");
    let first = Figure::new(
        "first_login",
        "first login: `ssh alice true`, no container",
        "ms",
        "Docker floor",
    )
    .note("floor: POST /containers/create (alice's container's config), start, exec `true`");
    let floor = match Floor::new(rig) {
        Ok(f) => f,
        Err(e) => return vec![cold.failed(&e), first.failed(&e)],
    };
    let (mut b, mut o) = (Vec::new(), Vec::new());
    let outcome = interleave(runs, &mut b, &mut o, || berth_cold(rig), || floor.cold());
    let cold = cold.with(b, o, outcome);
    let (mut b, mut o) = (Vec::new(), Vec::new());
    let outcome = interleave(runs, &mut b, &mut o, || berth_first(rig), || floor.first());
    let first = first.with(b, o, outcome);
    vec![cold, first]
}
