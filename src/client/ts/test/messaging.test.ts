// Connect, send and receive through a real gateway: between Node clients,
// and between a Node client and the Rust SDK (the `ruyi client` CLI over
// TCP).

import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import WebSocket from 'ws';
import { ChannelType, ConnectRefusedError, ConnectionClosedError, IncomingOverflowError, SendRefusedError, connect } from '../src/index.js';
import { ClientPool, Proxy, drain, env, ruyiClient, rustListener, sleep, takeMessages, token, uniqueUid, until } from './helpers.js';

const pool = new ClientPool();
const open = pool.open.bind(pool);
after(() => pool.closeAll());

test('connect resolves on ConnAck with the session id as a string and the heartbeat interval', async () => {
  const client = await open(uniqueUid('alice'));
  assert.equal(client.state, 'open');
  assert.match(client.connAck.sessionId, /^[0-9]+$/);
  assert.ok(client.connAck.heartbeatIntervalMs > 0);
  assert.ok(Math.abs(client.connAck.serverTimeMs - Date.now()) < 60_000);
});

test('send resolves with the SendAck: 64-bit ids as decimal strings and seqs 1, 2, 3 in the channel', async () => {
  const alice = await open(uniqueUid('alice'));
  const bob = uniqueUid('bob');
  const acks = await Promise.all([alice.sendText(bob, 'one'), alice.sendText(bob, 'two'), alice.sendText(bob, 'three')]);
  assert.deepEqual(
    acks.map((a) => a.messageSeq),
    ['1', '2', '3'],
  );
  for (const ack of acks) {
    assert.match(ack.messageId, /^[1-9][0-9]*$/);
    assert.match(ack.clientMsgNo, /^[0-9a-f-]{36}$/, 'client_msg_no defaults to a random UUID');
  }
  assert.equal(new Set(acks.map((a) => a.messageId)).size, 3);
});

test('messages from one Node client reach another in order, once each, with their ids', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  const bob = await open(bobUid);
  const inbox = bob.deliveries();
  const texts = Array.from({ length: 50 }, (_, i) => `message ${i}`);
  const acks = await Promise.all(texts.map((t) => alice.sendText(bobUid, t)));
  const got = await takeMessages(inbox, texts.length);
  assert.deepEqual(
    got.map((m) => m.text),
    texts,
  );
  assert.deepEqual(
    got.map((m) => m.messageId),
    acks.map((a) => a.messageId),
  );
  for (const [i, m] of got.entries()) {
    assert.equal(m.messageSeq, String(i + 1));
    assert.equal(m.fromUid, aliceUid);
    assert.equal(m.channelId, aliceUid, 'a person channel is named by the other person');
    assert.equal(m.channelType, ChannelType.Person);
    assert.equal(m.redelivered, false);
  }
  assert.deepEqual(await drain(inbox, 300), [], 'nothing arrives twice');
});

test('the callback and the iterator see the same messages', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  const bob = await open(bobUid);
  const seen: string[] = [];
  const unsubscribe = bob.onMessage((m) => seen.push(m.text));
  const inbox = bob.deliveries();
  await alice.sendText(bobUid, 'hi');
  await alice.send({ channelId: bobUid, payload: new Uint8Array([0, 1, 2, 255]), flags: 7 });
  const got = await takeMessages(inbox, 2);
  assert.deepEqual(seen, ['hi', got[1]!.text]);
  assert.deepEqual([...got[1]!.payload], [0, 1, 2, 255]);
  assert.equal(got[1]!.sendFlags, 7);
  unsubscribe();
});

test('a Node client and a Rust client talk through one gateway, in order both ways', async () => {
  const nodeUid = uniqueUid('node');
  const rustUid = uniqueUid('rust');
  const node = await open(nodeUid);
  const inbox = node.deliveries();

  // Node -> Rust: the Rust SDK (over TCP) prints each message as a JSON line.
  const listener = await rustListener(rustUid, ['--count', '5', '--timeout', '20', '--no-resume']);
  const texts = ['n0', 'n1', 'n2', 'n3', 'n4'];
  const acks = await Promise.all(texts.map((t) => node.sendText(rustUid, t)));
  const run = await listener.done;
  assert.equal(run.code, 0, run.stderr);
  assert.deepEqual(
    run.lines.map((l) => l['text']),
    texts,
  );
  assert.deepEqual(
    run.lines.map((l) => l['message_id']),
    acks.map((a) => a.messageId),
    'the ids the Rust client sees are the ones the Node client was given',
  );
  assert.deepEqual(
    run.lines.map((l) => l['from_uid']),
    texts.map(() => nodeUid),
  );

  // Rust -> Node.
  const sent: string[] = [];
  for (const text of ['r0', 'r1', 'r2']) {
    const send = await ruyiClient(rustUid, ['send', '--to', nodeUid, '--text', text]);
    assert.equal(send.code, 0, send.stderr);
    sent.push(send.lines[0]!['message_id'] as string);
  }
  const got = await takeMessages(inbox, 3);
  assert.deepEqual(
    got.map((m) => m.text),
    ['r0', 'r1', 'r2'],
  );
  assert.deepEqual(
    got.map((m) => m.messageId),
    sent,
  );
  assert.deepEqual(
    got.map((m) => m.messageSeq),
    ['6', '7', '8'],
    'one channel, one sequence, whichever SDK sent',
  );
});

