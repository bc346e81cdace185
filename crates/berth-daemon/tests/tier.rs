//! The daemon tier: the gateway, the lifecycle manager and the admin API driven in-process,
//! with the fake runtime and an in-memory store (no Docker, no SSH). Between the unit tests
//! of each module and the end-to-end tests that start the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_daemon::admin::AdminState;
use berth_daemon::audit::Audit;
use berth_daemon::gateway::BerthGateway;
use berth_daemon::lifecycle::{Lifecycle, Settings};
use berth_daemon::sessions::Sessions;
use berth_daemon::store::AsyncStore;
use berth_proto::{AuthorizedKey, ForwardingInfo, ImageName, UserName};
use berth_runtime::FakeRuntime;
use berth_ssh::{Command, Gateway, OpenRequest, Output, PublicKey};
use berth_store::Store;
use futures_util::StreamExt;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl t";

struct Tier {
    gateway: Arc<BerthGateway<FakeRuntime>>,
    runtime: Arc<FakeRuntime>,
    store: Store,
    lifecycle: Arc<Lifecycle<FakeRuntime>>,
    sessions: Arc<Sessions>,
    audit_path: PathBuf,
    dir: tempfile::TempDir,
}

fn tier(images: &[&str]) -> Tier {
    tier_with(images, |_| {})
}

/// A tier whose lifecycle settings `change` adjusts first.
fn tier_with(images: &[&str], change: impl FnOnce(&mut Settings)) -> Tier {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let audit = Arc::new(Audit::to_file(&audit_path, 1 << 20).unwrap());
    let store = Store::open_in_memory().unwrap();
    store
        .add_user(
            &UserName::parse("alice").unwrap(),
            &ImageName::parse("img").unwrap(),
            &[AuthorizedKey::parse_line(KEY).unwrap()],
        )
        .unwrap();
    let runtime = Arc::new(FakeRuntime::with_images(images));
    let mut settings = Settings::for_tests(
        dir.path().join("run"),
        Duration::from_secs(5),
        audit.clone(),
    );
    change(&mut settings);
    let lifecycle = Lifecycle::new(runtime.clone(), store.clone(), settings);
    let sessions = Sessions::new(audit);
    let gateway = Arc::new(BerthGateway {
        store: AsyncStore::new(store.clone()),
        forwarding: ForwardingInfo {
            tcp: true,
            agent: true,
            x11: true,
        },
        runtime: runtime.clone(),
        lifecycle: lifecycle.clone(),
        sessions: sessions.clone(),
        port: 2222,
        refusals: Default::default(),
        certs: Arc::new(berth_daemon::certs::Certs::load(None, None).unwrap()),
        connections: berth_daemon::connections::Connections::new(),
        mounts: Default::default(),
    });
    Tier {
        gateway,
        runtime,
        store,
        lifecycle,
        sessions,
        audit_path,
        dir,
    }
}

fn key() -> PublicKey {
    PublicKey::from_openssh(KEY).unwrap()
}

fn request(command: Command) -> OpenRequest {
    OpenRequest {
        user: "alice".into(),
        key: key(),
        peer: Some("192.0.2.7:50000".parse().unwrap()),
        connected_at: std::time::Instant::now(),
        command,
        pty: None,
        env: Vec::new(),
        x11: None,
    }
}

/// Runs `command` as alice: (stdout, stderr, exit code), or the refusal.
async fn run(t: &Tier, command: &str) -> Result<(String, String, u32), String> {
    let mut p = t
        .gateway
        .open(request(Command::Exec(command.into())))
        .await
        .map_err(|e| e.0)?;
    drop(p.stdin);
    let (mut out, mut err) = (String::new(), String::new());
    while let Some(chunk) = p.output.next().await {
        match chunk.unwrap() {
            Output::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
            Output::Stderr(b) => err.push_str(&String::from_utf8_lossy(&b)),
        }
    }
    let code = p.control.wait().await;
    Ok((out, err, code))
}

