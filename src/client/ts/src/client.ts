// The client: one WebSocket at a time carrying the binary protocol, with the
// Rust SDK's guarantees (src/client/mod.rs). `connect()` resolves on
// ConnAck; `send()` resolves on the SendAck; received messages are handed to
// callbacks and async iterators once each (dedup by channel seq) and
// acknowledged with one cumulative ack per channel per WebSocket message;
// Ping at the interval ConnAck asks for; after a dropped connection it
// connects again with backoff and jitter, resumes, and sends every
// unacknowledged send again under the same client_msg_no (the server answers
// a resend of a stored message with the original SendAck). Never after
// Kicked or AuthFailed.

import {
  ChannelType,
  ConversationAction,
  DeviceFlag,
  ReasonCode,
  SyncDirection,
} from './generated/ruyi/wire.js';
import {
  type ConnAckInfo,
  type Conversation,
  FrameReader,
  type Message,
  type RecallEvent,
  type SendAck,
  type ServerPacket,
  encodeConnect,
  encodeConversationOp,
  encodeDisconnect,
  encodePing,
  encodeRecall,
  encodeRecvAck,
  encodeSend,
  encodeSyncConversations,
  encodeSyncMessages,
  parseU64,
  reasonName,
  utf8,
} from './codec.js';
import {
  ConnectRefusedError,
  ConnectionClosedError,
  IncomingOverflowError,
  PendingSendsFullError,
  ProtocolError,
  RequestFailedError,
  RuyiError,
  SendRefusedError,
  TimeoutError,
} from './errors.js';

/** The part of the WebSocket API the client uses: the browser's
 * `WebSocket` and Node's `ws@8` both have it. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: Handler<unknown> | null;
  onmessage: Handler<{ data: unknown }> | null;
  onclose: Handler<{ code: number; reason: string }> | null;
  onerror: Handler<unknown> | null;
}

/** A handler type checked bivariantly (as methods are), so that the
 * browser's and ws's handlers, whose event types differ, both fit. */
type Handler<E> = { bivarianceHack(event: E): void }['bivarianceHack'];

/** Replaces a socket's handlers once it is no longer the client's. */
function ignore(): void {}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

const WS_OPEN = 1;
const U32_MAX = 0xffff_ffff;

export interface ConnectOptions {
  /** `ws://host:port/path` or `wss://...`: the gateway's `[ws]` listener. */
  url: string;
  uid: string;
  /** A user token (`ruyi token --uid UID`, or one registered with the
   * admin API's `POST /user/token`), or a function that gives one for each
   * connection attempt (for tokens that expire). */
  token: string | (() => string | Promise<string>);
  /** Identifies this installation; another login with the same uid and
   * device id replaces this one (the server kicks it). Default `"web"`. */
  deviceId?: string;
  /** Default `DeviceFlag.Web`. */
  deviceFlag?: DeviceFlag;
  /** Acknowledge received messages (one cumulative ack per channel per
   * WebSocket message) and drop redeliveries of messages already handed
   * over. Off: the app calls `ack`/`ackThrough` and sees every redelivery.
   * Default true. */
  autoAck?: boolean;
  /** Send Ping at the interval ConnAck gives. Default true. */
  heartbeat?: boolean;
  /** The connection is taken for dead (and replaced, when `reconnect` is
   * on) when nothing arrived for this many heartbeat intervals. Default 2. */
  heartbeatsMissedMax?: number;
  /** Ask the server to push, once connected, what this device has not
   * acknowledged. Default true. */
  resume?: boolean;
  /** Connect again when the connection drops, with exponential backoff and
   * jitter; resume; resend unacknowledged sends under their client_msg_no.
   * Never after Kicked or AuthFailed (or any refusal but ServerBusy).
   * Default true. */
  reconnect?: boolean;
  /** First reconnect delay. Default 100 ms. */
  reconnectDelayInitialMs?: number;
  /** The delay doubles up to this. Default 5000 ms. */
  reconnectDelayMaxMs?: number;
  /** Each delay is shortened by a random fraction up to this (0 to 1), so
   * that many clients dropped at once do not return at once. Default 0.5. */
  reconnectJitter?: number;
  /** Give up (and close) after this many failed reconnect attempts in a
   * row. Default Infinity. */
  reconnectAttemptsMax?: number;
  /** How long the WebSocket upgrade and the ConnAck may take. Default 10000 ms. */
  connectTimeoutMs?: number;
  /** How long a sync, conversation change or recall may wait for its
   * answer (including time spent reconnecting). Default 10000 ms. */
  requestTimeoutMs?: number;
  /** Largest frame accepted from the server. Default 4 MiB. */
  frameSizeMaxBytes?: number;
  /** Deliveries an iterator from `deliveries()` holds before it ends with
   * `IncomingOverflowError`. Default 10000. */
  incomingBufferMax?: number;
  /** Sends waiting for their SendAck (also while reconnecting) before
   * `send()` rejects with `PendingSendsFullError`. Default 10000. */
  pendingSendsMax?: number;
  /** The WebSocket class; default `globalThis.WebSocket`. In Node 20, pass
   * `ws`'s: `import WebSocket from 'ws'`. */
  WebSocket?: WebSocketConstructor;
  /** Called with an exception thrown by one of the app's callbacks.
   * Default `console.error`. */
  onCallbackError?: (error: unknown) => void;
}

