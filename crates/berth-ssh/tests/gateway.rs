//! The gateway in-process on 127.0.0.1:0, driven by russh's client, with a fake [`Gateway`]
//! that runs local processes. Fast checks of the protocol side: auth, exit status after all
//! output, stdout/stderr apart, EOF, and that a vanished client ends its process.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_ssh::{
    Command, DoorConfig, Gateway, OpenError, OpenRequest, Output, Process, ProcessControl,
    PublicKey, SshConfig, WindowSize, serve,
};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, stream};
use russh::ChannelMsg;
use russh::keys::{Algorithm, PrivateKey, PrivateKeyWithHashAlg};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

struct Fake {
    alice: PublicKey,
    opened: AtomicUsize,
    /// The environment of the last process opened.
    env: std::sync::Mutex<Vec<(String, String)>>,
    /// Whether the last process opened had a terminal, and X11.
    pty_x11: std::sync::Mutex<(bool, bool)>,
    abandoned: Arc<AtomicUsize>,
    /// Cancelled: every connection's access is revoked.
    revoke: CancellationToken,
    /// Remote socket forwards whose listener is still held.
    socket_listeners: Arc<AtomicUsize>,
}

/// Counts a listener held until it is dropped.
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct FakeControl {
    child: tokio::process::Child,
    waited: bool,
    abandoned: Arc<AtomicUsize>,
}

impl ProcessControl for FakeControl {
    fn resize(&self, _size: WindowSize) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn wait(&mut self) -> BoxFuture<'_, u32> {
        Box::pin(async move {
            self.waited = true;
            let st = self.child.wait().await.unwrap();
            u32::try_from(st.code().unwrap_or(255)).unwrap()
        })
    }
}

impl Drop for FakeControl {
    fn drop(&mut self) {
        if !self.waited {
            self.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Gateway for Fake {
    async fn authorize(&self, user: &str, key: &PublicKey) -> bool {
        user == "alice" && key.key_data() == self.alice.key_data()
    }

    fn connected(&self, _user: &str, _key: &PublicKey) -> berth_ssh::Connected {
        berth_ssh::Connected {
            hold: Box::new(()),
            revoked: self.revoke.clone(),
        }
    }

    async fn permits(&self, _user: &str, _what: berth_ssh::Permission) -> bool {
        true
    }

    async fn listen(
        &self,
        _user: &str,
        _key: &PublicKey,
        port: u16,
    ) -> Result<berth_ssh::RemoteListener, OpenError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| OpenError(e.to_string()))?;
        Ok(berth_ssh::RemoteListener {
            listener,
            hold: Box::new(()),
        })
    }

    async fn listen_socket(
        &self,
        _user: &str,
        _key: &PublicKey,
        path: &str,
    ) -> Result<berth_ssh::SocketListener, OpenError> {
        let l = tokio::net::UnixListener::bind(path).map_err(|e| OpenError(e.to_string()))?;
        self.socket_listeners.fetch_add(1, Ordering::SeqCst);
        Ok(berth_ssh::SocketListener {
            listener: berth_ssh::GuardedUnixListener::new(l),
            hold: Box::new(Held(self.socket_listeners.clone())),
        })
    }

    async fn agent_listener(&self, _user: &str) -> Result<berth_ssh::AgentListener, OpenError> {
        Err(OpenError("no agent here".into()))
    }

    async fn connect(
        &self,
        _user: &str,
        _key: &PublicKey,
        host: &str,
        port: u16,
    ) -> Result<berth_ssh::Tunnel, OpenError> {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| OpenError(e.to_string()))?;
        Ok(berth_ssh::Tunnel {
            stream,
            hold: Box::new(()),
        })
    }

    async fn open(&self, req: OpenRequest) -> Result<Process, OpenError> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        *self.env.lock().unwrap() = req.env.clone();
        *self.pty_x11.lock().unwrap() = (req.pty.is_some(), req.x11.is_some());
        let Command::Exec(cmd) = req.command else {
            return Err(OpenError("no shells here".into()));
        };
        if let Some(rest) = cmd.strip_prefix("slow-open ") {
            // Like a container being created: input sent meanwhile must not be lost.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return self.spawn(rest);
        }
        if cmd == "refuse" {
            return Err(OpenError("your container could not be started".into()));
        }
        self.spawn(&cmd)
    }
}

