//! Who owns each partition: leases and claims in two JetStream key-value
//! buckets, kept by a task on the NATS thread.
//!
//! - Each node puts its heartbeat (`n.<node>` in the nodes bucket, whose
//!   entries live `cluster.lease_ms`) every third of the lease. Its lease
//!   holds until `cluster.lease_margin_ms` before the lease ends, counted
//!   from when the last acknowledged put was *sent*: the server stamped it
//!   later, so the entry outlives the node's own view by at least the
//!   margin.
//! - A partition's claim (`p.<partition>` in the claims bucket) names the
//!   node that owns it. A claim changes only by a conditional write on the
//!   revision read ([`kv::Store::update`]), so two nodes never both win it.
//! - Another node's claim is taken only once the holder is dead: its
//!   heartbeat is gone, or this node has seen the same heartbeat revision
//!   for longer than a lease. By then the holder's lease has lapsed, so it
//!   answers nothing about its partitions any more (`Places::serving`).
//! - A node whose lease lapsed lets every partition go (its shards stop
//!   writing and follow them instead), and once it puts a heartbeat again
//!   it serves again and takes back, by a conditional write, the claims it
//!   still holds: a claim someone took meanwhile is lost to it.
//! - Which node should own a partition: its preferred node (the static
//!   map's) while that one lives, else the live node ranking highest for
//!   it (rendezvous hashing), so the partitions of a dead node spread over
//!   the others and go back when it returns (the holder hands a partition
//!   back by letting it go, then deleting its claim).
//!
//! Taking a partition over is the shard's part (`crate::shard::log`):
//! catch up on its log, append a barrier, then take writes.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What the lease service is started with.
#[derive(Debug, Clone)]
pub struct LeaseSpec {
    pub node: u32,
    /// Every node of the cluster.
    pub nodes: Vec<u32>,
    /// Per partition, the node the static map gives it to.
    pub preferred: Vec<u32>,
    pub lease: Duration,
    pub margin: Duration,
    /// The buckets' names and replicas.
    pub nodes_bucket: String,
    pub claims_bucket: String,
    pub replicas: usize,
}

impl LeaseSpec {
    fn beat(&self) -> Duration {
        self.lease / 3
    }
}

/// Tells the node's shards to take a partition over (true: caught up,
/// fenced, taking writes) or to let it go (false); the future ends when
/// the shard has done it, with whether it did.
pub type OwnerChange = Arc<dyn Fn(u32, bool) -> BoxFuture<'static, bool> + Send + Sync>;

/// Turns the serving of a partition's forwarded writes on or off.
pub type ForwardServing = Arc<dyn Fn(u32, bool) -> BoxFuture<'static, ()> + Send + Sync>;

/// A partition's claim as last read: its holder (none: never claimed, or
/// deleted) and the revision a conditional write must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub holder: Option<u32>,
    pub revision: u64,
}

/// What the service does about one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write the claim (expecting `revision`) and take the partition over.
    Claim { partition: u32, revision: u64 },
    /// Let the partition go, then delete the claim (expecting `revision`).
    HandBack { partition: u32, revision: u64 },
}

/// The live node ranking highest for `partition` (rendezvous hashing: the
/// others keep their partitions when one comes or goes).
pub fn rendezvous(partition: u32, live: &BTreeSet<u32>) -> Option<u32> {
    live.iter().copied().max_by_key(|node| {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&partition.to_le_bytes());
        bytes[4..].copy_from_slice(&node.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&bytes)
    })
}

/// The node that should own `partition` now.
pub fn desired(partition: u32, preferred: &[u32], live: &BTreeSet<u32>) -> Option<u32> {
    let first = preferred[partition as usize];
    match live.contains(&first) {
        true => Some(first),
        false => rendezvous(partition, live),
    }
}

/// What node `me` does about every partition, given who is live, the
/// claims as read, and what it owns. `settled`: it has been up a lease, so
/// it may take partitions whose preferred node has not shown up yet.
pub fn plan(
    me: u32,
    preferred: &[u32],
    live: &BTreeSet<u32>,
    claims: &BTreeMap<u32, Claim>,
    owned: &BTreeSet<u32>,
    settled: bool,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for partition in 0..preferred.len() as u32 {
        let claim = claims.get(&partition).copied().unwrap_or(Claim {
            holder: None,
            revision: 0,
        });
        let first = preferred[partition as usize];
        let revision = claim.revision;
        match claim.holder {
            Some(holder) if holder == me => {
                if first != me && live.contains(&first) {
                    actions.push(Action::HandBack {
                        partition,
                        revision,
                    });
                } else if !owned.contains(&partition) {
                    actions.push(Action::Claim {
                        partition,
                        revision,
                    });
                }
            }
            Some(holder) if live.contains(&holder) => {}
            _ => {
                let ours = desired(partition, preferred, live) == Some(me);
                if ours && (first == me || settled) {
                    actions.push(Action::Claim {
                        partition,
                        revision,
                    });
                }
            }
        }
    }
    actions
}

