//! The daemon's end: requests to the laptop, several in flight, each with a deadline.
//!
//! [`Client::start`] gives a cloneable [`Client`] and the future that drives the wire (it
//! reads and writes independently, so a peer that stops reading our requests never stops
//! its own answers from being taken, and the reverse). When the wire ends, for whatever
//! reason, every call waiting and every later one fails with [`CallError::Gone`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::proto::{self, Answer, Op, ToDaemon, ToLaptop};

/// Requests in flight at once; a caller past it waits (within its deadline).
pub const MAX_IN_FLIGHT: usize = 64;

/// Why a call has no answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    /// The laptop answered with this `errno`.
    #[error("error {0} on the laptop")]
    Errno(i32),
    /// No answer within the deadline.
    #[error("the laptop did not answer in time")]
    Timeout,
    /// The wire is gone (`berth connect` ended, the connection dropped, or it spoke nonsense).
    #[error("the laptop is gone")]
    Gone,
}

impl CallError {
    /// The `errno` a process in the container sees.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Errno(e) => *e,
            Self::Timeout => libc::EIO,
            Self::Gone => libc::ENOTCONN,
        }
    }
}

/// A framed byte stream, for the handshake before [`Client::start`] (and for the laptop).
pub struct Wire<R, W> {
    pub rx: FramedRead<R, LengthDelimitedCodec>,
    pub tx: FramedWrite<W, LengthDelimitedCodec>,
}

/// What went wrong on a wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Wire<R, W> {
    pub fn new(read: R, write: W) -> Self {
        Self {
            rx: FramedRead::new(read, proto::codec()),
            tx: FramedWrite::new(write, proto::codec()),
        }
    }

    /// The next message; `None` at the end of the stream.
    pub async fn recv<T: for<'a> serde::Deserialize<'a>>(
        &mut self,
    ) -> Result<Option<T>, WireError> {
        match self.rx.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(proto::decode(&frame?)?)),
        }
    }

    pub async fn send<T: serde::Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        self.tx.send(Bytes::from(proto::encode(msg)?)).await?;
        Ok(())
    }
}

struct Inner {
    /// Whole frames ([`proto::encode_frame`]).
    out: mpsc::Sender<Bytes>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Answer, i32>>>>,
    next: AtomicU64,
    permits: Semaphore,
    /// Cancelled when the wire ends: wakes the calls waiting for a place in `out`, whose
    /// taker may still be there and never take another frame.
    gone: CancellationToken,
    deadline: Duration,
}

impl Inner {
    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<Answer, i32>>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn end(&self) {
        self.gone.cancel();
        self.permits.close();
        self.pending().clear();
    }
}

