//! The admin HTTP API and the control-plane thread.
//!
//! A business server drives the gateway over HTTP (users, tokens, groups,
//! system messages, conversations) with WuKongIM's paths and JSON field
//! names where WuKongIM has the same endpoint. The API runs on its own
//! thread (a single-threaded tokio runtime, with the webhook dispatcher),
//! off the shards' hot path: every request becomes a message to the shard
//! that owns what it names, through the shard's control inbox, and the
//! answer comes back on the request's own channel.
//!
//! Every route needs the admin token in a `token` header (compared in
//! constant time) unless `api.open` is set, which is allowed on loopback
//! only. Errors are JSON: `{"status": <HTTP status>, "error": <code>,
//! "msg": <what is wrong>}`. The one exception to the token is the chat demo
//! ([`demo`], `api.demo`): fixed static files under `/demo/` for people who
//! log in with user tokens over the WebSocket listener.
//!
//! The routes are listed once, in [`route_table`]; `openapi.json` describes
//! the same routes and a test checks that the two agree. The committed
//! document states the default limits and names the setting behind each
//! (`x-ruyi-config`); `GET /openapi.json` serves it with the running
//! server's values ([`openapi_document`]), so a client generated from it, or
//! a fuzzer, knows what this server accepts.

pub mod demo;
mod handlers;
mod metrics;

use crate::config::Config;
use crate::server::Control;
use crate::storage::Storage;
use crate::webhook::WebhookShared;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The OpenAPI description of every route, with the default limits.
/// `GET /openapi.json` serves [`openapi_document`] instead.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The vendor extension that names the setting behind a value of the
/// document: `{"<JSON Schema keyword>": "<setting>"}`.
const CONFIG_EXTENSION: &str = "x-ruyi-config";

/// [`OPENAPI_JSON`] as a server with `config` enforces it: every value that
/// an `x-ruyi-config` ties to a setting is that setting's value in `config`.
pub fn openapi_document(config: &Config) -> serde_json::Value {
    let mut document: serde_json::Value =
        serde_json::from_str(OPENAPI_JSON).expect("the committed OpenAPI document is JSON");
    apply_config(&mut document, config);
    document
}

fn apply_config(node: &mut serde_json::Value, config: &Config) {
    match node {
        serde_json::Value::Object(object) => {
            if let Some(serde_json::Value::Object(settings)) = object.get(CONFIG_EXTENSION) {
                let values: Vec<(String, serde_json::Value)> = settings
                    .iter()
                    .map(|(keyword, setting)| {
                        let setting = setting.as_str().unwrap_or_default();
                        let value = documented_setting(setting, config).unwrap_or_else(|| {
                            panic!("openapi.json: {CONFIG_EXTENSION} names an unknown setting {setting:?}")
                        });
                        // An `enum` of one: the document excludes or admits exactly this value.
                        let value = if keyword == "enum" {
                            serde_json::Value::Array(vec![value])
                        } else {
                            value
                        };
                        (keyword.clone(), value)
                    })
                    .collect();
                object.extend(values);
            }
            for child in object.values_mut() {
                apply_config(child, config);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                apply_config(item, config);
            }
        }
        _ => {}
    }
}

/// The value of a setting the OpenAPI document states, by the name it uses.
pub fn documented_setting(setting: &str, config: &Config) -> Option<serde_json::Value> {
    let limits = &config.limits;
    let value = match setting {
        "limits.uid_length_max_bytes" => limits.uid_length_max_bytes.into(),
        "limits.channel_id_length_max_bytes" => limits.channel_id_length_max_bytes.into(),
        "limits.client_msg_no_length_max_bytes" => limits.client_msg_no_length_max_bytes.into(),
        "limits.group_members_max" => limits.group_members_max.into(),
        "limits.sync_limit_max" => limits.sync_limit_max.into(),
        // Padded base64 takes 4 characters for every 3 bytes begun.
        "limits.payload_size_max_bytes in base64" => limits
            .payload_size_max_bytes
            .div_ceil(3)
            .saturating_mul(4)
            .into(),
        "api.user_token_length_max_bytes" => config.api.user_token_length_max_bytes.into(),
        "api.system_uid" => config.api.system_uid.clone().into(),
        _ => return None,
    };
    Some(value)
}

/// Where WuKongIM apps connect: what `GET /route` answers (empty strings
/// for listeners that are off).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WkRoutes {
    pub tcp_addr: String,
    pub ws_addr: String,
    pub wss_addr: String,
}

/// What the server's listeners bound to, for the routes that tell
/// clients where to connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bound {
    /// The WebSocket listener (`ws.listen`), with the port it got.
    pub ws_addr: Option<SocketAddr>,
    /// What `GET /route` answers.
    pub wk_routes: WkRoutes,
}

/// What every handler can reach.
pub struct Api {
    pub(crate) control: Control,
    pub(crate) config: Arc<Config>,
    pub(crate) bound: Bound,
    /// [`openapi_document`] for this configuration, made once.
    pub(crate) openapi_json: String,
}

type Shared = Arc<Api>;

