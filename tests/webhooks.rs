//! Webhooks against a real HTTP receiver on loopback: who is in
//! `msg.offline`, and at-least-once delivery across receiver failures and
//! a kill -9 of the gateway.

mod common;

use base64::Engine;
use common::{api_post, TestServer, WebhookReceiver};
use ruyi::channel::ChannelKey;
use ruyi::client::connect;
use ruyi::ids::ShardId;
use ruyi::protocol::{DeviceFlag, ReasonCode};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

const HOOK_SECRET: &str = "test-webhook-secret";

fn with_webhooks(receiver: &WebhookReceiver) -> impl FnOnce(&mut ruyi::Config) + '_ {
    move |config| {
        config.webhook.url = receiver.url.clone();
        config.webhook.secret = HOOK_SECRET.into();
        config.webhook.retry_initial_ms = 50;
        config.webhook.retry_max_ms = 500;
    }
}

/// The message ids a `msg.notify` request carries.
fn notified_ids(hook: &common::Hook) -> Vec<u64> {
    hook.json()
        .as_array()
        .expect("msg.notify is an array")
        .iter()
        .map(|m| m["message_id"].as_u64().unwrap())
        .collect()
}

fn offline_for(hooks: &[common::Hook], message_id: u64) -> Vec<serde_json::Value> {
    hooks
        .iter()
        .filter(|h| h.event == "msg.offline")
        .map(|h| h.json())
        .filter(|body| body["message_id"].as_u64() == Some(message_id))
        .collect()
}

fn notified(hooks: &[common::Hook], message_id: u64) -> bool {
    hooks
        .iter()
        .filter(|h| h.event == "msg.notify")
        .any(|h| notified_ids(h).contains(&message_id))
}

/// The `webhook-id`s of every attempt to post the `msg.offline` of
/// `message_id`, refused or accepted. The attempts are picked by what they
/// carry, not by their id, so that this says whether one event kept one id.
fn offline_attempt_ids(attempts: &[common::Hook], message_id: u64) -> BTreeSet<String> {
    attempts
        .iter()
        .filter(|h| h.event == "msg.offline" && h.json()["message_id"].as_u64() == Some(message_id))
        .map(|h| h.id.clone())
        .collect()
}

