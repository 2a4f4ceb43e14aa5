//! Deterministic simulation of the gateway's shard logic, in the spirit of
//! FoundationDB's simulator and TigerBeetle's VOPR: one seed drives
//! everything (how many shards, which client does what, when inbox batches
//! arrive, when commits land or fail, when the process crashes), over the
//! real RocksDB store in a temporary directory. A reference model checks
//! every step; see `sim.rs` for what it checks.
//!
//! - `cargo test --release --test simulation` runs the fixed seeds.
//! - `RUYI_SIM_SEED=N cargo test --release --test simulation replay -- --exact --nocapture`
//!   replays one seed and prints its steps.
//! - `RUYI_SIM_SEEDS=100000 RUYI_SIM_FROM=0 cargo test --release --test simulation soak -- --ignored --nocapture`
//!   runs a long soak and prints its figures.
//! - `cluster_soak` (ignored, same variables) runs seeds on a `[cluster]`
//!   node over a model log with faults (`log.rs`); `RUYI_SIM_ON_LOG=1`
//!   makes `replay` do the same.
//! - `nodes_soak` (ignored, same variables) runs seeds on two or three
//!   cluster nodes sharing the model log (`nodes.rs`);
//!   `RUYI_SIM_ON_NODES=1` makes `replay` do the same.

mod log;
mod model;
mod rng;
mod sim;
mod world;

use world::StoreKind;

/// Seeds every `cargo test` runs, on RocksDB.
const FIXED_SEEDS: u64 = 150;

/// Seeds every `cargo test` runs on a `[cluster]` node over the model log.
const FIXED_LOG_SEEDS: u64 = 60;

/// Seeds every `cargo test` runs on several cluster nodes.
const FIXED_NODES_SEEDS: u64 = 60;

/// Seeds the runs on several nodes found failing, each with what it found
/// (replay one with `RUYI_SIM_ON_NODES=1`).
const NODES_REGRESSION_SEEDS: &[(u64, &str)] = &[(
    232,
    "an owner fenced off by the node taking its partition over caught up on that node's messages and pushed them to a member its own unstored group change had added",
)];

/// Seeds the log runs found failing, each with what it found (replay one
/// with `RUYI_SIM_ON_LOG=1`).
const LOG_REGRESSION_SEEDS: &[(u64, &str)] = &[
    (
        2,
        "a group change the log stored was refused because the node's own write of it failed, then applied from the log",
    ),
    (
        23,
        "an append a crashed run left unanswered landed after the restart had read the log back: a deny list appeared later",
    ),
    (
        833,
        "the part of a batch the log stored named, in msg.offline, the recipients of a group whose deletion was queued since",
    ),
];

/// Seeds a soak found failing, each with what it found; they run with the
/// fixed seeds and must keep passing.
const REGRESSION_SEEDS: &[(u64, &str)] = &[
    (
        1971,
        "a resume read a message from storage before its owner fanned it out; the device acked it and reconnected without resume; the live copy came unflagged",
    ),
    (
        7298,
        "a resend after a crash pushed a stored message live again to a device that had acknowledged it on an earlier connection",
    ),
    (7240, "as 7298, in a person channel after 47 messages"),
    (8356, "as 7298, in a group"),
    (9857, "as 7298, to a device whose last session a crash left open"),
    (
        1627,
        "a recall of a message queued while its group's deletion was being committed wrote the message back after the deletion removed it: a gap in the re-created group's seqs",
    ),
    (
        7468,
        "a connection cut off as a slow consumer was refilled from its backlog in the same tick, which moved its saved position past the push it never acknowledged",
    ),
    (
        9484,
        "the model: a member removed and added again by group changes whose answers were lost joins anew",
    ),
    (
        8391,
        "the model: a lost conversation Delete landed on the group created again after a deletion",
    ),
    (
        9273,
        "a conversation Delete reached the owner before the member's join was stored and lowered the row below the join: resume pushed messages from before it",
    ),
    (
        7808,
        "a device's backlog range stretched over seqs sent while its user was out of the group",
    ),
    (
        8016,
        "delete, re-create, delete: committing the first delete forgot the second, and the group came back",
    ),
    (
        13592,
        "channels busy when the cache filled up stayed cached after their commits: the shard held more than channels_cached_per_shard_max",
    ),
    (
        292,
        "a recall queued while a group's deletion was committing was refused though the deletion failed",
    ),
    (
        18950,
        "the model: a member's join point guessed after a crash lost the change that added them decided visibility",
    ),
    (
        21722,
        "a message committed just before its group's deletion was fanned out to the members of the group created again since",
    ),
    (
        24923,
        "a recall of an already recalled message that a group deletion being committed erases was answered at once",
    ),
    (
        9061,
        "the model: an older conversation operation's answer is not final while a later one is unsettled",
    ),
    (
        30159,
        "the checks: a recall committed before its group's deletion finds nothing stored once the group is created again",
    ),
];

