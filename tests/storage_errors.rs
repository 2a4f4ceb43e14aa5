//! A full disk fails sends with the retryable `storage_error`, acknowledges
//! nothing it did not store, and recovers without a restart once space
//! returns. Needs root (it mounts a small tmpfs), as the README's test
//! command runs.

mod common;

use bytes::Bytes;
use common::TestServer;
use ruyi::channel::ChannelKey;
use ruyi::client::Outgoing;
use ruyi::ids::{Seq, ShardId, Uid};
use ruyi::protocol::{ChannelType, ReasonCode};
use ruyi::storage::{ReadDirection, RocksStorage, Storage};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (the README's test command runs as root)"
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the file system with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=4096"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    filler
}

fn big(n: usize) -> Outgoing {
    Outgoing {
        channel_id: "bob".into(),
        channel_type: ChannelType::Person,
        client_msg_no: format!("big-{n}"),
        flags: 0,
        payload: Bytes::from(vec![b'x'; 60_000]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_sends_with_storage_error_and_recovers_without_a_restart() {
    let fs = Tmpfs::mount("160m");
    let data = fs.path().join("data");
    let server = TestServer::start_in(&data, |_| {});
    let (alice, _a) = server.connect("alice").await;
    let filler = fill(fs.path());

    // Send until the disk refuses; RocksDB's preallocated WAL takes some
    // first. Every answer is either a stored message or storage_error.
    let mut acked = Vec::new();
    let mut refused = 0;
    for n in 0..5000 {
        let ack = alice.send(big(n)).await.unwrap();
        match ack.reason {
            ReasonCode::Success => acked.push((ack.client_msg_no, ack.message_seq)),
            ReasonCode::StorageError => {
                assert_eq!((ack.message_id, ack.message_seq), (0, 0));
                refused += 1;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, 1, "the disk filled up within 5000 sends");

    // Space returns: sends succeed again, without a restart, and the
    // channel continues right after what was stored.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let recovered = loop {
        let ack = alice.send(big(100_000)).await.unwrap();
        if ack.reason == ReasonCode::Success {
            break ack;
        }
        assert_eq!(ack.reason, ReasonCode::StorageError);
        assert!(
            Instant::now() < deadline,
            "storage did not recover within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        recovered.message_seq,
        acked.len() as u64 + 1,
        "no gap, no reuse"
    );
    drop(alice);
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();

    let storage =
        RocksStorage::open(&data, &ruyi::Config::default().storage.rocks_options()).unwrap();
    let mut store = storage.open_shard(ShardId(0)).unwrap();
    let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
    let stored = store
        .read_messages(&key, Seq(1), usize::MAX, ReadDirection::Up)
        .unwrap();
    assert_eq!(stored.len(), acked.len() + 1);
    for ((client_msg_no, seq), message) in acked.iter().zip(&stored) {
        assert_eq!(
            (&message.client_msg_no, message.seq.0),
            (client_msg_no, *seq)
        );
    }
}
