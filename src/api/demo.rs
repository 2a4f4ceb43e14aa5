//! The chat demo at `/demo/` (`api.demo`, off by default): one HTML page and
//! the TypeScript SDK bundled by esbuild (src/client/ts, `node bundle.mjs`),
//! both embedded in the binary. The page logs in with a user token from the
//! URL fragment (never sent to any server but the gateway's WebSocket) and
//! talks to the WebSocket listener like any web app would. It needs no admin
//! token, so these routes sit outside the API's token check; they serve
//! only these fixed files and the WebSocket listener's port and path.

use crate::config::Config;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

/// The page: conversations with unread badges, a chat's history, live
/// messages, send, recall.
pub const INDEX_HTML: &str = include_str!("demo/index.html");

/// The SDK as an IIFE that defines the global `Ruyi` (esbuild output,
/// committed; a test checks it matches the SDK's sources).
pub const SDK_JS: &str = include_str!("demo/ruyi-sdk.js");

/// Headers every demo response carries: no caching of a page that may be
/// replaced with the binary, no sniffing, no framing by other sites.
fn fixed(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        ],
        body,
    )
        .into_response()
}

/// What the page needs to find the WebSocket listener: its port (the one
/// it bound to, `bound`, when known: a configured port 0 is chosen at
/// start-up; `null` when neither says), its path, and whether it speaks
/// TLS. The page connects to that port on the host it was loaded from.
pub fn page_config(config: &Config, bound: Option<std::net::SocketAddr>) -> serde_json::Value {
    let port = bound
        .or_else(|| config.ws.listen_addr())
        .map(|addr| addr.port())
        .filter(|port| *port != 0);
    serde_json::json!({
        "ws_port": port,
        "ws_path": config.ws.path,
        "ws_tls": config.tls.enabled(),
    })
}

/// The demo's routes (without state: everything is fixed at start-up).
pub fn router(config: &Config, bound_ws: Option<std::net::SocketAddr>) -> Router {
    let page_config = page_config(config, bound_ws).to_string();
    Router::new()
        .route("/demo", get(|| async { Redirect::permanent("/demo/") }))
        .route(
            "/demo/",
            get(|| async { fixed("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/demo/ruyi-sdk.js",
            get(|| async { fixed("text/javascript; charset=utf-8", SDK_JS) }),
        )
        .route(
            "/demo/config.json",
            get(move || {
                let body = page_config.clone();
                async move {
                    (
                        [
                            (header::CONTENT_TYPE, "application/json"),
                            (header::CACHE_CONTROL, "no-store"),
                        ],
                        body,
                    )
                        .into_response()
                }
            }),
        )
}
