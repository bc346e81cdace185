//! The laptop's end: answers the daemon's requests on one directory (after the handshake,
//! which the CLI does).
//!
//! ```text
//!  wire ──► reader ── Request ──► blocking thread: fs::Fs::op ──► reply queue ──► writer ──► wire
//!             │  (a place among WORKERS, or among WAITERS for a FIFO read/write)
//!             └─ end of stream / malformed frame ─► cancel FIFO waits, let the rest finish,
//!                                                   flush the replies (bounded), return
//! ```
//!
//! Requests are served concurrently and answered as they finish, so one slow file does not
//! hold the rest; what is in flight is bounded by the places, what is open by
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

use crate::client::{Wire, WireError};
use crate::proto::{self, ToDaemon, ToLaptop};

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

    let writer = async move {
        while let Some(frame) = queued.recv().await {
            // Whatever else is ready goes out in the same flush.
            tx.feed(frame).await?;
            while let Ok(frame) = queued.try_recv() {
                tx.feed(frame).await?;
            }
            SinkExt::<Bytes>::flush(&mut tx).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let reader = async move {
        let workers = Arc::new(Semaphore::new(WORKERS));
        let waiters = Arc::new(Semaphore::new(WAITERS));
        let mut tasks = JoinSet::new();
        let end = loop {
            let frame = tokio::select! {
                frame = rx.next() => frame,
                // Reaps finished requests so the set stays as small as what is in flight.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            let msg = frame.map(|f| -> Result<ToLaptop, WireError> { Ok(proto::decode(&f?)?) });
            let (id, op) = match msg {
                None => break Ok(()),
                Some(Err(e)) => break Err(ServeError::Wire(e)),
                Some(Ok(ToLaptop::Request { id, op })) => (id, op),
                Some(Ok(ToLaptop::Welcome { .. })) => break Err(ServeError::Unexpected("Welcome")),
                Some(Ok(ToLaptop::Refused { .. })) => break Err(ServeError::Unexpected("Refused")),
            };
            let place = if fs.may_wait(&op) {
                // A FIFO's wait takes a place only if one is free: the reader never waits
                // for one, or FIFOs nobody feeds would hold every other request back.
                match waiters.clone().try_acquire_owned() {
                    Ok(place) => place,
                    Err(_) => {
                        let busy = proto::encode(&ToDaemon::Reply {
                            id,
                            result: Err(libc::EAGAIN),
                        })
                        .unwrap_or_default();
                        if replies.send(Bytes::from(busy)).await.is_err() {
                            break Ok(());
                        }
                        continue;
                    }
                }
            } else {
                let Ok(place) = workers.clone().acquire_owned().await else {
                    break Ok(());
                };
                place
            };
            let fs = fs.clone();
            let replies = replies.clone();
            tasks.spawn_blocking(move || {
                let result = fs.op(op).map_err(|e| e as i32);
                let reply = proto::encode(&ToDaemon::Reply { id, result }).unwrap_or_else(|_| {
                    proto::encode(&ToDaemon::Reply {
                        id,
                        result: Err(libc::EIO),
                    })
                    .unwrap_or_default()
                });
                // Fails only once serving has ended; the reply has nowhere to go then.
                let _ = replies.blocking_send(Bytes::from(reply));
                drop(place);
            });
        };
        // The queue ends (and the writer with it) once the last request has replied.
        drop(replies);
        drop(hangup_tx);
        while tasks.join_next().await.is_some() {}
        end
    };

    let mut writer = std::pin::pin!(writer);
    let mut reader = std::pin::pin!(reader);
    tokio::select! {
        end = &mut reader => {
            // Replies still due are written, within a bound (a daemon that stopped reading
            // does not keep us).
            match tokio::time::timeout(FLUSH_LIMIT, &mut writer).await {
                Ok(Err(e)) if end.is_ok() => Err(ServeError::Wire(WireError::Io(e))),
                _ => end,
            }
        }
        written = &mut writer => match written {
            Err(e) => Err(ServeError::Wire(WireError::Io(e))),
            // The queue cannot end while the reader holds its sender.
            Ok(()) => reader.await,
        },
    }
}
