#!/usr/bin/env node
// Evaluate config-agent's feature flags with the OpenFeature Node.js server SDK and
// its OFREP provider (run `npm ci` here first). Flags are the entries of the service
// `features` (CONFIG_AGENT_FLAG_SERVICES): plain values and flagd flag definitions.
//
//   node flags.mjs                                   # http://127.0.0.1:8790
//   CONFIG_AGENT_URL=http://127.0.0.1:8790 node flags.mjs --watch greeting
//
// Prints one line per evaluation, e.g. `theme for ann@acme.com = blue (TARGETING_MATCH, acme)`,
// then a 50/50 `fractional` rollout over ROLLOUT_KEYS (default 10000) targeting keys:
// `rollout: 4981 of 10000 on (49.81 %), digest 3f2a…, 2100 evaluations/s`. With
// `--watch KEY` it then evaluates KEY every 100 ms and prints `KEY = VALUE` on each change.

import { createHash } from "node:crypto";
import { OpenFeature } from "@openfeature/server-sdk";
import { OFREPProvider } from "@openfeature/ofrep-provider";

const baseUrl = process.env.CONFIG_AGENT_URL ?? "http://127.0.0.1:8790";
const rolloutKeys = Number(process.env.ROLLOUT_KEYS ?? 10000);

await OpenFeature.setProviderAndWait(new OFREPProvider({ baseUrl }));
const client = OpenFeature.getClient();

function show(name, details) {
  const value = typeof details.value === "object" ? JSON.stringify(details.value) : details.value;
  const why = details.errorCode ?? details.reason;
  const variant = details.variant && details.variant !== "static" ? `, ${details.variant}` : "";
  console.log(`${name} = ${value} (${why}${variant})`);
}

// One flag of each type: plain values are STATIC flags.
show("dark-mode", await client.getBooleanDetails("dark-mode", false));
show("greeting", await client.getStringDetails("greeting", "hi"));
show("max-items", await client.getNumberDetails("max-items", 10));
show("limits", await client.getObjectDetails("limits", {}));
// Targeting by a context attribute (a flagd definition with `ends_with`).
for (const email of ["ann@acme.com", "bob@example.com"]) {
  show(`theme for ${email}`, await client.getStringDetails("theme", "none", { targetingKey: email, email }));
}
// Errors come back as the code default plus an error code.
show("no-such-flag", await client.getStringDetails("no-such-flag", "fallback"));
show("greeting as boolean", await client.getBooleanDetails("greeting", false));

// A 50/50 `fractional` rollout: which targeting keys get `on`, 100 evaluations at a time.
const keys = Array.from({ length: rolloutKeys }, (_, i) => `user-${i}`);
const on = [];
const started = performance.now();
for (let i = 0; i < keys.length; i += 100) {
  const batch = keys.slice(i, i + 100);
  const values = await Promise.all(
    batch.map((targetingKey) => client.getBooleanValue("rollout", false, { targetingKey })),
  );
  batch.forEach((key, j) => values[j] && on.push(key));
}
const seconds = (performance.now() - started) / 1000;
const digest = createHash("sha256").update(on.sort().join("\n")).digest("hex").slice(0, 16);
const share = ((100 * on.length) / keys.length).toFixed(2);
console.log(`rollout: ${on.length} of ${keys.length} on (${share} %), digest ${digest}, ` +
            `${Math.round(keys.length / seconds)} evaluations/s`);

const watchAt = process.argv.indexOf("--watch");
if (watchAt > 0) {
  const key = process.argv[watchAt + 1];
  let last = await client.getStringValue(key, "");
  console.log(`watching ${key} (every 100 ms)`);
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    const value = await client.getStringValue(key, "");
    if (value !== last) {
      console.log(`${key} = ${value}`);
      last = value;
    }
  }
}
await OpenFeature.close();
