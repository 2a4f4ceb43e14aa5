//! What a message scenario measured, whatever the target: counts,
//! correctness, latencies, the server's CPU and memory, and the run second
//! by second. Every target (ruyi, MQTT, NATS) fills the same [`Part`]s, so
//! their reports compare field by field.

use crate::common::{percentiles, print_latency, unix_us, CommonArgs, ServerUsage};
use crate::live::{Live, Meter, Sample};
use crate::process::Measured;
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::Instant;

/// What one task (or executor, or the whole run) measured.
pub(crate) struct Part {
    pub(crate) sent: u64,
    /// Acknowledged sends, warm-up included (what correctness is checked
    /// against).
    pub(crate) acked: u64,
    pub(crate) failed: u64,
    /// Deliveries after the client's dedup, warm-up included.
    pub(crate) delivered: u64,
    /// Deliveries the client's dedup removed (a message at or below the
    /// highest seq the device already had): pushed again after a restart
    /// lost the device's last acknowledged position. Not a violation.
    pub(crate) redelivered: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) reordered: u64,
    /// Delivered, but never acknowledged to a sender (or to the wrong
    /// device, e.g. echoed to the sending device).
    pub(crate) unexpected: u64,
    /// Acks and deliveries inside the measured window (after the warm-up):
    /// what the rates and histograms are made of.
    pub(crate) acked_measured: u64,
    pub(crate) delivered_measured: u64,
    pub(crate) ack_latency_us: Histogram<u64>,
    pub(crate) delivery_latency_us: Histogram<u64>,
    /// When the last SendAck and the last delivery arrived.
    pub(crate) last_ack: Option<Instant>,
    pub(crate) last_delivery: Option<Instant>,
    meter: Option<Meter>,
}

impl Part {
    /// A part that only sums others (no progress line, no warm-up).
    pub(crate) fn new() -> Part {
        Part {
            sent: 0,
            acked: 0,
            failed: 0,
            delivered: 0,
            redelivered: 0,
            lost: 0,
            duplicated: 0,
            reordered: 0,
            unexpected: 0,
            acked_measured: 0,
            delivered_measured: 0,
            last_ack: None,
            last_delivery: None,
            ack_latency_us: Histogram::new(3).expect("valid sigfig"),
            delivery_latency_us: Histogram::new(3).expect("valid sigfig"),
            meter: None,
        }
    }

    /// A task's part: feeds the progress line and honours the warm-up.
    pub(crate) fn metered(live: &Arc<Live>) -> Part {
        Part {
            meter: Some(Meter::new(live)),
            ..Part::new()
        }
    }

    fn measuring(&self, now: Instant) -> bool {
        self.meter
            .as_ref()
            .is_none_or(|meter| meter.live().measuring(now))
    }

    /// A SendAck with success for a send made at `sent_at_us` (unix µs).
    pub(crate) fn on_ack(&mut self, sent_at_us: u64) {
        let now = Instant::now();
        let latency = unix_us().saturating_sub(sent_at_us);
        self.acked += 1;
        self.last_ack = Some(now);
        if self.measuring(now) {
            self.acked_measured += 1;
            let _ = self.ack_latency_us.record(latency);
        }
        if let Some(meter) = &mut self.meter {
            meter.acked(latency, now);
        }
    }

    /// A delivery (after dedup) of a message sent at `sent_at_us`.
    pub(crate) fn on_delivery(&mut self, sent_at_us: u64) {
        let now = Instant::now();
        let latency = unix_us().saturating_sub(sent_at_us);
        self.delivered += 1;
        self.last_delivery = Some(now);
        if self.measuring(now) {
            self.delivered_measured += 1;
            let _ = self.delivery_latency_us.record(latency);
        }
        if let Some(meter) = &mut self.meter {
            meter.delivered(latency, now);
        }
    }

    /// Sends that will never be acknowledged (refused, or given up on).
    pub(crate) fn on_failed(&mut self, count: u64) {
        self.failed += count;
        if let Some(meter) = &mut self.meter {
            meter.failed(count);
        }
    }

    /// Hands what the progress line has not seen yet to it, when idle (at
    /// most every 100 ms).
    pub(crate) fn flush_meter(&mut self) {
        if let Some(meter) = &mut self.meter {
            meter.idle();
        }
    }

    pub(crate) fn add(&mut self, other: &Part) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.failed += other.failed;
        self.delivered += other.delivered;
        self.redelivered += other.redelivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.unexpected += other.unexpected;
        self.acked_measured += other.acked_measured;
        self.delivered_measured += other.delivered_measured;
        self.last_ack = self.last_ack.max(other.last_ack);
        self.last_delivery = self.last_delivery.max(other.last_delivery);
        let _ = self.ack_latency_us.add(&other.ack_latency_us);
        let _ = self.delivery_latency_us.add(&other.delivery_latency_us);
    }

    pub(crate) fn correct(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0 && self.unexpected == 0
    }
}

/// The payload every target carries: the send time (unix µs, for the
/// latencies), then the sender's own counter (so targets without a server
/// seq can be checked for order), then filler.
pub(crate) fn payload(size: usize, sent_at_us: u64, counter: u64) -> bytes::Bytes {
    let mut payload = vec![0u8; size.max(16)];
    payload[..8].copy_from_slice(&sent_at_us.to_le_bytes());
    payload[8..16].copy_from_slice(&counter.to_le_bytes());
    bytes::Bytes::from(payload)
}

