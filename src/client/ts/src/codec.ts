// The wire format: every frame is a 4-byte little-endian length and a
// FlatBuffers `Frame` of exactly that many bytes (schemas/ruyi.fbs). This
// module turns requests into frames and frames into plain objects whose
// 64-bit ids are decimal strings; it knows nothing of sockets or timers.

import * as flatbuffers from 'flatbuffers';
import {
  ChannelType,
  ConnAck,
  Connect,
  Conversation as WireConversation,
  ConversationAction,
  ConversationOp,
  ConversationOpResp,
  ConversationUpdate,
  DeviceFlag,
  Disconnect,
  Frame,
  Packet,
  Ping,
  ReasonCode,
  Recall,
  RecallEvent as WireRecallEvent,
  RecallResp,
  Recv,
  RecvAck,
  Send,
  SendAck as WireSendAck,
  SyncConversations,
  SyncConversationsResp,
  SyncDirection,
  SyncMessages,
  SyncMessagesResp,
} from './generated/ruyi/wire.js';
import { ProtocolError } from './errors.js';

/** The protocol version this SDK speaks (schemas/ruyi.fbs is version 1). */
export const PROTOCOL_VERSION = 1;

/** `Recv.flags` bit 0: sent before and not acknowledged. */
export const RECV_FLAG_REDELIVERED = 1 << 0;
/** `Recv.flags` bit 1: sent by this user from another device. */
export const RECV_FLAG_FROM_SELF = 1 << 1;
/** `Recv.flags` bit 2: recalled (sync results; the payload is empty). */
export const RECV_FLAG_RECALLED = 1 << 2;

const FRAME_PREFIX_BYTES = 4;
const U64_MAX = (1n << 64n) - 1n;

/** The name of a reason code (`"Success"`, `"AuthFailed"`, ...), or
 * `"Unknown(N)"` for a code newer than this SDK. */
export function reasonName(code: number): string {
  const name = (ReasonCode as unknown as Record<number, string | undefined>)[code];
  return name ?? `Unknown(${code})`;
}

/** A 64-bit id given as a decimal string (or a bigint, or a safe integer). */
export function parseU64(value: string | bigint | number, what: string): bigint {
  let parsed: bigint;
  if (typeof value === 'bigint') {
    parsed = value;
  } else if (typeof value === 'number') {
    if (!Number.isSafeInteger(value)) {
      throw new TypeError(`${what} must be an unsigned 64-bit integer (as a decimal string), not ${value}`);
    }
    parsed = BigInt(value);
  } else {
    if (!/^[0-9]{1,20}$/.test(value)) {
      throw new TypeError(`${what} must be an unsigned 64-bit integer as a decimal string, not ${JSON.stringify(value)}`);
    }
    parsed = BigInt(value);
  }
  if (parsed < 0n || parsed > U64_MAX) {
    throw new TypeError(`${what} ${parsed} is outside the unsigned 64-bit range`);
  }
  return parsed;
}

/** A message as the server pushed it (or returned it from a sync). */
export interface Message {
  /** Unique across the server: a 64-bit integer as a decimal string. */
  messageId: string;
  /** Position in the channel (1, 2, 3, ... with no gaps), as a decimal string. */
  messageSeq: string;
  clientMsgNo: string;
  fromUid: string;
  /** For a person channel, the other person's uid as this user sees it. */
  channelId: string;
  channelType: ChannelType;
  /** Server time of the commit, Unix milliseconds. */
  timestampMs: number;
  /** The raw `Recv.flags`; the three booleans below decode them. */
  flags: number;
  redelivered: boolean;
  fromSelf: boolean;
  recalled: boolean;
  /** The application flags of the send, unchanged. */
  sendFlags: number;
  payload: Uint8Array;
  /** The payload as UTF-8 text (invalid bytes become U+FFFD). */
  text: string;
}

export interface SendAck {
  clientMsgNo: string;
  messageId: string;
  messageSeq: string;
}

export interface Conversation {
  channelId: string;
  channelType: ChannelType;
  /** Messages from others above the read position. */
  unread: number;
  /** Grows with every change; pass the largest seen to `syncConversations`. */
  version: string;
  lastMessageSeq: string;
  /** The user's read position. */
  readSeq: string;
  /** `null` when the conversation has no visible message. */
  lastMessage: Message | null;
  /** Set in incremental syncs and updates for a deleted conversation. */
  deleted: boolean;
}

