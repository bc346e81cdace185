//! The russh handler: one per TCP connection. It authenticates, replies to channel requests
//! at once (russh takes a request's answer from the handler's return; one sent later from a
//! task could be lost), and hands each session channel to its own task. Dropping it
//! (connection gone) aborts those tasks, which ends their processes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use russh::server::{
    Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, debug_span, info};

use crate::inbox::{InboxRx, InboxTx};
use crate::quota::{Held, Quotas, Slot, Tenant};
use crate::session::{self, EnvBudget};
use crate::{Allowed, Certificate, Event, ForwardKind, Gateway, Permission, PublicKey};

/// Whether a connection has authenticated, and a wake-up for the task that waits for it.
#[derive(Default)]
pub(crate) struct Authenticated {
    done: AtomicBool,
    /// Authenticated, but its user holds all the connections she may: it is to be closed.
    over_cap: AtomicBool,
    notify: tokio::sync::Notify,
    /// Cancelled when what the connection authenticated with is revoked.
    revoked: std::sync::OnceLock<tokio_util::sync::CancellationToken>,
}

impl Authenticated {
    pub(crate) fn set(&self, revoked: tokio_util::sync::CancellationToken) {
        let _ = self.revoked.set(revoked);
        self.done.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Marks the connection authenticated but refused (its user is at her connection cap).
    pub(crate) fn refuse(&self) {
        self.over_cap.store(true, Ordering::SeqCst);
        self.done.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    pub(crate) fn over_cap(&self) -> bool {
        self.over_cap.load(Ordering::SeqCst)
    }

    /// Returns once the connection's credentials are revoked (never before it authenticated).
    pub(crate) async fn revoked(&self) {
        match self.revoked.get() {
            Some(t) => t.cancelled().await,
            None => std::future::pending().await,
        }
    }

    pub(crate) fn get(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Returns once the connection has authenticated.
    pub(crate) async fn wait(&self) {
        loop {
            let woken = self.notify.notified();
            if self.get() {
                return;
            }
            woken.await;
        }
    }
}

/// A session channel's input, as the connection's loop sees it.
enum SessionInput {
    /// No shell, command or subsystem asked for yet (input is the task's to drop): the
    /// task gets its inbox through this once one is.
    Waiting {
        give: tokio::sync::oneshot::Sender<(InboxTx, InboxRx)>,
        /// The environment granted so far (the task keeps the same count).
        env: EnvBudget,
    },
    /// Started: its input is pushed here as it is decrypted ([`Handler::take_data`]), in
    /// order, and written to the process at once when nothing is pending.
    Started(InboxTx),
}

pub(crate) struct Connection<G> {
    gateway: Arc<G>,
    peer: Option<SocketAddr>,
    accept_env: Arc<Vec<String>>,
    user: Option<(String, PublicKey)>,
    /// What the credential it logged in with allows (a certificate's extensions).
    allowed: Allowed,
    authenticated: Arc<Authenticated>,
    max_sessions: usize,
    /// Session channels of this connection, and where their input goes.
    channels: HashMap<ChannelId, SessionInput>,
    /// Which channel's output [`Handler::poll_output`] looks at first.
    output_turn: usize,
    /// What the gateway keeps for this connection while it is open.
    _connected: Option<Box<dyn std::any::Any + Send>>,
    /// Open `ssh -L` tunnels of this connection.
    tunnels: Arc<()>,
    /// Remote forwards (`ssh -R`) by the (address, port) the client knows them by.
    forwards: HashMap<(String, u32), tokio::task::AbortHandle>,
    tasks: JoinSet<()>,
    /// When the connection authenticated (the login latency is measured from there: what
    /// comes before includes the client's own time, key prompts and all).
    connected_at: std::time::Instant,
    /// Set by the first session that opens its process (it measures the login latency).
    login_measured: Arc<AtomicBool>,
    quotas: Arc<Quotas>,
    /// The authenticated user's quotas.
    tenant: Option<Tenant>,
    /// This connection's place among its user's connections.
    _slot: Option<Slot>,
}

impl<G: Gateway> Connection<G> {
    pub(crate) fn new(
        gateway: Arc<G>,
        peer: Option<SocketAddr>,
        accept_env: Arc<Vec<String>>,
        authenticated: Arc<Authenticated>,
        max_sessions: usize,
        quotas: Arc<Quotas>,
    ) -> Self {
        Self {
            gateway,
            peer,
            accept_env,
            user: None,
            allowed: Allowed::ALL,
            authenticated,
            max_sessions,
            channels: HashMap::new(),
            output_turn: 0,
            forwards: HashMap::new(),
            tunnels: Arc::new(()),
            _connected: None,
            tasks: JoinSet::new(),
            connected_at: std::time::Instant::now(),
            login_measured: Arc::new(AtomicBool::new(false)),
            quotas,
            tenant: None,
            _slot: None,
        }
    }

    fn accepted(&mut self, user: &str, key: PublicKey, certificate: Option<&Certificate>) {
        metrics::counter!("berth_logins_total").increment(1);
        self.allowed = Allowed::of(certificate);
        self.connected_at = std::time::Instant::now();
        self.gateway.event(crate::Event::LoginAccepted {
            user,
            key: &key,
            peer: self.peer,
            certificate,
        });
        let gateway = self.gateway.clone();
        let who = user.to_owned();
        let tenant = Tenant {
            quotas: self.quotas.clone(),
            user: user.to_owned(),
            report: Arc::new(move |what: Held| {
                gateway.event(Event::LimitReached {
                    user: &who,
                    what: what.refusal(),
                });
            }),
        };
        // A user past her connections gets nothing of this one (no user, no channels, no
        // hold on her container); the server closes it.
        let Some(slot) = tenant.take(Held::Connection) else {
            info!(user, peer = ?self.peer, "connection refused: too many connections for this user");
            self.authenticated.refuse();
            return;
        };
        self._slot = Some(slot);
        self.tenant = Some(tenant);
        let connected = self.gateway.connected(user, &key);
        self.user = Some((user.to_owned(), key));
        self._connected = Some(connected.hold);
        self.authenticated.set(connected.revoked);
    }

    fn refused(&self, user: &str, key: &PublicKey) {
        metrics::counter!("berth_auth_failures_total").increment(1);
        self.gateway.event(crate::Event::LoginRefused {
            user,
            key,
            peer: self.peer,
        });
    }

    /// Reports a forwarding set up (`refused: None`) or refused, for the audit log.
    fn forward_event(&self, user: &str, kind: ForwardKind, target: &str, refused: Option<&str>) {
        // The target is the client's text: bounded before it is reported.
        let target: String = target.chars().take(256).collect();
        self.gateway.event(Event::Forward {
            user,
            kind,
            target: &target,
            refused,
        });
    }

    /// Whether the connection may add the remote forward `key` (`None`: a port the bind will
    /// choose); a refusal is reported. One whose listener still serves is refused: the
    /// client cancels it first. Otherwise a user who removed her forwarded socket's file
    /// (she is root in her container) could bind the path again and again, each listener
    /// replacing the last one's entry here while its task went on, outside every count and
    /// past the connection's end. Forwards whose listener has ended (its accept failed) are
    /// forgotten first: they hold nothing, and may be asked for again.
    fn remote_slot(
        &mut self,
        user: &str,
        kind: ForwardKind,
        target: &str,
        key: Option<&(String, u32)>,
    ) -> bool {
        self.forwards.retain(|_, task| !task.is_finished());
        let why = if key.is_some_and(|k| self.forwards.contains_key(k)) {
            "already forwarded on this connection"
        } else if self.forwards.len() >= MAX_REMOTE_FORWARDS {
            "too many remote forwards on this connection"
        } else {
            return true;
        };
        self.forward_event(user, kind, target, Some(why));
        false
    }

    /// Keeps the task serving the remote forward `key`. A task already kept under it (the
    /// slot refuses that, so only a port the kernel gave twice could) is ended, never
    /// forgotten while it runs.
    fn keep_forward(&mut self, key: (String, u32), task: tokio::task::AbortHandle) {
        if let Some(old) = self.forwards.insert(key, task) {
            old.abort();
        }
    }

    /// Opens a `-L` tunnel in a task (the handler must not wait): `open` connects in the
    /// container, then the channel is confirmed and bridged; the outcome is reported.
    fn spawn_tunnel<S, F>(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        counted: (Arc<()>, Slot),
        handle: russh::server::Handle,
        (user, kind, target): (String, ForwardKind, String),
        open: F,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
        F: std::future::Future<
                Output = Result<(S, Box<dyn std::any::Any + Send>), crate::OpenError>,
            > + Send
            + 'static,
    {
        let gateway = self.gateway.clone();
        let reserved = self
            .tenant
            .as_ref()
            .map(Tenant::reserve_input)
            .unwrap_or_default();
        let span = debug_span!("forward", user = %user, to = ?target);
        self.tasks.spawn(
            async move {
                let _counted = counted;
                let opened = open.await;
                report(&*gateway, &user, kind, &target, opened.as_ref().err());
                match opened {
                    Ok((stream, hold)) => {
                        reply.accept().await;
                        let _hold = hold;
                        crate::tunnel::bridge(channel, stream, handle, reserved).await;
                        debug!("forward closed");
                    }
                    Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
                }
            }
            .instrument(span),
        );
    }

    /// A place for one more `-L` tunnel on this connection (each live tunnel holds a clone of
    /// `tunnels`) and among its user's forwarded connections, or `None` (reported) when all
    /// are taken.
    fn tunnel_slot(
        &mut self,
        user: &str,
        kind: ForwardKind,
        target: &str,
    ) -> Option<(Arc<()>, Slot)> {
        while self.tasks.try_join_next().is_some() {}
        if Arc::strong_count(&self.tunnels) > MAX_TUNNELS {
            let why = "too many tunnels open on this connection";
            self.forward_event(user, kind, target, Some(why));
            return None;
        }
        let slot = self.tenant.as_ref()?.take(Held::Forward);
        if slot.is_none() {
            self.forward_event(user, kind, target, Some(Held::Forward.refusal()));
        }
        Some((self.tunnels.clone(), slot?))
    }

    fn reply(&self, ch: ChannelId, ok: bool, session: &mut Session) -> Result<(), russh::Error> {
        if ok {
            session.channel_success(ch)
        } else {
            session.channel_failure(ch)
        }
    }

    /// A process request (shell, exec) is granted once per channel.
    /// Whether `ch` is a session channel that has not started its process.
    fn unstarted(&self, ch: ChannelId) -> bool {
        matches!(self.channels.get(&ch), Some(SessionInput::Waiting { .. }))
    }

    /// Marks session channel `ch` started (its first shell, command or subsystem request)
    /// and gives its task the inbox that its input goes to from now on.
    fn start(&mut self, ch: ChannelId, session: &Session) -> bool {
        let Some(tenant) = &self.tenant else {
            return false;
        };
        let Some(entry) = self.channels.get_mut(&ch) else {
            return false;
        };
        if !matches!(entry, SessionInput::Waiting { .. }) {
            return false;
        }
        let (input, stdin) = crate::inbox::inbox(session.handle(), ch, tenant.reserve_input());
        let task = (input.companion(), stdin);
        if let SessionInput::Waiting { give, .. } =
            std::mem::replace(entry, SessionInput::Started(input))
        {
            // A task already gone drops it, and the reservation with it.
            let _ = give.send(task);
        }
        true
    }
}

impl<G> Drop for Connection<G> {
    fn drop(&mut self) {
        for task in self.forwards.values() {
            task.abort();
        }
    }
}

/// Remote forwards one connection may hold.
const MAX_REMOTE_FORWARDS: usize = 16;
/// `ssh -L` tunnels one connection may have open at once.
const MAX_TUNNELS: usize = 64;

/// Whether `user` may use `what` for this forwarding; a refusal is reported. (A free
/// function: the handler itself is not `Sync`, so it is not held across the await.)
async fn permitted<G: Gateway>(
    gateway: &G,
    allowed: Allowed,
    user: &str,
    kind: ForwardKind,
    target: &str,
    what: Permission,
) -> bool {
    if !allowed.permits(what) {
        report(
            gateway,
            user,
            kind,
            target,
            Some(&crate::OpenError(
                "port forwarding is not permitted by the certificate".into(),
            )),
        );
        return false;
    }
    if gateway.permits(user, what).await {
        return true;
    }
    let why = if what == Permission::SocketForwarding {
        "socket forwarding is off for this user"
    } else {
        "tcp forwarding is off for this user"
    };
    report(
        gateway,
        user,
        kind,
        target,
        Some(&crate::OpenError(why.into())),
    );
    false
}

/// Reports how a forwarding that was asked for turned out.
fn report<G: Gateway>(
    gateway: &G,
    user: &str,
    kind: ForwardKind,
    target: &str,
    error: Option<&crate::OpenError>,
) {
    let target: String = target.chars().take(256).collect();
    gateway.event(Event::Forward {
        user,
        kind,
        target: &target,
        refused: error.map(|e| e.0.as_str()),
    });
}

/// Accepts connections on a Unix socket made in the container and hands each to the client
/// as a `forwarded-streamlocal` channel. Dropping it (cancel, connection gone) drops the
/// listener's hold, which removes the socket.
async fn serve_remote_socket(
    remote: crate::SocketListener,
    handle: russh::server::Handle,
    tenant: Tenant,
    path: String,
) {
    let _hold = remote.hold;
    crate::tunnel::serve_listener(
        remote.listener,
        "remote socket forward",
        handle.clone(),
        tenant,
        move |_| {
            let handle = handle.clone();
            let path = path.clone();
            async move { handle.channel_open_forwarded_streamlocal(path).await }
        },
    )
    .await;
}

/// Accepts connections on a remote-forwarded port in the container and hands each to the
/// client as a `forwarded-tcpip` channel.
async fn serve_remote(
    remote: crate::RemoteListener,
    handle: russh::server::Handle,
    tenant: Tenant,
    address: String,
    port: u32,
) {
    let _hold = remote.hold;
    crate::tunnel::serve_listener(
        remote.listener,
        "remote forward",
        handle.clone(),
        tenant,
        move |peer| {
            let handle = handle.clone();
            let address = address.clone();
            let (from, from_port) = crate::tunnel::origin(peer);
            async move {
                handle
                    .channel_open_forwarded_tcpip(address, port, from, from_port)
                    .await
            }
        },
    )
    .await;
}

impl<G: Gateway> Handler for Connection<G> {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Probing which keys would work is answered honestly for the right user and key
        // only; an unknown user looks exactly like a wrong key. With trusted CAs, the offer
        // may be a certificate's key (russh does not say): it goes on to its signature.
        if self.gateway.authorize(user, offer.public_key).await
            || self.gateway.accepts_certificates()
        {
            return Ok(Auth::Accept);
        }
        self.refused(user, offer.public_key);
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.gateway.authorize(user, key.public_key).await {
            self.accepted(user, key.public_key.clone(), None);
            Ok(Auth::Accept)
        } else {
            self.refused(user, key.public_key);
            Ok(Auth::reject())
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let key = PublicKey::new(certificate.public_key().clone(), "");
        if self
            .gateway
            .authorize_certificate(user, certificate, self.peer)
            .await
        {
            self.accepted(user, key, Some(certificate));
            Ok(Auth::Accept)
        } else {
            self.refused(user, &key);
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((user, key)) = self.user.clone() else {
            return Ok(()); // dropping `reply` rejects the open
        };
        while self.tasks.try_join_next().is_some() {}
        // Sessions whose task has ended are forgotten here: the client's close of a channel
        // the server closed first never reaches `channel_close`.
        self.channels.retain(|_, e| match e {
            SessionInput::Waiting { give, .. } => !give.is_closed(),
            SessionInput::Started(input) => !input.finished(),
        });
        if self.channels.len() >= self.max_sessions {
            info!(user = %user, "session refused: {} sessions open on this connection", self.channels.len());
            return Ok(());
        }
        let Some(tenant) = self.tenant.clone() else {
            return Ok(());
        };
        let Some(slot) = tenant.take(Held::Session) else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let (give, input) = tokio::sync::oneshot::channel();
        self.channels.insert(
            channel.id(),
            SessionInput::Waiting {
                give,
                env: EnvBudget::default(),
            },
        );
        let span = debug_span!("session", user = %user, ch = %channel.id());
        let ctx = session::Context {
            gateway: self.gateway.clone(),
            user,
            key,
            allowed: self.allowed,
            peer: self.peer,
            connected_at: self.connected_at,
            login_measured: self.login_measured.clone(),
            handle: session.handle(),
            accept_env: self.accept_env.clone(),
            tenant,
            input,
            _slot: slot,
        };
        // The task owns the channel from its first message, so nothing queues up unread.
        self.tasks
            .spawn(session::run(ctx, channel).instrument(span));
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((user, key)) = self.user.clone() else {
            return Ok(()); // dropping `reply` rejects the open
        };
        let (kind, target) = (ForwardKind::Local, format!("{host}:{port}"));
        if !permitted(
            &*self.gateway,
            self.allowed,
            &user,
            kind,
            &target,
            Permission::TcpForwarding,
        )
        .await
        {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let Ok(port) = u16::try_from(port) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let Some(counted) = self.tunnel_slot(&user, kind, &target) else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let (gateway, host, u) = (self.gateway.clone(), host.to_owned(), user.clone());
        let open = async move {
            let t = gateway.connect(&u, &key, &host, port).await?;
            Ok((t.stream, t.hold))
        };
        self.spawn_tunnel(
            channel,
            reply,
            counted,
            session.handle(),
            (user, kind, target),
            open,
        );
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((user, key)) = self.user.clone() else {
            return Ok(()); // dropping `reply` rejects the open
        };
        let kind = ForwardKind::LocalSocket;
        if !permitted(
            &*self.gateway,
            self.allowed,
            &user,
            kind,
            socket_path,
            Permission::SocketForwarding,
        )
        .await
        {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let Some(counted) = self.tunnel_slot(&user, kind, socket_path) else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let (gateway, path, u) = (self.gateway.clone(), socket_path.to_owned(), user.clone());
        let open = async move {
            let t = gateway.connect_socket(&u, &key, &path).await?;
            Ok((t.stream, t.hold))
        };
        self.spawn_tunnel(
            channel,
            reply,
            counted,
            session.handle(),
            (user, kind, socket_path.to_owned()),
            open,
        );
        Ok(())
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some((user, key)) = self.user.clone() else {
            return Ok(false);
        };
        let kind = ForwardKind::RemoteSocket;
        if !permitted(
            &*self.gateway,
            self.allowed,
            &user,
            kind,
            socket_path,
            Permission::SocketForwarding,
        )
        .await
            || !self.remote_slot(&user, kind, socket_path, Some(&(socket_path.to_owned(), 0)))
        {
            return Ok(false);
        }
        // Bound here, so that the reply says whether it worked.
        let remote = match self.gateway.listen_socket(&user, &key, socket_path).await {
            Ok(r) => r,
            Err(e) => {
                self.forward_event(&user, kind, socket_path, Some(&e.0));
                return Ok(false);
            }
        };
        self.forward_event(&user, kind, socket_path, None);
        let Some(tenant) = self.tenant.clone() else {
            return Ok(false);
        };
        let task = tokio::spawn(serve_remote_socket(
            remote,
            session.handle(),
            tenant,
            socket_path.to_owned(),
        ));
        self.keep_forward((socket_path.to_owned(), 0), task.abort_handle());
        Ok(true)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(match self.forwards.remove(&(socket_path.to_owned(), 0)) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        })
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some((user, key)) = self.user.clone() else {
            return Ok(false);
        };
        let Ok(wanted) = u16::try_from(*port) else {
            return Ok(false);
        };
        let kind = ForwardKind::Remote;
        let target = format!("{address}:{wanted}");
        if !permitted(
            &*self.gateway,
            self.allowed,
            &user,
            kind,
            &target,
            Permission::TcpForwarding,
        )
        .await
            || !self.remote_slot(
                &user,
                kind,
                &target,
                Some(&(address.to_owned(), u32::from(wanted))).filter(|_| wanted != 0),
            )
        {
            return Ok(false);
        }
        // The reply must say which port was bound, so the bind happens here; it waits only
        // for the gateway, never for this connection's own session loop.
        let remote = match self.gateway.listen(&user, &key, wanted).await {
            Ok(r) => r,
            Err(e) => {
                self.forward_event(&user, kind, &target, Some(&e.0));
                return Ok(false);
            }
        };
        let bound = match remote.listener.local_addr() {
            Ok(a) => u32::from(a.port()),
            Err(_) => return Ok(false),
        };
        *port = bound;
        self.forward_event(&user, kind, &format!("{address}:{bound}"), None);
        let Some(tenant) = self.tenant.clone() else {
            return Ok(false);
        };
        let task = tokio::spawn(serve_remote(
            remote,
            session.handle(),
            tenant,
            address.to_owned(),
            bound,
        ));
        self.keep_forward((address.to_owned(), bound), task.abort_handle());
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(match self.forwards.remove(&(address.to_owned(), port)) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        })
    }

    async fn pty_request(
        &mut self,
        ch: ChannelId,
        term: &str,
        _cols: u32,
        _rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.allowed.pty && self.unstarted(ch) && term.len() <= session::MAX_TERM_BYTES;
        self.reply(ch, ok, session)
    }

    async fn env_request(
        &mut self,
        ch: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = match self.channels.get_mut(&ch) {
            Some(SessionInput::Waiting { env, .. }) => env.admit(&self.accept_env, name, value),
            _ => false,
        };
        self.reply(ch, ok, session)
    }

    async fn shell_request(
        &mut self,
        ch: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.start(ch, session);
        self.reply(ch, ok, session)
    }

    async fn exec_request(
        &mut self,
        ch: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.start(ch, session);
        self.reply(ch, ok, session)
    }

    async fn subsystem_request(
        &mut self,
        ch: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Only sftp and berth connect are served; for anything else the task sees the
        // request and ends the channel.
        let ok = (name == "sftp" || name == crate::CONNECT_SUBSYSTEM) && self.start(ch, session);
        self.reply(ch, ok, session)
    }

    async fn agent_request(
        &mut self,
        ch: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // russh replies from the returned bool. The task sees the request too and asks the
        // gateway the same question before it sets an agent up.
        let Some((user, _)) = &self.user else {
            return Ok(false);
        };
        Ok(self.unstarted(ch)
            && self.allowed.agent_forwarding
            && self
                .gateway
                .permits(user, Permission::AgentForwarding)
                .await)
    }

    async fn x11_request(
        &mut self,
        ch: ChannelId,
        _single: bool,
        proto: &str,
        cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The task sees the request too and sets the display up with the process.
        let ok = match &self.user {
            Some((user, _)) => {
                self.unstarted(ch)
                    && session::x11_kept(proto, cookie)
                    && self.allowed.x11_forwarding
                    && self.gateway.permits(user, Permission::X11Forwarding).await
            }
            None => false,
        };
        self.reply(ch, ok, session)
    }

    fn poll_output(
        &mut self,
        cx: &mut std::task::Context<'_>,
        room: &dyn Fn(ChannelId) -> usize,
    ) -> std::task::Poll<(ChannelId, bytes::Bytes)> {
        // Each turn starts one channel further, so a busy terminal cannot starve the rest.
        let n = self.channels.len();
        self.output_turn = self.output_turn.wrapping_add(1);
        let start = if n == 0 { 0 } else { self.output_turn % n };
        for (ch, entry) in self.channels.iter().cycle().skip(start).take(n) {
            if let SessionInput::Started(input) = entry
                && let std::task::Poll::Ready(data) = input.poll_output(cx, room(*ch))
            {
                return std::task::Poll::Ready((*ch, data));
            }
        }
        std::task::Poll::Pending
    }

    fn take_data(&mut self, ch: ChannelId, data: &bytes::Bytes) -> bool {
        // Past its window, the data goes the channel's way, where the task ends the session.
        match self.channels.get(&ch) {
            Some(SessionInput::Started(input)) => input.push(data.clone()).is_ok(),
            _ => false,
        }
    }

    async fn channel_close(
        &mut self,
        ch: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&ch);
        Ok(())
    }
}
