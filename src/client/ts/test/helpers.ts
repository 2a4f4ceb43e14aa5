// What the Node tests share: the gateway they run against (started by
// tests/web.rs, which passes its addresses in the environment), tokens,
// the Rust CLI client, the admin API, and a TCP proxy that can lose bytes
// and cut connections.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import * as net from 'node:net';
import WebSocket from 'ws';
import { type Client, type ConnectOptions, type Delivery, type Message, connect } from '../src/index.js';

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: these tests run against a gateway that \`cargo test --release --test web\` starts`);
  }
  return value;
}

export const env = {
  /** ws://127.0.0.1:PORT/PATH of the gateway's WebSocket listener. */
  wsUrl: required('RUYI_WS_URL'),
  /** The gateway's TCP listener, for the Rust CLI client. */
  tcpAddr: required('RUYI_TCP_ADDR'),
  apiUrl: required('RUYI_API_URL'),
  apiToken: required('RUYI_API_TOKEN'),
  secret: required('RUYI_AUTH_SECRET'),
  /** The `ruyi` binary. */
  bin: required('RUYI_BIN'),
};

function base64url(data: string | Buffer): string {
  return Buffer.from(data).toString('base64url');
}

/** A token for `uid` signed with `secret` (HS256, as `ruyi token` makes). */
export function token(uid: string, secret: string = env.secret, ttlSeconds = 3600): string {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ typ: 'JWT', alg: 'HS256' }));
  const claims = base64url(JSON.stringify({ sub: uid, exp: now + ttlSeconds, iat: now }));
  const signature = createHmac('sha256', secret).update(`${header}.${claims}`).digest('base64url');
  return `${header}.${claims}.${signature}`;
}

let uniqueCounter = 0;
/** A uid no other test uses (tests share one gateway per file). */
export function uniqueUid(name: string): string {
  uniqueCounter += 1;
  return `${name}-${process.pid}-${uniqueCounter}`;
}

/** Connects `uid` to the gateway (or to `url`) with ws@8 as the WebSocket. */
export function connectAs(uid: string, options: Partial<ConnectOptions> = {}): Promise<Client> {
  return connect({
    url: env.wsUrl,
    uid,
    token: token(uid),
    deviceId: 'node',
    WebSocket,
    onCallbackError: (error) => {
      throw error;
    },
    ...options,
  });
}

/** Clients a test file opens, closed together when it is done with them. */
export class ClientPool {
  private readonly clients: Client[] = [];

  async open(uid: string, options: Partial<ConnectOptions> = {}): Promise<Client> {
    const client = await connectAs(uid, options);
    this.clients.push(client);
    return client;
  }

  async closeAll(): Promise<void> {
    for (const client of this.clients.splice(0)) await client.close();
  }
}

/** The next `count` deliveries of `kind` from an iterator, within `timeoutMs`. */
export async function take(iterator: AsyncIterator<Delivery>, count: number, timeoutMs = 10_000, kind: Delivery['kind'] = 'message'): Promise<Delivery[]> {
  const got: Delivery[] = [];
  const deadline = Date.now() + timeoutMs;
  while (got.length < count) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`got ${got.length} of ${count} ${kind} deliveries within ${timeoutMs} ms: ${JSON.stringify(got)}`);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const next = await Promise.race([
      iterator.next(),
      new Promise<'timeout'>((resolve) => {
        timer = setTimeout(() => resolve('timeout'), left);
      }),
    ]);
    clearTimeout(timer);
    if (next === 'timeout') continue;
    if (next.done) throw new Error(`the iterator ended after ${got.length} of ${count} deliveries`);
    if (next.value.kind === kind) got.push(next.value);
    else if (next.value.kind === 'closed') throw new Error(`closed after ${got.length} of ${count}: ${JSON.stringify(next.value)}`);
  }
  return got;
}

/** The next `count` messages. */
export async function takeMessages(iterator: AsyncIterator<Delivery>, count: number, timeoutMs = 10_000): Promise<Message[]> {
  const got = await take(iterator, count, timeoutMs, 'message');
  return got.map((d) => (d as { kind: 'message'; message: Message }).message);
}

