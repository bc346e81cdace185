//! Berth's answer to the SSH gateway's two questions: may this key log in as this user, and
//! run this session in the user's container.

use std::sync::Arc;

use berth_proto::{ForwardingInfo, PublicKey, UserName, fingerprint};
use berth_runtime::{
    Exec, ExecHandle, ExecSpec, Output as RtOutput, Runtime, RuntimeError, TtySize, in_netns,
};
use berth_ssh::{
    AgentListener, Command, Gateway, OpenError, OpenRequest, Output, Permission, Process,
    ProcessControl, RemoteListener, Tunnel, WindowSize, X11Request,
};
use berth_store::Store;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tracing::{error, info, warn};

use crate::blocking;
use crate::lifecycle::{GUEST_RUN_MOUNT, Lease, Lifecycle, LifecycleError};
use crate::sessions::{Registration, SharedGuard};

/// Starts a login shell for root: the shell and home named in the image's `/etc/passwd`
/// (`/bin/sh` and `/root` when absent), run with `-l` like sshd does. Written for any POSIX
/// `sh`, busybox's included.
const LOGIN_SHELL: &str = r#"s=/bin/sh h=/root
if [ -r /etc/passwd ]; then
  while IFS=: read -r n _ _ _ _ d sh; do
    if [ "$n" = root ]; then
      if [ -n "$sh" ] && [ -x "$sh" ]; then s=$sh; fi
      if [ -n "$d" ]; then h=$d; fi
      break
    fi
  done < /etc/passwd
fi
cd "$h" 2>/dev/null || cd /
export HOME="$h" SHELL="$s"
exec "$s" -l"#;

/// X11 display numbers tried in the container, like sshd's X11DisplayOffset.
const X11_DISPLAYS: std::ops::Range<u16> = 10..100;

/// Puts the session's X11 cookie where X clients look for it, as sshd does with xauth,
/// when the image has xauth.
const X11_PRELUDE: &str = r#"if [ -n "$BERTH_X11_COOKIE" ] && command -v xauth >/dev/null 2>&1; then
  xauth -q add "unix:$BERTH_X11_DISPLAY" "$BERTH_X11_PROTO" "$BERTH_X11_COOKIE" 2>/dev/null
fi
unset BERTH_X11_PROTO BERTH_X11_COOKIE BERTH_X11_DISPLAY"#;

/// Runs the image's own sftp-server (its path differs by distribution), or Berth's own
/// when the image has none (busybox), as root in the user's home like sshd does.
const SFTP_SERVER: &str = r#"cd "${HOME:-/root}" 2>/dev/null
for p in /usr/lib/openssh/sftp-server /usr/lib/ssh/sftp-server /usr/libexec/openssh/sftp-server /usr/libexec/sftp-server /usr/lib/sftp-server; do
  if [ -x "$p" ]; then exec "$p"; fi
done
exec /.berth/berth-guest sftp-server"#;

pub struct BerthGateway<R> {
    pub store: Store,
    /// Server-wide forwarding switches, for users without their own.
    pub forwarding: ForwardingInfo,
    pub runtime: Arc<R>,
    pub lifecycle: Arc<Lifecycle<R>>,
    pub sessions: Arc<crate::sessions::Sessions>,
    pub port: u16,
    /// Bounds the audit lines refused logins may write (see [`RefusalBudget`]).
    pub refusals: std::sync::Mutex<RefusalBudget>,
    /// Trusted user CAs and revoked keys.
    pub certs: Arc<crate::certs::Certs>,
}

