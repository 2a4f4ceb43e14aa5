//! The simulator driven by a fuzz input instead of a seed: the `session`
//! fuzz target (`tests/fuzz/src/harness.rs`) runs this, so coverage-guided
//! fuzzing explores the same world (the real `ShardState`s on the real
//! store, crashes, failed writes, lost answers) under the same model checks
//! as the seeded soak. A child module of `sim`, so it drives a `Sim` through
//! the same steps and settles as `Sim::run`.
//!
//! The input is read as the run's choices (`Rng::from_bytes`: one byte for
//! a choice among at most 256, two for one among at most 65,536, modulo the
//! count). It opens with the run's shape, in this order: shards (1 to 4),
//! users (2 to 7), devices per user (1 or 2), groups (1 to 3), the crash
//! percent (0 to 12, as in `Options`: a crash is `chance(crash_percent *
//! 8)` at a crash-or-drain step), the write failure percent (0 to 100) and
//! the settle interval (25 to 280 steps); one byte each. Every byte after
//! that is the steps' choices, each step starting with its roll (the byte
//! modulo 100 picks the kind of step, as in `Sim::step`). Steps are taken
//! until the input is read (at most [`STEPS_MAX`]); then the run settles
//! once more, with any choices it still makes from a fixed stream, and
//! every liveness check runs.

use super::{Failure, Options, Sim, Summary};
use crate::rng::Rng;
use crate::world::StoreKind;

/// Steps one input may take, whatever its length.
pub const STEPS_MAX: usize = 4_000;

/// Runs the simulation with its choices read from `data`, on `store`. A
/// violated invariant is an `Err`; a panic in the gateway is not caught (the
/// fuzzer records it as a crash with its stack).
pub fn run_input(
    data: &[u8],
    store: StoreKind,
    extras: bool,
) -> Result<(Summary, Vec<String>), Failure> {
    let mut rng = Rng::from_bytes(data);
    // Seed 0's options as it ran before `extras`, then every one the input
    // sets (an option added to `Options` later keeps that value until it
    // is read here too, so saved inputs replay as they were found).
    let mut options = Options::from_seed(0, store).classic();
    options.shards = 1 + rng.below(4) as u16;
    options.users = 2 + rng.index(6);
    options.devices_per_user = 1 + rng.index(2);
    options.groups = 1 + rng.index(3);
    options.crash_percent = rng.below(13);
    options.write_failure_percent = rng.below(101);
    let settle_every = 25 + rng.index(256);
    if extras {
        options.extras = true;
        options.allowlist_for_person = rng.chance(50);
    }
    let mut sim = Sim::new(options);
    sim.rng = rng;
    sim.note(format!(
        "input of {} bytes: {} shards, {} users with {} devices each, {} groups, crash {}%, write failure {}%, settle every {settle_every} steps{}",
        data.len(),
        sim.options.shards,
        sim.options.users,
        sim.options.devices_per_user,
        sim.options.groups,
        sim.options.crash_percent * 8,
        sim.options.write_failure_percent,
        if extras {
            format!(
                ", extras (allowlist_for_person {})",
                sim.options.allowlist_for_person
            )
        } else {
            String::new()
        },
    ));
    let mut steps = 0;
    while !sim.rng.exhausted() && steps < STEPS_MAX && !sim.failed() {
        sim.step();
        steps += 1;
        if steps % settle_every == 0 && !sim.failed() {
            sim.settle();
        }
    }
    if !sim.failed() {
        sim.settle();
    }
    sim.summary.steps = steps;
    sim.options.steps = steps;
    match sim.failure.take() {
        None => Ok((sim.summary, sim.trace)),
        Some(message) => Err(Failure {
            seed: 0,
            message,
            trace: sim.trace,
        }),
    }
}
