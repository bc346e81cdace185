//! `berth connect` against `sshfs`: the same steps on a laptop's directory seen from the
//! other side, through each.
//!
//! - **Berth**: the bench's release `berth connect bob@127.0.0.1 --mount DIR -- CMD` (CMD
//!   waits on its stdin, which the bench closes at the end) runs here ("the laptop", as
//!   root) and stays up for the whole part; bob is the Debian user. Each step runs in his
//!   container through the bench's ssh client (`ssh bob bash -s`, a login of its own, not
//!   timed), in DIR, which is the mount.
//! - **sshfs**: `sshfs root@127.0.0.1:DIR2 MNT` on the host, against the baseline sshd (its
//!   `sftp-server` serving DIR2, "the laptop"), with sshfs's default options and the same ssh
//!   options as every client of the bench. As connect.sh had it, the steps run on the
//!   container side: in a container of bob's image with bob's container's CPU, memory and
//!   pids limits, MNT bind-mounted at the same path (`docker exec -i ... bash -s`, not timed).
//!
//! Both sides run the same steps with the same tools in the same kind of container: Debian
//! 12's bash, coreutils, tar and findutils, and the host's own `git` and `make` binaries,
//! copied into both containers. Each step is timed inside the
//! shell that runs it (`$EPOCHREALTIME` around it), so the login that carries it is not
//! counted. Rounds alternate which side goes first. Before each round the directory is
//! emptied through the mount itself (not timed), so each side's caches stay coherent.
//!
//! There is no C compiler in the test images: the `make` step builds 100 targets with `cp`
//! and links them with `cat` (make's own work: stat every source and target, compare mtimes,
//! create files), then runs again with nothing to do.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::Endpoint;
use crate::figure::Figure;
use crate::interrupt;
use crate::rig::Rig;

/// The source tree untarred: files in directories, a few KiB each.
const TREE_DIRS: usize = 100;
const TREE_FILES: usize = 5000;
/// Targets of the make step.
const MAKE_TARGETS: usize = 100;

/// The environment every step's shell runs in, on both sides.
const SHELL: &str = "env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LC_ALL=C \
                     GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null bash -s";

/// One measured step: its figure, and the shell commands timed.
struct Step {
    id: &'static str,
    title: String,
    /// `Some(MiB)`: the figure is MiB/s over that much; `None`: seconds.
    mib: Option<u64>,
    script: String,
}

fn steps(tarball: &str, mib: u64) -> Vec<Step> {
    vec![
        Step {
            id: "connect_write",
            title: format!("connect: sequential write of {mib} MiB (`dd bs=1M`, until close)"),
            mib: Some(mib),
            script: format!("dd if=/dev/zero of=big.bin bs=1M count={mib} status=none"),
        },
        Step {
            id: "connect_read",
            title: format!("connect: sequential read of the {mib} MiB (laptop's cache dropped)"),
            mib: Some(mib),
            script: "dd if=big.bin of=/dev/null bs=1M status=none".into(),
        },
        Step {
            id: "connect_untar",
            title: format!(
                "connect: untar {TREE_FILES} small files in {TREE_DIRS} directories (+ a git repository, a make project)"
            ),
            mib: None,
            script: format!("tar xf {tarball}"),
        },
        Step {
            id: "connect_find_stat",
            title: "connect: `find . -type f | wc -l`, then `stat` of every entry".into(),
            mib: None,
            script: "find . -type f | wc -l; find . -print0 | xargs -0 stat -c %s".into(),
        },
        Step {
            id: "connect_git_status_first",
            title: "connect: `git status` after the untar (git reads every file once)".into(),
            mib: None,
            script: "git status --porcelain".into(),
        },
        Step {
            id: "connect_git_status",
            title: "connect: `git status` again".into(),
            mib: None,
            script: "git status --porcelain".into(),
        },
        Step {
            id: "connect_make",
            title: format!("connect: `make -j4` of {MAKE_TARGETS} targets (cp + cat, no compiler)"),
            mib: None,
            script: "make -s -j4 -C proj".into(),
        },
        Step {
            id: "connect_make_noop",
            title: "connect: `make` with nothing to do".into(),
            mib: None,
            script: "make -s -C proj".into(),
        },
    ]
}

/// Runs a bash script where a side's steps run; returns its stdout.
type Runner<'a> = Box<dyn Fn(&str) -> Result<String> + 'a>;