/// Every route: method, path and handler. The router and the OpenAPI test
/// both read this list.
pub fn route_table() -> Vec<(&'static str, &'static str, MethodRouter<Shared>)> {
    use handlers::*;
    vec![
        ("POST", "/user/token", post(user_token)),
        ("POST", "/user/device_quit", post(user_device_quit)),
        ("POST", "/user/onlinestatus", post(user_online_status)),
        ("POST", "/channel", post(channel_create)),
        ("POST", "/channel/info", post(channel_info)),
        ("POST", "/channel/delete", post(channel_delete)),
        ("POST", "/channel/subscriber_add", post(subscriber_add)),
        (
            "POST",
            "/channel/subscriber_remove",
            post(subscriber_remove),
        ),
        ("POST", "/channel/blacklist_add", post(blacklist_add)),
        ("POST", "/channel/blacklist_remove", post(blacklist_remove)),
        ("POST", "/channel/whitelist_add", post(whitelist_add)),
        ("POST", "/channel/whitelist_remove", post(whitelist_remove)),
        ("POST", "/message/send", post(message_send)),
        ("POST", "/channel/messagesync", post(message_sync)),
        (
            "GET",
            "/message/byclientmsgno",
            get(message_by_client_msg_no),
        ),
        ("POST", "/message/revoke", post(message_revoke)),
        ("POST", "/conversation/sync", post(conversation_sync)),
        (
            "POST",
            "/conversations/clearUnread",
            post(conversation_clear_unread),
        ),
        (
            "POST",
            "/conversations/setUnread",
            post(conversation_set_unread),
        ),
        ("POST", "/conversations/delete", post(conversation_delete)),
        ("GET", "/route", get(route)),
        ("POST", "/route/batch", post(route_batch)),
        ("GET", "/health", get(health)),
        ("GET", "/metrics", get(metrics::metrics)),
        ("GET", "/openapi.json", get(openapi)),
    ]
}

/// The method and path of every route.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    route_table()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

/// The API's router, with the token check, the body limit and JSON errors
/// for unknown routes.
pub fn router(api: Shared) -> Router {
    let mut router = Router::new();
    for (_, path, handler) in route_table() {
        router = router.route(path, handler);
    }
    let body_max = api.config.api.body_max_bytes;
    let demo = api
        .config
        .api
        .demo
        .then(|| demo::router(&api.config, api.bound.ws_addr));
    let router = router
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no_such_route", "no such route")
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            require_token,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(body_max))
        .with_state(api);
    // Merged after the token check's layer, which therefore does not cover
    // the demo: its users have user tokens, not the admin token.
    match demo {
        Some(demo) => router.merge(demo),
        None => router,
    }
}

async fn require_token(State(api): State<Shared>, request: Request, next: Next) -> Response {
    if !api.config.api.open {
        let given = request
            .headers()
            .get("token")
            .map_or(&[][..], |value| value.as_bytes());
        let expected = api.config.api.token.as_bytes();
        if expected.is_empty() || !crate::auth::constant_time_eq(given, expected) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong `token` header",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn openapi(State(api): State<Shared>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        api.openapi_json.clone(),
    )
        .into_response()
}

/// An error answer: `{"status", "error", "msg"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    msg: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            msg: msg.into(),
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "status": self.status.as_u16(),
            "error": self.code,
            "msg": self.msg,
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// A JSON body; bad JSON and missing fields are a 400 naming the problem,
/// a body over `api.body_max_bytes` a 413.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        "the body exceeds api.body_max_bytes",
                    )
                } else {
                    ApiError::bad_request(rejection.body_text())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
    }
}

/// The control-plane thread: the admin API and the webhook dispatcher.
pub struct ControlPlane {
    control: Control,
    api_addr: Option<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts the thread when there is anything for it to do (an API
    /// listener, a webhook URL).
    pub fn start(
        config: &Arc<Config>,
        control: Control,
        storage: Arc<dyn Storage>,
        webhooks: Arc<WebhookShared>,
        api_listener: Option<std::net::TcpListener>,
        bound: Bound,
    ) -> std::io::Result<ControlPlane> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let api_addr = match &api_listener {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        let webhooks_on = !config.webhook.url.is_empty();
        if api_listener.is_none() && !webhooks_on {
            return Ok(ControlPlane {
                control,
                api_addr,
                stop,
                thread: None,
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let api = Arc::new(Api {
            control: control.clone(),
            config: Arc::clone(config),
            bound,
            openapi_json: openapi_document(config).to_string(),
        });
        let dispatcher = webhooks_on.then(|| {
            crate::webhook::Dispatcher::new(
                storage,
                control.shards(),
                config.webhook.clone(),
                webhooks,
            )
        });
        let thread = std::thread::Builder::new()
            .name("ruyi-control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut tasks = Vec::new();
                    if let Some(dispatcher) = dispatcher {
                        tasks.push(tokio::spawn(dispatcher.run(stopped.clone())));
                    }
                    if let Some(listener) = api_listener {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                let mut stopped = stopped.clone();
                                let serve = axum::serve(listener, router(api))
                                    .with_graceful_shutdown(async move {
                                        let _ = stopped.wait_for(|stop| *stop).await;
                                    });
                                tasks.push(tokio::spawn(async move {
                                    if let Err(error) = serve.await {
                                        tracing::error!(%error, "admin API stopped");
                                    }
                                }));
                            }
                            Err(error) => tracing::error!(%error, "admin API cannot listen"),
                        }
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                });
            })?;
        Ok(ControlPlane {
            control,
            api_addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Stops the API and the dispatcher (undelivered events stay in the
    /// outbox).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn join(mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long the API waits for a shard's answer.
fn shard_timeout(api: &Api) -> Duration {
    Duration::from_millis(api.config.api.request_timeout_ms)
}