impl Fake {
    fn spawn(&self, cmd: &str) -> Result<Process, OpenError> {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", cmd])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = ReaderStream::new(child.stdout.take().unwrap()).map(|r| r.map(Output::Stdout));
        let err = ReaderStream::new(child.stderr.take().unwrap()).map(|r| r.map(Output::Stderr));
        Ok(Process {
            stdin: Box::pin(child.stdin.take().unwrap()),
            stdin_now: None,
            output_now: None,
            output: Box::pin(stream::select(out, err)),
            x11: None,
            control: Box::new(FakeControl {
                child,
                waited: false,
                abandoned: self.abandoned.clone(),
            }),
        })
    }
}

struct Client;
impl russh::client::Handler for Client {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

struct Server {
    port: u16,
    alice: PrivateKey,
    gateway: Arc<Fake>,
    shutdown: CancellationToken,
}

async fn server() -> Server {
    server_with(SshConfig::default()).await
}

async fn server_with(config: SshConfig) -> Server {
    let mut rng = russh::keys::key::safe_rng();
    let alice = PrivateKey::random(&mut rng, Algorithm::Ed25519).unwrap();
    let host = PrivateKey::random(&mut rng, Algorithm::Ed25519).unwrap();
    let gateway = Arc::new(Fake {
        alice: alice.public_key().clone(),
        opened: AtomicUsize::new(0),
        env: std::sync::Mutex::new(Vec::new()),
        pty_x11: std::sync::Mutex::new((true, true)),
        abandoned: Arc::new(AtomicUsize::new(0)),
        socket_listeners: Arc::new(AtomicUsize::new(0)),
        revoke: CancellationToken::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        config,
        host,
        gateway.clone(),
        shutdown.clone(),
    ));
    Server {
        port,
        alice,
        gateway,
        shutdown,
    }
}

async fn connect(port: u16, user: &str, key: &PrivateKey) -> Option<russh::client::Handle<Client>> {
    connect_with(russh::client::Config::default(), port, user, key).await
}

async fn connect_with(
    config: russh::client::Config,
    port: u16,
    user: &str,
    key: &PrivateKey,
) -> Option<russh::client::Handle<Client>> {
    connect_as(Client, config, port, user, key).await
}

/// As [`connect`], with `client` handling what the server sends.
async fn connect_as<H: russh::client::Handler + Send + 'static>(
    client: H,
    config: russh::client::Config,
    port: u16,
    user: &str,
    key: &PrivateKey,
) -> Option<russh::client::Handle<H>> {
    let config = Arc::new(config);
    // A refused address sees its connection closed: that is a failed connect here.
    let mut h = russh::client::connect(config, ("127.0.0.1", port), client)
        .await
        .ok()?;
    let r = h
        .authenticate_publickey(
            user,
            PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None),
        )
        .await
        .unwrap();
    r.success().then_some(h)
}

#[derive(Debug, Default)]
struct Run {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<u32>,
    /// Messages in arrival order, abbreviated.
    trace: Vec<&'static str>,
}

async fn exec(h: &russh::client::Handle<Client>, cmd: &str, stdin: &[u8]) -> Run {
    let ch = h.channel_open_session().await.unwrap();
    ch.exec(true, cmd).await.unwrap();
    // Write and read at once, as a real client does.
    let (mut rx, tx) = ch.split();
    let input = stdin.to_vec();
    let writer = tokio::spawn(async move {
        if !input.is_empty() {
            tx.data(&input[..]).await.unwrap();
        }
        tx.eof().await.unwrap();
        tx
    });
    let mut run = Run::default();
    while let Some(msg) = rx.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                run.stdout.extend_from_slice(&data);
                run.trace.push("data");
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                run.stderr.extend_from_slice(&data);
                run.trace.push("stderr");
            }
            ChannelMsg::ExitStatus { exit_status } => {
                run.status = Some(exit_status);
                run.trace.push("exit");
            }
            ChannelMsg::Eof => run.trace.push("eof"),
            ChannelMsg::Close => {
                run.trace.push("close");
                break;
            }
            _ => {}
        }
    }
    // The channel is closed: input the process never took stays unsent (the server grants
    // window only as input is taken, as sshd does), so the writer may still wait for it.
    writer.abort();
    run
}

