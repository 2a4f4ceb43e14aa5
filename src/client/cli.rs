//! `ruyi client`: the SDK as a command line, for people and scripts. Every
//! command prints JSON lines on stdout and exits non-zero when it did not do
//! what was asked.

use super::{connect, ClientError, ConnectOptions, Delivery, Outgoing};
use crate::protocol::{
    reason_name, ChannelType, DeviceFlag, ReasonCode, Recv, RECV_FLAG_REDELIVERED,
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
    #[command(subcommand)]
    pub command: ClientCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Send one message; prints its SendAck.
    Send(SendArgs),
    /// Print every received message as a JSON line, acknowledging each.
    Listen(ListenArgs),
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
    let options = ConnectOptions::new(&args.uid)
        .token(&args.token)
        .device(&args.device_id, args.device_flag.into());
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
        ClientCommand::Listen(listen) => {
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