export interface RecallEvent {
  channelId: string;
  channelType: ChannelType;
  messageId: string;
  messageSeq: string;
  fromUid: string;
}

export interface ConnAckInfo {
  serverTimeMs: number;
  heartbeatIntervalMs: number;
  /** Unique per connection, as a decimal string. */
  sessionId: string;
}

/** What one frame from the server says. */
export type ServerPacket =
  | { type: 'connAck'; reason: number; info: ConnAckInfo }
  | { type: 'sendAck'; clientSeq: number; reason: number; ack: SendAck }
  | { type: 'recv'; message: Message }
  | { type: 'pong' }
  | { type: 'disconnect'; reason: number; message: string }
  | { type: 'syncMessagesResp'; requestId: number; reason: number; messages: Message[] }
  | { type: 'syncConversationsResp'; requestId: number; reason: number; conversations: Conversation[]; more: boolean }
  | { type: 'conversationOpResp'; requestId: number; reason: number; conversation: Conversation | null }
  | { type: 'recallResp'; requestId: number; reason: number; messageId: string; messageSeq: string }
  | { type: 'conversationUpdate'; conversation: Conversation }
  | { type: 'recallEvent'; recall: RecallEvent };

const textDecoder = new TextDecoder('utf-8');
const textEncoder = new TextEncoder();

function frame(builder: flatbuffers.Builder, type: Packet, packet: flatbuffers.Offset): Uint8Array {
  const root = Frame.createFrame(builder, type, packet);
  // Not `finishSizePrefixed`: that aligns the buffer with its prefix, which
  // leaves 8-byte fields 4 bytes off alignment within the FlatBuffer, and
  // the gateway's verifier (like the Rust SDK's encoder) counts alignment
  // from the FlatBuffer's first byte.
  Frame.finishFrameBuffer(builder, root);
  const body = builder.asUint8Array();
  const out = new Uint8Array(FRAME_PREFIX_BYTES + body.length);
  new DataView(out.buffer).setUint32(0, body.length, true);
  out.set(body, FRAME_PREFIX_BYTES);
  return out;
}

export interface ConnectRequest {
  uid: string;
  token: string;
  deviceId: string;
  deviceFlag: DeviceFlag;
  resume: boolean;
  clientTimestampMs: number;
}

export function encodeConnect(request: ConnectRequest): Uint8Array {
  const b = new flatbuffers.Builder(256);
  const uid = b.createString(request.uid);
  const token = b.createString(request.token);
  const deviceId = b.createString(request.deviceId);
  const packet = Connect.createConnect(
    b,
    PROTOCOL_VERSION,
    uid,
    token,
    deviceId,
    request.deviceFlag,
    BigInt(Math.trunc(request.clientTimestampMs)),
    request.resume,
  );
  return frame(b, Packet.Connect, packet);
}

export interface SendRequest {
  clientSeq: number;
  clientMsgNo: string;
  channelId: string;
  channelType: ChannelType;
  flags: number;
  payload: Uint8Array;
}

export function encodeSend(request: SendRequest): Uint8Array {
  const b = new flatbuffers.Builder(128 + request.payload.length);
  const clientMsgNo = b.createString(request.clientMsgNo);
  const channelId = b.createString(request.channelId);
  const payload = Send.createPayloadVector(b, request.payload);
  const packet = Send.createSend(b, request.clientSeq, clientMsgNo, channelId, request.channelType, request.flags, payload);
  return frame(b, Packet.Send, packet);
}

/** Acknowledges one message (`through` false) or every push of a channel up
 * to `messageSeq` on this connection (`through` true). */
export function encodeRecvAck(messageId: bigint, messageSeq: bigint, channelId: string, channelType: ChannelType, through: boolean): Uint8Array {
  const b = new flatbuffers.Builder(64);
  const channel = b.createString(channelId);
  const packet = RecvAck.createRecvAck(b, messageId, messageSeq, channel, channelType, through);
  return frame(b, Packet.RecvAck, packet);
}

export function encodePing(): Uint8Array {
  const b = new flatbuffers.Builder(16);
  Ping.startPing(b);
  return frame(b, Packet.Ping, Ping.endPing(b));
}

export function encodeDisconnect(): Uint8Array {
  const b = new flatbuffers.Builder(32);
  const message = b.createString('');
  return frame(b, Packet.Disconnect, Disconnect.createDisconnect(b, ReasonCode.Success, message));
}

