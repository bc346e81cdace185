//! End-to-end: the door on the internet. What the daemon offers before anyone has logged in,
//! as `ssh-audit` (from PyPI) and the stock `ssh` client see it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;

use berth_testkit::{BUSYBOX, Daemon, DaemonOptions};

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn start(config: &str) -> Daemon {
    Daemon::start(
        Path::new(BIN),
        DaemonOptions {
            config: config.to_owned(),
            ..DaemonOptions::default()
        },
    )
}

/// `ssh-audit` reports no [fail] and no [warn] but the post-quantum note on the two
/// curve25519 exchanges (kept for OpenSSH before 9.9, which has no ML-KEM).
#[test]
fn ssh_audit_finds_nothing_but_the_post_quantum_note() {
    let d = start("");
    let o = Command::new("python3")
        .args([
            "-m",
            "ssh_audit",
            "-n",
            "-p",
            &d.port.to_string(),
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("(kex) mlkem768x25519-sha256") && text.contains("(key) ssh-ed25519"),
        "ssh-audit did not audit the daemon ({}): {text}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("[fail]"), "{text}");
    // Each [warn] line belongs to an algorithm line: find which.
    let mut algorithm = "";
    let mut warned = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix('(') {
            algorithm = rest.split_whitespace().nth(1).unwrap_or("");
        }
        if line.contains("[warn]") {
            assert!(
                line.contains("post-quantum"),
                "a warning other than the post-quantum note: {line}\n{text}"
            );
            warned.push(algorithm.to_owned());
        }
    }
    assert_eq!(
        warned,
        ["curve25519-sha256", "curve25519-sha256@libssh.org"],
        "{text}"
    );
    for gone in [
        "diffie-hellman",
        "hmac-sha2-256 ",
        "hmac-sha1",
        "-cbc",
        "ecdh-sha2",
    ] {
        assert!(!text.contains(gone), "{gone} is offered: {text}");
    }
}

/// A client that offers only a finite-field group gets its own clean "no matching key
/// exchange" (not a hang); an admin can allow an old client's group in `berth.toml`.
#[test]
fn a_client_with_only_a_dh_group_is_told_no_match_and_an_admin_can_allow_it() {
    let d = start("");
    let key = d.add_user("alice", BUSYBOX);
    // The client says why at its INFO level (the harness's options say ERROR).
    let args: Vec<String> = d
        .ssh_args(&key)
        .into_iter()
        .map(|a| {
            if a == "LogLevel=ERROR" {
                "LogLevel=INFO".into()
            } else {
                a
            }
        })
        .collect();
    let o = Command::new("ssh")
        .args(&args)
        .args([
            "-o",
            "KexAlgorithms=diffie-hellman-group18-sha512",
            "alice@127.0.0.1",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no matching key exchange method found"),
        "{err}"
    );
    drop(d);

    let d = start("kex_algorithms = [\"curve25519-sha256\", \"diffie-hellman-group14-sha256\"]\n");
    let key = d.add_user("alice", BUSYBOX);
    let o = d
        .ssh("alice", &key)
        .args([
            "-o",
            "KexAlgorithms=diffie-hellman-group14-sha256",
            "echo old",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "old\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `--check` refuses an algorithm russh does not implement, naming it and the choices.
#[test]
fn check_refuses_an_unknown_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        "ciphers = [\"aes256-gcm@openssh.com\", \"arcfour\"]\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["daemon", "--check", "--guest-binary"])
        .arg(berth_testkit::guest_binary())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ciphers: \"arcfour\" is not an algorithm Berth implements; choose from: chacha20-poly1305@openssh.com"),
        "{err}"
    );
}