/// Waits until `done` holds for every request the receiver got, refused
/// ones included (or panics after a generous wait).
async fn wait_for_attempts(
    receiver: &WebhookReceiver,
    what: &str,
    done: impl Fn(&[common::Hook]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + common::WAIT * 3;
    while !done(&receiver.attempts.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_event_refused_the_first_time_is_posted_again_with_the_same_webhook_id() {
    let receiver = WebhookReceiver::start().await;
    receiver
        .refuse_first
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let server = TestServer::start_with(with_webhooks(&receiver));
    // Bob is offline: each message makes its own msg.offline.
    let (alice, _alice_in) = server.connect("alice").await;
    let mut sent = Vec::new();
    for text in ["first", "second"] {
        let ack = alice.send_text("bob", text).await.unwrap();
        assert_eq!(ack.reason, ReasonCode::Success);
        sent.push(ack.message_id);
    }
    receiver
        .wait_for("msg.offline of both messages, accepted", |hooks| {
            sent.iter().all(|id| !offline_for(hooks, *id).is_empty())
        })
        .await;

    let attempts = receiver.attempts.lock().unwrap().clone();
    let mut event_ids = BTreeSet::new();
    for message_id in &sent {
        let tries: Vec<&common::Hook> = attempts
            .iter()
            .filter(|h| {
                h.event == "msg.offline" && h.json()["message_id"].as_u64() == Some(*message_id)
            })
            .collect();
        let answers: Vec<u16> = tries.iter().map(|h| h.answered).collect();
        assert_eq!(answers, [500, 200], "refused once, then accepted");
        assert!(!tries[0].id.is_empty());
        assert_eq!(tries[0].id, tries[1].id, "one event, one webhook-id");
        assert_eq!(tries[0].body, tries[1].body);
        // Each attempt is signed afresh, over the same id.
        for hook in &tries {
            assert!(hook.signed_with(HOOK_SECRET.as_bytes()), "{hook:?}");
        }
        event_ids.insert(tries[0].id.clone());
    }
    assert_eq!(event_ids.len(), 2, "two events, two ids: {event_ids:?}");
    // The same holds for every other event (msg.notify, user.onlinestatus):
    // an id never carries two different bodies.
    for hook in &attempts {
        assert!(
            attempts
                .iter()
                .filter(|other| other.id == hook.id)
                .all(|other| other.event == hook.event && other.body == hook.body),
            "{hook:?}"
        );
    }
    server.stop();
}

#[tokio::test]
async fn msg_offline_lists_exactly_the_recipient_with_no_device_and_not_once_they_are_online() {
    let receiver = WebhookReceiver::start().await;
    let server = TestServer::start_with(with_webhooks(&receiver));
    // A is online on a web device only; B has no connection at all.
    let options = server.options("alice").device("browser", DeviceFlag::Web);
    let (alice, _alice_in) = connect(server.addr, options).await.unwrap();
    let first = alice.send_text("bob", "are you there?").await.unwrap();
    assert_eq!(first.reason, ReasonCode::Success);
    receiver
        .wait_for("msg.offline and msg.notify of the first message", |hooks| {
            !offline_for(hooks, first.message_id).is_empty() && notified(hooks, first.message_id)
        })
        .await;
    let hooks = receiver.hooks.lock().unwrap().clone();
    let offline = offline_for(&hooks, first.message_id);
    assert_eq!(offline.len(), 1, "exactly one msg.offline: {offline:?}");
    let event = &offline[0];
    assert_eq!(event["to_uids"], json!(["bob"]));
    assert_eq!(event["from_uid"], "alice");
    assert_eq!(event["channel_id"], "bob");
    assert_eq!(event["channel_type"], 1);
    assert_eq!(event["message_seq"], first.message_seq);
    assert_eq!(event["client_msg_no"], first.client_msg_no);
    assert_eq!(
        event["payload"],
        base64::engine::general_purpose::STANDARD.encode("are you there?")
    );
    for hook in &hooks {
        assert!(hook.signed_with(HOOK_SECRET.as_bytes()), "{hook:?}");
    }

    // With B online too: no msg.offline lists B.
    let (_bob, mut bob_in) = server.connect("bob").await;
    let second = alice.send_text("bob", "hello again").await.unwrap();
    bob_in.next_message(common::WAIT).await.unwrap();
    receiver
        .wait_for("msg.notify of the second message", |hooks| {
            notified(hooks, second.message_id)
        })
        .await;
    // The msg.offline would have been committed with the message, and the
    // dispatcher sends in commit order: give it a moment anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hooks = receiver.hooks.lock().unwrap().clone();
    assert!(offline_for(&hooks, second.message_id).is_empty());
    for hook in hooks.iter().filter(|h| h.event == "msg.offline") {
        let to: Vec<String> = serde_json::from_value(hook.json()["to_uids"].clone()).unwrap();
        if hook.json()["message_id"].as_u64() != Some(first.message_id) {
            assert!(!to.contains(&"bob".to_owned()), "{to:?}");
        }
    }
    server.stop();
}

#[tokio::test]
async fn msg_offline_of_a_group_spread_over_both_shards_is_exactly_the_offline_members() {
    let receiver = WebhookReceiver::start().await;
    let server = TestServer::start_with(with_webhooks(&receiver));
    // One group owned by each shard, so the owner is sometimes the sender's
    // shard and sometimes not.
    let mut groups = Vec::new();
    for shard in [ShardId(0), ShardId(1)] {
        let id = (0..)
            .map(|n| format!("crew{n}"))
            .find(|id| ChannelKey::group(id).shard(2) == shard)
            .unwrap();
        groups.push(id);
    }
    let members = ["m1", "m2", "m3", "m4", "m5", "m6"];
    for group in &groups {
        let control = server.control();
        control.create_group(group, &members).await.unwrap();
    }
    // Online: m1 (the sender) on shard 0, m2 and m3 on shard 1.
    let (m1, _m1_in) = server.connect_on_shard("m1", "d1", ShardId(0)).await;
    let (_m2, _m2_in) = server.connect_on_shard("m2", "d2", ShardId(1)).await;
    let (_m3, _m3_in) = server.connect_on_shard("m3", "d3", ShardId(1)).await;
    let mut sent = Vec::new();
    for group in &groups {
        let ack = m1.send_group_text(group, "meeting at noon").await.unwrap();
        assert_eq!(ack.reason, ReasonCode::Success);
        sent.push(ack.message_id);
    }
    receiver
        .wait_for("msg.offline of both group messages", |hooks| {
            sent.iter().all(|id| !offline_for(hooks, *id).is_empty())
        })
        .await;
    let hooks = receiver.hooks.lock().unwrap().clone();
    for id in sent {
        let offline = offline_for(&hooks, id);
        assert_eq!(offline.len(), 1);
        assert_eq!(offline[0]["to_uids"], json!(["m4", "m5", "m6"]));
    }
    server.stop();
}

#[tokio::test]
async fn every_event_arrives_signed_after_the_receiver_fails_and_the_gateway_is_killed() {
    let receiver = WebhookReceiver::start().await;
    receiver
        .status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ruyi.toml");
    std::fs::write(
        &config,
        format!(
            "[webhook]\nurl = \"{}\"\nsecret = \"{HOOK_SECRET}\"\nretry_initial_ms = 50\n\
             retry_max_ms = 300\nrequest_timeout_ms = 1000\n",
            receiver.url
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let config_arg = config.to_str().unwrap();
    let (mut child, _, api) =
        common::spawn_gateway_with(&data, "127.0.0.1:0", &["--config", config_arg]);
    let base = format!("http://{api}");
    let mut sent = Vec::new();
    for n in 0..20 {
        let (status, body) = api_post(
            &base,
            "/message/send",
            json!({"from_uid": "alice", "channel_id": "bob", "channel_type": 1,
                   "client_msg_no": format!("hook-{n}"),
                   "payload": base64::engine::general_purpose::STANDARD.encode(format!("m{n}"))}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        sent.push(body["data"]["message_id"].as_u64().unwrap());
    }
    // Let the dispatcher fail on a few events, then kill the gateway.
    wait_for_attempts(&receiver, "refused msg.offline attempts", |attempts| {
        attempts.iter().filter(|h| h.event == "msg.offline").count() >= 3
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(receiver.hooks.lock().unwrap().is_empty());
    let refused_before_the_kill = receiver.attempts.lock().unwrap().clone();

    let (mut child, _, api) =
        common::spawn_gateway_with(&data, "127.0.0.1:0", &["--config", config_arg]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    receiver
        .status
        .store(200, std::sync::atomic::Ordering::SeqCst);
    receiver
        .wait_for("msg.notify and msg.offline of every message", |hooks| {
            sent.iter()
                .all(|id| notified(hooks, *id) && !offline_for(hooks, *id).is_empty())
        })
        .await;
    let hooks = receiver.hooks.lock().unwrap().clone();
    let ids: BTreeSet<&str> = hooks.iter().map(|h| h.id.as_str()).collect();
    assert!(!ids.contains(""), "every request carries an id");
    for hook in &hooks {
        assert!(
            hook.signed_with(HOOK_SECRET.as_bytes()),
            "bad signature: {hook:?}"
        );
        let age = ruyi::time::unix_now_ms() / 1000 - hook.timestamp.parse::<u64>().unwrap();
        assert!(age < 60, "timestamp is the time of the attempt");
    }
    for id in &sent {
        assert_eq!(offline_for(&hooks, *id)[0]["to_uids"], json!(["bob"]));
    }
    // An event refused before the kill is delivered after the restart
    // under the id it had: receivers can drop the repeat.
    let attempts = receiver.attempts.lock().unwrap().clone();
    for refused in refused_before_the_kill
        .iter()
        .filter(|h| h.event == "msg.offline")
    {
        let message_id = refused.json()["message_id"].as_u64().unwrap();
        assert_eq!(
            offline_attempt_ids(&attempts, message_id),
            BTreeSet::from([refused.id.clone()]),
            "every attempt of message {message_id}'s msg.offline, before and after the kill"
        );
    }
    // The outbox empties, and its gauges (counted again at the restart)
    // come back to zero.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (_, metrics) = common::api_get(&format!("http://{api}"), "/metrics").await;
        if metrics.contains("ruyi_webhook_outbox_events 0\n")
            && metrics.contains("ruyi_webhook_outbox_bytes 0\n")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outbox not empty:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn events_left_by_a_run_with_more_shards_are_delivered_after_a_restart_with_fewer() {
    let receiver = WebhookReceiver::start().await;
    receiver
        .status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), with_webhooks(&receiver));
    // Messages in channels owned by both shards.
    let mut sent = Vec::new();
    for n in 0..8 {
        let (status, body) = api_post(
            &server.api_url(),
            "/message/send",
            json!({"from_uid": format!("u{n}"), "channel_id": "bob", "channel_type": 1,
                   "payload": base64::engine::general_purpose::STANDARD.encode("x")}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        sent.push(body["data"]["message_id"].as_u64().unwrap());
    }
    let shards: BTreeSet<u64> = sent.iter().map(|id| (id >> 12) & 0x3ff).collect();
    assert_eq!(shards.len(), 2, "messages on both shards");
    server.stop();

    receiver
        .status
        .store(200, std::sync::atomic::Ordering::SeqCst);
    let webhooks = with_webhooks(&receiver);
    let server = TestServer::start_in(dir.path(), move |c| {
        webhooks(c);
        c.server.shards = 1;
    });
    receiver
        .wait_for("msg.notify of every message", |hooks| {
            sent.iter().all(|id| notified(hooks, *id))
        })
        .await;
    server.stop();
}
