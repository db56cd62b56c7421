// The stock OpenFeature JS server SDK with its stock OFREP provider, pointed at a
// live sidecar: no Vellum client, no code of ours on this side.
//
// Run from the sidecar's test suite (tests/test_ofrep.py), which installs nothing:
// `npm ci` in this folder (.ci/run does it) brings the pinned packages, and the
// test starts the processes and passes their addresses:
//   VSC_URL                a sidecar in front of the emulator (pushes on)
//   VSC_EMULATOR_URL       that emulator (its /_emulator admin API), VSC_TENANT its tenant
//   VSC_UPSTREAM_DOWN_URL  a sidecar whose upstream is down

import assert from "node:assert/strict";
import { before, describe, test } from "node:test";

import { OFREPProvider } from "@openfeature/ofrep-provider";
import { ErrorCode, OpenFeature, StandardResolutionReasons } from "@openfeature/server-sdk";

function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through tests/test_ofrep.py`);
  }
  return value;
}

const uid = (prefix) => `${prefix}_${Math.random().toString(16).slice(2, 10)}`;

async function admin(method, path, body) {
  const tenant = env("VSC_TENANT");
  const res = await fetch(`${env("VSC_EMULATOR_URL")}/_emulator/tenants/${tenant}${path}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  assert.ok(res.ok, `emulator admin ${method} ${path}: ${res.status}`);
  const answer = await res.json();
  assert.equal(answer.pushed, true, "the push reached the sidecar");
  return answer;
}

const FLAG = uid("js-beta");
const CUSTOMER = uid("cus_js");
const OTHER = uid("cus_other");

async function providerClient(url) {
  const domain = uid("domain");
  await OpenFeature.setProviderAndWait(domain, new OFREPProvider({ baseUrl: url }));
  return OpenFeature.getClient(domain);
}

describe("the OFREP provider against the sidecar", () => {
  let client;

  before(async () => {
    await admin("PUT", `/flags/${FLAG}`, { value: false });
    await admin("PUT", `/customers/${CUSTOMER}/flags/${FLAG}`, { value: true });
    await admin("PUT", `/customers/${CUSTOMER}/entitlements`, {
      status: "active",
      modules: ["reports"],
    });
    client = await providerClient(env("VSC_URL"));
  });

  test("a flag is evaluated for the targeting key (the customer)", async () => {
    const mine = await client.getBooleanDetails(FLAG, false, { targetingKey: CUSTOMER });
    assert.equal(mine.value, true);
    assert.equal(mine.reason, StandardResolutionReasons.TARGETING_MATCH);
    assert.equal(mine.variant, "on");
    assert.equal(mine.errorCode, undefined);
    const theirs = await client.getBooleanDetails(FLAG, true, { targetingKey: OTHER });
    assert.equal(theirs.value, false);
    assert.equal(theirs.reason, StandardResolutionReasons.STATIC);
    assert.equal(theirs.variant, "off");
  });

  test("module:<id> is the entitlement check", async () => {
    const held = await client.getBooleanDetails("module:reports", false, {
      targetingKey: CUSTOMER,
    });
    assert.equal(held.value, true);
    assert.equal(held.variant, "allowed");
    const missing = await client.getBooleanDetails("module:billing", true, {
      targetingKey: CUSTOMER,
    });
    assert.equal(missing.value, false);
    assert.equal(missing.variant, "denied");
  });

  test("an unknown flag returns the caller's default with FLAG_NOT_FOUND", async () => {
    const details = await client.getBooleanDetails(uid("nope"), true, { targetingKey: CUSTOMER });
    assert.equal(details.value, true);
    assert.equal(details.errorCode, ErrorCode.FLAG_NOT_FOUND);
    assert.equal(details.reason, StandardResolutionReasons.ERROR);
  });

  test("a missing targeting key returns the default with TARGETING_KEY_MISSING", async () => {
    const details = await client.getBooleanDetails(FLAG, false, { plan: "pro" });
    assert.equal(details.value, false);
    assert.equal(details.errorCode, ErrorCode.TARGETING_KEY_MISSING);
  });

  test("a flag change in Vellum reaches the provider by push", async () => {
    await admin("PUT", `/customers/${CUSTOMER}/flags/${FLAG}`, { value: false });
    const details = await client.getBooleanDetails(FLAG, true, { targetingKey: CUSTOMER });
    assert.equal(details.value, false);
    assert.equal(details.reason, StandardResolutionReasons.STATIC);
  });

  test("no answer anywhere returns the caller's default (GENERAL)", async () => {
    const down = await providerClient(env("VSC_UPSTREAM_DOWN_URL"));
    for (const fallback of [true, false]) {
      const details = await down.getBooleanDetails(FLAG, fallback, { targetingKey: CUSTOMER });
      assert.equal(details.value, fallback);
      assert.equal(details.errorCode, ErrorCode.GENERAL);
    }
  });
});