impl<R: Runtime> BerthGateway<R> {
    /// The check at every session open or forward on an open connection: the key is still
    /// one of the user's, or the certificate it logged in with is still valid, not revoked,
    /// and its user still exists. (Never used to log in: a certificate's key alone, without
    /// the certificate and its source-address, is not a credential.)
    async fn still_authorized(&self, user: &str, key: &PublicKey) -> bool {
        if self.authorize(user, key).await {
            return true;
        }
        if !self.certs.recheck(user, key, unix_now()) {
            return false;
        }
        let Ok(name) = UserName::parse(user) else {
            return false;
        };
        let store = self.store.clone();
        blocking(move || store.user(&name)).await.is_ok()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refused logins come from anybody: past [`REFUSALS_PER_MINUTE`] audit lines a minute they
/// are only counted, and the count is written once the minute is over, so a flood cannot
/// rotate the records that matter out of the audit log.
#[derive(Debug, Default)]
pub struct RefusalBudget {
    minute: u64,
    written: u32,
    suppressed: u32,
}

const REFUSALS_PER_MINUTE: u32 = 120;

impl RefusalBudget {
    /// Whether to write this refusal; and the count suppressed in a minute now over.
    fn take(&mut self, now_minute: u64) -> (bool, Option<u32>) {
        let mut over = None;
        if now_minute != self.minute {
            if self.suppressed > 0 {
                over = Some(self.suppressed);
            }
            *self = Self {
                minute: now_minute,
                ..Self::default()
            };
        }
        if self.written < REFUSALS_PER_MINUTE {
            self.written += 1;
            (true, over)
        } else {
            self.suppressed += 1;
            (false, over)
        }
    }
}

/// A user's effective switches: her own where set, the server's otherwise.
pub fn effective_forwarding(
    server: ForwardingInfo,
    user: berth_store::Forwarding,
) -> ForwardingInfo {
    ForwardingInfo {
        tcp: user.tcp.unwrap_or(server.tcp),
        agent: user.agent.unwrap_or(server.agent),
        x11: user.x11.unwrap_or(server.x11),
    }
}

impl<R: Runtime> Gateway for BerthGateway<R> {
    fn event(&self, event: berth_ssh::Event<'_>) {
        let (name, user, key, peer, cert) = match event {
            berth_ssh::Event::LoginAccepted {
                user,
                key,
                peer,
                certificate,
            } => ("login_accepted", user, key, peer, certificate),
            berth_ssh::Event::LoginRefused { user, key, peer } => {
                ("login_refused", user, key, peer, None)
            }
        };
        if name == "login_refused" {
            let minute = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() / 60);
            let (write, over) = self
                .refusals
                .lock()
                .map_or((true, None), |mut b| b.take(minute));
            if let Some(n) = over {
                self.lifecycle
                    .audit()
                    .record("login_refused_suppressed", serde_json::json!({"count": n}));
            }
            if !write {
                return;
            }
        }
        // A refused name is whatever the client sent: bounded before it is written down.
        let user: String = user.chars().take(64).collect();
        let mut record = serde_json::json!({
            "user": user,
            "key": fingerprint(key),
            "peer": peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        });
        if let (Some(c), Some(fields)) = (cert, record.as_object_mut()) {
            // The certificate's own name for itself, bounded like any client text.
            let id: String = c.key_id().chars().take(256).collect();
            fields.insert("cert_key_id".into(), id.into());
            fields.insert("cert_serial".into(), c.serial().into());
            fields.insert(
                "cert_ca".into(),
                c.signature_key()
                    .fingerprint(berth_ssh::ssh_key::HashAlg::Sha256)
                    .to_string()
                    .into(),
            );
        }
        self.lifecycle.audit().record(name, record);
    }

    fn accepts_certificates(&self) -> bool {
        self.certs.any_ca()
    }

    async fn authorize_certificate(
        &self,
        user: &str,
        certificate: &berth_ssh::Certificate,
        peer: Option<std::net::SocketAddr>,
    ) -> bool {
        let now = unix_now();
        if let Err(why) = self
            .certs
            .check(user, certificate, peer.map(|p| p.ip()), now)
        {
            info!(
                user,
                key_id = certificate.key_id(),
                serial = certificate.serial(),
                "certificate refused: {why}"
            );
            return false;
        }
        // Certificates never create users.
        let Ok(name) = UserName::parse(user) else {
            return false;
        };
        let store = self.store.clone();
        if blocking(move || store.user(&name)).await.is_err() {
            return false;
        }
        self.certs.remember(user, certificate, now);
        true
    }

    fn connected(&self, user: &str) -> Option<Box<dyn std::any::Any + Send>> {
        let name = UserName::parse(user).ok()?;
        match self.lifecycle.hold(&name) {
            Ok(hold) => Some(Box::new(hold)),
            Err(e) => {
                warn!(user, error = %e, "no connection hold");
                None
            }
        }
    }

    async fn permits(&self, user: &str, what: Permission) -> bool {
        let Ok(name) = UserName::parse(user) else {
            return false;
        };
        let store = self.store.clone();
        let Ok(record) = blocking(move || store.user(&name)).await else {
            return false;
        };
        let f = effective_forwarding(self.forwarding, record.forwarding);
        match what {
            Permission::TcpForwarding => f.tcp,
            Permission::AgentForwarding => f.agent,
            Permission::X11Forwarding => f.x11,
        }
    }

    async fn authorize(&self, user: &str, key: &PublicKey) -> bool {
        if UserName::parse(user).is_err() {
            return false;
        }
        if self.certs.key_revoked(key.key_data()) {
            return false;
        }
        let store = self.store.clone();
        let (name, fp) = (user.to_owned(), fingerprint(key));
        match blocking(move || store.key_authorized(&name, &fp)).await {
            Ok(ok) => ok,
            Err(e) => {
                error!(error = %e, "key lookup failed");
                false
            }
        }
    }

    async fn listen(
        &self,
        user: &str,
        key: &PublicKey,
        port: u16,
    ) -> Result<RemoteListener, OpenError> {
        let (lease, net) = self.lease_with_pid(user, key).await?;
        let listener = in_netns(net.ns, lease.container(), move || {
            let l = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .await
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| {
            OpenError(format!(
                "cannot listen on port {port} in your container: {e}"
            ))
        })?;
        Ok(RemoteListener {
            listener,
            hold: Box::new(lease),
        })
    }

    async fn agent_listener(&self, user: &str) -> Result<AgentListener, OpenError> {
        use std::os::unix::fs::PermissionsExt;
        let name = UserName::parse(user).map_err(|_| OpenError("unknown user".into()))?;
        let dir = self.lifecycle.run_dir().join(name.as_str());
        let fail = |e: std::io::Error| {
            error!(user = %name, error = %e, "cannot make an agent socket");
            OpenError("agent forwarding is not available".into())
        };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let file = format!("agent-{:016x}.sock", random_u64());
        let path = dir.join(&file);
        let listener = tokio::net::UnixListener::bind(&path).map_err(fail)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        Ok(AgentListener {
            listener,
            path_in_container: format!("{GUEST_RUN_MOUNT}/{file}"),
            hold: Box::new(RemoveOnDrop(path)),
        })
    }

    async fn connect(
        &self,
        user: &str,
        key: &PublicKey,
        host: &str,
        port: u16,
    ) -> Result<Tunnel, OpenError> {
        let (lease, net) = self.lease_with_pid(user, key).await?;
        let target = host.to_owned();
        let root = net.root;
        let stream = in_netns(net.ns, lease.container(), move || {
            connect_from_here(&root, &target, port)
        })
        .await
        .and_then(tokio::net::TcpStream::from_std)
        .map_err(|e| OpenError(format!("cannot connect to {host}:{port}: {e}")))?;
        Ok(Tunnel {
            stream,
            hold: Box::new(lease),
        })
    }

    async fn open(&self, req: OpenRequest) -> Result<Process, OpenError> {
        let (user, peer) = (req.user.clone(), req.peer);
        let opened = self.open_session(req).await;
        if let Err(e) = &opened {
            self.lifecycle.audit().record(
                "session_refused",
                serde_json::json!({
                    "user": user,
                    "peer": peer.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    "reason": e.0,
                }),
            );
        }
        opened
    }
}

impl<R: Runtime> BerthGateway<R> {
    async fn open_session(&self, req: OpenRequest) -> Result<Process, OpenError> {
        let user = UserName::parse(&req.user).map_err(|_| OpenError("unknown user".into()))?;
        // The connection authenticated earlier; the key or the user may be gone since.
        if !self.still_authorized(&req.user, &req.key).await {
            return Err(OpenError("access revoked".into()));
        }
        if let Command::Exec(cmd) = &req.command
            && let Some(word) = HostWord::parse(cmd)
        {
            self.lifecycle.audit().record(
                "host_word",
                serde_json::json!({"user": user.to_string(), "word": word.as_str().to_string()}),
            );
            let (out, err, code) = self.host_word(&user, word).await;
            return Ok(text_process(out, err, code, req.pty.is_some()));
        }
        let lease = self.lifecycle.acquire(&user).await.map_err(|e| {
            error!(user = %user, error = %e, "login failed: no running container");
            OpenError(login_error(&e))
        })?;
        let display = match &req.x11 {
            Some(x) => Some(self.x11_display(lease.container(), x).await?),
            None => None,
        };
        let spec = self.exec_spec(&req, display.as_ref().map(|(n, _)| *n));
        let mut exec = self
            .runtime
            .exec(lease.container(), spec)
            .await
            .map_err(|e| {
                error!(user = %user, error = %e, "login failed: exec");
                OpenError(login_error(&LifecycleError::Runtime(e)))
            })?;
        let x11_display = display.as_ref().map(|(n, _)| *n);
        let command = match &req.command {
            Command::Shell => "shell".to_owned(),
            Command::Sftp => "sftp".to_owned(),
            Command::Exec(c) => c.chars().take(200).collect(),
        };
        let guard = Arc::new(std::sync::Mutex::new(std::mem::take(&mut exec.guard)));
        let registration = self
            .sessions
            .register(user.as_str(), req.peer, command, &guard);
        let mut process = into_process(
            self.runtime.clone(),
            exec,
            guard,
            registration,
            lease,
            x11_display,
        );
        process.x11 = display.map(|(_, l)| l);
        Ok(process)
    }
}

/// The seed's words, answered by the daemon itself when they are the whole command line.
/// Anything else, `commit now` included, runs in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostWord {
    Commit,
    Stop,
    Remove,
    Port,
    Freeport,
    Status,
    Help,
}

impl HostWord {
    pub fn parse(cmd: &str) -> Option<Self> {
        Some(match cmd.trim() {
            "commit" => Self::Commit,
            "stop" => Self::Stop,
            "remove" => Self::Remove,
            "port" => Self::Port,
            "freeport" => Self::Freeport,
            "status" => Self::Status,
            "help" => Self::Help,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Stop => "stop",
            Self::Remove => "remove",
            Self::Port => "port",
            Self::Freeport => "freeport",
            Self::Status => "status",
            Self::Help => "help",
        }
    }
}

const HELP: &str = "\
commands run by berth itself (the whole command line is the word):
  commit    save your container as your own image; new containers are made from it
  stop      stop your container now (your open sessions end)
  remove    remove your container (your image stays); the next login makes a fresh one
  port      the port this server's SSH listens on (also $SSH_PORT in every session)
  freeport  a TCP port free right now in your container, for ssh -R PORT:...
  status    your container's state, sessions, daemon mode and image
  help      this text
inside your container:
  daemon    keep your container running when no session is open
  nodaemon  stop it again a few seconds after your last session
  stopnow   stop your container now
";

/// Ports `freeport` picks from (the IANA dynamic range).
const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

impl<R: Runtime> BerthGateway<R> {
    /// The network namespace of `container`'s init, opened. The PID comes from an inspect:
    /// it is checked again after the open (so a recycled PID is never joined), and the host's
    /// own namespace is refused outright.
    async fn container_netns(&self, container: &str) -> Result<ContainerNet, OpenError> {
        use std::os::unix::fs::MetadataExt;
        let not_running = || OpenError("your container is not running".into());
        let pid = self
            .runtime
            .init_pid(container)
            .await
            .ok()
            .flatten()
            .ok_or_else(not_running)?;
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|_| not_running())?;
        let root = std::fs::File::open(format!("/proc/{pid}/root")).map_err(|_| not_running())?;
        if self.runtime.init_pid(container).await.ok().flatten() != Some(pid) {
            return Err(not_running());
        }
        let ino = |f: &std::fs::File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
        let host = std::fs::File::open("/proc/self/ns/net").ok();
        if ino(&ns).is_none() || host.as_ref().and_then(ino) == ino(&ns) {
            error!(
                container,
                "container shares the host's network namespace; forwarding refused"
            );
            return Err(OpenError(
                "forwarding is not available for this container".into(),
            ));
        }
        Ok(ContainerNet { ns, root })
    }

