// History, conversations and recall through the SDK against a real gateway.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { ChannelType, type Conversation, RequestFailedError } from '../src/index.js';
import { ClientPool, adminPost, take, takeMessages, uniqueUid } from './helpers.js';

const pool = new ClientPool();
const open = pool.open.bind(pool);
after(() => pool.closeAll());

function find(conversations: Conversation[], channelId: string): Conversation {
  const found = conversations.find((c) => c.channelId === channelId);
  assert.ok(found, `a conversation with ${channelId} in ${JSON.stringify(conversations)}`);
  return found;
}

test('syncMessages returns a channel history by seq range, up and down', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  for (const text of ['h1', 'h2', 'h3', 'h4', 'h5']) await alice.sendText(bobUid, text);
  const bob = await open(bobUid, { resume: false });

  const up = await bob.syncMessages({ channelId: aliceUid, startSeq: '2', limit: 3 });
  assert.deepEqual(
    up.map((m) => [m.messageSeq, m.text, m.fromUid]),
    [
      ['2', 'h2', aliceUid],
      ['3', 'h3', aliceUid],
      ['4', 'h4', aliceUid],
    ],
  );
  const down = await bob.syncMessages({ channelId: aliceUid, direction: 'down', limit: 2 });
  assert.deepEqual(
    down.map((m) => m.text),
    ['h5', 'h4'],
    'down from the newest',
  );
  const bounded = await bob.syncMessages({ channelId: aliceUid, startSeq: 1, endSeq: 3 });
  assert.deepEqual(
    bounded.map((m) => m.messageSeq),
    ['1', '2'],
    'endSeq is exclusive',
  );
  await assert.rejects(bob.syncMessages({ channelId: aliceUid, startSeq: 0, direction: 'up' }), (error: unknown) => {
    assert.ok(error instanceof RequestFailedError);
    assert.equal(error.reason, 'InvalidRange');
    return true;
  });
});

test('conversations count unread; clearUnread, setUnread and delete change them, and the other device is told', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  const phone = await open(bobUid, { deviceId: 'phone' });
  const laptop = await open(bobUid, { deviceId: 'laptop' });
  const laptopInbox = laptop.deliveries();
  for (const text of ['c1', 'c2', 'c3']) await alice.sendText(bobUid, text);
  await takeMessages(laptopInbox, 3);

  let conversation = find(await phone.conversations(), aliceUid);
  assert.equal(conversation.unread, 3);
  assert.equal(conversation.lastMessageSeq, '3');
  assert.equal(conversation.lastMessage?.text, 'c3');
  assert.equal(conversation.channelType, ChannelType.Person);
  assert.equal(find(await phone.conversations({ unreadOnly: true }), aliceUid).unread, 3);

  const cleared = await phone.clearUnread(aliceUid);
  assert.equal(cleared?.unread, 0);
  assert.equal(cleared?.readSeq, '3');
  const [update] = await take(laptopInbox, 1, 10_000, 'conversation');
  assert.equal(update!.kind, 'conversation');
  if (update!.kind === 'conversation') {
    assert.equal(update.conversation.channelId, aliceUid);
    assert.equal(update.conversation.unread, 0, 'the laptop hears the phone read the chat');
  }
  conversation = find(await laptop.conversations(), aliceUid);
  assert.equal(conversation.unread, 0);
  assert.deepEqual(await laptop.conversations({ unreadOnly: true }), []);

  assert.equal((await phone.setUnread(aliceUid, 1))?.unread, 1);
  assert.equal(find(await laptop.conversations(), aliceUid).unread, 1);

  await phone.deleteConversation(aliceUid);
  assert.deepEqual(await phone.conversations(), [], 'hidden until a newer message');
  await alice.sendText(bobUid, 'c4');
  conversation = find(await phone.conversations(), aliceUid);
  assert.equal(conversation.unread, 1, 'only the newer message counts');

  await assert.rejects(phone.clearUnread(uniqueUid('stranger')), (error: unknown) => {
    assert.ok(error instanceof RequestFailedError);
    assert.equal(error.reason, 'ConversationMissing');
    return true;
  });
});

