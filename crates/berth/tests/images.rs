//! End-to-end: images without a registry — `berth image import`, `list`, `rm`, and
//! `berth image bootstrap` (debootstrap; it downloads packages, so it runs only when
//! `BERTH_TEST_BOOTSTRAP=1`, which the test command `scripts/test` sets).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use berth_testkit::{Daemon, DaemonOptions, docker, docker_output};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// Removes an image when the test ends, however it ends: first the containers made from
/// it (the daemon, dropped after the guard, would remove them too late: the image would be
/// left untagged on the engine, 200 MB for a Debian one).
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let users = docker_output(&["ps", "-aq", "--filter", &format!("ancestor={}", self.0)]);
        for id in String::from_utf8_lossy(&users.stdout).split_whitespace() {
            let _ = docker_output(&["rm", "-f", id]);
        }
        let _ = docker_output(&["rmi", "-f", &self.0]);
    }
}

/// A busybox root file system as a tar file, like `scripts/make-test-images` makes.
fn busybox_tar(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "root", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for app in ["sh", "cat", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(app)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/marker"), "imported-by-berth\n").unwrap();
    let tar = dir.join("rootfs.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    tar
}

fn images(d: &Daemon) -> Vec<serde_json::Value> {
    serde_json::from_str(&d.berth_ok(&["image", "list", "--json"])).unwrap()
}

#[test]
fn import_list_and_rm_refusing_while_a_user_needs_it() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let name = format!("{}img/rootfs:v1", d.prefix);
    let _guard = ImageGuard(name.clone());
    let tar = busybox_tar(d.dir.path());

    let out = d.berth_ok(&["image", "import", tar.to_str().unwrap(), &name]);
    assert!(out.starts_with(&format!("imported {name} (")), "{out}");
    let list = images(&d);
    let mine = list.iter().find(|i| i["name"] == name.as_str()).unwrap();
    assert!(mine["size_bytes"].as_u64().unwrap() > 500_000, "{mine}");
    assert_eq!(mine["users"], serde_json::json!([]));

    // A user on it logs in to a container made from the imported tree.
    let key = d.add_user("alice", &name);
    assert_eq!(
        d.ssh_ok("alice", &key, "cat /etc/marker"),
        "imported-by-berth\n"
    );
    let list = images(&d);
    let mine = list.iter().find(|i| i["name"] == name.as_str()).unwrap();
    assert_eq!(mine["users"], serde_json::json!(["alice"]));
    let table = d.berth_ok(&["image", "list"]);
    let row = table.lines().find(|l| l.contains(&name)).unwrap();
    assert!(row.contains("alice") && row.contains("MB"), "{table}");

    // Refusals: in use, already there, not a tarball, a bad name, unknown image.
    let o = d.berth(&["image", "rm", &name]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!("error: image {name} is used by alice; remove or move those users first\n")
    );
    let o = d.berth(&["image", "import", tar.to_str().unwrap(), &name]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .starts_with(&format!("error: image {name} already exists")),
        "{o:?}"
    );
    let junk = d.dir.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tar archive").unwrap();
    let junk_name = format!("{}img/junk:v1", d.prefix);
    let _junk_guard = ImageGuard(junk_name.clone());
    let o = d.berth(&["image", "import", junk.to_str().unwrap(), &junk_name]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .starts_with(&format!("error: cannot import {junk_name}:")),
        "{o:?}"
    );
    assert!(
        !docker_output(&["image", "inspect", &junk_name])
            .status
            .success()
    );
    let o = d.berth(&["image", "import", tar.to_str().unwrap(), "Bad Name"]);
    assert_eq!(o.status.code(), Some(1));
    let o = d.berth(&["image", "rm", "nosuch/image:v9"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: no image nosuch/image:v9\n"
    );
    let o = d.berth(&["image", "import", "/nonexistent.tar", &junk_name]);
    assert_eq!(o.status.code(), Some(1));

    // A second tag of the same image is not hers: removing it only untags.
    let alias = format!("{}img/alias:v1", d.prefix);
    let _alias_guard = ImageGuard(alias.clone());
    docker(&["tag", &name, &alias]);
    let list = images(&d);
    let a = list.iter().find(|i| i["name"] == alias.as_str()).unwrap();
    assert_eq!(a["users"], serde_json::json!([]));
    let mine = list.iter().find(|i| i["name"] == name.as_str()).unwrap();
    assert_eq!(mine["users"], serde_json::json!(["alice"]));
    assert_eq!(a["id"], mine["id"]);
    d.berth_ok(&["image", "rm", &alias]);
    assert_eq!(d.ssh_ok("alice", &key, "echo still"), "still\n");

    // Once nobody needs it, it goes.
    d.berth_ok(&["user", "rm", "alice"]);
    assert_eq!(
        d.berth_ok(&["image", "rm", &name])
            .split(" (")
            .next()
            .unwrap(),
        format!("removed image {name}")
    );
    assert!(!docker_output(&["image", "inspect", &name]).status.success());
    let audit = std::fs::read_to_string(d.state_dir().join("audit.log")).unwrap();
    assert!(
        audit.contains("\"event\":\"image_import\"")
            && audit.contains("\"event\":\"image_remove\"")
    );
}

#[test]
fn bootstrap_refuses_clearly_when_debootstrap_or_the_mirror_is_missing() {
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let name = format!("{}img/boot:fail", d.prefix);
    let _guard = ImageGuard(name.clone());
    // No debootstrap on PATH.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .arg("--state-dir")
        .arg(d.state_dir())
        .args(["image", "bootstrap", &name])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: debootstrap is not installed\nhint: install it with `apt-get install debootstrap`\n"
    );
    // A mirror nobody serves (a closed loopback port): debootstrap's own error, quickly.
    let port = berth_testkit::free_port();
    let o = d.berth(&[
        "image",
        "bootstrap",
        &name,
        "--mirror",
        &format!("http://127.0.0.1:{port}/debian"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: debootstrap failed: Failed getting release file http://127.0.0.1:"),
        "{err}"
    );
    assert!(!docker_output(&["image", "inspect", &name]).status.success());
    // Bad input is refused before any work.
    let o = d.berth(&["image", "bootstrap", &name, "--include", "vim;rm -rf /"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "error: bad package name \"vim;rm -rf /\"\n"
    );
}

#[test]
fn bootstrap_makes_a_debian_image_users_log_in_to() {
    if std::env::var("BERTH_TEST_BOOTSTRAP").as_deref() != Ok("1") {
        eprintln!("skipped: set BERTH_TEST_BOOTSTRAP=1 (scripts/test does) to run debootstrap");
        return;
    }
    let d = Daemon::start(Path::new(BIN), DaemonOptions::default());
    let name = format!("{}img/debian:bookworm", d.prefix);
    let _guard = ImageGuard(name.clone());
    let out = d.berth_ok(&["image", "bootstrap", &name, "--include", "less"]);
    assert!(out.starts_with(&format!("imported {name} (")), "{out}");
    let key = d.add_user("alice", &name);
    assert_eq!(
        d.ssh_ok(
            "alice",
            &key,
            "cut -d. -f1 /etc/debian_version; command -v less"
        ),
        "12\n/usr/bin/less\n"
    );
    assert!(
        docker(&["image", "inspect", "-f", "{{.Size}}", &name])
            .trim()
            .parse::<u64>()
            .unwrap()
            > 50_000_000
    );
}
