//! The admin API's handlers: JSON in, a request to the owning shard, JSON
//! out. Field names follow WuKongIM's where it has the same endpoint.

use super::{shard_timeout, ApiError, Body, Shared};
use crate::channel::{resolve_target, ChannelKey, IdLimits};
use crate::ids::{ShardId, Uid};
use crate::protocol::{
    ChannelType, Conversation, ConversationAction, ConversationOp, Packet, ReasonCode, Recv,
    SendPacket, SyncConversations, SyncDirection, SyncMessages,
};
use crate::server::ListTarget;
use crate::shard::api::{ApiRequest, ApiResponse};
use crate::shard::state::{ControlError, SetChange};
use crate::storage::ListKind;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

type Answer = Result<Json<Value>, ApiError>;

fn ok() -> Answer {
    Ok(Json(json!({ "status": 200 })))
}

fn ok_with(data: Value) -> Answer {
    Ok(Json(json!({ "status": 200, "data": data })))
}

/// The HTTP answer to a refusal from a shard.
fn refused(reason: ReasonCode) -> ApiError {
    let status = match reason {
        ReasonCode::NotMember | ReasonCode::Denied | ReasonCode::NotAllowed => {
            StatusCode::FORBIDDEN
        }
        ReasonCode::NotSender => StatusCode::FORBIDDEN,
        ReasonCode::ChannelMissing
        | ReasonCode::MessageMissing
        | ReasonCode::ConversationMissing => StatusCode::NOT_FOUND,
        ReasonCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ReasonCode::ClientMsgNoReused => StatusCode::CONFLICT,
        ReasonCode::StorageError | ReasonCode::ServerShutdown | ReasonCode::ServerBusy => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_REQUEST,
    };
    let name = crate::protocol::reason_name(reason);
    let msg = match reason {
        ReasonCode::ChannelMissing => "no such channel".to_owned(),
        ReasonCode::MessageMissing => "no such message".to_owned(),
        ReasonCode::ConversationMissing => "the user has no such conversation".to_owned(),
        ReasonCode::NotMember => "the sender is not a member of the channel".to_owned(),
        ReasonCode::Denied => "the sender is on the channel's blacklist".to_owned(),
        ReasonCode::NotAllowed => "the sender is not on the channel's whitelist".to_owned(),
        ReasonCode::StorageError => "storage failed; retry".to_owned(),
        ReasonCode::ClientMsgNoReused => {
            "client_msg_no was already used for a message to another channel; nothing was stored"
                .to_owned()
        }
        _ => name.clone(),
    };
    let code: &'static str = match reason {
        ReasonCode::ChannelMissing => "channel_missing",
        ReasonCode::MessageMissing => "message_missing",
        ReasonCode::ConversationMissing => "conversation_missing",
        ReasonCode::NotMember => "not_member",
        ReasonCode::Denied => "denied",
        ReasonCode::NotAllowed => "not_allowed",
        ReasonCode::PayloadTooLarge => "payload_too_large",
        ReasonCode::StorageError => "storage_error",
        ReasonCode::ServerShutdown => "shutting_down",
        ReasonCode::InvalidRange => "invalid_range",
        ReasonCode::InvalidChannel => "invalid_channel",
        ReasonCode::InvalidClientMsgNo => "invalid_client_msg_no",
        ReasonCode::ClientMsgNoReused => "client_msg_no_reused",
        _ => "refused",
    };
    ApiError::new(status, code, msg)
}

fn control_failed(error: ControlError) -> ApiError {
    match error {
        ControlError::Invalid(msg) => ApiError::bad_request(msg),
        ControlError::NoSuchGroup(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "channel_missing",
            format!("group {id:?} does not exist"),
        ),
        ControlError::Storage(msg) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_error",
            format!("storage failed: {msg}"),
        ),
        ControlError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ),
        ControlError::Unavailable(msg) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the cluster node owning it is unavailable: {msg}"),
        ),
    }
}

/// Sends `request` to `shard` and waits, at most `api.request_timeout_ms`.
async fn ask(api: &Shared, shard: ShardId, request: ApiRequest) -> Result<ApiResponse, ApiError> {
    answered(api, api.control.api(shard, request)).await
}

/// Sends `request` to the owner of `key` (on a cluster node, a write to a
/// channel another node owns goes to that node) and waits, at most
/// `api.request_timeout_ms`.
async fn ask_owner(
    api: &Shared,
    key: &ChannelKey,
    request: ApiRequest,
) -> Result<ApiResponse, ApiError> {
    answered(api, api.control.api_for(key, request)).await
}

