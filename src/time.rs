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