    /// For forwardings: checks the key again, takes a lease (an open forwarding keeps the
    /// container running like a session) and opens the container's network namespace.
    async fn lease_with_pid(
        &self,
        user: &str,
        key: &PublicKey,
    ) -> Result<(Lease, ContainerNet), OpenError> {
        let name = UserName::parse(user).map_err(|_| OpenError("unknown user".into()))?;
        if !self.still_authorized(user, key).await {
            return Err(OpenError("access revoked".into()));
        }
        let lease = self
            .lifecycle
            .acquire(&name)
            .await
            .map_err(|e| OpenError(login_error(&e)))?;
        let ns = self.container_netns(lease.container()).await?;
        Ok((lease, ns))
    }

    /// Runs a host word; returns stdout, stderr and the exit code.
    async fn host_word(&self, user: &UserName, word: HostWord) -> (String, String, u32) {
        let lc = &self.lifecycle;
        let result: Result<(String, String), LifecycleError> = match word {
            HostWord::Help => Ok((HELP.to_owned(), String::new())),
            HostWord::Port => Ok((format!("{}\n", self.port), String::new())),
            HostWord::Commit => lc.commit(user).await.map(|c| {
                (
                    format!("{}\n", c.id),
                    format!(
                        "saved your container as {}; your next new container is made from it\n",
                        c.image
                    ),
                )
            }),
            HostWord::Stop => lc.stop(user).await.map(|stopped| {
                let msg = if stopped {
                    "stopped your container"
                } else {
                    "your container is not running"
                };
                (format!("{msg}\n"), String::new())
            }),
            HostWord::Remove => lc.remove_container(user).await.map(|removed| {
                let msg = if removed {
                    "removed your container; your next login creates a fresh one from your image"
                } else {
                    "you have no container"
                };
                (format!("{msg}\n"), String::new())
            }),
            HostWord::Freeport => self
                .free_port(user)
                .await
                .map(|p| (format!("{p}\n"), String::new())),
            HostWord::Status => self.status(user).await.map(|s| (s, String::new())),
        };
        match result {
            Ok((out, err)) => (out, err, 0),
            Err(e) => {
                error!(user = %user, word = word.as_str(), error = %e, "host-side command failed");
                (
                    String::new(),
                    format!("berth: {} failed: {}\n", word.as_str(), word_error(&e)),
                    1,
                )
            }
        }
    }

