//! Fuzz harnesses for ruyi. The code paths live in `harness.rs`, which the
//! root crate's `tests/fuzz_regressions.rs` also includes, so every saved
//! input replays under `cargo test` exactly as the fuzzer ran it.

pub mod harness;
