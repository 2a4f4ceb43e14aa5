//! A graceful shutdown tells every client why before closing.

mod common;

use common::TestServer;
use ruyi::client::Delivery;
use ruyi::protocol::ReasonCode;

#[tokio::test]
async fn shutdown_closes_every_connection_with_server_shutdown_and_refuses_new_ones() {
    let server = TestServer::start();
    let (_a, mut a_in) = server.connect("alice").await;
    let (_b, mut b_in) = server.connect("bob").await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();
    for incoming in [&mut a_in, &mut b_in] {
        match incoming.recv().await {
            Some(Delivery::Closed(Some(bye))) => assert_eq!(bye.reason, ReasonCode::ServerShutdown),
            other => panic!("expected a ServerShutdown disconnect, got {other:?}"),
        }
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
