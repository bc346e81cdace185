//! Client input for one channel, held until its consumer (a process's stdin, a tunnel's
//! socket) takes it: flow control as OpenSSH does it.
//!
//! Our russh is patched (`vendor/russh`, `manual_window_adjust`) so that it never re-opens a
//! channel's window when data *arrives*; the consumer grants the client as many bytes as it
//! has *taken* ([`InboxRx::consumed`]). A consumer that stops reading therefore stops its
//! own sender once the window is spent, and nothing else: the connection's loop keeps
//! running (other channels, keepalives, a close), and the daemon holds at most one window
//! per channel. A client that sends past its window is cut off ([`Overrun`]).
//!
//! A session's input is pushed by the connection's own loop as it is decrypted
//! ([`crate::handler`]). When the consumer's sink can be written without waiting (a
//! terminal, [`InboxTx::write_now`]) and nothing is queued or being written, the push
//! writes it there at once: a keystroke reaches the terminal before the loop does anything
//! else, with no hand-off to another task. The same loop reads a terminal's output
//! ([`InboxTx::poll_output`]), so its echo goes back without one either.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use russh::ChannelId;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::quota::Reserved;
use crate::{ReadNow, WriteNow};

/// The most a consumer takes before it grants the client the window back.
const GRANT_STEP: usize = 64 * 1024;

/// What a consumer that has written everything and waits for more grants back at once: at
/// least half the smallest window, as OpenSSH does (`channel_check_window`). A client can
/// only be stopped by its window when all of it is outstanding, which is then granted; below
/// this, a keystroke is not answered by a window adjustment of its own (one packet more, and
/// one more wake of the connection, per byte typed).
const IDLE_GRANT: usize = crate::server::INITIAL_WINDOW as usize / 2;

/// The most output one read by the connection's loop takes ([`InboxTx::poll_output`]).
const OUTPUT_READ: usize = 16 * 1024;

/// The most pieces one write hands the kernel (`writev`).
const WRITE_SLICES: usize = 64;

/// Pieces smaller than this are copied into one buffer rather than held as they came: a
/// packet held as its own allocation costs about 90 bytes however little it carries, so a
/// window's worth of one-byte packets would take 90 times the window.
const SMALL_PIECE: usize = 4 * 1024;

/// The client sent more than the window it was granted (a hostile or broken client).
#[derive(Debug)]
pub(crate) struct Overrun;

#[derive(Default)]
struct State {
    /// The client's packets as they came (no copy: each is at most one packet), oldest
    /// first, then `tail`.
    queue: VecDeque<Bytes>,
    /// Small packets after those in `queue`, copied end to end ([`SMALL_PIECE`]).
    tail: BytesMut,
    /// Bytes in `queue` and `tail`.
    held: usize,
    /// Bytes received and not yet granted back: held here, or taken by the consumer and not
    /// yet written. Never more than the window (plus slack).
    outstanding: usize,
    eof: bool,
    /// The sending side is gone (the channel closed): what is queued is still delivered.
    closed: bool,
    /// The consumer is gone: input is discarded (and its window given back at once).
    dropped: bool,
    /// The consumer took input it has not all written yet: nothing may be written past it.
    busy: bool,
    /// The client sent past its window: every later push is refused.
    overrun: bool,
    /// Written to the sink (by the consumer, or by a push at once) and not yet granted back.
    ungranted: usize,
    /// The input buffer set aside for this channel, given back once the consumer is gone
    /// (a consumer still writing what it took keeps it).
    reserved: Option<Reserved>,
    /// The consumer's sink, written without waiting ([`InboxTx::write_now`]).
    now: Option<WriteNow>,
    /// Where the process's output is read ([`InboxTx::read_now`]).
    output: OutputSource,
    /// The session's task has ended ([`InboxTx::finish`]).
    finished: bool,
}

/// Where a session's output is read.
#[derive(Default)]
enum OutputSource {
    /// Not known yet (the process is being opened).
    #[default]
    Undecided,
    /// By the session's task.
    Elsewhere,
    /// By the connection's loop ([`InboxTx::poll_output`]).
    Here(ReadNow),
    /// Nowhere any more: it ended, or the session did.
    Ended,
}

