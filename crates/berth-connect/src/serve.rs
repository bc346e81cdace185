//! The laptop's end: answers the daemon's requests on one directory (after the handshake,
//! which the CLI does).
//!
//! ```text
//!  wire ──► loop ── Request, nothing else in flight ──► fs::Fs::op, here ──────────► wire
//!             ├──── Request ──► blocking thread: fs::Fs::op ──► reply queue ──► loop ──► wire
//!             │  (a place among WORKERS, or among WAITERS for a FIFO read/write)
//!             └─ end of stream / malformed frame ─► cancel FIFO waits, let the rest finish,
//!                                                   flush the replies (bounded), return
//! ```
//!
//! Requests are served concurrently and answered as they finish, so one slow file does not
//! hold the rest (a request that comes while none is being served is done by the loop
//! itself: the common case of one process's calls one after another, without two hops
//! between threads; an `fsync` or a FIFO's read or write never is); what is in flight is bounded by the places, what is open by
//! [`fs::MAX_HANDLES`], what is read at once by [`crate::proto::MAX_IO`]. Confinement to the
//! directory is [`fs`]'s.

mod fs;

pub use fs::MAX_HANDLES;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use nix::errno::Errno;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedWrite, LengthDelimitedCodec};

use crate::client::{Wire, WireError};
use crate::proto::{self, Op, ToDaemon, ToLaptop};

/// Ordinary requests (each a few syscalls on a blocking thread) served at once.
pub const WORKERS: usize = 16;

/// Reads and writes waiting on a FIFO at once (in `poll`, cancelled when serving ends); they
/// take none of the [`WORKERS`] places, so pipes nobody feeds never stall the rest.
pub const WAITERS: usize = 64;

/// How long the replies still due may take to be written once the daemon has closed its
/// side (or sent nonsense).
const FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// Why serving ended other than by the daemon closing the stream.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the directory: {0}")]
    Root(Errno),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the daemon sent {0} after the handshake")]
    Unexpected(&'static str),
}

/// Opens `dir` the way [`serve`] takes it (`O_PATH | O_DIRECTORY`; symlinks in `dir`
/// itself are followed: it is what the user named).
pub fn open_root(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
}

/// Serves `root` (from [`open_root`]) on `wire` until the daemon closes the stream
/// (`Ok`) or sends something that is not a request (`Err`). Every path the daemon names is
/// resolved beneath `root` as if it were `/`.
pub async fn serve<R, W>(root: std::fs::File, wire: Wire<R, W>) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    // Closing the write end hangs up the read end, which every FIFO wait polls.
    let (hangup_rx, hangup_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ServeError::Wire(WireError::Io(e.into())))?;
    let fs = Arc::new(fs::Fs::new(OwnedFd::from(root), hangup_rx).map_err(ServeError::Root)?);
    let Wire { mut rx, mut tx } = wire;
    let (replies, mut queued) = mpsc::channel::<Bytes>(WORKERS + WAITERS);
    let workers = Arc::new(Semaphore::new(WORKERS));
    let waiters = Arc::new(Semaphore::new(WAITERS));
    let mut tasks = JoinSet::new();
    let end = loop {
        let frame = tokio::select! {
            // Answers from the blocking threads go out as they come.
            Some(first) = queued.recv() => match send(&mut tx, first, &mut queued).await {
                Ok(()) => continue,
                Err(e) => break Err(ServeError::Wire(WireError::Io(e))),
            },
            // Reaps finished requests so the set stays as small as what is in flight.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            frame = rx.next() => frame,
        };
        let msg = frame.map(|f| -> Result<ToLaptop, WireError> { Ok(proto::decode(&f?)?) });
        let (id, op) = match msg {
            None => break Ok(()),
            Some(Err(e)) => break Err(ServeError::Wire(e)),
            Some(Ok(ToLaptop::Request { id, op })) => (id, op),
            Some(Ok(ToLaptop::Welcome { .. })) => break Err(ServeError::Unexpected("Welcome")),
            Some(Ok(ToLaptop::Refused { .. })) => break Err(ServeError::Unexpected("Refused")),
        };
        let may_wait = fs.may_wait(&op);
        if tasks.is_empty() && !may_wait && !matches!(op, Op::Fsync { .. }) {
            // Nothing else is being served: done here, without two hops between threads
            // (to a blocking thread and back), as one request after another (`git status`,
            // `make`) comes. Requests that overlap go to the blocking threads.
            let reply = answer(&fs, id, op);
            match send(&mut tx, reply, &mut queued).await {
                Ok(()) => continue,
                Err(e) => break Err(ServeError::Wire(WireError::Io(e))),
            }
        }
        let places = if may_wait { &waiters } else { &workers };
        // While every place is taken, answers still go out (the queue holds one per place).
        let place = loop {
            tokio::select! {
                place = places.clone().acquire_owned() => break Ok(place),
                Some(first) = queued.recv() => {
                    if let Err(e) = send(&mut tx, first, &mut queued).await {
                        break Err(e);
                    }
                }
            }
        };
        let place = match place {
            Ok(Ok(place)) => place,
            // The places are never closed.
            Ok(Err(_)) => break Ok(()),
            Err(e) => break Err(ServeError::Wire(WireError::Io(e))),
        };
        let fs = fs.clone();
        let replies = replies.clone();
        tasks.spawn_blocking(move || {
            let reply = answer(&fs, id, op);
            // Fails only once serving has ended; the reply has nowhere to go then.
            let _ = replies.blocking_send(reply);
            drop(place);
        });
    };
    // Every FIFO wait ends (closing the write end hangs up the read end they poll); the
    // queue ends once the last request has replied. What is still due is written, within a
    // bound (a daemon that stopped reading does not keep us).
    drop(replies);
    drop(hangup_tx);
    let flush = async {
        while let Some(first) = queued.recv().await {
            send(&mut tx, first, &mut queued).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let flushed = tokio::time::timeout(FLUSH_LIMIT, flush).await;
    drop(tasks);
    match flushed {
        Ok(Err(e)) if end.is_ok() => Err(ServeError::Wire(WireError::Io(e))),
        _ => end,
    }
}

/// The reply frame to request `id`.
fn answer(fs: &fs::Fs, id: u64, op: Op) -> Bytes {
    let result = fs.op(op).map_err(|e| e as i32);
    let reply = proto::encode(&ToDaemon::Reply { id, result }).unwrap_or_else(|_| {
        proto::encode(&ToDaemon::Reply {
            id,
            result: Err(libc::EIO),
        })
        .unwrap_or_default()
    });
    Bytes::from(reply)
}

/// Writes `first` and whatever else is queued already, in one flush.
async fn send<W>(
    tx: &mut FramedWrite<W, LengthDelimitedCodec>,
    first: Bytes,
    queued: &mut mpsc::Receiver<Bytes>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    tx.feed(first).await?;
    while let Ok(frame) = queued.try_recv() {
        tx.feed(frame).await?;
    }
    SinkExt::<Bytes>::flush(tx).await
}
