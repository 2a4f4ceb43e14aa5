//! The admin HTTP API against a real server (2 shards, RocksDB, port 0),
//! through HTTP on loopback and the SDK.

mod common;

use base64::Engine;
use common::{api_get, api_post, TestServer, WAIT};
use ruyi::client::{connect, ConnectOptions, Delivery};
use ruyi::protocol::DeviceFlag;
use serde_json::json;
use std::collections::BTreeSet;

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn every_route_without_the_admin_token_answers_401() {
    let server = TestServer::start();
    let base = server.api_url();
    let http = reqwest::Client::new();
    let routes = ruyi::api::routes();
    assert!(routes.len() >= 20);
    for (method, path) in routes {
        for token in [None, Some("wrong-token")] {
            let mut request = match method {
                "GET" => http.get(format!("{base}{path}")),
                _ => http.post(format!("{base}{path}")).json(&json!({})),
            };
            if let Some(token) = token {
                request = request.header("token", token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status().as_u16(),
                401,
                "{method} {path} with token {token:?}"
            );
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized", "{method} {path}");
        }
    }
    // Unknown routes too: nothing is reachable without the token.
    let response = http.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    server.stop();
}

#[test]
fn the_openapi_document_describes_exactly_the_served_routes() {
    let doc: serde_json::Value = serde_json::from_str(ruyi::api::OPENAPI_JSON).unwrap();
    let mut described = BTreeSet::new();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            described.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = ruyi::api::routes()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(described, served);
}

#[tokio::test]
async fn message_send_answers_with_a_seq_after_commit_readable_by_sync_and_client_msg_no_then_revoke_recalls_it(
) {
    let server = TestServer::start();
    let base = server.api_url();
    let (status, _) = api_post(
        &base,
        "/channel",
        json!({"channel_id": "g1", "channel_type": 2, "subscribers": ["alice", "bob"]}),
    )
    .await;
    assert_eq!(status, 200);
    let (bob, mut bob_in) = server.connect("bob").await;

    let (status, sent) = api_post(
        &base,
        "/message/send",
        json!({"from_uid": "alice", "channel_id": "g1", "channel_type": 2,
               "client_msg_no": "api-1", "payload": b64("hello from the API")}),
    )
    .await;
    assert_eq!(status, 200, "{sent}");
    let seq = sent["data"]["message_seq"].as_u64().unwrap();
    let message_id = sent["data"]["message_id"].as_u64().unwrap();
    assert_eq!(seq, 1);
    assert_eq!(sent["data"]["client_msg_no"], "api-1");

    // A member online gets it live.
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!((got.message_seq, got.message_id), (seq, message_id));
    assert_eq!(&got.payload[..], b"hello from the API");

    // The same client_msg_no again: the same answer, nothing stored twice.
    let (_, again) = api_post(
        &base,
        "/message/send",
        json!({"from_uid": "alice", "channel_id": "g1", "channel_type": 2,
               "client_msg_no": "api-1", "payload": b64("hello from the API")}),
    )
    .await;
    assert_eq!(again["data"]["message_seq"].as_u64(), Some(seq));

    // Immediately readable by range sync and by client_msg_no.
    let sync = json!({"login_uid": "bob", "channel_id": "g1", "channel_type": 2,
                      "start_message_seq": 1, "limit": 10, "pull_mode": 1});
    let (status, synced) = api_post(&base, "/channel/messagesync", sync.clone()).await;
    assert_eq!(status, 200, "{synced}");
    let messages = synced["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["message_seq"].as_u64(), Some(seq));
    assert_eq!(messages[0]["payload"], b64("hello from the API"));
    assert_eq!(messages[0]["revoke"], 0);
    let (status, found) = api_get(
        &base,
        "/message/byclientmsgno?from_uid=alice&client_msg_no=api-1",
    )
    .await;
    assert_eq!(status, 200, "{found}");
    let found: serde_json::Value = serde_json::from_str(&found).unwrap();
    assert_eq!(found["message_seq"].as_u64(), Some(seq));
    assert_eq!(found["message_id"].as_u64(), Some(message_id));

    // Revoke: recalled in sync, by client_msg_no, and on the live device.
    let (status, revoked) = api_post(
        &base,
        "/message/revoke",
        json!({"channel_id": "g1", "channel_type": 2, "message_seq": seq}),
    )
    .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["data"]["message_id"].as_u64(), Some(message_id));
    match bob_in.next(WAIT).await.unwrap() {
        Delivery::Recall(event) => assert_eq!(event.message_seq, seq),
        other => panic!("expected a recall, got {other:?}"),
    }
    let (_, synced) = api_post(&base, "/channel/messagesync", sync).await;
    assert_eq!(synced["messages"][0]["revoke"], 1);
    assert_eq!(synced["messages"][0]["payload"], "");
    let (_, found) = api_get(
        &base,
        "/message/byclientmsgno?from_uid=alice&client_msg_no=api-1",
    )
    .await;
    let found: serde_json::Value = serde_json::from_str(&found).unwrap();
    assert_eq!(found["revoke"], 1);
    let synced = bob
        .sync_messages(
            "g1",
            ruyi::protocol::ChannelType::Group,
            1,
            0,
            10,
            ruyi::protocol::SyncDirection::Up,
        )
        .await
        .unwrap();
    assert_eq!(synced.messages.len(), 1);
    assert_ne!(
        synced.messages[0].flags & ruyi::protocol::RECV_FLAG_RECALLED,
        0
    );
    server.stop();
}

#[tokio::test]
async fn bad_json_missing_fields_and_unknown_channels_get_a_4xx_naming_the_problem() {
    let server = TestServer::start();
    let base = server.api_url();
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{base}/message/send"))
        .header("token", common::API_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "bad_request");
    assert!(
        body["msg"].as_str().unwrap().contains("invalid JSON"),
        "{body}"
    );

    let (status, body) = api_post(&base, "/user/token", json!({"token": "t"})).await;
    assert_eq!(status, 400);
    assert!(body["msg"].as_str().unwrap().contains("uid"), "{body}");

    let (status, body) = api_post(
        &base,
        "/message/send",
        json!({"from_uid": "alice", "channel_id": "nope", "channel_type": 2, "payload": b64("x")}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "channel_missing");

    let (status, body) = api_post(
        &base,
        "/channel/info",
        json!({"channel_id": "nope", "channel_type": 2}),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let (status, body) = api_post(
        &base,
        "/message/send",
        json!({"from_uid": "alice", "channel_id": "bob", "channel_type": 1, "payload": "***"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["msg"].as_str().unwrap().contains("base64"), "{body}");

    let big = "x".repeat(2 * 1024 * 1024);
    let response = http
        .post(format!("{base}/message/send"))
        .header("token", common::API_TOKEN)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    server.stop();
}

#[tokio::test]
async fn message_send_to_subscribers_refuses_the_sender_and_an_overlong_number_before_sending_anything(
) {
    let server = TestServer::start();
    let base = server.api_url();
    let long_uid = "u".repeat(60);
    // Without a client_msg_no each recipient gets a number of its own, which
    // fits whatever the uid's length (it used to be `api-<32 hex>/<uid>`).
    let (status, body) = api_post(
        &base,
        "/message/send",
        json!({"subscribers": [&long_uid, "bob"], "payload": b64("hi")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let messages = body["data"]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_ne!(messages[0]["client_msg_no"], messages[1]["client_msg_no"]);

    // The sender among the recipients: a person channel with themselves.
    let (status, body) = api_post(
        &base,
        "/message/send",
        json!({"from_uid": "alice", "subscribers": ["carol", "alice"], "payload": b64("hi")}),
    )
    .await;
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("invalid_channel")),
        "{body}"
    );

    // `order-1/<60 bytes>` does not fit in 64 bytes: refused before carol's
    // message is sent.
    let (status, body) = api_post(
        &base,
        "/message/send",
        json!({"from_uid": "alice", "client_msg_no": "order-1",
               "subscribers": ["carol", &long_uid], "payload": b64("hi")}),
    )
    .await;
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("invalid_client_msg_no")),
        "{body}"
    );
    for viewer in ["alice", "carol"] {
        let (status, list) = api_post(&base, "/conversation/sync", json!({"uid": viewer})).await;
        assert_eq!((status, list), (200, json!([])), "{viewer}");
    }
    server.stop();
}

#[tokio::test]
async fn values_outside_the_documented_ranges_get_400_naming_the_limit() {
    let server = TestServer::start();
    let base = server.api_url();
    let cases = [
        (
            "/user/device_quit",
            json!({"uid": "alice", "device_flag": 3}),
            "device_flag",
        ),
        (
            "/user/token",
            json!({"uid": "alice", "token": "t".repeat(1025)}),
            "api.user_token_length_max_bytes",
        ),
        (
            "/conversations/setUnread",
            json!({"uid": "bob", "channel_id": "alice", "channel_type": 1, "unread": 1001}),
            "limits.sync_limit_max",
        ),
        (
            "/channel/messagesync",
            json!({"login_uid": "bob", "channel_id": "bob", "channel_type": 1, "limit": 1}),
            "themselves",
        ),
        // One uid 10,001 times: the request's list is what is bounded.
        (
            "/channel/blacklist_add",
            json!({"channel_id": "bob", "channel_type": 1, "uids": vec!["r"; 10_001]}),
            "limits.group_members_max",
        ),
    ];
    for (path, request, named) in cases {
        let (status, body) = api_post(&base, path, request).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["msg"].as_str().unwrap().contains(named),
            "{path}: {body}"
        );
    }
    let long = "x".repeat(65);
    let (status, body) = api_get(
        &base,
        &format!("/message/byclientmsgno?from_uid=alice&client_msg_no={long}"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("client_msg_no_length_max_bytes"), "{body}");
    server.stop();
}

#[tokio::test]
async fn a_registered_token_lets_a_device_connect_and_device_quit_logs_it_out() {
    let server = TestServer::start();
    let base = server.api_url();
    let (status, _) = api_post(
        &base,
        "/user/token",
        json!({"uid": "carol", "token": "carol-app-token", "device_flag": 0, "device_level": 1}),
    )
    .await;
    assert_eq!(status, 200);
    let options = ConnectOptions::new("carol")
        .token("carol-app-token")
        .device("phone", DeviceFlag::App)
        .resume(false);
    let (_carol, mut carol_in) = connect(server.addr, options.clone()).await.unwrap();
    // Only for that device flag.
    let web = ConnectOptions::new("carol")
        .token("carol-app-token")
        .device("browser", DeviceFlag::Web)
        .resume(false);
    assert!(connect(server.addr, web).await.is_err());

    let (status, online) = api_post(&base, "/user/onlinestatus", json!(["carol", "dave"])).await;
    assert_eq!(status, 200);
    assert_eq!(
        online,
        json!([{"uid": "carol", "device_flag": 0, "online": 1}])
    );

    let (status, quit) = api_post(
        &base,
        "/user/device_quit",
        json!({"uid": "carol", "device_flag": 0}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(quit["data"]["kicked"], 1);
    loop {
        match carol_in.next(WAIT).await {
            Ok(Delivery::Closed(Some(disconnect))) => {
                assert_eq!(disconnect.reason, ruyi::protocol::ReasonCode::Kicked);
                break;
            }
            Ok(Delivery::Closed(None)) | Err(_) => panic!("closed without a Disconnect"),
            Ok(_) => {}
        }
    }
    // The token no longer works.
    assert!(connect(server.addr, options).await.is_err());
    server.stop();
}

#[tokio::test]
async fn subscribers_added_and_removed_through_the_api_get_exactly_what_they_should() {
    let server = TestServer::start();
    let base = server.api_url();
    api_post(
        &base,
        "/channel",
        json!({"channel_id": "team", "subscribers": ["ann", "ben"]}),
    )
    .await;
    let (status, _) = api_post(
        &base,
        "/channel/subscriber_add",
        json!({"channel_id": "team", "channel_type": 2, "subscribers": ["cid"]}),
    )
    .await;
    assert_eq!(status, 200);
    let (ann, _ann_in) = server.connect("ann").await;
    let (_cid, mut cid_in) = server.connect("cid").await;
    ann.send_group_text("team", "one").await.unwrap();
    assert_eq!(
        &cid_in.next_message(WAIT).await.unwrap().payload[..],
        b"one"
    );

    let (status, _) = api_post(
        &base,
        "/channel/subscriber_remove",
        json!({"channel_id": "team", "channel_type": 2, "subscribers": ["cid"]}),
    )
    .await;
    assert_eq!(status, 200);
    let ack = ann.send_group_text("team", "two").await.unwrap();
    assert!(ack.message_seq > 1);
    common::assert_nothing_arrives(&mut cid_in, std::time::Duration::from_millis(300)).await;

    let (status, info) = api_post(&base, "/channel/info", json!({"channel_id": "team"})).await;
    assert_eq!(status, 200);
    assert_eq!(info["data"]["subscribers"], json!(["ann", "ben"]));
    assert_eq!(info["data"]["last_message_seq"], 2);

    // Blacklisted: the API's send as that member is refused like a client's.
    api_post(
        &base,
        "/channel/blacklist_add",
        json!({"channel_id": "team", "channel_type": 2, "uids": ["ben"]}),
    )
    .await;
    let (status, body) = api_post(
        &base,
        "/message/send",
        json!({"from_uid": "ben", "channel_id": "team", "channel_type": 2, "payload": b64("x")}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "denied");
    // A system message is not subject to membership or lists.
    let (status, body) = api_post(
        &base,
        "/message/send",
        json!({"channel_id": "team", "channel_type": 2, "payload": b64("system notice")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let (status, _) = api_post(&base, "/channel/delete", json!({"channel_id": "team"})).await;
    assert_eq!(status, 200);
    let (status, _) = api_post(&base, "/channel/info", json!({"channel_id": "team"})).await;
    assert_eq!(status, 404);
    assert!(
        ann.send_group_text("team", "after").await.unwrap().reason
            == ruyi::protocol::ReasonCode::ChannelMissing
    );
    server.stop();
}

#[tokio::test]
async fn conversation_endpoints_change_the_users_conversations_and_tell_their_devices() {
    let server = TestServer::start();
    let base = server.api_url();
    let (_bob, mut bob_in) = server.connect("bob").await;
    for n in 0..3 {
        let (status, body) = api_post(
            &base,
            "/message/send",
            json!({"from_uid": "alice", "channel_id": "bob", "channel_type": 1,
                   "payload": b64(&format!("m{n}"))}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..3 {
        bob_in.next_message(WAIT).await.unwrap();
    }
    let (status, list) = api_post(
        &base,
        "/conversation/sync",
        json!({"uid": "bob", "version": 0, "msg_count": 1}),
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["channel_id"], "alice");
    assert_eq!(list[0]["unread"], 3);
    assert_eq!(list[0]["recents"][0]["payload"], b64("m2"));

    let (status, body) = api_post(
        &base,
        "/conversations/clearUnread",
        json!({"uid": "bob", "channel_id": "alice", "channel_type": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    match bob_in.next(WAIT).await.unwrap() {
        Delivery::ConversationUpdate(c) => {
            assert_eq!((c.channel_id.as_str(), c.unread), ("alice", 0))
        }
        other => panic!("expected a conversation update, got {other:?}"),
    }
    let (_, body) = api_post(
        &base,
        "/conversations/setUnread",
        json!({"uid": "bob", "channel_id": "alice", "channel_type": 1, "unread": 2}),
    )
    .await;
    assert_eq!(body["data"]["unread"], 2);
    let (_, _) = api_post(
        &base,
        "/conversations/delete",
        json!({"uid": "bob", "channel_id": "alice", "channel_type": 1}),
    )
    .await;
    let (_, list) = api_post(&base, "/conversation/sync", json!({"uid": "bob"})).await;
    assert_eq!(list, json!([]));
    let (status, body) = api_post(
        &base,
        "/conversations/clearUnread",
        json!({"uid": "bob", "channel_id": "nobody", "channel_type": 1}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    server.stop();
}

#[tokio::test]
async fn health_is_ready_and_metrics_are_prometheus_text() {
    let server = TestServer::start();
    let base = server.api_url();
    let (status, body) = api_get(&base, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\""));
    let (_alice, _) = server.connect("alice").await;
    let (status, text) = api_get(&base, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "ruyi_connections 1",
        "ruyi_messages_received_total",
        "ruyi_messages_delivered_total",
        "ruyi_acks_received_total",
        "ruyi_retries_total",
        "ruyi_inbox_depth",
        "ruyi_storage_commit_seconds_bucket{le=\"+Inf\"}",
        "ruyi_webhook_outbox_events",
        "ruyi_webhook_events_dropped_total",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    let (status, doc) = api_get(&base, "/openapi.json").await;
    assert_eq!(status, 200);
    // The test server has the default limits: the committed document.
    let served: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let committed: serde_json::Value = serde_json::from_str(ruyi::api::OPENAPI_JSON).unwrap();
    assert_eq!(served, committed);
    server.stop();
}

#[test]
fn the_committed_openapi_document_states_the_default_limits() {
    let committed: serde_json::Value = serde_json::from_str(ruyi::api::OPENAPI_JSON).unwrap();
    let defaults = ruyi::api::openapi_document(&ruyi::config::Config::default());
    assert_eq!(defaults, committed);
}

#[tokio::test]
async fn the_served_openapi_document_states_the_running_servers_limits() {
    let server = TestServer::start_with(|c| {
        c.limits.uid_length_max_bytes = 20;
        c.limits.channel_id_length_max_bytes = 30;
        c.limits.client_msg_no_length_max_bytes = 40;
        c.limits.group_members_max = 50;
        c.limits.sync_limit_max = 60;
        c.limits.payload_size_max_bytes = 3001;
        c.api.user_token_length_max_bytes = 70;
        c.api.system_uid = "sys".into();
    });
    let (status, doc) = api_get(&server.api_url(), "/openapi.json").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Uid"]["maxLength"], 20);
    assert_eq!(schemas["GroupId"]["maxLength"], 30);
    assert_eq!(schemas["ClientMsgNo"]["maxLength"], 40);
    let body = |path: &str| {
        doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["properties"]
            .clone()
    };
    assert_eq!(body("/channel")["subscribers"]["maxItems"], 50);
    assert_eq!(body("/conversations/setUnread")["unread"]["maximum"], 60);
    // 3001 bytes are 1001 groups of up to 3, 4 characters each.
    assert_eq!(body("/message/send")["payload"]["maxLength"], 4004);
    assert_eq!(body("/user/token")["token"]["maxLength"], 70);
    assert_eq!(body("/user/token")["uid"]["not"]["enum"], json!(["sys"]));
    server.stop();
}

#[tokio::test]
async fn without_an_auth_secret_only_tokens_registered_through_the_api_log_in() {
    let server = TestServer::start_with(|c| c.auth.secret = String::new());
    let signed = ConnectOptions::new("dan")
        .token(&common::token("dan"))
        .resume(false);
    assert!(connect(server.addr, signed).await.is_err());
    let (status, _) = api_post(
        &server.api_url(),
        "/user/token",
        json!({"uid": "dan", "token": "dan-registered", "device_flag": 0}),
    )
    .await;
    assert_eq!(status, 200);
    let registered = ConnectOptions::new("dan")
        .token("dan-registered")
        .resume(false);
    assert!(connect(server.addr, registered).await.is_ok());
    server.stop();
}

/// `ruyi_message_stage_seconds` times every stage of a message that was
/// stored, acknowledged and pushed live (the latency budget).
#[tokio::test]
async fn the_latency_budget_in_metrics_times_every_stage_of_a_delivered_message() {
    let server = TestServer::start();
    let base = server.api_url();
    let (alice, _) = server.connect("alice").await;
    let (_bob, mut bob_in) = server.connect("bob").await;
    let ack = alice.send_text("bob", "hello").await.unwrap();
    assert_eq!(ack.reason, ruyi::protocol::ReasonCode::Success);
    bob_in.next_message(WAIT).await.unwrap();
    let (_, text) = api_get(&base, "/metrics").await;
    let count = |stage: &str| -> u64 {
        let prefix = format!("ruyi_message_stage_seconds_count{{stage=\"{stage}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    };
    for stage in [
        "route",
        "queue",
        "write",
        "ack_return",
        "send_ack",
        "delivered",
    ] {
        assert_eq!(count(stage), 1, "stage {stage}");
    }
    // One sample per shard the message goes to (the sender's own for her
    // other devices, when it is not the owner).
    assert!(
        (1..=2).contains(&count("fanout")),
        "fanout {}",
        count("fanout")
    );
    // The ConnAcks, the SendAck and the push were written to sockets.
    assert!(count("flush") >= 3, "flush {}", count("flush"));
    // The SDK acknowledges what it got: the budget hears of it.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, text) = api_get(&base, "/metrics").await;
        let prefix = "ruyi_message_stage_seconds_count{stage=\"recv_ack\"} ";
        let acked = text.lines().find_map(|l| l.strip_prefix(prefix));
        if acked == Some("1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "recv_ack {acked:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.stop();
}

#[tokio::test]
async fn messages_delivered_total_counts_pushes_on_resume_as_well_as_live_ones() {
    let server = TestServer::start();
    let base = server.api_url();
    for n in 0..3 {
        let (status, _) = api_post(
            &base,
            "/message/send",
            json!({"from_uid": "alice", "channel_id": "bob", "channel_type": 1,
                   "payload": b64(&format!("m{n}"))}),
        )
        .await;
        assert_eq!(status, 200);
    }
    // Bob was offline: the three come on resume.
    let options = server.options("bob").resume(true);
    let (_bob, mut bob_in) = connect(server.addr, options).await.unwrap();
    for _ in 0..3 {
        bob_in.next_message(WAIT).await.unwrap();
    }
    let (_, text) = api_get(&base, "/metrics").await;
    assert!(
        text.contains("ruyi_messages_delivered_total 3\n"),
        "{}",
        text.lines()
            .find(|l| l.starts_with("ruyi_messages_delivered_total"))
            .unwrap_or("")
    );
    server.stop();
}
