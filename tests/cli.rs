//! The README's `ruyi client` walk-through, run with the real binary against
//! a gateway with 2 shards.

mod common;

use common::{TestServer, SECRET};
use std::process::{Command, Stdio};

const RUYI: &str = env!("CARGO_BIN_EXE_ruyi");

fn ruyi(args: &[&str]) -> std::process::Output {
    Command::new(RUYI)
        .args(args)
        .env_remove("RUYI_TOKEN")
        .env_remove("RUYI_AUTH_SECRET")
        .output()
        .expect("ruyi runs")
}

/// A token printed by `ruyi token`, as a script would get it.
fn token(uid: &str) -> String {
    let out = ruyi(&["token", "--secret", SECRET, "--uid", uid]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn stdout_json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

#[test]
fn print_config_prints_the_default_configuration_that_parses_back() {
    let output = ruyi(&["print-config"]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(ruyi::Config::parse(&text).unwrap(), ruyi::Config::default());
    assert!(text.contains("# "), "the printed config is commented");
}

#[test]
fn serve_refuses_an_api_without_a_token_with_a_message_naming_the_fix() {
    let output = ruyi(&["serve", "--listen", "127.0.0.1:0"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("api.token"), "{stderr}");
    assert!(stderr.contains("RUYI_API_TOKEN"), "{stderr}");
}

#[test]
fn client_send_and_listen_walk_through_works_as_documented() {
    let server = TestServer::start();
    let addr = server.addr.to_string();
    let (alice, bob) = (token("alice"), token("bob"));

    let listener = Command::new(RUYI)
        .args([
            "client",
            "listen",
            "--server",
            &addr,
            "--uid",
            "bob",
            "--token",
            &bob,
            "--count",
            "2",
            "--timeout",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until bob is online (the listener says so on stderr once it has
    // its ConnAck): a message sent before that would not be delivered live.
    let mut listener = listener;
    let mut stderr = std::io::BufReader::new(listener.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.starts_with("listening as bob"), "{line}");

    let sent = ruyi(&[
        "client",
        "send",
        "--server",
        &addr,
        "--uid",
        "alice",
        "--token",
        &alice,
        "--to",
        "bob",
        "--text",
        "hi bob",
        "--client-msg-no",
        "walk-1",
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let ack = &stdout_json_lines(&sent)[0];
    assert_eq!(ack["reason"], "success");
    assert_eq!(ack["message_seq"], 1);
    assert_eq!(ack["client_msg_no"], "walk-1");

    let binary = ruyi(&[
        "client", "send", "--server", &addr, "--uid", "alice", "--token", &alice, "--to", "bob",
        "--text", "second",
    ]);
    assert!(binary.status.success());

    let output = listener.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = stdout_json_lines(&output);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["message_id"], ack["message_id"]);
    assert_eq!(lines[0]["message_seq"], 1);
    assert_eq!(lines[0]["from_uid"], "alice");
    assert_eq!(lines[0]["channel_id"], "alice");
    assert_eq!(lines[0]["channel_type"], 1);
    assert_eq!(lines[0]["redelivered"], false);
    assert_eq!(lines[0]["text"], "hi bob");
    assert_eq!(lines[1]["message_seq"], 2);
}

#[test]
fn client_send_exits_non_zero_on_a_refusal_and_prints_the_reason() {
    let server = TestServer::start();
    let addr = server.addr.to_string();
    let alice = token("alice");
    let sent = ruyi(&[
        "client", "send", "--server", &addr, "--uid", "alice", "--token", &alice, "--group",
        "nope", "--text", "x",
    ]);
    assert_eq!(sent.status.code(), Some(1));
    assert_eq!(stdout_json_lines(&sent)[0]["reason"], "channel_missing");

    let refused = ruyi(&[
        "client", "send", "--server", &addr, "--uid", "alice", "--token", "bad", "--to", "bob",
        "--text", "x",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("auth_failed"));
}

#[test]
fn client_sync_conversations_conversation_and_recall_print_json_as_documented() {
    let server = TestServer::start();
    let addr = server.addr.to_string();
    let (alice, bob) = (token("alice"), token("bob"));
    let common = |uid: &'static str, token: &str| -> Vec<String> {
        vec![
            "client".into(),
            "--server".into(),
            addr.clone(),
            "--uid".into(),
            uid.into(),
            "--token".into(),
            token.into(),
        ]
    };
    let run = |mut args: Vec<String>, rest: &[&str]| {
        args.extend(rest.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ruyi(&refs)
    };
    let first = run(
        common("alice", &alice),
        &["send", "--to", "bob", "--text", "one"],
    );
    let second = run(
        common("alice", &alice),
        &["send", "--to", "bob", "--text", "two"],
    );
    let second_id = stdout_json_lines(&second)[0]["message_id"].clone();
    assert!(first.status.success() && second.status.success());

    let listed = run(common("bob", &bob), &["conversations"]);
    assert!(listed.status.success());
    let lines = stdout_json_lines(&listed);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["channel_id"], "alice");
    assert_eq!(lines[0]["unread"], 2);
    assert_eq!(lines[0]["last_message_seq"], 2);
    assert_eq!(lines[0]["last_message_text"], "two");

    let cleared = run(
        common("bob", &bob),
        &["conversation", "--channel", "alice", "--clear-unread"],
    );
    assert!(cleared.status.success());
    let line = &stdout_json_lines(&cleared)[0];
    assert_eq!(
        (line["reason"].as_str(), line["unread"].as_u64()),
        (Some("success"), Some(0))
    );
    let unread = run(common("bob", &bob), &["conversations", "--unread-only"]);
    assert!(stdout_json_lines(&unread).is_empty());

    let id = second_id.to_string();
    let recalled = run(
        common("alice", &alice),
        &["recall", "--channel", "bob", "--message-id", &id],
    );
    assert!(recalled.status.success());
    assert_eq!(stdout_json_lines(&recalled)[0]["reason"], "success");
    let refused = run(
        common("bob", &bob),
        &["recall", "--channel", "alice", "--message-id", &id],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(stdout_json_lines(&refused)[0]["reason"], "not_sender");

    let synced = run(
        common("bob", &bob),
        &["sync", "--channel", "alice", "--channel-type", "1"],
    );
    assert!(synced.status.success());
    let lines = stdout_json_lines(&synced);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["text"].as_str(), lines[0]["recalled"].as_bool()),
        (Some("one"), Some(false))
    );
    assert_eq!(lines[1]["recalled"], true);
    assert_eq!(lines[1]["text"], "");
}

#[test]
fn listen_with_no_ack_prints_redeliveries_flagged() {
    let server = TestServer::start_with(|c| {
        c.delivery.retry_interval_ms = 300;
        c.delivery.retry_tick_ms = 10;
        c.delivery.retry_jitter_percent = 0;
    });
    let addr = server.addr.to_string();
    let (alice, bob) = (token("alice"), token("bob"));
    let mut listener = Command::new(RUYI)
        .args([
            "client",
            "listen",
            "--server",
            &addr,
            "--uid",
            "bob",
            "--token",
            &bob,
            "--no-ack",
            "--count",
            "2",
            "--timeout",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(listener.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.starts_with("listening as bob"), "{line}");
    let sent = ruyi(&[
        "client", "send", "--server", &addr, "--uid", "alice", "--token", &alice, "--to", "bob",
        "--text", "retry me",
    ]);
    assert!(sent.status.success());
    let output = listener.wait_with_output().unwrap();
    assert!(output.status.success());
    let lines = stdout_json_lines(&output);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["redelivered"], false);
    assert_eq!(lines[1]["redelivered"], true);
    assert_eq!(lines[0]["message_id"], lines[1]["message_id"]);
}

#[test]
fn check_system_reports_every_setting_and_passes_on_this_machine() {
    let output = ruyi(&["check-system"]);
    let text = String::from_utf8_lossy(&output.stdout);
    for name in [
        "kernel",
        "io_uring",
        "memlock",
        "nofile",
        "somaxconn",
        "port range",
        "cpus",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        output.status.success(),
        "a hard failure on the test machine:\n{text}"
    );
}
