//! End-to-end: copying files with the stock tools — sftp, scp (SFTP mode and legacy `-O`),
//! rsync and a tar pipe — into a user's container.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Command, Stdio};

use berth_testkit::{BUSYBOX, DEBIAN, Daemon, DaemonOptions};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn start() -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 30,
            config: String::new(),
        },
    )
}

/// A tree with a nested directory, an empty file and a binary file.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(root.join("sub/empty"), b"").unwrap();
    let bin: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(root.join("sub/deeper/blob.bin"), bin).unwrap();
}

fn same_tree(a: &Path, b: &Path) {
    for rel in ["a.txt", "sub/empty", "sub/deeper/blob.bin"] {
        assert_eq!(
            std::fs::read(a.join(rel)).unwrap(),
            std::fs::read(b.join(rel)).unwrap(),
            "{rel} differs"
        );
    }
}

fn ssh_opts(d: &Daemon, key: &Path) -> Vec<String> {
    // scp and sftp take -P for the port; the other options are shared with ssh.
    let mut opts = d.ssh_args(key);
    opts[0] = "-P".into();
    opts
}

#[test]
fn sftp_and_scp_both_ways_recursive() {
    let d = start();
    let key = d.add_user("alice", DEBIAN);
    let local = d.dir.path().join("tree");
    make_tree(&local);
    // scp (SFTP protocol, OpenSSH's default) up, recursive.
    let st = Command::new("scp")
        .args(ssh_opts(&d, &key))
        .arg("-r")
        .arg(&local)
        .arg("alice@127.0.0.1:/root/up")
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        d.ssh_ok(
            "alice",
            &key,
            "cat /root/up/a.txt; wc -c < /root/up/sub/deeper/blob.bin"
        ),
        "alpha\n300000\n"
    );
    // And down again.
    let back = d.dir.path().join("back");
    let st = Command::new("scp")
        .args(ssh_opts(&d, &key))
        .arg("-r")
        .arg("alice@127.0.0.1:/root/up")
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    same_tree(&local, &back);
    // Legacy scp protocol (runs scp in the container).
    let legacy = d.dir.path().join("legacy");
    let st = Command::new("scp")
        .args(ssh_opts(&d, &key))
        .args(["-O", "-r"])
        .arg("alice@127.0.0.1:/root/up")
        .arg(&legacy)
        .status()
        .unwrap();
    assert!(st.success());
    same_tree(&local, &legacy);
    // sftp in batch mode: mkdir, put, ls, get, rename, rm.
    let batch = d.dir.path().join("batch");
    let got = d.dir.path().join("got.txt");
    std::fs::write(
        &batch,
        format!(
            "mkdir /root/s\nput {} /root/s/x.txt\nls /root/s\nrename /root/s/x.txt /root/s/y.txt\nget /root/s/y.txt {}\nrm /root/s/y.txt\nrmdir /root/s\n",
            local.join("a.txt").display(),
            got.display()
        ),
    )
    .unwrap();
    let o = Command::new("sftp")
        .args(ssh_opts(&d, &key))
        .arg("-b")
        .arg(&batch)
        .arg("alice@127.0.0.1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("/root/s/x.txt"));
    assert_eq!(std::fs::read(&got).unwrap(), b"alpha\n");
    assert_eq!(
        d.ssh_run("alice", &key, "test -e /root/s", b"")
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn rsync_and_tar_pipe() {
    let d = start();
    let key = d.add_user("alice", DEBIAN);
    let local = d.dir.path().join("tree");
    make_tree(&local);
    let rsh = format!("ssh {}", d.ssh_args(&key).join(" "));
    let st = Command::new("rsync")
        .args(["-a", "-e", &rsh])
        .arg(format!("{}/", local.display()))
        .arg("alice@127.0.0.1:/root/r/")
        .status();
    match st {
        Ok(st) => {
            assert!(st.success());
            let back = d.dir.path().join("rback");
            let st = Command::new("rsync")
                .args(["-a", "-e", &rsh])
                .arg("alice@127.0.0.1:/root/r/")
                .arg(format!("{}/", back.display()))
                .status()
                .unwrap();
            assert!(st.success());
            same_tree(&local, &back);
        }
        Err(e) => panic!("rsync is needed on the client for this test: {e}"),
    }
    // tar c . | ssh host 'tar x -C /dst'
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&local)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let st = d
        .ssh("alice", &key)
        .arg("mkdir -p /root/t && tar x -C /root/t")
        .stdin(tar.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(st.success());
    assert_eq!(d.ssh_ok("alice", &key, "cat /root/t/a.txt"), "alpha\n");
}

#[test]
fn sftp_and_scp_in_an_image_without_sftp_server() {
    // busybox has no sftp-server: Berth's own serves, and scp (SFTP mode) works through it.
    let d = start();
    let key = d.add_user("bb", BUSYBOX);
    assert_eq!(
        d.ssh_run("bb", &key, "ls /usr/lib/openssh/sftp-server", b"")
            .status
            .code(),
        Some(1)
    );
    let local = d.dir.path().join("tree");
    make_tree(&local);
    // Upload with -p: times and modes go through setstat/fsetstat.
    let old_time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(local.join("a.txt"))
        .unwrap()
        .set_modified(old_time)
        .unwrap();
    let st = Command::new("scp")
        .args(ssh_opts(&d, &key))
        .arg("-rp")
        .arg(&local)
        .arg("bb@127.0.0.1:/root/up")
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        d.ssh_ok(
            "bb",
            &key,
            "cat /root/up/a.txt; wc -c < /root/up/sub/deeper/blob.bin; stat -c %Y /root/up/a.txt"
        ),
        "alpha\n300000\n1000000000\n"
    );
    let back = d.dir.path().join("back");
    let st = Command::new("scp")
        .args(ssh_opts(&d, &key))
        .arg("-rp")
        .arg("bb@127.0.0.1:/root/up")
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    same_tree(&local, &back);
    let batch = d.dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "cd /root\nmkdir d\nput {} d/empty\nls -l d\nrename d/empty d/e2\nln -s e2 d/link\nrm d/link\nrm d/e2\nrmdir d\npwd\n",
            local.join("sub/empty").display()
        ),
    )
    .unwrap();
    let o = Command::new("sftp")
        .args(ssh_opts(&d, &key))
        .arg("-b")
        .arg(&batch)
        .arg("bb@127.0.0.1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Remote working directory: /root"), "{out}");
    assert_eq!(
        d.ssh_run("bb", &key, "test -e /root/d", b"").status.code(),
        Some(1)
    );
}