test('syncConversations is incremental: since a version, only what changed', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const carolUid = uniqueUid('carol');
  const alice = await open(aliceUid);
  const carol = await open(carolUid);
  const bob = await open(bobUid);
  await alice.sendText(bobUid, 'from alice');
  const first = await bob.syncConversations();
  assert.equal(first.conversations.length, 1);
  const version = first.conversations[0]!.version;
  await carol.sendText(bobUid, 'from carol');
  const next = await bob.syncConversations({ sinceVersion: version });
  assert.deepEqual(
    next.conversations.map((c) => c.channelId),
    [carolUid],
  );
  assert.equal(next.more, false);
});

test('recall: the recipient is told, sync shows the message recalled, and only the sender may recall', async () => {
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const alice = await open(aliceUid);
  const bob = await open(bobUid);
  const inbox = bob.deliveries();
  const first = await alice.sendText(bobUid, 'oops');
  const second = await alice.send({ channelId: bobUid, payload: 'second thoughts', clientMsgNo: `recall-${process.pid}` });
  await takeMessages(inbox, 2);

  await assert.rejects(bob.recall({ channelId: aliceUid, messageId: first.messageId }), (error: unknown) => {
    assert.ok(error instanceof RequestFailedError);
    assert.equal(error.reason, 'NotSender');
    return true;
  });

  const recalled = await alice.recall({ channelId: bobUid, messageId: first.messageId });
  assert.deepEqual(recalled, { messageId: first.messageId, messageSeq: '1' });
  const [event] = await take(inbox, 1, 10_000, 'recall');
  if (event!.kind !== 'recall') throw new Error('expected a recall');
  assert.deepEqual(event.recall, { channelId: aliceUid, channelType: ChannelType.Person, messageId: first.messageId, messageSeq: '1', fromUid: aliceUid });

  // By client_msg_no.
  const byNo = await alice.recall({ channelId: bobUid, clientMsgNo: `recall-${process.pid}` });
  assert.equal(byNo.messageId, second.messageId);

  const history = await bob.syncMessages({ channelId: aliceUid });
  assert.deepEqual(
    history.map((m) => [m.messageSeq, m.recalled, m.payload.length]),
    [
      ['1', true, 0],
      ['2', true, 0],
    ],
  );
  const conversation = find(await bob.conversations(), aliceUid);
  assert.equal(conversation.lastMessage?.recalled, true);
});

test('a group: members receive in order and their conversations name the group', async () => {
  const group = uniqueUid('team');
  const aliceUid = uniqueUid('alice');
  const bobUid = uniqueUid('bob');
  const carolUid = uniqueUid('carol');
  await adminPost('/channel', { channel_id: group, channel_type: 2, subscribers: [aliceUid, bobUid, carolUid] });
  const alice = await open(aliceUid);
  const bob = await open(bobUid);
  const carol = await open(carolUid);
  const bobInbox = bob.deliveries();
  const carolInbox = carol.deliveries();
  await alice.sendGroupText(group, 'g1');
  await bob.sendGroupText(group, 'g2');
  await alice.sendGroupText(group, 'g3');
  const got = await takeMessages(carolInbox, 3);
  assert.deepEqual(
    got.map((m) => [m.messageSeq, m.fromUid, m.text, m.channelId, m.channelType]),
    [
      ['1', aliceUid, 'g1', group, ChannelType.Group],
      ['2', bobUid, 'g2', group, ChannelType.Group],
      ['3', aliceUid, 'g3', group, ChannelType.Group],
    ],
  );
  const bobGot = await takeMessages(bobInbox, 2);
  assert.deepEqual(
    bobGot.map((m) => m.text),
    ['g1', 'g3'],
    'a sender is not sent its own message on the sending device',
  );
  const conversation = find(await carol.conversations(), group);
  assert.equal(conversation.unread, 3);
});
