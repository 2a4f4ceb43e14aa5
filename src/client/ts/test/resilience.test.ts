// What the client does when the network misbehaves, through a TCP proxy
// that loses bytes and cuts connections: dedup of redeliveries, reconnect
// with resume, resend under the same client_msg_no (stored once),
// heartbeats, and no reconnect after Kicked or AuthFailed. The gateway here
// asks for a Ping every 300 ms and drops a connection idle for 1.5 s.

import assert from 'node:assert/strict';
import { after, afterEach, before, test } from 'node:test';
import { ConnectRefusedError, ConnectionClosedError, PendingSendsFullError } from '../src/index.js';
import { ClientPool, Proxy, adminPost, connectAs, drain, env, sleep, takeMessages, token, uniqueUid, until } from './helpers.js';

let proxy: Proxy;
const pool = new ClientPool();
const open = pool.open.bind(pool);
before(async () => {
  proxy = await Proxy.start();
});
// Each test's clients close when it ends: a client left behind would
// reconnect through the proxy and be counted by a later test.
afterEach(() => pool.closeAll());
after(async () => {
  await proxy.stop();
});

test('a redelivery after a lost ack is dropped by the dedup: the app sees each message once', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  const bob = await open(bobUid, { url: proxy.url, heartbeat: false });
  const inbox = bob.deliveries();

  // Bob receives m1, but his ack never reaches the gateway.
  proxy.dropUpstream = true;
  await alice.sendText(bobUid, 'm1');
  const [m1] = await takeMessages(inbox, 1);
  assert.equal(m1!.text, 'm1');
  await sleep(100);
  proxy.cutAll();
  proxy.dropUpstream = false;

  // On the new connection the gateway resumes: it pushes m1 again
  // (redelivered), and the client drops it.
  await until('bob reconnected', () => bob.stats.reconnects === 1);
  await until('the redelivery of m1 was dropped', () => bob.stats.duplicatesDropped === 1);
  await alice.sendText(bobUid, 'm2');
  const [m2] = await takeMessages(inbox, 1);
  assert.equal(m2!.text, 'm2');
  assert.equal(m2!.messageSeq, '2');
  assert.deepEqual(await drain(inbox, 300), [], 'm1 is not handed over twice');

  // The redelivery was acknowledged: a new device session with resume gets nothing more.
  await bob.close();
  const again = await open(bobUid, { heartbeat: false, deviceId: 'node' });
  const resumed = await drain(again.deliveries(), 500);
  assert.deepEqual(resumed, [], 'everything was acknowledged');
});

test('with autoAck off the app sees redeliveries and acks by itself', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  const bob = await open(bobUid, { url: proxy.url, autoAck: false, heartbeat: false });
  const inbox = bob.deliveries();
  await alice.sendText(bobUid, 'needs an ack');
  const [first] = await takeMessages(inbox, 1);
  assert.equal(first!.redelivered, false);
  proxy.cutAll();
  await until('bob reconnected', () => bob.stats.reconnects === 1);
  const [again] = await takeMessages(inbox, 1);
  assert.equal(again!.messageId, first!.messageId);
  assert.equal(again!.redelivered, true, 'not acknowledged, so pushed again on resume');
  bob.ackThrough(again!.channelId, again!.channelType, again!.messageSeq);
  await sleep(200);
  proxy.cutAll();
  await until('bob reconnected again', () => bob.stats.reconnects === 2);
  assert.deepEqual(await drain(inbox, 500), [], 'acknowledged: not pushed again');
});

test('a send whose SendAck was lost is resent after the reconnect under the same client_msg_no and stored once', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid, { url: proxy.url, heartbeat: false });
  const bob = await open(bobUid);
  const inbox = bob.deliveries();

  proxy.dropDownstream = true;
  const clientMsgNo = `resend-${process.pid}-${Date.now()}`;
  const acked = alice.send({ channelId: bobUid, payload: 'exactly once', clientMsgNo });
  // The gateway stored it (Bob has it), but Alice never heard.
  const [delivered] = await takeMessages(inbox, 1);
  assert.equal(delivered!.clientMsgNo, clientMsgNo);
  proxy.cutAll();
  proxy.dropDownstream = false;

  const ack = await acked;
  assert.equal(alice.stats.reconnects, 1);
  assert.equal(alice.stats.resends, 1);
  assert.equal(ack.clientMsgNo, clientMsgNo);
  assert.equal(ack.messageId, delivered!.messageId, 'the resend is answered with the original message');
  assert.equal(ack.messageSeq, '1');

  const history = await bob.syncMessages({ channelId: aliceUid, limit: 10 });
  assert.deepEqual(
    history.map((m) => m.clientMsgNo),
    [clientMsgNo],
    'stored once',
  );
  assert.deepEqual(await drain(inbox, 300), [], 'delivered once');
});

