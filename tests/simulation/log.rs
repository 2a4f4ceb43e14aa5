//! The replicated log as a model, for the runs where the shards commit
//! through it (`[cluster]`): JetStream's fenced append as
//! `tests/cluster_nats.rs` measured it, with the faults a real cluster
//! has, each drawn from the run's seed: an append lost before it is
//! stored, one stored whose answer is lost, one proposed without an answer
//! that lands later (if its place is still free), and another writer
//! taking a partition's next place.

use super::rng::Rng;
use bytes::Bytes;
use ruyi::cluster::bridge::AppendRequest;
use ruyi::cluster::log::{append_id, AppendError, Appended};
use ruyi::cluster::record::{LogRecord, Writer};

/// A stored record.
struct Stored {
    seq: u64,
    subject: String,
    id: String,
    payload: Bytes,
}

/// An append proposed without an answer: it may still land.
struct Proposed {
    subject: String,
    expected: u64,
    id: String,
    payload: Bytes,
}

#[derive(Default)]
pub struct ModelLog {
    records: Vec<Stored>,
    proposed: Vec<Proposed>,
    /// Appends answered `Unknown`, for the summary.
    pub unknown_answers: usize,
    /// Records appended by another writer.
    pub foreign: usize,
}

/// What happens to one append attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Never reaches a quorum: nothing stored, no answer.
    Lost,
    /// Stored, the answer lost.
    AckLost,
    /// No answer now; it may land later.
    LandsLater,
}

impl ModelLog {
    /// The sequence of `subject`'s last record (0 when it has none).
    pub fn last_of(&self, subject: &str) -> u64 {
        self.records
            .iter()
            .rev()
            .find(|r| r.subject == subject)
            .map_or(0, |r| r.seq)
    }

    fn next_seq(&self) -> u64 {
        self.records.last().map_or(1, |r| r.seq + 1)
    }

    /// JetStream's answer to a publish with the fence and the id: the
    /// same id again is the first one's sequence (the duplicate window,
    /// or the 10071 read-back `cluster::log::append` makes beyond it); a
    /// fence that does not hold is the holder of the place.
    fn store(
        &mut self,
        subject: &str,
        expected: u64,
        id: &str,
        payload: &Bytes,
    ) -> Result<Appended, AppendError> {
        if let Some(r) = self.records.iter().find(|r| r.id == id) {
            return Ok(Appended {
                seq: r.seq,
                earlier: true,
            });
        }
        if self.last_of(subject) != expected {
            return match self
                .records
                .iter()
                .find(|r| r.subject == subject && r.seq > expected)
            {
                Some(r) => Err(AppendError::Conflict { at: r.seq }),
                None => Err(AppendError::Refused(format!(
                    "the fence expected {expected} on {subject}, which holds no message after it"
                ))),
            };
        }
        let seq = self.next_seq();
        self.records.push(Stored {
            seq,
            subject: subject.to_string(),
            id: id.to_string(),
            payload: payload.clone(),
        });
        Ok(Appended {
            seq,
            earlier: false,
        })
    }

    /// One round of appends, as the bridge runs it: each subject's in
    /// order, an append naming no expected sequence after the one before
    /// it, which must be stored. `faulty`: the percent chance of a fault
    /// per append.
    pub fn append_all(
        &mut self,
        requests: Vec<AppendRequest>,
        faulty: u64,
        rng: &mut Rng,
    ) -> Vec<Result<Appended, AppendError>> {
        let mut previous: Vec<(String, Result<u64, ()>)> = Vec::new();
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            let before = previous
                .iter()
                .rev()
                .find(|(s, _)| *s == request.subject)
                .map(|(_, r)| *r);
            let expected = match (request.expected, before) {
                (Some(expected), _) => expected,
                (None, Some(Ok(seq))) => seq,
                (None, _) => {
                    previous.push((request.subject.clone(), Err(())));
                    results.push(Err(AppendError::Unknown("not tried".into())));
                    continue;
                }
            };
            let id = append_id(&request.subject, expected, &request.writer);
            let fault = if rng.chance(faulty) {
                *rng.pick(&[Fault::Lost, Fault::AckLost, Fault::LandsLater])
            } else {
                Fault::None
            };
            let result = match fault {
                Fault::None => self.store(&request.subject, expected, &id, &request.payload),
                Fault::Lost => Err(AppendError::Unknown("no quorum".into())),
                Fault::AckLost => {
                    let _ = self.store(&request.subject, expected, &id, &request.payload);
                    Err(AppendError::Unknown("the answer was lost".into()))
                }
                Fault::LandsLater => {
                    self.proposed.push(Proposed {
                        subject: request.subject.clone(),
                        expected,
                        id,
                        payload: request.payload.clone(),
                    });
                    Err(AppendError::Unknown("proposed, not answered".into()))
                }
            };
            if matches!(result, Err(AppendError::Unknown(_))) {
                self.unknown_answers += 1;
            }
            previous.push((
                request.subject,
                result.as_ref().map(|a| a.seq).map_err(|_| ()),
            ));
            results.push(result);
        }
        results
    }

    /// A proposed append lands (if its place is still free) or is dropped.
    pub fn settle_one_proposed(&mut self, rng: &mut Rng) -> bool {
        if self.proposed.is_empty() {
            return false;
        }
        let p = self.proposed.remove(rng.index(self.proposed.len()));
        if rng.chance(50) {
            let _ = self.store(&p.subject, p.expected, &p.id, &p.payload);
        }
        true
    }

    /// Another writer (node 99) takes `subject`'s next place with a record
    /// that changes nothing: the owner is fenced off once.
    pub fn foreign_append(&mut self, subject: &str, partition: u32) {
        let record = LogRecord {
            partition,
            writer: Writer { node: 99, epoch: 1 },
            mutations: Vec::new(),
        };
        let expected = self.last_of(subject);
        let id = append_id(subject, expected, "n99");
        let _ = self.store(subject, expected, &id, &Bytes::from(record.encode()));
        self.foreign += 1;
    }

    /// The first record of `subject` after `after`.
    pub fn first_after(&self, subject: &str, after: u64) -> Option<(u64, Bytes)> {
        self.records
            .iter()
            .find(|r| r.subject == subject && r.seq > after)
            .map(|r| (r.seq, r.payload.clone()))
    }

    /// Every record of `subject` after `after`, in order.
    pub fn read_after(&self, subject: &str, after: u64) -> Vec<(u64, Bytes)> {
        self.records
            .iter()
            .filter(|r| r.subject == subject && r.seq > after)
            .map(|r| (r.seq, r.payload.clone()))
            .collect()
    }
}
