#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! End-to-end: a home that survives (issue 16, second slice) — each user's home is a Docker
//! volume of her own that outlives `remove`, a daemon restart and a new image, is left out
//! of `commit`, is kept by `user rm` unless `--purge-data`, and is not made with
//! `home_volume = false`; `user set --image` and `--drop-commit`; disk use in `user list`,
//! `status` and the metrics.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_testkit::{BUSYBOX, DEBIAN, Daemon, DaemonOptions, docker, docker_output, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn daemon(config: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            idle_stop_seconds: 60,
            config: config.to_owned(),
        },
    )
}

fn show(d: &Daemon, user: &str) -> serde_json::Value {
    serde_json::from_str(&d.berth_ok(&["user", "show", user, "--json"])).unwrap()
}

fn volume(d: &Daemon, user: &str) -> String {
    format!("{}home-{user}", d.prefix)
}

fn volume_exists(name: &str) -> bool {
    docker_output(&["volume", "inspect", name]).status.success()
}

fn image_exists(name: &str) -> bool {
    docker_output(&["image", "inspect", name]).status.success()
}

/// `berth ARGS...`: (success, stderr).
fn berth(d: &Daemon, args: &[&str]) -> (bool, String) {
    let o = d.berth(args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn the_home_survives_remove_a_restart_and_a_new_image_and_commit_leaves_it_out() {
    let mut d = daemon("");
    let key = d.add_user("alice", BUSYBOX);
    d.ssh_ok(
        "alice",
        &key,
        "echo kept > /root/notes && echo layer > /layer.txt",
    );
    let home = volume(&d, "alice");
    let labels = docker(&["volume", "inspect", "-f", "{{json .Labels}}", &home]);
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["berth.user"], "alice", "{labels}");
    let v = show(&d, "alice");
    assert_eq!(v["home"]["volume"], home.as_str(), "{v}");
    assert_eq!(v["home"]["target"], "/root", "{v}");
    let text = d.berth_ok(&["user", "show", "alice"]);
    assert!(
        text.contains(&format!("home:       volume {home} at /root, "))
            && text.contains("not in commits"),
        "{text}"
    );

    // `commit` saves the container without her home.
    d.ssh_ok("alice", &key, "commit");
    let saved = d.commit_image("alice");
    let out = docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        &saved,
        "-c",
        "cat /layer.txt; test -e /root/notes && echo home-in-image || echo no-home",
    ]);
    assert_eq!(out.trim(), "layer\nno-home");

    // `remove`, then a new container (from her commit): her home is there.
    d.ssh_ok("alice", &key, "remove");
    assert_eq!(d.container_state("alice"), None);
    assert_eq!(d.ssh_ok("alice", &key, "cat /root/notes"), "kept\n");
    // A daemon restart.
    d.restart();
    assert_eq!(d.ssh_ok("alice", &key, "cat /root/notes"), "kept\n");

    // Another image that is not there, or is a user's own saved image: refused, nothing
    // changed.
    let (ok, err) = berth(
        &d,
        &["user", "set", "alice", "--image", "berth-test/missing:1"],
    );
    assert!(!ok);
    assert!(
        err.starts_with("error: image berth-test/missing:1 is not present on this host\n"),
        "{err}"
    );
    let (ok, err) = berth(&d, &["user", "set", "alice", "--image", &saved]);
    assert!(!ok);
    assert!(err.contains("is a user's own saved image"), "{err}");
    // Given to another user by its ID, full or short, or by a tag of another name: refused
    // too, for an existing user and a new one.
    d.add_user("bob", BUSYBOX);
    let id = docker(&["image", "inspect", "-f", "{{.Id}}", &saved]);
    let id = id.trim();
    docker(&["tag", &saved, "berth-test/copy:1"]);
    for other in [id, &id["sha256:".len()..][..12], "berth-test/copy:1"] {
        let (ok, err) = berth(&d, &["user", "set", "bob", "--image", other]);
        assert!(!ok, "{other} was taken");
        assert!(
            err.contains("is a user's own saved image"),
            "{other}: {err}"
        );
    }
    let carol_key = d.keygen("carol");
    let carol_pub = format!("{}.pub", carol_key.display());
    let (ok, err) = berth(
        &d,
        &["user", "add", "carol", "--image", id, "--key", &carol_pub],
    );
    assert!(!ok && err.contains("is a user's own saved image"), "{err}");
    assert!(!d.users().iter().any(|u| u["name"] == "carol"));
    docker(&["rmi", "berth-test/copy:1"]);
    assert_eq!(show(&d, "bob")["image"], BUSYBOX);
    let v = show(&d, "alice");
    assert_eq!(v["image"], BUSYBOX);
    assert_eq!(v["committed_image"], saved.as_str());

    // A new base image: her commit is kept (and named) until --drop-commit.
    let (ok, err) = berth(&d, &["user", "set", "alice", "--image", DEBIAN]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("alice: image {DEBIAN} for her next new container"))
            && err.contains(&format!("her committed image {saved} is kept")),
        "{err}"
    );
    let v = show(&d, "alice");
    assert_eq!(
        (v["image"].as_str(), v["committed_image"].as_str()),
        (Some(DEBIAN), Some(saved.as_str()))
    );
    d.ssh_ok("alice", &key, "remove");
    let (ok, err) = berth(&d, &["user", "set", "alice", "--drop-commit"]);
    assert!(ok, "{err}");
    assert!(err.contains("committed image forgotten"), "{err}");
    assert!(!image_exists(&saved), "the dropped commit is still there");
    assert!(show(&d, "alice")["committed_image"].is_null());
    // Her next container is Debian's, with her home.
    assert_eq!(
        d.ssh_ok(
            "alice",
            &key,
            "cat /root/notes; test -e /etc/debian_version && echo debian"
        ),
        "kept\ndebian\n"
    );
    assert!(
        !d.ssh_ok(
            "alice",
            &key,
            "test -e /layer.txt && echo old-layer || true"
        )
        .contains("old-layer")
    );
}