async fn answered(
    api: &Shared,
    asked: impl std::future::Future<Output = Result<ApiResponse, ControlError>>,
) -> Result<ApiResponse, ApiError> {
    match tokio::time::timeout(shard_timeout(api), asked).await {
        Ok(Ok(ApiResponse::Failed(reason))) => Err(refused(reason)),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) => Err(control_failed(error)),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the shard did not answer within api.request_timeout_ms",
        )),
    }
}

fn unexpected() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "unexpected answer from a shard",
    )
}

fn id_limits(api: &Shared) -> IdLimits {
    IdLimits {
        uid_length_max_bytes: api.config.limits.uid_length_max_bytes,
        channel_id_length_max_bytes: api.config.limits.channel_id_length_max_bytes,
    }
}

fn uid(api: &Shared, field: &str, value: &str) -> Result<Uid, ApiError> {
    if crate::channel::valid_uid(value, api.config.limits.uid_length_max_bytes) {
        Ok(Uid::new(value))
    } else {
        Err(ApiError::bad_request(format!(
            "`{field}` must be 1 to {} bytes without '@' or control characters",
            api.config.limits.uid_length_max_bytes
        )))
    }
}

fn uids(api: &Shared, field: &str, values: &[String]) -> Result<Vec<Uid>, ApiError> {
    values.iter().map(|value| uid(api, field, value)).collect()
}

/// The uids of a member list, a lists' change or a send to `subscribers`:
/// at most `limits.group_members_max` of them, repeats included (the
/// shard checks the list that results against the same limit).
fn uid_list(api: &Shared, field: &str, values: &[String]) -> Result<Vec<Uid>, ApiError> {
    let max = api.config.limits.group_members_max;
    if values.len() > max {
        return Err(ApiError::bad_request(format!(
            "`{field}` lists {} uids; at most limits.group_members_max = {max}",
            values.len()
        )));
    }
    uids(api, field, values)
}

fn channel_type(value: u8) -> Result<ChannelType, ApiError> {
    match ChannelType(value) {
        ChannelType::Person | ChannelType::Group => Ok(ChannelType(value)),
        _ => Err(ApiError::bad_request(format!(
            "`channel_type` {value} is not 1 (person) or 2 (group)"
        ))),
    }
}

/// The channel `channel_id` names as `viewer` sees it (for a person
/// channel: the other party).
fn channel_for(
    api: &Shared,
    viewer: &Uid,
    channel_id: &str,
    kind: u8,
) -> Result<ChannelKey, ApiError> {
    let kind = channel_type(kind)?;
    if kind == ChannelType::Person && channel_id == viewer.as_str() {
        return Err(self_channel(viewer));
    }
    resolve_target(viewer, channel_id, kind, &id_limits(api)).map_err(|_| {
        let rule = match kind {
            ChannelType::Person => format!(
                "a uid of 1 to {} bytes without '@' or control characters",
                api.config.limits.uid_length_max_bytes
            ),
            _ => format!(
                "a group id of 1 to {} bytes without control characters",
                api.config.limits.channel_id_length_max_bytes
            ),
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_channel",
            format!("`channel_id` {channel_id:?} must be {rule}"),
        )
    })
}

/// The refusal of a person channel between a user and themselves.
fn self_channel(uid: &Uid) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_channel",
        format!(
            "{:?} cannot have a person channel with themselves",
            uid.as_str()
        ),
    )
}

fn group(api: &Shared, channel_id: &str, kind: u8) -> Result<ChannelKey, ApiError> {
    if ChannelType(kind) != ChannelType::Group {
        return Err(ApiError::bad_request(
            "only groups (`channel_type` 2) can be created, changed or deleted",
        ));
    }
    channel_for(api, &Uid::new(""), channel_id, kind)
}

// ---- users -----------------------------------------------------------------

#[derive(Deserialize)]
pub struct TokenReq {
    uid: String,
    token: String,
    #[serde(default)]
    device_flag: u8,
    /// Accepted for WuKongIM compatibility; ruyi treats every device alike.
    #[serde(default)]
    #[allow(dead_code)]
    device_level: u8,
}

