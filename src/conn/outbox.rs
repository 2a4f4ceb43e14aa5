//! A connection's outgoing bytes. Everything the shard produces for a
//! connection during one tick is appended here; the connection's task wakes
//! once and writes it all with one `send`. This is where write coalescing
//! happens.

use crate::protocol::ReasonCode;
use bytes::BytesMut;
use std::cell::{Cell, RefCell};
use std::task::Waker;

#[derive(Debug, Default)]
pub struct Outbox {
    buf: RefCell<BytesMut>,
    waker: RefCell<Option<Waker>>,
    /// Set when the server has decided to close: the `Disconnect` is already
    /// queued, nothing more is read, and the task ends once `buf` is written.
    closing: Cell<Option<ReasonCode>>,
    /// Set when the connection must end now, without flushing.
    aborted: Cell<bool>,
    /// Since when bytes have been waiting to go out; cleared only when the
    /// connection's task has written everything it took (a trickle of
    /// progress does not count as catching up).
    stalled_since: Cell<Option<crate::ids::Millis>>,
    /// Bytes the connection's task took out of `buf` and has not written
    /// yet: they still count against the connection's outbound limit.
    in_writer: Cell<usize>,
    /// When the bytes in `buf`, and those the task took, started waiting
    /// (the event clock, [`crate::time::event_micros`]; 0: not known), for
    /// the latency budget's `flush` stage.
    queued_since_us: Cell<u64>,
    taken_since_us: Cell<u64>,
}

impl Outbox {
    /// Appends through `write`, then wakes the connection's task.
    pub fn append(&self, write: impl FnOnce(&mut BytesMut)) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            self.queued_since_us.set(crate::time::event_micros());
        }
        write(&mut buf);
        drop(buf);
        self.wake();
    }

    /// Bytes queued and not yet taken by the connection's task.
    pub fn len(&self) -> usize {
        self.buf.borrow().len()
    }

    /// Everything not yet written to the socket: queued, and taken by the
    /// task but not written. What `outbound_buffer_max_bytes` bounds.
    pub fn unwritten(&self) -> usize {
        self.buf.borrow().len() + self.in_writer.get()
    }

    /// The task wrote `n` of the bytes it took.
    pub fn wrote(&self, n: usize) {
        self.in_writer.set(self.in_writer.get().saturating_sub(n));
    }

    pub fn is_empty(&self) -> bool {
        self.buf.borrow().is_empty()
    }

    /// Moves everything queued into `dst`, which must be empty. Swapping
    /// buffers keeps their allocations alive for reuse.
    pub fn take_into(&self, dst: &mut BytesMut) {
        debug_assert!(dst.is_empty());
        std::mem::swap(&mut *self.buf.borrow_mut(), dst);
        self.in_writer.set(self.in_writer.get() + dst.len());
        if !dst.is_empty() {
            self.taken_since_us.set(self.queued_since_us.replace(0));
        }
    }

    /// When the bytes last taken by [`Outbox::take_into`] started waiting
    /// (0: not known); asked once they are written.
    pub fn taken_since_us(&self) -> u64 {
        self.taken_since_us.replace(0)
    }

    /// Drops the allocation of a connection that has gone quiet, so idle
    /// connections cost little memory.
    pub fn shrink_if_idle(&self, keep_bytes: usize) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() && buf.capacity() > keep_bytes {
            *buf = BytesMut::new();
        }
    }

    pub fn register(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        match slot.as_ref() {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    pub fn wake(&self) {
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }

    pub fn start_closing(&self, reason: ReasonCode) {
        if self.closing.get().is_none() {
            self.closing.set(Some(reason));
        }
        self.wake();
    }

    pub fn closing(&self) -> Option<ReasonCode> {
        self.closing.get()
    }

    pub fn abort(&self) {
        self.aborted.set(true);
        self.wake();
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.get()
    }

    /// The socket took no bytes although some wait to be written.
    pub fn mark_stalled(&self, now: crate::ids::Millis) {
        if self.stalled_since.get().is_none() {
            self.stalled_since.set(Some(now));
        }
    }

    /// Everything taken was written (or nothing waits).
    pub fn mark_flowing(&self) {
        self.stalled_since.set(None);
    }

    pub fn stalled_since(&self) -> Option<crate::ids::Millis> {
        self.stalled_since.get()
    }
}
