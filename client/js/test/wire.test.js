// The JS client's requests and its reading of answers, against a scripted peer:
// a real TCP server on a loopback port that reads each request and writes the
// next scripted bytes. A live sidecar always answers with a Content-Length on a
// connection it keeps; these cover the other shapes an HTTP/1.1 peer may send,
// what goes out on the wire, and kept-alive connections closed under the client.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import net from "node:net";
import { afterEach, test } from "node:test";
import tls from "node:tls";

import { SidecarClient, SidecarUnavailable } from "../vellum-sidecar-client.js";

/** Script steps: answer and keep the connection, answer then close, or close unanswered. */
const keep = (data) => ({ data, close: false });
const closing = (data) => ({ data, close: true });
const DROP = { data: null, close: true };
/** Answer after `ms` milliseconds, as a slow server does (the connection stays open). */
const late = (ms, data) => ({ data, close: false, delay: ms });

function answer(body, status = "200 OK", ...headers) {
  const raw = Buffer.from(JSON.stringify(body));
  const head = [`HTTP/1.1 ${status}`, "Content-Type: application/json",
    `Content-Length: ${raw.length}`, ...headers].join("\r\n");
  return Buffer.concat([Buffer.from(`${head}\r\n\r\n`), raw]);
}

const ALLOWED = answer({ allowed: true, customerId: "c", module: "m" });
const DOC = { status: "active", modules: ["reports"], config: { seats: 3 }, found: true };

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/test_client_js.py`);
  return value;
}

const peers = [];
const clients = [];

/** A started peer; with `secure`, it speaks TLS with the certificate VSC_TLS_CERT names. */
async function peer(...script) {
  return serve(false, script);
}

async function securePeer(...script) {
  return serve(true, script);
}

async function serve(secure, script) {
  const seen = [];
  const sockets = new Set();
  let connections = 0;
  const onConnection = (socket) => {
    const connection = connections++;
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    let data = Buffer.alloc(0);
    socket.on("data", (chunk) => {
      data = Buffer.concat([data, chunk]);
      for (;;) {
        const end = data.indexOf("\r\n\r\n");
        if (end < 0) return;
        const head = data.subarray(0, end).toString("latin1");
        const lines = head.split("\r\n");
        const headers = Object.fromEntries(lines.slice(1).map((line) => {
          const at = line.indexOf(":");
          return [line.slice(0, at).trim().toLowerCase(), line.slice(at + 1).trim()];
        }));
        const length = Number(headers["content-length"] ?? 0);
        if (data.length < end + 4 + length) return;
        const body = data.subarray(end + 4, end + 4 + length).toString("utf8");
        data = data.subarray(end + 4 + length);
        seen.push({ connection, start: lines[0], headers, body });
        const step = script.shift() ?? DROP;
        if (step.delay) {
          setTimeout(() => socket.write(step.data), step.delay);
          continue;
        }
        if (step.data !== null) socket.write(step.data);
        if (step.close) {
          socket.end();
          return;
        }
      }
    });
  };
  const server = secure
    ? tls.createServer({ cert: readFileSync(env("VSC_TLS_CERT")), key: readFileSync(env("VSC_TLS_KEY")) },
      onConnection)
    : net.createServer(onConnection);
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const p = {
    url: `${secure ? "https" : "http"}://127.0.0.1:${server.address().port}`,
    seen,
    open: () => sockets.size,
    close: () => {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
  peers.push(p);
  return p;
}

function client(options) {
  const c = new SidecarClient(options);
  clients.push(c);
  return c;
}

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await Promise.all(peers.splice(0).map((p) => p.close()));
});

test("the requests on the wire", async () => {
  const p = await peer(keep(ALLOWED), keep(answer({ customerId: "c_1" }, "201 Created")), keep(ALLOWED));
  const sidecar = client({ baseUrl: p.url });
  assert.equal(await sidecar.can("cus_1", "reports"), true);
  const made = await sidecar.createCustomer({
    accountId: "a/b", customerId: "c_1", email: "x@y.example", idempotencyKey: "idem-1",
  });
  assert.deepEqual(made, { customerId: "c_1" });
  assert.equal(await sidecar.can("cus ä/1", "re?ports"), true);

  const [can, post, quoted] = p.seen;
  assert.equal(can.start, "GET /v1/customers/cus_1/can/reports HTTP/1.1");
  assert.deepEqual(can.headers, {
    accept: "application/json",
    "user-agent": "vellum-sidecar-client/0.1.0 (js)",
    host: new URL(p.url).host,
    connection: "keep-alive",
  });
  assert.equal(post.start, "POST /v1/accounts/a%2Fb/customers HTTP/1.1");
  assert.deepEqual(JSON.parse(post.body), { customerId: "c_1", email: "x@y.example" });
  assert.equal(post.headers["content-length"], String(Buffer.byteLength(post.body)));
  assert.equal(post.headers["content-type"], "application/json");
  assert.equal(post.headers["idempotency-key"], "idem-1");
  assert.equal(quoted.start, "GET /v1/customers/cus%20%C3%A4%2F1/can/re%3Fports HTTP/1.1");
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 0, 0], "one keep-alive connection");
});

test("an Idempotency-Key with a line break is refused before sending", async () => {
  const p = await peer(keep(ALLOWED));
  const sidecar = client({ baseUrl: p.url });
  await assert.rejects(
    sidecar.setAccountStatus({ accountId: "a", status: "x", idempotencyKey: "k\r\nX-Injected: 1" }),
    { name: "TypeError", message: /line breaks/ },
  );
  assert.equal(await sidecar.can("c", "m"), true);
  assert.deepEqual(p.seen.map((s) => s.start.split(" ")[0]), ["GET"]);
});

