//! Berth's answer to the SSH gateway's questions: may this key log in as this user, may she
//! use this forwarding, and run this session in her container.
//!
//! Where a change goes:
//! - who may do what (keys, certificates, switches) and the audit of it: this file;
//! - a host word (`commit`, `status`, ...): [`words`];
//! - a forwarding kind (`-L`/`-R` to ports and Unix sockets, agent, X11 displays): [`forward`];
//! - how a session's process is started in the container and driven: [`process`].

mod connect;
mod forward;
pub use connect::Mounts;
mod process;
mod words;

use std::sync::Arc;

use berth_proto::{ForwardingInfo, PublicKey, UserName, fingerprint};
use berth_runtime::Runtime;
use berth_ssh::{
    AgentListener, Connected, Gateway, OpenError, OpenRequest, Permission, Process, RemoteListener,
    SocketListener, SocketTunnel, Tunnel,
};
use tracing::{info, warn};

use crate::audit::{CertificateFields, Event};
use crate::lifecycle::{Lease, Lifecycle};
use crate::store::AsyncStore;

pub use words::HostWord;

pub struct BerthGateway<R> {
    pub store: AsyncStore,
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
    /// Authenticated connections, for revocation.
    pub connections: Arc<crate::connections::Connections>,
    /// `berth connect` mounts open now.
    pub mounts: Arc<Mounts>,
}

/// A user name the SSH layer passed on; it authenticated, so it parses, but nothing is
/// assumed.
fn user_name(user: &str) -> Result<UserName, OpenError> {
    UserName::parse(user).map_err(|_| OpenError("unknown user".into()))
}

fn peer_text(peer: Option<std::net::SocketAddr>) -> String {
    peer.map_or_else(|| "-".to_owned(), |p| p.to_string())
}

/// Whether `key` is one of `user`'s and not revoked: the login check.
async fn key_authorized(
    store: &AsyncStore,
    certs: &crate::certs::Certs,
    user: &str,
    key: &PublicKey,
) -> bool {
    if UserName::parse(user).is_err() || certs.key_revoked(key.key_data()) {
        return false;
    }
    match store.key_authorized(user, &fingerprint(key)).await {
        Ok(ok) => ok,
        Err(e) => {
            tracing::error!(user, error = %e, "key lookup failed");
            false
        }
    }
}

/// The check at every session open or forward on an open connection: the key is still one
/// of the user's, or the certificate it logged in with is still valid, not revoked, and its
/// user still exists. (Never used to log in: a certificate's key alone, without the
/// certificate and its source-address, is not a credential.)
async fn still_authorized(
    store: &AsyncStore,
    certs: &crate::certs::Certs,
    user: &str,
    key: &PublicKey,
) -> bool {
    if key_authorized(store, certs, user, key).await {
        return true;
    }
    if !certs.recheck(user, key, unix_now()) {
        return false;
    }
    match UserName::parse(user) {
        Ok(name) => store.exists(&name).await,
        Err(_) => false,
    }
}

impl<R: Runtime> BerthGateway<R> {
    async fn still_authorized(&self, user: &str, key: &PublicKey) -> bool {
        still_authorized(&self.store, &self.certs, user, key).await
    }

    /// What every use of an open connection starts with: the user, still authorized.
    async fn authorized_user(&self, user: &str, key: &PublicKey) -> Result<UserName, OpenError> {
        let name = user_name(user)?;
        if !self.still_authorized(user, key).await {
            return Err(OpenError("access revoked".into()));
        }
        Ok(name)
    }

