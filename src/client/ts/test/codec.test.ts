// The wire format on its own, without a gateway: frames split across
// WebSocket messages, hostile length prefixes, 64-bit ids as strings.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as flatbuffers from 'flatbuffers';
import { FrameReader, encodePing, encodeSend, parseU64, reasonName } from '../src/codec.js';
import { ChannelType, ProtocolError, ReasonCode, randomClientMsgNo } from '../src/index.js';
import { Frame, Packet, Recv, SendAck } from '../src/generated/ruyi/wire.js';

/** A server frame as the gateway encodes it: a FlatBuffer finished without
 * a size prefix, then the 4-byte little-endian length in front. */
function serverFrame(build: (b: flatbuffers.Builder) => [Packet, flatbuffers.Offset]): Uint8Array {
  const b = new flatbuffers.Builder(64);
  const [type, packet] = build(b);
  b.finish(Frame.createFrame(b, type, packet));
  const body = b.asUint8Array();
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length, true);
  out.set(body, 4);
  return out;
}

function recvFrame(seq: bigint, text: string): Uint8Array {
  return serverFrame((b) => {
    const msgNo = b.createString(`no-${seq}`);
    const from = b.createString('alice');
    const channel = b.createString('alice');
    const payload = Recv.createPayloadVector(b, new TextEncoder().encode(text));
    // A message id above 2^53: a JavaScript number would round it.
    return [Packet.Recv, Recv.createRecv(b, 18_446_744_073_709_551_615n, seq, msgNo, from, channel, ChannelType.Person, 1_700_000_000_000n, 0b101, 9, payload)];
  });
}

test('frames split across messages at every byte, and several in one message, decode in order', () => {
  const stream = new Uint8Array([...recvFrame(1n, 'one'), ...recvFrame(2n, 'two'), ...recvFrame(3n, 'three')]);
  for (let cut = 1; cut < stream.length; cut++) {
    const reader = new FrameReader(1024);
    const packets = [...reader.push(stream.subarray(0, cut)), ...reader.push(stream.subarray(cut))];
    assert.deepEqual(
      packets.map((p) => (p.type === 'recv' ? p.message.text : p.type)),
      ['one', 'two', 'three'],
      `cut at ${cut}`,
    );
  }
  const reader = new FrameReader(1024);
  const one = [...stream].map((byte) => reader.push(new Uint8Array([byte]))).flat();
  assert.equal(one.length, 3, 'one byte per message');
});

test('a Recv decodes with its 64-bit ids as exact decimal strings and its flags spelled out', () => {
  const [packet] = new FrameReader(1024).push(recvFrame(7n, 'hi'));
  assert.equal(packet?.type, 'recv');
  if (packet?.type !== 'recv') return;
  assert.equal(packet.message.messageId, '18446744073709551615');
  assert.equal(packet.message.messageSeq, '7');
  assert.equal(packet.message.redelivered, true);
  assert.equal(packet.message.fromSelf, false);
  assert.equal(packet.message.recalled, true);
  assert.equal(packet.message.sendFlags, 9);
  assert.equal(packet.message.timestampMs, 1_700_000_000_000);
});

test('a length prefix above frameSizeMaxBytes, or of zero, is a ProtocolError before anything is buffered', () => {
  const big = new Uint8Array(4);
  new DataView(big.buffer).setUint32(0, 1025, true);
  assert.throws(() => new FrameReader(1024).push(big), ProtocolError);
  assert.throws(() => new FrameReader(1024).push(new Uint8Array(4)), ProtocolError);
});

test('garbage inside a well-sized frame is a ProtocolError, not a crash', () => {
  const garbage = new Uint8Array(4 + 16).fill(0xff);
  new DataView(garbage.buffer).setUint32(0, 16, true);
  assert.throws(() => new FrameReader(1024).push(garbage), ProtocolError);
});

test('a packet only clients send is a ProtocolError', () => {
  assert.throws(() => new FrameReader(1024).push(encodePing()), /only clients send/);
});

test('a SendAck decodes, and a Send is a gateway frame with 8-byte alignment from its first byte', () => {
  const [ack] = new FrameReader(1024).push(
    serverFrame((b) => {
      const msgNo = b.createString('abc');
      return [Packet.SendAck, SendAck.createSendAck(b, 42, msgNo, 12_345_678_901_234_567_890n, 3n, ReasonCode.Success)];
    }),
  );
  assert.deepEqual(ack, { type: 'sendAck', clientSeq: 42, reason: ReasonCode.Success, ack: { clientMsgNo: 'abc', messageId: '12345678901234567890', messageSeq: '3' } });

  const frame = encodeSend({ clientSeq: 1, clientMsgNo: 'x', channelId: 'bob', channelType: ChannelType.Person, flags: 0, payload: new Uint8Array([1]) });
  const length = new DataView(frame.buffer, frame.byteOffset).getUint32(0, true);
  assert.equal(length, frame.length - 4);
  // The FlatBuffer's size is a multiple of its largest alignment, so its
  // fields are aligned from its first byte, where the gateway verifies them.
  assert.equal(length % 4, 0);
});

test('ids parse from decimal strings within 64 bits, and nothing else', () => {
  assert.equal(parseU64('18446744073709551615', 'id'), 18_446_744_073_709_551_615n);
  assert.equal(parseU64(12, 'id'), 12n);
  assert.throws(() => parseU64('18446744073709551616', 'id'), /outside the unsigned 64-bit range/);
  assert.throws(() => parseU64('1e3', 'id'), /decimal string/);
  assert.throws(() => parseU64(2 ** 60, 'id'), /unsigned 64-bit integer/);
  assert.throws(() => parseU64(-1n, 'id'), /outside/);
});

test('reason names, also for a code newer than the SDK', () => {
  assert.equal(reasonName(ReasonCode.AuthFailed), 'AuthFailed');
  assert.equal(reasonName(999), 'Unknown(999)');
});

test('client_msg_no defaults are random version 4 UUIDs', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 100; i++) {
    const id = randomClientMsgNo();
    assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    seen.add(id);
  }
  assert.equal(seen.size, 100);
});