#[tokio::test]
async fn auth_refuses_unknown_user_and_wrong_key() {
    let s = server().await;
    let mut rng = russh::keys::key::safe_rng();
    let other = PrivateKey::random(&mut rng, Algorithm::Ed25519).unwrap();
    assert!(connect(s.port, "alice", &other).await.is_none());
    assert!(connect(s.port, "bob", &s.alice).await.is_none());
    assert!(connect(s.port, "alice", &s.alice).await.is_some());
    assert_eq!(s.gateway.opened.load(Ordering::SeqCst), 0);
    s.shutdown.cancel();
}

#[tokio::test]
async fn repeated_failures_close_an_address_out() {
    let s = server_with(SshConfig {
        door: DoorConfig {
            failures_per_minute: 3,
            ..DoorConfig::default()
        },
        ..SshConfig::default()
    })
    .await;
    let mut rng = russh::keys::key::safe_rng();
    let other = PrivateKey::random(&mut rng, Algorithm::Ed25519).unwrap();
    assert!(connect(s.port, "alice", &s.alice).await.is_some());
    for _ in 0..3 {
        assert!(connect(s.port, "alice", &other).await.is_none());
    }
    // The failures are recorded as their connections close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Now even the right key is turned away: the connection is closed before the handshake.
    assert!(connect(s.port, "alice", &s.alice).await.is_none());
    s.shutdown.cancel();
}

/// A raw TCP connection from `from` (any 127/8 address is this host) that says nothing.
async fn idle_from(from: &str, port: u16) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap()
}

/// Whether the server closes `conn` within `within` (reads EOF or a reset; the server's
/// identification line, if it sent one, is skipped).
async fn closed(conn: &mut (impl tokio::io::AsyncRead + Unpin), within: Duration) -> bool {
    read_to_close(conn, within).await.is_some()
}

/// Everything `conn` sends until it closes (`None` if it is still open after `within`).
async fn read_to_close(
    conn: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| all)
}

#[tokio::test]
async fn one_source_holds_at_most_its_startups_and_others_still_log_in() {
    let s = server_with(SshConfig {
        door: DoorConfig {
            per_source: 3,
            ..DoorConfig::default()
        },
        ..SshConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(idle_from("127.0.0.2", s.port).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fourth from the same source is closed at once; the three stay open.
    let mut fourth = idle_from("127.0.0.2", s.port).await;
    assert!(closed(&mut fourth, Duration::from_secs(2)).await);
    for c in &mut held {
        assert!(!closed(c, Duration::from_millis(100)).await);
    }
    // Another source is not affected.
    let h = connect(s.port, "alice", &s.alice)
        .await
        .expect("alice refused");
    assert_eq!(exec(&h, "echo hi", b"").await.stdout, b"hi\n");
    s.shutdown.cancel();
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_identification_timeout() {
    let s = server_with(SshConfig {
        ident_timeout: Duration::from_millis(500),
        ..SshConfig::default()
    })
    .await;
    let mut c = idle_from("127.0.0.3", s.port).await;
    assert!(closed(&mut c, Duration::from_secs(3)).await);
    s.shutdown.cancel();
}

#[tokio::test]
async fn authenticated_connections_have_their_own_pool() {
    let s = server_with(SshConfig {
        max_connections: 1,
        ..SshConfig::default()
    })
    .await;
    // Unauthenticated connections do not take the authenticated pool's place...
    let _idle: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| idle_from("127.0.0.4", s.port))).await;
    let first = connect(s.port, "alice", &s.alice)
        .await
        .expect("first login refused");
    assert_eq!(exec(&first, "echo one", b"").await.stdout, b"one\n");
    // ...and a second authenticated one is over the pool's size.
    let second = connect(s.port, "alice", &s.alice).await;
    let refused = match second {
        None => true,
        Some(h) => {
            let ch = tokio::time::timeout(Duration::from_secs(3), h.channel_open_session()).await;
            !matches!(ch, Ok(Ok(_)))
        }
    };
    assert!(refused, "a second authenticated connection was served");
    drop(first);
    s.shutdown.cancel();
}

#[tokio::test]
async fn exempt_sources_are_never_penalised() {
    let s = server_with(SshConfig {
        door: DoorConfig {
            failures_per_minute: 2,
            exempt: vec!["127.0.0.0/8".parse().unwrap()],
            ..DoorConfig::default()
        },
        ..SshConfig::default()
    })
    .await;
    let mut rng = russh::keys::key::safe_rng();
    let other = PrivateKey::random(&mut rng, Algorithm::Ed25519).unwrap();
    for _ in 0..4 {
        assert!(connect(s.port, "alice", &other).await.is_none());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect(s.port, "alice", &s.alice).await.is_some());
    s.shutdown.cancel();
}

#[tokio::test]
async fn exit_status_comes_after_all_output() {
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let run = exec(&h, "head -c 300000 /dev/zero; echo oops >&2; exit 5", b"").await;
    assert_eq!(run.stdout.len(), 300_000);
    assert_eq!(run.stderr, b"oops\n");
    assert_eq!(run.status, Some(5));
    let exit_at = run.trace.iter().position(|t| *t == "exit").unwrap();
    assert!(
        run.trace[..exit_at]
            .iter()
            .all(|t| *t == "data" || *t == "stderr"),
        "{:?}",
        run.trace
    );
    assert_eq!(&run.trace[exit_at..], ["exit", "eof", "close"]);
    s.shutdown.cancel();
}

#[tokio::test]
async fn stdin_reaches_the_process_with_eof() {
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 256) as u8).collect();
    let run = exec(&h, "cat", &data).await;
    assert_eq!(run.status, Some(0));
    assert!(run.stdout == data);
    // Several sessions on one connection run side by side.
    let (a, b) = tokio::join!(exec(&h, "echo a", b""), exec(&h, "echo b", b""));
    assert_eq!((a.stdout, b.stdout), (b"a\n".to_vec(), b"b\n".to_vec()));
    s.shutdown.cancel();
}