    async fn status(&self, user: &UserName) -> Result<String, LifecycleError> {
        let name = self.lifecycle.container_name(user);
        let state = match self.runtime.inspect(&name).await? {
            Some(c) if c.running => "running",
            Some(_) => "stopped",
            None => "absent",
        };
        let store = self.store.clone();
        let u = user.clone();
        let record = blocking(move || store.user(&u)).await?;
        let mut s = format!(
            "container: {name} ({state})\nsessions: {}\ndaemon mode: {}\nimage: {}\n",
            self.lifecycle.sessions(user),
            if record.daemon_mode { "on" } else { "off" },
            record.image
        );
        if let Some(c) = record.committed_image {
            s.push_str(&format!(
                "committed image: {c} (new containers are made from it)\n"
            ));
        }
        Ok(s)
    }

    /// A port in the dynamic range that nothing in the user's container is bound to now
    /// (read from the container's own `/proc/net/tcp*`, seen from the host).
    async fn free_port(&self, user: &UserName) -> Result<u16, LifecycleError> {
        let name = self.lifecycle.container_name(user);
        let used = match self.runtime.init_pid(&name).await? {
            Some(pid) => {
                let mut used = ports_in_use(&format!("/proc/{pid}/net/tcp"));
                used.extend(ports_in_use(&format!("/proc/{pid}/net/tcp6")));
                used
            }
            None => Default::default(),
        };
        let span = u64::from(DYNAMIC_PORTS.end() - DYNAMIC_PORTS.start()) + 1;
        let start = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                % span
        };
        (0..span)
            .filter_map(|i| u16::try_from((start + i) % span).ok())
            .map(|off| DYNAMIC_PORTS.start() + off)
            .find(|p| !used.contains(p))
            .ok_or_else(|| LifecycleError::Runtime(RuntimeError::Docker("no free port".into())))
    }