/// Registers `token` for `uid` on devices of `device_flag`: a client may
/// then connect with it (as well as with a signed token).
pub async fn user_token(State(api): State<Shared>, Body(req): Body<TokenReq>) -> Answer {
    let uid = uid(&api, "uid", &req.uid)?;
    if uid.as_str() == api.config.api.system_uid {
        return Err(ApiError::bad_request("the system uid cannot have a token"));
    }
    let token_max = api.config.api.user_token_length_max_bytes;
    if req.token.is_empty() || req.token.len() > token_max {
        return Err(ApiError::bad_request(format!(
            "`token` must be 1 to {token_max} bytes (api.user_token_length_max_bytes)"
        )));
    }
    if req.device_flag > 2 {
        return Err(ApiError::bad_request(
            "`device_flag` must be 0 (app), 1 (web) or 2 (desktop)",
        ));
    }
    let storage = api.control.storage().cloned().ok_or_else(unexpected)?;
    let flag = req.device_flag;
    let token = req.token;
    tokio::task::spawn_blocking(move || storage.put_user_token(&uid, flag, &token))
        .await
        .map_err(|_| unexpected())?
        .map_err(|error| control_failed(ControlError::Storage(error.to_string())))?;
    ok()
}

#[derive(Deserialize)]
pub struct DeviceQuitReq {
    uid: String,
    /// -1: every device.
    #[serde(default = "all_devices")]
    device_flag: i16,
}

fn all_devices() -> i16 {
    -1
}

/// Logs a user's devices out: their registered token is cleared and their
/// connections are closed with `Kicked`.
pub async fn user_device_quit(State(api): State<Shared>, Body(req): Body<DeviceQuitReq>) -> Answer {
    let uid = uid(&api, "uid", &req.uid)?;
    let flag = match req.device_flag {
        -1 => None,
        // Connect refuses any other device flag, so no other has a token.
        flag @ 0..=2 => Some(flag as u8),
        other => {
            return Err(ApiError::bad_request(format!(
                "`device_flag` {other} is not -1 (every device), 0 (app), 1 (web) or 2 (desktop)"
            )))
        }
    };
    let storage = api.control.storage().cloned().ok_or_else(unexpected)?;
    let cleared = uid.clone();
    tokio::task::spawn_blocking(move || {
        let flags: Vec<u8> = match flag {
            Some(flag) => vec![flag],
            None => (0..=2).collect(),
        };
        for flag in flags {
            storage.put_user_token(&cleared, flag, "")?;
        }
        Ok::<(), crate::storage::StorageError>(())
    })
    .await
    .map_err(|_| unexpected())?
    .map_err(|error| control_failed(ControlError::Storage(error.to_string())))?;
    let mut kicked = 0;
    for shard in 0..api.control.shards() {
        let request = ApiRequest::Kick {
            uid: uid.clone(),
            device_flag: flag,
        };
        match ask(&api, ShardId(shard), request).await? {
            ApiResponse::Kicked(count) => kicked += count,
            _ => return Err(unexpected()),
        }
    }
    ok_with(json!({ "kicked": kicked }))
}