test("every framing of an answer", async () => {
  const raw = Buffer.from(JSON.stringify(DOC));
  const pieces = [];
  for (let i = 0; i < raw.length; i += 7) {
    const part = raw.subarray(i, i + 7);
    pieces.push(Buffer.from(`${part.length.toString(16)};ext=1\r\n`), part, Buffer.from("\r\n"));
  }
  const chunked = Buffer.concat([
    Buffer.from("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Sidecar-Cache: hit\r\n" +
      "Transfer-Encoding: chunked\r\n\r\n"),
    ...pieces,
    Buffer.from("0\r\nX-Trailer: yes\r\n\r\n"),
  ]);
  const interim = Buffer.concat([
    Buffer.from("HTTP/1.1 100 Continue\r\n\r\n"),
    answer(DOC, "200 OK", "X-Sidecar-Cache: miss"),
  ]);
  const big = { ...DOC, config: { blob: "x".repeat(300_000) } };
  const untilClose = Buffer.concat([
    Buffer.from("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"), raw,
  ]);
  const p = await peer(keep(chunked), keep(interim), keep(answer(big)), closing(untilClose), keep(ALLOWED));
  const sidecar = client({ baseUrl: p.url });

  const first = await sidecar.getEntitlements("c");
  assert.deepEqual([first.status, first.modules, first.cache], ["active", ["reports"], "hit"]);
  const second = await sidecar.getEntitlements("c");
  assert.deepEqual([second.config("seats"), second.cache], [3, "miss"]);
  assert.equal((await sidecar.getEntitlements("c")).config("blob"), "x".repeat(300_000));
  assert.equal((await sidecar.getEntitlements("c")).has("reports"), true, "a body that ends at close");
  assert.equal(await sidecar.can("c", "m"), true);
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 0, 0, 0, 1]);
});

test("Connection: close is honoured", async () => {
  const p = await peer(closing(answer({ allowed: true }, "200 OK", "Connection: close")), keep(ALLOWED), keep(ALLOWED));
  const sidecar = client({ baseUrl: p.url });
  for (let i = 0; i < 3; i++) assert.equal(await sidecar.can("c", "m"), true);
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 1, 1]);
});

for (const [name, bytes] of [
  ["not HTTP", "SSH-2.0-OpenSSH_9.6\r\n\r\n"],
  ["a body cut short", 'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"allowed"'],
  ["a bad chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
]) {
  test(`a broken answer is no answer: ${name}`, async () => {
    const p = await peer(closing(Buffer.from(bytes)), closing(Buffer.from(bytes)));
    const sidecar = client({ baseUrl: p.url });
    assert.equal(await sidecar.can("c", "m"), false, "fail closed");
    await assert.rejects(sidecar.getEntitlements("c"), (error) => {
      assert.ok(error instanceof SidecarUnavailable);
      assert.equal(error.status, null);
      assert.match(error.message, /cannot reach the sidecar/);
      return true;
    });
  });
}

test("a reused connection closed before answering: a read is sent again, a write is not", async () => {
  const p = await peer(keep(ALLOWED), DROP, keep(ALLOWED), DROP);
  const sidecar = client({ baseUrl: p.url });
  assert.equal(await sidecar.can("c", "m"), true);
  assert.equal(await sidecar.can("c", "m"), true, "retried on a new connection");
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 0, 1]);
  await assert.rejects(
    sidecar.createCustomer({ accountId: "a", customerId: "c" }),
    (error) => error instanceof SidecarUnavailable && /socket hang up/.test(error.message),
  );
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 0, 1, 1], "the write was sent once");
});

test("a new connection closed before answering is not retried", async () => {
  const p = await peer(DROP, keep(ALLOWED));
  const sidecar = client({ baseUrl: p.url });
  assert.equal(await sidecar.can("c", "m"), false);
  assert.equal(p.seen.length, 1);
  assert.equal(await sidecar.can("c", "m"), true);
});

test("an idle connection is closed after the timeout; the next call opens another", async () => {
  const p = await peer(keep(ALLOWED), keep(ALLOWED));
  const sidecar = client({ baseUrl: p.url, timeout: 150 });
  assert.equal(await sidecar.can("c", "m"), true);
  const deadline = Date.now() + 5000; // poll with a deadline, never a fixed sleep
  while (p.open() > 0 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  assert.equal(p.open(), 0, "the client closed its idle connection");
  assert.equal(await sidecar.can("c", "m"), true);
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 1]);
});

test("billing calls wait billingTimeout, entitlement calls timeout, on the same connection", async () => {
  const status = answer({ accountId: "a", status: "x" });
  const p = await peer(late(400, status), keep(ALLOWED), late(400, ALLOWED));
  const sidecar = client({ baseUrl: p.url, timeout: 150, billingTimeout: 5000 });
  assert.deepEqual(await sidecar.setAccountStatus({ accountId: "a", status: "x" }), {
    accountId: "a", status: "x",
  });
  assert.equal(await sidecar.can("c", "m"), true, "the connection went back with the short timeout");
  await assert.rejects(sidecar.getEntitlements("c"), /timed out after 150 ms/);
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 0, 0]);
});

test("https, its certificate verified (the test trusts it through NODE_EXTRA_CA_CERTS)", async () => {
  const p = await securePeer(keep(ALLOWED), keep(ALLOWED));
  const sidecar = client({ baseUrl: p.url });
  assert.equal(await sidecar.can("c", "m"), true);
  assert.equal(await sidecar.can("c", "m"), true);
  assert.deepEqual(p.seen.map((s) => s.connection), [0, 0], "one TLS connection, kept alive");
  assert.equal(p.seen[0].headers.host, new URL(p.url).host);
});