    /// Picks a free X11 display number (10 and up, as sshd does) in the container and
    /// listens on its TCP port on the container's loopback.
    async fn x11_display(
        &self,
        container: &str,
        x: &X11Request,
    ) -> Result<(u16, tokio::net::TcpListener), OpenError> {
        let valid = !x.auth_protocol.is_empty()
            && x.auth_protocol.len() <= 64
            && x.auth_protocol
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !x.auth_cookie.is_empty()
            && x.auth_cookie.len() <= 256
            && x.auth_cookie.chars().all(|c| c.is_ascii_hexdigit());
        if !valid {
            return Err(OpenError("bad X11 request".into()));
        }
        let net = self.container_netns(container).await?;
        let (n, listener) = in_netns(net.ns, container, || {
            for n in X11_DISPLAYS {
                if let Ok(l) =
                    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 6000 + n))
                {
                    l.set_nonblocking(true)?;
                    return Ok((n, l));
                }
            }
            Err(std::io::Error::other("no free X11 display"))
        })
        .await
        .map_err(|e| OpenError(format!("X11 forwarding failed: {e}")))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| OpenError(format!("X11 forwarding failed: {e}")))?;
        Ok((n, listener))
    }

    fn exec_spec(&self, req: &OpenRequest, display: Option<u16>) -> ExecSpec {
        let with_x11 = |script: &str| match display {
            Some(_) => format!("{X11_PRELUDE}\n{script}"),
            None => script.to_owned(),
        };
        let cmd = match &req.command {
            Command::Shell => vec!["/bin/sh".into(), "-c".into(), with_x11(LOGIN_SHELL)],
            Command::Exec(c) if display.is_some() => vec![
                "/bin/sh".into(),
                "-c".into(),
                with_x11("exec /bin/sh -c \"$1\""),
                "sh".into(),
                c.clone(),
            ],
            Command::Exec(c) => vec!["/bin/sh".into(), "-c".into(), c.clone()],
            Command::Sftp => vec!["/bin/sh".into(), "-c".into(), SFTP_SERVER.into()],
        };
        let mut env = vec![
            "USER=root".to_owned(),
            "LOGNAME=root".to_owned(),
            "HOME=/root".to_owned(),
        ];
        env.push(format!("SSH_PORT={}", self.port));
        if let Some(peer) = req.peer {
            env.push(format!(
                "SSH_CLIENT={} {} {}",
                peer.ip(),
                peer.port(),
                self.port
            ));
        }
        if let Some(pty) = &req.pty {
            env.push(format!("TERM={}", pty.term));
        }
        env.extend(req.env.iter().map(|(k, v)| format!("{k}={v}")));
        if let (Some(n), Some(x)) = (display, &req.x11) {
            env.push(format!("DISPLAY=localhost:{n}.{}", x.screen));
            env.push(format!("BERTH_X11_DISPLAY={n}"));
            env.push(format!("BERTH_X11_PROTO={}", x.auth_protocol));
            env.push(format!("BERTH_X11_COOKIE={}", x.auth_cookie));
        }
        ExecSpec {
            cmd,
            env,
            tty: req.pty.as_ref().map(|p| tty(p.size)),
        }
    }
}