#[test]
fn user_rm_keeps_the_home_unless_purge_data_and_says_which() {
    let d = daemon("");
    let key = d.add_user("bob", BUSYBOX);
    d.ssh_ok("bob", &key, "echo mine > /root/thesis");
    let home = volume(&d, "bob");
    let (ok, err) = berth(&d, &["user", "rm", "bob"]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("kept their home volume {home}")),
        "{err}"
    );
    assert!(volume_exists(&home));
    // Added again under the same name: her files are back.
    let key = d.keygen("bob-again");
    let pubkey = key.with_extension("pub");
    d.berth_ok(&[
        "user",
        "add",
        "bob",
        "--image",
        BUSYBOX,
        "--key",
        pubkey.to_str().unwrap(),
    ]);
    assert_eq!(d.ssh_ok("bob", &key, "cat /root/thesis"), "mine\n");
    let (ok, err) = berth(&d, &["user", "rm", "bob", "--purge-data"]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("removed their home volume {home}")),
        "{err}"
    );
    assert!(!volume_exists(&home));
    let rm: Vec<_> = d
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "home_remove")
        .collect();
    assert_eq!(rm.len(), 1, "{rm:?}");
}

#[test]
fn with_home_volume_false_the_home_is_the_containers() {
    let d = daemon("home_volume = false\n");
    let key = d.add_user("carol", BUSYBOX);
    d.ssh_ok("carol", &key, "echo x > /root/f");
    assert!(!volume_exists(&volume(&d, "carol")));
    let types = docker(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{.Type}} {{end}}",
        &d.container_name("carol"),
    ]);
    assert!(!types.contains("volume"), "{types}");
    assert!(show(&d, "carol")["home"].is_null());
    let text = d.berth_ok(&["user", "show", "carol"]);
    assert!(text.contains("home:       in the container"), "{text}");
    // As before issue 16: the file goes with the container.
    d.ssh_ok("carol", &key, "remove");
    assert_eq!(
        d.ssh_ok("carol", &key, "cat /root/f 2>/dev/null || echo gone"),
        "gone\n"
    );
}

#[test]
fn disk_use_is_in_user_list_status_and_the_metrics_and_adds_up() {
    let metrics = berth_testkit::free_port();
    let d = daemon(&format!("metrics_listen = \"127.0.0.1:{metrics}\"\n"));
    let alice = d.add_user("alice", BUSYBOX);
    let bob = d.add_user("bob", BUSYBOX);
    d.ssh_ok(
        "alice",
        &alice,
        "dd if=/dev/zero of=/root/big bs=1M count=20 2>/dev/null && \
         dd if=/dev/zero of=/tmp/layer bs=1M count=5 2>/dev/null",
    );
    d.ssh_ok("bob", &bob, "true");
    let mib = 1024 * 1024;
    let disk = |u: &str| d.user(u)["disk"].clone();
    assert!(
        wait_until(Duration::from_secs(90), || {
            let a = disk("alice");
            a["home"].as_u64().is_some_and(|b| b >= 20 * mib)
                && a["container"].as_u64().is_some_and(|b| b >= 5 * mib)
        }),
        "alice's home and layer never showed: {}",
        disk("alice")
    );
    let a = d.user("alice");
    assert!(a["disk"]["home"].as_u64().unwrap() < 21 * mib, "{a}");
    assert_eq!(
        a["disk_bytes"].as_u64().unwrap(),
        a["disk"]["container"].as_u64().unwrap()
            + a["disk"]["home"].as_u64().unwrap()
            + a["disk"]["image"].as_u64().unwrap()
    );
    let list = d.berth_ok(&["user", "list"]);
    assert!(list.contains("DISK") && list.contains("MiB"), "{list}");
    // The total in `status` and the metric is every user's together (the same
    // measurement: asked again when one was taken in between).
    let scrape = || {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{metrics}/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metric = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("berth_disk_bytes "))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let mut seen = String::new();
    let consistent = wait_until(Duration::from_secs(60), || {
        let users: u64 = d
            .users()
            .iter()
            .map(|u| u["disk_bytes"].as_u64().unwrap_or(0))
            .sum();
        let st: serde_json::Value =
            serde_json::from_str(&d.berth_ok(&["status", "--json"])).unwrap();
        let text = scrape();
        let m = metric(&text);
        seen = format!("users {users}, status {}, metric {m:?}", st["disk_bytes"]);
        #[allow(clippy::cast_precision_loss)]
        let same = st["disk_bytes"].as_u64() == Some(users) && m == Some(users as f64);
        users >= 25 * mib && same
    });
    assert!(consistent, "{seen}");
    let status = d.berth_ok(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("disk use:   ") && l.contains("MiB")),
        "{status}"
    );
}

