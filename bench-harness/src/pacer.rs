//! One timer per executor for every wait of the load generator.
//!
//! Each sender under `--rate` waits for its next send to fall due, and every
//! connection's read waits with a deadline. Arming a glommio timer for each
//! of those waits costs a timer insertion and cancellation per message, and
//! wakes each sender on its own. Instead, waits are entered here, and one
//! task per executor sleeps until the earliest of them and then wakes every
//! wait due within [`SLACK`] of it together, so senders due at about the same
//! time send in one pass of the executor (one io_uring submission).
//!
//! A paced send counts its latency from when it was due (see
//! `chat::Sender`), so a late wake-up shows in the figures, never hides.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Waits due within this much after the earliest one are woken with it.
pub(crate) const SLACK: Duration = Duration::from_micros(100);

#[derive(Default)]
struct Pacer {
    /// Every entered wait, by when it is due (and a tie-breaking id).
    waits: RefCell<BTreeMap<(Instant, u64), Waker>>,
    next_id: Cell<u64>,
    /// The due the pacer task sleeps towards; `None` while it has nothing
    /// to wait for.
    armed: Cell<Option<Instant>>,
    /// Set when a wait due before `armed` is entered: the task re-arms.
    changed: Cell<bool>,
    task: RefCell<Option<Waker>>,
}

thread_local! {
    static PACER: RefCell<Option<Rc<Pacer>>> = const { RefCell::new(None) };
}

/// This executor's pacer, started on first use.
fn pacer() -> Rc<Pacer> {
    PACER.with(|slot| {
        Rc::clone(slot.borrow_mut().get_or_insert_with(|| {
            let pacer = Rc::new(Pacer::default());
            glommio::spawn_local(run(Rc::clone(&pacer))).detach();
            pacer
        }))
    })
}

/// Resolves at `due` (or up to [`SLACK`] before it, with the waits due
/// nearby).
pub(crate) fn sleep_until(due: Instant) -> Sleep {
    Sleep {
        pacer: pacer(),
        due,
        id: None,
    }
}

/// The pacer's future: see [`sleep_until`].
pub(crate) struct Sleep {
    pacer: Rc<Pacer>,
    due: Instant,
    /// Its entry in `waits`, once entered. An entered wait whose entry is
    /// gone has been woken.
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let pacer = &this.pacer;
        match this.id {
            Some(id) => {
                let mut waits = pacer.waits.borrow_mut();
                match waits.get_mut(&(this.due, id)) {
                    None => {
                        this.id = None;
                        return Poll::Ready(());
                    }
                    Some(waker) => {
                        if !waker.will_wake(cx.waker()) {
                            waker.clone_from(cx.waker());
                        }
                    }
                }
            }
            None => {
                if this.due <= Instant::now() {
                    return Poll::Ready(());
                }
                let id = pacer.next_id.get();
                pacer.next_id.set(id + 1);
                pacer
                    .waits
                    .borrow_mut()
                    .insert((this.due, id), cx.waker().clone());
                this.id = Some(id);
                if pacer.armed.get().is_none_or(|armed| this.due < armed) {
                    pacer.changed.set(true);
                    if let Some(task) = pacer.task.borrow_mut().take() {
                        task.wake();
                    }
                }
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.pacer.waits.borrow_mut().remove(&(self.due, id));
        }
    }
}

/// Resolves when a wait earlier than the armed one has been entered.
struct Changed<'a>(&'a Pacer);

impl Future for Changed<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.changed.replace(false) {
            return Poll::Ready(());
        }
        *self.0.task.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The pacer task: sleeps until the earliest wait, then wakes every wait
/// due by then plus [`SLACK`].
async fn run(pacer: Rc<Pacer>) {
    loop {
        pacer.changed.set(false);
        let earliest = pacer.waits.borrow().keys().next().map(|(due, _)| *due);
        pacer.armed.set(earliest);
        let Some(due) = earliest else {
            Changed(&pacer).await;
            continue;
        };
        let now = Instant::now();
        if due > now + SLACK {
            futures_lite::future::or(glommio::timer::sleep(due - now), Changed(&pacer)).await;
        }
        let limit = Instant::now() + SLACK;
        let due_now = {
            let mut waits = pacer.waits.borrow_mut();
            let later = waits.split_off(&(limit, u64::MAX));
            std::mem::replace(&mut *waits, later)
        };
        for waker in due_now.into_values() {
            waker.wake();
        }
    }
}

/// Runs `future`, giving up at `until`: `None` when it did not finish in
/// time.
pub(crate) async fn until<T>(until: Instant, future: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(future.await) }, async {
        sleep_until(until).await;
        None
    })
    .await
}