fn tty(size: WindowSize) -> TtySize {
    TtySize {
        cols: size.cols,
        rows: size.rows,
    }
}

/// Removes a file when dropped (a session's agent socket).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A random number for names that must not be guessed or collide (not for keys).
fn random_u64() -> u64 {
    // The kernel's generator does not fail on Linux ≥ 3.17; the time is a last resort.
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    })
}

/// How long a `-L` name lookup in a container may take, all name servers together.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a `-L` connect may take, all addresses together.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A running container's network namespace and root directory, opened from its init.
struct ContainerNet {
    ns: std::fs::File,
    root: std::fs::File,
}

/// Connects to `host:port` from the current network namespace (a container's). `localhost`
/// is that namespace's loopback; other names are resolved as the container resolves them
/// (its `/etc/hosts`, then its name servers), see [`crate::resolve`].
fn connect_from_here(
    root: &std::fs::File,
    host: &str,
    port: u16,
) -> std::io::Result<std::net::TcpStream> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let addrs: Vec<SocketAddr> = if host == "localhost" {
        vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ]
    } else if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        vec![SocketAddr::new(ip, port)]
    } else {
        let deadline = std::time::Instant::now() + RESOLVE_TIMEOUT;
        crate::resolve::resolve_in_container(root, host, deadline)?
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    // One connect budget for all addresses: a thread of the shared pool is held meanwhile.
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    for addr in addrs {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match std::net::TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                s.set_nonblocking(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Local ports of every socket in a `/proc/net/tcp`-format file.
fn ports_in_use(path: &str) -> std::collections::HashSet<u16> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|local| local.rsplit_once(':'))
        .filter_map(|(_, port)| u16::from_str_radix(port, 16).ok())
        .collect()
}

/// Why a host word failed, in words safe for the user.
fn word_error(e: &LifecycleError) -> String {
    match e {
        LifecycleError::NoContainer(_) => e.to_string(),
        LifecycleError::Runtime(RuntimeError::Unavailable(_)) => {
            "the container engine is not available right now; try again later".into()
        }
        LifecycleError::ShuttingDown => "the server is shutting down; try again later".into(),
        LifecycleError::Runtime(_)
        | LifecycleError::Store(_)
        | LifecycleError::Foreign(_)
        | LifecycleError::GuestSocket(_) => {
            "ask the administrator (details are in the berth log)".into()
        }
    }
}

/// A finished "process" made of fixed text, for host words.
fn text_process(out: String, err: String, code: u32, tty: bool) -> Process {
    let fix = |s: String| if tty { s.replace('\n', "\r\n") } else { s };
    let chunks: Vec<std::io::Result<Output>> = [
        Output::Stdout(bytes::Bytes::from(fix(out))),
        Output::Stderr(bytes::Bytes::from(fix(err))),
    ]
    .into_iter()
    .filter(|o| !matches!(o, Output::Stdout(b) | Output::Stderr(b) if b.is_empty()))
    .map(Ok)
    .collect();
    Process {
        x11: None,
        stdin: Box::pin(tokio::io::sink()),
        output: Box::pin(futures_util::stream::iter(chunks)),
        control: Box::new(Exited(code)),
    }
}

struct Exited(u32);

impl ProcessControl for Exited {
    fn resize(&self, _size: WindowSize) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn wait(&mut self) -> BoxFuture<'_, u32> {
        let code = self.0;
        Box::pin(async move { code })
    }
}