#[tokio::test]
async fn a_process_that_reads_no_stdin_still_finishes() {
    // The client pushes more input than its window while the process ignores stdin and
    // writes a lot: output, exit status and close must still come through (the input
    // stalls, flow-controlled, without stalling the output).
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let data = vec![b'x'; 8 * 1024 * 1024];
    let run = tokio::time::timeout(
        Duration::from_secs(30),
        exec(&h, "head -c 5000000 /dev/zero; sleep 0.2; exit 9", &data),
    )
    .await
    .expect("session stalled");
    assert_eq!(run.stdout.len(), 5_000_000);
    assert_eq!(run.status, Some(9));
    s.shutdown.cancel();
}

#[tokio::test]
async fn input_sent_while_the_process_opens_is_kept() {
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let data = vec![b'y'; 3 * 1024 * 1024];
    let run = exec(&h, "slow-open wc -c", &data).await;
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        data.len().to_string()
    );
    s.shutdown.cancel();
}

#[tokio::test]
async fn sessions_per_connection_are_capped() {
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let mut open = Vec::new();
    for _ in 0..SshConfig::default().max_sessions {
        let ch = h.channel_open_session().await.unwrap();
        ch.exec(true, "sleep 5").await.unwrap();
        open.push(ch);
    }
    assert!(
        h.channel_open_session().await.is_err(),
        "one session too many was accepted"
    );
    drop(open);
    s.shutdown.cancel();
}

#[tokio::test]
async fn a_refused_open_gets_one_line_and_255() {
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let run = exec(&h, "refuse", b"").await;
    assert_eq!(run.status, Some(255));
    assert_eq!(
        run.stderr,
        b"berth: your container could not be started\r\n"
    );
    assert!(run.stdout.is_empty());
    s.shutdown.cancel();
}

#[tokio::test]
async fn a_vanished_client_abandons_its_process() {
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let ch = h.channel_open_session().await.unwrap();
    ch.exec(true, "sleep 30").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.gateway.opened.load(Ordering::SeqCst), 1);
    drop(ch);
    drop(h); // the TCP connection goes away without an exit status
    assert!(
        abandoned_within(&s, Duration::from_secs(5)).await,
        "the process control was not dropped"
    );
    s.shutdown.cancel();
}

/// The answer to the last request of `ch` that wanted one: `true` for success.
async fn answer(ch: &mut russh::Channel<russh::client::Msg>) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ch.wait()).await {
            Ok(Some(ChannelMsg::Success)) => return true,
            Ok(Some(ChannelMsg::Failure)) => return false,
            Ok(Some(_)) => {}
            other => panic!("no answer: {other:?}"),
        }
    }
}