type Settings = Required<Omit<ConnectOptions, 'WebSocket' | 'onCallbackError'>> & {
  WebSocket: WebSocketConstructor;
  onCallbackError: (error: unknown) => void;
};

/** One message to send. */
export interface OutgoingMessage {
  channelId: string;
  /** Default `ChannelType.Person`. */
  channelType?: ChannelType;
  /** A string is sent as UTF-8. */
  payload: Uint8Array | string;
  /** The client's unique id for the message: a resend with the same one is
   * stored once. Default: a random UUID. */
  clientMsgNo?: string;
  /** Application flags (0 to 255), delivered unchanged. Default 0. */
  flags?: number;
}

/** What `deliveries()` yields, in the order the server sent it. */
export type Delivery =
  | { kind: 'message'; message: Message }
  | { kind: 'conversation'; conversation: Conversation }
  | { kind: 'recall'; recall: RecallEvent }
  /** The last delivery: the client is closed for good. */
  | { kind: 'closed'; reason: string | null; detail: string };

export interface ClientEvents {
  message: (message: Message) => void;
  /** One of the user's conversations changed on another device. */
  conversation: (conversation: Conversation) => void;
  recall: (recall: RecallEvent) => void;
  /** The connection dropped; the client is reconnecting. */
  disconnected: (info: { reason: string | null }) => void;
  /** A new connection was accepted after a drop. */
  reconnected: (info: ConnAckInfo) => void;
  /** The client is closed for good. */
  closed: (info: { reason: string | null; detail: string }) => void;
}

export type ClientState = 'open' | 'reconnecting' | 'closed';

export interface ClientStats {
  /** Connections accepted (ConnAck Success), the first included. */
  connections: number;
  reconnects: number;
  /** Redeliveries of messages already handed over, dropped by the dedup. */
  duplicatesDropped: number;
  /** Sends written again after a reconnect. */
  resends: number;
}

export interface SyncMessagesOptions {
  channelId: string;
  /** Default `ChannelType.Person`. */
  channelType?: ChannelType;
  /** First seq, inclusive. Up: at least 1 (default 1). Down: 0 = newest. */
  startSeq?: string | number;
  /** Where to stop, exclusive; 0 (the default) = no bound. */
  endSeq?: string | number;
  /** At most this many (1 to the server's `limits.sync_limit_max`). Default 100. */
  limit?: number;
  /** Default `"up"`. */
  direction?: 'up' | 'down';
}

export interface RecallOptions {
  channelId: string;
  channelType?: ChannelType;
  /** The message's id; or give `clientMsgNo`. */
  messageId?: string;
  clientMsgNo?: string;
}

interface PendingSend {
  clientMsgNo: string;
  channelId: string;
  channelType: ChannelType;
  flags: number;
  payload: Uint8Array;
  /** The client_seq on the current connection; null while not written. */
  clientSeq: number | null;
  resolve: (ack: SendAck) => void;
  reject: (error: Error) => void;
}

interface PendingRequest {
  name: string;
  requestId: number;
  frame: Uint8Array;
  /** Written on the current connection (so lost if it drops). */
  written: boolean;
  timer: ReturnType<typeof setTimeout>;
  settle: (packet: ServerPacket) => void;
  reject: (error: Error) => void;
}

