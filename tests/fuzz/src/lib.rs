//! Fuzz harnesses for ruyi. The code paths live in `harness.rs`, which the
//! root crate's `tests/fuzz_regressions.rs` also includes, so every saved
//! input replays under `cargo test` exactly as the fuzzer ran it.
//!
//! The `session` target drives the deterministic simulator of
//! `tests/simulation`, included here at the crate root under the module
//! names its files use for each other (`crate::model`, `crate::sim`, ...).

pub mod harness;

// Parts of the simulator only its own test binary uses (seeded runs).
#[allow(dead_code)]
#[path = "../../simulation/log.rs"]
mod log;
#[allow(dead_code)]
#[path = "../../simulation/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "../../simulation/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "../../simulation/sim.rs"]
mod sim;
#[allow(dead_code)]
#[path = "../../simulation/world.rs"]
mod world;