impl State {
    /// Holds `data` after what is held already.
    fn enqueue(&mut self, data: Bytes) {
        self.held += data.len();
        if data.len() < SMALL_PIECE {
            self.tail.extend_from_slice(&data);
        } else {
            self.seal();
            self.queue.push_back(data);
        }
    }

    /// Moves the small packets copied so far to the end of `queue` (with their buffer, which
    /// is freed once they are written: the next small packet starts a new one).
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.queue
                .push_back(std::mem::take(&mut self.tail).freeze());
        }
    }

    /// Hands everything held over to `into` (which must be empty), oldest first.
    fn hand_over(&mut self, into: &mut VecDeque<Bytes>) {
        self.seal();
        self.held = 0;
        std::mem::swap(into, &mut self.queue);
    }

    /// Whether anything is held.
    fn holds(&self) -> bool {
        !self.queue.is_empty() || !self.tail.is_empty()
    }

    /// Counts `len` bytes more from the client against its window.
    fn admit(&mut self, len: usize, limit: usize) -> Result<(), Overrun> {
        if self.overrun || self.outstanding.saturating_add(len) > limit {
            self.overrun = true;
            return Err(Overrun);
        }
        self.outstanding += len;
        Ok(())
    }

    /// What to grant the client after `n` more bytes were written: all that is ungranted
    /// once it reaches `step`.
    fn written(&mut self, n: usize, step: usize) -> usize {
        self.ungranted += n;
        if self.ungranted >= step {
            std::mem::take(&mut self.ungranted)
        } else {
            0
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// The consumer, while it waits for input.
    waker: AtomicWaker,
    handle: russh::server::Handle,
    id: ChannelId,
    /// The session's task, waiting for the output's end.
    output_waker: AtomicWaker,
    /// The connection's loop, while it waits to learn where the output is read.
    loop_waker: AtomicWaker,
}

impl Shared {
    fn grant(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.with(|s| s.outstanding = s.outstanding.saturating_sub(n));
        let _ = self
            .handle
            .window_adjust(self.id, u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update of plain bytes: go on.
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s)
    }
}

/// The channel reader's end.
pub(crate) struct InboxTx {
    shared: Arc<Shared>,
    limit: usize,
    /// Dropping this end closes the inbox (not so for a [`companion`](Self::companion)).
    closes: bool,
}

/// The consumer's end.
pub(crate) struct InboxRx {
    shared: Arc<Shared>,
}

/// How [`InboxRx::write_to`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// The client's EOF (or the channel's close) after everything was written.
    End,
    /// The sink refused a write (a process that closed its stdin, a socket gone): what it
    /// did not take was dropped and its window given back.
    SinkGone,
}

/// An inbox for channel `id` of the connection behind `handle`. The client's window grows
/// from the initial one by what `reserved` sets aside; the inbox holds at most that window
/// plus one packet of slack.
pub(crate) fn inbox(
    handle: russh::server::Handle,
    id: ChannelId,
    reserved: Reserved,
) -> (InboxTx, InboxRx) {
    let extra = reserved.bytes();
    let limit = crate::server::INITIAL_WINDOW as usize + extra + crate::server::MAX_PACKET as usize;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            reserved: Some(reserved),
            ..State::default()
        }),
        waker: AtomicWaker::new(),
        handle,
        id,
        output_waker: AtomicWaker::new(),
        loop_waker: AtomicWaker::new(),
    });
    shared.grant(extra);
    (
        InboxTx {
            shared: shared.clone(),
            limit,
            closes: true,
        },
        InboxRx { shared },
    )
}

impl InboxTx {
    /// A second sending end, for the task that owns the consumer (EOF, discarded input):
    /// dropping it does not close the inbox.
    pub(crate) fn companion(&self) -> InboxTx {
        InboxTx {
            shared: self.shared.clone(),
            limit: self.limit,
            closes: false,
        }
    }