/** Whatever arrives within `quietMs` (used to show that nothing more comes). */
export async function drain(iterator: AsyncIterator<Delivery>, quietMs: number): Promise<Delivery[]> {
  const got: Delivery[] = [];
  for (;;) {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const next = await Promise.race([
      iterator.next(),
      new Promise<'quiet'>((resolve) => {
        timer = setTimeout(() => resolve('quiet'), quietMs);
      }),
    ]);
    clearTimeout(timer);
    if (next === 'quiet' || next.done) return got;
    got.push(next.value);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits until `condition()` holds, checking every 20 ms. */
export async function until(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** A JSON line from the Rust CLI, with its 64-bit numbers kept as strings
 * (JSON.parse would round them). */
export function parseCliLine(line: string): Record<string, unknown> {
  return JSON.parse(line.replace(/"(message_id|message_seq|version)":(\d+)/g, '"$1":"$2"')) as Record<string, unknown>;
}

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
  lines: Array<Record<string, unknown>>;
}

/** Runs `ruyi client --uid UID ... ARGS` (the Rust SDK) against the gateway's TCP listener. */
export function ruyiClient(uid: string, args: string[], onStderr?: (text: string) => void): Promise<CliRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(env.bin, ['client', '--server', env.tcpAddr, '--uid', uid, '--token', token(uid), '--device-id', 'rust-cli', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      onStderr?.(stderr);
    });
    child.on('error', reject);
    child.on('close', (code) => {
      const lines = stdout
        .split('\n')
        .filter((l) => l.trim().length > 0)
        .map(parseCliLine);
      resolve({ code, stdout, stderr, lines });
    });
  });
}

/** Starts `ruyi client listen` and resolves once it is online, with the
 * promise of its end. */
export async function rustListener(uid: string, args: string[]): Promise<{ done: Promise<CliRun> }> {
  let online!: () => void;
  const ready = new Promise<void>((resolve) => (online = resolve));
  const done = ruyiClient(uid, ['listen', ...args], (stderr) => {
    if (stderr.includes('listening as')) online();
  });
  await Promise.race([ready, done.then((run) => Promise.reject(new Error(`ruyi client listen ended before it was online: ${run.stderr}`)))]);
  return { done };
}

/** POSTs to the admin API; the parsed JSON answer. */
export async function adminPost(path: string, body: unknown): Promise<unknown> {
  const response = await fetch(`${env.apiUrl}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', token: env.apiToken },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`POST ${path}: ${response.status} ${text}`);
  return text.length > 0 ? JSON.parse(text) : null;
}

/** A TCP proxy in front of the WebSocket listener that the tests control:
 * it can swallow either direction's bytes and cut every connection. */
export class Proxy {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  /** Connections accepted so far. */
  connections = 0;
  /** Swallow what clients send (their acks get lost). */
  dropUpstream = false;
  /** Swallow what the server sends (SendAcks and Pongs get lost). */
  dropDownstream = false;

  private constructor(server: net.Server) {
    this.server = server;
  }

  static async start(): Promise<Proxy> {
    const target = new URL(env.wsUrl);
    const server = net.createServer();
    const proxy = new Proxy(server);
    server.on('connection', (client) => {
      proxy.connections += 1;
      const upstream = net.connect(Number(target.port), target.hostname);
      proxy.sockets.add(client);
      proxy.sockets.add(upstream);
      client.on('data', (d) => {
        if (!proxy.dropUpstream) upstream.write(d);
      });
      upstream.on('data', (d) => {
        if (!proxy.dropDownstream) client.write(d);
      });
      const end = (): void => {
        client.destroy();
        upstream.destroy();
        proxy.sockets.delete(client);
        proxy.sockets.delete(upstream);
      };
      client.on('close', end);
      upstream.on('close', end);
      client.on('error', end);
      upstream.on('error', end);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  /** The proxy's ws:// URL (same path as the gateway's). */
  get url(): string {
    const address = this.server.address() as net.AddressInfo;
    const target = new URL(env.wsUrl);
    return `ws://127.0.0.1:${address.port}${target.pathname}`;
  }

  /** Drops every connection at once, as a network failure would. */
  cutAll(): void {
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
  }

  async stop(): Promise<void> {
    this.cutAll();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
