// ruyi's TypeScript SDK: a client for the gateway's WebSocket listener.
//
//   import { connect } from '@ruyi/client';
//   const client = await connect({ url: 'ws://127.0.0.1:5200/', uid: 'alice', token });
//   client.onMessage((m) => console.log(m.fromUid, m.text));
//   const ack = await client.sendText('bob', 'hello');   // resolves once stored
//   console.log(ack.messageId);                           // 64-bit ids are strings

export {
  connect,
  Client,
  randomClientMsgNo,
  type ClientEvents,
  type ClientState,
  type ClientStats,
  type ConnectOptions,
  type Delivery,
  type OutgoingMessage,
  type RecallOptions,
  type SyncMessagesOptions,
  type WebSocketConstructor,
  type WebSocketLike,
} from './client.js';
export {
  PROTOCOL_VERSION,
  RECV_FLAG_FROM_SELF,
  RECV_FLAG_RECALLED,
  RECV_FLAG_REDELIVERED,
  reasonName,
  type ConnAckInfo,
  type Conversation,
  type Message,
  type RecallEvent,
  type SendAck,
} from './codec.js';
export {
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
export { ChannelType, DeviceFlag, ReasonCode } from './generated/ruyi/wire.js';
