// The chat demo in a real browser: Debian's Chromium driven by
// playwright-core, two pages logged in as alice and bob, a Node SDK client
// and the Rust SDK's CLI, all through one gateway. Screenshots of both pages
// go to RUYI_OUTPUT_DIR, taken when the DOM shows the state they record.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { type BrowserContext, type Page, chromium } from 'playwright-core';
import { ClientPool, env, ruyiClient, takeMessages, token } from './helpers.js';

const demoUrl = process.env['RUYI_DEMO_URL'];
const outputDir = process.env['RUYI_OUTPUT_DIR'];
const executablePath = process.env['RUYI_CHROMIUM'] ?? '/usr/bin/chromium';
if (!demoUrl || !outputDir) throw new Error('RUYI_DEMO_URL and RUYI_OUTPUT_DIR are set by `cargo test --release --test web`');

// Without the background-networking flags Chromium keeps trying to reach
// the (closed) internet.
const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const VIEWPORT = { width: 1000, height: 640 };

let userDataDir: string;
let context: BrowserContext;
const pageErrors: string[] = [];
const pool = new ClientPool();

before(async () => {
  mkdirSync(outputDir, { recursive: true });
  userDataDir = mkdtempSync(join(tmpdir(), 'ruyi-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: VIEWPORT,
  });
});

after(async () => {
  await pool.closeAll();
  await context?.close();
  rmSync(userDataDir, { recursive: true, force: true });
});

/** Opens the demo logged in as `uid` (the token in the fragment). */
async function openDemo(uid: string): Promise<Page> {
  const page = await context.newPage();
  page.on('pageerror', (error) => pageErrors.push(`${uid}: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') pageErrors.push(`${uid} console: ${message.text()}`);
  });
  const fragment = new URLSearchParams({ uid, token: token(uid), ws: env.wsUrl });
  await page.goto(`${demoUrl}#${fragment}`);
  await page.waitForSelector('body[data-ready="true"]');
  assert.equal(await page.textContent('[data-testid="status"]'), 'connected');
  return page;
}

function conversationItem(page: Page, channel: string): ReturnType<Page['locator']> {
  return page.locator(`#conversations li[data-channel="${channel}"]`);
}

/** Saves a screenshot and checks it is a PNG of the viewport's size. */
async function screenshot(page: Page, name: string): Promise<void> {
  const path = join(outputDir!, `${name}.png`);
  await page.screenshot({ path });
  const png = readFileSync(path);
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], `${name}.png is a PNG`);
  // The IHDR chunk: width and height, big-endian, at bytes 16 and 20.
  assert.equal(png.readUInt32BE(16), VIEWPORT.width, `${name}.png width`);
  assert.equal(png.readUInt32BE(20), VIEWPORT.height, `${name}.png height`);
  assert.ok(png.length > 10_000, `${name}.png has content (${png.length} bytes)`);
}

test('alice sends from her page; bob sees it with an unread badge, opening the chat clears it, a recall shows on his page', async () => {
  const alice = await openDemo('alice');
  const bob = await openDemo('bob');

  await alice.fill('#new-chat-uid', 'bob');
  await alice.press('#new-chat-uid', 'Enter');
  await alice.fill('#composer-text', 'Hello Bob, from a browser');
  await alice.press('#composer-text', 'Enter');
  const sent = alice.locator('#messages .message.mine', { hasText: 'Hello Bob, from a browser' });
  await sent.waitFor();

  // Bob's page: a conversation with alice, one unread.
  const fromAlice = conversationItem(bob, 'alice');
  await fromAlice.locator('[data-testid="unread"]').waitFor();
  assert.equal(await fromAlice.locator('[data-testid="unread"]').textContent(), '1');
  assert.equal(await fromAlice.locator('.conv-last').textContent(), 'Hello Bob, from a browser');
  await screenshot(bob, 'bob-unread');

  // Opening the chat shows the message and clears the badge, on the
  // gateway too: another device of bob's sees no unread.
  await fromAlice.click();
  const received = bob.locator('#messages .message', { hasText: 'Hello Bob, from a browser' });
  await received.waitFor();
  await fromAlice.locator('[data-testid="unread"]').waitFor({ state: 'detached' });
  const bobsPhone = await pool.open('bob', { deviceId: 'phone', resume: false });
  for (let i = 0; ; i++) {
    const conversation = (await bobsPhone.conversations()).find((c) => c.channelId === 'alice');
    if (conversation?.unread === 0) break;
    assert.ok(i < 50, `the gateway still counts ${conversation?.unread} unread`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }

  // Alice recalls; bob's open chat shows it recalled.
  const messageId = await sent.getAttribute('data-message-id');
  assert.match(messageId ?? '', /^[0-9]+$/);
  await sent.locator('button.recall').click();
  await alice.locator(`#messages .message.recalled[data-message-id="${messageId}"]`).waitFor();
  const recalled = bob.locator(`#messages .message.recalled[data-message-id="${messageId}"]`);
  await recalled.waitFor();
  assert.equal(await recalled.locator('.text').textContent(), 'message recalled');
  assert.equal(await bob.locator('#messages .message', { hasText: 'Hello Bob, from a browser' }).count(), 0, 'the text is gone');
  await screenshot(bob, 'bob-recalled');
  await screenshot(alice, 'alice-recalled');

  await alice.close();
  await bob.close();
});

test('a browser page, a Node program and a Rust client talk through one gateway', async () => {
  const page = await openDemo('carol');
  const node = await pool.open('dave', { deviceId: 'node' });
  const inbox = node.deliveries();

  // Node -> browser.
  await node.sendText('carol', 'hi carol, this is node');
  await conversationItem(page, 'dave').locator('[data-testid="unread"]').waitFor();
  await conversationItem(page, 'dave').click();
  await page.locator('#messages .message', { hasText: 'hi carol, this is node' }).waitFor();

  // Browser -> Node.
  await page.fill('#composer-text', 'hi dave, this is a browser');
  await page.press('#composer-text', 'Enter');
  const [reply] = await takeMessages(inbox, 1);
  assert.equal(reply!.text, 'hi dave, this is a browser');
  assert.equal(reply!.fromUid, 'carol');

  // Rust (the `ruyi client` CLI over TCP) -> browser.
  const rust = await ruyiClient('erin', ['send', '--to', 'carol', '--text', 'hi carol, this is rust']);
  assert.equal(rust.code, 0, rust.stderr);
  const fromRust = conversationItem(page, 'erin');
  await fromRust.locator('[data-testid="unread"]').waitFor();
  assert.equal(await fromRust.locator('.conv-last').textContent(), 'hi carol, this is rust');
  await screenshot(page, 'carol-three-clients');
  await page.close();
});

test('a refused token shows the reason and the login form', async () => {
  const page = await context.newPage();
  const fragment = new URLSearchParams({ uid: 'mallory', token: token('mallory', 'not-the-secret'), ws: env.wsUrl });
  await page.goto(`${demoUrl}#${fragment}`);
  await page.waitForSelector('#login:not([hidden])');
  assert.equal(await page.textContent('[data-testid="status"]'), 'cannot connect: the server refused the connection: AuthFailed');
  assert.equal(await page.inputValue('#login-uid'), 'mallory');
  await page.close();
});

test('no page reported an error', () => {
  assert.deepEqual(pageErrors, []);
});
