//! `ruyi client`: the SDK as a command line, for people and scripts. Every
//! command prints JSON lines on stdout and exits non-zero when it did not do
//! what was asked.

use super::{connect, ClientError, ConnectOptions, Delivery, Outgoing};
use crate::protocol::{
    reason_name, ChannelType, Conversation, ConversationAction, DeviceFlag, ReasonCode, Recv,
    SyncDirection, RECV_FLAG_RECALLED, RECV_FLAG_REDELIVERED,
};
use base64::Engine;
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use std::time::Duration;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceFlagArg {
    App,
    Web,
    Desktop,
}

impl From<DeviceFlagArg> for DeviceFlag {
    fn from(flag: DeviceFlagArg) -> DeviceFlag {
        match flag {
            DeviceFlagArg::App => DeviceFlag::App,
            DeviceFlagArg::Web => DeviceFlag::Web,
            DeviceFlagArg::Desktop => DeviceFlag::Desktop,
        }
    }
}

/// Options every client command takes.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:5100", global = true)]
    pub server: String,
    /// Who to connect as.
    #[arg(long, global = true, default_value = "")]
    pub uid: String,
    /// Token for `--uid` (see `ruyi token`); not needed when auth is off.
    #[arg(long, env = "RUYI_TOKEN", default_value = "", global = true)]
    pub token: String,
    #[arg(long, value_enum, default_value = "app", global = true)]
    pub device_flag: DeviceFlagArg,
    /// Identifies this installation; defaults to `cli`.
    #[arg(long, default_value = "cli", global = true)]
    pub device_id: String,
    /// Speak TLS, trusting the Mozilla root certificates (or `--tls-ca`).
    #[arg(long, global = true)]
    pub tls: bool,
    /// Speak TLS, trusting the CA (or self-signed) certificates in this PEM
    /// file.
    #[arg(long, global = true, value_name = "PEM")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name the server's certificate must have; defaults to the host
    /// of `--server`.
    #[arg(long, global = true)]
    pub tls_server_name: Option<String>,
    #[command(subcommand)]
    pub command: ClientCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Send one message; prints its SendAck.
    Send(SendArgs),
    /// Print every received message as a JSON line, acknowledging each.
    Listen(ListenArgs),
    /// Print a channel's stored messages as JSON lines (oldest first).
    Sync(SyncArgs),
    /// Print the user's conversations, one JSON line each.
    Conversations(ConversationsArgs),
    /// Change one conversation: clear or set its unread count, or delete it.
    Conversation(ConversationArgs),
    /// Recall a message this user sent.
    Recall(RecallArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChannelTypeArg {
    #[value(name = "1")]
    Person,
    #[value(name = "2")]
    Group,
}

impl From<ChannelTypeArg> for ChannelType {
    fn from(kind: ChannelTypeArg) -> ChannelType {
        match kind {
            ChannelTypeArg::Person => ChannelType::Person,
            ChannelTypeArg::Group => ChannelType::Group,
        }
    }
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The channel: the other person's uid, or the group id.
    #[arg(long)]
    pub channel: String,
    /// 1 = person, 2 = group.
    #[arg(long, value_enum, default_value = "1")]
    pub channel_type: ChannelTypeArg,
    /// First seq to print.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// At most this many messages.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct ConversationsArgs {
    /// Only conversations with unread messages.
    #[arg(long)]
    pub unread_only: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["clear_unread", "set_unread", "delete"])))]
pub struct ConversationArgs {
    #[arg(long)]
    pub channel: String,
    #[arg(long, value_enum, default_value = "1")]
    pub channel_type: ChannelTypeArg,
    #[arg(long)]
    pub clear_unread: bool,
    #[arg(long)]
    pub set_unread: Option<u64>,
    #[arg(long)]
    pub delete: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["message_id", "client_msg_no"])))]
pub struct RecallArgs {
    #[arg(long)]
    pub channel: String,
    #[arg(long, value_enum, default_value = "1")]
    pub channel_type: ChannelTypeArg,
    #[arg(long)]
    pub message_id: Option<u64>,
    #[arg(long)]
    pub client_msg_no: Option<String>,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The person to send to.
    #[arg(long, conflicts_with = "group", required_unless_present = "group")]
    pub to: Option<String>,
    /// The group to send to.
    #[arg(long)]
    pub group: Option<String>,
    /// The message text (sent as the UTF-8 payload).
    #[arg(long)]
    pub text: String,
    /// The client's unique id for the message; generated when left out.
    #[arg(long)]
    pub client_msg_no: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Do not acknowledge: the server redelivers, and every redelivery is
    /// printed (`"redelivered": true`). For testing retries.
    #[arg(long)]
    pub no_ack: bool,
    /// Do not ask for what this device missed; print only live messages.
    #[arg(long)]
    pub no_resume: bool,
}

