#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The laptop's file server against the daemon's real client, over an in-memory stream, on
//! a temporary directory: every operation, the escapes, large files, concurrency and the
//! bounds.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_connect::client::{CallError, Client, Wire};
use berth_connect::proto::{
    self, Answer, Attr, DirAfter, MAX_HEAD, MAX_IO, Op, READDIR_BYTES, RelPath, SetTime, Time,
    ToLaptop,
};
use berth_connect::serve::{self, MAX_HANDLES, ServeError, WAITERS, WORKERS};
use tokio::task::JoinHandle;

/// An upper bound on anything the tests wait for (never a timing).
const BOUND: Duration = Duration::from_secs(60);

fn p(s: &str) -> RelPath {
    RelPath(s.as_bytes().to_vec())
}

struct Mount {
    top: tempfile::TempDir,
    client: Client,
    driver: JoinHandle<()>,
    /// Carries the daemon's requests to the laptop; aborted, the laptop's input ends as
    /// when the daemon closes the channel.
    relay: JoinHandle<()>,
    served: JoinHandle<Result<(), ServeError>>,
}

impl Mount {
    /// `top/served` served, `top/outside/secret` beside it.
    fn new() -> Self {
        Self::with_deadline(BOUND)
    }

    /// As [`Mount::new`], the daemon's end giving up on each request after `deadline`.
    fn with_deadline(deadline: Duration) -> Self {
        let top = tempfile::tempdir().unwrap();
        std::fs::create_dir(top.path().join("served")).unwrap();
        std::fs::create_dir_all(top.path().join("outside/dir")).unwrap();
        std::fs::write(top.path().join("outside/secret"), "top secret").unwrap();
        std::fs::set_permissions(
            top.path().join("outside/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        // One stream each way (two for the requests, with the relay between them).
        let (requests, mut relay_in) = tokio::io::duplex(1 << 20);
        let (mut relay_out, laptop_in) = tokio::io::duplex(1 << 20);
        let (laptop_out, replies) = tokio::io::duplex(1 << 20);
        let (client, driver) = Client::start(Wire::new(replies, requests), deadline);
        let driver = tokio::spawn(driver);
        let relay = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut relay_in, &mut relay_out).await;
        });
        let root = serve::open_root(&top.path().join("served")).unwrap();
        let served = tokio::spawn(serve::serve(root, Wire::new(laptop_in, laptop_out)));
        Self {
            top,
            client,
            driver,
            relay,
            served,
        }
    }

    fn root(&self) -> PathBuf {
        self.top.path().join("served")
    }

    fn outside(&self) -> PathBuf {
        self.top.path().join("outside")
    }

    async fn call(&self, op: Op) -> Result<Answer, i32> {
        match self.client.call(op).await {
            Ok(a) => Ok(a),
            Err(CallError::Errno(e)) => Err(e),
            Err(e) => panic!("{e}"),
        }
    }

    async fn ok(&self, op: Op) -> Answer {
        let what = format!("{op:?}");
        self.call(op)
            .await
            .unwrap_or_else(|e| panic!("{what}: errno {e}"))
    }

    async fn errno(&self, op: Op) -> i32 {
        let what = format!("{op:?}");
        match self.call(op).await {
            Ok(a) => panic!("{what} succeeded: {a:?}"),
            Err(e) => e,
        }
    }

    async fn attr(&self, path: &str) -> Result<Attr, i32> {
        match self.call(Op::Lookup { path: p(path) }).await? {
            Answer::Attr(a) => Ok(a),
            other => panic!("{other:?}"),
        }
    }

    async fn create(&self, path: &str, flags: i32, mode: u32) -> (u64, Attr) {
        match self
            .ok(Op::Create {
                path: p(path),
                flags,
                mode,
            })
            .await
        {
            Answer::Created { fh, attr, .. } => (fh, attr),
            other => panic!("{other:?}"),
        }
    }

    async fn open(&self, path: &str, flags: i32) -> u64 {
        match self
            .ok(Op::Open {
                path: p(path),
                flags,
                head: 0,
            })
            .await
        {
            Answer::Opened { fh, head: None } => fh,
            other => panic!("{other:?}"),
        }
    }

    async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> u32 {
        match self
            .ok(Op::Write {
                fh,
                offset,
                data: data.to_vec(),
            })
            .await
        {
            Answer::Written(n) => n,
            other => panic!("{other:?}"),
        }
    }

    async fn read(&self, fh: u64, offset: u64, size: u32) -> Vec<u8> {
        match self.ok(Op::Read { fh, offset, size }).await {
            Answer::Data(d) => d,
            other => panic!("{other:?}"),
        }
    }

    async fn setattr(&self, path: &str, fh: Option<u64>, f: impl FnOnce(&mut Op)) -> Attr {
        let mut op = Op::Setattr {
            path: p(path),
            fh,
            mode: None,
            size: None,
            atime: None,
            mtime: None,
        };
        f(&mut op);
        match self.ok(op).await {
            Answer::Attr(a) => a,
            other => panic!("{other:?}"),
        }
    }

    /// Ends the daemon's side; serving must end by itself.
    async fn close(self) -> Result<(), ServeError> {
        self.relay.abort();
        let end = tokio::time::timeout(BOUND, self.served)
            .await
            .expect("serve did not end when the daemon closed")
            .unwrap();
        // Its replies' stream ended with it, and so did the client.
        tokio::time::timeout(BOUND, self.driver)
            .await
            .unwrap()
            .unwrap();
        assert!(self.client.is_gone());
        end
    }
}

fn size(op: &mut Op, to: u64) {
    if let Op::Setattr { size, .. } = op {
        *size = Some(to);
    }
}

fn mode(op: &mut Op, to: u32) {
    if let Op::Setattr { mode, .. } = op {
        *mode = Some(to);
    }
}

