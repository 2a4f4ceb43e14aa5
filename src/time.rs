//! Injected time. Shard logic takes the current time as an argument; the I/O
//! edge reads it from a [`Clock`]. Tests drive the same logic with a
//! [`ManualClock`] and never sleep.

use crate::ids::Millis;
use std::cell::Cell;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A source of time: a monotonic reading for timeouts and a wall-clock
/// reading for message timestamps.
pub trait Clock {
    /// Monotonic milliseconds since an arbitrary start.
    fn monotonic(&self) -> Millis;
    /// Milliseconds since the Unix epoch.
    fn unix_ms(&self) -> u64;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            start: Instant::now(),
        }
    }
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

/// A clock that moves only when told to; for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Cell<u64>,
    unix_base: u64,
}

impl ManualClock {
    pub fn new(unix_base: u64) -> ManualClock {
        ManualClock {
            now: Cell::new(0),
            unix_base,
        }
    }

    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
}

impl Clock for ManualClock {
    fn monotonic(&self) -> Millis {
        Millis(self.now.get())
    }

    fn unix_ms(&self) -> u64 {
        self.unix_base + self.now.get()
    }
}
