//! The SSH gateway: a russh server that authenticates users by public key and turns every
//! session channel into one process run by a [`Gateway`].
//!
//! It knows nothing of Docker or of the store: it asks the [`Gateway`] whether a key may log
//! in as a user, and asks it to [`open`](Gateway::open) a process for a shell or command. It
//! then pumps bytes both ways with backpressure, forwards window changes, and sends the exit
//! status back.
//!
//! Concurrency: the russh [`russh::server::Handler`] is a thin adapter that replies to
//! requests synchronously (russh takes a request's answer from the handler's return; a reply
//! sent later from a task can be lost); each session channel is owned by one task
//! ([`session`]) from its first message.
//!
//! Counters (`berth_connections_total`, `berth_auth_failures_total`, `berth_relayed_bytes_total`,
//! the `berth_login_duration_seconds` histogram: authentication to the first session's
//! process running …) go to the [`metrics`] facade; the daemon
//! decides whether and where they are exported.
//!
//! ```text
//!  channel open ─► Setup: pty-req / env remembered
//!                    │ shell | exec
//!                    ▼
//!                  Running: stdin ◄─ data/eof, resize ◄─ window-change, output ─► client
//!                    │ output ends                         │ client gone
//!                    ▼                                     ▼
//!                  exit-status, eof, close            process tree killed
//! ```

pub mod algorithms;
pub mod door;
mod handler;
mod hostkey;
mod inbox;
mod quota;
mod server;
mod session;
mod tunnel;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::future::BoxFuture;
use tokio::io::AsyncWrite;

pub use algorithms::Algorithms;
pub use berth_guest_proto::fds::{GuardedUnixListener, GuardedUnixStream};
pub use door::{DoorConfig, Net, Startups};
pub use hostkey::{HostKeyError, load_or_create_host_key};
pub use quota::UserLimits;
pub use russh::keys::{Certificate, PublicKey, ssh_encoding, ssh_key};
pub use server::{ServerError, SshConfig, serve};

/// What a session asks to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An interactive login shell.
    Shell,
    /// A command line, run by `/bin/sh -c`.
    Exec(String),
    /// The SFTP subsystem (also what `scp` uses since OpenSSH 9.0).
    Sftp,
    /// The `berth connect` subsystem ([`CONNECT_SUBSYSTEM`]): the client serves a directory
    /// of its own on the channel, for the daemon to mount in the container.
    Connect,
}

/// The name of the `berth connect` subsystem.
pub const CONNECT_SUBSYSTEM: &str = "berth-connect@berth";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pty {
    pub term: String,
    pub size: WindowSize,
}

/// Everything known about a session at the moment it starts its process.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub user: String,
    /// The key the connection authenticated with; the gateway checks it again at every
    /// open, so a removed key or user cannot open new sessions on a connection it still has.
    pub key: PublicKey,
    pub peer: Option<SocketAddr>,
    /// When the connection authenticated; the first session of a connection measures the
    /// login's latency from it.
    pub connected_at: std::time::Instant,
    pub command: Command,
    pub pty: Option<Pty>,
    /// Client environment that passed the allow-list.
    pub env: Vec<(String, String)>,
    /// X11 forwarding, when requested and permitted.
    pub x11: Option<X11Request>,
}

/// A chunk of process output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// Writes to a process's input without waiting: the bytes it took at once, or
/// `WouldBlock`.
pub type WriteNow = std::sync::Arc<dyn Fn(&[u8]) -> io::Result<usize> + Send + Sync>;

/// Reads a process's output as an `AsyncRead` would (nothing read means its end).
pub type ReadNow = std::sync::Arc<
    dyn Fn(
            &mut std::task::Context<'_>,
            &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>>
        + Send
        + Sync,
>;

/// A running process, as the gateway hands it to the session task.
pub struct Process {
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    /// The same input as `stdin`, where it can be written without waiting (a terminal):
    /// the connection's loop writes a keystroke with it as it is decrypted, when nothing
    /// written through `stdin` is pending, instead of handing it to the session's task.
    pub stdin_now: Option<WriteNow>,
    /// The same output as `output` (all of it stdout), where it can be polled outside a
    /// stream (a terminal): the connection's loop reads it and sends it as it comes, instead
    /// of the session's task. `output` is then not polled.
    pub output_now: Option<ReadNow>,
    pub output: Pin<Box<dyn Stream<Item = io::Result<Output>> + Send>>,
    pub control: Box<dyn ProcessControl>,
    /// For `ssh -X`: the display port listening in the container; each connection to it
    /// becomes an X11 channel to the client.
    pub x11: Option<tokio::net::TcpListener>,
}

/// What the client asked for with `ssh -X`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X11Request {
    pub single_connection: bool,
    pub auth_protocol: String,
    pub auth_cookie: String,
    pub screen: u32,
}