/// A client can put a session's start off for good, on every session channel its user may
/// open: what a channel is asked to keep until then is refused past its bounds, and the
/// refusal is what the process sees.
#[tokio::test]
async fn a_session_s_setup_is_kept_within_bounds() {
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let mut ch = h.channel_open_session().await.unwrap();
    let sized = |n: usize| "v".repeat(n);
    // One variable past 16 KiB.
    ch.set_env(true, "LANG", sized(16 * 1024)).await.unwrap();
    assert!(!answer(&mut ch).await, "an oversized variable was granted");
    // Not on the allow-list.
    ch.set_env(true, "PATH", "/tmp").await.unwrap();
    assert!(
        !answer(&mut ch).await,
        "a variable off the list was granted"
    );
    // 64 KiB in all: four of 15 KiB fit, the fifth does not; small ones still do.
    for i in 0..5 {
        ch.set_env(true, format!("LC_{i}"), sized(15 * 1024))
            .await
            .unwrap();
        assert_eq!(answer(&mut ch).await, i < 4, "variable {i}");
    }
    ch.set_env(true, "LANG", "C.UTF-8").await.unwrap();
    assert!(answer(&mut ch).await);
    // At most 64 variables.
    for i in 0..70 {
        ch.set_env(true, format!("LC_N{i}"), "x").await.unwrap();
        assert_eq!(answer(&mut ch).await, i < 59, "small variable {i}");
    }
    // A terminal type past 256 bytes, and an X11 cookie past 256.
    ch.request_pty(true, &"x".repeat(257), 80, 24, 0, 0, &[])
        .await
        .unwrap();
    assert!(
        !answer(&mut ch).await,
        "an oversized terminal type was granted"
    );
    ch.request_x11(true, false, "MIT-MAGIC-COOKIE-1", "a".repeat(257), 0)
        .await
        .unwrap();
    assert!(
        !answer(&mut ch).await,
        "an oversized X11 cookie was granted"
    );
    ch.exec(true, "true").await.unwrap();
    let mut status = None;
    while let Some(msg) = ch.wait().await {
        if let ChannelMsg::ExitStatus { exit_status } = msg {
            status = Some(exit_status);
        }
    }
    assert_eq!(status, Some(0));
    let env = s.gateway.env.lock().unwrap().clone();
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 64, "{names:?}");
    assert_eq!(&names[..5], ["LC_0", "LC_1", "LC_2", "LC_3", "LANG"]);
    assert_eq!(env[4].1, "C.UTF-8");
    assert_eq!(names[63], "LC_N58");
    assert_eq!(
        *s.gateway.pty_x11.lock().unwrap(),
        (false, false),
        "a refused terminal or X11 request reached the process"
    );
    s.shutdown.cancel();
}

/// A client's TCP stream that stops reading when told (the bytes sent to it then pile up in
/// the kernel's buffers, and the server's writes stall), and goes on writing.
struct Deaf {
    tcp: tokio::net::TcpStream,
    deaf: Arc<std::sync::atomic::AtomicBool>,
}