fn audit(t: &Tier) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&t.audit_path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn running(t: &Tier) -> Option<bool> {
    t.runtime.container("t-alice").map(|c| c.running)
}

#[tokio::test]
async fn host_words_answer_from_the_daemon_and_are_audited() {
    let t = tier(&["img"]);
    let (out, _, code) = run(&t, "port").await.unwrap();
    assert_eq!((out.as_str(), code), ("2222\n", 0));
    let (out, _, code) = run(&t, "help").await.unwrap();
    assert!(out.contains("freeport") && code == 0, "{out}");
    let (out, _, code) = run(&t, "status").await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("container: t-alice (absent)"), "{out}");
    let (out, _, _) = run(&t, "stop").await.unwrap();
    assert_eq!(out, "your container is not running\n");
    let (out, _, _) = run(&t, "remove").await.unwrap();
    assert_eq!(out, "you have no container\n");
    // A word that fails says why in the user's words, once, with exit 1.
    let (out, err, code) = run(&t, "commit").await.unwrap();
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        (
            "",
            "berth: commit failed: there is no container to commit yet; log in once to create it\n",
            1
        )
    );
    let words: Vec<String> = audit(&t)
        .iter()
        .filter(|r| r["event"] == "host_word")
        .map(|r| r["word"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        words,
        ["port", "help", "status", "stop", "remove", "commit"]
    );
    // Not a word: it runs in the container (here the fake's local process).
    let (out, _, code) = run(&t, "echo stop").await.unwrap();
    assert_eq!((out.as_str(), code), ("stop\n", 0));
    assert!(t.sessions.list().is_empty());
}

#[tokio::test]
async fn failures_reach_the_user_as_one_line_and_the_audit_log_as_a_refusal() {
    // The user's image is missing.
    let t = tier(&[]);
    let e = run(&t, "true").await.unwrap_err();
    assert_eq!(
        e,
        "your container's image is missing on this server; ask the administrator"
    );
    // The engine does not answer: logins and words say so, and nothing is half made.
    let t = tier(&["img"]);
    t.runtime.set_engine_down(true);
    let e = run(&t, "true").await.unwrap_err();
    assert_eq!(
        e,
        "the container engine is not available right now; try again later"
    );
    let (_, err, code) = run(&t, "status").await.unwrap();
    assert_eq!(
        (err.as_str(), code),
        (
            "berth: status failed: the container engine is not available right now; try again later\n",
            1
        )
    );
    t.runtime.set_engine_down(false);
    assert!(t.runtime.container("t-alice").is_none());
    let refused: Vec<_> = audit(&t)
        .into_iter()
        .filter(|r| r["event"] == "session_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["peer"], "192.0.2.7:50000");
    // And with the engine back, the same login works.
    assert_eq!(run(&t, "echo hi").await.unwrap().0, "hi\n");
}

#[tokio::test]
async fn a_removed_key_cannot_open_anything_on_a_connection_it_still_has() {
    let t = tier(&["img"]);
    assert_eq!(run(&t, "echo ok").await.unwrap().0, "ok\n");
    let alice = UserName::parse("alice").unwrap();
    // A second key, so that the first one may be removed.
    let other =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH1zyh5G2y9Wg1jq4tCkn4xXGZbYf1zB6yG0xvJbqk6V o";
    t.store
        .add_keys(&alice, &[AuthorizedKey::parse_line(other).unwrap()])
        .unwrap();
    t.store
        .remove_key(&alice, &berth_proto::fingerprint(&key()))
        .unwrap();
    assert_eq!(run(&t, "echo ok").await.unwrap_err(), "access revoked");
    assert_eq!(run(&t, "status").await.unwrap_err(), "access revoked");
    let tunnel = t.gateway.connect("alice", &key(), "localhost", 22).await;
    assert_eq!(tunnel.err().unwrap().0, "access revoked");
    let socket = t
        .gateway
        .connect_socket("alice", &key(), "/run/x.sock")
        .await;
    assert_eq!(socket.err().unwrap().0, "access revoked");
    let listener = t.gateway.listen("alice", &key(), 0).await;
    assert_eq!(listener.err().unwrap().0, "access revoked");
    assert!(
        audit(&t)
            .iter()
            .any(|r| r["event"] == "session_refused" && r["reason"] == "access revoked")
    );
}

#[tokio::test(start_paused = true)]
async fn the_idle_stop_follows_the_last_session_on_the_paused_clock() {
    let t = tier(&["img"]);
    assert_eq!(run(&t, "echo ok").await.unwrap().0, "ok\n");
    assert_eq!(running(&t), Some(true));
    // idle_stop is 5 s: still running after 4 s, stopped after 6 s (of virtual time).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(running(&t), Some(true));
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..100 {
        if running(&t) == Some(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running(&t), Some(false));
    let stops: Vec<_> = audit(&t)
        .into_iter()
        .filter(|r| r["event"] == "container_stop")
        .collect();
    assert_eq!(stops.len(), 1);
    assert_eq!(stops[0]["reason"], "idle");
}

/// The routes the admin API documents (`berth_proto::api`'s table): (method, path).
fn documented_routes() -> Vec<(String, String)> {
    let text = include_str!("../../berth-proto/src/api.rs");
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l
                .trim_start_matches("//!")
                .split('|')
                .map(str::trim)
                .collect();
            let (method, path) = (cols.get(1)?, cols.get(2)?);
            if !["GET", "POST", "DELETE"].contains(method) {
                return None;
            }
            let path = path
                .split(['[', '?'])
                .next()?
                .replace("{name}", "alice")
                .replace("{fp}", "SHA256:x")
                .replace("{id}", "1");
            Some(((*method).to_owned(), format!("/v1{path}")))
        })
        .collect()
}

