//! Replays the fuzz corpus and every saved crash through the same code paths
//! the fuzz targets drive (`tests/fuzz/src/harness.rs`, included below), so
//! the corpus is a regression suite under a plain `cargo test`.
//!
//! Inputs live in `tests/fuzz/corpus/<target>/` (the minimized corpus) and
//! `tests/fuzz/regressions/<target>/` (inputs that once crashed). See
//! `tests/fuzz/README.md` for running the fuzzers themselves.

#[path = "fuzz/src/harness.rs"]
mod harness;

// The simulator the `session` harness drives, at the crate root under the
// names its files use for each other (as in `tests/fuzz/src/lib.rs`).
#[allow(dead_code)]
#[path = "simulation/log.rs"]
mod log;
#[allow(dead_code)]
#[path = "simulation/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "simulation/rng.rs"]
mod rng;
#[allow(dead_code)]
#[path = "simulation/sim.rs"]
mod sim;
#[allow(dead_code)]
#[path = "simulation/world.rs"]
mod world;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file()
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs every input of `target` through `run`; fails listing each input that
/// panicked.
fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    let mut failed = Vec::new();
    for path in &files {
        let data = match std::fs::read(path) {
            Ok(data) => data,
            // A fuzzer running in the same tree replaced it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs panicked:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn frame_splitter_corpus_and_regressions() {
    replay("frame_splitter", harness::frame_splitter);
}

#[test]
fn packet_decode_corpus_and_regressions() {
    replay("packet_decode", harness::packet_decode);
}

#[test]
fn session_corpus_and_regressions() {
    replay("session", harness::session);
}

#[test]
fn wkproto_corpus_and_regressions() {
    replay("wkproto", harness::wkproto);
}

/// The harness itself: the empty input and a few trivial ones run clean.
#[test]
fn trivial_inputs() {
    for data in [&[][..], &[0], &[0xff; 8], &[1, 1, 0, 0]] {
        harness::frame_splitter(data);
        harness::packet_decode(data);
        harness::session(data);
        harness::wkproto(data);
    }
}
