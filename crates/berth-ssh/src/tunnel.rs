//! Byte pipes between a channel and a socket (`-L`, `-R`, agent, X11).
//!
//! The channel is read all the time (russh stops the whole connection while one channel's
//! queue is full) into its inbox ([`crate::inbox`]); the client's window is re-opened as the
//! socket takes the bytes, so a socket that stops reading stops its own client's sending on
//! that channel, and nothing else.

use std::future::Future;
use std::net::SocketAddr;

use berth_guest_proto::fds::{GuardedUnixListener, GuardedUnixStream};
use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::task::AbortOnDropHandle;

/// Counts bytes moved between a client and its container, either way. Called for every
/// keystroke and every chunk of output, so the counter is looked up once (`counter!` asks
/// the recorder's registry, a hash and a lock, at every call); the daemon installs its
/// recorder before it serves SSH.
pub(crate) fn relayed(n: usize) {
    static RELAYED: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    RELAYED
        .get_or_init(|| metrics::counter!("berth_relayed_bytes_total"))
        .increment(n as u64);
}

/// How many times the time it has to answer ([`crate::SshConfig::open_answer`]) a late
/// answer to a channel we opened is still waited for, to close what it opened.
const LATE_ANSWER: u32 = 10;
/// The pause after a connection refused for the user's cap.
const REFUSAL_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A listener whose connections become channels to the client (`-R`, agent, X11).
pub(crate) trait Accept: Send {
    type Stream: AsyncRead + AsyncWrite + Send + 'static;
    fn accept_one(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, Option<SocketAddr>)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, Option<SocketAddr>)> {
        self.accept().await.map(|(s, peer)| (s, Some(peer)))
    }
}

/// Unix sockets a container connects to (agent, `-R` sockets): descriptors it sends are
/// refused or disposed of, never closed on a runtime worker.
impl Accept for GuardedUnixListener {
    type Stream = GuardedUnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, Option<SocketAddr>)> {
        self.accept().await.map(|s| (s, None))
    }
}

/// Turns each connection `listener` accepts into a channel opened by `open` (given the
/// connection's peer) and pipes the two. Runs until accepting fails; aborting it ends its
/// pipes too, but not the wait for an answer to a channel it opened (see [`late_answer`]).
pub(crate) async fn serve_listener<L, F, Fut>(
    listener: L,
    what: &'static str,
    handle: russh::server::Handle,
    tenant: crate::quota::Tenant,
    open: F,
) where
    L: Accept,
    F: Fn(Option<SocketAddr>) -> Fut,
    Fut: Future<Output = Result<Channel<Msg>, russh::Error>> + Send + 'static,
{
    // Cancelled when this ends, however it ends (an abort included).
    let ended = tokio_util::sync::CancellationToken::new();
    let _ended = ended.clone().drop_guard();
    loop {
        let (stream, peer) = match listener.accept_one().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "{what}: accept failed");
                return;
            }
        };
        // Each connection is one of the user's forwarded connections; past her cap it is
        // closed at once (and reported).
        let Some(slot) = tenant.take(crate::quota::Held::Forward) else {
            // A container connecting in a loop past the cap is slowed down, not served.
            drop(stream);
            tokio::time::sleep(REFUSAL_PAUSE).await;
            continue;
        };
        let reserved = tenant.reserve_input();
        let opening = Box::pin(open(peer));
        let handle = handle.clone();
        let answer = tenant.quotas.open_answer;
        let ended = ended.clone();
        // Not a task of this one's: the wait for the client's answer outlives it (with the
        // slot, so her cap bounds how many wait).
        tokio::spawn(async move {
            let _slot = slot;
            let mut opening = opening;
            let answered = tokio::select! {
                r = tokio::time::timeout(answer, &mut opening) => r.ok(),
                () = ended.cancelled() => None,
            };
            match answered {
                Some(Ok(channel)) => tokio::select! {
                    () = bridge(channel, stream, handle, reserved) => {}
                    () = ended.cancelled() => {}
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "{what}: the client refused the channel");
                }
                None => {
                    tracing::debug!("{what}: the client did not answer the channel open (yet)");
                    // The container's end and the input budget go now; the slot stays.
                    drop((stream, reserved));
                    late_answer(opening, handle, answer, what).await;
                }
            }
        });
    }
}

