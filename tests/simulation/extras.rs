//! The operations `Options::extras` turns on (seeds kept as regressions
//! run without them, so they replay as they were found): users' own allow
//! and deny lists, and the HTTP API's requests to the shards (sends on a
//! user's behalf, system sends, an administrator's recall, conversation
//! changes, group details, who is online, kicks), and a full disk (every
//! write fails for a stretch of steps). Each is checked against the model
//! like its client counterpart.

use super::{Attempt, ControlWait, Sim};
use crate::model::ListsModel;
use bytes::Bytes;
use ruyi::channel::ChannelKey;
use ruyi::ids::Uid;
use ruyi::protocol::{
    ChannelType, ConversationAction, ConversationOp, Packet, ReasonCode, SendPacket,
};
use ruyi::shard::api::{ApiRequest, ApiResponse};
use ruyi::shard::state::{ControlError, SetChange};
use ruyi::storage::{user_list_key, ListKind};
use std::collections::BTreeSet;

impl Sim {
    pub(super) fn extra_random(&mut self) {
        match self.rng.below(11) {
            0..=2 => self.person_list_random(),
            10 => self.disk_fills(),
            3 | 4 => self.api_send_random(),
            5 => self.api_recall_random(),
            6 => self.api_conversation_op_random(),
            7 => self.api_channel_info_random(),
            8 => self.api_online_random(),
            _ => self.api_kick_random(),
        }
    }

    /// The disk fills up: every write fails for a while (each answered as
    /// a failed write is), then space returns.
    fn disk_fills(&mut self) {
        let steps = 20 + self.rng.below(200);
        self.disk_full_until = self.step_no + steps;
        self.note(format!("the disk is full for {steps} steps"));
    }

    fn random_uid(&mut self) -> String {
        format!("u{}", self.rng.index(self.options.users))
    }

    /// The change counter of the lists that judge a send from `from` in the
    /// person channel `key` (the recipient's).
    ///
    /// On nodes, the channel's owner judges by the lists as far as it has
    /// applied their partition's log: a send is judged (its epoch can match)
    /// only when every node (any may own the channel when it is served)
    /// had applied the last change answered.
    pub(super) fn person_epoch(&mut self, from: &str, key: &ChannelKey) -> u64 {
        let Some((low, high)) = key.person_pair() else {
            return 0;
        };
        let recipient = if low == from { high } else { low };
        let Some((epoch, through)) = self
            .model
            .person_lists
            .get(recipient)
            .map(|lists| (lists.epoch, lists.log_through))
        else {
            return 0;
        };
        let lists_key = user_list_key(&Uid::new(recipient));
        let behind =
            (0..self.worlds.len()).any(|n| self.worlds[n].applied_of(&lists_key) < through);
        if self.worlds.len() > 1 && behind {
            return u64::MAX;
        }
        epoch
    }

    // ---- a user's own lists -----------------------------------------------

    fn person_list_random(&mut self) {
        let uid = self.random_uid();
        let kind = if self.rng.chance(60) {
            ListKind::Deny
        } else {
            ListKind::Allow
        };
        let change = if self.rng.chance(60) {
            SetChange::Add
        } else {
            SetChange::Remove
        };
        let uids: Vec<String> = (0..self.options.users)
            .map(|u| format!("u{u}"))
            .filter(|u| *u != uid && self.rng.chance(40))
            .collect();
        self.note(format!(
            "operator: {uid}'s {kind:?} list {change:?} {uids:?}"
        ));
        let key = user_list_key(&Uid::new(&uid));
        let Some((node, owner)) = self.owner_of(&key) else {
            return self.note(format!("operator: nobody takes {uid}'s lists now"));
        };
        let (tx, rx) = async_channel::bounded(1);
        self.worlds[node].shards[owner].change_list(key, kind, uids, change, tx);
        let lists = self.model.person_lists.get_mut(&uid).expect("user");
        lists.in_flight += 1;
        lists.epoch += 1;
        self.controls
            .push(ControlWait::PersonList { uid, kind, rx });
    }