    /// From now on, [`push`](Self::push) writes input straight to the consumer's sink with
    /// `now` whenever nothing is queued or being written (so nothing is overtaken). `now`
    /// must write to the very sink the consumer writes to; what it does not take is queued.
    pub(crate) fn write_now(&self, now: WriteNow) {
        self.shared.with(|s| s.now = Some(now));
    }

    /// Where the process's output is read from now on: by the connection's loop with
    /// `read` ([`poll_output`](Self::poll_output); [`output_end`](Self::output_end) says
    /// when it has ended), or, with `None`, by the session's task. The loop, which waits to
    /// know, is woken.
    pub(crate) fn read_now(&self, read: Option<ReadNow>) {
        self.shared.with(|s| {
            if matches!(s.output, OutputSource::Undecided) {
                s.output = read.map_or(OutputSource::Elsewhere, OutputSource::Here);
            }
        });
        self.shared.loop_waker.wake();
    }

    /// The process's next output, at most `room` bytes: for the connection's loop, which
    /// sends it as the channel's data. Pending while there is none, no room, or after the
    /// end.
    pub(crate) fn poll_output(&self, cx: &mut Context<'_>, room: usize) -> Poll<Bytes> {
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); OUTPUT_READ];
        let got = self.shared.with(|s| match &s.output {
            // Registered under the lock that `read_now` decides under: no wake is lost.
            OutputSource::Undecided => {
                self.shared.loop_waker.register(cx.waker());
                None
            }
            OutputSource::Here(read) if room > 0 => {
                let (space, _) = space.split_at_mut(room.min(OUTPUT_READ));
                let mut buf = tokio::io::ReadBuf::uninit(space);
                match read(cx, &mut buf) {
                    Poll::Pending => None,
                    Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                        Some(Some(Bytes::copy_from_slice(buf.filled())))
                    }
                    // The end (or a failed read, which ends it as well).
                    Poll::Ready(_) => {
                        s.output = OutputSource::Ended;
                        Some(None)
                    }
                }
            }
            _ => None,
        });
        match got {
            Some(Some(data)) => {
                crate::tunnel::relayed(data.len());
                Poll::Ready(data)
            }
            Some(None) => {
                self.shared.output_waker.wake();
                Poll::Pending
            }
            None => Poll::Pending,
        }
    }

    /// Whether the connection's loop reads the process's output ([`read_now`](Self::read_now)),
    /// or did until its end.
    pub(crate) fn reads_output(&self) -> bool {
        self.shared
            .with(|s| matches!(s.output, OutputSource::Here(_) | OutputSource::Ended))
    }

    /// The session's task has ended: nothing more is written or read for it (the terminal
    /// is let go), and the connection forgets the channel at its next look
    /// ([`finished`](Self::finished)).
    pub(crate) fn finish(&self) {
        let (now, output) = self.shared.with(|s| {
            s.finished = true;
            (
                s.now.take(),
                std::mem::replace(&mut s.output, OutputSource::Ended),
            )
        });
        self.shared.output_waker.wake();
        // Outside the lock: the last hold on the terminal may close it.
        drop((now, output));
    }

    /// Whether the session's task has ended (or let go of the inbox without starting).
    pub(crate) fn finished(&self) -> bool {
        Arc::strong_count(&self.shared) == 1 || self.shared.with(|s| s.finished)
    }

    /// Returns once the output read by the connection's loop has ended.
    pub(crate) async fn output_end(&self) {
        let ended = |s: &mut State| matches!(s.output, OutputSource::Ended);
        std::future::poll_fn(|cx| {
            if self.shared.with(ended) {
                return Poll::Ready(());
            }
            self.shared.output_waker.register(cx.waker());
            if self.shared.with(ended) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Holds `data` for the consumer, or writes it to the sink at once (see
    /// [`write_now`](Self::write_now)). With no consumer left it is dropped and its window
    /// given back at once (as sshd does for a process that closed its stdin).
    pub(crate) fn push(&self, data: Bytes) -> Result<(), Overrun> {
        let len = data.len();
        if len == 0 {
            // Nothing to hold (an empty piece in the queue would read as a refused write).
            return Ok(());
        }
        let (queued, grant) = self.shared.with(|s| {
            s.admit(len, self.limit)?;
            if s.dropped || s.eof {
                return Ok((false, len));
            }
            let mut data = data;
            // Written under the lock, so the consumer cannot start a write meanwhile. A
            // refusal (the terminal full, or gone) leaves it to the consumer, whose own
            // write waits for room or reports the end.
            let wrote = match &s.now {
                Some(now) if !s.holds() && !s.busy => now(&data).ok(),
                _ => None,
            };
            if let Some(n) = wrote.map(|n| n.min(data.len())).filter(|&n| n > 0) {
                crate::tunnel::relayed(n);
                data.advance(n);
                let step = if data.is_empty() {
                    IDLE_GRANT
                } else {
                    usize::MAX
                };
                let grant = s.written(n, step);
                if data.is_empty() {
                    return Ok((false, grant));
                }
            }
            s.enqueue(data);
            Ok((true, 0))
        })?;
        if grant > 0 {
            self.shared.grant(grant);
        }
        if queued {
            self.shared.waker.wake();
        }
        Ok(())
    }

    /// As [`push`](Self::push), without waking the consumer: for a consumer that the
    /// calling task itself polls before it next sleeps (a session's stdin writer, polled
    /// beside the channel in [`crate::session`]). Waking it would wake the very task that is
    /// running, and tokio hands a task woken while it runs to another worker thread (a
    /// futex wake and a context switch more for every keystroke).
    pub(crate) fn push_here(&self, data: Bytes) -> Result<(), Overrun> {
        self.hold(data)
    }

    fn hold(&self, data: Bytes) -> Result<(), Overrun> {
        let len = data.len();
        if len == 0 {
            return Ok(());
        }
        let discarded = self.shared.with(|s| {
            s.admit(len, self.limit)?;
            if s.dropped || s.eof {
                return Ok(true);
            }
            s.enqueue(data);
            Ok(false)
        })?;
        if discarded {
            self.shared.grant(len);
        }
        Ok(())
    }

    /// Data the channel does not carry to any consumer (extended data from the client):
    /// its window is given back at once.
    pub(crate) fn discard(&self, len: usize) {
        self.shared
            .with(|s| s.outstanding = s.outstanding.saturating_add(len));
        self.shared.grant(len);
    }

    /// The client's EOF: the consumer gets what is held, then the end.
    pub(crate) fn eof(&self) {
        self.shared.with(|s| s.eof = true);
        self.shared.waker.wake();
    }

    /// Bytes held and not yet taken.
    pub(crate) fn held(&self) -> usize {
        self.shared.with(|s| s.held)
    }
}

impl Drop for InboxTx {
    fn drop(&mut self) {
        if self.closes {
            self.shared.with(|s| s.closed = true);
            self.shared.waker.wake();
        }
    }
}

impl InboxRx {
    /// Everything held so far, waiting for some (after granting what was written); `false`
    /// once the client sent EOF or the channel closed and all was taken.
    async fn take(&mut self, into: &mut VecDeque<Bytes>) -> bool {
        let mut look = |s: &mut State| {
            // Called with nothing left of what was taken before: it is all written.
            s.busy = false;
            if s.holds() {
                s.hand_over(into);
                s.busy = true;
                Some(true)
            } else if s.eof || s.closed {
                Some(false)
            } else {
                None
            }
        };
        // Looked at on every poll, not only when woken: input pushed without a wake
        // ([`InboxTx::push_here`]) is found the next time the task polls this.
        std::future::poll_fn(|cx| {
            if let Some(got) = self.shared.with(&mut look) {
                return Poll::Ready(got);
            }
            // Nothing to write: much that was written may be sent again before we sleep.
            let grant = self.shared.with(|s| s.written(0, IDLE_GRANT));
            self.shared.grant(grant);
            self.shared.waker.register(cx.waker());
            // Input pushed between the look and the registration woke nobody.
            match self.shared.with(&mut look) {
                Some(got) => Poll::Ready(got),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Writes the client's input to `sink` as it comes, granting the client as many bytes
    /// as the sink took, until the client's EOF or the sink refuses. `written` is told
    /// every write's size. The sink is not shut down.
    pub(crate) async fn write_to<W>(mut self, sink: &mut W, written: impl Fn(usize)) -> Drained
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut batch = VecDeque::new();
        while self.take(&mut batch).await {
            while !batch.is_empty() {
                let slices: Vec<IoSlice<'_>> = batch
                    .iter()
                    .take(WRITE_SLICES)
                    .map(|b| IoSlice::new(b))
                    .collect();
                let n = match sink.write_vectored(&slices).await {
                    Ok(n) if n > 0 => n,
                    _ => {
                        // What the sink did not take will never be written: its window,
                        // and what was written, go back to the client.
                        let rest: usize = batch.iter().map(Bytes::len).sum();
                        self.shared.with(|s| s.ungranted += rest);
                        return Drained::SinkGone;
                    }
                };
                written(n);
                advance(&mut batch, n);
                let grant = self.shared.with(|s| s.written(n, GRANT_STEP));
                self.shared.grant(grant);
            }
        }
        Drained::End
    }
}

/// Drops the first `n` bytes of `queue`.
fn advance(queue: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = queue.front_mut() else {
            return;
        };
        if front.len() > n {
            front.advance(n);
            return;
        }
        n -= front.len();
        queue.pop_front();
    }
}

impl Drop for InboxRx {
    fn drop(&mut self) {
        // What is held will never be taken: give its window back, and drop what comes.
        let (n, reserved) = self.shared.with(|s| {
            s.dropped = true;
            s.queue.clear();
            s.tail = BytesMut::new();
            let n = std::mem::take(&mut s.held) + std::mem::take(&mut s.ungranted);
            (n, s.reserved.take())
        });
        self.shared.grant(n);
        // Outside the lock: giving the reservation back takes the quotas' own.
        drop(reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `s` holds, in order, as `take` hands it over.
    fn taken(s: &mut State) -> Vec<u8> {
        let mut into = VecDeque::new();
        s.hand_over(&mut into);
        into.into_iter().flat_map(|b| b.to_vec()).collect()
    }

    #[test]
    fn small_packets_are_held_end_to_end_not_one_allocation_each() {
        let mut s = State::default();
        for _ in 0..100_000 {
            s.enqueue(Bytes::from_static(b"x"));
        }
        assert_eq!(s.held, 100_000);
        assert!(s.queue.is_empty(), "{} pieces held", s.queue.len());
        assert!(s.tail.capacity() <= 2 * 100_000, "{}", s.tail.capacity());
        assert_eq!(taken(&mut s), vec![b'x'; 100_000]);
        assert!(!s.holds());
    }

    #[test]
    fn small_and_large_packets_keep_their_order() {
        let mut s = State::default();
        let large = Bytes::from(vec![b'L'; SMALL_PIECE]);
        s.enqueue(Bytes::from_static(b"ab"));
        s.enqueue(large.clone());
        s.enqueue(Bytes::from_static(b"c"));
        s.enqueue(Bytes::from_static(b"d"));
        assert!(s.holds());
        assert_eq!(s.held, SMALL_PIECE + 4);
        let mut want = b"ab".to_vec();
        want.extend_from_slice(&large);
        want.extend_from_slice(b"cd");
        assert_eq!(taken(&mut s), want);
        // Sealed with its buffer: nothing is kept for the next packets.
        assert_eq!(s.tail.capacity(), 0);
    }

    #[test]
    fn advance_drops_whole_and_partial_pieces() {
        let mut q: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fghi"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        advance(&mut q, 4);
        assert_eq!(q, [Bytes::from_static(b"e"), Bytes::from_static(b"fghi")]);
        advance(&mut q, 1);
        assert_eq!(q, [Bytes::from_static(b"fghi")]);
        advance(&mut q, 10);
        assert!(q.is_empty());
    }
}