/// A side: where its steps run and how.
struct Side<'a> {
    /// The laptop's directory (on this host).
    laptop: PathBuf,
    /// The same directory as the steps see it (the mount).
    dir: PathBuf,
    run: Runner<'a>,
}

impl Side<'_> {
    fn sh(&self, body: &str) -> Result<String> {
        (self.run)(&format!(
            "set -e\nset -o pipefail\ncd {}\n{body}\n",
            quote(&self.dir)
        ))
    }

    /// Runs `step` timed inside the shell; seconds.
    fn timed(&self, step: &str) -> Result<f64> {
        let out = self.sh(&format!(
            "s=$EPOCHREALTIME\n{{ {step}\n}} >/dev/null\ne=$EPOCHREALTIME\necho \"$s $e\""
        ))?;
        let line = out.lines().last().unwrap_or_default();
        let mut it = line.split(' ').map(str::parse::<f64>);
        match (it.next(), it.next()) {
            (Some(Ok(s)), Some(Ok(e))) if e >= s => Ok(e - s),
            _ => bail!("no timing in the step's output {out:?}"),
        }
    }

    /// Empties the directory through the mount (the ready mark stays).
    fn empty(&self) -> Result<()> {
        self.sh("find . -mindepth 1 -maxdepth 1 ! -name .ready -exec rm -rf {} +")
            .map(drop)
    }

    /// One round of every step; the values in the order of `steps`.
    fn round(&self, steps: &[Step]) -> Result<Vec<f64>> {
        self.empty()?;
        let mut values = Vec::new();
        for step in steps {
            interrupt::check()?;
            if step.id == "connect_read" {
                // The file's pages leave the laptop's cache: the read comes from its disk.
                let big = self.laptop.join("big.bin");
                run(Command::new("sync").arg(&big))?;
                run(Command::new("dd")
                    .arg(format!("if={}", big.display()))
                    .args(["iflag=nocache", "count=0", "status=none"]))?;
            }
            let secs = self.timed(&step.script)?;
            values.push(match step.mib {
                Some(mib) => mib as f64 / secs,
                None => secs,
            });
            if step.id == "connect_read" {
                self.sh("rm -f big.bin")?;
            }
        }
        self.empty()?;
        Ok(values)
    }
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Runs `cmd`; fails unless it exits 0.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with `stdin` as its input; fails unless it exits 0.
fn run_with_input(cmd: &mut Command, stdin: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} ({}): {}",
            stdin.lines().last().unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deterministic text of `len` bytes (a source file's worth of lines).
fn text(seed: usize, len: usize) -> Vec<u8> {
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("int v{x:016x} = {};\n", x % 1000).as_bytes());
    }
    out.truncate(len);
    out
}

/// The tree the steps untar: [`TREE_FILES`] files of 1–8 KiB in [`TREE_DIRS`] directories,
/// a make project, and a git repository of it all (packed: a few files); as a tarball.
fn make_tarball(dir: &Path, tarball: &Path) -> Result<()> {
    let tree = dir.join("tree");
    for i in 0..TREE_FILES {
        let d = tree.join(format!("src/d{:03}", i % TREE_DIRS));
        fs::create_dir_all(&d)?;
        fs::write(
            d.join(format!("f{i:04}.c")),
            text(i, 1024 + (i * 7919) % (7 * 1024)),
        )?;
    }
    let proj = tree.join("proj");
    fs::create_dir_all(proj.join("src"))?;
    for i in 0..MAKE_TARGETS {
        fs::write(proj.join(format!("src/m{i:03}.c")), text(i + 77, 2048))?;
    }
    fs::write(
        proj.join("Makefile"),
        "SRCS := $(wildcard src/*.c)\n\
         OBJS := $(SRCS:src/%.c=obj/%.o)\n\
         prog: $(OBJS)\n\tcat $(OBJS) > $@\n\
         obj/%.o: src/%.c | obj\n\tcp $< $@\n\
         obj:\n\tmkdir -p obj\n",
    )?;
    fs::write(tree.join(".gitignore"), "proj/obj/\nproj/prog\n")?;
    let git = |args: &[&str]| {
        run(Command::new("git")
            .arg("-C")
            .arg(&tree)
            .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null"))
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "tree"])?;
    git(&["gc", "-q"])?;
    run(Command::new("tar")
        .arg("cf")
        .arg(tarball)
        .arg("-C")
        .arg(&tree)
        .arg("."))?;
    fs::remove_dir_all(&tree)?;
    Ok(())
}

