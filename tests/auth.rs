//! Only a client with a valid token for its uid gets in.

mod common;

use common::{connect_packet, token, RawClient, TestServer, SECRET};
use ruyi::client::{connect, ClientError, ConnectOptions};
use ruyi::protocol::{Packet, ReasonCode};

async fn refusal(server: &TestServer, uid: &str, token: &str) -> Vec<Packet> {
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_packet(uid, token)).await;
    raw.packets_until_closed().await
}

fn assert_auth_failed_then_closed(packets: &[Packet]) {
    match packets {
        [Packet::ConnAck(ack), Packet::Disconnect(bye)] => {
            assert_eq!(ack.reason, ReasonCode::AuthFailed);
            assert_eq!(bye.reason, ReasonCode::AuthFailed);
        }
        other => panic!("expected ConnAck(auth_failed) then Disconnect, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_token_gets_conn_ack_auth_failed_and_the_connection_closes() {
    let server = TestServer::start();
    assert_auth_failed_then_closed(&refusal(&server, "alice", "not-a-token").await);
    assert_auth_failed_then_closed(&refusal(&server, "alice", "").await);
}

#[tokio::test]
async fn a_token_for_another_uid_or_secret_or_an_expired_one_is_refused() {
    let server = TestServer::start();
    assert_auth_failed_then_closed(&refusal(&server, "alice", &token("bob")).await);
    let now_s = ruyi::time::unix_now_ms() / 1000;
    let foreign = ruyi::auth::issue_token("another-secret", "alice", now_s, 3600);
    assert_auth_failed_then_closed(&refusal(&server, "alice", &foreign).await);
    let expired = ruyi::auth::issue_token(SECRET, "alice", now_s - 7200, 3600);
    assert_auth_failed_then_closed(&refusal(&server, "alice", &expired).await);
}

#[tokio::test]
async fn the_sdk_reports_a_refusal_as_an_error_naming_the_reason() {
    let server = TestServer::start();
    let result = connect(server.addr, ConnectOptions::new("alice").token("junk")).await;
    assert!(
        matches!(result, Err(ClientError::Refused(ReasonCode::AuthFailed))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_valid_token_gets_conn_ack_with_session_and_heartbeat() {
    let server = TestServer::start();
    let (client, _incoming) = server.connect("alice").await;
    let ack = client.conn_ack();
    assert_eq!(ack.reason, ReasonCode::Success);
    assert_eq!(ack.heartbeat_interval_ms, 30_000);
    assert_ne!(ack.session_id, 0);
    assert!(ack.server_time_ms > 0);
}

#[tokio::test]
async fn with_auth_off_any_uid_connects_without_a_token() {
    let server = TestServer::start_with(|c| c.auth.mode = ruyi::config::AuthMode::Off);
    let (client, _incoming) = connect(server.addr, ConnectOptions::new("anyone"))
        .await
        .unwrap();
    assert_eq!(client.conn_ack().reason, ReasonCode::Success);
}

#[tokio::test]
async fn uids_with_reserved_characters_and_old_protocol_versions_are_refused() {
    let server = TestServer::start_with(|c| c.auth.mode = ruyi::config::AuthMode::Off);
    let packets = refusal(&server, "a@b", "").await;
    assert!(
        matches!(&packets[..], [Packet::ConnAck(a), ..] if a.reason == ReasonCode::InvalidUid),
        "{packets:?}"
    );
    let mut raw = RawClient::connect(server.addr).await;
    let Packet::Connect(mut connect) = connect_packet("alice", "") else {
        unreachable!()
    };
    connect.version = 99;
    raw.send_packet(&Packet::Connect(connect)).await;
    let packets = raw.packets_until_closed().await;
    assert!(
        matches!(&packets[..], [Packet::ConnAck(a), ..] if a.reason == ReasonCode::UnsupportedVersion),
        "{packets:?}"
    );
}

#[tokio::test]
async fn the_same_device_logging_in_again_replaces_the_old_connection() {
    let server = TestServer::start();
    let (_old, mut old_in) = server.connect_device("alice", "phone").await;
    let (_new, _new_in) = server.connect_device("alice", "phone").await;
    let closed = old_in.recv().await;
    match closed {
        Some(ruyi::client::Delivery::Closed(Some(bye))) => {
            assert_eq!(bye.reason, ReasonCode::Kicked)
        }
        other => panic!("expected the old connection to be kicked, got {other:?}"),
    }
}