/// Which of these uids are online: one entry per (uid, device flag) online.
pub async fn user_online_status(State(api): State<Shared>, Body(req): Body<Vec<String>>) -> Answer {
    let uids = uids(&api, "uids", &req)?;
    let online = match ask(&api, ShardId(0), ApiRequest::Online { uids }).await? {
        ApiResponse::Online(online) => online,
        _ => return Err(unexpected()),
    };
    let rows: Vec<Value> = online
        .into_iter()
        .flat_map(|(uid, flags)| {
            flags
                .into_iter()
                .map(move |flag| json!({ "uid": uid.as_str(), "device_flag": flag, "online": 1 }))
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

// ---- channels ----------------------------------------------------------------

#[derive(Deserialize)]
pub struct ChannelReq {
    channel_id: String,
    #[serde(default = "group_type")]
    channel_type: u8,
    #[serde(default)]
    subscribers: Vec<String>,
    /// 1: the subscribers replace the current ones.
    #[serde(default)]
    reset: u8,
}

fn group_type() -> u8 {
    2
}

/// Creates a group with these subscribers, or adds them to an existing
/// one (replaces them with `reset: 1`).
pub async fn channel_create(State(api): State<Shared>, Body(req): Body<ChannelReq>) -> Answer {
    let key = group(&api, &req.channel_id, req.channel_type)?;
    let members = uid_list(&api, "subscribers", &req.subscribers)?;
    let members: Vec<&str> = members.iter().map(Uid::as_str).collect();
    let control = &api.control;
    let result = if req.reset == 1 {
        control.create_group(key.id(), &members).await
    } else {
        match control.add_members(key.id(), &members).await {
            Err(ControlError::NoSuchGroup(_)) => control.create_group(key.id(), &members).await,
            other => other,
        }
    };
    result.map_err(control_failed)?;
    ok()
}

#[derive(Deserialize)]
pub struct ChannelIdReq {
    channel_id: String,
    #[serde(default = "group_type")]
    channel_type: u8,
}

/// A group's subscribers, lists and last seq.
pub async fn channel_info(State(api): State<Shared>, Body(req): Body<ChannelIdReq>) -> Answer {
    let key = group(&api, &req.channel_id, req.channel_type)?;
    let request = ApiRequest::ChannelInfo {
        channel: key.clone(),
    };
    match ask_owner(&api, &key, request).await? {
        ApiResponse::Channel(details) => ok_with(json!({
            "channel_id": key.id(),
            "channel_type": key.kind().0,
            "subscribers": details.members,
            "blacklist": details.deny,
            "whitelist": details.allow,
            "last_message_seq": details.last_seq,
        })),
        _ => Err(unexpected()),
    }
}

/// Deletes a group with its messages, lists and members' conversations.
pub async fn channel_delete(State(api): State<Shared>, Body(req): Body<ChannelIdReq>) -> Answer {
    let key = group(&api, &req.channel_id, req.channel_type)?;
    let request = ApiRequest::DeleteGroup {
        channel: key.clone(),
    };
    match ask_owner(&api, &key, request).await? {
        ApiResponse::Deleted { .. } => ok(),
        _ => Err(unexpected()),
    }
}

async fn change_members(api: Shared, req: ChannelReq, change: SetChange) -> Answer {
    let key = group(&api, &req.channel_id, req.channel_type)?;
    if req.subscribers.is_empty() {
        return Err(ApiError::bad_request("`subscribers` must not be empty"));
    }
    let members = uid_list(&api, "subscribers", &req.subscribers)?;
    let members: Vec<&str> = members.iter().map(Uid::as_str).collect();
    let control = &api.control;
    let result = match change {
        SetChange::Add if req.reset == 1 => control.create_group(key.id(), &members).await,
        SetChange::Add => control.add_members(key.id(), &members).await,
        SetChange::Remove => control.remove_members(key.id(), &members).await,
        SetChange::Replace => control.create_group(key.id(), &members).await,
    };
    result.map_err(control_failed)?;
    ok()
}

pub async fn subscriber_add(State(api): State<Shared>, Body(req): Body<ChannelReq>) -> Answer {
    change_members(api, req, SetChange::Add).await
}

/// Removed members receive nothing with a seq above the removal.
pub async fn subscriber_remove(State(api): State<Shared>, Body(req): Body<ChannelReq>) -> Answer {
    change_members(api, req, SetChange::Remove).await
}

#[derive(Deserialize)]
pub struct ListReq {
    channel_id: String,
    channel_type: u8,
    uids: Vec<String>,
}

/// A group's list (`channel_type` 2), or a user's own list for person
/// channels (`channel_type` 1, `channel_id` = that user).
async fn change_list(api: Shared, req: ListReq, kind: ListKind, change: SetChange) -> Answer {
    if req.uids.is_empty() {
        return Err(ApiError::bad_request("`uids` must not be empty"));
    }
    let listed = uid_list(&api, "uids", &req.uids)?;
    let listed: Vec<&str> = listed.iter().map(Uid::as_str).collect();
    let target = match channel_type(req.channel_type)? {
        ChannelType::Group => {
            group(&api, &req.channel_id, req.channel_type)?;
            ListTarget::Group(&req.channel_id)
        }
        _ => {
            uid(&api, "channel_id", &req.channel_id)?;
            ListTarget::User(&req.channel_id)
        }
    };
    api.control
        .change_list(target, kind, change, &listed)
        .await
        .map_err(control_failed)?;
    ok()
}

pub async fn blacklist_add(State(api): State<Shared>, Body(req): Body<ListReq>) -> Answer {
    change_list(api, req, ListKind::Deny, SetChange::Add).await
}

pub async fn blacklist_remove(State(api): State<Shared>, Body(req): Body<ListReq>) -> Answer {
    change_list(api, req, ListKind::Deny, SetChange::Remove).await
}

pub async fn whitelist_add(State(api): State<Shared>, Body(req): Body<ListReq>) -> Answer {
    change_list(api, req, ListKind::Allow, SetChange::Add).await
}

pub async fn whitelist_remove(State(api): State<Shared>, Body(req): Body<ListReq>) -> Answer {
    change_list(api, req, ListKind::Allow, SetChange::Remove).await
}

// ---- messages ----------------------------------------------------------------

#[derive(Deserialize, Default)]
pub struct HeaderReq {
    #[serde(default)]
    #[allow(dead_code)]
    no_persist: u8,
    #[serde(default)]
    #[allow(dead_code)]
    red_dot: u8,
    #[serde(default)]
    #[allow(dead_code)]
    sync_once: u8,
}

#[derive(Deserialize)]
pub struct SendReq {
    /// Accepted for WuKongIM compatibility: every message is stored.
    #[serde(default)]
    #[allow(dead_code)]
    header: HeaderReq,
    #[serde(default)]
    client_msg_no: String,
    /// Empty: the system (`api.system_uid`).
    #[serde(default)]
    from_uid: String,
    #[serde(default)]
    channel_id: String,
    #[serde(default)]
    channel_type: u8,
    /// Instead of a channel: one person message to each of these uids.
    #[serde(default)]
    subscribers: Vec<String>,
    /// Base64.
    payload: String,
}

/// Stores a message and answers with its place **after** the durable
/// commit. The same `(from_uid, client_msg_no)` again gets the original's
/// answer and stores nothing.
pub async fn message_send(State(api): State<Shared>, Body(req): Body<SendReq>) -> Answer {
    let payload = base64::engine::general_purpose::STANDARD
        .decode(req.payload.as_bytes())
        .map_err(|error| ApiError::bad_request(format!("`payload` is not base64: {error}")))?;
    if payload.is_empty() {
        return Err(ApiError::bad_request("`payload` must not be empty"));
    }
    if payload.len() > api.config.limits.payload_size_max_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the payload is {} bytes; limits.payload_size_max_bytes is {}",
                payload.len(),
                api.config.limits.payload_size_max_bytes
            ),
        ));
    }
    let system = req.from_uid.is_empty() || req.from_uid == api.config.api.system_uid;
    let from = if system {
        Uid::new(&api.config.api.system_uid)
    } else {
        uid(&api, "from_uid", &req.from_uid)?
    };
    let payload = bytes::Bytes::from(payload);
    if !req.subscribers.is_empty() {
        if !req.channel_id.is_empty() {
            return Err(ApiError::bad_request(
                "give either `channel_id` or `subscribers`, not both",
            ));
        }
        let recipients = uid_list(&api, "subscribers", &req.subscribers)?;
        if recipients.contains(&from) {
            return Err(self_channel(&from));
        }
        // Every recipient's number is checked before the first is sent, so
        // a number that does not fit sends nothing.
        let numbers = recipients
            .iter()
            .map(|recipient| {
                let number = if req.client_msg_no.is_empty() {
                    generated_client_msg_no(&api)
                } else {
                    format!("{}/{recipient}", req.client_msg_no)
                };
                checked_client_msg_no(&api, number)
            })
            .collect::<Result<Vec<String>, ApiError>>()?;
        let mut results = Vec::with_capacity(recipients.len());
        for (recipient, number) in recipients.into_iter().zip(numbers) {
            let key = ChannelKey::person(&from, &recipient);
            let sent = send_one(&api, &from, system, key, number, payload.clone()).await?;
            results.push(json!({
                "uid": recipient.as_str(),
                "message_id": sent.0,
                "message_idstr": sent.0.to_string(),
                "message_seq": sent.1,
                "client_msg_no": sent.2,
            }));
        }
        return ok_with(json!({ "messages": results }));
    }
    if req.channel_id.is_empty() {
        return Err(ApiError::bad_request(
            "`channel_id` (or `subscribers`) is required",
        ));
    }
    let key = channel_for(&api, &from, &req.channel_id, req.channel_type)?;
    let client_msg_no = if req.client_msg_no.is_empty() {
        generated_client_msg_no(&api)
    } else {
        checked_client_msg_no(&api, req.client_msg_no)?
    };
    let (message_id, message_seq, client_msg_no) =
        send_one(&api, &from, system, key, client_msg_no, payload).await?;
    ok_with(json!({
        "message_id": message_id,
        "message_idstr": message_id.to_string(),
        "message_seq": message_seq,
        "client_msg_no": client_msg_no,
    }))
}

