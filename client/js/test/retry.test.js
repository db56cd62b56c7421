// The one retry: a kept-alive connection the server closes under a request.
//
// Run from tests/test_client_js.py, which starts a scripted server
// (tests/closing_server.py) at VSC_CLOSING_URL: it answers every request but
// the second one on its first connection, which it closes without answering.
// That test checks the server did cut one request, so the retry ran.

import assert from "node:assert/strict";
import { test } from "node:test";

import { SidecarClient } from "../vellum-sidecar-client.js";

test("an idempotent request on a connection closed under it is sent once more", async () => {
  const url = process.env.VSC_CLOSING_URL;
  if (!url) throw new Error("VSC_CLOSING_URL is not set: run through tests/test_client_js.py");
  const client = new SidecarClient({ baseUrl: url });
  const answers = [];
  for (let i = 0; i < 4; i++) {
    answers.push(await client.can("c", "m"));
    answers.push(...(await client.check([["c", "m"]])));
  }
  assert.deepEqual(answers, Array(8).fill(true), "every call answered, the cut one retried");
});