#[test]
fn sshfs_mounts_a_directory_of_the_container() {
    let d = start();
    let key = d.add_user("bb", BUSYBOX);
    d.ssh_ok(
        "bb",
        &key,
        "mkdir -p /root/share && echo inside > /root/share/in.txt",
    );
    let mnt = d.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ssh_cmd = format!("ssh {}", d.ssh_args(&key).join(" "));
    let st = Command::new("sshfs")
        .arg("bb@127.0.0.1:/root/share")
        .arg(&mnt)
        .args(["-o", &format!("ssh_command={ssh_cmd}")])
        .status()
        .unwrap();
    assert!(st.success(), "sshfs failed");
    let read = std::fs::read_to_string(mnt.join("in.txt"));
    let wrote = std::fs::write(mnt.join("out.txt"), b"from-laptop\n");
    // Save-by-rename over an existing file (posix-rename).
    let renamed = std::fs::write(mnt.join("tmp.txt"), b"new\n")
        .and_then(|()| std::fs::rename(mnt.join("tmp.txt"), mnt.join("in.txt")));
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    assert_eq!(read.unwrap(), "inside\n");
    wrote.unwrap();
    renamed.unwrap();
    assert_eq!(d.ssh_ok("bb", &key, "cat /root/share/in.txt"), "new\n");
    assert_eq!(
        d.ssh_ok("bb", &key, "cat /root/share/out.txt"),
        "from-laptop\n"
    );
}

#[test]
fn one_gib_both_ways_intact() {
    // Big enough that framing, windows and backpressure all come into play.
    let d = start();
    let key = d.add_user("bb", BUSYBOX);
    let big = d.dir.path().join("big.bin");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 1073741824 /dev/urandom > {}",
            big.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let sum = |p: &Path| {
        let o = Command::new("sha256sum").arg(p).output().unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let want = sum(&big);
    let st = Command::new("scp")
        .args(ssh_opts(&d, &key))
        .arg(&big)
        .arg("bb@127.0.0.1:/root/big.bin")
        .status()
        .unwrap();
    assert!(st.success());
    let remote = d.ssh_ok("bb", &key, "sha256sum /root/big.bin");
    assert_eq!(remote.split_whitespace().next().unwrap(), want);
    let back = d.dir.path().join("back.bin");
    let st = Command::new("scp")
        .args(ssh_opts(&d, &key))
        .arg("bb@127.0.0.1:/root/big.bin")
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(sum(&back), want);
    d.ssh_ok("bb", &key, "rm /root/big.bin");
}