export function encodeSyncMessages(requestId: number, channelId: string, channelType: ChannelType, startSeq: bigint, endSeq: bigint, limit: number, direction: SyncDirection): Uint8Array {
  const b = new flatbuffers.Builder(64);
  const channel = b.createString(channelId);
  const packet = SyncMessages.createSyncMessages(b, requestId, channel, channelType, startSeq, endSeq, limit, direction);
  return frame(b, Packet.SyncMessages, packet);
}

export function encodeSyncConversations(requestId: number, sinceVersion: bigint, limit: number, unreadOnly: boolean): Uint8Array {
  const b = new flatbuffers.Builder(32);
  const packet = SyncConversations.createSyncConversations(b, requestId, sinceVersion, limit, unreadOnly);
  return frame(b, Packet.SyncConversations, packet);
}

export function encodeConversationOp(requestId: number, channelId: string, channelType: ChannelType, action: ConversationAction, unread: bigint): Uint8Array {
  const b = new flatbuffers.Builder(64);
  const channel = b.createString(channelId);
  const packet = ConversationOp.createConversationOp(b, requestId, channel, channelType, action, unread);
  return frame(b, Packet.ConversationOp, packet);
}

export function encodeRecall(requestId: number, channelId: string, channelType: ChannelType, messageId: bigint, clientMsgNo: string): Uint8Array {
  const b = new flatbuffers.Builder(64);
  const channel = b.createString(channelId);
  const msgNo = b.createString(clientMsgNo);
  const packet = Recall.createRecall(b, requestId, channel, channelType, messageId, msgNo);
  return frame(b, Packet.Recall, packet);
}

export function utf8(text: string): Uint8Array {
  return textEncoder.encode(text);
}

function message(recv: Recv): Message {
  const flags = recv.flags();
  const payload = recv.payloadArray() ?? new Uint8Array(0);
  return {
    messageId: recv.messageId().toString(),
    messageSeq: recv.messageSeq().toString(),
    clientMsgNo: recv.clientMsgNo() ?? '',
    fromUid: recv.fromUid() ?? '',
    channelId: recv.channelId() ?? '',
    channelType: recv.channelType(),
    timestampMs: Number(recv.timestampMs()),
    flags,
    redelivered: (flags & RECV_FLAG_REDELIVERED) !== 0,
    fromSelf: (flags & RECV_FLAG_FROM_SELF) !== 0,
    recalled: (flags & RECV_FLAG_RECALLED) !== 0,
    sendFlags: recv.sendFlags(),
    // A copy: the frame's buffer is not kept.
    payload: payload.slice(),
    text: textDecoder.decode(payload),
  };
}

function conversation(c: WireConversation): Conversation {
  const last = c.lastMessage();
  return {
    channelId: c.channelId() ?? '',
    channelType: c.channelType(),
    unread: Number(c.unread()),
    version: c.version().toString(),
    lastMessageSeq: c.lastMessageSeq().toString(),
    readSeq: c.readSeq().toString(),
    lastMessage: last ? message(last) : null,
    deleted: c.deleted(),
  };
}

function table<T>(f: Frame, make: new () => T, name: string): T {
  const value = f.packet(new make()) as T | null;
  if (value === null) {
    throw new ProtocolError(`a ${name} frame without its packet`);
  }
  return value;
}