/// Which nodes are live, by this node's observation of their heartbeats:
/// a node is dead once its heartbeat is gone, or once its revision has not
/// changed for longer than a lease of this node's own time.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: HashMap<u32, (u64, Instant)>,
}

impl Liveness {
    /// `node`'s heartbeat revision read at `now` (`None`: gone).
    pub fn observe(&mut self, node: u32, revision: Option<u64>, now: Instant) {
        match revision {
            None => {
                self.seen.remove(&node);
            }
            Some(revision) => match self.seen.get(&node) {
                Some((known, _)) if *known == revision => {}
                _ => {
                    self.seen.insert(node, (revision, now));
                }
            },
        }
    }

    pub fn live(&self, now: Instant, lease: Duration) -> BTreeSet<u32> {
        self.seen
            .iter()
            .filter(|(_, (_, changed))| now.saturating_duration_since(*changed) <= lease)
            .map(|(node, _)| *node)
            .collect()
    }
}

/// Why the lease service could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the lease buckets: {0}")]
pub struct LeaseError(pub String);

/// The two buckets.
#[derive(Clone)]
pub struct Buckets {
    nodes: kv::Store,
    claims: kv::Store,
}

fn node_key(node: u32) -> String {
    format!("n.{node}")
}

fn claim_key(partition: u32) -> String {
    format!("p.{partition}")
}

/// The buckets, created when missing.
pub async fn buckets(js: &jetstream::Context, spec: &LeaseSpec) -> Result<Buckets, LeaseError> {
    let open = |name: String, max_age: Duration| {
        let js = js.clone();
        let replicas = spec.replicas;
        async move {
            match js.get_key_value(&name).await {
                Ok(store) => Ok(store),
                Err(_) => js
                    .create_key_value(kv::Config {
                        bucket: name.clone(),
                        history: 1,
                        max_age,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|error| LeaseError(format!("{name}: {error}"))),
            }
        }
    };
    Ok(Buckets {
        nodes: open(spec.nodes_bucket.clone(), spec.lease).await?,
        claims: open(spec.claims_bucket.clone(), Duration::ZERO).await?,
    })
}

/// Every partition's claim.
async fn read_claims(buckets: &Buckets, partitions: u32) -> Result<BTreeMap<u32, Claim>, String> {
    let mut claims = BTreeMap::new();
    for partition in 0..partitions {
        let entry = buckets
            .claims
            .entry(claim_key(partition))
            .await
            .map_err(|error| error.to_string())?;
        if let Some(entry) = entry {
            let holder = match entry.operation {
                kv::Operation::Put => std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|v| v.parse().ok()),
                kv::Operation::Delete | kv::Operation::Purge => None,
            };
            claims.insert(
                partition,
                Claim {
                    holder,
                    revision: entry.revision,
                },
            );
        }
    }
    Ok(claims)
}

/// Reads every node's heartbeat into `liveness`.
async fn observe_nodes(
    buckets: &Buckets,
    spec: &LeaseSpec,
    liveness: &mut Liveness,
) -> Result<(), String> {
    for node in &spec.nodes {
        let entry = buckets
            .nodes
            .entry(node_key(*node))
            .await
            .map_err(|error| error.to_string())?;
        let revision = entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| e.revision);
        liveness.observe(*node, revision, Instant::now());
    }
    Ok(())
}

/// Puts this node's heartbeat; on success, until when its lease holds.
async fn beat(buckets: &Buckets, spec: &LeaseSpec) -> Result<Instant, String> {
    let sent = Instant::now();
    let put = buckets
        .nodes
        .put(node_key(spec.node), Bytes::from(spec.node.to_string()));
    match tokio::time::timeout(spec.beat(), put).await {
        Ok(Ok(_)) => Ok(sent + spec.lease.saturating_sub(spec.margin)),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {:?}", spec.beat())),
    }
}

/// Writes `partition`'s claim for this node, expecting `revision`; the new
/// revision, or `None` when another write came first.
async fn write_claim(
    buckets: &Buckets,
    spec: &LeaseSpec,
    partition: u32,
    revision: u64,
) -> Option<u64> {
    let write = buckets.claims.update(
        claim_key(partition),
        Bytes::from(spec.node.to_string()),
        revision,
    );
    match tokio::time::timeout(spec.beat(), write).await {
        Ok(Ok(revision)) => Some(revision),
        Ok(Err(error)) => {
            tracing::debug!(partition, %error, "claiming a partition failed");
            None
        }
        Err(_) => None,
    }
}