/// Sends requests to the laptop; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Takes over `wire` after the handshake. Each call waits at most `deadline` (for a
    /// place in flight, to be written, and for its answer together). The returned future
    /// drives the wire until either direction ends; run it, and drop it to end the wire.
    pub fn start<R, W>(
        wire: Wire<R, W>,
        deadline: Duration,
    ) -> (Self, impl std::future::Future<Output = ()> + Send)
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let (out, mut queued) = mpsc::channel::<Bytes>(MAX_IN_FLIGHT);
        let Wire { rx, mut tx } = wire;
        let (client, reading) = Self::start_queued(rx, out, deadline);
        let writer = async move {
            while let Some(frame) = queued.recv().await {
                // The codec writes the length itself.
                if tx.send(frame.slice(4..)).await.is_err() {
                    return;
                }
            }
        };
        let driver = {
            let inner = client.inner.clone();
            async move {
                tokio::select! {
                    () = reading => {}
                    () = writer => {}
                }
                inner.end();
            }
        };
        (client, driver)
    }

    /// As [`Client::start`], but the requests are not written: each goes to `out` as one
    /// whole frame (length and payload, [`proto::encode_frame`]), for the caller to put on
    /// the byte stream as it is, with no copy on the way. Calls fail as [`CallError::Gone`]
    /// once `out`'s receiver is dropped or `rx` ends.
    pub fn start_queued<R>(
        mut rx: FramedRead<R, LengthDelimitedCodec>,
        out: mpsc::Sender<Bytes>,
        deadline: Duration,
    ) -> (Self, impl std::future::Future<Output = ()> + Send)
    where
        R: AsyncRead + Unpin + Send,
    {
        let inner = Arc::new(Inner {
            out,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            permits: Semaphore::new(MAX_IN_FLIGHT),
            gone: CancellationToken::new(),
            deadline,
        });
        let reader = {
            let inner = inner.clone();
            async move {
                while let Some(Ok(frame)) = rx.next().await {
                    match proto::decode::<ToDaemon>(&frame) {
                        Ok(ToDaemon::Reply { id, result }) => {
                            // An answer nobody waits for (its caller gave up) is dropped.
                            if let Some(waiter) = inner.pending().remove(&id) {
                                let _ = waiter.send(result);
                            }
                        }
                        Ok(ToDaemon::Hello { .. }) | Err(_) => {
                            tracing::debug!(
                                "connect: the laptop sent something else than an answer"
                            );
                            return;
                        }
                    }
                }
            }
        };
        let driver = {
            // The calls end with the driver however it ends: dropped (never polled, or mid-way)
            // as well as run to its end; they would otherwise wait out their deadline.
            let end = EndOnDrop(inner.clone());
            async move {
                let taker = end.0.out.clone();
                tokio::select! {
                    () = reader => {}
                    // Nobody takes the requests any more.
                    () = taker.closed() => {}
                }
                drop(end);
            }
        };
        (Self { inner }, driver)
    }

    /// Whether the wire has ended.
    pub fn is_gone(&self) -> bool {
        self.inner.gone.is_cancelled()
    }

    /// How long a call waits at most.
    pub fn deadline(&self) -> Duration {
        self.inner.deadline
    }

    /// Asks the laptop and waits for its answer (within the deadline).
    pub async fn call(&self, op: Op) -> Result<Answer, CallError> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.deadline;
        let _permit = match tokio::time::timeout_at(deadline, inner.permits.acquire()).await {
            Err(_) => return Err(CallError::Timeout),
            Ok(Err(_)) => return Err(CallError::Gone),
            Ok(Ok(p)) => p,
        };
        if self.is_gone() {
            return Err(CallError::Gone);
        }
        // A place in the queue first, then the frame: frames of calls that gave up may still
        // fill the queue (a laptop that takes nothing), and a call waiting behind them holds
        // no frame of its own meanwhile. The queue's taker may outlive the wire (the laptop
        // closed its side while our requests still queue for the channel): the end of the
        // wire wakes this wait too.
        let slot = tokio::select! {
            () = inner.gone.cancelled() => return Err(CallError::Gone),
            r = tokio::time::timeout_at(deadline, inner.out.reserve()) => match r {
                Err(_) => return Err(CallError::Timeout),
                Ok(Err(_)) => return Err(CallError::Gone),
                Ok(Ok(slot)) => slot,
            },
        };
        let id = inner.next.fetch_add(1, Ordering::Relaxed);
        let frame =
            proto::encode_frame(&ToLaptop::Request { id, op }).map_err(|_| CallError::Gone)?;
        let (answer, answered) = oneshot::channel();
        inner.pending().insert(id, answer);
        // Removes the waiter however this call ends (a timeout, or the caller dropped).
        let _forget = Forget { inner, id };
        // The wire may have ended since the check above, its waiters already let go: this
        // one would wait out the deadline.
        if self.is_gone() {
            return Err(CallError::Gone);
        }
        slot.send(frame);
        match tokio::time::timeout_at(deadline, answered).await {
            Err(_) => Err(CallError::Timeout),
            Ok(Err(_)) => Err(CallError::Gone),
            Ok(Ok(result)) => result.map_err(CallError::Errno),
        }
    }
}

