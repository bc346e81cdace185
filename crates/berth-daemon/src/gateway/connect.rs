//! The daemon's side of `berth connect`: the `berth-connect@berth` subsystem. Nothing runs
//! in the container. The client's first message names the path; the daemon makes a FUSE
//! mount that no host path shows, attaches it at that path in the user's container (see
//! `berth_runtime::mount`), answers, and serves the kernel's requests for it by asking the
//! laptop ([`crate::connect`]). The mount lives exactly as long as the channel: when the
//! laptop goes, the FUSE connection is aborted (processes on it get `ENOTCONN`) and the mount
//! is taken out of the container.
//!
//! The laptop is the user's, but untrusted like any client: its hello has a deadline, every
//! request one ([`REQUEST_DEADLINE`]), requests in flight and frames are bounded (the
//! client's), and a user holds at most [`MOUNTS_PER_USER`] mounts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_connect::client::{Client, Wire};
use berth_connect::proto::{self, ToDaemon, ToLaptop};
use berth_proto::UserName;
use berth_runtime::Runtime;
use berth_ssh::{OpenError, OpenRequest, Output, Process, ProcessControl, WindowSize};
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::BerthGateway;
use crate::audit::Event;
use crate::lifecycle::Lease;

/// How long the laptop has to say which directory, once the subsystem started.
const HELLO_WAIT: Duration = Duration::from_secs(30);
/// How long one request to the laptop may take before the process waiting on it gets `EIO`.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// How long taking a mount out of the container may take.
const DETACH_WAIT: Duration = Duration::from_secs(10);
/// Mounts one user may hold at once (each is a FUSE connection and a thread).
pub const MOUNTS_PER_USER: usize = 8;
/// Bytes buffered between the channel and the mount's wire on the way in (on the way out
/// the pipe carries only the handshake's answer; requests are queued whole: [`Coalesce`]).
const PIPE: usize = 256 * 1024;
/// The most of the mount's small frames joined into one message for the channel (and of
/// the handshake one read of the pipe takes): 32 KiB, one packet of OpenSSH's size. Small
/// frames sent one by one made a packet each where one would do.
const OUTPUT_READ: usize = 32 * 1024;

/// What the channel sends of a mount: the handshake's answer from the pipe (which the job
/// closes after it), then the requests from the queue, until the job ends (`done`): a copy
/// of its client that some thread still holds then keeps no channel open.
fn mount_output(
    pipe: impl tokio::io::AsyncRead + Send + 'static,
    queued: mpsc::Receiver<Bytes>,
    done: CancellationToken,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    tokio_util::io::ReaderStream::with_capacity(pipe, OUTPUT_READ).chain(
        Coalesce::new(queued)
            .take_until(done.cancelled_owned())
            .map(Ok),
    )
}

/// The mount's queued frames as the channel takes them: a large frame (a write's) as it is,
/// small ones ready together joined up to [`OUTPUT_READ`], one message and so one packet
/// where each alone would make its own (as the pipe's reads joined them).
struct Coalesce {
    queued: mpsc::Receiver<Bytes>,
    /// A frame taken that did not fit with the ones before it.
    held: Option<Bytes>,
}

impl Coalesce {
    fn new(queued: mpsc::Receiver<Bytes>) -> Self {
        Self { queued, held: None }
    }
}

impl futures_util::Stream for Coalesce {
    type Item = Bytes;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        let this = &mut *self;
        let first = match this.held.take() {
            Some(b) => b,
            None => match std::task::ready!(this.queued.poll_recv(cx)) {
                Some(b) => b,
                None => return std::task::Poll::Ready(None),
            },
        };
        if first.len() >= OUTPUT_READ {
            return std::task::Poll::Ready(Some(first));
        }
        let mut joined: Option<BytesMut> = None;
        let mut len = first.len();
        while let Ok(next) = this.queued.try_recv() {
            if len + next.len() > OUTPUT_READ {
                this.held = Some(next);
                break;
            }
            len += next.len();
            joined
                .get_or_insert_with(|| {
                    let mut j = BytesMut::with_capacity(OUTPUT_READ);
                    j.extend_from_slice(&first);
                    j
                })
                .extend_from_slice(&next);
        }
        std::task::Poll::Ready(Some(joined.map_or(first, BytesMut::freeze)))
    }
}

