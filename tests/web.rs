//! The TypeScript SDK (src/client/ts) against a real gateway: each test
//! starts a server on port 0 with the WebSocket listener and runs one file
//! of the SDK's Node tests (`node --test`) against it, passing the
//! addresses, the auth secret, the admin API token and the `ruyi` binary
//! (whose `ruyi client` is the Rust SDK the Node tests talk to) in the
//! environment. A Node test failing fails the Rust test, with node's output.
//!
//! Needs Node 20 and the package's dependencies: `npm ci --prefix
//! src/client/ts` (the README's test command runs it).

mod common;

use common::{TestServer, API_TOKEN, SECRET};
use ruyi::config::Config;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The SDK's npm package.
pub fn package_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/client/ts")
}

/// Compiles the SDK and its tests into the package's `dist/` once per test
/// binary; the error says which install step is missing.
fn built() -> &'static Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = package_dir();
        match Command::new("node").arg("--version").output() {
            Ok(output) if output.status.success() => {}
            _ => {
                return Err("`node` is not on PATH: install Node 20 and npm \
                            (Debian: `apt-get install nodejs npm`), then `npm ci --prefix src/client/ts`"
                    .into())
            }
        }
        let tsc = dir.join("node_modules/typescript/bin/tsc");
        if !tsc.exists() {
            return Err(format!(
                "{} is missing: run `npm ci --prefix src/client/ts` (the README's test command does)",
                tsc.display()
            ));
        }
        let output = Command::new("node")
            .arg(&tsc)
            .arg("-p")
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run tsc: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "tsc -p src/client/ts failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    })
}

/// A test server with the WebSocket listener on `/chat`.
fn web_server(adjust: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|config| {
        config.ws.listen = "127.0.0.1:0".into();
        config.ws.path = "/chat".into();
        adjust(config);
    })
}

/// Runs `node --test dist/test/{file}.test.js` against `server`; panics
/// with node's report when a test failed or none ran.
fn run_node_tests(server: &TestServer, file: &str) {
    if let Err(message) = built() {
        panic!("{message}");
    }
    let ws = server
        .handle()
        .ws_addr()
        .expect("the WebSocket listener is on");
    let output = Command::new("node")
        .arg("--test")
        .arg("--test-reporter=tap")
        .arg(format!("dist/test/{file}.test.js"))
        .current_dir(package_dir())
        .env("RUYI_WS_URL", format!("ws://{ws}/chat"))
        .env("RUYI_TCP_ADDR", server.addr.to_string())
        .env("RUYI_API_URL", server.api_url())
        .env("RUYI_API_TOKEN", API_TOKEN)
        .env("RUYI_AUTH_SECRET", SECRET)
        .env("RUYI_BIN", env!("CARGO_BIN_EXE_ruyi"))
        .output()
        .expect("node runs");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let count = |label: &str| -> u64 {
        report
            .lines()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        output.status.success() && count("# fail ") == 0,
        "node --test {file} failed:\n{report}"
    );
    assert!(
        count("# pass ") > 0,
        "node --test {file} ran no test:\n{report}"
    );
}

#[test]
fn node_sdk_connects_sends_and_receives_in_order_with_node_and_rust_clients() {
    let server = web_server(|_| {});
    run_node_tests(&server, "messaging");
}

#[test]
fn node_sdk_dedups_resumes_resends_once_and_stops_after_kick_or_auth_failure() {
    // A short heartbeat, so the heartbeat tests take a second.
    let server = web_server(|config| {
        config.limits.heartbeat_interval_ms = 200;
        config.limits.idle_timeout_ms = 1000;
    });
    run_node_tests(&server, "resilience");
}

#[test]
fn node_sdk_syncs_history_and_conversations_changes_unread_and_recalls() {
    let server = web_server(|_| {});
    run_node_tests(&server, "conversations");
}