    /// A send in a person channel whose recipient's lists did not change
    /// around it was accepted or refused exactly as they say: the deny list
    /// always blocks, the allow list when `allowlist_for_person` is on and
    /// it is not empty.
    pub(super) fn judge_person_policy(
        &mut self,
        who: &str,
        from: &str,
        attempt: &Attempt,
        reason: ReasonCode,
    ) {
        let Some((low, high)) = attempt.channel.person_pair() else {
            return;
        };
        let recipient = if low == from { high } else { low };
        let Some(lists) = self.model.person_lists.get(recipient) else {
            return;
        };
        if lists.uncertain || lists.in_flight > 0 || lists.epoch != attempt.epoch {
            return;
        }
        let expected = if lists.deny.contains(from) {
            ReasonCode::Denied
        } else if self.options.allowlist_for_person
            && !lists.allow.is_empty()
            && !lists.allow.contains(from)
        {
            ReasonCode::NotAllowed
        } else {
            ReasonCode::Success
        };
        let judged = matches!(
            reason,
            ReasonCode::Success | ReasonCode::Denied | ReasonCode::NotAllowed
        );
        if judged && reason != expected {
            let message = format!(
                "{who}'s send {} to {recipient} was answered {reason:?}; their deny {:?}, allow {:?} (allowlist_for_person {}) say {expected:?}",
                attempt.client_msg_no, lists.deny, lists.allow, self.options.allowlist_for_person
            );
            self.violation(message);
        }
    }

    /// After a crash: lists whose change was lost are read back from the
    /// store.
    pub(super) fn reload_uncertain_lists(&mut self) {
        let uncertain: Vec<String> = self
            .model
            .person_lists
            .iter()
            .filter(|(_, l)| l.uncertain && l.in_flight == 0)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in uncertain {
            let key = user_list_key(&Uid::new(&uid));
            if self.no_store_has_the_log(&key) {
                continue;
            }
            let owner = self.truth_node(&key);
            let mut read = |kind| -> BTreeSet<String> {
                self.worlds[owner]
                    .reader
                    .list(&key, kind, 1000)
                    .unwrap_or_default()
                    .iter()
                    .map(|u| u.as_str().to_owned())
                    .collect()
            };
            let (deny, allow) = (read(ListKind::Deny), read(ListKind::Allow));
            self.note(format!(
                "{uid}'s lists read back: deny {deny:?}, allow {allow:?}"
            ));
            let through = self.worlds[0].log_position_of(&key);
            let lists = self.model.person_lists.get_mut(&uid).expect("user");
            lists.deny = deny;
            lists.allow = allow;
            lists.uncertain = false;
            lists.epoch += 1;
            lists.log_through = through;
        }
    }

    fn on_person_list_answer(
        &mut self,
        uid: &str,
        kind: ListKind,
        answer: Option<Result<Vec<String>, ControlError>>,
    ) {
        let through = self.worlds[0].log_position_of(&user_list_key(&Uid::new(uid)));
        let lists: &mut ListsModel = self.model.person_lists.get_mut(uid).expect("user");
        lists.in_flight -= 1;
        lists.epoch += 1;
        lists.log_through = through;
        match answer {
            Some(Ok(uids)) => {
                let set: BTreeSet<String> = uids.into_iter().collect();
                match kind {
                    ListKind::Allow => lists.allow = set,
                    ListKind::Deny => lists.deny = set,
                }
            }
            Some(Err(_)) => {}
            None => lists.uncertain = true,
        }
    }

    // ---- the API ------------------------------------------------------------

    /// A send on a user's behalf (`/message/send`): as the user's own send,
    /// or as a system message, which no list or membership refuses (to
    /// person channels only: a system message to a group from a non-member
    /// is outside what the model follows).
    fn api_send_random(&mut self) {
        let from = self.random_uid();
        let group = self.rng.chance(40) && !self.model.groups.is_empty();
        let key = if group {
            ChannelKey::group(&format!("g{}", self.rng.index(self.options.groups)))
        } else {
            let others: Vec<String> = (0..self.options.users)
                .map(|u| format!("u{u}"))
                .filter(|u| *u != from)
                .collect();
            let to = self.rng.pick(&others).clone();
            ChannelKey::person(&Uid::new(&from), &Uid::new(&to))
        };
        let system = !group && self.rng.chance(30);
        self.next_api_send += 1;
        let client_msg_no = format!("api-{}", self.next_api_send);
        let payload = Bytes::from(format!("{from}:{client_msg_no}:{}", self.rng.below(1000)));
        self.model.sent.insert(
            (from.clone(), client_msg_no.clone()),
            crate::model::Sent {
                channel: key.clone(),
                payload: payload.clone(),
                acked: None,
                deleted: false,
                first_step: self.step_no,
                offline_must: BTreeSet::new(),
                online_must: BTreeSet::new(),
            },
        );
        self.model.channels.insert(key.clone());
        let (epoch, generation) = match key.kind() {
            ChannelType::Group => self
                .model
                .groups
                .get(key.id())
                .map_or((0, 0), |g| (g.epoch, g.generation)),
            _ => (self.person_epoch(&from, &key), 0),
        };
        let attempt = Attempt {
            client_msg_no: client_msg_no.clone(),
            channel: key.clone(),
            epoch,
            // A system message is not judged by the lists.
            first: !system,
            generation,
        };
        self.note(format!(
            "api: send {client_msg_no} from {from} to {key:?}{}",
            if system { " (system)" } else { "" }
        ));
        let packet = SendPacket {
            client_seq: 0,
            client_msg_no,
            channel_id: key.id_seen_by(&from).to_owned(),
            channel_type: key.kind(),
            flags: 0,
            payload,
        };
        let request = ApiRequest::Send {
            from: Uid::new(&from),
            from_device: std::sync::Arc::from(""),
            system,
            channel: key.clone(),
            packet,
        };
        let rx = self.api(&key, request);
        self.controls
            .push(ControlWait::ApiSend { from, attempt, rx });
    }