#[tokio::test]
async fn files_are_created_written_read_appended_truncated_and_synced() {
    let m = Mount::new();
    let (fh, attr) = m.create("f", libc::O_RDWR | libc::O_EXCL, 0o640).await;
    assert_eq!(attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(attr.mode & 0o777, 0o640 & !umask());
    assert_eq!(attr.size, 0);
    let again = Op::Create {
        path: p("f"),
        flags: libc::O_RDWR | libc::O_EXCL,
        mode: 0o644,
    };
    assert_eq!(m.errno(again).await, libc::EEXIST);

    assert_eq!(m.write(fh, 0, b"hello world").await, 11);
    assert_eq!(m.read(fh, 0, 100).await, b"hello world");
    assert_eq!(m.read(fh, 6, 3).await, b"wor");
    assert_eq!(m.read(fh, 100, 3).await, b"");

    // O_APPEND: at the end whatever the offset.
    let app = m.open("f", libc::O_WRONLY | libc::O_APPEND).await;
    assert_eq!(m.write(app, 0, b"!!").await, 2);
    assert_eq!(std::fs::read(m.root().join("f")).unwrap(), b"hello world!!");

    // Truncation on a handle and on a path.
    assert_eq!(m.setattr("f", Some(fh), |op| size(op, 5)).await.size, 5);
    assert_eq!(std::fs::read(m.root().join("f")).unwrap(), b"hello");
    assert_eq!(m.setattr("f", None, |op| size(op, 2)).await.size, 2);
    assert_eq!(std::fs::read(m.root().join("f")).unwrap(), b"he");
    let got = m.ok(Op::Getattr {
        path: p("f"),
        fh: Some(fh),
    });
    assert!(matches!(got.await, Answer::Attr(a) if a.size == 2));

    // O_TRUNC on open.
    let t = m.open("f", libc::O_WRONLY | libc::O_TRUNC).await;
    assert_eq!(m.attr("f").await.unwrap().size, 0);

    for (h, datasync) in [(fh, true), (app, false)] {
        assert_eq!(m.ok(Op::Fsync { fh: h, datasync }).await, Answer::Done);
    }
    for h in [fh, app] {
        assert_eq!(m.ok(Op::Release { fh: h, attr: false }).await, Answer::Done);
    }
    // A release may bring the file's attributes as it closes.
    assert_eq!(m.write(t, 0, b"abc").await, 3);
    let closed = m.ok(Op::Release { fh: t, attr: true }).await;
    assert!(
        matches!(closed, Answer::Attr(a) if a.size == 3 && a.nlink == 1),
        "{closed:?}"
    );
    assert_eq!(
        m.errno(Op::Read {
            fh,
            offset: 0,
            size: 1
        })
        .await,
        libc::EBADF
    );
    assert_eq!(m.errno(Op::Release { fh, attr: false }).await, libc::EBADF);

    // Open never creates, whatever flags it is given.
    let open_creat = Op::Open {
        path: p("new"),
        flags: libc::O_WRONLY | libc::O_CREAT,
        head: 0,
    };
    assert_eq!(m.errno(open_creat).await, libc::ENOENT);
    assert!(!m.root().join("new").exists());
    // A missing file, a file in a missing directory.
    assert_eq!(m.attr("nope").await, Err(libc::ENOENT));
    let missing = Op::Create {
        path: p("nodir/f"),
        flags: libc::O_WRONLY,
        mode: 0o644,
    };
    assert_eq!(m.errno(missing).await, libc::ENOENT);
    m.close().await.unwrap();
}

fn umask() -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    nix::sys::stat::umask(old);
    old.bits()
}

#[tokio::test]
async fn names_are_made_renamed_linked_and_removed() {
    let m = Mount::new();
    let root = m.root();
    let attr = match m
        .ok(Op::Mkdir {
            path: p("d"),
            mode: 0o750,
        })
        .await
    {
        Answer::Entry { attr, .. } => attr,
        other => panic!("{other:?}"),
    };
    assert_eq!(attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert!(root.join("d").is_dir());
    let twice = Op::Mkdir {
        path: p("d"),
        mode: 0o750,
    };
    assert_eq!(m.errno(twice).await, libc::EEXIST);
    std::fs::write(root.join("d/a"), "A").unwrap();
    std::fs::write(root.join("d/b"), "B").unwrap();
    std::fs::write(root.join("c"), "C").unwrap();

    // Over an existing file.
    let rename = |from: &str, to: &str, flags| Op::Rename {
        from: p(from),
        to: p(to),
        flags,
    };
    assert!(matches!(
        m.ok(rename("d/a", "d/b", 0)).await,
        Answer::Renamed { .. }
    ));
    assert!(!root.join("d/a").exists());
    assert_eq!(std::fs::read(root.join("d/b")).unwrap(), b"A");
    // renameat2's flags.
    assert_eq!(
        m.errno(rename("c", "d/b", libc::RENAME_NOREPLACE)).await,
        libc::EEXIST
    );
    assert!(matches!(
        m.ok(rename("c", "d/b", libc::RENAME_EXCHANGE)).await,
        Answer::Renamed { .. }
    ));
    assert_eq!(std::fs::read(root.join("c")).unwrap(), b"A");
    assert_eq!(std::fs::read(root.join("d/b")).unwrap(), b"C");
    assert_eq!(
        m.errno(rename("c", "e", libc::RENAME_WHITEOUT)).await,
        libc::EINVAL
    );
    assert_eq!(m.errno(rename("", "e", 0)).await, libc::EBUSY);

    // Symlinks are stored and read back as given.
    for (name, target) in [("s", "/etc/passwd"), ("t", "../../x"), ("u", "d/b")] {
        let op = Op::Symlink {
            path: p(name),
            target: target.as_bytes().to_vec(),
        };
        let Answer::Entry { attr: a, .. } = m.ok(op).await else {
            panic!()
        };
        assert_eq!(a.mode & libc::S_IFMT, libc::S_IFLNK);
        let back = m.ok(Op::Readlink { path: p(name) }).await;
        assert_eq!(back, Answer::Bytes(target.as_bytes().to_vec()));
        assert_eq!(
            std::fs::read_link(root.join(name)).unwrap(),
            Path::new(target)
        );
    }
    assert_eq!(m.errno(Op::Readlink { path: p("c") }).await, libc::EINVAL);

    // A hard link.
    let link = Op::Link {
        from: p("c"),
        to: p("d/hard"),
    };
    let Answer::Entry { attr: a, .. } = m.ok(link).await else {
        panic!()
    };
    assert_eq!(a.nlink, 2);
    assert_eq!(
        std::fs::metadata(root.join("c")).unwrap().ino(),
        std::fs::metadata(root.join("d/hard")).unwrap().ino()
    );
    // A hard link of a symlink is of the link, not its target.
    let link = Op::Link {
        from: p("s"),
        to: p("s2"),
    };
    let Answer::Entry { attr: a, .. } = m.ok(link).await else {
        panic!()
    };
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFLNK);

    // Removal.
    assert_eq!(m.errno(Op::Rmdir { path: p("d") }).await, libc::ENOTEMPTY);
    assert_eq!(m.errno(Op::Unlink { path: p("d") }).await, libc::EISDIR);
    assert_eq!(m.errno(Op::Rmdir { path: p("c") }).await, libc::ENOTDIR);
    assert_eq!(m.errno(Op::Rmdir { path: p("") }).await, libc::EBUSY);
    for f in ["d/b", "d/hard", "s"] {
        let gone = m.ok(Op::Unlink { path: p(f) }).await;
        assert!(matches!(gone, Answer::Removed { .. }), "{gone:?}");
    }
    let gone = m.ok(Op::Rmdir { path: p("d") }).await;
    assert!(matches!(gone, Answer::Removed { .. }), "{gone:?}");
    assert!(!root.join("d").exists());
    assert_eq!(m.errno(Op::Unlink { path: p("d") }).await, libc::ENOENT);
    m.close().await.unwrap();
}

