//! Berth's own `berth-guest sftp-server` (what images without an SFTP server get) answers what
//! OpenSSH's `sftp-server` answers. The stock `sftp` client runs one batch through every
//! command of its manual page that touches the server, once against OpenSSH's server
//! (`sftp -D /usr/lib/openssh/sftp-server`) and once against Berth's, each on an empty
//! directory of its own with identical local files; the outputs (exit code, every line the
//! client prints, listings included) and the trees left behind (types, modes, owners, sizes,
//! link counts, link targets, contents, preserved times) must be the same. The same batch then
//! runs end to end through the daemon into a busybox container.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions, guest_binary};

const BIN: &str = env!("CARGO_BIN_EXE_berth");
const OPENSSH_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// Every server-side command of sftp(1) (OpenSSH 9.2's: cd chgrp chmod chown copy/cp df
/// get/reget ln ls mkdir put/reput rename rm rmdir symlink; `put -f` asks for fsync), starting in a remote directory
/// that holds `t/many`. `-` before a command lets the batch go on after its (expected)
/// failure.
const BATCH: &str = "\
cd t
pwd
put a.txt
put -p old.txt
put big.bin
put partial-local.bin partial.bin
put -f a.txt synced.txt
version
ls
ls -l
ls -ln
ls -la
df
df -h .
df -i
ln a.txt a.hard
ln -s a.txt a.sym
symlink old.txt old.sym
cp a.txt a.copy
copy old.txt old.copy
ls -l
chmod 600 a.copy
chmod 4755 old.copy
-chmod -h 644 a.sym
chown 4242 a.copy
chown -h 4243 a.sym
chgrp 4244 a.copy
chgrp -h 0 a.sym
ls -l
ls -ln
mkdir sub
mkdir sub/deeper
-mkdir sub
put a.txt sub/deeper/x
rename a.copy sub/moved
rename old.copy sub/deeper/x2
-rmdir sub
rm sub/deeper/x
rm sub/deeper/x2
rmdir sub/deeper
-rm nonexistent
-rmdir nonexistent
-cd nonexistent
-get nonexistent
get a.txt got.txt
get -p old.txt got-old.txt
reget big.bin partial-local.bin
reput partial-local.bin partial.bin
ls -l sub
ls -l
cd ..
ls -l t/sub
ls t/many
";