/// `curl` on the admin socket as `uid`: the HTTP status and the body.
fn curl_as(uid: u32, socket: &std::path::Path, method: &str, path: &str) -> (String, String) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-X", method])
        .arg("--unix-socket")
        .arg(socket)
        .arg(format!("http://berth{path}"))
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "{}",
        ])
        .uid(uid)
        .gid(uid)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_refuses_a_peer_that_is_not_root() {
    use std::os::unix::fs::PermissionsExt;
    let t = tier(&["img"]);
    let routes = documented_routes();
    assert!(routes.len() >= 14, "{routes:?}");
    let socket = t.dir.path().join("admin.sock");
    let listener = berth_daemon::admin::bind(&socket).unwrap();
    // Opened up for this test only: the daemon's socket is 0600 in a 0700 directory, so
    // the kernel refuses other users before this check even runs.
    std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let state = Arc::new(AdminState {
        store: AsyncStore::new(t.store.clone()),
        forwarding: t.gateway.forwarding,
        runtime: t.runtime.clone(),
        lifecycle: t.lifecycle.clone(),
        sessions: t.sessions.clone(),
        connections: t.gateway.connections.clone(),
        listen: "127.0.0.1:0".into(),
        started: std::time::Instant::now(),
        images: Default::default(),
        firewall: None,
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(berth_daemon::admin::serve(
        listener,
        state,
        shutdown.clone(),
    ));
    let nobody = 65534;
    for (method, path) in &routes {
        let (s, m, p) = (socket.clone(), method.clone(), path.clone());
        let (status, body) = tokio::task::spawn_blocking(move || curl_as(nobody, &s, &m, &p))
            .await
            .unwrap();
        assert_eq!(status, "403", "{method} {path} as uid {nobody}: {body}");
        assert!(body.contains("the admin API is for root"), "{body}");
    }
    // Nothing was changed by the refused requests.
    assert_eq!(t.store.users().unwrap().len(), 1);
    assert_eq!(
        t.store
            .keys(&UserName::parse("alice").unwrap())
            .unwrap()
            .len(),
        1
    );
    // Each route exists: root gets past the check to a handler, whose refusals (a missing
    // key, session or image, a bad body) are JSON, unlike the router's own 404 and 405.
    for (method, path) in &routes {
        let (s, m, p) = (socket.clone(), method.clone(), path.clone());
        let (status, body) = tokio::task::spawn_blocking(move || curl_as(0, &s, &m, &p))
            .await
            .unwrap();
        assert!(
            status != "403" && status != "405" && (status != "404" || body.contains("\"error\"")),
            "{method} {path} as root: {status} {body}"
        );
    }
    shutdown.cancel();
    let _ = server.await;
}

/// `berth user set` through the lifecycle (issue 16): memory and CPUs reach the running
/// container at once, the rest its next one; GPUs on an engine without the NVIDIA runtime
/// refuse the login in one line and make nothing; with it, the request is in the create.
#[tokio::test]
async fn user_settings_apply_live_or_at_the_next_container_and_gpus_need_the_runtime() {
    use berth_daemon::user_settings::Change;
    use berth_proto::settings::{Gpus, Override};
    use berth_runtime::{GpuRequest, Runtime};
    let alice = UserName::parse("alice").unwrap();
    let t = tier(&["img"]);
    assert_eq!(run(&t, "echo ok").await.unwrap().0, "ok\n");
    let applied = t.runtime.applied("t-alice").await.unwrap().unwrap();
    assert_eq!((applied.memory_bytes, applied.pids), (None, Some(100)));
    t.lifecycle
        .set_settings(
            &alice,
            Change {
                memory: Some(Override::Set(1 << 30)),
                cpus: Some(Override::Set(2_000_000_000)),
                pids: Some(Override::Set(300)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let applied = t.runtime.applied("t-alice").await.unwrap().unwrap();
    assert_eq!(applied.memory_bytes, Some(1 << 30));
    assert_eq!(applied.nano_cpus, Some(2_000_000_000));
    assert_eq!(applied.pids, Some(100), "pids wait for the next container");
    assert_eq!(FakeRuntime::count(&t.runtime.updates), 1);
    // A change that is refused changes nothing, nor reaches the engine.
    let e = t
        .lifecycle
        .set_settings(
            &alice,
            Change {
                memory: Some(Override::Set(2 << 30)),
                unmount: vec!["/nope".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "alice has no shared folder of her own at /nope"
    );
    assert_eq!(FakeRuntime::count(&t.runtime.updates), 1);
    assert_eq!(
        t.store.settings(&alice).unwrap().memory_bytes,
        Some(1 << 30)
    );
    // GPUs on an engine without the runtime: one line, no container made.
    t.lifecycle
        .set_settings(
            &alice,
            Change {
                gpus: Some(Override::Set(Gpus::Devices(vec!["0".into(), "2".into()]))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(t.lifecycle.remove_container(&alice).await.unwrap());
    let creates = FakeRuntime::count(&t.runtime.creates);
    assert_eq!(
        run(&t, "true").await.unwrap_err(),
        "your account is set to use GPUs, but this server has no NVIDIA container runtime; ask the administrator"
    );
    assert!(t.runtime.container("t-alice").is_none());
    assert_eq!(FakeRuntime::count(&t.runtime.creates), creates);
    let records: Vec<_> = audit(&t)
        .into_iter()
        .filter(|r| r["event"] == "user_settings")
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1]["gpus"], "0,2");
    assert_eq!(records[1]["pids"], 300);

    // With the runtime, her next container carries the request and all her values.
    let t = tier_with(&["img"], |s| {
        s.gpu_support = berth_runtime::GpuSupport::Available;
    });
    t.store
        .set_settings(
            &alice,
            &berth_store::UserSettings {
                memory_bytes: Some(1 << 30),
                pids: Some(300),
                gpus: Some("all".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(run(&t, "echo ok").await.unwrap().0, "ok\n");
    let applied = t.runtime.applied("t-alice").await.unwrap().unwrap();
    assert_eq!(applied.gpus, Some(GpuRequest::All));
    assert_eq!(
        (applied.memory_bytes, applied.pids),
        (Some(1 << 30), Some(300))
    );
}