/// `dir`'s attributes after a change, as the answer carried them: those of the directory on
/// disk now (nothing else changes it), and numbered after `last`. Returns the number.
fn after_is(root: &Path, dir: &str, after: Option<Box<DirAfter>>, last: u64) -> u64 {
    let after = after.unwrap_or_else(|| panic!("no attributes of {dir:?}"));
    let st = std::fs::symlink_metadata(root.join(dir)).unwrap();
    let a = after.attr;
    assert_eq!(
        (a.ino, a.nlink, a.size),
        (st.ino(), st.nlink() as u32, st.size()),
        "{dir:?}"
    );
    assert_eq!(
        (a.mtime.secs, a.mtime.nanos, a.ctime.secs, a.ctime.nanos),
        (
            st.mtime(),
            st.mtime_nsec() as u32,
            st.ctime(),
            st.ctime_nsec() as u32
        ),
        "{dir:?}"
    );
    assert!(after.seq > last, "{dir:?}: {} after {last}", after.seq);
    after.seq
}

#[tokio::test]
async fn a_change_of_names_carries_its_directory_after_it() {
    let m = Mount::new();
    let root = m.root();
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    let mut seq = 0;

    // A create in a directory, and at the top (the served directory's own).
    for (path, dir) in [("d/f", "d"), ("top", "")] {
        let create = Op::Create {
            path: p(path),
            flags: libc::O_WRONLY,
            mode: 0o644,
        };
        let Answer::Created { fh, dir: after, .. } = m.ok(create).await else {
            panic!()
        };
        seq = after_is(&root, dir, after, seq);
        m.ok(Op::Release { fh, attr: false }).await;
    }

    // mkdir raises the link count it carries.
    let mkdir = Op::Mkdir {
        path: p("d/sub"),
        mode: 0o755,
    };
    let Answer::Entry { dir, .. } = m.ok(mkdir).await else {
        panic!()
    };
    assert_eq!(dir.as_ref().map(|d| d.attr.nlink), Some(4));
    seq = after_is(&root, "d", dir, seq);
    let symlink = Op::Symlink {
        path: p("d/e/s"),
        target: b"x".to_vec(),
    };
    let Answer::Entry { dir, .. } = m.ok(symlink).await else {
        panic!()
    };
    seq = after_is(&root, "d/e", dir, seq);
    let link = Op::Link {
        from: p("d/f"),
        to: p("d/e/h"),
    };
    let Answer::Entry { dir, .. } = m.ok(link).await else {
        panic!()
    };
    seq = after_is(&root, "d/e", dir, seq);

    // A rename carries both directories; within one, the same one twice.
    let rename = Op::Rename {
        from: p("d/f"),
        to: p("d/e/g"),
        flags: 0,
    };
    let Answer::Renamed { from, to } = m.ok(rename).await else {
        panic!()
    };
    seq = after_is(&root, "d", from, seq);
    seq = after_is(&root, "d/e", to, seq);
    let rename = Op::Rename {
        from: p("d/e/g"),
        to: p("d/e/h"),
        flags: 0,
    };
    let Answer::Renamed { from, to } = m.ok(rename).await else {
        panic!()
    };
    assert_eq!(from.map(|d| d.attr), to.as_ref().map(|d| d.attr));
    seq = after_is(&root, "d/e", to, seq);

    for (op, dir) in [
        (Op::Unlink { path: p("d/e/h") }, "d/e"),
        (Op::Rmdir { path: p("d/sub") }, "d"),
    ] {
        let Answer::Removed { dir: after } = m.ok(op).await else {
            panic!()
        };
        seq = after_is(&root, dir, after, seq);
    }
    m.close().await.unwrap();
}