test('a send the server refuses rejects with SendRefusedError naming the reason', async () => {
  const uid = uniqueUid('self');
  const client = await open(uid);
  await assert.rejects(client.sendText(uid, 'to myself'), (error: unknown) => {
    assert.ok(error instanceof SendRefusedError);
    assert.equal(error.reason, 'InvalidChannel');
    return true;
  });
  // The connection stays usable.
  const ack = await client.sendText(uniqueUid('other'), 'still here');
  assert.equal(ack.messageSeq, '1');
});

test('bad arguments fail at once with TypeErrors that say what is wrong', async () => {
  const client = await open(uniqueUid('careful'));
  await assert.rejects(client.send({ channelId: '', payload: 'x' }), /channelId must be a non-empty string/);
  await assert.rejects(client.send({ channelId: 'bob', payload: 'x', flags: 256 }), /flags must be an integer from 0 to 255/);
  await assert.rejects(client.syncMessages({ channelId: 'bob', startSeq: '-1' }), /startSeq must be an unsigned 64-bit integer/);
  await assert.rejects(client.syncMessages({ channelId: 'bob', startSeq: '18446744073709551616' }), /outside the unsigned 64-bit range/);
  await assert.rejects(client.recall({ channelId: 'bob' }), /recall needs messageId or clientMsgNo/);
  await assert.rejects(connect({ url: 'http://example.invalid/', uid: 'x', token: '', WebSocket }), /url must be a ws:\/\/ or wss:\/\/ URL/);
  await assert.rejects(connect({ url: env.wsUrl, uid: '', token: '', WebSocket }), /uid must be a non-empty string/);
  await assert.rejects(connect({ url: env.wsUrl, uid: 'x', token: token('x'), WebSocket, reconnectJitter: 2 }), /reconnectJitter must be between 0 and 1/);
});

test('a token for another uid is refused with AuthFailed', async () => {
  await assert.rejects(connect({ url: env.wsUrl, uid: uniqueUid('mallory'), token: token('alice'), WebSocket }), (error: unknown) => {
    assert.ok(error instanceof ConnectRefusedError);
    assert.equal(error.reason, 'AuthFailed');
    return true;
  });
});

test('an iterator nobody reads ends with IncomingOverflowError past incomingBufferMax; callbacks go on', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  const bob = await open(bobUid, { incomingBufferMax: 3 });
  const unread = bob.deliveries();
  const seen: string[] = [];
  bob.onMessage((m) => seen.push(m.text));
  for (const text of ['1', '2', '3', '4', '5']) await alice.sendText(bobUid, text);
  await until('the callback saw all five', () => seen.length === 5);
  await assert.rejects(unread.next(), IncomingOverflowError);
  assert.deepEqual(await unread.next(), { value: undefined, done: true });
  assert.equal(bob.state, 'open');
});

test('close() while reconnecting stops for good: pending sends reject and no reconnect follows', async () => {
  const proxy = await Proxy.start();
  try {
    const client = await open(uniqueUid('leaving'), { url: proxy.url, reconnectDelayInitialMs: 50 });
    const closedEvents: Array<string | null> = [];
    client.on('closed', (info) => closedEvents.push(info.reason));
    const disconnected = new Promise<void>((resolve) => client.on('disconnected', () => resolve()));
    proxy.cutAll();
    await disconnected;
    assert.equal(client.state, 'reconnecting');
    const pending = client.sendText(uniqueUid('peer'), 'queued while reconnecting');
    await client.close();
    await assert.rejects(pending, ConnectionClosedError);
    const connections = proxy.connections;
    await sleep(500);
    assert.equal(client.state, 'closed');
    assert.equal(proxy.connections, connections, 'no reconnect after close()');
    assert.deepEqual(closedEvents, [null]);
  } finally {
    await proxy.stop();
  }
});
