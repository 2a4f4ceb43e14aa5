//! The admin API against its own OpenAPI document, fuzzed: schemathesis
//! (PyPI `schemathesis==4.32.5`, the `st` command) reads `GET /openapi.json`
//! from a real server (2 shards, RocksDB, port 0), generates requests that
//! fit the document and requests that break it, and checks every answer:
//! schema-valid requests are not refused with 400, schema-breaking ones are,
//! no answer is a 5xx, and every answer has a documented status, content
//! type and schema.
//!
//! The rules between fields that JSON Schema cannot state (each in its
//! operation's description) are in `tests/api_openapi_fuzz_hooks.py`: a
//! request that breaks one is still sent, and its 400 is not a failure.
//!
//! A longer run: `RUYI_OPENAPI_FUZZ_EXAMPLES` (examples per operation,
//! default 20) and `RUYI_OPENAPI_FUZZ_SEED` (default 1).

mod common;

use common::{TestServer, API_TOKEN};
use std::process::Command;

const SCHEMATHESIS_VERSION: &str = "4.32.5";
const EXAMPLES_DEFAULT: u32 = 20;
const SEED_DEFAULT: u64 = 1;

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// Fails with how to install schemathesis when `st` is missing or another
/// version (another version generates other requests from the same seed).
fn require_schemathesis() {
    let install = format!("install it with `pip install schemathesis=={SCHEMATHESIS_VERSION}`");
    let output = Command::new("st")
        .arg("--version")
        .output()
        .unwrap_or_else(|error| {
            panic!("schemathesis (`st`) is not installed ({error}): {install}")
        });
    let version = String::from_utf8_lossy(&output.stdout);
    assert!(
        version.contains(SCHEMATHESIS_VERSION),
        "`st --version` says {:?}, not schemathesis {SCHEMATHESIS_VERSION}: {install}",
        version.trim()
    );
}

#[test]
fn every_api_operation_accepts_schema_valid_requests_and_answers_within_its_schema() {
    require_schemathesis();
    let examples: u32 = env_number("RUYI_OPENAPI_FUZZ_EXAMPLES", EXAMPLES_DEFAULT);
    let seed: u64 = env_number("RUYI_OPENAPI_FUZZ_SEED", SEED_DEFAULT);
    let server = TestServer::start();
    // schemathesis writes nothing but its report here.
    let work = tempfile::tempdir().unwrap();
    let hooks = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/api_openapi_fuzz_hooks.py"
    );
    let output = Command::new("st")
        .current_dir(work.path())
        .env("SCHEMATHESIS_HOOKS", hooks)
        .arg("run")
        .arg(format!("{}/openapi.json", server.api_url()))
        .args(["--header", &format!("token: {API_TOKEN}")])
        .args(["--checks", "all"])
        .args(["--max-examples", &examples.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--generation-database", "none"])
        .args(["--no-color", "--output-truncate", "false"])
        .output()
        .expect("st runs");
    server.stop();
    // Shown on failure, or always with `--nocapture`.
    println!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found failures (seed {seed}, {examples} examples per operation); \
         its report is above"
    );
}