impl tokio::io::AsyncRead for Deaf {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.deaf.load(Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Deaf {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Alice logged in over `tcp`, which stops reading when the flag returned is set.
async fn deaf_login(
    s: &Server,
    tcp: tokio::net::TcpStream,
    config: russh::client::Config,
) -> (
    russh::client::Handle<Client>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let deaf = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = Deaf {
        tcp,
        deaf: deaf.clone(),
    };
    let mut h = russh::client::connect_stream(Arc::new(config), stream, Client)
        .await
        .unwrap();
    let ok = h
        .authenticate_publickey(
            "alice",
            PrivateKeyWithHashAlg::new(Arc::new(s.alice.clone()), None),
        )
        .await
        .unwrap();
    assert!(ok.success());
    (h, deaf)
}

/// Whether the server let go of a process unwaited (its client gone) within `limit`.
async fn abandoned_within(s: &Server, limit: Duration) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if s.gateway.abandoned.load(Ordering::SeqCst) == 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A client that opens a wide window and then stops reading its socket (its TCP window
/// shut, its connection otherwise there) is closed once it has taken nothing for its
/// keepalives' time, and its process is let go: the loop that would send the keepalives
/// waits in the write.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_its_keepalives_time() {
    let s = server_with(SshConfig {
        keepalive_interval: Duration::from_secs(1),
        keepalive_max: 2,
        ..SshConfig::default()
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket
        .connect(([127, 0, 0, 1], s.port).into())
        .await
        .unwrap();
    let config = russh::client::Config {
        window_size: 1 << 30,
        ..Default::default()
    };
    let (h, deaf) = deaf_login(&s, tcp, config).await;
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, "cat /dev/zero").await.unwrap();
    // Some output arrives; then the client stops reading.
    let mut got = 0;
    while got < (1 << 20) {
        match ch.wait().await {
            Some(ChannelMsg::Data { data }) => got += data.len(),
            Some(_) => {}
            None => panic!("the channel ended"),
        }
    }
    deaf.store(true, Ordering::SeqCst);
    assert!(
        abandoned_within(&s, Duration::from_secs(15)).await,
        "a client that reads nothing kept its connection and process"
    );
    s.shutdown.cancel();
}

/// A client that neither reads the DISCONNECT the server sends it nor closes its socket is
/// let go all the same: its connection's task, and with it its process, end a few seconds
/// after the server disconnected it (here: its access was revoked).
#[tokio::test]
async fn a_client_that_ignores_its_disconnect_is_let_go() {
    let s = server().await;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .unwrap();
    let (h, deaf) = deaf_login(&s, tcp, russh::client::Config::default()).await;
    let ch = h.channel_open_session().await.unwrap();
    ch.exec(true, "sleep 60").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.gateway.opened.load(Ordering::SeqCst), 1);
    // The client reads no more (it never sees the DISCONNECT) and keeps its socket open.
    deaf.store(true, Ordering::SeqCst);
    s.gateway.revoke.cancel();
    assert!(
        abandoned_within(&s, Duration::from_secs(15)).await,
        "a disconnected client that never closed kept its connection and process"
    );
    drop((ch, h));
    s.shutdown.cancel();
}

/// `payload` framed as a packet in the clear (RFC 4253, 6: at least 4 bytes of padding, the
/// whole a multiple of 8).
fn clear_packet(payload: &[u8]) -> Vec<u8> {
    let mut pad = 8 - (5 + payload.len()) % 8;
    if pad < 4 {
        pad += 8;
    }
    let mut p = ((1 + payload.len() + pad) as u32).to_be_bytes().to_vec();
    p.push(pad as u8);
    p.extend_from_slice(payload);
    p.extend(std::iter::repeat_n(0, pad));
    p
}

/// A client's KEXINIT offering what a stock OpenSSH client does for the test server.
fn client_kexinit() -> Vec<u8> {
    let mut p = vec![20];
    p.extend_from_slice(&[7; 16]);
    for list in [
        "curve25519-sha256,curve25519-sha256@libssh.org",
        "ssh-ed25519",
        "chacha20-poly1305@openssh.com",
        "chacha20-poly1305@openssh.com",
        "hmac-sha2-256-etm@openssh.com,hmac-sha2-256",
        "hmac-sha2-256-etm@openssh.com,hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ] {
        p.extend_from_slice(&(list.len() as u32).to_be_bytes());
        p.extend_from_slice(list.as_bytes());
    }
    p.extend_from_slice(&[0, 0, 0, 0, 0]);
    p
}

/// The payloads of the packets in the clear that follow the identification line in `wire`
/// (before any keys: length, padding length, payload, padding).
fn clear_packets(wire: &[u8]) -> Vec<Vec<u8>> {
    let start = wire
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("an identification line")
        + 2;
    let mut rest = &wire[start..];
    let mut packets = Vec::new();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let pad = rest[4] as usize;
        assert!(
            len >= pad + 2 && rest.len() >= 4 + len,
            "a malformed packet: {len} bytes, padding {pad}, {} left",
            rest.len()
        );
        packets.push(rest[5..4 + len - pad].to_vec());
        rest = &rest[4 + len..];
    }
    assert!(
        rest.is_empty(),
        "{} bytes after the last packet",
        rest.len()
    );
    packets
}

/// A server whose login grace time is 1 s, a connection to it from 127.0.0.5 that has sent
/// its identification line, and when it was made.
async fn hostile_in_grace() -> (
    Server,
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
    std::time::Instant,
) {
    use tokio::io::AsyncWriteExt;
    let s = server_with(SshConfig {
        login_grace: Duration::from_secs(1),
        ..SshConfig::default()
    })
    .await;
    let c = idle_from("127.0.0.5", s.port).await;
    let start = std::time::Instant::now();
    let (read, mut write) = c.into_split();
    write.write_all(b"SSH-2.0-Hostile\r\n").await.unwrap();
    (s, read, write, start)
}

/// A client that never sends its part of the key exchange the server started, sending an
/// SSH_MSG_IGNORE now and then instead (which a key exchange accepts, and which counts as a
/// sign of life), is sent the DISCONNECT of its login grace time, in the middle of the key
/// exchange (RFC 4253 allows it there), as a well-formed packet; and closed, after its grace
/// time (not before it: its packets were taken).
#[tokio::test]
async fn a_key_exchange_never_finished_ends_with_the_login_grace_time() {
    use tokio::io::AsyncWriteExt;
    let (s, mut read, mut write, start) = hostile_in_grace().await;
    // A packet in the clear: length 12, padding 6, IGNORE with an empty string.
    let ignore: [u8; 16] = [0, 0, 0, 12, 6, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let chatter = tokio::spawn(async move {
        while write.write_all(&ignore).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let wire = read_to_close(&mut read, Duration::from_secs(20)).await;
    chatter.abort();
    let wire = wire.expect("a key exchange left unfinished kept its connection");
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "closed before its grace time: its packets were refused"
    );
    let packets = clear_packets(&wire);
    assert_eq!(
        packets.first().map(|p| p[0]),
        Some(20),
        "the server's KEXINIT first"
    );
    let disconnect = packets.iter().find(|p| p[0] == 1).unwrap_or_else(|| {
        panic!(
            "no DISCONNECT among the packets {:?}",
            packets.iter().map(|p| p[0]).collect::<Vec<_>>()
        )
    });
    assert!(disconnect.len() >= 9, "a short DISCONNECT: {disconnect:?}");
    let text = String::from_utf8_lossy(&disconnect[9..]);
    assert!(text.contains("login grace time exceeded"), "{disconnect:?}");
    s.shutdown.cancel();
}

/// A client that never sends its NEWKEYS holds the server in the one state where nothing may
/// go out: our NEWKEYS is sent, so a DISCONNECT under the old keys would be out of order, and
/// the new ones are not in use until the client's arrives. At the login grace time the
/// connection just ends, with nothing after the NEWKEYS.
#[tokio::test]
async fn a_client_that_never_sends_its_newkeys_is_cut_at_the_grace_time_without_a_word() {
    use tokio::io::AsyncWriteExt;
    let (s, mut read, mut write, start) = hostile_in_grace().await;
    write
        .write_all(&clear_packet(&client_kexinit()))
        .await
        .unwrap();
    // KEX_ECDH_INIT: any 32 bytes but a low-order point are an X25519 public key.
    let mut init = vec![30, 0, 0, 0, 32];
    init.extend_from_slice(&[9; 32]);
    write.write_all(&clear_packet(&init)).await.unwrap();
    let wire = read_to_close(&mut read, Duration::from_secs(20))
        .await
        .expect("a client that never sent its NEWKEYS kept its connection");
    drop(write);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "closed before its grace time"
    );
    let kinds: Vec<u8> = clear_packets(&wire).iter().map(|p| p[0]).collect();
    // KEXINIT, KEX_ECDH_REPLY, NEWKEYS, and nothing after.
    assert_eq!(kinds, [20, 31, 21]);
    s.shutdown.cancel();
}

/// Compression is `zlib@openssh.com` only, which starts once the client is authenticated:
/// RFC 4253's `zlib` would have the server inflate every packet of a client nobody knows yet
/// (256 KiB from a few hundred bytes each) before looking at its type.
#[tokio::test]
async fn compression_starts_only_after_authentication() {
    let s = server().await;
    let only = |c: &'static [russh::compression::Name]| {
        let mut config = russh::client::Config::default();
        config.preferred.compression = std::borrow::Cow::Borrowed(c);
        config
    };
    assert!(
        connect_with(only(&[russh::compression::ZLIB]), s.port, "alice", &s.alice)
            .await
            .is_none(),
        "a client was let in with compression from its first packet"
    );
    let h = connect_with(
        only(&[russh::compression::ZLIB_LEGACY]),
        s.port,
        "alice",
        &s.alice,
    )
    .await
    .expect("zlib@openssh.com refused");
    let r = exec(&h, "echo compressed", b"").await;
    assert_eq!(r.stdout, b"compressed\n", "{r:?}");
    s.shutdown.cancel();
}

/// A remote socket forward the connection holds is refused when asked for again, even once
/// the user (root in her container) has removed its socket's file so that the path binds
/// again: the client cancels it first. Asked for again and again, each new listener used to
/// replace the last one's entry while its task went on serving, past the cap of 16 and past
/// the connection's end. Cancelled, it binds again; no listener outlives the connection.
#[tokio::test]
async fn a_socket_forward_is_held_once_and_none_outlives_its_connection() {
    let s = server().await;
    let live = || s.gateway.socket_listeners.load(Ordering::SeqCst);
    let settles_at = |n: usize| async move {
        for _ in 0..100 {
            if live() == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let p = path.to_str().unwrap().to_owned();
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    h.streamlocal_forward(p.clone()).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    for _ in 0..20 {
        assert!(
            h.streamlocal_forward(p.clone()).await.is_err(),
            "a forward the connection holds was bound again"
        );
    }
    assert_eq!(live(), 1);
    h.cancel_streamlocal_forward(p.clone()).await.unwrap();
    assert!(
        settles_at(0).await,
        "a cancelled forward's listener is held"
    );
    h.streamlocal_forward(p.clone()).await.unwrap();
    assert_eq!(live(), 1);
    h.disconnect(russh::Disconnect::ByApplication, "", "")
        .await
        .unwrap();
    assert!(
        settles_at(0).await,
        "{} listener(s) outlived the connection",
        live()
    );
    s.shutdown.cancel();
}

/// The test process's resident memory, in KiB.
fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Input a process does not read is held up to its channel's window, and costs the server
/// about its bytes however it was cut: a window's worth of one-byte packets, each once held
/// as an allocation of its own, took 90 times the window (the per-user input budget of
/// 64 MiB was then more than 5 GiB). Measured in a process of its own (this test binary run
/// again for this test alone): the other tests of the binary move its memory too.
#[test]
fn input_sent_a_byte_a_packet_costs_its_bytes_not_a_packet_each() {
    const ALONE: &str = "BERTH_SSH_TEST_ALONE";
    const NAME: &str = "input_sent_a_byte_a_packet_costs_its_bytes_not_a_packet_each";
    if std::env::var_os(ALONE).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
            .env(ALONE, "1")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("1 passed"),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(one_byte_packets());
}

async fn one_byte_packets() {
    const PACKETS: usize = 300_000;
    let s = server().await;
    let h = connect(s.port, "alice", &s.alice).await.unwrap();
    let ch = h.channel_open_session().await.unwrap();
    ch.exec(true, "sleep 120").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib();
    let (_read, write) = ch.split();
    let one = bytes::Bytes::from_static(b"x");
    for _ in 0..PACKETS {
        write.data_bytes(one.clone()).await.unwrap();
    }
    // Each packet goes out before the next is queued; the last ones reach the server now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib().saturating_sub(before);
    eprintln!("{PACKETS} one-byte packets grew the server by {grown} KiB");
    // Held one allocation each: about 20 MiB. Held end to end: well under one.
    assert!(
        grown < 4 * 1024,
        "{PACKETS} one-byte packets grew the server by {grown} KiB"
    );
    s.shutdown.cancel();
}

/// A client that never answers the channels the server opens towards it.
struct Silent;
impl russh::client::Handler for Silent {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<russh::client::Msg>,
        _socket_path: &str,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        // Dropped, it would refuse the channel.
        std::mem::forget(reply);
        Ok(())
    }
}

/// russh keeps a channel the server opened until the client answers, for the connection's
/// life: a client that never answered grew the server's tables with every connection the
/// container made to a forwarded socket. The container's end is closed once the client's
/// time to answer is over, and the client is cut ten times that later, even when the
/// forward was cancelled meanwhile.
#[tokio::test]
async fn a_client_that_never_answers_a_channel_open_is_cut() {
    let answer = Duration::from_millis(300);
    let s = server_with(SshConfig {
        open_answer: answer,
        ..SshConfig::default()
    })
    .await;
    let h = connect_as(
        Silent,
        russh::client::Config::default(),
        s.port,
        "alice",
        &s.alice,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    h.streamlocal_forward(path.to_str().unwrap()).await.unwrap();
    let start = std::time::Instant::now();
    let mut container = tokio::net::UnixStream::connect(&path).await.unwrap();
    assert!(
        closed(&mut container, Duration::from_secs(5)).await,
        "the container's end was kept with no answer"
    );
    assert!(start.elapsed() >= answer);
    assert!(!h.is_closed(), "cut before its late answer could come");
    // Cancelling the forward (its listener goes) does not end the wait for the answer.
    h.cancel_streamlocal_forward(path.to_str().unwrap())
        .await
        .unwrap();
    let cut = std::time::Instant::now() + Duration::from_secs(20);
    while !h.is_closed() && std::time::Instant::now() < cut {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        h.is_closed(),
        "a client that never answered kept its connection"
    );
    assert!(start.elapsed() >= answer * 10);
    s.shutdown.cancel();
}