/// The one line a user sees when their session cannot start. Details stay in the log.
fn login_error(e: &LifecycleError) -> String {
    match e {
        LifecycleError::Runtime(RuntimeError::Unavailable(_)) => {
            "the container engine is not available right now; try again later".into()
        }
        LifecycleError::Runtime(RuntimeError::ImageNotFound(_)) => {
            "your container's image is missing on this server; ask the administrator".into()
        }
        LifecycleError::Runtime(_) | LifecycleError::Store(_) | LifecycleError::Foreign(_) => {
            "your container could not be started; ask the administrator (details are in the berth log)".into()
        }
        LifecycleError::ShuttingDown => "the server is shutting down; try again later".into(),
        LifecycleError::NoContainer(_) | LifecycleError::GuestSocket(_) => {
            "your container could not be started; ask the administrator (details are in the berth log)".into()
        }
    }
}

fn into_process<R: Runtime>(
    runtime: Arc<R>,
    exec: Exec,
    guard: SharedGuard,
    registration: Registration,
    lease: Lease,
    x11_display: Option<u16>,
) -> Process {
    let Exec {
        handle,
        stdin,
        output,
        ..
    } = exec;
    let output = output.map(|r| {
        r.map(|o| match o {
            RtOutput::Stdout(b) => Output::Stdout(b),
            RtOutput::Stderr(b) => Output::Stderr(b),
        })
        .map_err(std::io::Error::other)
    });
    Process {
        x11: None,
        stdin,
        output: Box::pin(output),
        control: Box::new(ExecControl {
            runtime,
            handle,
            guard,
            registration,
            x11_display,
            _lease: lease,
        }),
    }
}