function settings(options: ConnectOptions): Settings {
  if (!/^wss?:\/\//i.test(options.url ?? '')) {
    throw new TypeError(`url must be a ws:// or wss:// URL, not ${JSON.stringify(options.url)}`);
  }
  if (typeof options.uid !== 'string' || options.uid.length === 0) {
    throw new TypeError('uid must be a non-empty string');
  }
  if (typeof options.token !== 'string' && typeof options.token !== 'function') {
    throw new TypeError('token must be a string or a function that returns one');
  }
  const WebSocketClass = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (!WebSocketClass) {
    throw new RuyiError("this runtime has no global WebSocket: pass options.WebSocket (in Node: import WebSocket from 'ws')");
  }
  const s: Settings = {
    url: options.url,
    uid: options.uid,
    token: options.token,
    deviceId: options.deviceId ?? 'web',
    deviceFlag: options.deviceFlag ?? DeviceFlag.Web,
    autoAck: options.autoAck ?? true,
    heartbeat: options.heartbeat ?? true,
    heartbeatsMissedMax: options.heartbeatsMissedMax ?? 2,
    resume: options.resume ?? true,
    reconnect: options.reconnect ?? true,
    reconnectDelayInitialMs: options.reconnectDelayInitialMs ?? 100,
    reconnectDelayMaxMs: options.reconnectDelayMaxMs ?? 5000,
    reconnectJitter: options.reconnectJitter ?? 0.5,
    reconnectAttemptsMax: options.reconnectAttemptsMax ?? Infinity,
    connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
    requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
    frameSizeMaxBytes: options.frameSizeMaxBytes ?? 4 * 1024 * 1024,
    incomingBufferMax: options.incomingBufferMax ?? 10_000,
    pendingSendsMax: options.pendingSendsMax ?? 10_000,
    WebSocket: WebSocketClass,
    onCallbackError: options.onCallbackError ?? ((error) => console.error('ruyi: a callback threw', error)),
  };
  const positive: Array<keyof Settings> = [
    'heartbeatsMissedMax',
    'reconnectDelayInitialMs',
    'reconnectDelayMaxMs',
    'reconnectAttemptsMax',
    'connectTimeoutMs',
    'requestTimeoutMs',
    'frameSizeMaxBytes',
    'incomingBufferMax',
    'pendingSendsMax',
  ];
  for (const name of positive) {
    const value = s[name] as number;
    if (typeof value !== 'number' || Number.isNaN(value) || value <= 0) {
      throw new TypeError(`${name} must be a positive number, not ${String(value)}`);
    }
  }
  if (s.reconnectDelayMaxMs < s.reconnectDelayInitialMs) {
    throw new TypeError('reconnectDelayMaxMs must be at least reconnectDelayInitialMs');
  }
  if (!(s.reconnectJitter >= 0 && s.reconnectJitter <= 1)) {
    throw new TypeError(`reconnectJitter must be between 0 and 1, not ${s.reconnectJitter}`);
  }
  return s;
}