/// The local files the batch puts (identical on both sides).
fn make_local(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(dir.join("old.txt"), b"an old file\n").unwrap();
    set_mtime(&dir.join("old.txt"), 1_577_934_240); // 2020-01-02 03:04 UTC
    let big: Vec<u8> = (0..700_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(dir.join("big.bin"), &big).unwrap();
    // A partial copy that `reget` completes.
    std::fs::write(dir.join("partial-local.bin"), &big[..123_457]).unwrap();
}

fn set_mtime(p: &Path, secs: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// Runs the batch with `server` (`sftp -D`) in `remote`, with `local` as the local side.
fn run(server: &str, remote: &Path, local: &Path) -> Output {
    let file = local.with_extension("batch");
    std::fs::write(&file, format!("lcd {}\n{BATCH}", local.display())).unwrap();
    Command::new("sftp")
        .arg("-D")
        .arg(server)
        .arg("-b")
        .arg(&file)
        .current_dir(remote)
        .output()
        .unwrap()
}

/// The client's output with what legitimately differs between two runs made apart: the
/// server's directory, the times of files the batch made (`Nov 29 22:01`: the minute may
/// turn between runs), and the free-space figures of `df` (other processes write).
fn normalized(o: &Output, remote: &Path, local: &Path) -> String {
    let text = format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut out = String::new();
    let mut in_df = false;
    for line in text.lines() {
        let line = line
            .replace(&remote.display().to_string(), "REMOTE")
            .replace(&local.display().to_string(), "LOCAL");
        if line.starts_with("sftp> ") {
            in_df = line.starts_with("sftp> df");
        }
        let line = if in_df && !line.starts_with("sftp> ") && !line.trim_start().starts_with("Size")
        {
            // Each figure becomes one `#`: a count that gains a digit between the two runs
            // (`9%` to `10%`, 99999 inodes to 100000) changes the columns' widths too.
            line.split_whitespace()
                .map(|_| "#")
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            recent_time(&line)
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `Nov 29 22:01` (a file of this run) becomes `RECENT`; `Jan  2  2020` stays.
fn recent_time(line: &str) -> String {
    let b = line.as_bytes();
    for i in 0..b.len().saturating_sub(12) {
        let w = &b[i..i + 12];
        let month = w[..3].iter().all(u8::is_ascii_alphabetic) && w[3] == b' ';
        let day = (w[4] == b' ' || w[4].is_ascii_digit()) && w[5].is_ascii_digit() && w[6] == b' ';
        let time = w[7].is_ascii_digit()
            && w[8].is_ascii_digit()
            && w[9] == b':'
            && w[10].is_ascii_digit()
            && w[11].is_ascii_digit();
        if month && day && time {
            return format!("{}RECENT{}", &line[..i], &line[i + 12..]);
        }
    }
    line.to_owned()
}

/// What a tree holds: per relative path, type, mode, owner, size, links, target, content
/// and (for files whose times the batch preserved) mtime.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let detail = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                String::new()
            } else {
                let data = std::fs::read(&p).unwrap();
                let old = if rel.contains("old") {
                    format!(" mtime {}", m.mtime())
                } else {
                    String::new()
                };
                format!("{} bytes, sum {}{old}", data.len(), checksum(&data))
            };
            let size = if m.is_dir() { 0 } else { m.size() };
            out.insert(
                rel,
                format!(
                    "mode {:o} uid {} gid {} size {size} links {} {detail}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.nlink()
                ),
            );
        }
    }
    out
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// One side: a remote directory holding only `t/many` (`many` empty files, for the listing of
/// a large directory) and a local directory with the files the batch puts.
struct Side {
    _dir: tempfile::TempDir,
    remote: PathBuf,
    local: PathBuf,
}

fn side(many: usize) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote");
    let local = dir.path().join("local");
    std::fs::create_dir_all(remote.join("t/many")).unwrap();
    for i in 0..many {
        std::fs::write(remote.join(format!("t/many/entry-{i:05}")), b"").unwrap();
    }
    make_local(&local);
    Side {
        _dir: dir,
        remote,
        local,
    }
}

fn need_openssh_server() {
    assert!(
        Path::new(OPENSSH_SERVER).exists(),
        "{OPENSSH_SERVER} is missing: install openssh-sftp-server (scripts/test does)"
    );
}

#[test]
fn every_command_gives_what_openssh_sftp_server_gives() {
    need_openssh_server();
    let berth = format!("{} sftp-server", guest_binary().display());
    let (o, b) = (side(10_000), side(10_000));
    let with_openssh = run(OPENSSH_SERVER, &o.remote, &o.local);
    let with_berth = run(&berth, &b.remote, &b.local);
    let (expected, got) = (
        normalized(&with_openssh, &o.remote, &o.local),
        normalized(&with_berth, &b.remote, &b.local),
    );
    // The batch ran to its end on OpenSSH's server (the test itself is sound).
    assert!(
        expected.starts_with("exit Some(0)\n") && expected.contains("sftp> ls t/many"),
        "{expected}"
    );
    // The large directory listed completely.
    assert_eq!(
        got.lines()
            .filter(|l| l.contains("entry-"))
            .map(|l| l.split_whitespace().count())
            .sum::<usize>(),
        10_000,
        "{got}"
    );
    if expected != got {
        let diff: Vec<String> = expected
            .lines()
            .zip(got.lines())
            .filter(|(a, b)| a != b)
            .take(10)
            .map(|(a, b)| format!("openssh: {a}\nberth:   {b}"))
            .collect();
        // The differing lines come last: a report that keeps only the tail still shows them.
        panic!(
            "--- openssh ---\n{expected}\n--- berth ---\n{got}\noutputs differ:\n{}",
            diff.join("\n")
        );
    }
    assert_eq!(tree(&o.remote), tree(&b.remote), "the remote trees differ");
    assert_eq!(tree(&o.local), tree(&b.local), "the local trees differ");
    // reget and reput made whole files.
    let big = std::fs::read(b.local.join("big.bin")).unwrap();
    assert_eq!(
        std::fs::read(b.local.join("partial-local.bin")).unwrap(),
        big
    );
    assert_eq!(std::fs::read(b.remote.join("t/partial.bin")).unwrap(), big);
    // Hard links are links, copies are copies.
    let meta = |p: &str| std::fs::symlink_metadata(b.remote.join(p)).unwrap();
    assert_eq!(meta("t/a.txt").ino(), meta("t/a.hard").ino());
    assert_eq!(meta("t/a.txt").nlink(), 2);
    assert_eq!(meta("t/sub/moved").uid(), 4242);
}

#[test]
fn the_same_batch_runs_through_the_daemon_into_a_busybox_container() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let key = d.add_user("alice", BUSYBOX);
    // Berth's own server is the one that answers in busybox.
    assert!(
        !d.ssh_run("alice", &key, "ls /usr/lib/openssh/sftp-server", b"")
            .status
            .success()
    );
    d.ssh_ok("alice", &key, "mkdir -p /root/t/many && cd /root/t/many && i=0; while [ $i -lt 300 ]; do : > e$i; i=$((i+1)); done");
    let local = d.dir.path().join("local");
    make_local(&local);
    let file = d.dir.path().join("batch");
    std::fs::write(&file, format!("lcd {}\n{BATCH}", local.display())).unwrap();
    let mut opts = d.ssh_args(&key);
    opts[0] = "-P".into();
    let o = Command::new("sftp")
        .args(&opts)
        .arg("-b")
        .arg(&file)
        .arg("alice@127.0.0.1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "sftp batch failed: {out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    assert!(out.contains("Remote working directory: /root/t"), "{out}");
    assert!(
        out.contains("% Capacity") || out.contains("%Capacity"),
        "{out}"
    );
    // What the batch left, seen from inside the container.
    let seen = d.ssh_ok(
        "alice",
        &key,
        "cd /root/t && stat -c '%n %h %u %a' a.txt a.hard sub/moved && readlink a.sym && \
         cmp big.bin partial.bin && echo same && ls many | wc -l",
    );
    assert_eq!(
        seen, "a.txt 2 0 644\na.hard 2 0 644\nsub/moved 1 4242 600\na.txt\nsame\n300\n",
        "{out}"
    );
    assert_eq!(
        std::fs::read(local.join("partial-local.bin")).unwrap(),
        std::fs::read(local.join("big.bin")).unwrap()
    );
}
