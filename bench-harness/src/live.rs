//! What a run shows while it runs, and what `--plot` draws afterwards.
//!
//! Every task records into its own [`Meter`] (plain counters and a
//! histogram, no sharing on the hot path) and hands them to the shared
//! [`Live`] at most every 100 ms. A watcher thread prints one progress line
//! a second from those totals and keeps each second as a [`Sample`].
//! [`Live`] also holds when the measured window starts (after `--warmup-s`).

use hdrhistogram::Histogram;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Totals over all tasks, and the latencies of the current second.
pub(crate) struct Live {
    acked: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    reconnects: AtomicU64,
    /// Send->SendAck and send->delivery latencies since the watcher's last
    /// line.
    window: Mutex<(Histogram<u64>, Histogram<u64>)>,
    /// Start of the measured window: the gate's opening plus the warm-up.
    measure_from: OnceLock<Instant>,
}

/// One second of a run, for `--plot` and the JSON.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct Sample {
    /// Seconds since the gate opened, at the end of this second.
    pub(crate) t_s: f64,
    pub(crate) sends_per_s: f64,
    pub(crate) deliveries_per_s: f64,
    pub(crate) ack_p99_us: u64,
    pub(crate) delivery_p99_us: u64,
    pub(crate) failed: u64,
}

/// For the per-second figures: two significant figures are enough, and a
/// histogram a tenth the size of a three-figure one is cheap to merge and
/// clear (each task hands its own over up to ten times a second).
fn histogram() -> Histogram<u64> {
    Histogram::new(2).expect("2 significant figures is valid")
}

impl Live {
    pub(crate) fn new() -> Arc<Live> {
        Arc::new(Live {
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            window: Mutex::new((histogram(), histogram())),
            measure_from: OnceLock::new(),
        })
    }

    /// Called once, by the main thread, when the gate opens.
    pub(crate) fn start_measuring(&self, at: Instant) {
        let _ = self.measure_from.set(at);
    }

    /// Whether `at` falls in the measured window (false during the warm-up
    /// and before the gate opened).
    pub(crate) fn measuring(&self, at: Instant) -> bool {
        self.measure_from.get().is_some_and(|from| at >= *from)
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts the progress line: one line a second on stderr (rewritten in
    /// place on a terminal) until [`Watcher::stop`].
    pub(crate) fn watch(self: &Arc<Self>, label: &str) -> Watcher {
        let live = Arc::clone(self);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let label = label.to_owned();
        let handle = std::thread::Builder::new()
            .name("bench-progress".into())
            .spawn(move || live.progress(&label, &stopping))
            .expect("spawning the progress thread");
        Watcher { stop, handle }
    }

    fn progress(&self, label: &str, stop: &AtomicBool) -> Vec<Sample> {
        let tty = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut samples = Vec::new();
        let (mut acked, mut delivered) = (0, 0);
        let mut tick = started;
        let mut last_sample = started;
        while !stop.load(Ordering::SeqCst) {
            tick += Duration::from_secs(1);
            while Instant::now() < tick {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20).min(tick - Instant::now()));
            }
            let elapsed = Instant::now();
            // Late (a stalled machine): the next second starts now.
            tick = tick.max(elapsed);
            // Over the time since the last sample, however late this one is.
            let span = (elapsed - last_sample).as_secs_f64().max(1e-3);
            last_sample = elapsed;
            let now_acked = self.acked.load(Ordering::Relaxed);
            let now_delivered = self.delivered.load(Ordering::Relaxed);
            let (ack_p99_us, delivery_p99_us) = {
                let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
                let p99 = (
                    window.0.value_at_quantile(0.99),
                    window.1.value_at_quantile(0.99),
                );
                window.0.reset();
                window.1.reset();
                p99
            };
            let sample = Sample {
                t_s: (elapsed - started).as_secs_f64(),
                sends_per_s: (now_acked - acked) as f64 / span,
                deliveries_per_s: (now_delivered - delivered) as f64 / span,
                ack_p99_us,
                delivery_p99_us,
                failed: self.failed.load(Ordering::Relaxed),
            };
            (acked, delivered) = (now_acked, now_delivered);
            if span < 0.5 {
                // The stub of a second when the run ended: a rate over it
                // would mostly show when the last counts were handed over.
                continue;
            }
            let reconnects = self.reconnects.load(Ordering::Relaxed);
            let line = format!(
                "{label} {:>5.0} s  {:>9.0} sends/s  {:>9.0} deliveries/s  p99 ack {:>6} us  delivery {:>6} us  failed {}  reconnects {reconnects}",
                sample.t_s,
                sample.sends_per_s,
                sample.deliveries_per_s,
                sample.ack_p99_us,
                sample.delivery_p99_us,
                sample.failed
            );
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}\x1b[K")
            } else {
                writeln!(err, "{line}")
            };
            samples.push(sample);
        }
        if tty {
            let _ = writeln!(std::io::stderr());
        }
        samples
    }
}

/// The running progress line.
pub(crate) struct Watcher {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Watcher {
    /// Ends the progress line; every second it saw.
    pub(crate) fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// One task's share of the progress line.
pub(crate) struct Meter {
    live: Arc<Live>,
    acked: u64,
    delivered: u64,
    failed: u64,
    ack_us: Histogram<u64>,
    delivery_us: Histogram<u64>,
    flushed: Instant,
}

impl Meter {
    pub(crate) fn new(live: &Arc<Live>) -> Meter {
        Meter {
            live: Arc::clone(live),
            acked: 0,
            delivered: 0,
            failed: 0,
            ack_us: histogram(),
            delivery_us: histogram(),
            flushed: Instant::now(),
        }
    }

    pub(crate) fn live(&self) -> &Arc<Live> {
        &self.live
    }

    pub(crate) fn acked(&mut self, latency_us: u64, now: Instant) {
        self.acked += 1;
        let _ = self.ack_us.record(latency_us);
        self.maybe_flush(now);
    }

    pub(crate) fn delivered(&mut self, latency_us: u64, now: Instant) {
        self.delivered += 1;
        let _ = self.delivery_us.record(latency_us);
        self.maybe_flush(now);
    }

    pub(crate) fn failed(&mut self, count: u64) {
        self.failed += count;
    }

    /// The task has nothing to do: what it counted goes to [`Live`] if the
    /// last hand-over is 100 ms old (not at every idle moment: a paced
    /// sender is idle between most of its sends).
    pub(crate) fn idle(&mut self) {
        self.maybe_flush(Instant::now());
    }

    fn maybe_flush(&mut self, now: Instant) {
        if now.saturating_duration_since(self.flushed) >= Duration::from_millis(100) {
            self.flushed = now;
            self.flush();
        }
    }

    /// Hands what this task counted since the last flush to [`Live`].
    pub(crate) fn flush(&mut self) {
        let live = &self.live;
        live.acked
            .fetch_add(std::mem::take(&mut self.acked), Ordering::Relaxed);
        live.delivered
            .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
        live.failed
            .fetch_add(std::mem::take(&mut self.failed), Ordering::Relaxed);
        if !self.ack_us.is_empty() || !self.delivery_us.is_empty() {
            let mut window = live.window.lock().unwrap_or_else(|e| e.into_inner());
            let _ = window.0.add(&self.ack_us);
            let _ = window.1.add(&self.delivery_us);
            drop(window);
            self.ack_us.reset();
            self.delivery_us.reset();
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.flush();
    }
}