/// How a session drives its process beyond bytes. Dropping it before [`wait`](Self::wait)
/// returned means the client went away: the implementation must end the process.
pub trait ProcessControl: Send {
    fn resize(&self, size: WindowSize) -> BoxFuture<'_, ()>;
    /// Called once the output stream has ended; returns the exit code.
    fn wait(&mut self) -> BoxFuture<'_, u32>;
}

/// A refusal to open a session, in words safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// A TCP connection made on the user's behalf (`ssh -L`), and whatever keeps its target
/// alive (a lease on the container) for as long as the tunnel lasts.
pub struct Tunnel {
    pub stream: tokio::net::TcpStream,
    pub hold: Box<dyn std::any::Any + Send>,
}

/// A port listening inside the user's container for `ssh -R`, and whatever keeps the
/// container running while it listens.
pub struct RemoteListener {
    pub listener: tokio::net::TcpListener,
    pub hold: Box<dyn std::any::Any + Send>,
}

/// A Unix socket connection made in the user's container (`ssh -L ...:/path`), and what
/// keeps the container running meanwhile.
pub struct SocketTunnel {
    pub stream: GuardedUnixStream,
    pub hold: Box<dyn std::any::Any + Send>,
}

/// A Unix socket listening in the user's container (`ssh -R /path:...`); `hold` keeps the
/// container running and removes the socket when dropped.
pub struct SocketListener {
    pub listener: GuardedUnixListener,
    pub hold: Box<dyn std::any::Any + Send>,
}

/// Where a session's forwarded agent is offered inside the container (`ssh -A`): a unix
/// socket the gateway made, the path processes see (for `SSH_AUTH_SOCK`), and whatever
/// removes the socket when dropped.
pub struct AgentListener {
    pub listener: GuardedUnixListener,
    pub path_in_container: String,
    pub hold: Box<dyn std::any::Any + Send>,
}

/// What the gateway keeps for an authenticated connection: see [`Gateway::connected`].
pub struct Connected {
    pub hold: Box<dyn std::any::Any + Send>,
    /// Cancelled when what the connection authenticated with is revoked: the connection is
    /// then closed, with everything on it (sessions, forwards, agent sockets).
    pub revoked: tokio_util::sync::CancellationToken,
}

/// What the credential a connection logged in with allows beyond a session, read as OpenSSH
/// reads a user certificate's extensions: a certificate allows only what it names
/// (`permit-pty`, `permit-port-forwarding`, `permit-agent-forwarding`,
/// `permit-X11-forwarding`; `ssh-keygen -O clear` names none, `-O no-pty` all but one); a
/// plain key allows everything. The gateway's switches ([`Gateway::permits`]) apply too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    pub pty: bool,
    /// TCP ports and Unix sockets alike, both ways (`-L`, `-R`, `-D`).
    pub port_forwarding: bool,
    pub agent_forwarding: bool,
    pub x11_forwarding: bool,
}

impl Allowed {
    pub const ALL: Self = Self {
        pty: true,
        port_forwarding: true,
        agent_forwarding: true,
        x11_forwarding: true,
    };

    /// What logging in with `certificate` (or with a plain key, for `None`) allows.
    #[must_use]
    pub fn of(certificate: Option<&Certificate>) -> Self {
        let Some(c) = certificate else {
            return Self::ALL;
        };
        let named = |extension: &str| c.extensions().contains_key(extension);
        Self {
            pty: named("permit-pty"),
            port_forwarding: named("permit-port-forwarding"),
            agent_forwarding: named("permit-agent-forwarding"),
            x11_forwarding: named("permit-X11-forwarding"),
        }
    }

    #[must_use]
    pub fn permits(self, what: Permission) -> bool {
        match what {
            Permission::TcpForwarding | Permission::SocketForwarding => self.port_forwarding,
            Permission::AgentForwarding => self.agent_forwarding,
            Permission::X11Forwarding => self.x11_forwarding,
        }
    }
}

/// Things a user may be allowed or refused beyond sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `ssh -L` and `ssh -R` of TCP ports.
    TcpForwarding,
    /// `ssh -L` and `ssh -R` of Unix sockets (`direct-streamlocal`, `streamlocal-forward`).
    SocketForwarding,
    /// `ssh -A`.
    AgentForwarding,
    /// `ssh -X`.
    X11Forwarding,
}