/// The mounts open now, per user, and their FUSE connections.
#[derive(Default)]
pub struct Mounts {
    by_user: Mutex<HashMap<String, usize>>,
    /// Every connection this daemon serves, from its making to its end: a mount of ours
    /// found in a container with another is one an earlier daemon left.
    live: Arc<Mutex<std::collections::HashSet<u32>>>,
}

/// Keeps a connection among the live ones while it lives.
struct Serving {
    live: Arc<Mutex<std::collections::HashSet<u32>>>,
    connection: u32,
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&self.connection);
        }
    }
}

impl Mounts {
    fn serving(&self, c: berth_runtime::mount::FuseConnection) -> Serving {
        if let Ok(mut live) = self.live.lock() {
            live.insert(c.0);
        }
        Serving {
            live: self.live.clone(),
            connection: c.0,
        }
    }

    fn is_live(&self) -> berth_runtime::mount::Live {
        let live = self.live.clone();
        Arc::new(move |c| live.lock().map_or(true, |l| l.contains(&c.0)))
    }

    fn take(self: &Arc<Self>, user: &str) -> Option<MountSlot> {
        let mut m = self.by_user.lock().ok()?;
        let n = m.entry(user.to_owned()).or_default();
        if *n >= MOUNTS_PER_USER {
            return None;
        }
        *n += 1;
        Some(MountSlot {
            mounts: self.clone(),
            user: user.to_owned(),
        })
    }
}

struct MountSlot {
    mounts: Arc<Mounts>,
    user: String,
}

impl Drop for MountSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.mounts.by_user.lock()
            && let Some(n) = m.get_mut(&self.user)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

impl<R: Runtime> BerthGateway<R> {
    /// The subsystem's "process": a task in the daemon whose stdin and stdout are the
    /// channel.
    pub(super) async fn open_connect(
        &self,
        user: &UserName,
        req: &OpenRequest,
    ) -> Result<Process, OpenError> {
        let lease = self.lease(user).await?;
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let (their_read, their_write) = tokio::io::split(theirs);
        // The mount's requests, each one whole frame, go to the channel as they were
        // encoded (no copy through the pipe); as many wait as the client has in flight.
        let (frames, queued) = mpsc::channel(berth_connect::client::MAX_IN_FLIGHT);
        let cancel = CancellationToken::new();
        let registration = self.sessions.register_cancellable(
            user.as_str(),
            req.peer,
            "berth connect".into(),
            cancel.clone(),
        );
        let job = Job {
            runtime: self.runtime.clone(),
            lifecycle: self.lifecycle.clone(),
            mounts: self.mounts.clone(),
            user: user.as_str().to_owned(),
            describer: registration.describer(),
        };
        // Cancelled as the job's task ends, however it ends (returned, killed, aborted).
        let done = CancellationToken::new();
        let ended = done.clone().drop_guard();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ended = ended;
            tokio::select! {
                code = job.run(ours, frames, lease) => code,
                () = cancel.cancelled() => 1,
            }
        }));
        let output = mount_output(their_read, queued, done).map(|r| r.map(Output::Stdout));
        Ok(Process {
            x11: None,
            stdin: Box::pin(their_write),
            stdin_now: None,
            output_now: None,
            output: Box::pin(output),
            control: Box::new(ConnectControl {
                task: Some(task),
                _registration: registration,
            }),
        })
    }
}

/// What a mount needs from the gateway, owned by its task.
struct Job<R: Runtime> {
    runtime: Arc<R>,
    lifecycle: Arc<crate::lifecycle::Lifecycle<R>>,
    mounts: Arc<Mounts>,
    user: String,
    /// Shows the mount's path in `session list` once it is known.
    describer: crate::sessions::Describer,
}