#[tokio::test]
async fn modes_and_times_are_set_and_owners_stay() {
    let m = Mount::new();
    let (fh, before) = m.create("f", libc::O_RDWR, 0o644).await;
    let a = m.setattr("f", None, |op| mode(op, 0o600)).await;
    assert_eq!(a.mode & 0o7777, 0o600);
    let a = m.setattr("f", Some(fh), |op| mode(op, 0o1751)).await;
    assert_eq!(a.mode & 0o7777, 0o1751);
    assert_eq!(
        std::fs::metadata(m.root().join("f")).unwrap().mode() & 0o7777,
        0o1751
    );
    // No set-user-ID or set-group-ID program for the laptop's other users; a directory
    // keeps set-group-ID.
    for (path, fh) in [("f", None), ("f", Some(fh))] {
        let a = m.setattr(path, fh, |op| mode(op, 0o6755)).await;
        assert_eq!(a.mode & 0o7777, 0o755);
    }
    let (_, created) = m.create("g", libc::O_WRONLY, 0o6777).await;
    assert_eq!(created.mode & 0o6000, 0);
    let mkdir = Op::Mkdir {
        path: p("d"),
        mode: 0o755,
    };
    m.ok(mkdir).await;
    let a = m.setattr("d", None, |op| mode(op, 0o6775)).await;
    assert_eq!(a.mode & 0o7777, 0o2775);
    m.setattr("f", None, |op| mode(op, 0o751)).await;
    assert_eq!((a.uid, a.gid), (before.uid, before.gid));

    let at = |secs, nanos| SetTime::At(Time { secs, nanos });
    let a = m
        .setattr("f", None, |op| {
            if let Op::Setattr { atime, mtime, .. } = op {
                *atime = Some(at(1_500_000_000, 987_654_321));
                *mtime = Some(at(1_000_000_000, 123_456_789));
            }
        })
        .await;
    assert_eq!(
        a.atime,
        Time {
            secs: 1_500_000_000,
            nanos: 987_654_321
        }
    );
    assert_eq!(
        a.mtime,
        Time {
            secs: 1_000_000_000,
            nanos: 123_456_789
        }
    );
    let meta = std::fs::metadata(m.root().join("f")).unwrap();
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_000_000_000, 123_456_789)
    );

    // Now, on the handle; the other time is left alone.
    let a = m
        .setattr("f", Some(fh), |op| {
            if let Op::Setattr { mtime, .. } = op {
                *mtime = Some(SetTime::Now);
            }
        })
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(a.mtime.secs > 1_600_000_000 && a.mtime.secs <= now as i64 + 1);
    assert_eq!(a.atime.secs, 1_500_000_000);

    // Nanoseconds past a second are refused, nothing changes.
    let bad = Op::Setattr {
        path: p("f"),
        fh: None,
        mode: Some(0o600),
        size: None,
        atime: None,
        mtime: Some(at(5, 1_000_000_000)),
    };
    assert_eq!(m.errno(bad).await, libc::EINVAL);
    assert_eq!(m.attr("f").await.unwrap().mode & 0o7777, 0o751);

    // The root itself.
    let a = m.setattr("", None, |op| mode(op, 0o711)).await;
    assert_eq!(a.mode & 0o7777, 0o711);
    assert_eq!(std::fs::metadata(m.root()).unwrap().mode() & 0o7777, 0o711);

    let Answer::Statfs(s) = m.ok(Op::Statfs).await else {
        panic!()
    };
    let v = nix::sys::statvfs::statvfs(&m.root()).unwrap();
    assert_eq!((s.blocks, s.bsize as u64), (v.blocks(), v.block_size()));
    assert!(s.namelen >= 255);
    m.close().await.unwrap();
}

#[tokio::test]
async fn a_listing_comes_in_batches_and_resumes_from_any_offset() {
    let m = Mount::new();
    let root = m.root();
    let mut want = std::collections::BTreeSet::new();
    for i in 0..1500 {
        let name = format!("{i:04}-{}", "x".repeat(100));
        std::fs::write(root.join(&name), i.to_string()).unwrap();
        want.insert(name);
    }
    std::fs::create_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
    want.insert("sub".into());
    want.insert("link".into());

    let Answer::Handle(fh) = m.ok(Op::Opendir { path: p("") }).await else {
        panic!()
    };
    let mut batches = Vec::new();
    let mut offset = 0;
    loop {
        let Answer::Entries(entries) = m.ok(Op::Readdir { fh, offset }).await else {
            panic!()
        };
        if entries.is_empty() {
            break;
        }
        let bytes = proto::encode(&Answer::Entries(entries.clone()))
            .unwrap()
            .len();
        assert!(bytes <= READDIR_BYTES, "{bytes}");
        for e in &entries {
            assert!(e.offset > offset);
            offset = e.offset;
        }
        batches.push(entries);
    }
    assert!(batches.len() > 2, "{}", batches.len());
    let all: Vec<_> = batches.iter().flatten().collect();
    let names: std::collections::BTreeSet<String> = all
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    assert_eq!(names.len(), all.len(), "an entry came twice");
    assert_eq!(names, want, "no . or .., nothing missing");
    for e in &all {
        let name = String::from_utf8(e.name.clone()).unwrap();
        assert_eq!(e.attr, Some(m.attr(&name).await.unwrap()), "{name}");
    }

    // Again from the start, from an earlier offset, from the same offset twice, past the end.
    let Answer::Entries(first) = m.ok(Op::Readdir { fh, offset: 0 }).await else {
        panic!()
    };
    assert_eq!(first, batches[0]);
    let from = batches[1][10].offset;
    for _ in 0..2 {
        let Answer::Entries(rest) = m.ok(Op::Readdir { fh, offset: from }).await else {
            panic!()
        };
        assert_eq!(rest[0], batches[1][11]);
    }
    let past = Op::Readdir {
        fh,
        offset: u64::MAX,
    };
    assert_eq!(m.ok(past).await, Answer::Entries(Vec::new()));

    // A subdirectory; a file is not one.
    let Answer::Handle(sub) = m.ok(Op::Opendir { path: p("sub") }).await else {
        panic!()
    };
    let list = m.ok(Op::Readdir { fh: sub, offset: 0 });
    assert_eq!(list.await, Answer::Entries(Vec::new()));
    let file = Op::Opendir {
        path: p("0001-".to_string().as_str()),
    };
    assert_eq!(m.errno(file).await, libc::ENOENT);
    let name = want.iter().next().unwrap().clone();
    assert_eq!(m.errno(Op::Opendir { path: p(&name) }).await, libc::ENOTDIR);
    for h in [fh, sub] {
        assert_eq!(m.ok(Op::Release { fh: h, attr: false }).await, Answer::Done);
    }
    m.close().await.unwrap();
}

