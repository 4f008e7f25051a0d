#!/usr/bin/env node
// Read config values from the local config-agent and follow every change live
// over Server-Sent Events (GET /v1/watch). Node.js >= 18, no dependencies.
//
//   node watch.mjs                                   # http://127.0.0.1:8790
//   CONFIG_AGENT_URL=http://127.0.0.1:8790 node watch.mjs
//   CONFIG_AGENT_SOCKET=/run/config-agent/agent.sock node watch.mjs
//
// Prints `ai.threshold = 0.75 (version 1)` for every current value, then
// `change: ai.threshold = 0.9 (version 2, revision 5)` as changes are applied.
// On a dropped connection it reconnects with Last-Event-ID, so the agent
// replays exactly the changes missed in between.

import http from "node:http";

const base = new URL(process.env.CONFIG_AGENT_URL ?? "http://127.0.0.1:8790");
const socketPath = process.env.CONFIG_AGENT_SOCKET; // optional: use the Unix socket instead

function request(path, headers = {}) {
  const target = socketPath
    ? { socketPath, path, headers }
    : { host: base.hostname, port: base.port || 80, path, headers };
  return new Promise((resolve, reject) => {
    const req = http.get(target, resolve);
    req.on("error", reject);
  });
}

// One value, read the way an app reads it at start: GET /v1/configs/{service}/{key}.
export async function readValue(service, key) {
  const res = await request(`/v1/configs/${service}/${key}`);
  let body = "";
  for await (const chunk of res) body += chunk;
  if (res.statusCode !== 200) throw new Error(`${res.statusCode}: ${body}`);
  return JSON.parse(body).value;
}

function printSnapshot(doc) {
  for (const [service, keys] of Object.entries(doc.configs)) {
    for (const [key, entry] of Object.entries(keys)) {
      console.log(`${service}.${key} = ${JSON.stringify(entry.value)} (version ${entry.version})`);
    }
  }
}

function printChange(change) {
  const what = change.deleted ? "deleted" : `= ${JSON.stringify(change.value)}`;
  console.log(`change: ${change.service}.${change.key} ${what} ` +
              `(version ${change.version}, revision ${change.revision})`);
}

// Parse one SSE block ("event: …\ndata: …\nid: …"); comments (": ping") are skipped.
function parseEvent(block) {
  const event = { type: "message", data: [], id: undefined };
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event.type = value;
    else if (field === "data") event.data.push(value);
    else if (field === "id") event.id = value;
  }
  return event;
}

async function follow() {
  let lastEventId;
  for (;;) {
    try {
      const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {};
      const res = await request("/v1/watch", headers);
      if (res.statusCode !== 200) throw new Error(`HTTP ${res.statusCode}`);
      res.setEncoding("utf8");
      let buffer = "";
      for await (const chunk of res) {
        buffer += chunk.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event.id !== undefined) lastEventId = event.id;
          if (event.data.length === 0) continue;
          const data = JSON.parse(event.data.join("\n"));
          if (event.type === "snapshot") printSnapshot(data);
          else if (event.type === "change") printChange(data);
        }
      }
      console.error("# stream ended; reconnecting");
    } catch (err) {
      console.error(`# ${err.message}; reconnecting in 1s`);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

const threshold = await readValue("ai", "threshold").catch(() => undefined);
if (threshold !== undefined) console.log(`# read ai.threshold once: ${JSON.stringify(threshold)}`);
await follow();