/// Something the gateway reports for the audit log.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A key was accepted for `user` (the connection is now authenticated).
    LoginAccepted {
        user: &'a str,
        key: &'a PublicKey,
        peer: Option<SocketAddr>,
        /// The certificate the key came with, for a certificate login.
        certificate: Option<&'a Certificate>,
    },
    /// A key was refused for `user` (unknown user and wrong key look the same).
    LoginRefused {
        user: &'a str,
        key: &'a PublicKey,
        peer: Option<SocketAddr>,
    },
    /// A forwarding of an authenticated `user` was set up (`refused: None`) or refused (and
    /// why, in words safe to store). `target` is what the client named, bounded.
    Forward {
        user: &'a str,
        kind: ForwardKind,
        target: &'a str,
        refused: Option<&'a str>,
    },
    /// `user` was refused something for holding all she may of it (`what`: the words of
    /// the refusal, e.g. "too many sessions for this user").
    LimitReached { user: &'a str, what: &'static str },
}

/// The kinds of forwarding, as the audit log names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardKind {
    /// `ssh -L` to a TCP port in the container.
    Local,
    /// `ssh -R` of a TCP port in the container.
    Remote,
    /// `ssh -L` to a Unix socket in the container.
    LocalSocket,
    /// `ssh -R` of a Unix socket made in the container.
    RemoteSocket,
    /// `ssh -A`.
    Agent,
    /// `ssh -X`.
    X11,
}

impl ForwardKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Remote => "remote",
            Self::LocalSocket => "local_socket",
            Self::RemoteSocket => "remote_socket",
            Self::Agent => "agent",
            Self::X11 => "x11",
        }
    }
}

/// What the gateway needs from the rest of Berth.
pub trait Gateway: Send + Sync + 'static {
    /// Reports `event`; must not block.
    fn event(&self, event: Event<'_>) {
        let _ = event;
    }
    /// Whether `key` may log in as `user`. Must answer the same way for an unknown user and
    /// a wrong key.
    fn authorize(&self, user: &str, key: &PublicKey) -> impl Future<Output = bool> + Send;
    /// Whether user certificates may log in at all (trusted CAs are configured). Then a key
    /// offer that `authorize` refuses is still let through to its signature, where a
    /// certificate is checked by [`Gateway::authorize_certificate`] and a plain key by
    /// `authorize` again.
    fn accepts_certificates(&self) -> bool {
        false
    }
    /// Whether `certificate`, whose key has signed this session, may log in as `user` from
    /// `peer`. Must answer the same way for an unknown user and a bad certificate.
    fn authorize_certificate(
        &self,
        user: &str,
        certificate: &Certificate,
        peer: Option<SocketAddr>,
    ) -> impl Future<Output = bool> + Send {
        let _ = (user, certificate, peer);
        async { false }
    }
    /// Called once a connection has authenticated as `user` with `key`. The hold lives as
    /// long as the connection (a connection with only forwardings keeps the container up);
    /// cancelling the token ends the connection (its key or its user was removed).
    fn connected(&self, user: &str, key: &PublicKey) -> Connected;
    /// Whether `user` may use `what` (server-wide setting, or the user's own).
    fn permits(&self, user: &str, what: Permission) -> impl Future<Output = bool> + Send;
    /// Starts the process for a session.
    fn open(&self, req: OpenRequest) -> impl Future<Output = Result<Process, OpenError>> + Send;
    /// A fresh socket for one session's forwarded agent, reachable only in the user's
    /// container.
    fn agent_listener(
        &self,
        user: &str,
    ) -> impl Future<Output = Result<AgentListener, OpenError>> + Send;
    /// Listens on `port` (0: any) on the loopback of the user's container (`ssh -R`).
    fn listen(
        &self,
        user: &str,
        key: &PublicKey,
        port: u16,
    ) -> impl Future<Output = Result<RemoteListener, OpenError>> + Send;
    /// Connects to `host:port` as seen from inside the user's container (`ssh -L`).
    fn connect(
        &self,
        user: &str,
        key: &PublicKey,
        host: &str,
        port: u16,
    ) -> impl Future<Output = Result<Tunnel, OpenError>> + Send;
    /// Connects to the Unix socket at `path` in the user's container (`ssh -L ...:/path`).
    fn connect_socket(
        &self,
        user: &str,
        key: &PublicKey,
        path: &str,
    ) -> impl Future<Output = Result<SocketTunnel, OpenError>> + Send {
        let _ = (user, key, path);
        async { Err(OpenError("Unix socket forwarding is not available".into())) }
    }
    /// Listens on a new Unix socket at `path` in the user's container (`ssh -R /path:...`).
    fn listen_socket(
        &self,
        user: &str,
        key: &PublicKey,
        path: &str,
    ) -> impl Future<Output = Result<SocketListener, OpenError>> + Send {
        let _ = (user, key, path);
        async { Err(OpenError("Unix socket forwarding is not available".into())) }
    }
}
