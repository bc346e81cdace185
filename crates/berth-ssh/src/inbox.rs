//! Client input for one channel, held until its consumer (a process's stdin, a tunnel's
//! socket) takes it: flow control as OpenSSH does it.
//!
//! Our russh is patched (`vendor/russh`, `manual_window_adjust`) so that it never re-opens a
//! channel's window when data *arrives*; the consumer grants the client as many bytes as it
//! has *taken* ([`InboxRx::consumed`]). A consumer that stops reading therefore stops its
//! own sender once the window is spent, and nothing else: the connection's loop keeps
//! running (other channels, keepalives, a close), and the daemon holds at most one window
//! per channel. A client that sends past its window is cut off ([`Overrun`]).

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use russh::ChannelId;
use tokio::sync::Notify;

use crate::quota::Reserved;

/// The most a consumer writes before it grants the client the window back.
pub(crate) const GRANT_STEP: usize = 64 * 1024;

/// The client sent more than the window it was granted (a hostile or broken client).
#[derive(Debug)]
pub(crate) struct Overrun;

#[derive(Default)]
struct State {
    buf: BytesMut,
    /// Bytes received and not yet granted back: held here, or taken by the consumer and not
    /// yet written. Never more than the window (plus slack).
    outstanding: usize,
    eof: bool,
    /// The sending side is gone (the channel closed): what is buffered is still delivered.
    closed: bool,
    /// The consumer is gone: input is discarded (and its window given back at once).
    dropped: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    handle: russh::server::Handle,
    id: ChannelId,
    /// The input buffer set aside for this channel, given back when both ends are gone (a
    /// consumer still writing what it took keeps it).
    _reserved: Reserved,
}

impl Shared {
    fn grant(&self, n: usize) {
        self.with(|s| s.outstanding = s.outstanding.saturating_sub(n));
        if n > 0 {
            let _ = self
                .handle
                .window_adjust(self.id, u32::try_from(n).unwrap_or(u32::MAX));
        }
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
}

/// The consumer's end.
pub(crate) struct InboxRx {
    shared: Arc<Shared>,
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
        state: Mutex::new(State::default()),
        wake: Notify::new(),
        handle,
        id,
        _reserved: reserved,
    });
    shared.grant(extra);
    (
        InboxTx {
            shared: shared.clone(),
            limit,
        },
        InboxRx { shared },
    )
}

impl InboxTx {
    /// Holds `data` for the consumer. With no consumer left it is dropped and its window
    /// given back at once (as sshd does for a process that closed its stdin).
    pub(crate) fn push(&self, data: &[u8]) -> Result<(), Overrun> {
        let discarded = self.shared.with(|s| {
            if s.outstanding.saturating_add(data.len()) > self.limit {
                return Err(Overrun);
            }
            s.outstanding += data.len();
            if s.dropped || s.eof {
                return Ok(true);
            }
            s.buf.extend_from_slice(data);
            Ok(false)
        })?;
        if discarded {
            self.shared.grant(data.len());
        } else {
            self.shared.wake.notify_one();
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
        self.shared.wake.notify_one();
    }

    /// Bytes held and not yet taken.
    pub(crate) fn held(&self) -> usize {
        self.shared.with(|s| s.buf.len())
    }
}

impl Drop for InboxTx {
    fn drop(&mut self) {
        self.shared.with(|s| s.closed = true);
        self.shared.wake.notify_one();
    }
}

impl InboxRx {
    /// Everything held so far, waiting for some; `None` once the client sent EOF or the
    /// channel closed and all was taken.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        loop {
            let woken = self.shared.wake.notified();
            let got = self.shared.with(|s| {
                if !s.buf.is_empty() {
                    Some(Some(s.buf.split().freeze()))
                } else if s.eof || s.closed {
                    Some(None)
                } else {
                    None
                }
            });
            if let Some(got) = got {
                return got;
            }
            woken.await;
        }
    }

    /// The consumer took `n` bytes: the client may send that many more.
    pub(crate) fn consumed(&self, n: usize) {
        self.shared.grant(n);
    }

    /// The consumer took bytes it will never write (its sink is gone): their window is given
    /// back, as for what is still held (see `Drop`).
    pub(crate) fn abandoned(&self, n: usize) {
        self.shared.grant(n);
    }
}

impl Drop for InboxRx {
    fn drop(&mut self) {
        // What is held will never be taken: give its window back, and drop what comes.
        let held = self.shared.with(|s| {
            s.dropped = true;
            let n = s.buf.len();
            s.buf = BytesMut::new();
            n
        });
        self.shared.grant(held);
    }
}
