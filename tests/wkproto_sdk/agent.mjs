// One user of WuKongIM's own JS SDK (wukongimjssdk 1.0.4, unchanged),
// driven by tests/wkproto_sdk.rs against ruyi's WKProto WebSocket listener.
//
// The SDK is a singleton, so each process is one user. Commands arrive as
// JSON lines on stdin; what the SDK reports goes to stdout as JSON lines
// prefixed with "@@ " (the SDK logs to stdout too):
//
//   {"op":"send","to":"bob","type":1,"text":"hello"}
//       -> @@ {"event":"sent","clientSeq":1,"clientMsgNo":"..."}
//   {"op":"exit"}
//
//   @@ {"event":"status","status":1,"reason":1}      connect status changes
//   @@ {"event":"sendack","clientSeq":1,"reason":1,"seq":3,"id":"..."}
//   @@ {"event":"message","from":"bob","channel":"bob","type":1,
//       "seq":3,"id":"...","text":"hi"}
//
// Environment: RUYI_WK_ADDR (ws://host:port), RUYI_WK_UID, RUYI_WK_TOKEN.
//
// The package's ES modules import each other without file extensions, which
// Node cannot load as published: esbuild bundles them first.

import { build } from "esbuild";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
const out = mkdtempSync(join(tmpdir(), "ruyi-wksdk-"));
const entry = join(out, "entry.mjs");
writeFileSync(
  entry,
  `export { WKSDK, MessageText, Channel } from "wukongimjssdk/lib/sdk";\n` +
    `export { ConnectStatus } from "wukongimjssdk/lib/connect_manager";\n`,
);
await build({
  entryPoints: [entry],
  bundle: true,
  format: "esm",
  platform: "node",
  outfile: join(out, "sdk.mjs"),
  nodePaths: [join(here, "node_modules")],
  logLevel: "error",
});

// Node 20 has no global WebSocket; the SDK uses the browser's API.
globalThis.WebSocket = WebSocket;
const { WKSDK, MessageText, Channel } = await import(join(out, "sdk.mjs"));

function emit(event) {
  process.stdout.write("@@ " + JSON.stringify(event) + "\n");
}

const sdk = WKSDK.shared();
sdk.config.addr = process.env.RUYI_WK_ADDR;
sdk.config.uid = process.env.RUYI_WK_UID;
sdk.config.token = process.env.RUYI_WK_TOKEN;
sdk.connectManager.addConnectStatusListener((status, reasonCode) => {
  emit({ event: "status", status, reason: reasonCode ?? null });
});
sdk.chatManager.addMessageStatusListener((ack) => {
  emit({
    event: "sendack",
    clientSeq: ack.clientSeq,
    reason: ack.reasonCode,
    seq: Number(ack.messageSeq),
    id: String(ack.messageID),
  });
});
sdk.chatManager.addMessageListener((message) => {
  if (message.send) {
    return; // the SDK's own echo of what this user is sending
  }
  emit({
    event: "message",
    from: message.fromUID,
    channel: message.channel.channelID,
    type: message.channel.channelType,
    seq: Number(message.messageSeq),
    id: String(message.messageID),
    text: message.content?.text ?? null,
  });
});
sdk.connect();

const lines = createInterface({ input: process.stdin });
lines.on("line", async (line) => {
  const command = JSON.parse(line);
  if (command.op === "send") {
    const message = await sdk.chatManager.send(
      new MessageText(command.text),
      new Channel(command.to, command.type),
    );
    emit({ event: "sent", clientSeq: message.clientSeq, clientMsgNo: message.clientMsgNo });
  } else if (command.op === "exit") {
    // The SDK keeps timers running; end the process outright.
    process.exit(0);
  }
});
lines.on("close", () => process.exit(0));
