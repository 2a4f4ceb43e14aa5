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
    run_node(Some(server), file, &[]);
}

/// [`run_node_tests`] with more environment variables.
fn run_node_tests_with(server: &TestServer, file: &str, extra_env: &[(&str, String)]) {
    run_node(Some(server), file, extra_env);
}

/// Runs one file of Node tests, against `server` when there is one.
fn run_node(server: Option<&TestServer>, file: &str, extra_env: &[(&str, String)]) {
    if let Err(message) = built() {
        panic!("{message}");
    }
    let mut node = Command::new("node");
    node.arg("--test")
        .arg("--test-reporter=tap")
        .arg(format!("dist/test/{file}.test.js"))
        .current_dir(package_dir())
        .envs(extra_env.iter().map(|(name, value)| (*name, value)));
    if let Some(server) = server {
        let ws = server
            .handle()
            .ws_addr()
            .expect("the WebSocket listener is on");
        node.env("RUYI_WS_URL", format!("ws://{ws}/chat"))
            .env("RUYI_TCP_ADDR", server.addr.to_string())
            .env("RUYI_API_URL", server.api_url())
            .env("RUYI_API_TOKEN", API_TOKEN)
            .env("RUYI_AUTH_SECRET", SECRET)
            .env("RUYI_BIN", env!("CARGO_BIN_EXE_ruyi"));
    }
    let output = node.output().expect("node runs");
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
fn node_sdk_codec_splits_frames_refuses_hostile_lengths_and_keeps_64_bit_ids_exact() {
    // The wire format alone: no gateway.
    run_node(None, "codec", &[]);
}

#[test]
fn node_sdk_connects_sends_and_receives_in_order_with_node_and_rust_clients() {
    let server = web_server(|_| {});
    run_node_tests(&server, "messaging");
}

#[test]
fn node_sdk_dedups_resumes_resends_once_and_stops_after_kick_or_auth_failure() {
    // A short heartbeat, so the heartbeat tests take a few seconds.
    let server = web_server(|config| {
        config.limits.heartbeat_interval_ms = 300;
        config.limits.idle_timeout_ms = 1500;
    });
    run_node_tests(&server, "resilience");
}

#[test]
fn node_sdk_syncs_history_and_conversations_changes_unread_and_recalls() {
    let server = web_server(|_| {});
    run_node_tests(&server, "conversations");
}

// ---- The chat demo at /demo/ ----

fn demo_server() -> TestServer {
    web_server(|config| config.api.demo = true)
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

#[tokio::test]
async fn the_demo_is_off_by_default() {
    let server = web_server(|_| {});
    let base = server.api_url();
    let response = get(&format!("{base}/demo/")).await;
    assert_eq!(
        response.status(),
        401,
        "without the setting, /demo/ is an admin route that does not exist"
    );
    let response = reqwest::Client::new()
        .get(format!("{base}/demo/"))
        .header("token", API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn the_demo_serves_its_page_the_sdk_bundle_and_the_websocket_path_without_the_admin_token() {
    let server = demo_server();
    let base = server.api_url();

    let page = get(&format!("{base}/demo/")).await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    assert_eq!(html, ruyi::api::demo::INDEX_HTML);
    assert!(html.contains("<script src=\"ruyi-sdk.js\"></script>"));

    let sdk = get(&format!("{base}/demo/ruyi-sdk.js")).await;
    assert_eq!(sdk.status(), 200);
    assert_eq!(
        sdk.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(sdk.text().await.unwrap(), ruyi::api::demo::SDK_JS);

    // The test server's WebSocket port is chosen at start-up: the page is
    // told the one it got.
    let config: serde_json::Value = get(&format!("{base}/demo/config.json"))
        .await
        .json()
        .await
        .unwrap();
    let ws_port = server.handle().ws_addr().unwrap().port();
    assert_eq!(
        config,
        serde_json::json!({"ws_port": ws_port, "ws_path": "/chat", "ws_tls": false})
    );

    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}/demo"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.headers()["location"], "/demo/");

    // The admin routes still want the admin token.
    let admin = get(&format!("{base}/health")).await;
    assert_eq!(admin.status(), 401);
}

#[test]
fn the_demo_config_names_the_websocket_port_configured_or_bound() {
    let mut config = Config::default();
    config.ws.listen = "0.0.0.0:5200".into();
    config.ws.path = "/ws".into();
    config.api.demo = true;
    config.api.token = "t".into();
    config.auth.secret = "s".into();
    config.validate().expect("valid");
    let page = ruyi::api::demo::page_config(&config, None);
    assert_eq!(
        page,
        serde_json::json!({"ws_port": 5200, "ws_path": "/ws", "ws_tls": false})
    );
    // A port chosen at start-up: the one the listener got; unknown: null.
    config.ws.listen = "127.0.0.1:0".into();
    let bound = "127.0.0.1:40123".parse().ok();
    assert_eq!(
        ruyi::api::demo::page_config(&config, bound)["ws_port"],
        40123
    );
    assert_eq!(
        ruyi::api::demo::page_config(&config, None)["ws_port"],
        serde_json::Value::Null
    );
}

#[test]
fn the_demo_without_a_websocket_listener_is_refused_at_start_up() {
    let mut config = Config::default();
    config.api.demo = true;
    config.api.token = "t".into();
    config.auth.secret = "s".into();
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("api.demo = true needs"), "{error}");
    assert!(error.contains("ws.listen"), "{error}");
}

#[test]
fn the_committed_demo_bundle_is_a_fresh_esbuild_of_the_sdk() {
    if let Err(message) = built() {
        panic!("{message}");
    }
    let out = tempfile::tempdir().unwrap();
    let fresh = out.path().join("ruyi-sdk.js");
    let output = Command::new("node")
        .arg("bundle.mjs")
        .arg(&fresh)
        .current_dir(package_dir())
        .output()
        .expect("node runs");
    assert!(
        output.status.success(),
        "node bundle.mjs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let fresh = std::fs::read_to_string(&fresh).unwrap();
    assert!(
        fresh == ruyi::api::demo::SDK_JS,
        "src/api/demo/ruyi-sdk.js is stale: run `node bundle.mjs` in src/client/ts"
    );
}

// ---- The demo in a real browser ----

/// Debian's Chromium (`apt-get install chromium`), or `RUYI_CHROMIUM`.
fn chromium() -> PathBuf {
    let path = std::env::var_os("RUYI_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} is missing: install Debian's Chromium with `apt-get install chromium` \
         (the README's test command does), or set RUYI_CHROMIUM",
        path.display()
    );
    path
}

#[test]
fn the_chat_demo_works_in_chromium_between_alice_and_bob_and_with_node_and_rust_clients() {
    let chromium = chromium();
    let server = demo_server();
    let output = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-browser");
    let _ = std::fs::remove_dir_all(&output);
    run_node_tests_with(
        &server,
        "browser",
        &[
            ("RUYI_DEMO_URL", format!("{}/demo/", server.api_url())),
            ("RUYI_OUTPUT_DIR", output.display().to_string()),
            ("RUYI_CHROMIUM", chromium.display().to_string()),
        ],
    );
    for name in [
        "bob-unread",
        "bob-recalled",
        "alice-recalled",
        "carol-three-clients",
    ] {
        let png = std::fs::read(output.join(format!("{name}.png")))
            .unwrap_or_else(|e| panic!("{name}.png: {e}"));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name}.png is a PNG");
    }
}