/// A `client_msg_no` for a message the caller gave none: random, and
/// within `limits.client_msg_no_length_max_bytes` whatever it is set to.
fn generated_client_msg_no(api: &Shared) -> String {
    let max = api.config.limits.client_msg_no_length_max_bytes;
    let random = crate::client::new_client_msg_no();
    let number = format!("api-{random}");
    if number.len() <= max {
        number
    } else {
        // Hex digits are ASCII, so any length is a character boundary.
        random[..max.min(random.len())].to_owned()
    }
}

fn checked_client_msg_no(api: &Shared, client_msg_no: String) -> Result<String, ApiError> {
    let max = api.config.limits.client_msg_no_length_max_bytes;
    if client_msg_no.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_client_msg_no",
            format!(
                "the client_msg_no {client_msg_no:?} is {} bytes; \
                 limits.client_msg_no_length_max_bytes is {max}",
                client_msg_no.len()
            ),
        ));
    }
    Ok(client_msg_no)
}

async fn send_one(
    api: &Shared,
    from: &Uid,
    system: bool,
    key: ChannelKey,
    client_msg_no: String,
    payload: bytes::Bytes,
) -> Result<(u64, u64, String), ApiError> {
    let packet = SendPacket {
        client_seq: 0,
        client_msg_no,
        channel_id: key.id().to_owned(),
        channel_type: key.kind(),
        flags: 0,
        payload,
    };
    let request = ApiRequest::Send {
        from: from.clone(),
        from_device: std::sync::Arc::from(""),
        system,
        channel: key.clone(),
        packet,
    };
    match ask_owner(api, &key, request).await? {
        ApiResponse::Packet(packet) => match *packet {
            Packet::SendAck(ack) if ack.reason == ReasonCode::Success => {
                Ok((ack.message_id, ack.message_seq, ack.client_msg_no))
            }
            Packet::SendAck(ack) => Err(refused(ack.reason)),
            _ => Err(unexpected()),
        },
        _ => Err(unexpected()),
    }
}

