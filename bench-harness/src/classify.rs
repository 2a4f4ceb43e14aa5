//! How one device's deliveries are counted: new, new but out of order,
//! redelivered (a repeat the protocol allows; the client's dedup removes
//! it) or duplicated (a repeat it forbids). One pure function, shared by
//! the ruyi scenarios and the MQTT and NATS targets, so the rule is
//! written once and tested without a server.
//!
//! The rule for a repeat, in order:
//! - flagged by the server as a redelivery: `redelivered`, whatever the
//!   connection (a retry timer racing the ack, or a resend after a
//!   reconnect that the server knew it was making);
//! - unflagged on the connection it first came on: `duplicated` (the
//!   server pushed the same message twice as if new);
//! - unflagged on a newer connection: `redelivered` while the device had
//!   not acknowledged it (the ack may never have reached the server, so
//!   resuming from the last saved position is allowed to send it again),
//!   `duplicated` once it had (an acknowledged message must never come
//!   back unflagged).

/// What the device had of a message before this delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Earlier {
    /// The connection (counted from 1) it came on: the first copy whose
    /// ack was written, else the latest copy.
    pub(crate) epoch: u32,
    /// Whether the device's ack of that copy had been written to that
    /// connection (before it ended).
    pub(crate) acknowledged: bool,
}

/// One delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// The sequence (ruyi: the channel seq; MQTT, NATS: the sender's
    /// counter).
    pub(crate) seq: u64,
    /// The connection it came on.
    pub(crate) epoch: u32,
    /// The server marked it as a redelivery (ruyi's redelivered flag, MQTT
    /// DUP, a JetStream delivery count above 1).
    pub(crate) flagged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Never seen before, above everything seen from its sender.
    New,
    /// Never seen before, but below a seq already seen: `reordered`.
    OutOfOrder,
    /// A repeat the protocol allows: `redelivered`.
    Redelivered,
    /// A repeat the protocol forbids: `duplicated`.
    Duplicated,
}

impl Class {
    /// Whether the delivery is one the device did not have.
    pub(crate) fn is_new(self) -> bool {
        matches!(self, Class::New | Class::OutOfOrder)
    }
}

/// Classifies `arrival`, given what the device had of it (`earlier`) and
/// the highest seq seen so far from the same sender (`highest`).
pub(crate) fn classify(earlier: Option<Earlier>, highest: Option<u64>, arrival: Arrival) -> Class {
    match earlier {
        None if highest.is_some_and(|h| arrival.seq < h) => Class::OutOfOrder,
        None => Class::New,
        Some(_) if arrival.flagged => Class::Redelivered,
        Some(earlier) if earlier.epoch == arrival.epoch => Class::Duplicated,
        Some(earlier) if earlier.acknowledged => Class::Duplicated,
        Some(_) => Class::Redelivered,
    }
}

/// When a device's acknowledgements went out: a count of flushes that
/// wrote them, and the count at which each earlier connection ended. An
/// ack queued but not flushed when its connection ended never left.
#[derive(Debug, Default, Clone)]
pub(crate) struct AckLedger {
    flushes: u64,
    /// `ended_at[e - 1]`: the flush count when connection `e` ended.
    ended_at: Vec<u64>,
}

impl AckLedger {
    /// Everything queued so far, acks included, has been written.
    pub(crate) fn flushed(&mut self) {
        self.flushes += 1;
    }

    /// The current connection ended; a new one starts.
    pub(crate) fn connection_ended(&mut self) {
        self.ended_at.push(self.flushes);
    }

    /// A mark to take when a delivery's ack is queued.
    pub(crate) fn mark(&self) -> u64 {
        self.flushes
    }