/// Everything beneath `dir`: each entry's kind, size, mode, mtime and content.
type Snapshot = BTreeMap<PathBuf, (u32, u64, i64, i64, Vec<u8>)>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let content = if meta.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.insert(
                path,
                (
                    meta.mode(),
                    meta.size(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    content,
                ),
            );
        }
    }
    out
}

#[tokio::test]
async fn nothing_outside_the_directory_is_reached() {
    let m = Mount::new();
    let root = m.root();
    let outside = m.outside();
    let secret = outside.join("secret");
    use std::os::unix::fs::symlink;
    // Links to the file outside, and to the directory around it.
    symlink(&secret, root.join("abs")).unwrap();
    symlink("../outside/secret", root.join("rel")).unwrap();
    symlink("/etc/passwd", root.join("passwd")).unwrap();
    symlink(&outside, root.join("up")).unwrap();
    symlink("../outside", root.join("uprel")).unwrap();
    symlink("..", root.join("dotdot")).unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    symlink("../..", root.join("d/dotdot2")).unwrap();
    let before = snapshot(m.top.path());
    let passwd = std::fs::read("/etc/passwd").unwrap();

    for link in ["abs", "rel", "passwd"] {
        for flags in [libc::O_RDONLY, libc::O_WRONLY | libc::O_TRUNC, libc::O_RDWR] {
            let open = Op::Open {
                path: p(link),
                flags,
                head: 0,
            };
            assert_eq!(m.errno(open).await, libc::ELOOP, "{link}");
            let create = Op::Create {
                path: p(link),
                flags,
                mode: 0o666,
            };
            assert_eq!(m.errno(create).await, libc::ELOOP, "{link}");
        }
        let trunc = Op::Setattr {
            path: p(link),
            fh: None,
            mode: None,
            size: Some(0),
            atime: None,
            mtime: None,
        };
        assert_eq!(m.errno(trunc).await, libc::ELOOP, "{link}");
        let chmod = Op::Setattr {
            path: p(link),
            fh: None,
            mode: Some(0o777),
            size: None,
            atime: None,
            mtime: None,
        };
        assert_eq!(m.errno(chmod).await, libc::EOPNOTSUPP, "{link}");
        // Times of the link itself, never of its target.
        m.setattr(link, None, |op| {
            if let Op::Setattr { mtime, .. } = op {
                *mtime = Some(SetTime::At(Time { secs: 7, nanos: 0 }));
            }
        })
        .await;
        assert_eq!(
            std::fs::symlink_metadata(root.join(link)).unwrap().mtime(),
            7
        );
        assert_eq!(m.errno(Op::Opendir { path: p(link) }).await, libc::ENOTDIR);
    }

    // Through a parent that is `..` of the directory: the directory itself.
    for dir in ["dotdot", "d/dotdot2"] {
        assert_eq!(m.attr(&format!("{dir}/secret")).await, Err(libc::ENOENT));
        let fh = m
            .create(&format!("{dir}/new"), libc::O_WRONLY | libc::O_EXCL, 0o644)
            .await
            .0;
        assert!(root.join("new").is_file());
        m.ok(Op::Release { fh, attr: false }).await;
        m.ok(Op::Unlink {
            path: p(&format!("{dir}/new")),
        })
        .await;
        assert!(!root.join("new").exists());
    }

    // Through a symlinked parent pointing out: resolved beneath the directory, where
    // nothing is.
    for dir in ["up", "uprel"] {
        let at = |name: &str| p(&format!("{dir}/{name}"));
        assert_eq!(m.attr(&format!("{dir}/secret")).await, Err(libc::ENOENT));
        let ops = [
            Op::Lookup { path: at("secret") },
            Op::Getattr {
                path: at("secret"),
                fh: None,
            },
            Op::Readlink { path: at("secret") },
            Op::Open {
                path: at("secret"),
                flags: libc::O_RDONLY,
                head: 0,
            },
            Op::Create {
                path: at("new"),
                flags: libc::O_WRONLY | libc::O_EXCL,
                mode: 0o644,
            },
            Op::Create {
                path: at("secret"),
                flags: libc::O_WRONLY | libc::O_TRUNC,
                mode: 0o644,
            },
            Op::Mkdir {
                path: at("newdir"),
                mode: 0o755,
            },
            Op::Symlink {
                path: at("sl"),
                target: b"x".to_vec(),
            },
            Op::Unlink { path: at("secret") },
            Op::Rmdir { path: at("dir") },
            Op::Rename {
                from: at("secret"),
                to: p("stolen"),
                flags: 0,
            },
            Op::Rename {
                from: p("d"),
                to: at("moved"),
                flags: 0,
            },
            Op::Link {
                from: at("secret"),
                to: p("hard"),
            },
            Op::Link {
                from: p("abs"),
                to: at("hard"),
            },
            Op::Opendir { path: at("dir") },
            Op::Setattr {
                path: at("secret"),
                fh: None,
                mode: Some(0o777),
                size: Some(0),
                atime: None,
                mtime: None,
            },
        ];
        for op in ops {
            let what = format!("{op:?}");
            assert_eq!(m.call(op).await, Err(libc::ENOENT), "{what}");
        }
        // Listing the link's directory lists the served one (`..` of `/` is `/`) or fails.
        if let Ok(Answer::Handle(fh)) = m.call(Op::Opendir { path: p(dir) }).await {
            panic!("opened {dir} as a directory: {fh}");
        }
    }

    // Absolute links land beneath the directory, as if it were `/`.
    std::fs::create_dir(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/passwd"), "inside").unwrap();
    symlink("/etc", root.join("etclink")).unwrap();
    let fh = m.open("etclink/passwd", libc::O_RDONLY).await;
    assert_eq!(m.read(fh, 0, 100).await, b"inside");

    // Paths of any other shape.
    for bad in [
        "../outside/secret",
        "/etc/passwd",
        "d/../../outside",
        "d//x",
        "d/",
        "./d",
    ] {
        let ops = [
            Op::Lookup { path: p(bad) },
            Op::Open {
                path: p(bad),
                flags: libc::O_RDONLY,
                head: 0,
            },
            Op::Create {
                path: p(bad),
                flags: libc::O_WRONLY,
                mode: 0o644,
            },
            Op::Mkdir {
                path: p(bad),
                mode: 0o755,
            },
            Op::Unlink { path: p(bad) },
            Op::Rmdir { path: p(bad) },
            Op::Readlink { path: p(bad) },
            Op::Symlink {
                path: p(bad),
                target: b"x".to_vec(),
            },
            Op::Rename {
                from: p("d"),
                to: p(bad),
                flags: 0,
            },
            Op::Link {
                from: p(bad),
                to: p("x"),
            },
            Op::Opendir { path: p(bad) },
            Op::Setattr {
                path: p(bad),
                fh: None,
                mode: Some(0o777),
                size: None,
                atime: None,
                mtime: None,
            },
        ];
        for op in ops {
            let what = format!("{op:?}");
            assert_eq!(m.call(op).await, Err(libc::EINVAL), "{what}");
        }
    }
    let nul = Op::Symlink {
        path: p("z"),
        target: b"a\0b".to_vec(),
    };
    assert_eq!(m.errno(nul).await, libc::EINVAL);

    // Outside, nothing changed (inside, only what the test made and the links' times).
    let after = snapshot(m.top.path());
    let outside_only = |s: &Snapshot| {
        s.iter()
            .filter(|(k, _)| !k.starts_with(&root))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(outside_only(&after), outside_only(&before));
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    let mut made: Vec<_> = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .map(|k| k.strip_prefix(&root).unwrap().to_path_buf())
        .collect();
    made.sort();
    assert_eq!(
        made,
        [
            Path::new("etc"),
            Path::new("etc/passwd"),
            Path::new("etclink")
        ]
    );
    m.close().await.unwrap();
}

#[tokio::test]
async fn a_file_past_4_gib_is_written_and_read_at_high_offsets() {
    let m = Mount::new();
    let (fh, _) = m.create("big", libc::O_RDWR, 0o644).await;
    let high = (5u64 << 30) + 3;
    match m
        .call(Op::Write {
            fh,
            offset: high,
            data: b"hello".to_vec(),
        })
        .await
    {
        Ok(Answer::Written(5)) => {}
        Err(e) if e == libc::EFBIG || e == libc::ENOSPC => {
            println!("skipped: the temporary directory holds no file past 4 GiB ({e})");
            return;
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.attr("big").await.unwrap().size, high + 5);
    assert_eq!(m.read(fh, high, 100).await, b"hello");
    assert_eq!(m.read(fh, high - 2, 4).await, b"\0\0he");
    assert_eq!(m.read(fh, 1 << 32, 4).await, b"\0\0\0\0");
    let a = m.setattr("big", Some(fh), |op| size(op, 6 << 30)).await;
    assert_eq!(a.size, 6 << 30);
    assert_eq!(
        std::fs::metadata(m.root().join("big")).unwrap().len(),
        6 << 30
    );
    // Offsets past what a file can hold are errors, not wraps.
    let far = Op::Write {
        fh,
        offset: u64::MAX - 1,
        data: b"x".to_vec(),
    };
    assert_eq!(m.errno(far).await, libc::EFBIG);
    m.close().await.unwrap();
}

/// The daemon's writes behind arrive many at once for one file (up to [`WORKERS`] served
/// together); the laptop writes each in pieces, one write of a file at a time. Every byte
/// lands where it was sent: whole writes at offsets that no piece boundary lines up with,
/// more of them than there are workers, and one write over the seams of two others.
#[tokio::test]
async fn many_large_writes_to_one_file_at_once_land_whole() {
    let m = Mount::new();
    let (fh, _) = m.create("big", libc::O_RDWR, 0o644).await;
    let len = MAX_IO as usize;
    let count = 2 * WORKERS + 3;
    let chunk = |k: usize| -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((i * 31 + k * 7 + i / 4096) % 251).unwrap())
            .collect()
    };
    let writes = (0..count).map(|k| {
        let m = &m;
        async move {
            let n = m.write(fh, (k * len) as u64 + 5, &chunk(k)).await;
            assert_eq!(n as usize, len);
        }
    });
    futures_util::future::join_all(writes).await;
    let mut want = vec![0u8; 5];
    for k in 0..count {
        want.extend(chunk(k));
    }
    // One more over the seam of the first two, starting inside a piece.
    let over: Vec<u8> = (0..len - 3).map(|i| (i % 7) as u8 + 200).collect();
    let at = len / 2 + 1;
    assert_eq!(m.write(fh, at as u64, &over).await as usize, over.len());
    want.splice(at..at + over.len(), over.iter().copied());
    let got = std::fs::read(m.root().join("big")).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the file differs from what was written");
    m.close().await.unwrap();
}

/// Runs a test whose failure may leave a read waiting on a FIFO: a plain test's runtime
/// would wait for that blocking thread forever instead of failing.
fn run_bounded(test: impl std::future::Future<Output = ()> + Send + 'static) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outcome = rt.block_on(async { tokio::spawn(test).await });
    rt.shutdown_timeout(BOUND);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[test]
fn fifos_nobody_writes_do_not_hold_other_requests() {
    run_bounded(fifos_nobody_writes());
}

async fn fifos_nobody_writes() {
    let m = Mount::new();
    nix::unistd::mkfifo(&m.root().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::write(m.root().join("f"), "fast").unwrap();
    // More waiting reads than ordinary places.
    let readers = WORKERS + 4;
    let mut reads = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..readers {
        let fh = m.open("fifo", libc::O_RDONLY).await;
        handles.push(fh);
        let c = m.client.clone();
        reads.push(tokio::spawn(async move {
            c.call(Op::Read {
                fh,
                offset: 0,
                size: 1,
            })
            .await
        }));
    }
    for _ in 0..WORKERS * 2 {
        assert_eq!(m.attr("f").await.unwrap().size, 4);
        let fh = m.open("f", libc::O_RDONLY).await;
        assert_eq!(m.read(fh, 0, 10).await, b"fast");
        m.ok(Op::Release { fh, attr: false }).await;
    }
    assert!(reads.iter().all(|r| !r.is_finished()));

    // The test ends the reads: one byte each, then the writer goes (end of file for any
    // read that found none).
    let fifo = m.root().join("fifo");
    let writer = tokio::task::spawn_blocking(move || {
        std::fs::write(fifo, vec![b'x'; readers]).unwrap();
    });
    let mut got = 0;
    for r in reads {
        match tokio::time::timeout(BOUND, r).await.unwrap().unwrap() {
            Ok(Answer::Data(d)) => got += d.len(),
            other => panic!("{other:?}"),
        }
    }
    writer.await.unwrap();
    assert_eq!(got, readers);

    // A FIFO opened for writing with no reader says so instead of waiting.
    for fh in handles {
        m.ok(Op::Release { fh, attr: false }).await;
    }
    let wr = Op::Open {
        path: p("fifo"),
        flags: libc::O_WRONLY,
        head: 0,
    };
    assert_eq!(m.errno(wr).await, libc::ENXIO);
    m.close().await.unwrap();
}

/// The daemon gives up on a FIFO's read at its deadline, and may ask again: with every
/// waiter's place taken, a further FIFO read is told EAGAIN at once, and the requests behind
/// it are served (the reader used to wait for a place, holding every request back).
#[test]
fn past_the_fifo_waiters_a_fifo_read_is_told_to_try_again() {
    run_bounded(past_the_fifo_waiters());
}

async fn past_the_fifo_waiters() {
    let m = Mount::with_deadline(Duration::from_millis(500));
    nix::unistd::mkfifo(&m.root().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::write(m.root().join("f"), "fast").unwrap();
    let fh = m.open("fifo", libc::O_RDONLY).await;
    let read = move || Op::Read {
        fh,
        offset: 0,
        size: 1,
    };
    // Every waiter's place taken; the daemon's end gives each up at its deadline.
    let mut given_up = Vec::new();
    for _ in 0..WAITERS {
        let c = m.client.clone();
        given_up.push(tokio::spawn(async move { c.call(read()).await }));
    }
    for r in given_up {
        assert!(r.await.unwrap().is_err());
    }
    // Their waits go on at the laptop's end; one more is refused, not queued.
    assert_eq!(m.errno(read()).await, libc::EAGAIN);
    assert_eq!(m.attr("f").await.unwrap().size, 4);
    m.close().await.unwrap();
}

#[test]
fn serving_ends_when_the_daemon_closes_even_with_reads_waiting() {
    run_bounded(serving_ends());
}

async fn serving_ends() {
    let m = Mount::new();
    nix::unistd::mkfifo(&m.root().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let fh = m.open("fifo", libc::O_RDONLY).await;
    let c = m.client.clone();
    let read = tokio::spawn(async move {
        c.call(Op::Read {
            fh,
            offset: 0,
            size: 1,
        })
        .await
    });
    assert_eq!(
        m.attr("fifo").await.unwrap().mode & libc::S_IFMT,
        libc::S_IFIFO
    );
    // The waiting read is ended too (serve waits for it before returning), and its answer
    // still goes out.
    m.close().await.unwrap();
    assert_eq!(read.await.unwrap(), Err(CallError::Errno(libc::EINTR)));
}

#[tokio::test]
async fn an_opening_for_reading_carries_a_small_regular_file_whole() {
    let m = Mount::new();
    let long: Vec<u8> = (0..MAX_HEAD * 2).map(|i| (i % 251) as u8).collect();
    std::fs::write(m.root().join("short"), "0123456789").unwrap();
    std::fs::write(m.root().join("long"), &long).unwrap();
    nix::unistd::mkfifo(&m.root().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let head = |path: &str, flags: i32, head: u32| {
        let op = Op::Open {
            path: p(path),
            flags,
            head,
        };
        let c = m.client.clone();
        async move {
            match c.call(op).await {
                Ok(Answer::Opened { fh, head }) => {
                    c.call(Op::Release { fh, attr: false }).await.unwrap();
                    Ok(head.map(|h| h.into_vec()))
                }
                other => Err(format!("{other:?}")),
            }
        }
    };
    // Whole when no longer than asked (and MAX_HEAD); a longer file has none.
    assert_eq!(
        head("short", libc::O_RDONLY, 100).await.unwrap().unwrap(),
        b"0123456789"
    );
    assert_eq!(
        head("short", libc::O_RDWR, 10).await.unwrap().unwrap(),
        b"0123456789"
    );
    assert_eq!(head("short", libc::O_RDONLY, 9).await, Ok(None));
    let got = head("long", libc::O_RDONLY, u32::MAX).await.unwrap();
    assert_eq!(got, None);
    std::fs::write(m.root().join("long"), &long[..MAX_HEAD as usize]).unwrap();
    let got = head("long", libc::O_RDONLY, u32::MAX)
        .await
        .unwrap()
        .unwrap();
    assert!(got == long[..MAX_HEAD as usize]);
    // A file with a second name: none (the daemon knows changes by name).
    std::fs::hard_link(m.root().join("short"), m.root().join("again")).unwrap();
    assert_eq!(head("short", libc::O_RDONLY, 100).await, Ok(None));
    std::fs::remove_file(m.root().join("again")).unwrap();
    assert!(head("short", libc::O_RDONLY, 100).await.unwrap().is_some());
    // Not asked, or opened for writing only: none.
    assert_eq!(head("short", libc::O_RDONLY, 0).await, Ok(None));
    assert_eq!(head("short", libc::O_WRONLY, 100).await, Ok(None));
    // Not a regular file: none, and a FIFO's data stay for its reader.
    let fifo = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.root().join("fifo"))
        .unwrap();
    std::io::Write::write_all(&mut &fifo, b"abc").unwrap();
    // Taken data would fail the read below, not hang it.
    nix::fcntl::fcntl(
        &fifo,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let opened = tokio::time::timeout(BOUND, head("fifo", libc::O_RDONLY, 100));
    assert_eq!(opened.await.unwrap(), Ok(None));
    let mut buf = [0u8; 3];
    std::io::Read::read_exact(&mut &fifo, &mut buf).unwrap();
    assert_eq!(&buf, b"abc");
    // Truncated on opening: empty, and the file is.
    assert_eq!(
        head("short", libc::O_RDWR | libc::O_TRUNC, 100)
            .await
            .unwrap()
            .unwrap(),
        b""
    );
    assert_eq!(std::fs::metadata(m.root().join("short")).unwrap().len(), 0);
    m.close().await.unwrap();
}

#[tokio::test]
async fn handles_and_reads_are_bounded() {
    let m = Mount::new();
    std::fs::write(m.root().join("f"), vec![7u8; MAX_IO as usize * 2]).unwrap();
    let mut open = Vec::new();
    for _ in 0..MAX_HANDLES {
        open.push(m.open("f", libc::O_RDONLY).await);
    }
    let more = Op::Open {
        path: p("f"),
        flags: libc::O_RDONLY,
        head: 0,
    };
    assert_eq!(m.errno(more.clone()).await, libc::EMFILE);
    assert_eq!(m.errno(Op::Opendir { path: p("") }).await, libc::EMFILE);
    let create = Op::Create {
        path: p("g"),
        flags: libc::O_WRONLY,
        mode: 0o644,
    };
    assert_eq!(m.errno(create).await, libc::EMFILE);
    m.ok(Op::Release {
        fh: open[0],
        attr: false,
    })
    .await;
    assert!(matches!(m.ok(more).await, Answer::Opened { .. }));

    let data = m.read(open[1], 0, u32::MAX).await;
    assert_eq!(data.len(), MAX_IO as usize);
    m.close().await.unwrap();
}

/// A raw daemon side, to send what the real client never would.
type RawWire = Wire<
    tokio::io::ReadHalf<tokio::io::DuplexStream>,
    tokio::io::WriteHalf<tokio::io::DuplexStream>,
>;

fn raw() -> (
    RawWire,
    JoinHandle<Result<(), ServeError>>,
    tempfile::TempDir,
) {
    let top = tempfile::tempdir().unwrap();
    let (daemon, laptop) = tokio::io::duplex(1 << 20);
    let root = serve::open_root(top.path()).unwrap();
    let (r, w) = tokio::io::split(laptop);
    let served = tokio::spawn(serve::serve(root, Wire::new(r, w)));
    let (r, w) = tokio::io::split(daemon);
    (Wire::new(r, w), served, top)
}

#[tokio::test]
async fn nonsense_from_the_daemon_ends_serving() {
    use futures_util::SinkExt;
    // Not a message; a message for the handshake; a frame too long; a valid request first.
    let (mut wire, served, top) = raw();
    wire.send(&ToLaptop::Request {
        id: 1,
        op: Op::Mkdir {
            path: p("made"),
            mode: 0o755,
        },
    })
    .await
    .unwrap();
    wire.tx
        .send(bytes::Bytes::from_static(b"\xff\xff\xff"))
        .await
        .unwrap();
    let end = tokio::time::timeout(BOUND, served).await.unwrap().unwrap();
    assert!(
        matches!(
            end,
            Err(ServeError::Wire(
                berth_connect::client::WireError::Malformed(_)
            ))
        ),
        "{end:?}"
    );
    // The request before it was still answered.
    let reply: proto::ToDaemon = wire.recv().await.unwrap().unwrap();
    assert!(matches!(
        reply,
        proto::ToDaemon::Reply {
            id: 1,
            result: Ok(_)
        }
    ));
    assert!(top.path().join("made").is_dir());

    let (mut wire, served, _top) = raw();
    wire.send(&ToLaptop::Welcome { version: 1 }).await.unwrap();
    let end = tokio::time::timeout(BOUND, served).await.unwrap().unwrap();
    assert!(matches!(end, Err(ServeError::Unexpected(_))), "{end:?}");

    let (wire, served, _top) = raw();
    let mut stream = wire.tx.into_inner();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &[0xff, 0xff, 0xff, 0xff, 0])
        .await
        .unwrap();
    let end = tokio::time::timeout(BOUND, served).await.unwrap().unwrap();
    assert!(
        matches!(
            end,
            Err(ServeError::Wire(berth_connect::client::WireError::Io(_)))
        ),
        "{end:?}"
    );
}