/// A message in the API's JSON, as `viewer` sees it (WuKongIM's
/// `MessageResp`, plus `timestamp_ms` and `revoke`).
fn recv_json(recv: &Recv) -> Value {
    serde_json::to_value(crate::webhook::recv_json(recv)).expect("plain structs serialize")
}

#[derive(Deserialize)]
pub struct MessageSyncReq {
    login_uid: String,
    channel_id: String,
    channel_type: u8,
    #[serde(default)]
    start_message_seq: u64,
    /// Exclusive; 0: no end.
    #[serde(default)]
    end_message_seq: u64,
    limit: u32,
    /// 0: down (older, from `start_message_seq` or the newest), 1: up.
    #[serde(default)]
    pull_mode: u8,
}

/// A range of a channel's messages as `login_uid` sees them, in seq order.
pub async fn message_sync(State(api): State<Shared>, Body(req): Body<MessageSyncReq>) -> Answer {
    let viewer = uid(&api, "login_uid", &req.login_uid)?;
    let key = channel_for(&api, &viewer, &req.channel_id, req.channel_type)?;
    if req.limit == 0 {
        return Err(ApiError::bad_request("`limit` must be at least 1"));
    }
    let limit = req.limit.min(api.config.limits.sync_limit_max);
    let direction = match req.pull_mode {
        0 => SyncDirection::Down,
        1 => SyncDirection::Up,
        other => {
            return Err(ApiError::bad_request(format!(
                "`pull_mode` {other} is not 0 (down) or 1 (up)"
            )))
        }
    };
    let start_seq = if direction == SyncDirection::Up {
        req.start_message_seq.max(1)
    } else {
        req.start_message_seq
    };
    let request = SyncMessages {
        request_id: 0,
        channel_id: req.channel_id.clone(),
        channel_type: key.kind(),
        start_seq,
        end_seq: req.end_message_seq,
        limit,
        direction,
    };
    let request = ApiRequest::SyncMessages {
        uid: viewer,
        request,
    };
    let mut messages = match ask_owner(&api, &key, request).await? {
        ApiResponse::Messages(messages) => messages,
        _ => return Err(unexpected()),
    };
    let more = messages.len() == limit as usize;
    messages.sort_by_key(|m| m.message_seq);
    Ok(Json(json!({
        "start_message_seq": req.start_message_seq,
        "end_message_seq": req.end_message_seq,
        "more": u8::from(more),
        "messages": messages.iter().map(recv_json).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
pub struct ByClientMsgNoReq {
    from_uid: String,
    client_msg_no: String,
}

/// The message a sender's `client_msg_no` names (within the idempotency
/// window, `storage.idempotency_ttl_s`).
pub async fn message_by_client_msg_no(
    State(api): State<Shared>,
    query: Result<Query<ByClientMsgNoReq>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(req) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let from = uid(&api, "from_uid", &req.from_uid)?;
    if req.client_msg_no.is_empty() {
        return Err(ApiError::bad_request("`client_msg_no` must not be empty"));
    }
    let client_msg_no = checked_client_msg_no(&api, req.client_msg_no)?;
    let shard = ChannelKey::group(from.as_str()).shard(api.control.shards());
    let request = ApiRequest::MessageByClientMsgNo {
        from: from.clone(),
        client_msg_no,
    };
    match ask(&api, shard, request).await? {
        ApiResponse::Message(Some(message)) => Ok(Json(
            serde_json::to_value(crate::webhook::message_json(&message))
                .map_err(|_| unexpected())?,
        )),
        ApiResponse::Message(None) => Err(refused(ReasonCode::MessageMissing)),
        _ => Err(unexpected()),
    }
}

#[derive(Deserialize)]
pub struct RevokeReq {
    /// For a person channel: one of the two (`channel_id` is the other).
    #[serde(default)]
    login_uid: String,
    channel_id: String,
    channel_type: u8,
    #[serde(default)]
    message_id: u64,
    #[serde(default)]
    message_seq: u64,
}

/// Recalls a message (by `message_id` or `message_seq`), whoever sent it:
/// its payload is erased, devices online hear of it, and syncs show it
/// recalled.
pub async fn message_revoke(State(api): State<Shared>, Body(req): Body<RevokeReq>) -> Answer {
    if req.message_id == 0 && req.message_seq == 0 {
        return Err(ApiError::bad_request("give `message_id` or `message_seq`"));
    }
    let key = if ChannelType(req.channel_type) == ChannelType::Person {
        let viewer = uid(&api, "login_uid", &req.login_uid)?;
        channel_for(&api, &viewer, &req.channel_id, req.channel_type)?
    } else {
        channel_for(&api, &Uid::new(""), &req.channel_id, req.channel_type)?
    };
    let request = ApiRequest::Recall {
        channel: key.clone(),
        message_id: req.message_id,
        message_seq: req.message_seq,
    };
    match ask_owner(&api, &key, request).await? {
        ApiResponse::Packet(packet) => match *packet {
            Packet::RecallResp(resp) if resp.reason == ReasonCode::Success => ok_with(json!({
                "message_id": resp.message_id,
                "message_idstr": resp.message_id.to_string(),
                "message_seq": resp.message_seq,
            })),
            Packet::RecallResp(resp) => Err(refused(resp.reason)),
            _ => Err(unexpected()),
        },
        _ => Err(unexpected()),
    }
}

// ---- conversations -------------------------------------------------------------

#[derive(Deserialize)]
pub struct ConversationSyncReq {
    uid: String,
    /// Only conversations changed after this version (0: all visible).
    #[serde(default)]
    version: u64,
    /// Recent messages per conversation: 0 or 1 (the last one).
    #[serde(default)]
    msg_count: u32,
    #[serde(default)]
    only_unread: u8,
    /// Most conversations returned (default and maximum:
    /// `limits.sync_limit_max`).
    #[serde(default)]
    limit: u32,
}

fn conversation_json(conversation: &Conversation, recents: bool) -> Value {
    let last = conversation.last_message.as_ref();
    json!({
        "channel_id": conversation.channel_id,
        "channel_type": conversation.channel_type.0,
        "unread": conversation.unread,
        "timestamp": last.map_or(0, |m| m.timestamp_ms.div_euclid(1000)),
        "last_msg_seq": conversation.last_message_seq,
        "last_client_msg_no": last.map_or("", |m| m.client_msg_no.as_str()),
        "offset_msg_seq": 0,
        "readed_to_msg_seq": conversation.last_message_seq.saturating_sub(conversation.unread),
        "version": conversation.version,
        "deleted": u8::from(conversation.deleted),
        "recents": if recents { last.map(recv_json).into_iter().collect::<Vec<_>>() } else { Vec::new() },
    })
}

/// A user's conversations (changed since `version`), oldest change first.
pub async fn conversation_sync(
    State(api): State<Shared>,
    Body(req): Body<ConversationSyncReq>,
) -> Answer {
    let user = uid(&api, "uid", &req.uid)?;
    let max = api.config.limits.sync_limit_max;
    let limit = if req.limit == 0 {
        max
    } else {
        req.limit.min(max)
    };
    let request = ApiRequest::SyncConversations {
        uid: user.clone(),
        request: SyncConversations {
            request_id: 0,
            since_version: req.version,
            limit,
            unread_only: req.only_unread == 1,
        },
    };
    let shard = ChannelKey::group(user.as_str()).shard(api.control.shards());
    match ask(&api, shard, request).await? {
        ApiResponse::Conversations { conversations, .. } => Ok(Json(Value::Array(
            conversations
                .iter()
                .map(|c| conversation_json(c, req.msg_count > 0))
                .collect(),
        ))),
        _ => Err(unexpected()),
    }
}

#[derive(Deserialize)]
pub struct ConversationReq {
    uid: String,
    channel_id: String,
    channel_type: u8,
    #[serde(default)]
    unread: u64,
    /// Accepted for WuKongIM compatibility: clearing reads up to the
    /// channel's last message.
    #[serde(default)]
    #[allow(dead_code)]
    message_seq: u64,
}

async fn conversation_op(api: Shared, req: ConversationReq, action: ConversationAction) -> Answer {
    let user = uid(&api, "uid", &req.uid)?;
    let key = channel_for(&api, &user, &req.channel_id, req.channel_type)?;
    let unread_max = api.config.limits.sync_limit_max;
    if action == ConversationAction::SetUnread && req.unread > u64::from(unread_max) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_range",
            format!(
                "`unread` {} is above limits.sync_limit_max = {unread_max}",
                req.unread
            ),
        ));
    }
    let request = ApiRequest::ConversationOp {
        uid: user,
        channel: key.clone(),
        op: ConversationOp {
            request_id: 0,
            channel_id: req.channel_id.clone(),
            channel_type: key.kind(),
            action,
            unread: req.unread,
        },
    };
    match ask_owner(&api, &key, request).await? {
        ApiResponse::Packet(packet) => match *packet {
            Packet::ConversationOpResp(resp) if resp.reason == ReasonCode::Success => {
                match resp.conversation {
                    Some(conversation) => ok_with(conversation_json(&conversation, false)),
                    None => ok(),
                }
            }
            Packet::ConversationOpResp(resp) => Err(refused(resp.reason)),
            _ => Err(unexpected()),
        },
        _ => Err(unexpected()),
    }
}

pub async fn conversation_clear_unread(
    State(api): State<Shared>,
    Body(req): Body<ConversationReq>,
) -> Answer {
    conversation_op(api, req, ConversationAction::ClearUnread).await
}

pub async fn conversation_set_unread(
    State(api): State<Shared>,
    Body(req): Body<ConversationReq>,
) -> Answer {
    conversation_op(api, req, ConversationAction::SetUnread).await
}

/// Hides the conversation until a newer message arrives.
pub async fn conversation_delete(
    State(api): State<Shared>,
    Body(req): Body<ConversationReq>,
) -> Answer {
    conversation_op(api, req, ConversationAction::Delete).await
}

// ---- operations ----------------------------------------------------------------

/// 200 when every shard answers, else 503.
pub async fn health(State(api): State<Shared>) -> Result<Json<Value>, ApiError> {
    let stats = tokio::time::timeout(shard_timeout(&api), api.control.stats()).await;
    match stats {
        Ok(Ok(_)) => Ok(Json(json!({
            "status": "ok",
            "shards": api.control.shards(),
        }))),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "not every shard is answering",
        )),
    }
}