/// At start, before the shards: puts this node's heartbeat and claims the
/// partitions it holds or should own (its preferred ones nobody live
/// holds). Returns them, and until when the lease holds.
pub async fn join(
    buckets: &Buckets,
    spec: &LeaseSpec,
) -> Result<(BTreeSet<u32>, Instant), LeaseError> {
    let until = beat(buckets, spec).await.map_err(LeaseError)?;
    let mut liveness = Liveness::default();
    observe_nodes(buckets, spec, &mut liveness)
        .await
        .map_err(LeaseError)?;
    let claims = read_claims(buckets, spec.preferred.len() as u32)
        .await
        .map_err(LeaseError)?;
    let live = liveness.live(Instant::now(), spec.lease);
    let mut held = BTreeSet::new();
    for action in plan(
        spec.node,
        &spec.preferred,
        &live,
        &claims,
        &BTreeSet::new(),
        false,
    ) {
        if let Action::Claim {
            partition,
            revision,
        } = action
        {
            if write_claim(buckets, spec, partition, revision)
                .await
                .is_some()
            {
                held.insert(partition);
            }
        }
    }
    Ok((held, until))
}

/// The service: keeps the lease, watches it lapse, and moves partitions.
/// Runs until the NATS thread stops.
pub async fn run(
    buckets: Buckets,
    spec: LeaseSpec,
    places: Arc<crate::key::Places>,
    owned: BTreeSet<u32>,
    until: Instant,
    change: OwnerChange,
    serve: ForwardServing,
) {
    let started = Instant::now();
    let held = Arc::new(Mutex::new(until));
    tokio::spawn(watch_lapse(Arc::clone(&held), Arc::clone(&places)));
    let mut owned = owned;
    let mut liveness = Liveness::default();
    // Whether the shards still own partitions from before a lapse.
    let mut lapsed = false;
    let mut next = Instant::now() + spec.beat();
    loop {
        tokio::time::sleep_until(next).await;
        next = Instant::now() + spec.beat();
        match beat(&buckets, &spec).await {
            Ok(until) => {
                let mut held = held.lock().expect("not poisoned");
                *held = (*held).max(until);
            }
            Err(why) => {
                tracing::warn!(why, "putting this node's heartbeat failed");
                continue;
            }
        }
        if !places.serving() {
            lapsed = true;
        }
        if lapsed {
            // Let everything go before serving again: a claim may have
            // moved while the lease had lapsed.
            tracing::warn!(
                partitions = owned.len(),
                "this node's lease lapsed; letting its partitions go"
            );
            for partition in std::mem::take(&mut owned) {
                serve(partition, false).await;
                change(partition, false).await;
            }
            lapsed = false;
            let renewed = {
                let held = held.lock().expect("not poisoned");
                let renewed = Instant::now() < *held;
                if renewed {
                    places.set_serving(true);
                }
                renewed
            };
            if !renewed {
                continue;
            }
        }
        if let Err(why) = observe_nodes(&buckets, &spec, &mut liveness).await {
            tracing::warn!(why, "reading the nodes' heartbeats failed");
            continue;
        }
        let claims = match read_claims(&buckets, spec.preferred.len() as u32).await {
            Ok(claims) => claims,
            Err(why) => {
                tracing::warn!(why, "reading the partitions' claims failed");
                continue;
            }
        };
        let mut live = liveness.live(Instant::now(), spec.lease);
        live.insert(spec.node);
        let settled = started.elapsed() >= spec.lease;
        let actions = plan(spec.node, &spec.preferred, &live, &claims, &owned, settled);
        let mut claimed = Vec::new();
        for action in actions {
            match action {
                Action::Claim {
                    partition,
                    revision,
                } => {
                    if write_claim(&buckets, &spec, partition, revision)
                        .await
                        .is_some()
                    {
                        claimed.push(partition);
                    }
                }
                Action::HandBack {
                    partition,
                    revision,
                } => {
                    tracing::info!(partition, "handing a partition back to its preferred node");
                    serve(partition, false).await;
                    change(partition, false).await;
                    owned.remove(&partition);
                    let delete = buckets
                        .claims
                        .delete_expect_revision(claim_key(partition), Some(revision));
                    if let Err(error) = delete.await {
                        tracing::warn!(partition, %error, "deleting a handed-back claim failed");
                    }
                }
            }
        }
        if claimed.is_empty() {
            continue;
        }
        tracing::info!(partitions = ?claimed, "taking partitions over");
        let taken = futures_util::future::join_all(
            claimed.iter().map(|partition| change(*partition, true)),
        )
        .await;
        for (partition, took) in claimed.into_iter().zip(taken) {
            // Not taken (the shard let it go meanwhile): claimed again, by
            // a conditional write, at the next heartbeat. A lapse meanwhile
            // lets a taken one go again.
            if took {
                owned.insert(partition);
                serve(partition, true).await;
            }
        }
    }
}