impl<R: Runtime> Job<R> {
    /// Serves one mount until the laptop goes; returns the subsystem's exit code.
    async fn run(self, pipe: DuplexStream, frames: mpsc::Sender<Bytes>, lease: Lease) -> u32 {
        let (r, w) = tokio::io::split(pipe);
        let mut wire = Wire::new(r, w);
        let path = match tokio::time::timeout(HELLO_WAIT, wire.recv::<ToDaemon>()).await {
            Ok(Ok(Some(ToDaemon::Hello { version, path }))) if version == proto::VERSION => path,
            Ok(Ok(Some(ToDaemon::Hello { version, .. }))) => {
                let reason = format!(
                    "this server speaks berth connect version {}, yours {version}: use the same Berth release on both sides",
                    proto::VERSION
                );
                return refuse(&mut wire, reason).await;
            }
            // Silence, nonsense or nothing: there is nobody to tell.
            _ => return 1,
        };
        let at = match berth_connect::target::check(&path) {
            Ok(p) => p,
            Err(e) => return refuse(&mut wire, e.0).await,
        };
        let Some(_slot) = self.mounts.take(&self.user) else {
            self.lifecycle.audit().record(Event::LimitReached {
                user: self.user.clone(),
                what: "mounts",
            });
            let reason = format!("you have {MOUNTS_PER_USER} directories mounted already");
            return refuse(&mut wire, reason).await;
        };
        let mounted = match self.mount(lease.container(), &at).await {
            Ok(m) => m,
            Err(reason) => return refuse(&mut wire, reason).await,
        };
        if wire
            .send(&ToLaptop::Welcome {
                version: proto::VERSION,
            })
            .await
            .is_err()
        {
            detach(mounted.attached, &self.user).await;
            return 1;
        }
        let shown = at.display().to_string();
        self.lifecycle.audit().record(Event::MountStart {
            user: self.user.clone(),
            path: shown.clone(),
        });
        info!(user = %self.user, path = ?shown, "directory mounted");
        self.describer.describe(format!("berth connect {shown:?}"));
        let _end = Ended {
            lifecycle: self.lifecycle.clone(),
            user: self.user.clone(),
            path: shown,
        };
        // The pipe's way out ends with the handshake (its reader then takes the queue).
        let Wire { rx, mut tx } = wire;
        if SinkExt::<Bytes>::close(&mut tx).await.is_err() {
            detach(mounted.attached, &self.user).await;
            return 1;
        }
        let (client, driver) = Client::start_queued(rx, frames, REQUEST_DEADLINE);
        let fs = crate::connect::ConnectFs::new(
            client,
            tokio::runtime::Handle::current(),
            (mounted.owner.uid, mounted.owner.gid),
        );
        let conn = mounted.attached.connection();
        let serving = match crate::connect::run(fs, mounted.dev, conn) {
            Ok(s) => s,
            Err(e) => {
                warn!(user = %self.user, error = %e, "the mount's file system did not start");
                detach(mounted.attached, &self.user).await;
                return 1;
            }
        };
        // Until the laptop goes (or the session is killed, which drops this future: then
        // `serving` aborts the connection and `Attached` takes the mount out as they drop).
        driver.await;
        detach(mounted.attached, &self.user).await;
        drop(serving);
        0
    }

    /// Makes the FUSE mount and attaches it at `at` in the container; the error is one line
    /// for the user.
    async fn mount(&self, container: &str, at: &std::path::Path) -> Result<Mounted, String> {
        let init = match self.runtime.open_init(container).await {
            Ok(Some(init)) => init,
            Ok(None) => return Err("your container is not running".into()),
            Err(e) => {
                warn!(user = %self.user, error = %e, "connect: cannot reach the container");
                return Err("your container cannot be reached".into());
            }
        };
        let owner = init
            .root_owner()
            .ok_or_else(|| "your container is not running".to_owned())?;
        let (dev, detached) =
            berth_runtime::mount::fuse_mount(&berth_runtime::mount::FuseOptions {
                owner,
                root_perms: 0o755,
                max_read: Some(proto::MAX_IO),
                source: format!("berth-connect:{}", self.user),
            })
            .map_err(|e| {
                warn!(user = %self.user, error = %e, "connect: no FUSE mount");
                "this server cannot make FUSE mounts (see the daemon's log)".to_owned()
            })?;
        let serving = self.mounts.serving(detached.connection());
        let live = self.mounts.is_live();
        let attached = berth_runtime::mount::attach(&init, &self.user, detached, at, live)
            .await
            .map_err(|e| format!("cannot mount at {}: {e}", at.display()))?;
        Ok(Mounted {
            dev,
            attached,
            owner,
            _serving: serving,
        })
    }
}

struct Mounted {
    dev: std::os::fd::OwnedFd,
    attached: berth_runtime::mount::Attached,
    owner: berth_runtime::RootOwner,
    _serving: Serving,
}

/// Aborts the FUSE connection (whatever waits on it gets `ENOTCONN`), then takes the mount
/// out of the container.
async fn detach(attached: berth_runtime::mount::Attached, user: &impl std::fmt::Display) {
    if let Err(e) = attached.connection().abort() {
        debug!(error = %e, "connect: the FUSE connection was already gone");
    }
    match tokio::time::timeout(DETACH_WAIT, attached.detach()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(user = %user, error = %e, "connect: the mount was not taken out"),
        Err(_) => warn!(user = %user, "connect: taking the mount out did not finish in time"),
    }
}