    /// A lease on the user's running container (it keeps running while the lease lives).
    async fn lease(&self, user: &UserName) -> Result<Lease, OpenError> {
        self.lifecycle.acquire(user).await.map_err(|e| {
            warn!(user = %user, error = %e, "no running container");
            OpenError(e.for_user())
        })
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

impl<R: Runtime> BerthGateway<R> {
    /// Whether a refused login may be written down now (see [`RefusalBudget`]).
    fn refusal_budget(&self) -> bool {
        let minute = unix_now() / 60;
        let (write, over) = self
            .refusals
            .lock()
            .map_or((true, None), |mut b| b.take(minute));
        if let Some(count) = over {
            self.lifecycle
                .audit()
                .record(Event::LoginRefusedSuppressed { count });
        }
        write
    }
}

impl<R: Runtime> Gateway for BerthGateway<R> {
    fn event(&self, event: berth_ssh::Event<'_>) {
        // Names and targets are whatever the client sent: bounded before they are written.
        let bounded = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        let record = match event {
            berth_ssh::Event::LoginAccepted {
                user,
                key,
                peer,
                certificate,
            } => Event::LoginAccepted {
                user: bounded(user, 64),
                key: fingerprint(key),
                peer: peer_text(peer),
                certificate: certificate.map(|c| CertificateFields {
                    cert_key_id: bounded(c.key_id(), 256),
                    cert_serial: c.serial(),
                    cert_ca: c
                        .signature_key()
                        .fingerprint(berth_ssh::ssh_key::HashAlg::Sha256)
                        .to_string(),
                }),
            },
            berth_ssh::Event::LoginRefused { user, key, peer } => {
                if !self.refusal_budget() {
                    return;
                }
                Event::LoginRefused {
                    user: bounded(user, 64),
                    key: fingerprint(key),
                    peer: peer_text(peer),
                }
            }
            berth_ssh::Event::Forward {
                user,
                kind,
                target,
                refused,
            } => match refused {
                None => Event::ForwardOpen {
                    user: bounded(user, 64),
                    kind: kind.as_str(),
                    target: bounded(target, 256),
                },
                Some(reason) => Event::ForwardRefused {
                    user: bounded(user, 64),
                    kind: kind.as_str(),
                    target: bounded(target, 256),
                    reason: bounded(reason, 256),
                },
            },
            berth_ssh::Event::LimitReached { user, what } => Event::LimitReached {
                user: bounded(user, 64),
                what,
            },
        };
        self.lifecycle.audit().record(record);
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
        if !self.store.exists(&name).await {
            return false;
        }
        self.certs.remember(user, certificate, now);
        true
    }

    fn connected(&self, user: &str, key: &PublicKey) -> Connected {
        let hold = UserName::parse(user).ok().and_then(|name| {
            self.lifecycle
                .hold(&name)
                .inspect_err(|e| warn!(user, error = %e, "no connection hold"))
                .ok()
        });
        let (registered, revoked) = self.connections.register(user, &fingerprint(key));
        // The key or the user may have been removed between the authentication and the
        // registration: checked once more, off the login's path.
        let (store, certs) = (self.store.clone(), self.certs.clone());
        let (user, key, token) = (user.to_owned(), key.clone(), revoked.clone());
        tokio::spawn(async move {
            if !still_authorized(&store, &certs, &user, &key).await {
                token.cancel();
            }
        });
        Connected {
            hold: Box::new((hold, registered)),
            revoked,
        }
    }

    async fn permits(&self, user: &str, what: Permission) -> bool {
        let Ok(name) = UserName::parse(user) else {
            return false;
        };
        let Ok(record) = self.store.user(&name).await else {
            return false;
        };
        let f = effective_forwarding(self.forwarding, record.forwarding);
        match what {
            // One switch for ports and sockets, like a firewall rule would not tell them apart.
            Permission::TcpForwarding | Permission::SocketForwarding => f.tcp,
            Permission::AgentForwarding => f.agent,
            Permission::X11Forwarding => f.x11,
        }
    }

    async fn authorize(&self, user: &str, key: &PublicKey) -> bool {
        key_authorized(&self.store, &self.certs, user, key).await
    }

    async fn listen(
        &self,
        user: &str,
        key: &PublicKey,
        port: u16,
    ) -> Result<RemoteListener, OpenError> {
        let user = self.authorized_user(user, key).await?;
        self.listen_tcp(&user, port).await
    }

    async fn agent_listener(&self, user: &str) -> Result<AgentListener, OpenError> {
        let user = user_name(user)?;
        self.agent_socket(&user).await
    }

    async fn connect(
        &self,
        user: &str,
        key: &PublicKey,
        host: &str,
        port: u16,
    ) -> Result<Tunnel, OpenError> {
        let user = self.authorized_user(user, key).await?;
        self.connect_tcp(&user, host, port).await
    }

    async fn connect_socket(
        &self,
        user: &str,
        key: &PublicKey,
        path: &str,
    ) -> Result<SocketTunnel, OpenError> {
        let user = self.authorized_user(user, key).await?;
        self.connect_unix(&user, path).await
    }

    async fn listen_socket(
        &self,
        user: &str,
        key: &PublicKey,
        path: &str,
    ) -> Result<SocketListener, OpenError> {
        let user = self.authorized_user(user, key).await?;
        self.listen_unix(&user, path).await
    }

    async fn open(&self, req: OpenRequest) -> Result<Process, OpenError> {
        let (user, peer) = (req.user.clone(), req.peer);
        let opened = self.open_session(req).await;
        if let Err(e) = &opened {
            self.lifecycle.audit().record(Event::SessionRefused {
                user,
                peer: peer_text(peer),
                reason: e.0.clone(),
            });
        }
        opened
    }
}

#[cfg(test)]
mod tests {
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
