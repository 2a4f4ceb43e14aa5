//! Injected time. Shard logic takes the current time as an argument; the I/O
//! edge reads it from a [`Clock`]. Tests drive the same logic by passing the
//! times they want (the retry timers' tests run minutes in microseconds).

use crate::ids::Millis;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A source of time: a monotonic reading for timeouts and a wall-clock
/// reading for message timestamps.
pub trait Clock {
    /// Monotonic milliseconds since an arbitrary start.
    fn monotonic(&self) -> Millis;
    /// Milliseconds since the Unix epoch.
    fn unix_ms(&self) -> u64;
}

/// The real clock. Every instance counts from the same start (the first
/// use in the process), so monotonic readings of different shards compare:
/// a message's stage timings are taken on several threads.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            start: process_start(),
        }
    }

    /// Monotonic microseconds since the process's start.
    pub fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
}

fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

thread_local! {
    static EVENT_MICROS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Records the monotonic time (microseconds, [`SystemClock::micros`]) of the
/// event this thread is handling, for the I/O edge's own timings (an
/// outbox notes when bytes started waiting in it).
pub fn set_event_micros(micros: u64) {
    EVENT_MICROS.with(|t| t.set(micros));
}

/// What [`set_event_micros`] last recorded on this thread; 0 when nothing
/// has (tests that drive the shard logic without a runtime).
pub fn event_micros() -> u64 {
    EVENT_MICROS.with(|t| t.get())
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn monotonic(&self) -> Millis {
        Millis(self.start.elapsed().as_millis() as u64)
    }

    fn unix_ms(&self) -> u64 {
        unix_now_ms()
    }
}

/// Milliseconds since the Unix epoch from the system clock.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