#[derive(Deserialize)]
pub struct RouteQuery {
    /// Accepted as WuKongIM's clients send it; every user connects to the
    /// same addresses here.
    #[serde(default)]
    #[allow(dead_code)]
    uid: String,
    /// 1: only the TCP address (WuKongIM's intranet form).
    #[serde(default)]
    intranet: u8,
}

fn route_json(routes: &super::WkRoutes, intranet: bool) -> Value {
    json!({
        "tcp_addr": routes.tcp_addr,
        "ws_addr": if intranet { "" } else { routes.ws_addr.as_str() },
        "wss_addr": if intranet { "" } else { routes.wss_addr.as_str() },
    })
}

/// Where WuKongIM apps connect (the WKProto listeners), as WuKongIM's
/// `GET /route` answers it.
pub async fn route(
    State(api): State<Shared>,
    query: Result<Query<RouteQuery>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    if query.intranet > 1 {
        return Err(ApiError::bad_request("`intranet` is 0 or 1"));
    }
    Ok(Json(route_json(&api.bound.wk_routes, query.intranet == 1)))
}

/// [`route`] for many users at once: one entry with every uid, since all
/// connect to the same addresses.
pub async fn route_batch(State(api): State<Shared>, Body(uids): Body<Vec<String>>) -> Answer {
    let max = api.config.limits.group_members_max;
    if uids.len() > max {
        return Err(ApiError::bad_request(format!(
            "at most limits.group_members_max = {max} uids"
        )));
    }
    for each in &uids {
        uid(&api, "uids", each)?;
    }
    let mut entry = route_json(&api.bound.wk_routes, false);
    entry["uids"] = json!(uids);
    Ok(Json(json!([entry])))
}