fn run_range(from: u64, count: u64, store: StoreKind) -> (sim::Summary, Vec<sim::Failure>) {
    run_seeds((from..from + count).map(|seed| sim::Options::from_seed(seed, store)))
}

fn run_seeds(runs: impl IntoIterator<Item = sim::Options>) -> (sim::Summary, Vec<sim::Failure>) {
    let mut total = sim::Summary::default();
    let mut failures = Vec::new();
    for options in runs {
        match sim::run_options(options) {
            Ok((summary, _)) => {
                total.steps += summary.steps;
                total.crashes += summary.crashes;
                total.acked_sends += summary.acked_sends;
                total.pushes += summary.pushes;
            }
            Err(failure) => failures.push(failure),
        }
    }
    (total, failures)
}

fn report(failures: &[sim::Failure]) -> String {
    let each: Vec<String> = failures
        .iter()
        .map(|f| format!("  seed {}: {}", f.seed, f.message))
        .collect();
    format!(
        "{} seeds failed:\n{}\nfirst failure:\n{}",
        failures.len(),
        each.join("\n"),
        failures[0]
    )
}

#[test]
fn fixed_seeds_keep_every_invariant_on_rocksdb() {
    let (summary, failures) = run_range(0, FIXED_SEEDS, StoreKind::Rocks);
    assert!(failures.is_empty(), "{}", report(&failures));
    eprintln!("{FIXED_SEEDS} seeds: {}", sim::describe(&summary));
}

/// Each as it ran when it was found (`Options::classic`; replay one with
/// `RUYI_SIM_CLASSIC=1`), and with the later operations too.
#[test]
fn seeds_that_once_failed_keep_every_invariant() {
    let (summary, failures) = run_seeds(REGRESSION_SEEDS.iter().flat_map(|(seed, _)| {
        let options = sim::Options::from_seed(*seed, StoreKind::Rocks);
        [options.clone().classic(), options]
    }));
    assert!(
        failures.is_empty(),
        "{} (the classic runs replay with RUYI_SIM_CLASSIC=1)",
        report(&failures)
    );
    eprintln!(
        "{} seeds: {}",
        REGRESSION_SEEDS.len(),
        sim::describe(&summary)
    );
}

/// The in-memory store stands in for RocksDB in unit tests: it must behave
/// the same, step for step.
#[test]
fn the_memory_store_behaves_like_rocksdb() {
    for seed in 0..20 {
        let rocks = sim::run_seed(seed, StoreKind::Rocks).map(|(_, trace)| trace);
        let memory = sim::run_seed(seed, StoreKind::Memory).map(|(_, trace)| trace);
        match (rocks, memory) {
            (Ok(rocks), Ok(memory)) => {
                if let Some(i) =
                    (0..rocks.len().min(memory.len())).find(|i| rocks[*i] != memory[*i])
                {
                    panic!(
                        "seed {seed}: the stores part at step line {i}:\n rocks:  {}\n memory: {}",
                        rocks[i], memory[i]
                    );
                }
                assert_eq!(
                    rocks.len(),
                    memory.len(),
                    "seed {seed}: traces differ in length"
                );
            }
            (Err(failure), _) | (_, Err(failure)) => panic!("{failure}"),
        }
    }
}

