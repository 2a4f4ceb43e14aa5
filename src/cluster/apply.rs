//! Applying a partition's log to this node's own store: every node of a
//! cluster keeps a full copy of every partition, so any node can serve sync
//! and resume devices, and a node taking a partition over continues from
//! its copy.
//!
//! Records are applied in log order, each at most once: the position
//! applied to is written in the same batch as the record's mutations, so a
//! crash leaves both or neither, and a record at or below the position
//! (read again after a restart, or delivered twice) is skipped.

use super::bridge::{BridgeError, LogBridge};
use super::log::AppendError;
use super::record::{LogRecord, RecordError};
use crate::storage::{Mutation, ShardStore, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("a record of partition {found} in the log of partition {expected}")]
    WrongPartition { expected: u32, found: u32 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// How far one partition's log is applied to this node's store. One
/// `Applier` per partition and node: two would each skip only what they
/// themselves applied.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("reading the log: {0}")]
    Read(#[from] AppendError),
    #[error("the record at sequence {seq}: {error}")]
    Record { seq: u64, error: RecordError },
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// What a catch-up applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaughtUp {
    /// Records applied.
    pub records: u64,
    /// The stream sequence of the last record read (the position).
    pub last: u64,
}

/// Reads `subject`'s records after `from`, `batch` at a time, and hands
/// each to `apply` in log order until the log holds no more.
pub async fn catch_up(
    bridge: &LogBridge,
    subject: &str,
    from: u64,
    batch: usize,
    mut apply: impl FnMut(u64, &LogRecord) -> Result<(), ApplyError>,
) -> Result<CaughtUp, CatchUpError> {
    let mut caught = CaughtUp {
        records: 0,
        last: from,
    };
    loop {
        let records = bridge
            .read_after(subject.to_string(), caught.last, batch)
            .await??;
        let done = records.len() < batch;
        for (seq, payload) in records {
            let record =
                LogRecord::decode(&payload).map_err(|error| CatchUpError::Record { seq, error })?;
            apply(seq, &record)?;
            caught.records += 1;
            caught.last = seq;
        }
        if done {
            return Ok(caught);
        }
    }
}

#[derive(Debug)]
pub struct Applier {
    partition: u32,
    applied: u64,
}

impl Applier {
    /// Continues from the position stored by the last run (0: the start).
    pub fn open(store: &mut dyn ShardStore, partition: u32) -> Result<Applier, StorageError> {
        Ok(Applier {
            partition,
            applied: store.log_applied(partition)?,
        })
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The stream sequence of the last record applied: reading the log
    /// continues after it.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Applies `record`, stored in the log at stream sequence `seq`, with
    /// the new position in the same batch. Returns false, writing nothing,
    /// for a record already applied. Sequences of one partition grow but
    /// need not be consecutive (one stream holds every partition).
    pub fn apply(
        &mut self,
        store: &mut dyn ShardStore,
        seq: u64,
        record: &LogRecord,
    ) -> Result<bool, ApplyError> {
        if record.partition != self.partition {
            return Err(ApplyError::WrongPartition {
                expected: self.partition,
                found: record.partition,
            });
        }
        if seq <= self.applied {
            return Ok(false);
        }
        let mut batch = Vec::with_capacity(record.mutations.len() + 1);
        batch.extend(record.mutations.iter().cloned());
        batch.push(Mutation::LogApplied {
            partition: self.partition,
            seq,
        });
        store.commit(&batch)?;
        self.applied = seq;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::record::Writer;
    use crate::ids::{Seq, ShardId};
    use crate::key::ChannelKey;
    use crate::storage::{test_message, MemoryStorage, ReadDirection, Storage};

    fn record(partition: u32, seq: u64) -> LogRecord {
        LogRecord {
            partition,
            writer: Writer { node: 1, epoch: 1 },
            mutations: vec![Mutation::Message(test_message(
                &ChannelKey::group("g"),
                seq,
                "alice",
            ))],
        }
    }

    #[test]
    fn records_apply_once_in_order_and_the_position_survives_a_reopen() {
        let storage = MemoryStorage::default();
        let mut store = storage.open_shard(ShardId(0)).unwrap();
        let mut applier = Applier::open(&mut *store, 4).unwrap();
        assert_eq!(applier.applied(), 0);
        assert!(applier.apply(&mut *store, 3, &record(4, 1)).unwrap());
        assert!(applier.apply(&mut *store, 9, &record(4, 2)).unwrap());
        // Delivered again: skipped.
        assert!(!applier.apply(&mut *store, 9, &record(4, 2)).unwrap());
        assert!(!applier.apply(&mut *store, 3, &record(4, 1)).unwrap());
        assert!(matches!(
            applier.apply(&mut *store, 10, &record(5, 3)),
            Err(ApplyError::WrongPartition {
                expected: 4,
                found: 5
            })
        ));
        let read = store
            .read_messages(&ChannelKey::group("g"), Seq(1), 10, ReadDirection::Up)
            .unwrap();
        assert_eq!(read.iter().map(|m| m.seq.0).collect::<Vec<_>>(), [1, 2]);

        let mut reopened = storage.open_shard(ShardId(1)).unwrap();
        let again = Applier::open(&mut *reopened, 4).unwrap();
        assert_eq!(again.applied(), 9);
        assert_eq!(Applier::open(&mut *reopened, 5).unwrap().applied(), 0);
    }
}