    /// Sends `request` to `key`'s owner; the answer comes on the receiver.
    fn api(
        &mut self,
        key: &ChannelKey,
        request: ApiRequest,
    ) -> async_channel::Receiver<ApiResponse> {
        let Some((node, owner)) = self.owner_of(key) else {
            // As the control plane answers when nobody serves a forward.
            let (tx, rx) = async_channel::bounded(1);
            let _ = tx.try_send(ApiResponse::Failed(ReasonCode::ServerBusy));
            return rx;
        };
        self.api_at(node, owner, request)
    }

    fn api_at(
        &mut self,
        node: usize,
        shard: usize,
        request: ApiRequest,
    ) -> async_channel::Receiver<ApiResponse> {
        let (tx, rx) = async_channel::bounded(1);
        let now = self.worlds[node].now;
        self.worlds[node].shards[shard].api(request, tx, now);
        rx
    }

    /// An administrator's recall of any stored message, by seq or by id.
    fn api_recall_random(&mut self) {
        let places: Vec<(ChannelKey, u64, u64)> = self
            .model
            .places
            .iter()
            .map(|((key, seq), (id, _, _))| (key.clone(), *seq, *id))
            .collect();
        if places.is_empty() {
            return;
        }
        let (key, seq, id) = self.rng.pick(&places).clone();
        let by_id = self.rng.chance(50);
        self.note(format!(
            "api: recall {key:?} seq {seq} by {}",
            if by_id { "id" } else { "seq" }
        ));
        let request = ApiRequest::Recall {
            channel: key.clone(),
            message_id: if by_id { id } else { 0 },
            message_seq: if by_id { 0 } else { seq },
        };
        let rx = self.api(&key, request);
        let generation = match key.kind() {
            ChannelType::Group => self.model.groups.get(key.id()).map_or(0, |g| g.generation),
            _ => 0,
        };
        self.controls.push(ControlWait::ApiRecall {
            key,
            seq,
            generation,
            rx,
        });
    }

    fn on_api_recall(
        &mut self,
        key: &ChannelKey,
        seq: u64,
        generation: u64,
        response: ApiResponse,
    ) {
        let ApiResponse::Packet(packet) = response else {
            return;
        };
        let Packet::RecallResp(resp) = *packet else {
            return self.violation(format!("api recall answered {packet:?}"));
        };
        self.note(format!(
            "api: recall of {key:?} seq {seq}: {:?}",
            resp.reason
        ));
        let regenerated = key.kind() == ChannelType::Group
            && self
                .model
                .groups
                .get(key.id())
                .is_some_and(|g| g.generation != generation);
        if regenerated || self.erased_with_group(key, seq) {
            return;
        }
        match resp.reason {
            ReasonCode::Success => match self.stored_message(key, seq) {
                Ok(Some(stored)) if stored.recalled => {}
                other => self.violation(format!(
                    "api recall of {key:?} seq {seq} succeeded, the store has {other:?}"
                )),
            },
            ReasonCode::MessageMissing => self.violation(format!(
                "api recall of {key:?} seq {seq}, acknowledged and stored, answered MessageMissing"
            )),
            _ => {}
        }
    }