/// A run is a function of its seed.
#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 17] {
        let first = sim::run_seed(seed, StoreKind::Rocks)
            .map(|(_, t)| t)
            .map_err(|f| f.to_string());
        let second = sim::run_seed(seed, StoreKind::Rocks)
            .map(|(_, t)| t)
            .map_err(|f| f.to_string());
        assert_eq!(first, second, "seed {seed} ran differently twice");
    }
}

/// `RUYI_SIM_LOG=debug` shows the gateway's own log between the steps.
fn init_sim_log() {
    if let Ok(filter) = std::env::var("RUYI_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stdout)
            .without_time()
            .try_init();
    }
}

/// Replays a fuzz input (`RUYI_SIM_INPUT=path`, for instance one of
/// `tests/fuzz/regressions/session/`) with every step printed, like
/// `replay` does a seed; `RUYI_SIM_LOG` and `RUYI_SIM_STORE` as there.
#[test]
fn replay_input() {
    let Ok(path) = std::env::var("RUYI_SIM_INPUT") else {
        return;
    };
    let data = std::fs::read(&path).expect("RUYI_SIM_INPUT is a readable file");
    // A fuzz input's first byte picks its kind (see tests/fuzz/src/harness.rs;
    // bit 6 turns on the simulator's extras).
    let extras = data.first().is_some_and(|flags| flags & (1 << 6) != 0);
    let choices = &data[1.min(data.len())..];
    init_sim_log();
    let store = match std::env::var("RUYI_SIM_STORE").as_deref() {
        Ok("rocks") => StoreKind::Rocks,
        _ => StoreKind::Memory,
    };
    sim::ECHO.store(true, std::sync::atomic::Ordering::Relaxed);
    match sim::run_input(choices, store, extras) {
        Ok((summary, _)) => println!("{path} passed: {}", sim::describe(&summary)),
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn replay() {
    let Ok(seed) = std::env::var("RUYI_SIM_SEED") else {
        return;
    };
    let seed: u64 = seed.parse().expect("RUYI_SIM_SEED is a number");
    init_sim_log();
    let store = match std::env::var("RUYI_SIM_STORE").as_deref() {
        Ok("memory") => StoreKind::Memory,
        _ => StoreKind::Rocks,
    };
    sim::ECHO.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut options = sim::Options::from_seed(seed, store);
    if std::env::var_os("RUYI_SIM_CLASSIC").is_some() {
        options = options.classic();
    }
    if std::env::var_os("RUYI_SIM_ON_LOG").is_some() {
        options = options.on_log();
    }
    if std::env::var_os("RUYI_SIM_ON_NODES").is_some() {
        options = options.on_nodes();
    }
    match sim::run_options(options) {
        Ok((summary, _)) => println!("seed {seed} passed: {}", sim::describe(&summary)),
        Err(failure) => panic!("{failure}"),
    }
}

/// A soak's seeds: `RUYI_SIM_SEEDS` (1000) from `RUYI_SIM_FROM` (10,000).
fn soak_seeds() -> (u64, u64) {
    let number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    (
        number("RUYI_SIM_FROM", 10_000),
        number("RUYI_SIM_SEEDS", 1000),
    )
}

#[test]
#[ignore = "a long soak: set RUYI_SIM_SEEDS (and RUYI_SIM_FROM)"]
fn soak() {
    let (from, count) = soak_seeds();
    let started = std::time::Instant::now();
    let mut summary = sim::Summary::default();
    let mut failures = Vec::new();
    // A line per thousand seeds, so a soak cut short still says how far
    // it got.
    let mut next = from;
    while next < from + count {
        let chunk = 1000.min(from + count - next);
        let (part, failed) = run_range(next, chunk, StoreKind::Rocks);
        summary.steps += part.steps;
        summary.crashes += part.crashes;
        summary.acked_sends += part.acked_sends;
        summary.pushes += part.pushes;
        for failure in &failed {
            eprintln!("seed {} failed: {}", failure.seed, failure.message);
        }
        failures.extend(failed);
        next += chunk;
        eprintln!(
            "seeds {from}..{next}: {} in {:.0} s, {} failed",
            sim::describe(&summary),
            started.elapsed().as_secs_f64(),
            failures.len()
        );
    }
    assert!(failures.is_empty(), "{}", report(&failures));
}

/// The `session` fuzz target's entry (`sim::run_input`, the choices read
/// from the input): a run is a function of its input, and random inputs
/// keep every invariant.
#[test]
fn a_fuzz_input_replays_exactly() {
    for (seed, len) in [(1, 0), (2, 40), (3, 700)] {
        let mut rng = rng::Rng::new(seed);
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let extras = seed != 1;
        let first = sim::run_input(&data, StoreKind::Rocks, extras).map_err(|f| f.to_string());
        let second = sim::run_input(&data, StoreKind::Rocks, extras).map_err(|f| f.to_string());
        assert!(first.is_ok(), "input {seed}: {}", first.unwrap_err());
        assert_eq!(
            first.map(|(_, t)| t),
            second.map(|(_, t)| t),
            "input {seed} ran differently twice"
        );
    }
}

/// The cluster commit path (`[cluster]`, `ruyi::shard::log`): every
/// invariant holds when commits go through a log that loses appends, loses
/// answers, lands appends late and is written by another node now and
/// then.
#[test]
fn fixed_seeds_on_a_log_keep_every_invariant() {
    fixed_seeds_of(
        "on the log",
        FIXED_LOG_SEEDS,
        LOG_REGRESSION_SEEDS,
        sim::Options::on_log,
        "RUYI_SIM_ON_LOG",
    );
}

/// Runs seeds `0..count` and `regressions`, made into runs by `make`;
/// `replay`: the variable that makes `replay` run a seed the same way.
fn fixed_seeds_of(
    label: &str,
    count: u64,
    regressions: &[(u64, &str)],
    make: fn(sim::Options) -> sim::Options,
    replay: &str,
) {
    let (summary, failures) = run_seeds(
        (0..count)
            .chain(regressions.iter().map(|(seed, _)| *seed))
            .map(|seed| make(sim::Options::from_seed(seed, StoreKind::Rocks))),
    );
    assert!(
        failures.is_empty(),
        "{} (replay with {replay}=1)",
        report(&failures)
    );
    eprintln!(
        "{} seeds {label}: {}",
        count as usize + regressions.len(),
        sim::describe(&summary)
    );
}

/// A long soak of the log runs: set RUYI_SIM_SEEDS (and RUYI_SIM_FROM).
#[test]
#[ignore = "a long soak: set RUYI_SIM_SEEDS (and RUYI_SIM_FROM)"]
fn cluster_soak() {
    soak_of("on the log", sim::Options::on_log);
}

/// Runs the soak's seeds made into runs by `make`, with a line of figures.
fn soak_of(label: &str, make: fn(sim::Options) -> sim::Options) {
    let (from, count) = soak_seeds();
    let started = std::time::Instant::now();
    let (summary, failures) = run_seeds(
        (from..from + count).map(|seed| make(sim::Options::from_seed(seed, StoreKind::Rocks))),
    );
    for failure in &failures {
        eprintln!("seed {} failed: {}", failure.seed, failure.message);
    }
    eprintln!(
        "seeds {from}..{} {label}: {} in {:.0} s, {} failed",
        from + count,
        sim::describe(&summary),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", report(&failures));
}

/// Several cluster nodes on one log (`nodes.rs`): every invariant holds
/// for the devices of each node, which forwards its writes to the owners
/// and applies their records; every node stores every channel as its
/// owner does.
#[test]
fn fixed_seeds_on_several_nodes_keep_every_invariant() {
    fixed_seeds_of(
        "on several nodes",
        FIXED_NODES_SEEDS,
        NODES_REGRESSION_SEEDS,
        sim::Options::on_nodes,
        "RUYI_SIM_ON_NODES",
    );
}

/// A long soak on several nodes: set RUYI_SIM_SEEDS (and RUYI_SIM_FROM).
#[test]
#[ignore = "a long soak: set RUYI_SIM_SEEDS (and RUYI_SIM_FROM)"]
fn nodes_soak() {
    soak_of("on several nodes", sim::Options::on_nodes);
}
