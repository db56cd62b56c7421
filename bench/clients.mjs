// The JS client's can() against raw node:http with a keep-alive Agent, sequential,
// against a live sidecar: the JS half of bench/clients.py (which starts this and
// reads the last line it prints, one JSON object).
//
//   node bench/clients.mjs --url http://127.0.0.1:8700 [--customer c] [--module m]
//                          [--calls 20000] [--rounds 20] [--client path/to/an/older/copy.js]

import http from "node:http";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    customer: { type: "string", default: "cus_000000" },
    module: { type: "string", default: "reports" },
    calls: { type: "string", default: "20000" },
    rounds: { type: "string", default: "20" },
    client: { type: "string" },
  },
});
const { SidecarClient } = await import(
  values.client
    ? pathToFileURL(resolve(values.client)).href
    : new URL("../client/js/vellum-sidecar-client.js", import.meta.url).href
);
if (!values.url) throw new Error("--url is required");
const calls = Number(values.calls);
const rounds = Number(values.rounds);
const { customer, module } = values;
const base = new URL(values.url);
const path = `/v1/customers/${encodeURIComponent(customer)}/can/${encodeURIComponent(module)}`;

const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const options = { host: base.hostname, port: base.port, path, agent };

function raw() {
  return new Promise((resolve, reject) => {
    const req = http.get(options, (res) => {
      const chunks = [];
      res.on("data", (chunk) => chunks.push(chunk));
      res.on("end", () => {
        const body = Buffer.concat(chunks);
        if (res.statusCode !== 200 || body.length === 0) {
          reject(new Error(`raw request answered ${res.statusCode}: ${body}`));
        } else {
          resolve();
        }
      });
      res.on("error", reject);
    });
    req.on("error", reject);
  });
}

const client = new SidecarClient({ baseUrl: values.url, timeout: 5000 });

async function sdk() {
  if ((await client.can(customer, module)) !== true) {
    throw new Error(`client.can(${customer}, ${module}) is not true`);
  }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
};
const round1 = (x) => Math.round(x * 10) / 10;

const perRound = Math.max(1, Math.floor(calls / rounds));
const sides = { client: sdk, raw };
const names = Object.keys(sides);
const samples = { client: [], raw: [] };
const cpu = { client: 0, raw: 0 };
for (const name of names) {
  for (let i = 0; i < Math.max(1, perRound >> 2); i++) await sides[name]();
}
for (let r = 0; r < rounds; r++) {
  for (const name of r % 2 === 0 ? names : [...names].reverse()) {
    const fn = sides[name];
    const cpuStarted = process.cpuUsage();
    const started = process.hrtime.bigint();
    for (let i = 0; i < perRound; i++) await fn();
    samples[name].push(Number(process.hrtime.bigint() - started) / perRound / 1000);
    const used = process.cpuUsage(cpuStarted);
    cpu[name] += used.user + used.system;
  }
}
client.close();
agent.destroy();

console.log(
  JSON.stringify({
    calls: perRound * rounds,
    rounds,
    client_us: round1(median(samples.client)),
    raw_us: round1(median(samples.raw)),
    ratio: Math.round(median(samples.client.map((c, i) => c / samples.raw[i])) * 1000) / 1000,
    client_cpu_us: round1(cpu.client / (perRound * rounds)),
    raw_cpu_us: round1(cpu.raw / (perRound * rounds)),
    client_rounds_us: samples.client.map(round1),
    raw_rounds_us: samples.raw.map(round1),
    node: process.versions.node,
  }),
);