/** Decodes one FlatBuffers `Frame` (without its length prefix). */
export function decodePacket(bytes: Uint8Array): ServerPacket {
  const f = Frame.getRootAsFrame(new flatbuffers.ByteBuffer(bytes));
  const type = f.packetType();
  switch (type) {
    case Packet.ConnAck: {
      const p = table(f, ConnAck, 'ConnAck');
      return {
        type: 'connAck',
        reason: p.reason(),
        info: { serverTimeMs: Number(p.serverTimeMs()), heartbeatIntervalMs: p.heartbeatIntervalMs(), sessionId: p.sessionId().toString() },
      };
    }
    case Packet.SendAck: {
      const p = table(f, WireSendAck, 'SendAck');
      return {
        type: 'sendAck',
        clientSeq: p.clientSeq(),
        reason: p.reason(),
        ack: { clientMsgNo: p.clientMsgNo() ?? '', messageId: p.messageId().toString(), messageSeq: p.messageSeq().toString() },
      };
    }
    case Packet.Recv:
      return { type: 'recv', message: message(table(f, Recv, 'Recv')) };
    case Packet.Pong:
      return { type: 'pong' };
    case Packet.Disconnect: {
      const p = table(f, Disconnect, 'Disconnect');
      return { type: 'disconnect', reason: p.reason(), message: p.message() ?? '' };
    }
    case Packet.SyncMessagesResp: {
      const p = table(f, SyncMessagesResp, 'SyncMessagesResp');
      const messages: Message[] = [];
      for (let i = 0; i < p.messagesLength(); i++) {
        const m = p.messages(i);
        if (m) messages.push(message(m));
      }
      return { type: 'syncMessagesResp', requestId: p.requestId(), reason: p.reason(), messages };
    }
    case Packet.SyncConversationsResp: {
      const p = table(f, SyncConversationsResp, 'SyncConversationsResp');
      const conversations: Conversation[] = [];
      for (let i = 0; i < p.conversationsLength(); i++) {
        const c = p.conversations(i);
        if (c) conversations.push(conversation(c));
      }
      return { type: 'syncConversationsResp', requestId: p.requestId(), reason: p.reason(), conversations, more: p.more() };
    }
    case Packet.ConversationOpResp: {
      const p = table(f, ConversationOpResp, 'ConversationOpResp');
      const c = p.conversation();
      return { type: 'conversationOpResp', requestId: p.requestId(), reason: p.reason(), conversation: c ? conversation(c) : null };
    }
    case Packet.RecallResp: {
      const p = table(f, RecallResp, 'RecallResp');
      return {
        type: 'recallResp',
        requestId: p.requestId(),
        reason: p.reason(),
        messageId: p.messageId().toString(),
        messageSeq: p.messageSeq().toString(),
      };
    }
    case Packet.ConversationUpdate: {
      const c = table(f, ConversationUpdate, 'ConversationUpdate').conversation();
      if (!c) throw new ProtocolError('a ConversationUpdate without its conversation');
      return { type: 'conversationUpdate', conversation: conversation(c) };
    }
    case Packet.RecallEvent: {
      const p = table(f, WireRecallEvent, 'RecallEvent');
      return {
        type: 'recallEvent',
        recall: {
          channelId: p.channelId() ?? '',
          channelType: p.channelType(),
          messageId: p.messageId().toString(),
          messageSeq: p.messageSeq().toString(),
          fromUid: p.fromUid() ?? '',
        },
      };
    }
    default:
      throw new ProtocolError(`the server sent packet type ${Packet[type] ?? type}, which only clients send`);
  }
}

/** Splits the byte stream (the concatenated payloads of binary WebSocket
 * messages) into frames. A length prefix above `frameSizeMaxBytes` is a
 * protocol error: nothing of it is buffered. */
export class FrameReader {
  private buffer: Uint8Array = new Uint8Array(0);

  constructor(private readonly frameSizeMaxBytes: number) {}

  /** Adds bytes and returns every complete frame's packet, in order. */
  push(bytes: Uint8Array): ServerPacket[] {
    if (this.buffer.length === 0) {
      this.buffer = bytes;
    } else {
      const joined = new Uint8Array(this.buffer.length + bytes.length);
      joined.set(this.buffer, 0);
      joined.set(bytes, this.buffer.length);
      this.buffer = joined;
    }
    const packets: ServerPacket[] = [];
    let at = 0;
    while (this.buffer.length - at >= FRAME_PREFIX_BYTES) {
      const view = new DataView(this.buffer.buffer, this.buffer.byteOffset + at, FRAME_PREFIX_BYTES);
      const length = view.getUint32(0, true);
      if (length === 0 || length > this.frameSizeMaxBytes) {
        throw new ProtocolError(`a frame of ${length} bytes (frameSizeMaxBytes is ${this.frameSizeMaxBytes})`);
      }
      if (this.buffer.length - at - FRAME_PREFIX_BYTES < length) break;
      const start = at + FRAME_PREFIX_BYTES;
      const body = this.buffer.subarray(start, start + length);
      try {
        packets.push(decodePacket(body));
      } catch (error) {
        if (error instanceof ProtocolError) throw error;
        // The JavaScript runtime has no verifier: a malformed buffer shows
        // up as a read outside it.
        throw new ProtocolError(`a malformed frame: ${(error as Error).message}`);
      }
      at = start + length;
    }
    this.buffer = at === this.buffer.length ? new Uint8Array(0) : this.buffer.slice(at);
    return packets;
  }
}
