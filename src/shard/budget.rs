//! The latency budget: how long each stage of a message's path took, as
//! fixed-bucket histograms per shard (one counter increment per sample, so
//! it stays on), summed over shards for `/metrics`
//! (`ruyi_message_stage_seconds`) and read by `ruyi-bench` before and after
//! a run. Times are microseconds on the clock every shard shares
//! ([`crate::time::SystemClock::micros`]), so a stage that starts on one
//! shard and ends on another is measured as it happened.
//!
//! The stages of a send, in order (each sample is one message):
//! `route` (its frame read on the sender's shard, to queued at the
//! channel's owner), `queue` (to its commit begun), `write` (to durable:
//! the batch's write and sync on the blocking thread, and back), then
//! `ack_return` (to its `SendAck` queued on the sender's connection; the hop
//! back when the owner is another shard) and `fanout` (to the message's
//! arrival on a recipient's shard). `send_ack` and `delivered` are the
//! totals from the frame read to the `SendAck`, and to a live push, queued
//! on their connections; `flush` is how long queued bytes waited for their
//! connection's socket (one sample per write); `recv_ack` is from a push
//! queued on a device's connection to the device's acknowledgement of it
//! (the device's round trip, the flush included).

/// One stage of a message's path (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Route,
    Queue,
    Write,
    AckReturn,
    Fanout,
    SendAck,
    Delivered,
    Flush,
    RecvAck,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Route,
        Stage::Queue,
        Stage::Write,
        Stage::AckReturn,
        Stage::Fanout,
        Stage::SendAck,
        Stage::Delivered,
        Stage::Flush,
        Stage::RecvAck,
    ];

    /// Its label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Route => "route",
            Stage::Queue => "queue",
            Stage::Write => "write",
            Stage::AckReturn => "ack_return",
            Stage::Fanout => "fanout",
            Stage::SendAck => "send_ack",
            Stage::Delivered => "delivered",
            Stage::Flush => "flush",
            Stage::RecvAck => "recv_ack",
        }
    }
}

/// Upper bounds of the buckets, in microseconds; a last bucket counts the
/// rest.
pub const STAGE_BUCKETS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// Per stage, samples by bucket (not cumulative), their sum and count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageLatency {
    pub counts: [[u64; STAGE_BUCKETS_US.len() + 1]; Stage::ALL.len()],
    pub sum_us: [u64; Stage::ALL.len()],
    pub count: [u64; Stage::ALL.len()],
}

impl StageLatency {
    /// One sample of `stage`, from `since_us` to `now_us` (a start after the
    /// end, as when one side had no clock, counts as zero).
    pub fn record(&mut self, stage: Stage, since_us: u64, now_us: u64) {
        let micros = now_us.saturating_sub(since_us);
        let slot = STAGE_BUCKETS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(STAGE_BUCKETS_US.len());
        let i = stage as usize;
        self.counts[i][slot] += 1;
        self.sum_us[i] += micros;
        self.count[i] += 1;
    }

    pub fn merge(&mut self, other: &StageLatency) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        for i in 0..Stage::ALL.len() {
            self.sum_us[i] += other.sum_us[i];
            self.count[i] += other.count[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_lands_in_the_first_bucket_that_holds_it_and_merges_add_up() {
        let mut a = StageLatency::default();
        a.record(Stage::Write, 1_000, 1_250);
        a.record(Stage::Write, 0, 2_000_000);
        a.record(Stage::Route, 5, 3);
        assert_eq!(
            a.counts[Stage::Write as usize][4],
            1,
            "250 µs is within 250"
        );
        assert_eq!(a.counts[Stage::Write as usize][STAGE_BUCKETS_US.len()], 1);
        assert_eq!(
            a.counts[Stage::Route as usize][0],
            1,
            "an end before its start is 0"
        );
        assert_eq!(a.sum_us[Stage::Write as usize], 2_000_250);
        let mut b = a;
        b.merge(&a);
        assert_eq!(b.count[Stage::Write as usize], 4);
        assert_eq!(b.sum_us[Stage::Route as usize], 0);
    }
}
