#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! FUSE mounts attached in a real container (root, real Docker, busybox): seen there at the
//! path asked for, never on the host, gone when detached or aborted, and never led astray by
//! symlinks or shared mounts of the container.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use berth_runtime::mount::{self, Attached, FuseOptions};
use berth_runtime::{ContainerInit, DockerRuntime, RootOwner, Runtime};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEntry, Request, SessionACL,
};

const CONTENT: &[u8] = b"hello from the laptop\n";

/// One directory holding one file, `hello`.
struct Hello;

fn attr(ino: u64) -> FileAttr {
    let dir = ino == 1;
    FileAttr {
        ino: INodeNo(ino),
        size: if dir { 0 } else { CONTENT.len() as u64 },
        blocks: 1,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

const TTL: Duration = Duration::ZERO;

impl Filesystem for Hello {
    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "hello" {
            reply.entry(&TTL, &attr(2), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 | 2 => reply.attr(&TTL, &attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != 2 {
            return reply.error(Errno::ENOENT);
        }
        let start = (offset as usize).min(CONTENT.len());
        let end = (start + size as usize).min(CONTENT.len());
        reply.data(&CONTENT[start..end]);
    }

    fn readdir(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (2, FileType::RegularFile, "hello"),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A unique name the testkit's stale-object cleanup recognises.
fn unique(what: &str) -> String {
    format!(
        "bt{}x{}-{what}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A busybox container of this test's, removed on drop.
struct Container {
    id: String,
    volume: Option<String>,
}

impl Container {
    fn start(extra: &[&str]) -> Self {
        berth_testkit::ensure_images();
        let name = unique("mount");
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &name])
            .args(extra)
            .args(["berth-test/busybox:latest", "sleep", "1000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "docker run: {out:?}");
        Self {
            id: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
            volume: None,
        }
    }

    /// Runs `sh -c script` in the container, given up after 20 s.
    fn sh(&self, script: &str) -> Output {
        let child = Command::new("docker")
            .args(["exec", &self.id, "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
        while !waiter.is_finished() {
            assert!(
                Instant::now() < deadline,
                "`{script}` in the container hangs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = pid;
        waiter.join().unwrap()
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(out.status.success(), "`{script}`: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn inspect(&self, format: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "-f", format, &self.id])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.id]).output();
        if let Some(v) = &self.volume {
            let _ = Command::new("docker").args(["volume", "rm", v]).output();
        }
    }
}

async fn open(c: &Container) -> ContainerInit {
    let rt = DockerRuntime::connect("/var/run/docker.sock".into())
        .await
        .unwrap();
    rt.open_init(&c.id).await.unwrap().expect("running")
}

/// A FUSE mount served by [`Hello`] on a thread; the thread ends when the connection does.
fn served(
    init: &ContainerInit,
    source: &str,
) -> (mount::DetachedMount, std::thread::JoinHandle<()>) {
    let (dev, mnt) = mount::fuse_mount(&FuseOptions {
        owner: init.root_owner().unwrap(),
        root_perms: 0o755,
        max_read: Some(128 * 1024),
        source: source.to_owned(),
    })
    .unwrap();
    // INIT is already queued: the handshake does not wait.
    let session =
        fuser::Session::from_fd(Hello, dev, SessionACL::All, fuser::Config::default()).unwrap();
    let server = std::thread::spawn(move || {
        let _ = session.run();
    });
    (mnt, server)
}

/// Every mountinfo line naming `source`, of the host's namespaces: this process's and
/// pid 1's.
fn on_host(source: &str) -> Vec<String> {
    ["/proc/self/mountinfo", "/proc/1/mountinfo"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| l.contains(source))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn join_within(t: std::thread::JoinHandle<()>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "the FUSE server did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_shows_in_the_container_only_at_its_path_and_goes_away() {
    let c = Container::start(&[]);
    let init = open(&c).await;
    let caps_before = c.sh_ok("grep Cap /proc/1/status");
    let source = unique("src");
    let (mnt, server) = served(&init, &source);
    let conn = mnt.connection();
    let at = Path::new("/a b/é/deep");
    let attached: Attached = mount::attach(&init, "alice", mnt, at, all_live())
        .await
        .unwrap();
    assert_eq!(attached.path(), at);

    // In the container, at that path (parents made), with the file the server has.
    assert_eq!(c.sh_ok("cat '/a b/é/deep/hello'").as_bytes(), CONTENT);
    assert_eq!(c.sh_ok("ls '/a b/é/deep'"), "hello\n");
    let mounts = c.sh_ok("cat /proc/mounts");
    let line = mounts
        .lines()
        .find(|l| l.contains(&source))
        .unwrap_or_else(|| panic!("not in the container's /proc/mounts:\n{mounts}"));
    assert!(
        line.starts_with(&format!(
            "{source} /a\\040b/é/deep fuse.berth-connect rw,nosuid,nodev"
        )),
        "{line}"
    );
    // The directories made belong to the container's root.
    assert_eq!(
        c.sh_ok("stat -c '%u:%g %a' '/a b' '/a b/é'"),
        "0:0 755\n0:0 755\n"
    );
    // Nowhere on the host.
    assert_eq!(on_host(&source), Vec::<String>::new());
    // The container was given nothing for it.
    assert_eq!(c.sh_ok("grep Cap /proc/1/status"), caps_before);
    assert_eq!(c.inspect("{{.HostConfig.Privileged}}"), "false");
    assert_eq!(c.inspect("{{.HostConfig.CapAdd}}"), "[]");
    assert_eq!(c.inspect("{{.HostConfig.Devices}}"), "[]");
    assert!(c.sh("test -e /dev/fuse").status.code() == Some(1));

    // Renaming a parent does not hide it from detach.
    c.sh_ok("mv '/a b' /moved");
    attached.detach().await.unwrap();
    let mounts = c.sh_ok("cat /proc/mounts");
    assert!(!mounts.contains(&source), "still mounted:\n{mounts}");
    assert_eq!(c.sh_ok("ls /moved/é/deep"), "");
    // With the mount gone, the server's connection ends once aborted.
    conn.abort().unwrap();
    join_within(server, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_connection_fails_reads_in_the_container_instead_of_hanging() {
    let c = Container::start(&[]);
    let init = open(&c).await;
    let source = unique("src");
    let (mnt, server) = served(&init, &source);
    let conn = mnt.connection();
    let attached = mount::attach(&init, "alice", mnt, Path::new("/work"), all_live())
        .await
        .unwrap();
    assert_eq!(c.sh_ok("cat /work/hello").as_bytes(), CONTENT);
    conn.abort().unwrap();
    // The server's loop ends: the kernel ended the connection.
    join_within(server, Duration::from_secs(10));
    let out = c.sh("cat /work/hello");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Transport endpoint is not connected"), "{err}");
    // Aborting again, or a gone connection, is fine; so is detaching after it.
    conn.abort().unwrap();
    attached.detach().await.unwrap();
    assert!(!c.sh_ok("cat /proc/mounts").contains(&source));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_in_the_container_never_redirect_the_mount() {
    let c = Container::start(&[]);
    c.sh_ok("ln -s /etc /x && ln -s /../../.. /y && mkdir /d && ln -s /tmp /d/t && touch /f");
    let init = open(&c).await;
    for (at, why) in [
        ("/x", "/x is a symlink in the container"),
        ("/x/sub", "/x is a symlink in the container"),
        ("/y/tmp", "/y is a symlink in the container"),
        ("/d/t/z", "/d/t is a symlink in the container"),
        ("/f", "/f is not a directory in the container"),
        ("/f/g", "/f is not a directory in the container"),
    ] {
        let source = unique("src");
        let (mnt, server) = served(&init, &source);
        let conn = mnt.connection();
        let e = mount::attach(&init, "alice", mnt, Path::new(at), all_live())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), why, "{at}");
        // Mounted nowhere: not in the container, not on the host.
        assert!(!c.sh_ok("cat /proc/mounts").contains(&source), "{at}");
        assert_eq!(on_host(&source), Vec::<String>::new(), "{at}");
        // The mount was dropped with the error; its server ends with the connection.
        conn.abort().unwrap();
        join_within(server, Duration::from_secs(10));
    }
    // Nothing was made through the links either.
    assert_eq!(
        c.sh_ok("ls /etc/sub /tmp/z 2>&1 | grep -c 'No such file'"),
        "2\n"
    );
    assert!(!Path::new("/sub").exists() && !Path::new("/tmp/z").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_that_would_propagate_to_the_host_is_refused() {
    // A docker volume's directory is on the host's shared /var/lib/docker mount: bound
    // `rshared`, a mount below it in the container would show on the host.
    let volume = unique("vol");
    let made = Command::new("docker")
        .args(["volume", "create", &volume])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let data = format!("/var/lib/docker/volumes/{volume}/_data");
    let shared = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/var/lib/docker") && l.contains(" shared:"));
    let bind = format!("{data}:/shared:rshared");
    let mut c = Container::start(&["-v", &bind]);
    c.volume = Some(volume);
    if !shared {
        println!("skipped: /var/lib/docker is not a shared mount on this host");
        return;
    }
    let init = open(&c).await;
    let source = unique("src");
    let (mnt, server) = served(&init, &source);
    let conn = mnt.connection();
    let e = mount::attach(&init, "alice", mnt, Path::new("/shared/in"), all_live())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "/shared/in is on a shared mount in the container (it would show outside it)"
    );
    assert_eq!(on_host(&source), Vec::<String>::new());
    conn.abort().unwrap();
    join_within(server, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_is_no_error_for_detach_and_an_unserved_mount_never_blocks() {
    let c = Container::start(&[]);
    let init = open(&c).await;
    // Nobody ever serves this one: made, attached and detached without waiting on a server.
    let source = unique("src");
    let (dev, mnt) = mount::fuse_mount(&FuseOptions {
        owner: init.root_owner().unwrap(),
        root_perms: 0o700,
        max_read: None,
        source: source.clone(),
    })
    .unwrap();
    let conn = mnt.connection();
    let attached = mount::attach(&init, "alice", mnt, Path::new("/m"), all_live())
        .await
        .unwrap();
    assert!(c.sh_ok("cat /proc/mounts").contains(&source));
    let killed = Command::new("docker")
        .args(["kill", &c.id])
        .output()
        .unwrap();
    assert!(killed.status.success());
    attached.detach().await.unwrap();
    conn.abort().unwrap();
    drop(dev);
    // A container that is not running has no namespace to mount in.
    let rt = DockerRuntime::connect("/var/run/docker.sock".into())
        .await
        .unwrap();
    assert!(rt.open_init(&c.id).await.unwrap().is_none());
    assert!(init.mount_ns().is_none());
    let _ = RootOwner { uid: 0, gid: 0 };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directories_made_for_a_mount_go_with_it_when_empty() {
    let c = Container::start(&[]);
    let init = open(&c).await;
    c.sh_ok("mkdir /keep && touch /keep/file");
    let options = |source: &str| FuseOptions {
        owner: init.root_owner().unwrap(),
        root_perms: 0o755,
        max_read: None,
        source: source.to_owned(),
    };
    // Made /keep/n and /keep/n/m: both go; /keep was there before and stays.
    let (_dev, mnt) = mount::fuse_mount(&options(&unique("a"))).unwrap();
    let attached = mount::attach(&init, "alice", mnt, Path::new("/keep/n/m"), all_live())
        .await
        .unwrap();
    attached.detach().await.unwrap();
    assert_eq!(c.sh_ok("ls -A /keep"), "file\n");
    // One she put something in stays, with what she put there; the empty one below goes.
    let (_dev, mnt) = mount::fuse_mount(&options(&unique("b"))).unwrap();
    let attached = mount::attach(&init, "alice", mnt, Path::new("/keep/x/y"), all_live())
        .await
        .unwrap();
    c.sh_ok("touch /keep/x/mine");
    attached.detach().await.unwrap();
    assert_eq!(c.sh_ok("ls -A /keep/x"), "mine\n");
    // Dropped rather than detached, the same.
    let (_dev, mnt) = mount::fuse_mount(&options(&unique("c"))).unwrap();
    let attached = mount::attach(&init, "alice", mnt, Path::new("/keep/d/e"), all_live())
        .await
        .unwrap();
    drop(attached);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.sh_ok("ls -A /keep") != "file\nx\n" {
        assert!(Instant::now() < deadline, "{}", c.sh_ok("ls -A /keep"));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every connection taken as served (a mount there is never taken for one left behind).
fn all_live() -> mount::Live {
    std::sync::Arc::new(|_| true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_an_earlier_daemon_left_is_taken_out_for_the_new_one() {
    let c = Container::start(&[]);
    let init = open(&c).await;
    let options = |source: &str| FuseOptions {
        owner: init.root_owner().unwrap(),
        root_perms: 0o755,
        max_read: None,
        source: source.to_owned(),
    };
    // The earlier daemon's: its server gone (connection aborted, descriptor closed), the
    // mount left in the container as a killed daemon leaves it.
    let old = unique("old");
    let (dev, mnt) = mount::fuse_mount(&options(&old)).unwrap();
    let conn = mnt.connection();
    let left = mount::attach(&init, "alice", mnt, Path::new("/w"), all_live())
        .await
        .unwrap();
    std::mem::forget(left);
    conn.abort().unwrap();
    drop(dev);
    assert!(c.sh_ok("cat /proc/mounts").contains(&old));
    // The new daemon serves only its own connection.
    let new = unique("new");
    let (_dev, mnt) = mount::fuse_mount(&options(&new)).unwrap();
    let mine = mnt.connection();
    let live: mount::Live = std::sync::Arc::new(move |c| c == mine);
    let attached = mount::attach(&init, "alice", mnt, Path::new("/w"), live.clone())
        .await
        .unwrap();
    let mounts = c.sh_ok("cat /proc/mounts");
    assert!(mounts.contains(&new) && !mounts.contains(&old), "{mounts}");
    // A mount that is served (its connection live) is never taken out.
    let (_dev2, mnt) = mount::fuse_mount(&options(&unique("third"))).unwrap();
    let e = mount::attach(&init, "alice", mnt, Path::new("/w"), live)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "/w is a FUSE mount in the container already");
    attached.detach().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_mount_is_never_looked_into() {
    // A mount whose server never answers (not even INIT), as a stalled laptop's would be:
    // a mount beneath it is refused at once instead of waiting on it.
    let c = Container::start(&[]);
    let init = open(&c).await;
    let owner = init.root_owner().unwrap();
    let options = |source: &str| FuseOptions {
        owner,
        root_perms: 0o755,
        max_read: None,
        source: source.to_owned(),
    };
    let (_dev, stalled) = mount::fuse_mount(&options(&unique("src"))).unwrap();
    let stalled_conn = stalled.connection();
    let first = mount::attach(&init, "alice", stalled, Path::new("/m"), all_live())
        .await
        .unwrap();
    let source = unique("src");
    let (_dev2, mnt) = mount::fuse_mount(&options(&source)).unwrap();
    let started = Instant::now();
    let e = mount::attach(
        &init,
        "alice",
        mnt,
        Path::new("/m/inner/deeper"),
        all_live(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.to_string(), "cannot mount beneath /m: it is a FUSE mount");
    assert!(started.elapsed() < mount::ATTACH_DEADLINE);
    assert!(!c.sh_ok("cat /proc/mounts").contains(&source));
    // Nor is one stacked on it.
    let (_dev3, mnt) = mount::fuse_mount(&options(&source)).unwrap();
    let e = mount::attach(&init, "alice", mnt, Path::new("/m"), all_live())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "/m is a FUSE mount in the container already");
    first.detach().await.unwrap();
    stalled_conn.abort().unwrap();
}