/// Runs a client command; returns the process exit code.
pub async fn run(args: ClientArgs) -> i32 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ruyi client: {error}");
            1
        }
    }
}

async fn run_inner(args: ClientArgs) -> Result<i32, ClientError> {
    if args.uid.is_empty() {
        eprintln!("ruyi client: --uid is required");
        return Ok(2);
    }
    let addr = super::parse_addr(&args.server)?;
    let mut options = ConnectOptions::new(&args.uid)
        .token(&args.token)
        .device(&args.device_id, args.device_flag.into());
    if args.tls || args.tls_ca.is_some() {
        let name = args.tls_server_name.clone().unwrap_or_else(|| {
            args.server
                .rsplit_once(':')
                .map_or(args.server.as_str(), |(host, _)| host)
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned()
        });
        let tls = match &args.tls_ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ClientError::Tls(format!("cannot read {}: {e}", path.display()))
                })?;
                super::TlsOptions::with_ca_pem(&pem, &name)
            }
            None => super::TlsOptions::with_webpki_roots(&name),
        }
        .map_err(|e| ClientError::Tls(e.to_string()))?;
        options = options.tls(tls);
    }
    match args.command {
        ClientCommand::Send(send) => {
            let (client, _incoming) = connect(addr, options.heartbeat(false)).await?;
            let (channel_id, channel_type) = match (send.to, send.group) {
                (Some(to), _) => (to, ChannelType::Person),
                (None, Some(group)) => (group, ChannelType::Group),
                (None, None) => unreachable!("clap requires --to or --group"),
            };
            let ack = client
                .send(Outgoing {
                    channel_id,
                    channel_type,
                    client_msg_no: send.client_msg_no.unwrap_or_else(super::new_client_msg_no),
                    flags: 0,
                    payload: Bytes::from(send.text.into_bytes()),
                })
                .await?;
            client.close().await;
            let line = serde_json::json!({
                "message_id": ack.message_id,
                "message_seq": ack.message_seq,
                "client_msg_no": ack.client_msg_no,
                "reason": reason_name(ack.reason),
            });
            println!("{line}");
            Ok(if ack.reason == ReasonCode::Success {
                0
            } else {
                1
            })
        }
        ClientCommand::Sync(sync) => {
            let (client, _incoming) = connect(addr, options.heartbeat(false)).await?;
            let mut from = sync.from.max(1);
            let mut left = sync.limit;
            // Page through: one response holds at most the server's limits.
            while left > 0 {
                let page = client
                    .sync_messages(
                        &sync.channel,
                        sync.channel_type.into(),
                        from,
                        0,
                        left.min(1000),
                        SyncDirection::Up,
                    )
                    .await?;
                if page.reason != ReasonCode::Success {
                    println!(
                        "{}",
                        serde_json::json!({ "reason": reason_name(page.reason) })
                    );
                    client.close().await;
                    return Ok(1);
                }
                let Some(last) = page.messages.last().map(|m| m.message_seq) else {
                    break;
                };
                for message in &page.messages {
                    let mut line = recv_json(message);
                    line["recalled"] = (message.flags & RECV_FLAG_RECALLED != 0).into();
                    println!("{line}");
                }
                left = left.saturating_sub(page.messages.len() as u32);
                from = last + 1;
            }
            client.close().await;
            Ok(0)
        }
        ClientCommand::Conversations(list) => {
            let (client, _incoming) = connect(addr, options.heartbeat(false)).await?;
            let mut since = 0;
            loop {
                let page = client
                    .sync_conversations(since, 500, list.unread_only)
                    .await?;
                if page.reason != ReasonCode::Success {
                    println!(
                        "{}",
                        serde_json::json!({ "reason": reason_name(page.reason) })
                    );
                    client.close().await;
                    return Ok(1);
                }
                for conversation in &page.conversations {
                    println!("{}", conversation_json(conversation));
                    since = since.max(conversation.version);
                }
                if !page.more || page.conversations.is_empty() {
                    break;
                }
            }
            client.close().await;
            Ok(0)
        }
        ClientCommand::Conversation(change) => {
            let (client, _incoming) = connect(addr, options.heartbeat(false)).await?;
            let (action, unread) = match (change.clear_unread, change.set_unread, change.delete) {
                (true, _, _) => (ConversationAction::ClearUnread, 0),
                (_, Some(n), _) => (ConversationAction::SetUnread, n),
                _ => (ConversationAction::Delete, 0),
            };
            let response = client
                .conversation_op(&change.channel, change.channel_type.into(), action, unread)
                .await?;
            client.close().await;
            let mut line = match &response.conversation {
                Some(conversation) => conversation_json(conversation),
                None => serde_json::json!({}),
            };
            line["reason"] = reason_name(response.reason).into();
            println!("{line}");
            Ok(if response.reason == ReasonCode::Success {
                0
            } else {
                1
            })
        }
        ClientCommand::Recall(recall) => {
            let (client, _incoming) = connect(addr, options.heartbeat(false)).await?;
            let response = client
                .recall(
                    &recall.channel,
                    recall.channel_type.into(),
                    recall.message_id.unwrap_or(0),
                    recall.client_msg_no.as_deref().unwrap_or(""),
                )
                .await?;
            client.close().await;
            let line = serde_json::json!({
                "message_id": response.message_id,
                "message_seq": response.message_seq,
                "reason": reason_name(response.reason),
            });
            println!("{line}");
            Ok(if response.reason == ReasonCode::Success {
                0
            } else {
                1
            })
        }
        ClientCommand::Listen(listen) => {
            let options = options.auto_ack(!listen.no_ack).resume(!listen.no_resume);
            let (client, mut incoming) = connect(addr, options).await?;
            // On stderr, so stdout stays one JSON line per message; scripts
            // can wait for it to know the listener is online.
            eprintln!(
                "listening as {} (session {})",
                args.uid,
                client.conn_ack().session_id
            );
            let deadline = listen
                .timeout
                .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
            let mut received = 0u64;
            while listen.count.is_none_or(|count| received < count) {
                let next = match deadline {
                    Some(deadline) => {
                        match tokio::time::timeout_at(deadline, incoming.recv()).await {
                            Ok(next) => next,
                            Err(_) => break,
                        }
                    }
                    None => incoming.recv().await,
                };
                match next {
                    Some(Delivery::Message(recv)) => {
                        println!("{}", recv_json(&recv));
                        received += 1;
                    }
                    Some(Delivery::Recall(event)) => {
                        let line = serde_json::json!({
                            "recall": true,
                            "channel_id": event.channel_id,
                            "channel_type": event.channel_type.0,
                            "message_id": event.message_id,
                            "message_seq": event.message_seq,
                            "from_uid": event.from_uid,
                        });
                        println!("{line}");
                    }
                    Some(Delivery::ConversationUpdate(_)) => {}
                    Some(Delivery::Closed(reason)) => return Err(ClientError::Closed(reason)),
                    None => return Err(ClientError::Closed(None)),
                }
            }
            client.close().await;
            let reached = listen.count.is_none_or(|count| received >= count);
            Ok(if reached { 0 } else { 1 })
        }
    }
}