test('sends made while reconnecting are written once the new connection is up', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid, { url: proxy.url, heartbeat: false, reconnectDelayInitialMs: 300 });
  const bob = await open(bobUid);
  const inbox = bob.deliveries();
  const disconnected = new Promise<void>((resolve) => alice.on('disconnected', () => resolve()));
  proxy.cutAll();
  await disconnected;
  assert.equal(alice.state, 'reconnecting');
  const acks = await Promise.all(['a', 'b', 'c'].map((t) => alice.sendText(bobUid, t)));
  assert.deepEqual(
    acks.map((a) => a.messageSeq),
    ['1', '2', '3'],
  );
  const got = await takeMessages(inbox, 3);
  assert.deepEqual(
    got.map((m) => m.text),
    ['a', 'b', 'c'],
  );
});

test('sends beyond pendingSendsMax while the connection is down reject with PendingSendsFullError', async () => {
  const client = await open(uniqueUid('busy'), { url: proxy.url, heartbeat: false, pendingSendsMax: 2, reconnectDelayInitialMs: 300 });
  const disconnected = new Promise<void>((resolve) => client.on('disconnected', () => resolve()));
  proxy.cutAll();
  await disconnected;
  const peer = uniqueUid('peer');
  const queued = [client.sendText(peer, 'one'), client.sendText(peer, 'two')];
  await assert.rejects(client.sendText(peer, 'three'), PendingSendsFullError);
  const acks = await Promise.all(queued);
  assert.deepEqual(
    acks.map((a) => a.messageSeq),
    ['1', '2'],
  );
});

test('heartbeats keep an idle connection open past the gateway idle timeout', async () => {
  // Three intervals of silence before the client gives up on the
  // connection: slack for a loaded test machine; the gateway's idle timeout
  // is five.
  const client = await open(uniqueUid('idle'), { heartbeatsMissedMax: 3 });
  const drops: Array<string | null> = [];
  client.on('disconnected', (info) => drops.push(info.reason));
  assert.equal(client.connAck.heartbeatIntervalMs, 300);
  await sleep(3500);
  assert.equal(client.state, 'open');
  assert.deepEqual(drops, [], 'never dropped');
  assert.equal(client.stats.connections, 1);
  await client.sendText(uniqueUid('peer'), 'still connected');
});

test('a connection whose answers stopped is taken for dead after missed heartbeats and replaced', async () => {
  const client = await open(uniqueUid('silent'), { url: proxy.url });
  const disconnected = new Promise<void>((resolve) => client.on('disconnected', () => resolve()));
  proxy.dropDownstream = true;
  const started = Date.now();
  await disconnected;
  proxy.dropDownstream = false;
  assert.ok(Date.now() - started < 3000, 'noticed within a few heartbeat intervals');
  await until('reconnected', () => client.stats.reconnects === 1);
  assert.equal(client.state, 'open');
});

test('a client kicked by the admin API closes with Kicked and does not reconnect', async () => {
  const uid = uniqueUid('kicked');
  const before = proxy.connections;
  const client = await open(uid, { url: proxy.url });
  const closed = new Promise<{ reason: string | null }>((resolve) => client.on('closed', resolve));
  const answer = (await adminPost('/user/device_quit', { uid, device_flag: -1 })) as { data: { kicked: number } };
  assert.equal(answer.data.kicked, 1);
  const info = await closed;
  assert.equal(info.reason, 'Kicked');
  assert.equal(client.state, 'closed');
  await sleep(1000);
  assert.equal(proxy.connections - before, 1, 'no reconnect attempt');
  await assert.rejects(client.sendText('anyone', 'after the kick'), (error: unknown) => {
    assert.ok(error instanceof ConnectionClosedError);
    assert.equal(error.reason, 'Kicked');
    return true;
  });
});

test('a refused connection (AuthFailed) rejects with ConnectRefusedError and is not retried', async () => {
  const uid = uniqueUid('wrong-secret');
  const before = proxy.connections;
  await assert.rejects(connectAs(uid, { url: proxy.url, token: token(uid, 'not-the-secret') }), (error: unknown) => {
    assert.ok(error instanceof ConnectRefusedError);
    assert.equal(error.reason, 'AuthFailed');
    return true;
  });
  await sleep(800);
  assert.equal(proxy.connections - before, 1, 'one attempt only');
});

test('a reconnect refused with AuthFailed (the token function gave an expired token) closes the client for good', async () => {
  const uid = uniqueUid('expiring');
  const before = proxy.connections;
  // The first connection gets a good token; every later one an expired one.
  let calls = 0;
  const tokens = (): string => (++calls === 1 ? token(uid) : token(uid, env.secret, -3600));
  const client = await open(uid, { url: proxy.url, token: tokens, heartbeat: false });
  const closed = new Promise<{ reason: string | null }>((resolve) => client.on('closed', resolve));
  proxy.cutAll();
  const info = await closed;
  assert.equal(info.reason, 'AuthFailed');
  assert.equal(calls, 2);
  await sleep(800);
  assert.equal(proxy.connections - before, 2, 'the first connection and one refused reconnect');
  assert.equal(client.state, 'closed');
});