    /// A conversation change through the API, for a user with a device
    /// that has messages: judged as that device's own would be (its answer
    /// is the same packet).
    fn api_conversation_op_random(&mut self) {
        let d = self.rng.index(self.devices.len());
        let channels: Vec<ChannelKey> = self.devices[d].received.keys().cloned().collect();
        if channels.is_empty() {
            return;
        }
        let key = self.rng.pick(&channels).clone();
        let (action, unread) = match self.rng.below(3) {
            0 => (ConversationAction::ClearUnread, 0),
            1 => (ConversationAction::Delete, 0),
            _ => (ConversationAction::SetUnread, 1 + self.rng.below(5)),
        };
        let request_id = self.request_id();
        let uid = self.devices[d].uid.clone();
        self.register_conversation_op(d, request_id, key.clone(), action, unread);
        self.note(format!(
            "api: {uid}'s conversation {action:?} {unread} on {key:?}"
        ));
        let request = ApiRequest::ConversationOp {
            uid: Uid::new(&uid),
            channel: key.clone(),
            op: ConversationOp {
                request_id,
                channel_id: key.id_seen_by(&uid).to_owned(),
                channel_type: key.kind(),
                action,
                unread,
            },
        };
        let rx = self.api(&key, request);
        self.controls
            .push(ControlWait::ApiConversationOp { d, request_id, rx });
    }

    fn on_api_conversation_op(&mut self, d: usize, request_id: u32, answer: Option<ApiResponse>) {
        match answer {
            Some(ApiResponse::Packet(packet)) => match *packet {
                Packet::ConversationOpResp(resp) => self.on_conversation_op_resp(d, resp),
                other => self.violation(format!("api conversation op answered {other:?}")),
            },
            Some(_) => self.lose_conversation_op(d, request_id),
            None => self.lose_conversation_op(d, request_id),
        }
    }

    /// A group's details from its owner (`/channel/info`) equal the
    /// model's when no change of the group was in flight around the call.
    fn api_channel_info_random(&mut self) {
        if self.model.groups.is_empty() {
            return;
        }
        let group = format!("g{}", self.rng.index(self.options.groups));
        let key = ChannelKey::group(&group);
        let epoch = self.model.groups[&group].epoch;
        self.note(format!("api: info of {group}"));
        let rx = self.api(
            &key,
            ApiRequest::ChannelInfo {
                channel: key.clone(),
            },
        );
        self.controls
            .push(ControlWait::ApiChannelInfo { group, epoch, rx });
    }

    fn on_api_channel_info(&mut self, group: &str, epoch: u64, response: ApiResponse) {
        let model = &self.model.groups[group];
        if model.uncertain || model.in_flight > 0 || model.epoch != epoch {
            return;
        }
        let names = |uids: &[Uid]| -> BTreeSet<String> {
            uids.iter().map(|u| u.as_str().to_owned()).collect()
        };
        let verdict = match (&response, model.exists) {
            (ApiResponse::Channel(details), true) => {
                let (members, allow, deny) = (
                    names(&details.members),
                    names(&details.allow),
                    names(&details.deny),
                );
                (members != model.members || allow != model.allow || deny != model.deny).then(
                    || {
                        format!(
                            "members {members:?}, allow {allow:?}, deny {deny:?}; the model has {:?}, {:?}, {:?}",
                            model.members, model.allow, model.deny
                        )
                    },
                )
            }
            (ApiResponse::Failed(ReasonCode::ChannelMissing), false) => None,
            (ApiResponse::Failed(ReasonCode::StorageError | ReasonCode::ServerBusy), _) => None,
            (other, exists) => Some(format!("{other:?} for a group that exists: {exists}")),
        };
        if let Some(verdict) = verdict {
            self.violation(format!("api info of {group}: {verdict}"));
        }
    }