/// Stops the node serving its partitions the moment its lease ends.
async fn watch_lapse(held: Arc<Mutex<Instant>>, places: Arc<crate::key::Places>) {
    loop {
        let until = *held.lock().expect("not poisoned");
        tokio::time::sleep_until(until).await;
        {
            let held = held.lock().expect("not poisoned");
            if Instant::now() >= *held && places.serving() {
                tracing::error!("this node's lease lapsed: it answers nothing about its partitions until it renews it");
                places.set_serving(false);
            }
        }
        // Not renewed yet: look again shortly.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nodes: &[u32]) -> BTreeSet<u32> {
        nodes.iter().copied().collect()
    }

    #[test]
    fn a_preferred_node_claims_its_unclaimed_partitions_at_once_and_others_wait_a_lease() {
        let preferred = [1, 2, 3, 1];
        let live = set(&[1, 2]);
        let claims = BTreeMap::new();
        let at_start = plan(1, &preferred, &live, &claims, &BTreeSet::new(), false);
        assert_eq!(
            at_start,
            vec![
                Action::Claim {
                    partition: 0,
                    revision: 0
                },
                Action::Claim {
                    partition: 3,
                    revision: 0
                }
            ]
        );
        // Partition 2's node 3 never showed up: once settled, the live node
        // ranking highest claims it (exactly one of 1 and 2).
        let by_1 = plan(1, &preferred, &live, &claims, &set(&[0, 3]), true);
        let by_2 = plan(2, &preferred, &live, &claims, &set(&[1]), true);
        let claims_2 = |actions: &[Action]| {
            actions.contains(&Action::Claim {
                partition: 2,
                revision: 0,
            })
        };
        assert!(claims_2(&by_1) != claims_2(&by_2));
    }

    #[test]
    fn a_live_holders_claim_is_never_taken_and_a_dead_ones_is() {
        let preferred = [1, 1];
        let claims = BTreeMap::from([(
            0,
            Claim {
                holder: Some(2),
                revision: 7,
            },
        )]);
        // Node 2 holds partition 0 and lives: node 3 leaves it (and node 1,
        // its preferred node, is dead).
        let live = set(&[2, 3]);
        let actions = plan(3, &preferred, &live, &claims, &BTreeSet::new(), true);
        assert!(actions
            .iter()
            .all(|a| !matches!(a, Action::Claim { partition: 0, .. })));
        // Node 2 dies: whoever ranks highest among the live takes it, with
        // the revision it read.
        let live = set(&[3]);
        let actions = plan(3, &preferred, &live, &claims, &BTreeSet::new(), true);
        assert!(actions.contains(&Action::Claim {
            partition: 0,
            revision: 7
        }));
    }

    #[test]
    fn a_holder_hands_a_partition_back_when_its_preferred_node_returns() {
        let preferred = [1];
        let claims = BTreeMap::from([(
            0,
            Claim {
                holder: Some(2),
                revision: 4,
            },
        )]);
        let owned = set(&[0]);
        assert!(plan(2, &preferred, &set(&[2]), &claims, &owned, true).is_empty());
        assert_eq!(
            plan(2, &preferred, &set(&[1, 2]), &claims, &owned, true),
            vec![Action::HandBack {
                partition: 0,
                revision: 4
            }]
        );
        // Node 1 waits for the claim to be deleted before it claims.
        assert!(plan(
            1,
            &preferred,
            &set(&[1, 2]),
            &claims,
            &BTreeSet::new(),
            true
        )
        .is_empty());
    }

    #[test]
    fn a_node_takes_back_by_a_conditional_write_the_claims_it_holds_but_does_not_own() {
        let preferred = [1];
        let claims = BTreeMap::from([(
            0,
            Claim {
                holder: Some(1),
                revision: 9,
            },
        )]);
        assert_eq!(
            plan(1, &preferred, &set(&[1]), &claims, &BTreeSet::new(), false),
            vec![Action::Claim {
                partition: 0,
                revision: 9
            }]
        );
        assert!(plan(1, &preferred, &set(&[1]), &claims, &set(&[0]), false).is_empty());
    }

    #[test]
    fn a_heartbeat_unchanged_for_a_lease_means_its_node_is_dead() {
        let mut liveness = Liveness::default();
        let lease = Duration::from_secs(3);
        let t0 = Instant::now();
        liveness.observe(2, Some(5), t0);
        liveness.observe(3, Some(8), t0);
        assert_eq!(liveness.live(t0 + lease, lease), set(&[2, 3]));
        liveness.observe(2, Some(6), t0 + lease);
        liveness.observe(3, Some(8), t0 + lease);
        assert_eq!(
            liveness.live(t0 + lease + Duration::from_millis(1), lease),
            set(&[2])
        );
        liveness.observe(2, None, t0 + lease * 2);
        assert!(liveness.live(t0 + lease * 2, lease).is_empty());
    }
}