/// Waits, up to [`LATE_ANSWER`] times `answer`, for the client's answer to a channel open
/// whose time is over (or whose listener is gone), to close what it opens rather than leave
/// it open with nobody reading it. A client that never answers is disconnected: russh keeps
/// a channel it opened until its answer, for the connection's life, so such a client would
/// grow its tables with every connection the container makes. No client that works does
/// that (OpenSSH answers once its own connect ends).
async fn late_answer(
    opening: impl Future<Output = Result<Channel<Msg>, russh::Error>>,
    handle: russh::server::Handle,
    answer: std::time::Duration,
    what: &'static str,
) {
    match tokio::time::timeout(answer.saturating_mul(LATE_ANSWER), opening).await {
        Ok(Ok(channel)) => {
            let _ = tokio::time::timeout(answer, channel.close()).await;
        }
        Ok(Err(_)) => {}
        Err(_) => {
            tracing::warn!("{what}: the client never answered a channel open; disconnecting it");
            let _ = handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    "a channel open was never answered".into(),
                    String::new(),
                )
                .await;
        }
    }
}

/// The address and port a peer is announced with in a channel open.
pub(crate) fn origin(peer: Option<SocketAddr>) -> (String, u32) {
    peer.map_or_else(
        || ("127.0.0.1".to_owned(), 0),
        |p| (p.ip().to_string(), u32::from(p.port())),
    )
}

/// Copies both ways until both directions have ended, or the client breaks flow control.
pub(crate) async fn bridge<S>(
    channel: Channel<Msg>,
    socket: S,
    handle: russh::server::Handle,
    reserved: crate::quota::Reserved,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    // Closed however this ends, aborted included (the session that owned an agent or X11
    // listener ended): a client waits for the close of every channel before it exits.
    let mut closer = CloseOnDrop(Some(tx));
    let tx = closer.get();
    let (mut sock_read, mut sock_write) = tokio::io::split(socket);
    let (input, taken) = crate::inbox::inbox(handle, id, reserved);

    // Channel → socket, through the inbox: the client may send more as the socket takes it.
    let writer = AbortOnDropHandle::new(tokio::spawn(async move {
        if taken.write_to(&mut sock_write, relayed).await == crate::inbox::Drained::End {
            let _ = sock_write.shutdown().await;
        }
    }));
    // Socket → channel, with the channel's own window as backpressure.
    let mut out = tx.make_writer();
    let reader = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match sock_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    relayed(n);
                    if out
                        .write_all(buf.get(..n).unwrap_or_default())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }));
    let reader_abort = reader.abort_handle();
    let mut reader = reader;
    let mut writer = writer;
    let mut reader_done = false;
    let mut writer_done = false;
    let mut overflow = false;
    loop {
        tokio::select! {
            _ = &mut reader, if !reader_done => {
                reader_done = true;
                let _ = tx.eof().await;
            }
            // The writer ends on its own (the client's EOF written out, or the socket gone):
            // that must wake this loop too, or a client waiting for our close waits forever.
            _ = &mut writer, if !writer_done => {
                writer_done = true;
            }
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if input.push(data).is_err() {
                        tracing::debug!("tunnel closed: the client sent past its window");
                        overflow = true;
                        break;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => input.discard(data.len()),
                Some(ChannelMsg::Eof) => input.eof(),
                Some(_) => {}
                None => break,
            },
        }
        if reader_done && writer_done {
            break;
        }
    }
    reader_abort.abort();
    if writer_done {
        // Nothing left to write.
    } else if overflow {
        writer.abort();
    } else {
        // The channel is done; what it sent still goes to the socket (bounded in time, in
        // case the socket never reads).
        drop(input);
        if tokio::time::timeout(std::time::Duration::from_secs(30), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
    if let Some(tx) = closer.0.take() {
        let _ = tx.close().await;
    }
}

/// A channel's write half that is closed when dropped, if it was not closed before.
struct CloseOnDrop(Option<ChannelWriteHalf<Msg>>);

impl CloseOnDrop {
    fn get(&self) -> &ChannelWriteHalf<Msg> {
        // Only `drop` empties it.
        self.0.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let (Some(tx), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = tx.close().await;
            });
        }
    }
}