async fn refuse<R, W>(wire: &mut Wire<R, W>, reason: String) -> u32
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    debug!(reason, "connect refused");
    let _ = tokio::time::timeout(HELLO_WAIT, wire.send(&ToLaptop::Refused { reason })).await;
    1
}

/// Records the end of a mount however it ends (the laptop went, the session was killed).
struct Ended<R: Runtime> {
    lifecycle: Arc<crate::lifecycle::Lifecycle<R>>,
    user: String,
    path: String,
}

impl<R: Runtime> Drop for Ended<R> {
    fn drop(&mut self) {
        self.lifecycle.audit().record(Event::MountEnd {
            user: std::mem::take(&mut self.user),
            path: std::mem::take(&mut self.path),
        });
    }
}

/// Dropping it before the end (the client went) aborts the mount's task, whose parts take
/// the mount down as they drop.
struct ConnectControl {
    task: Option<AbortOnDropHandle<u32>>,
    _registration: crate::sessions::Registration,
}

impl ProcessControl for ConnectControl {
    fn resize(&self, _size: WindowSize) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn wait(&mut self) -> BoxFuture<'_, u32> {
        Box::pin(async move {
            match self.task.take() {
                Some(t) => t.await.unwrap_or(1),
                None => 1,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn queued_frames_go_whole_and_small_ones_together() {
        let (tx, rx) = mpsc::channel(16);
        let big = Bytes::from(vec![1u8; OUTPUT_READ + 1]);
        let small = |b: u8, n: usize| Bytes::from(vec![b; n]);
        tx.send(small(2, 10)).await.unwrap();
        tx.send(small(3, 20)).await.unwrap();
        tx.send(big.clone()).await.unwrap();
        tx.send(small(4, OUTPUT_READ - 5)).await.unwrap();
        tx.send(small(5, 5)).await.unwrap();
        tx.send(small(6, 1)).await.unwrap();
        drop(tx);
        let got: Vec<Bytes> = Coalesce::new(rx).collect().await;
        let mut first = vec![2u8; 10];
        first.extend_from_slice(&[3u8; 20]);
        let mut fourth = vec![4u8; OUTPUT_READ - 5];
        fourth.extend_from_slice(&[5u8; 5]);
        // The small ones before the large frame are joined; the large one goes alone (it
        // would not fit); the last that does not fit comes next, whole and in order.
        assert_eq!(
            got,
            vec![
                Bytes::from(first),
                Bytes::from(vec![1u8; OUTPUT_READ + 1]),
                Bytes::from(fourth),
                small(6, 1)
            ]
        );
    }

    #[tokio::test]
    async fn a_queue_with_nothing_ready_waits_and_ends_with_its_sender() {
        let (tx, rx) = mpsc::channel(4);
        let mut out = Coalesce::new(rx);
        let next = tokio::spawn(async move {
            let first = out.next().await;
            (first, out.next().await)
        });
        tokio::task::yield_now().await;
        tx.send(Bytes::from_static(b"abc")).await.unwrap();
        drop(tx);
        let (first, end) = next.await.unwrap();
        assert_eq!(first, Some(Bytes::from_static(b"abc")));
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn the_output_is_the_handshake_then_the_queue_until_the_job_ends() {
        let (mut ours, theirs) = tokio::io::duplex(1024);
        let (frames, queued) = mpsc::channel(4);
        let done = CancellationToken::new();
        let mut out = Box::pin(mount_output(theirs, queued, done.clone()));
        // A request queued before the handshake's answer is over waits for it.
        frames.send(Bytes::from_static(b"request")).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut ours, b"welcome")
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut ours).await.unwrap();
        assert_eq!(out.next().await.unwrap().unwrap(), &b"welcome"[..]);
        assert_eq!(out.next().await.unwrap().unwrap(), &b"request"[..]);
        // The job ends while a copy of its client (the queue's sender) lives on.
        done.cancel();
        assert!(out.next().await.is_none());
        drop(frames);
    }

    #[test]
    fn the_subsystem_name_is_the_one_the_laptop_asks_for() {
        assert_eq!(
            berth_ssh::CONNECT_SUBSYSTEM,
            berth_connect::proto::SUBSYSTEM
        );
    }
}