/// Ends the wire's calls when dropped.
struct EndOnDrop(Arc<Inner>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

struct Forget<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.inner.pending().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::proto::RelPath;

    /// A laptop that answers every request with `answer(op)` after `delay`, in reverse
    /// order of a pair (to show answers are matched by id).
    async fn laptop(
        read: tokio::io::DuplexStream,
        answer: impl Fn(&Op) -> Option<Result<Answer, i32>>,
    ) {
        let (r, w) = tokio::io::split(read);
        let mut wire = Wire::new(r, w);
        let mut held = Vec::new();
        while let Ok(Some(ToLaptop::Request { id, op })) = wire.recv::<ToLaptop>().await {
            if let Some(result) = answer(&op) {
                held.push(ToDaemon::Reply { id, result });
            }
            if held.len() == 2 {
                while let Some(m) = held.pop() {
                    wire.send(&m).await.unwrap();
                }
            }
        }
    }

    fn client(
        deadline: Duration,
        answer: impl Fn(&Op) -> Option<Result<Answer, i32>> + Send + 'static,
    ) -> Client {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        tokio::spawn(laptop(theirs, answer));
        let (r, w) = tokio::io::split(ours);
        let (client, driver) = Client::start(Wire::new(r, w), deadline);
        tokio::spawn(driver);
        client
    }

    fn lookup(name: &str) -> Op {
        Op::Lookup {
            path: RelPath(name.as_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn answers_reach_their_callers_in_any_order() {
        let c = client(Duration::from_secs(5), |op| match op {
            Op::Lookup { path } if path.0 == b"missing" => Some(Err(libc::ENOENT)),
            Op::Lookup { path } => Some(Ok(Answer::Bytes(path.0.clone()))),
            _ => None,
        });
        let (a, b) = tokio::join!(c.call(lookup("one")), c.call(lookup("missing")));
        assert_eq!(a, Ok(Answer::Bytes(b"one".to_vec())));
        assert_eq!(b, Err(CallError::Errno(libc::ENOENT)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_laptop_times_out_and_a_closed_one_is_gone() {
        let c = client(Duration::from_secs(30), |_| None);
        assert_eq!(c.call(lookup("x")).await, Err(CallError::Timeout));
        assert!(c.inner.pending().is_empty());

        let (ours, theirs) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (c, driver) = Client::start(Wire::new(r, w), Duration::from_secs(30));
        tokio::spawn(driver);
        let call = tokio::spawn({
            let c = c.clone();
            async move { c.call(lookup("x")).await }
        });
        tokio::task::yield_now().await;
        drop(theirs);
        assert_eq!(call.await.unwrap(), Err(CallError::Gone));
        assert_eq!(c.call(lookup("y")).await, Err(CallError::Gone));
        assert_eq!(CallError::Gone.errno(), libc::ENOTCONN);
    }

    /// Queued frames are whole (the laptop's codec reads them from the stream as they are),
    /// and calls end once nobody takes the queue.
    #[tokio::test]
    async fn queued_requests_are_whole_frames_and_end_with_their_taker() {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (r, _w) = tokio::io::split(ours);
        let (out, mut queued) = mpsc::channel(4);
        let (c, driver) = Client::start_queued(
            FramedRead::new(r, proto::codec()),
            out,
            Duration::from_secs(5),
        );
        let driver = tokio::spawn(driver);
        let call = tokio::spawn({
            let c = c.clone();
            async move { c.call(lookup("x")).await }
        });
        let frame = queued.recv().await.unwrap();
        let (tr, mut tw) = tokio::io::split(theirs);
        drop(tr);
        let mut laptop = FramedRead::new(&frame[..], proto::codec());
        let Some(Ok(payload)) = laptop.next().await else {
            panic!("not a frame")
        };
        let ToLaptop::Request { id, op } = proto::decode(&payload).unwrap() else {
            panic!("not a request")
        };
        assert_eq!(op, lookup("x"));
        let reply = proto::encode_frame(&ToDaemon::Reply {
            id,
            result: Ok(Answer::Bytes(b"x".to_vec())),
        })
        .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tw, &reply)
            .await
            .unwrap();
        assert_eq!(call.await.unwrap(), Ok(Answer::Bytes(b"x".to_vec())));

        drop(queued);
        driver.await.unwrap();
        assert!(c.is_gone());
        assert_eq!(c.call(lookup("y")).await, Err(CallError::Gone));
    }

    /// A client of [`Client::start_queued`] whose queue holds `capacity` frames (30 s
    /// deadline), its driver spawned, the queue's taker, and the laptop's end of the wire.
    fn queued_client(
        capacity: usize,
    ) -> (
        Client,
        tokio::task::JoinHandle<()>,
        mpsc::Receiver<Bytes>,
        tokio::io::DuplexStream,
    ) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (r, _w) = tokio::io::split(ours);
        let (out, queued) = mpsc::channel(capacity);
        let (c, driver) = Client::start_queued(
            FramedRead::new(r, proto::codec()),
            out,
            Duration::from_secs(30),
        );
        (c, tokio::spawn(driver), queued, theirs)
    }

    fn spawn_call(c: &Client, name: &str) -> tokio::task::JoinHandle<Result<Answer, CallError>> {
        let (c, op) = (c.clone(), lookup(name));
        tokio::spawn(async move { c.call(op).await })
    }

    /// A driver dropped (its session killed) ends the calls in flight at once, as a driver
    /// that ran to its end does; a call does not wait out its deadline.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_driver_ends_the_calls_in_flight() {
        let (c, driver, mut queued, _theirs) = queued_client(4);
        let call = spawn_call(&c, "x");
        // The request was queued: the call waits for its answer.
        assert!(queued.recv().await.is_some());
        let start = tokio::time::Instant::now();
        driver.abort();
        assert_eq!(call.await.unwrap(), Err(CallError::Gone));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(c.is_gone());
    }

    /// The laptop closes its side while calls wait for a place in a queue nobody takes from
    /// (its frames still there): they fail at once, not at their deadline.
    #[tokio::test(start_paused = true)]
    async fn a_call_waiting_for_a_place_in_the_queue_ends_with_the_wire() {
        let (c, driver, mut queued, theirs) = queued_client(1);
        let first = spawn_call(&c, "x");
        // Its frame fills the queue, and is never taken.
        for _ in 0..10_000 {
            if queued.capacity() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(queued.capacity(), 0, "the first call queued no frame");
        let second = spawn_call(&c, "y");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!second.is_finished(), "the second call had a place");
        drop(theirs);
        driver.await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("the call waited on after the wire ended");
        assert_eq!(ended.unwrap(), Err(CallError::Gone));
        assert_eq!(first.await.unwrap(), Err(CallError::Gone));
        // The queue's taker is still there, holding the first frame.
        assert!(queued.try_recv().is_ok());
    }

    #[tokio::test]
    async fn nonsense_from_the_laptop_ends_the_wire() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (c, driver) = Client::start(Wire::new(r, w), Duration::from_secs(5));
        let driver = tokio::spawn(driver);
        let (tr, tw) = tokio::io::split(theirs);
        let mut laptop = Wire::new(tr, tw);
        laptop
            .tx
            .send(Bytes::from_static(b"\xff\xff\xff"))
            .await
            .unwrap();
        driver.await.unwrap();
        assert!(c.is_gone());
        assert_eq!(c.call(lookup("x")).await, Err(CallError::Gone));
    }
}
