//! Single-threaded wake-ups between the tasks of one shard. A shard's tasks
//! all run on one executor thread, so a flag and one stored waker are enough:
//! no atomics, no locks.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes one waiting task. A notification given while nobody waits is kept
/// until the next wait, and several notifications collapse into one.
#[derive(Debug, Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Resolves once a notification has been given since the last wait.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                let mut slot = self.waker.borrow_mut();
                match slot.as_ref() {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        })
        .await
    }
}