/// `berth connect` running, its command waiting on stdin; closing stdin ends it.
struct Connected {
    child: Child,
}

impl Connected {
    fn start(rig: &Rig, dir: &Path, log: &Path) -> Result<Self> {
        let ep = &rig.bob;
        let mut c = Command::new(rig.berth.bin());
        c.arg("connect")
            .arg(format!("{}@127.0.0.1", ep.user))
            .arg("-P")
            .arg(ep.port.to_string())
            .arg("-i")
            .arg(&ep.key);
        for o in Endpoint::ssh_options() {
            c.arg("-o").arg(o);
        }
        c.arg("--mount")
            .arg(dir)
            .arg("--")
            .arg("cat >/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log)?);
        {
            use std::os::unix::process::CommandExt;
            c.process_group(0);
        }
        let mut me = Self {
            child: c.spawn().context("cannot run berth connect")?,
        };
        let ready = format!("test -e {}", quote(&dir.join(".ready")));
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            interrupt::check()?;
            if let Some(st) = me.child.try_wait()? {
                bail!(
                    "berth connect exited ({st}): {}",
                    fs::read_to_string(log).unwrap_or_default().trim()
                );
            }
            if ep.run(&ready).is_ok() {
                return Ok(me);
            }
            if Instant::now() > end {
                bail!("the directory did not appear in the container within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        // The command's stdin ends: it exits, and `berth connect` takes the mount down.
        drop(self.child.stdin.take());
        let end = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An sshfs mount on a host directory; unmounted (by its path) when dropped.
struct Sshfs {
    at: PathBuf,
}

impl Sshfs {
    fn mount(root: &Endpoint, remote: &Path, at: &Path) -> Result<Self> {
        fs::create_dir_all(at)?;
        let mut c = Command::new("sshfs");
        c.args(["-F", "/dev/null", "-p"])
            .arg(root.port.to_string())
            .arg(format!("{}@127.0.0.1:{}", root.user, remote.display()))
            .arg(at)
            .arg("-o")
            .arg(format!("IdentityFile={}", root.key.display()));
        for o in Endpoint::ssh_options() {
            c.arg("-o").arg(o);
        }
        run(&mut c).context("sshfs")?;
        let me = Self { at: at.to_owned() };
        if !at.join(".ready").exists() {
            bail!("the sshfs mount does not show the directory");
        }
        Ok(me)
    }
}

impl Drop for Sshfs {
    fn drop(&mut self) {
        let unmounted = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

/// The part's figures: each step on Berth and on sshfs, `rounds` times each.
pub fn figures(rig: &Rig, mib: u64, rounds: usize) -> Vec<Figure> {
    let tarball_host = rig.path("tree.tar");
    let tarball_container = "/root/tree.tar";
    let berth_steps = steps(tarball_container, mib);
    let sshfs_steps = steps(tarball_container, mib);
    let figures: Vec<Figure> = berth_steps
        .iter()
        .map(|s| {
            let f = Figure::new(
                s.id,
                s.title.clone(),
                if s.mib.is_some() { "MiB/s" } else { "s" },
                "sshfs",
            );
            if s.mib.is_some() {
                f.higher_is_better()
            } else {
                f
            }
        })
        .collect();
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); figures.len()];
    let outcome = measure(
        rig,
        &tarball_host,
        tarball_container,
        rounds,
        &berth_steps,
        &sshfs_steps,
        &mut samples,
    );
    let err = outcome.as_ref().err().map(|e| format!("{e:#}"));
    figures
        .into_iter()
        .zip(samples)
        .map(|(f, (b, o))| {
            let r = match &err {
                Some(e) => Err(anyhow::anyhow!("{e}")),
                None => Ok(()),
            };
            f.with(b, o, r)
        })
        .collect()
}

fn measure(
    rig: &Rig,
    tarball_host: &Path,
    tarball_container: &str,
    rounds: usize,
    berth_steps: &[Step],
    sshfs_steps: &[Step],
    samples: &mut [(Vec<f64>, Vec<f64>)],
) -> Result<()> {
    make_tarball(&rig.path("connect"), tarball_host).context("making the source tree")?;
    // The same tarball, git and make in bob's container.
    let bob = &rig.bob;
    let scp = |local: &Path, remote: &str| -> Result<()> {
        crate::client::timed(&mut bob.scp_to(local, remote)).map(drop)
    };
    scp(tarball_host, tarball_container)?;
    let tool = |name: &str| -> Result<PathBuf> {
        let p = run(Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}")))?;
        Ok(PathBuf::from(p.trim()))
    };
    for name in ["git", "make"] {
        let p = tool(name).with_context(|| format!("{name} is needed on this host"))?;
        scp(&p, &format!("/usr/local/bin/{name}"))?;
    }
    bob.run("chmod 755 /usr/local/bin/git /usr/local/bin/make && git --version && make --version >/dev/null")
        .context("git and make in the container")?;
    let tools = [tool("git")?, tool("make")?];

    let berth_laptop = rig.path("connect-laptop");
    let sshfs_laptop = rig.path("sshfs-laptop");
    for d in [&berth_laptop, &sshfs_laptop] {
        fs::create_dir_all(d)?;
        fs::write(d.join(".ready"), "")?;
    }
    let connected = Connected::start(rig, &berth_laptop, &rig.path("connect.log"))?;
    eprintln!("  berth connect is pid {}", connected.pid());
    let mounted = Sshfs::mount(&rig.root, &sshfs_laptop, &rig.path("sshfs-mount"))?;
    let side = Baseline::start(rig, &mounted.at, &tools, tarball_host, tarball_container)
        .context("the sshfs side's container")?;
    let berth = Side {
        laptop: berth_laptop.clone(),
        dir: berth_laptop.clone(),
        run: Box::new(|script: &str| run_with_input(bob.ssh(&[]).arg(SHELL), script)),
    };
    let sshfs = Side {
        laptop: sshfs_laptop.clone(),
        dir: mounted.at.clone(),
        run: Box::new(|script: &str| {
            run_with_input(
                Command::new("docker")
                    .args(["exec", "-i", &side.name, "sh", "-c"])
                    .arg(SHELL),
                script,
            )
        }),
    };
    for round in 0..rounds {
        let berth_first = round % 2 == 0;
        for is_berth in [berth_first, !berth_first] {
            let (side, steps) = if is_berth {
                (&berth, berth_steps)
            } else {
                (&sshfs, sshfs_steps)
            };
            let values = side.round(steps)?;
            for (s, v) in samples.iter_mut().zip(values) {
                if is_berth { s.0.push(v) } else { s.1.push(v) }
            }
        }
        eprintln!("  connect round {}/{rounds} done", round + 1);
    }
    drop(sshfs);
    drop(side);
    drop(mounted);
    drop(connected);
    Ok(())
}

/// The sshfs side's container: bob's image and limits, the sshfs mount at its own path, the
/// same tarball, git and make. Removed when dropped.
struct Baseline {
    name: String,
}

impl Baseline {
    fn start(
        rig: &Rig,
        mnt: &Path,
        tools: &[PathBuf],
        tarball_host: &Path,
        tarball_container: &str,
    ) -> Result<Self> {
        let bob = rig.tag.container("bob");
        let limits = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{.Config.Image}} {{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}}",
            &bob,
        ]))
        .context("bob's container")?;
        let fields: Vec<&str> = limits.split_whitespace().collect();
        let [image, cpus, memory, pids] = fields[..] else {
            bail!("bob's container: {limits:?}");
        };
        let name = format!("{}_sshfs", rig.tag.network());
        let mut c = Command::new("docker");
        c.args(["run", "-d", "--rm", "--network", "none", "--name", &name]);
        if let Ok(n) = cpus.parse::<u64>()
            && n > 0
        {
            c.arg(format!("--cpus={}", n as f64 / 1e9));
        }
        if let Ok(m) = memory.parse::<u64>()
            && m > 0
        {
            c.arg(format!("--memory={m}b"));
        }
        if let Ok(p) = pids.parse::<i64>()
            && p > 0
        {
            c.arg(format!("--pids-limit={p}"));
        }
        c.arg("-v")
            .arg(format!("{}:{}", mnt.display(), mnt.display()))
            .args([image, "sleep", "infinity"]);
        run(&mut c)?;
        let baseline = Self { name };
        let cp = |from: &Path, to: &str| {
            run(Command::new("docker")
                .arg("cp")
                .arg(from)
                .arg(format!("{}:{to}", baseline.name)))
        };
        cp(tarball_host, tarball_container)?;
        for t in tools {
            let file = t.file_name().map(|f| f.to_string_lossy().into_owned());
            cp(t, &format!("/usr/local/bin/{}", file.unwrap_or_default()))?;
        }
        Ok(baseline)
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