#[test]
fn a_user_moves_to_another_host_with_her_image_home_and_settings() {
    let a = daemon("");
    let key = a.add_user("alice", BUSYBOX);
    a.ssh_ok(
        "alice",
        &key,
        "echo notes > /root/notes && echo installed > /pkg",
    );
    a.ssh_ok("alice", &key, "commit");
    a.berth_ok(&["user", "set", "alice", "--memory", "256M", "--pids", "300"]);
    let file = a.dir.path().join("alice.tar");
    let f = file.to_str().unwrap();
    let (ok, err) = berth(&a, &["user", "export", "alice", f]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("exported alice to {f} ("))
            && err.contains("settings and keys ")
            && err.contains("committed image ")
            && err.contains("home "),
        "{err}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the archive is {mode:o}");
    }
    // Never over an existing file.
    let (ok, err) = berth(&a, &["user", "export", "alice", f]);
    assert!(!ok);
    assert!(err.contains("it exists already"), "{err}");

    // A second host (its own state, prefix and repository) on the same engine.
    let b = daemon("");
    // A hostile archive: refused, nothing made.
    let bad = b.dir.path().join("bad.tar");
    {
        let mut t = tar::Builder::new(std::fs::File::create(&bad).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, "etc/passwd", &b"x\n"[..]).unwrap();
        t.into_inner().unwrap();
    }
    let (ok, err) = berth(&b, &["user", "import", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.starts_with("error: not a berth user archive: unexpected entry \"etc/passwd\""),
        "{err}"
    );
    assert!(b.users().is_empty());
    assert!(!volume_exists(&volume(&b, "alice")));

    let (ok, err) = berth(&b, &["user", "import", f]);
    assert!(ok, "{err}");
    assert!(
        err.contains("imported user alice from ")
            && err.contains(&format!("committed image {}", b.commit_image("alice")))
            && err.contains(&format!("home volume {}", volume(&b, "alice"))),
        "{err}"
    );
    // She logs in with her key and finds her files, her packages and her limits.
    assert_eq!(
        b.ssh_ok("alice", &key, "cat /root/notes /pkg"),
        "notes\ninstalled\n"
    );
    let v = show(&b, "alice");
    assert_eq!(v["limits"]["memory"]["value"], 256 << 20, "{v}");
    assert_eq!(v["limits"]["pids"]["value"], 300, "{v}");
    assert_eq!(v["committed_image"], b.commit_image("alice").as_str());
    // Once is enough.
    let (ok, err) = berth(&b, &["user", "import", f]);
    assert!(!ok);
    assert!(err.contains("user alice already exists"), "{err}");
    // The first host is untouched: her commit there is still hers.
    assert!(image_exists(&a.commit_image("alice")));

    // A hostile archive whose saved image is tagged as an image of this host: loading it
    // must not move that tag.
    let victim = format!("{}victim:latest", b.prefix);
    docker(&["tag", BUSYBOX, &victim]);
    let victim_id = image_id(&victim);
    let entries = read_tar(&std::fs::read(&file).unwrap());
    let hostile = |committed: &str, name: &str| {
        let mut out = Vec::new();
        for (n, data) in &entries {
            let data = match n.as_str() {
                "berth-user.json" => {
                    let mut m: serde_json::Value = serde_json::from_slice(data).unwrap();
                    m["name"] = name.into();
                    m["committed_image"] = committed.into();
                    m["home"] = false.into();
                    m["mounts"] = serde_json::json!([["/etc", "/hostetc", false]]);
                    m["gpus"] = "all".into();
                    m["pids"] = 4_000_000.into();
                    serde_json::to_vec(&m).unwrap()
                }
                "image.tar" => {
                    let inner = read_tar(data)
                        .into_iter()
                        .map(|(n, d)| match n.as_str() {
                            "manifest.json" => {
                                let mut m: serde_json::Value = serde_json::from_slice(&d).unwrap();
                                m[0]["RepoTags"] = serde_json::json!([victim]);
                                (n, serde_json::to_vec(&m).unwrap())
                            }
                            _ => (n, d),
                        })
                        .collect::<Vec<_>>();
                    write_tar(&inner)
                }
                _ => continue,
            };
            out.push((n.clone(), data));
        }
        let path = b.dir.path().join(format!("{name}.tar"));
        std::fs::write(&path, write_tar(&out)).unwrap();
        path
    };
    // Named as the victim: refused.
    let h = hostile(&victim, "carol");
    let (ok, err) = berth(&b, &["user", "import", h.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("is not carol's own commit"), "{err}");
    assert_eq!(image_id(&victim), victim_id);
    // Named as hers but tagged as the victim inside: imported, tagged as hers only.
    let h = hostile("other/users:dave", "dave");
    let (ok, err) = berth(&b, &["user", "import", h.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(image_id(&victim), victim_id, "the import moved {victim}");
    // The archive chose a host path, GPUs and more processes than this server gives.
    assert!(
        err.contains("not carried over: mounts /etc:/hostetc (set them again with berth user set)")
            && err.contains("not carried over: gpus all")
            && err.contains("not carried over: pids 4000000"),
        "{err}"
    );
    let v = show(&b, "dave");
    assert!(!v.to_string().contains("/hostetc"), "{v}");
    assert_ne!(v["limits"]["pids"]["value"], 4_000_000, "{v}");
    assert_eq!(
        image_id(&b.commit_image("dave")),
        image_id(&a.commit_image("alice"))
    );
    docker_output(&["rmi", &victim]);

    // Her home kept after she is removed is not for an archive to take over, even one
    // without a home.
    b.berth_ok(&["user", "rm", "alice"]);
    let vol = volume(&b, "alice");
    assert!(volume_exists(&vol));
    let (ok, err) = berth(&b, &["user", "import", f]);
    assert!(!ok);
    assert!(
        err.starts_with(&format!(
            "error: volume {vol} exists already, kept from an earlier user alice"
        )) && err.contains(&format!("docker volume rm {vol}"))
            && err.contains("berth user add")
            && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert!(b.users().iter().all(|u| u["name"] != "alice"));
    assert!(volume_exists(&vol));
    let pubkey = key.with_extension("pub");
    let (ok, err) = berth(
        &b,
        &[
            "user",
            "add",
            "alice",
            "--image",
            BUSYBOX,
            "--key",
            pubkey.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!(
            "reusing the home volume {vol} kept from an earlier user alice"
        )),
        "{err}"
    );
}

fn image_id(image: &str) -> String {
    docker(&["image", "inspect", "--format", "{{.Id}}", image])
        .trim()
        .to_owned()
}

fn read_tar(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut a = tar::Archive::new(data);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if !e.header().entry_type().is_file() {
            continue;
        }
        let n = e.path().unwrap().to_string_lossy().into_owned();
        let mut d = Vec::new();
        e.read_to_end(&mut d).unwrap();
        out.push((n, d));
    }
    out
}

fn write_tar(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (n, d) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, n, d.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn purge_data_removes_only_a_volume_labelled_this_instances_home_of_hers() {
    let d = daemon("");
    // A volume of her name, hers by its user label, but not this instance's home.
    let vol = volume(&d, "eve");
    docker(&["volume", "create", "--label", "berth.user=eve", &vol]);
    d.add_user("eve", BUSYBOX);
    let (ok, err) = berth(&d, &["user", "rm", "eve", "--purge-data"]);
    assert!(ok, "{err}");
    let kept = volume_exists(&vol);
    docker_output(&["volume", "rm", &vol]);
    assert!(
        kept,
        "--purge-data removed a volume that is not this instance's home"
    );
}

#[test]
fn a_helper_container_left_by_a_killed_daemon_is_removed_at_start() {
    // Named as a helper of a daemon whose PID cannot exist (over any pid_max).
    let name = format!("berth-volume-helper-99999999-{}", std::process::id());
    docker(&[
        "create",
        "--label",
        "berth.probe=1",
        "--name",
        &name,
        "--network",
        "none",
        BUSYBOX,
        "true",
    ]);
    let d = daemon("");
    let gone = !docker_output(&["container", "inspect", &name])
        .status
        .success();
    docker_output(&["rm", "-f", &name]);
    assert!(gone, "{name} is still there after a daemon start");
    drop(d);
}