/// The send time and counter [`payload`] wrote; `None` when too short.
pub(crate) fn read_payload(payload: &[u8]) -> Option<(u64, u64)> {
    let at = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let counter = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((at, counter))
}

/// How long a run took: `duration_s` of sending (the parameter), and from
/// the start of the measured window to the last SendAck and to the last
/// delivery, which the rates are computed over (a backlog drained after
/// the senders stopped makes `delivering_s` longer than `duration_s`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spans {
    pub(crate) duration_s: f64,
    pub(crate) warmup_s: f64,
    pub(crate) sending_s: f64,
    pub(crate) delivering_s: f64,
}

impl Spans {
    pub(crate) fn new(duration_s: f64, warmup_s: f64, measure_from: Instant, part: &Part) -> Spans {
        let since = |at: Option<Instant>| {
            at.map_or(duration_s, |at| {
                at.saturating_duration_since(measure_from).as_secs_f64()
            })
            .max(1e-6)
        };
        Spans {
            duration_s,
            warmup_s,
            sending_s: since(part.last_ack),
            delivering_s: since(part.last_delivery),
        }
    }
}

/// One run of a message scenario.
pub struct Report {
    pub(crate) scenario: &'static str,
    pub(crate) target: String,
    pub(crate) args: String,
    pub(crate) spans: Spans,
    pub(crate) total: Part,
    pub(crate) server: ServerUsage,
    pub(crate) samples: Vec<Sample>,
    pub(crate) budget: Option<Vec<crate::budget::StageFigures>>,
    /// Scenario-specific figures, printed and put in the JSON as they are.
    pub(crate) extra: Vec<(String, serde_json::Value)>,
}

impl Report {
    /// A run's report from its totals, what the main thread measured, and
    /// the scenario's own figures (the chaos figures are added here).
    pub(crate) fn new(
        scenario: &'static str,
        common: &CommonArgs,
        args: String,
        total: Part,
        measured: Measured,
        mut extra: Vec<(String, serde_json::Value)>,
    ) -> Report {
        if common.chaos.is_some() {
            extra.push(("server_kills".to_owned(), measured.kills.into()));
            extra.push((
                "longest_restart_s".to_owned(),
                measured.longest_restart.as_secs_f64().into(),
            ));
        }
        Report {
            scenario,
            target: common.target.to_string(),
            args,
            spans: Spans::new(
                common.duration_s,
                common.warmup_s,
                measured.measure_from,
                &total,
            ),
            total,
            server: measured.server,
            samples: measured.samples,
            budget: measured.budget,
            extra,
        }
    }

    /// No violation, and at least one send acknowledged (a run where the
    /// server refused everything checked nothing).
    pub fn correct(&self) -> bool {
        if self.total.acked == 0 {
            eprintln!(
                "ruyi-bench: {} against {}: no send was acknowledged, so nothing was checked",
                self.scenario, self.target
            );
            return false;
        }
        self.total.correct()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.total;
        let s = &self.spans;
        let mut json = serde_json::json!({
            "scenario": self.scenario,
            "target": self.target,
            "args": self.args,
            "duration_s": s.duration_s,
            "warmup_s": s.warmup_s,
            "sending_s": s.sending_s,
            "delivering_s": s.delivering_s,
            "sent": t.sent,
            "acked": t.acked,
            "failed": t.failed,
            "delivered": t.delivered,
            "redelivered": t.redelivered,
            "lost": t.lost,
            "duplicated": t.duplicated,
            "reordered": t.reordered,
            "unexpected": t.unexpected,
            "correct": t.correct(),
            "sends_per_s": t.acked_measured as f64 / s.sending_s,
            "deliveries_per_s": t.delivered_measured as f64 / s.delivering_s,
            "ack_latency_us": percentiles(&t.ack_latency_us),
            "delivery_latency_us": percentiles(&t.delivery_latency_us),
            "server_rss_bytes": self.server.rss_bytes,
            "server_cpu_percent": self.server.cpu_percent,
            "generator_cpu_percent": self.server.generator_cpu_percent,
            "latency_budget": self.budget,
            "per_second": self.samples,
        });
        for (key, value) in &self.extra {
            json[key] = value.clone();
        }
        json
    }

    pub fn print_summary(&self) {
        let t = &self.total;
        let s = &self.spans;
        println!("{}: {} against {}", self.scenario, self.args, self.target);
        for (key, value) in &self.extra {
            println!("  {key}: {value}");
        }
        println!(
            "  sent {} acked {} failed {} delivered {} (+{} redelivered, removed by the client's dedup); sending for {:.1} s after {:.1} s of warm-up",
            t.sent, t.acked, t.failed, t.delivered, t.redelivered, s.duration_s, s.warmup_s
        );
        println!(
            "  {:.0} acked sends/s (last SendAck at {:.2} s), {:.0} deliveries/s (last delivery at {:.2} s)",
            t.acked_measured as f64 / s.sending_s,
            s.sending_s,
            t.delivered_measured as f64 / s.delivering_s,
            s.delivering_s
        );
        print_latency("send->SendAck", &t.ack_latency_us);
        print_latency("send->delivery", &t.delivery_latency_us);
        self.server.print();
        if let Some(budget) = &self.budget {
            crate::budget::print(budget);
        }
        println!(
            "  correctness: lost {} duplicated {} reordered {} unexpected {} -> {}",
            t.lost,
            t.duplicated,
            t.reordered,
            t.unexpected,
            if t.correct() { "OK" } else { "FAILED" }
        );
    }
}