/// Ties an exec to its session: dropping it (the client left) kills what still runs of the
/// exec and gives the lease back.
struct ExecControl<R: Runtime> {
    runtime: Arc<R>,
    handle: ExecHandle,
    /// Killed on drop unless finished; shared with the session registry (`session kill`).
    guard: SharedGuard,
    registration: Registration,
    /// The session's X11 display, whose cookie is removed when the session ends.
    x11_display: Option<u16>,
    _lease: Lease,
}

impl<R> Drop for ExecControl<R>
where
    R: Runtime,
{
    fn drop(&mut self) {
        let Some(n) = self.x11_display else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let runtime = self.runtime.clone();
        let container = self._lease.container().to_owned();
        rt.spawn(async move {
            let spec = ExecSpec {
                cmd: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("command -v xauth >/dev/null 2>&1 && xauth -q remove unix:{n}"),
                ],
                env: vec!["HOME=/root".into()],
                tty: None,
            };
            if let Ok(mut exec) = runtime.exec(&container, spec).await {
                while exec.output.next().await.is_some() {}
                exec.guard.finished();
            }
        });
    }
}

impl<R: Runtime> ProcessControl for ExecControl<R> {
    fn resize(&self, size: WindowSize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.runtime.resize_exec(&self.handle, tty(size)).await {
                warn!(error = %e, "resize failed");
            }
        })
    }

    fn wait(&mut self) -> BoxFuture<'_, u32> {
        Box::pin(async move {
            match self.runtime.exec_exit_code(&self.handle).await {
                Ok(code) => {
                    if let Ok(mut g) = self.guard.lock() {
                        g.finished();
                    }
                    let code = u32::try_from(code).unwrap_or(255);
                    self.registration.set_exit(code);
                    code
                }
                Err(e) => {
                    warn!(error = %e, "no exit code");
                    255
                }
            }
        })
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn refusals_past_the_budget_are_counted_and_reported_once() {
        let mut b = RefusalBudget::default();
        let written = (0..200).filter(|_| b.take(7).0).count();
        assert_eq!(written, 120);
        assert_eq!(b.take(8), (true, Some(80)));
        assert_eq!(b.take(8), (true, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_words_are_whole_commands_only() {
        assert_eq!(HostWord::parse("commit"), Some(HostWord::Commit));
        assert_eq!(HostWord::parse("  stop \n"), Some(HostWord::Stop));
        for other in [
            "commit now",
            "stop;",
            "Commit",
            "echo stop",
            "",
            "remove -f",
            "help me",
        ] {
            assert_eq!(HostWord::parse(other), None, "{other:?}");
        }
        for w in [
            HostWord::Commit,
            HostWord::Stop,
            HostWord::Remove,
            HostWord::Port,
            HostWord::Freeport,
            HostWord::Status,
            HostWord::Help,
        ] {
            assert_eq!(HostWord::parse(w.as_str()), Some(w));
            assert!(
                HELP.contains(&format!("  {}", w.as_str())),
                "help lacks {}",
                w.as_str()
            );
        }
    }

    #[test]
    fn reads_ports_from_proc_net_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tcp");
        std::fs::write(
            &p,
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 00000000:C350 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n",
        )
        .unwrap();
        let ports = ports_in_use(p.to_str().unwrap());
        assert_eq!(ports, [8080, 50000].into_iter().collect());
        assert!(ports_in_use("/nonexistent").is_empty());
    }

    #[tokio::test]
    async fn text_process_uses_crlf_on_a_tty() {
        let p = text_process("a\nb\n".into(), String::new(), 0, true);
        let chunks: Vec<_> = p.output.collect::<Vec<_>>().await;
        assert_eq!(chunks.len(), 1);
        assert!(matches!(&chunks[0], Ok(Output::Stdout(b)) if b.as_ref() == b"a\r\nb\r\n"));
    }
}