/** A random UUID (version 4), also outside secure contexts. */
export function randomClientMsgNo(): string {
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (c && typeof c.randomUUID === 'function') {
    return c.randomUUID();
  }
  if (!c || typeof c.getRandomValues !== 'function') {
    throw new RuyiError('no crypto.getRandomValues in this runtime: pass clientMsgNo');
  }
  const b = c.getRandomValues(new Uint8Array(16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Reasons after which connecting again may work. */
function reconnectable(reason: number | null): boolean {
  return (
    reason === null ||
    reason === ReasonCode.ServerShutdown ||
    reason === ReasonCode.IdleTimeout ||
    reason === ReasonCode.SlowConsumer ||
    reason === ReasonCode.ServerBusy
  );
}

function concat(frames: Uint8Array[]): Uint8Array {
  if (frames.length === 1) return frames[0]!;
  let length = 0;
  for (const f of frames) length += f.length;
  const out = new Uint8Array(length);
  let at = 0;
  for (const f of frames) {
    out.set(f, at);
    at += f.length;
  }
  return out;
}

function bytesOf(data: unknown): Uint8Array {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data)) return concat(data.map(bytesOf));
  throw new ProtocolError('the server sent a text WebSocket message; the protocol is binary');
}

/** A bounded queue behind one `deliveries()` iterator. */
class DeliveryQueue implements AsyncIterableIterator<Delivery> {
  private readonly items: Delivery[] = [];
  private waiter: { resolve: (r: IteratorResult<Delivery>) => void; reject: (e: Error) => void } | null = null;
  private ended = false;
  private failure: Error | null = null;

  constructor(
    private readonly max: number,
    private readonly detach: () => void,
  ) {}

  push(item: Delivery): void {
    if (this.ended) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve({ value: item, done: false });
    } else if (this.items.length >= this.max) {
      this.fail(new IncomingOverflowError(this.max));
      return;
    } else {
      this.items.push(item);
    }
    if (item.kind === 'closed') this.finish();
  }

  private fail(error: Error): void {
    this.failure = error;
    this.items.length = 0;
    this.finish();
  }

  private finish(): void {
    this.ended = true;
    this.detach();
  }

  next(): Promise<IteratorResult<Delivery>> {
    const item = this.items.shift();
    if (item) return Promise.resolve({ value: item, done: false });
    if (this.failure) {
      const error = this.failure;
      this.failure = null;
      return Promise.reject(error);
    }
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  return(): Promise<IteratorResult<Delivery>> {
    this.items.length = 0;
    this.finish();
    if (this.waiter) {
      this.waiter.resolve({ value: undefined, done: true });
      this.waiter = null;
    }
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<Delivery> {
    return this;
  }
}

type Listeners = { [K in keyof ClientEvents]: Set<ClientEvents[K]> };

/** Connects and resolves once the server accepted (ConnAck Success).
 * Rejects with `ConnectRefusedError` (e.g. AuthFailed), `TimeoutError` or
 * `ConnectionClosedError`; the first connection is not retried. */
export async function connect(options: ConnectOptions): Promise<Client> {
  const client = new Client(settings(options));
  await client.start();
  return client;
}

export class Client implements AsyncIterable<Delivery> {
  private socket: WebSocketLike | null = null;
  private currentState: ClientState | 'connecting' = 'connecting';
  private info: ConnAckInfo | null = null;
  private readonly pendingSends: PendingSend[] = [];
  private readonly sendsBySeq = new Map<number, PendingSend>();
  private readonly requests = new Map<number, PendingRequest>();
  private readonly highestSeen = new Map<string, bigint>();
  private readonly listeners: Listeners = {
    message: new Set(),
    conversation: new Set(),
    recall: new Set(),
    disconnected: new Set(),
    reconnected: new Set(),
    closed: new Set(),
  };
  private readonly queues = new Set<DeliveryQueue>();
  private nextClientSeq = 1;
  private nextRequestId = 1;
  private heartbeatTimer: ReturnType<typeof setInterval> | null = null;
  private lastReceivedAt = 0;
  private serverDisconnect: { reason: number; message: string } | null = null;
  private wakeReconnect: (() => void) | null = null;
  private closeInfo: { reason: string | null; detail: string } | null = null;
  readonly stats: ClientStats = { connections: 0, reconnects: 0, duplicatesDropped: 0, resends: 0 };

  /** Use `connect()`. */
  constructor(private readonly settings: Settings) {}

  /** What the server said when it accepted the current (or last) connection. */
  get connAck(): ConnAckInfo {
    if (!this.info) throw new RuyiError('not connected yet');
    return this.info;
  }

  get uid(): string {
    return this.settings.uid;
  }

  get state(): ClientState {
    return this.currentState === 'connecting' ? 'reconnecting' : this.currentState;
  }

  /** Why the client closed, once it has. */
  get closed(): { reason: string | null; detail: string } | null {
    return this.closeInfo;
  }

  /** @internal The first connection. */
  async start(): Promise<void> {
    try {
      await this.attempt();
    } catch (error) {
      this.currentState = 'closed';
      throw error;
    }
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof ClientEvents>(event: K, callback: ClientEvents[K]): () => void {
    const set = this.listeners[event] as Set<ClientEvents[K]>;
    set.add(callback);
    return () => set.delete(callback);
  }

  /** Shorthand for `on('message', callback)`. */
  onMessage(callback: (message: Message) => void): () => void {
    return this.on('message', callback);
  }

  /** Every delivery from now on, as an async iterator that ends after the
   * `closed` delivery. Each call gives an independent iterator. */
  deliveries(): AsyncIterableIterator<Delivery> {
    const queue: DeliveryQueue = new DeliveryQueue(this.settings.incomingBufferMax, () => this.queues.delete(queue));
    if (this.closeInfo) {
      queue.push({ kind: 'closed', ...this.closeInfo });
    } else {
      this.queues.add(queue);
    }
    return queue;
  }

  [Symbol.asyncIterator](): AsyncIterator<Delivery> {
    return this.deliveries();
  }

  /** Sends a message; resolves with its SendAck once the server stored it.
   * Rejects with `SendRefusedError` when the server refused it, or
   * `ConnectionClosedError` when the client closed before the answer.
   * Across a reconnect the send is written again with the same
   * client_msg_no, and the server stores it once. */
  send(message: OutgoingMessage): Promise<SendAck> {
    if (typeof message.channelId !== 'string' || message.channelId.length === 0) {
      return Promise.reject(new TypeError('channelId must be a non-empty string'));
    }
    const flags = message.flags ?? 0;
    if (!Number.isInteger(flags) || flags < 0 || flags > 255) {
      return Promise.reject(new TypeError(`flags must be an integer from 0 to 255, not ${flags}`));
    }
    const payload = typeof message.payload === 'string' ? utf8(message.payload) : message.payload;
    if (!(payload instanceof Uint8Array)) {
      return Promise.reject(new TypeError('payload must be a string or a Uint8Array'));
    }
    if (this.currentState === 'closed') {
      return Promise.reject(new ConnectionClosedError(this.closeInfo?.reason ?? null, this.closeInfo?.detail ?? ''));
    }
    if (this.pendingSends.length >= this.settings.pendingSendsMax) {
      return Promise.reject(new PendingSendsFullError(this.settings.pendingSendsMax));
    }
    return new Promise<SendAck>((resolve, reject) => {
      const pending: PendingSend = {
        clientMsgNo: message.clientMsgNo ?? randomClientMsgNo(),
        channelId: message.channelId,
        channelType: message.channelType ?? ChannelType.Person,
        flags,
        payload,
        clientSeq: null,
        resolve,
        reject,
      };
      this.pendingSends.push(pending);
      if (this.currentState === 'open') {
        this.write([this.encodePendingSend(pending)]);
      }
    });
  }

  /** Sends `text` to the person `to`. */
  sendText(to: string, text: string): Promise<SendAck> {
    return this.send({ channelId: to, channelType: ChannelType.Person, payload: text });
  }

  /** Sends `text` to the group `group`. */
  sendGroupText(group: string, text: string): Promise<SendAck> {
    return this.send({ channelId: group, channelType: ChannelType.Group, payload: text });
  }

  /** Messages of a channel by seq range, in the direction asked for.
   * Recalled messages have `recalled` set and no payload. */
  async syncMessages(options: SyncMessagesOptions): Promise<Message[]> {
    const channelType = options.channelType ?? ChannelType.Person;
    const direction = options.direction === 'down' ? SyncDirection.Down : SyncDirection.Up;
    const startSeq = parseU64(options.startSeq ?? (direction === SyncDirection.Up ? 1 : 0), 'startSeq');
    const endSeq = parseU64(options.endSeq ?? 0, 'endSeq');
    const limit = options.limit ?? 100;
    if (!Number.isInteger(limit) || limit < 1 || limit > U32_MAX) {
      throw new TypeError(`limit must be a positive integer, not ${limit}`);
    }
    const p = await this.request('syncMessages', (id) =>
      encodeSyncMessages(id, options.channelId, channelType, startSeq, endSeq, limit, direction),
    );
    if (p.type !== 'syncMessagesResp') throw new ProtocolError(`syncMessages answered with ${p.type}`);
    return p.messages;
  }

  /** The user's conversations changed since `sinceVersion` (default "0": all),
   * oldest change first; `more` says whether to sync again from the largest
   * version returned. */
  async syncConversations(options: { sinceVersion?: string; limit?: number; unreadOnly?: boolean } = {}): Promise<{ conversations: Conversation[]; more: boolean }> {
    const since = parseU64(options.sinceVersion ?? '0', 'sinceVersion');
    const limit = options.limit ?? 100;
    if (!Number.isInteger(limit) || limit < 1 || limit > U32_MAX) {
      throw new TypeError(`limit must be a positive integer, not ${limit}`);
    }
    const p = await this.request('syncConversations', (id) => encodeSyncConversations(id, since, limit, options.unreadOnly ?? false));
    if (p.type !== 'syncConversationsResp') throw new ProtocolError(`syncConversations answered with ${p.type}`);
    return { conversations: p.conversations, more: p.more };
  }

  /** Every conversation of the user (pages through `syncConversations`). */
  async conversations(options: { unreadOnly?: boolean; pageSize?: number } = {}): Promise<Conversation[]> {
    const all = new Map<string, Conversation>();
    let since = '0';
    for (;;) {
      const page = await this.syncConversations({ sinceVersion: since, limit: options.pageSize ?? 100, unreadOnly: options.unreadOnly ?? false });
      for (const c of page.conversations) {
        const key = `${c.channelType}:${c.channelId}`;
        if (c.deleted) all.delete(key);
        else all.set(key, c);
        if (BigInt(c.version) > BigInt(since)) since = c.version;
      }
      if (!page.more || page.conversations.length === 0) break;
    }
    return [...all.values()];
  }

  /** Marks every message of the conversation read. */
  clearUnread(channelId: string, channelType: ChannelType = ChannelType.Person): Promise<Conversation | null> {
    return this.conversationOp(channelId, channelType, ConversationAction.ClearUnread, 0n);
  }

  /** Sets the unread count (the newest `unread` messages from others). */
  setUnread(channelId: string, unread: number, channelType: ChannelType = ChannelType.Person): Promise<Conversation | null> {
    return this.conversationOp(channelId, channelType, ConversationAction.SetUnread, parseU64(unread, 'unread'));
  }

  /** Hides the conversation until a newer message arrives. */
  deleteConversation(channelId: string, channelType: ChannelType = ChannelType.Person): Promise<Conversation | null> {
    return this.conversationOp(channelId, channelType, ConversationAction.Delete, 0n);
  }

  private async conversationOp(channelId: string, channelType: ChannelType, action: ConversationAction, unread: bigint): Promise<Conversation | null> {
    const p = await this.request('conversationOp', (id) => encodeConversationOp(id, channelId, channelType, action, unread));
    if (p.type !== 'conversationOpResp') throw new ProtocolError(`conversationOp answered with ${p.type}`);
    return p.conversation;
  }

  /** Recalls a message this user sent, by id or by client_msg_no. */
  async recall(options: RecallOptions): Promise<{ messageId: string; messageSeq: string }> {
    if (options.messageId === undefined && !options.clientMsgNo) {
      throw new TypeError('recall needs messageId or clientMsgNo');
    }
    const messageId = options.messageId === undefined ? 0n : parseU64(options.messageId, 'messageId');
    const channelType = options.channelType ?? ChannelType.Person;
    const p = await this.request('recall', (id) => encodeRecall(id, options.channelId, channelType, messageId, options.clientMsgNo ?? ''));
    if (p.type !== 'recallResp') throw new ProtocolError(`recall answered with ${p.type}`);
    return { messageId: p.messageId, messageSeq: p.messageSeq };
  }

  /** Acknowledges one received message (when `autoAck` is off). */
  ack(message: Pick<Message, 'messageId' | 'messageSeq'>): void {
    this.write([encodeRecvAck(parseU64(message.messageId, 'messageId'), parseU64(message.messageSeq, 'messageSeq'), '', ChannelType.Unknown, false)]);
  }

  /** Acknowledges every message of a channel received on this connection up
   * to `messageSeq` with one frame (when `autoAck` is off). */
  ackThrough(channelId: string, channelType: ChannelType, messageSeq: string): void {
    this.write([encodeRecvAck(0n, parseU64(messageSeq, 'messageSeq'), channelId, channelType, true)]);
  }

  /** Says goodbye and closes for good. Pending sends and requests reject
   * with `ConnectionClosedError`. */
  async close(): Promise<void> {
    if (this.currentState === 'closed') return;
    const socket = this.socket;
    if (socket && socket.readyState === WS_OPEN) {
      try {
        socket.send(encodeDisconnect());
      } catch {
        // The socket is going anyway.
      }
    }
    this.finish(null, 'closed by the client');
    if (socket) socket.close(1000, 'bye');
  }

  // ---- connections ----

  /** One connection attempt: resolves on ConnAck Success and makes it the
   * current connection. */
  private async attempt(): Promise<ConnAckInfo> {
    const s = this.settings;
    let token: string;
    try {
      token = typeof s.token === 'function' ? await s.token() : s.token;
    } catch (error) {
      throw new RuyiError(`the token function failed: ${(error as Error).message}`);
    }
    if (typeof token !== 'string') {
      throw new TypeError('the token function must return a string');
    }
    return new Promise<ConnAckInfo>((resolve, reject) => {
      let socket: WebSocketLike;
      try {
        socket = new s.WebSocket(s.url);
      } catch (error) {
        reject(new RuyiError(`cannot open ${s.url}: ${(error as Error).message}`));
        return;
      }
      socket.binaryType = 'arraybuffer';
      const reader = new FrameReader(s.frameSizeMaxBytes);
      let accepted = false;
      let failed = false;
      const fail = (error: Error): void => {
        if (accepted || failed) return;
        failed = true;
        clearTimeout(timer);
        socket.onmessage = ignore;
        socket.onclose = ignore;
        try {
          socket.close();
        } catch {
          // Not open yet: nothing to close.
        }
        reject(error);
      };
      const timer = setTimeout(() => fail(new TimeoutError('connect', s.connectTimeoutMs)), s.connectTimeoutMs);
      socket.onopen = () => {
        socket.send(
          encodeConnect({
            uid: s.uid,
            token,
            deviceId: s.deviceId,
            deviceFlag: s.deviceFlag,
            resume: s.resume,
            clientTimestampMs: Date.now(),
          }),
        );
      };
      socket.onerror = () => {
        // A close event follows every error.
      };
      socket.onclose = (event) => {
        if (!accepted) {
          fail(new ConnectionClosedError(null, `closed before ConnAck (WebSocket close code ${event.code})`));
        } else {
          this.socketClosed(socket);
        }
      };
      socket.onmessage = (event) => {
        if (this.socket !== socket && accepted) return;
        let packets: ServerPacket[];
        try {
          packets = reader.push(bytesOf(event.data));
        } catch (error) {
          if (!accepted) fail(error as Error);
          else this.protocolFailure(socket, error as Error);
          return;
        }
        this.lastReceivedAt = Date.now();
        if (!accepted) {
          const first = packets.shift();
          if (!first) return;
          if (first.type === 'connAck' && first.reason === ReasonCode.Success && this.currentState === 'closed') {
            // close() was called while this reconnect was under way.
            fail(new ConnectionClosedError(this.closeInfo?.reason ?? null, this.closeInfo?.detail ?? ''));
            return;
          } else if (first.type === 'connAck' && first.reason === ReasonCode.Success) {
            accepted = true;
            clearTimeout(timer);
            this.adopt(socket, first.info);
            resolve(first.info);
          } else if (first.type === 'connAck' || first.type === 'disconnect') {
            fail(new ConnectRefusedError(reasonName(first.reason), first.reason));
            return;
          } else {
            fail(new ProtocolError(`the server sent ${first.type} before ConnAck`));
            return;
          }
        }
        this.take(socket, packets);
        if (this.socket === socket && this.flushAfterAdopt) {
          this.flushAfterAdopt = false;
          this.flushQueued();
        }
      };
    });
  }

  /** Set by `adopt`: write the resent sends and queued requests after the
   * packets that came with ConnAck were taken. */
  private flushAfterAdopt = false;

  private adopt(socket: WebSocketLike, info: ConnAckInfo): void {
    const reconnect = this.stats.connections > 0;
    this.socket = socket;
    this.info = info;
    this.currentState = 'open';
    this.stats.connections += 1;
    this.flushAfterAdopt = true;
    this.startHeartbeat(socket, info.heartbeatIntervalMs);
    if (reconnect) {
      this.stats.reconnects += 1;
      this.emit('reconnected', info);
    }
  }

  /** Writes every unwritten send (in the order they were made) and every
   * waiting request on the new connection, as one WebSocket message. */
  private flushQueued(): void {
    const frames: Uint8Array[] = [];
    for (const pending of this.pendingSends) {
      if (pending.clientSeq === null) {
        if (this.stats.connections > 1) this.stats.resends += 1;
        frames.push(this.encodePendingSend(pending));
      }
    }
    for (const request of this.requests.values()) {
      if (!request.written) {
        request.written = true;
        frames.push(request.frame);
      }
    }
    if (frames.length > 0) this.write(frames);
  }

  private encodePendingSend(pending: PendingSend): Uint8Array {
    const clientSeq = this.nextClientSeq;
    this.nextClientSeq = this.nextClientSeq >= U32_MAX ? 1 : this.nextClientSeq + 1;
    pending.clientSeq = clientSeq;
    this.sendsBySeq.set(clientSeq, pending);
    return encodeSend({ ...pending, clientSeq });
  }

  private write(frames: Uint8Array[]): void {
    const socket = this.socket;
    if (!socket || socket.readyState !== WS_OPEN || frames.length === 0) return;
    try {
      socket.send(concat(frames));
    } catch {
      // The close event follows and the connection is replaced.
    }
  }

  private startHeartbeat(socket: WebSocketLike, intervalMs: number): void {
    this.stopHeartbeat();
    if (!this.settings.heartbeat || intervalMs <= 0) return;
    const deadAfterMs = intervalMs * this.settings.heartbeatsMissedMax;
    this.heartbeatTimer = setInterval(() => {
      if (this.socket !== socket) return;
      if (Date.now() - this.lastReceivedAt > deadAfterMs) {
        // A half-open connection can take minutes to report its close.
        try {
          socket.close(4000, 'no answer to heartbeats');
        } catch {
          // Closing anyway.
        }
        this.socketClosed(socket);
        return;
      }
      this.write([encodePing()]);
    }, intervalMs);
  }

  private stopHeartbeat(): void {
    if (this.heartbeatTimer !== null) {
      clearInterval(this.heartbeatTimer);
      this.heartbeatTimer = null;
    }
  }

  private protocolFailure(socket: WebSocketLike, error: Error): void {
    this.settings.onCallbackError(error);
    try {
      socket.close(1002, 'protocol error');
    } catch {
      // Closing anyway.
    }
    this.socketClosed(socket);
  }

  /** Hands every packet of one WebSocket message to its waiter or the app,
   * then writes one cumulative ack per channel. */
  private take(socket: WebSocketLike, packets: ServerPacket[]): void {
    const toAck = new Map<string, { channelId: string; channelType: ChannelType; seq: bigint }>();
    for (const p of packets) {
      if (this.socket !== socket) return;
      switch (p.type) {
        case 'sendAck': {
          const pending = this.sendsBySeq.get(p.clientSeq);
          if (!pending) break;
          this.sendsBySeq.delete(p.clientSeq);
          const at = this.pendingSends.indexOf(pending);
          if (at >= 0) this.pendingSends.splice(at, 1);
          if (p.reason === ReasonCode.Success) pending.resolve(p.ack);
          else pending.reject(new SendRefusedError(reasonName(p.reason), p.reason, pending.clientMsgNo));
          break;
        }
        case 'recv': {
          const m = p.message;
          const key = `${m.channelType}:${m.channelId}`;
          const seq = BigInt(m.messageSeq);
          const seen = this.highestSeen.get(key) ?? 0n;
          // Pushes of a channel arrive in seq order, also across a resume:
          // a seq at or below one handed over is a redelivery the app has.
          const duplicate = this.settings.autoAck && seq <= seen;
          if (duplicate) {
            this.stats.duplicatesDropped += 1;
          } else {
            if (seq > seen) this.highestSeen.set(key, seq);
            this.emit('message', m);
            this.deliver({ kind: 'message', message: m });
          }
          if (this.settings.autoAck) {
            const top = toAck.get(key);
            if (!top || top.seq < seq) toAck.set(key, { channelId: m.channelId, channelType: m.channelType, seq });
          }
          break;
        }
        case 'disconnect':
          // The server closes the socket next; the reason decides whether
          // to come back.
          this.serverDisconnect = { reason: p.reason, message: p.message };
          try {
            socket.close(1000, 'server said goodbye');
          } catch {
            // Closing anyway.
          }
          this.socketClosed(socket);
          return;
        case 'syncMessagesResp':
        case 'syncConversationsResp':
        case 'conversationOpResp':
        case 'recallResp': {
          const request = this.requests.get(p.requestId);
          if (request) request.settle(p);
          break;
        }
        case 'conversationUpdate':
          this.emit('conversation', p.conversation);
          this.deliver({ kind: 'conversation', conversation: p.conversation });
          break;
        case 'recallEvent':
          this.emit('recall', p.recall);
          this.deliver({ kind: 'recall', recall: p.recall });
          break;
        case 'pong':
          break;
        case 'connAck':
          this.protocolFailure(socket, new ProtocolError('a second ConnAck'));
          return;
      }
    }
    const frames: Uint8Array[] = [];
    for (const a of toAck.values()) frames.push(encodeRecvAck(0n, a.seq, a.channelId, a.channelType, true));
    this.write(frames);
  }

  /** The current connection ended (closed, failed, or taken for dead). */
  private socketClosed(socket: WebSocketLike): void {
    if (this.socket !== socket) return;
    this.socket = null;
    this.stopHeartbeat();
    socket.onmessage = ignore;
    socket.onclose = ignore;
    const said = this.serverDisconnect;
    this.serverDisconnect = null;
    const reason = said ? reasonName(said.reason) : null;
    // Written requests are lost with the connection; callers retry. Sends
    // are kept and written again after a reconnect.
    for (const [id, request] of this.requests) {
      if (request.written) {
        this.requests.delete(id);
        clearTimeout(request.timer);
        request.reject(new ConnectionClosedError(reason, `the connection dropped before ${request.name} was answered`));
      }
    }
    this.sendsBySeq.clear();
    for (const pending of this.pendingSends) pending.clientSeq = null;
    if (this.currentState === 'closed') return;
    if (!this.settings.reconnect || !reconnectable(said ? said.reason : null)) {
      this.finish(reason, said?.message ?? 'the connection dropped');
      return;
    }
    this.currentState = 'reconnecting';
    this.emit('disconnected', { reason });
    void this.reconnectLoop();
  }

  private async reconnectLoop(): Promise<void> {
    const s = this.settings;
    let delay = s.reconnectDelayInitialMs;
    let failures = 0;
    while (this.currentState === 'reconnecting') {
      const wait = delay * (1 - s.reconnectJitter * Math.random());
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, wait);
        this.wakeReconnect = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wakeReconnect = null;
      if (this.currentState !== 'reconnecting') return;
      try {
        await this.attempt();
        return;
      } catch (error) {
        if (this.currentState !== 'reconnecting') return;
        if (error instanceof ConnectRefusedError && error.code !== ReasonCode.ServerBusy) {
          this.finish(error.reason, 'the server refused the reconnect');
          return;
        }
        failures += 1;
        if (failures >= s.reconnectAttemptsMax) {
          this.finish(null, `gave up after ${failures} reconnect attempts: ${(error as Error).message}`);
          return;
        }
        delay = Math.min(delay * 2, s.reconnectDelayMaxMs);
      }
    }
  }

  /** Closed for good: everything waiting fails. */
  private finish(reason: string | null, detail: string): void {
    if (this.currentState === 'closed') return;
    this.currentState = 'closed';
    this.stopHeartbeat();
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onmessage = ignore;
      socket.onclose = ignore;
    }
    this.wakeReconnect?.();
    const error = new ConnectionClosedError(reason, detail);
    for (const pending of this.pendingSends.splice(0)) pending.reject(error);
    this.sendsBySeq.clear();
    for (const request of this.requests.values()) {
      clearTimeout(request.timer);
      request.reject(error);
    }
    this.requests.clear();
    this.closeInfo = { reason, detail };
    this.emit('closed', this.closeInfo);
    this.deliver({ kind: 'closed', reason, detail });
  }

  private request(name: string, encode: (requestId: number) => Uint8Array): Promise<ServerPacket> {
    if (this.currentState === 'closed') {
      return Promise.reject(new ConnectionClosedError(this.closeInfo?.reason ?? null, this.closeInfo?.detail ?? ''));
    }
    const requestId = this.nextRequestId;
    this.nextRequestId = this.nextRequestId >= U32_MAX ? 1 : this.nextRequestId + 1;
    const frame = encode(requestId);
    return new Promise<ServerPacket>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.requests.delete(requestId);
        reject(new TimeoutError(name, this.settings.requestTimeoutMs));
      }, this.settings.requestTimeoutMs);
      const request: PendingRequest = {
        name,
        requestId,
        frame,
        written: false,
        timer,
        settle: (packet) => {
          this.requests.delete(requestId);
          clearTimeout(timer);
          const reason = 'reason' in packet ? packet.reason : ReasonCode.Success;
          if (reason !== ReasonCode.Success) reject(new RequestFailedError(name, reasonName(reason), reason));
          else resolve(packet);
        },
        reject,
      };
      this.requests.set(requestId, request);
      if (this.currentState === 'open' && this.socket) {
        request.written = true;
        this.write([frame]);
      }
    });
  }

  private emit<K extends keyof ClientEvents>(event: K, ...args: Parameters<ClientEvents[K]>): void {
    for (const callback of this.listeners[event]) {
      try {
        (callback as (...a: Parameters<ClientEvents[K]>) => void)(...args);
      } catch (error) {
        this.settings.onCallbackError(error);
      }
    }
  }

  private deliver(delivery: Delivery): void {
    for (const queue of [...this.queues]) queue.push(delivery);
  }
}