/// One conversation as the JSON line `ruyi client conversations` prints.
pub fn conversation_json(conversation: &Conversation) -> serde_json::Value {
    let text = conversation.last_message.as_ref().map(|m| {
        if m.flags & RECV_FLAG_RECALLED != 0 {
            serde_json::Value::Null
        } else {
            String::from_utf8_lossy(&m.payload).into_owned().into()
        }
    });
    serde_json::json!({
        "channel_id": conversation.channel_id,
        "channel_type": conversation.channel_type.0,
        "unread": conversation.unread,
        "last_message_seq": conversation.last_message_seq,
        "last_message_text": text.unwrap_or(serde_json::Value::Null),
        "last_message_recalled": conversation
            .last_message
            .as_ref()
            .is_some_and(|m| m.flags & RECV_FLAG_RECALLED != 0),
        "deleted": conversation.deleted,
        "version": conversation.version,
    })
}

/// One received message as the JSON line `ruyi client listen` prints.
pub fn recv_json(recv: &Recv) -> serde_json::Value {
    let mut line = serde_json::json!({
        "message_id": recv.message_id,
        "message_seq": recv.message_seq,
        "client_msg_no": recv.client_msg_no,
        "from_uid": recv.from_uid,
        "channel_id": recv.channel_id,
        "channel_type": recv.channel_type.0,
        "redelivered": recv.flags & RECV_FLAG_REDELIVERED != 0,
        "timestamp_ms": recv.timestamp_ms,
    });
    match std::str::from_utf8(&recv.payload) {
        Ok(text) => line["text"] = text.into(),
        Err(_) => {
            line["payload_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&recv.payload)
                .into()
        }
    }
    line
}
