//! Webhooks: what the business server learns, delivered at least once.
//!
//! Shards write events into a durable outbox (the `webhooks` column
//! family) in the same commit as the messages they describe, so an event
//! exists if and only if its message does. The [`Dispatcher`], on the
//! control thread, posts each event as `POST {url}?event=NAME`, retries it
//! with exponential backoff while the receiver fails or hangs, and deletes it
//! only after a 2xx answer. A restart resumes from whatever is still in the
//! outbox. Every request carries the Standard Webhooks headers
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature`) so receivers can
//! verify it and drop repeats by id.
//!
//! Bodies follow WuKongIM's: `msg.notify` is a JSON array of messages,
//! `msg.offline` one message with `to_uids`, `user.onlinestatus` an array of
//! `"uid-device_flag-online-conn_id-device_online_count-total_online_count"`
//! strings.

use crate::config::WebhookConfig;
use crate::ids::{ShardId, Uid};
use crate::storage::{Storage, StoredMessage, WebhookRecord};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const EVENT_OFFLINE: &str = "msg.offline";
pub const EVENT_NOTIFY: &str = "msg.notify";
pub const EVENT_ONLINE_STATUS: &str = "user.onlinestatus";

/// Counters and the wake-up shared by the shards (writers) and the
/// dispatcher (reader).
#[derive(Debug, Default)]
pub struct WebhookShared {
    /// Events and bytes in the outbox (as [`WebhookRecord::size`] counts).
    pub outbox_events: AtomicU64,
    pub outbox_bytes: AtomicU64,
    /// Events not written because the outbox was full.
    pub dropped: AtomicU64,
    /// Events delivered (answered with a 2xx).
    pub delivered: AtomicU64,
    /// Attempts that failed (error, timeout or non-2xx).
    pub failed_attempts: AtomicU64,
    /// Signalled after a commit wrote events.
    pub wake: tokio::sync::Notify,
}

/// A shard's side of webhooks: which events it writes, the outbox bound,
/// and the `user.onlinestatus` lines and late `msg.offline` events waiting
/// for the next commit.
#[derive(Debug)]
pub struct WebhookWriter {
    pub offline: bool,
    pub notify: bool,
    pub online_status: bool,
    pub batch_max: usize,
    max_bytes: u64,
    shared: Arc<WebhookShared>,
    pub presence_lines: Vec<String>,
    /// Late `msg.offline` events per connection at most (see
    /// `late_offline_messages_max`).
    pub late_max: usize,
    /// Bodies of late `msg.offline` events waiting for the next commit.
    pub late_offline: Vec<Vec<u8>>,
}

impl WebhookWriter {
    /// `None` when webhooks are off.
    pub fn new(config: &WebhookConfig, shared: Arc<WebhookShared>) -> Option<WebhookWriter> {
        if config.url.is_empty() {
            return None;
        }
        Some(WebhookWriter {
            offline: config.wants(EVENT_OFFLINE),
            notify: config.wants(EVENT_NOTIFY),
            online_status: config.wants(EVENT_ONLINE_STATUS),
            batch_max: config.notify_batch_max_messages,
            max_bytes: config.outbox_max_bytes,
            shared,
            presence_lines: Vec::new(),
            late_max: config.late_offline_messages_max,
            late_offline: Vec::new(),
        })
    }

    /// Reserves room for `record` in the outbox. When it is full the event
    /// is dropped: counted, and logged as an error.
    pub fn admit(&mut self, record: &WebhookRecord) -> bool {
        let size = record.size();
        let before = self.shared.outbox_bytes.fetch_add(size, Ordering::Relaxed);
        if before.saturating_add(size) <= self.max_bytes {
            // Counted before the batch is durable, so the dispatcher (which
            // only sees it after) never subtracts first.
            self.shared.outbox_events.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        saturating_sub(&self.shared.outbox_bytes, size);
        let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(
            event = %record.event,
            dropped,
            outbox_max_bytes = self.max_bytes,
            "webhook outbox full: event dropped (is the receiver down?)"
        );
        false
    }

    /// A batch that reserved `events` and `bytes` failed to commit.
    pub fn release(&mut self, events: u64, bytes: u64) {
        saturating_sub(&self.shared.outbox_events, events);
        saturating_sub(&self.shared.outbox_bytes, bytes);
    }

    /// Events were committed: wake the dispatcher.
    pub fn committed(&self) {
        self.shared.wake.notify_one();
    }
}

/// A message as WuKongIM's `MessageResp` shows it, plus `timestamp_ms` and
/// `revoke`.
#[derive(Debug, Serialize)]
pub struct MessageJson<'a> {
    pub header: HeaderJson,
    pub setting: u8,
    pub message_id: u64,
    pub message_idstr: String,
    pub client_msg_no: &'a str,
    pub message_seq: u64,
    pub from_uid: &'a str,
    pub channel_id: &'a str,
    pub channel_type: u8,
    /// Unix seconds, as WuKongIM.
    pub timestamp: i64,
    pub timestamp_ms: i64,
    /// 1 when the message was recalled (its payload is then empty).
    pub revoke: u8,
    /// Base64 (standard alphabet).
    pub payload: String,
}

#[derive(Debug, Serialize, Default)]
pub struct HeaderJson {
    pub no_persist: u8,
    pub red_dot: u8,
    pub sync_once: u8,
}

/// The view of `message` in webhooks and the admin API: for a person
/// channel the channel id is the other party from the sender's side (what
/// the sender addressed).
pub fn message_json(message: &StoredMessage) -> MessageJson<'_> {
    MessageJson::new(
        message.message_id.0,
        message.seq.0,
        &message.client_msg_no,
        message.from_uid.as_str(),
        message.channel.id_seen_by(message.from_uid.as_str()),
        message.channel.kind().0,
        message.timestamp_ms,
        message.recalled,
        &message.payload,
    )
}

/// The same view of a message as one viewer got it (`channel_id` as that
/// viewer sees it), for the admin API's reads.
pub fn recv_json(recv: &crate::protocol::Recv) -> MessageJson<'_> {
    MessageJson::new(
        recv.message_id,
        recv.message_seq,
        &recv.client_msg_no,
        &recv.from_uid,
        &recv.channel_id,
        recv.channel_type.0,
        recv.timestamp_ms,
        recv.flags & crate::protocol::RECV_FLAG_RECALLED != 0,
        &recv.payload,
    )
}

impl<'a> MessageJson<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        message_id: u64,
        message_seq: u64,
        client_msg_no: &'a str,
        from_uid: &'a str,
        channel_id: &'a str,
        channel_type: u8,
        timestamp_ms: i64,
        recalled: bool,
        payload: &[u8],
    ) -> MessageJson<'a> {
        MessageJson {
            header: HeaderJson {
                red_dot: 1,
                ..HeaderJson::default()
            },
            setting: 0,
            message_id,
            message_idstr: message_id.to_string(),
            client_msg_no,
            message_seq,
            from_uid,
            channel_id,
            channel_type,
            timestamp: timestamp_ms.div_euclid(1000),
            timestamp_ms,
            revoke: u8::from(recalled),
            payload: base64::engine::general_purpose::STANDARD.encode(payload),
        }
    }
}

#[derive(Serialize)]
struct OfflineJson<'a> {
    #[serde(flatten)]
    message: MessageJson<'a>,
    to_uids: &'a [Uid],
}

/// The body of `msg.offline` for `message`.
pub fn offline_body(message: &StoredMessage, to_uids: &[Uid]) -> Vec<u8> {
    serde_json::to_vec(&OfflineJson {
        message: message_json(message),
        to_uids,
    })
    .expect("plain structs serialize")
}

/// The body of `msg.notify` for a batch of messages.
pub fn notify_body<'a>(messages: impl Iterator<Item = &'a StoredMessage>) -> Vec<u8> {
    let list: Vec<MessageJson<'a>> = messages.map(message_json).collect();
    serde_json::to_vec(&list).expect("plain structs serialize")
}

/// The body of `user.onlinestatus`.
pub fn online_status_body(lines: &[String]) -> Vec<u8> {
    serde_json::to_vec(lines).expect("strings serialize")
}

/// The id receivers deduplicate by: stable across retries and restarts.
pub fn event_id(shard: ShardId, id: u64) -> String {
    format!("evt_{}_{id}", shard.0)
}

/// The signing key: a `whsec_` secret is base64 after the prefix (Standard
/// Webhooks), anything else is used as it is.
pub fn signing_key(secret: &str) -> Vec<u8> {
    if let Some(encoded) = secret.strip_prefix("whsec_") {
        if let Ok(key) = base64::engine::general_purpose::STANDARD.decode(encoded) {
            return key;
        }
    }
    secret.as_bytes().to_vec()
}

/// `v1,` and the base64 HMAC-SHA256 of `"{id}.{timestamp}.{body}"`: the
/// `webhook-signature` header of Standard Webhooks.
pub fn sign(key: &[u8], id: &str, timestamp_s: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// Posts the outbox's events, read in commit order per shard, with at most
/// `concurrency` requests in flight. An event waiting to retry holds no
/// request slot, so a few events a receiver keeps refusing do not stop the
/// others; at most `concurrency` × [`EVENTS_IN_MEMORY_PER_REQUEST`] events
/// are held in memory at once, the rest wait in the outbox. Requests in
/// flight at once may arrive in any order.
pub struct Dispatcher {
    storage: Arc<dyn Storage>,
    shards: u16,
    config: WebhookConfig,
    shared: Arc<WebhookShared>,
    key: Arc<[u8]>,
}

impl Dispatcher {
    pub fn new(
        storage: Arc<dyn Storage>,
        shards: u16,
        config: WebhookConfig,
        shared: Arc<WebhookShared>,
    ) -> Dispatcher {
        let key = signing_key(&config.secret).into();
        Dispatcher {
            storage,
            shards,
            config,
            shared,
            key,
        }
    }

    /// Runs until `stop` turns true; what is not delivered stays in the
    /// outbox for the next start.
    pub async fn run(self, stop: tokio::sync::watch::Receiver<bool>) {
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_millis(self.config.request_timeout_ms))
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot build the webhook HTTP client; webhooks are not sent");
                return;
            }
        };
        let requests = Arc::new(tokio::sync::Semaphore::new(self.config.concurrency));
        let permits = Arc::new(tokio::sync::Semaphore::new(
            self.config.concurrency * EVENTS_IN_MEMORY_PER_REQUEST,
        ));
        // This run's shards, and any shard of an earlier run with more
        // shards that left events behind.
        let mut shards: Vec<ShardId> = (0..self.shards).map(ShardId).collect();
        match self.storage.webhook_shards() {
            Ok(found) => shards.extend(found.into_iter().filter(|s| s.0 >= self.shards)),
            Err(error) => tracing::error!(%error, "listing the webhook outbox failed"),
        }
        let mut cursors = vec![0u64; shards.len()];
        let mut stopping = stop.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        loop {
            let mut found = false;
            for (slot, shard) in shards.iter().copied().enumerate() {
                let events = match self.storage.webhook_events(
                    shard,
                    cursors[slot],
                    self.config.concurrency * 4,
                ) {
                    Ok(events) => events,
                    Err(error) => {
                        tracing::error!(%error, "reading the webhook outbox failed");
                        Vec::new()
                    }
                };
                for (id, record) in events {
                    found = true;
                    cursors[slot] = id;
                    let permit = tokio::select! {
                        permit = Arc::clone(&permits).acquire_owned() => permit.expect("never closed"),
                        _ = &mut stopped => return,
                    };
                    let attempt = Attempt {
                        client: client.clone(),
                        url: self.config.url.clone(),
                        key: Arc::clone(&self.key),
                        storage: Arc::clone(&self.storage),
                        shared: Arc::clone(&self.shared),
                        retry_initial_ms: self.config.retry_initial_ms,
                        retry_max_ms: self.config.retry_max_ms,
                        requests: Arc::clone(&requests),
                        stop: stop.clone(),
                    };
                    tokio::spawn(async move {
                        attempt.deliver(shard, id, record).await;
                        drop(permit);
                    });
                }
            }
            if !found {
                tokio::select! {
                    _ = self.shared.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = &mut stopped => return,
                }
            }
        }
    }
}

/// Events read from the outbox and held in memory (delivering or waiting
/// to retry), per allowed request in flight.
pub const EVENTS_IN_MEMORY_PER_REQUEST: usize = 64;

struct Attempt {
    requests: Arc<tokio::sync::Semaphore>,
    client: reqwest::Client,
    url: String,
    key: Arc<[u8]>,
    storage: Arc<dyn Storage>,
    shared: Arc<WebhookShared>,
    retry_initial_ms: u64,
    retry_max_ms: u64,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Attempt {
    async fn deliver(mut self, shard: ShardId, id: u64, record: WebhookRecord) {
        let event_id = event_id(shard, id);
        let mut url = self.url.clone();
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("event=");
        url.push_str(&record.event);
        let mut delay_ms = self.retry_initial_ms;
        let mut failures = 0u64;
        loop {
            let timestamp = crate::time::unix_now_ms() / 1000;
            let signature = sign(&self.key, &event_id, timestamp, &record.body);
            // A request slot only for the request itself, not the wait
            // before a retry.
            let Ok(slot) = self.requests.acquire().await else {
                return;
            };
            let outcome = self
                .client
                .post(&url)
                .header("content-type", "application/json")
                .header("webhook-id", &event_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(record.body.clone())
                .send()
                .await;
            drop(slot);
            let failure = match outcome {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("answered {}", response.status())),
                Err(error) => Some(error.to_string()),
            };
            let Some(failure) = failure else {
                break;
            };
            self.shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
            failures += 1;
            // The first failure and then every tenth are logged: a receiver
            // down for an hour should not flood the log.
            if failures == 1 || failures % 10 == 0 {
                tracing::warn!(event = %record.event, id = %event_id, failures, %failure, "webhook delivery failed; retrying");
            }
            let jitter = delay_ms / 5;
            let wait = delay_ms - jitter + fastrand_below(2 * jitter + 1);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = self.stop.wait_for(|stop| *stop) => return,
            }
            delay_ms = (delay_ms * 2).min(self.retry_max_ms);
        }
        if let Err(error) = self.storage.delete_webhook_event(shard, id) {
            tracing::warn!(%error, id = %event_id, "removing a delivered webhook event failed; it will be sent again");
        }
        self.shared.delivered.fetch_add(1, Ordering::Relaxed);
        saturating_sub(&self.shared.outbox_events, 1);
        saturating_sub(&self.shared.outbox_bytes, record.size());
    }
}

/// Subtracts without wrapping: a gauge read while another thread has not
/// added its share yet shows 0, not 2^64 - 1.
fn saturating_sub(gauge: &AtomicU64, amount: u64) {
    let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| {
        Some(value.saturating_sub(amount))
    });
}

/// A number in `0..bound` for jitter (not for anything secret).
fn fastrand_below(bound: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = ahash::RandomState::new().build_hasher();
    hasher.write_u64(crate::time::unix_now_ms());
    hasher.finish() % bound.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