    /// Whether an ack queued at `mark` on connection `epoch` was written
    /// before that connection ended (or, if it is the current one, yet).
    pub(crate) fn acknowledged(&self, epoch: u32, mark: u64) -> bool {
        let end = self
            .ended_at
            .get(epoch as usize - 1)
            .copied()
            .unwrap_or(self.flushes);
        end > mark
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(seq: u64, epoch: u32, flagged: bool) -> Arrival {
        Arrival {
            seq,
            epoch,
            flagged,
        }
    }

    fn earlier(epoch: u32, acknowledged: bool) -> Option<Earlier> {
        Some(Earlier {
            epoch,
            acknowledged,
        })
    }

    #[test]
    fn a_first_delivery_is_new() {
        assert_eq!(classify(None, None, arrival(1, 1, false)), Class::New);
        assert_eq!(classify(None, Some(1), arrival(2, 1, false)), Class::New);
        // A gap is not disorder: the missing seq is lost or was never
        // acknowledged, and the accounting says which.
        assert_eq!(classify(None, Some(1), arrival(5, 1, false)), Class::New);
        // The flag on a first delivery (a retry whose original was lost)
        // changes nothing.
        assert_eq!(classify(None, Some(1), arrival(2, 1, true)), Class::New);
    }

    #[test]
    fn a_new_seq_below_one_already_seen_is_out_of_order() {
        assert_eq!(
            classify(None, Some(5), arrival(3, 1, false)),
            Class::OutOfOrder
        );
        assert!(Class::OutOfOrder.is_new());
    }

    #[test]
    fn a_flagged_repeat_on_the_same_connection_is_redelivered() {
        for acknowledged in [false, true] {
            assert_eq!(
                classify(earlier(1, acknowledged), Some(1), arrival(1, 1, true)),
                Class::Redelivered,
                "acknowledged: {acknowledged}"
            );
        }
    }

    #[test]
    fn an_unflagged_repeat_on_the_same_connection_is_duplicated() {
        for acknowledged in [false, true] {
            assert_eq!(
                classify(earlier(1, acknowledged), Some(1), arrival(1, 1, false)),
                Class::Duplicated,
                "acknowledged: {acknowledged}"
            );
        }
    }

    #[test]
    fn an_unflagged_repeat_on_a_newer_connection_before_the_ack_is_redelivered() {
        assert_eq!(
            classify(earlier(1, false), Some(3), arrival(1, 2, false)),
            Class::Redelivered
        );
    }

    #[test]
    fn an_acknowledged_message_back_unflagged_on_a_newer_connection_is_duplicated() {
        assert_eq!(
            classify(earlier(1, true), Some(3), arrival(1, 2, false)),
            Class::Duplicated
        );
        assert_eq!(
            classify(earlier(1, true), Some(3), arrival(1, 5, false)),
            Class::Duplicated
        );
    }

    #[test]
    fn an_acknowledged_message_back_flagged_is_redelivered() {
        assert_eq!(
            classify(earlier(1, true), Some(3), arrival(1, 2, true)),
            Class::Redelivered
        );
    }

    #[test]
    fn repeats_are_not_new_and_first_deliveries_are() {
        assert!(Class::New.is_new());
        assert!(!Class::Redelivered.is_new());
        assert!(!Class::Duplicated.is_new());
    }

    #[test]
    fn an_ack_counts_once_a_flush_after_it_wrote_it_on_its_connection() {
        let mut acks = AckLedger::default();
        // Connection 1: seq 1 arrives and its ack is flushed; seq 2
        // arrives, and the connection ends before the next flush.
        let one = acks.mark();
        assert!(!acks.acknowledged(1, one), "queued, not written yet");
        acks.flushed();
        assert!(acks.acknowledged(1, one));
        let two = acks.mark();
        acks.connection_ended();
        // Connection 2: a flush now does not write connection 1's ack.
        acks.flushed();
        assert!(acks.acknowledged(1, one));
        assert!(!acks.acknowledged(1, two), "lost with its connection");
        let three = acks.mark();
        assert!(!acks.acknowledged(2, three));
        acks.flushed();
        assert!(acks.acknowledged(2, three));
    }
}