    /// Who is online (`/user/onlinestatus`), asked of any shard: a user
    /// with a connection every shard has applied is listed, a user every
    /// shard has heard go offline is not. (On nodes: of the node asked,
    /// which knows its own connections only.)
    fn api_online_random(&mut self) {
        self.observe_presence();
        let node = self.random_node();
        let shard = self.rng.index(self.shard_count());
        let uids: Vec<Uid> = (0..self.options.users)
            .map(|u| Uid::new(&format!("u{u}")))
            .collect();
        let rx = self.api_at(node, shard, ApiRequest::Online { uids });
        let Ok(ApiResponse::Online(online)) = rx.try_recv() else {
            return self.violation(format!("api online on shard {shard}: no answer at once"));
        };
        let listed: BTreeSet<String> = online
            .iter()
            .filter(|(_, flags)| !flags.is_empty())
            .map(|(uid, _)| uid.as_str().to_owned())
            .collect();
        self.note(format!("api: online, asked of shard {shard}: {listed:?}"));
        let tracks = self.model.presence.iter().filter(|((n, _), _)| *n == node);
        for ((_, uid), track) in tracks {
            if track.active_since.is_some() && !listed.contains(uid) {
                return self.violation(format!(
                    "{uid} has an active connection, shard {shard} says offline"
                ));
            }
            if track.offline_since.is_some() && listed.contains(uid) {
                return self.violation(format!(
                    "{uid} is offline everywhere, shard {shard} says online"
                ));
            }
        }
    }

    /// An administrator logs a user out on one shard: every logged-in
    /// connection of theirs there is closed (the devices see it when they
    /// next read).
    fn api_kick_random(&mut self) {
        let uid = self.random_uid();
        let node = self.random_node();
        let shard = self.rng.index(self.shard_count());
        let (held, _) = self.worlds[node].shards[shard].user_connections(&Uid::new(&uid));
        self.note(format!(
            "api: kick {uid} on {}shard {shard}",
            self.node_name(node)
        ));
        let request = ApiRequest::Kick {
            uid: Uid::new(&uid),
            device_flag: None,
        };
        let rx = self.api_at(node, shard, request);
        match rx.try_recv() {
            Ok(ApiResponse::Kicked(n)) if n == held => {}
            other => self.violation(format!(
                "kick of {uid} on shard {shard}, which held {held} of their connections, answered {other:?}"
            )),
        }
    }

    /// Polls one of the waits `extras` adds; `Some` if it is still waiting.
    pub(super) fn poll_extra(&mut self, wait: ControlWait) -> Option<ControlWait> {
        use async_channel::TryRecvError::{Closed, Empty};
        match wait {
            ControlWait::PersonList { uid, kind, rx } => match rx.try_recv() {
                Err(Empty) => return Some(ControlWait::PersonList { uid, kind, rx }),
                Ok(answer) => self.on_person_list_answer(&uid, kind, Some(answer)),
                Err(Closed) => self.on_person_list_answer(&uid, kind, None),
            },
            ControlWait::ApiSend { from, attempt, rx } => match rx.try_recv() {
                Err(Empty) => return Some(ControlWait::ApiSend { from, attempt, rx }),
                Ok(ApiResponse::Packet(packet)) => match *packet {
                    Packet::SendAck(ack) => {
                        self.note(format!(
                            "api: SendAck {} {:?} seq {} id {}",
                            ack.client_msg_no, ack.reason, ack.message_seq, ack.message_id
                        ));
                        self.on_answered_send("api", from, attempt, ack);
                    }
                    other => self.violation(format!("api send answered {other:?}")),
                },
                // Nobody took writes to the channel (a takeover): retryable,
                // nothing stored.
                Ok(ApiResponse::Failed(ReasonCode::ServerBusy)) => {
                    self.note(format!(
                        "api: send {} found no owner",
                        attempt.client_msg_no
                    ));
                }
                Ok(other) => self.violation(format!("api send answered {other:?}")),
                Err(Closed) => {}
            },
            ControlWait::ApiRecall {
                key,
                seq,
                generation,
                rx,
            } => match rx.try_recv() {
                Err(Empty) => {
                    return Some(ControlWait::ApiRecall {
                        key,
                        seq,
                        generation,
                        rx,
                    })
                }
                Ok(response) => self.on_api_recall(&key, seq, generation, response),
                Err(Closed) => {}
            },
            ControlWait::ApiConversationOp { d, request_id, rx } => match rx.try_recv() {
                Err(Empty) => return Some(ControlWait::ApiConversationOp { d, request_id, rx }),
                Ok(response) => self.on_api_conversation_op(d, request_id, Some(response)),
                Err(Closed) => self.on_api_conversation_op(d, request_id, None),
            },
            ControlWait::ApiChannelInfo { group, epoch, rx } => match rx.try_recv() {
                Err(Empty) => return Some(ControlWait::ApiChannelInfo { group, epoch, rx }),
                Ok(response) => self.on_api_channel_info(&group, epoch, response),
                Err(Closed) => {}
            },
            other => return Some(other),
        }
        None
    }
}
