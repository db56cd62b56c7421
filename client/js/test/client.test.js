// The JS client against a live sidecar in front of the emulator.
//
// Run from the sidecar's test suite (tests/test_client_js.py), which starts the
// processes and passes their addresses:
//   VSC_URL                a sidecar in front of the emulator
//   VSC_EMULATOR_URL       that emulator (its /_emulator admin API), VSC_TENANT its tenant
//   VSC_UNIX_URL           a sidecar listening on unix:/path.sock
//   VSC_UPSTREAM_DOWN_URL  a sidecar whose upstream is down (answers 503)
//   VSC_STOPPED_URL        where a sidecar was, now stopped (nothing listens)

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import net from "node:net";
import { after, before, describe, test } from "node:test";

import DefaultClient, {
  DEFAULT_URL,
  EntitlementSet,
  SidecarApiError,
  SidecarClient,
  SidecarError,
  SidecarUnavailable,
} from "../vellum-sidecar-client.js";

function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through tests/test_client_js.py`);
  }
  return value;
}

const uid = (prefix) => `${prefix}_${Math.random().toString(16).slice(2, 10)}`;

async function admin(method, path, body) {
  const res = await fetch(`${env("VSC_EMULATOR_URL")}/_emulator${path}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  assert.ok(res.ok, `emulator admin ${method} ${path}: ${res.status}`);
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

async function setEntitlements(customerId, doc) {
  const tenant = env("VSC_TENANT");
  const answer = await admin(
    "PUT",
    `/tenants/${tenant}/customers/${encodeURIComponent(customerId)}/entitlements`,
    doc,
  );
  assert.equal(answer.pushed, true, "the push reached the sidecar");
}

async function lastUpstream(operation) {
  const tenant = env("VSC_TENANT");
  const { requests } = await admin("GET", `/requests?operation=${operation}&tenant=${tenant}`);
  assert.ok(requests.length > 0, `the emulator saw no ${operation}`);
  return requests.at(-1);
}

// vellumcharter 1.4.2's methods in camelCase, the flags ones included; check and
// invoicePdfUrl (upstreams before SDK 1.2) are this client's own.
const SDK_METHODS = [
  "can", "getEntitlements", "check", "invalidate",
  "flags", "flag", "globalFlags", "invalidateFlags",
  "createCheckout", "createSetupCheckout", "createSubscription", "cancelSubscription",
  "getSubscription", "updateSubscription", "previewChange", "setSeats", "addAddOn",
  "removeAddOn", "changePlan", "reactivate", "createAccount", "createCustomer",
  "setAccountStatus", "setCustomerStatus", "listPaymentMethods", "setDefaultPaymentMethod",
  "removePaymentMethod", "setSubscriptionPaymentMethod", "listInvoices", "invoicePdf",
  "invoicePdfUrl", "createCreditCheckout", "listCreditTypes", "listCreditPacks", "listCredits",
  "getCreditBalance", "consumeCredits",
];

describe("surface", () => {
  test("every SDK method, in camelCase, and declared in the .d.ts", async () => {
    const declared = await readFile(new URL("../vellum-sidecar-client.d.ts", import.meta.url), "utf8");
    const classBody = declared.slice(declared.indexOf("export declare class SidecarClient"));
    const methods = Object.getOwnPropertyNames(SidecarClient.prototype).filter((n) => n !== "constructor");
    for (const name of SDK_METHODS) {
      assert.equal(typeof SidecarClient.prototype[name], "function", `${name} is missing`);
    }
    for (const name of methods) {
      assert.match(classBody, new RegExp(`\\n  ${name}\\(`), `${name} is not declared in the .d.ts`);
    }
    const declaredMethods = [...classBody.matchAll(/\n {2}(\w+)\(/g)]
      .map((m) => m[1])
      .filter((n) => n !== "constructor");
    assert.deepEqual([...declaredMethods].sort(), [...methods].sort());
    assert.equal(DefaultClient, SidecarClient);
  });

  test("base URL from the option, then VELLUM_SIDECAR_URL, then the default", () => {
    const saved = process.env.VELLUM_SIDECAR_URL;
    try {
      delete process.env.VELLUM_SIDECAR_URL;
      assert.equal(new SidecarClient().baseUrl, DEFAULT_URL);
      process.env.VELLUM_SIDECAR_URL = "http://localhost:9999/";
      assert.equal(new SidecarClient().baseUrl, "http://localhost:9999");
      assert.equal(new SidecarClient({ baseUrl: "unix:///run/s.sock" }).baseUrl, "unix:/run/s.sock");
      for (const bad of ["ftp://x", "127.0.0.1:8700", "unix:"]) {
        assert.throws(() => new SidecarClient({ baseUrl: bad }), TypeError);
      }
    } finally {
      if (saved === undefined) delete process.env.VELLUM_SIDECAR_URL;
      else process.env.VELLUM_SIDECAR_URL = saved;
    }
  });

  test("EntitlementSet follows the SDK", () => {
    const set = new EntitlementSet("c", {
      found: true, status: "trialing", modules: ["a", 3], config: { seats: 2 },
    });
    assert.deepEqual([set.found, set.status, set.isActive(), set.modules], [true, "trialing", true, ["a"]]);
    assert.equal(set.has("a"), true);
    assert.equal(set.has("b"), false);
    assert.deepEqual([set.config("seats"), set.config("x"), set.config("x", 7)], [2, null, 7]);
    const gone = new EntitlementSet("c", { found: false, status: null, modules: [], config: {} });
    assert.deepEqual([gone.found, gone.isActive(), gone.has("a")], [false, false, false]);
    // hasAccess() is the upstream's hasAccess, as the SDK's: absent is false.
    assert.deepEqual([set.hasAccess(), gone.hasAccess()], [false, false]);
    assert.equal(new EntitlementSet("c", { status: "past_due", hasAccess: true }).hasAccess(), true);
    assert.equal(new EntitlementSet("c", { status: "active", hasAccess: false }).hasAccess(), false);
  });

  test("exactly the SDK methods and this client's own", () => {
    const methods = Object.getOwnPropertyNames(SidecarClient.prototype).filter((n) => n !== "constructor");
    // Operations the upstream added after the SDK (newer=True in the sidecar's table),
    // named by tests/test_client_js.py: their methods are generated like the others.
    const newer = (process.env.VSC_NEWER_METHODS ?? "").split(",").filter(Boolean);
    assert.deepEqual([...methods].sort(), [...SDK_METHODS, ...newer, "usage", "close"].sort());
  });
});

describe("entitlements, live", () => {
  const sidecar = new SidecarClient({ baseUrl: process.env.VSC_URL });

  before(() => env("VSC_URL"));

  test("can, getEntitlements, check, invalidate", async () => {
    const customer = uid("cus");
    await setEntitlements(customer, {
      status: "trialing", modules: ["reports", "exports"], config: { seats: 3 },
    });
    assert.equal(await sidecar.can(customer, "exports"), true);
    assert.equal(await sidecar.can(customer, "billing"), false);

    const ents = await sidecar.getEntitlements(customer);
    assert.ok(ents instanceof EntitlementSet);
    assert.deepEqual([ents.found, ents.status, ents.isActive(), ents.cache], [true, "trialing", true, "hit"]);
    assert.equal(ents.has("exports"), true);
    assert.equal(ents.config("seats"), 3);
    assert.equal(ents.config("missing", "dflt"), "dflt");
    assert.equal(ents.data.customerId, customer);

    const nobody = await sidecar.getEntitlements(uid("nobody"));
    assert.deepEqual([nobody.found, nobody.status, nobody.isActive(), nobody.modules], [false, null, false, []]);

    const pairs = [[customer, "reports"], ["cus_active", "exports"], { customerId: "cus_trial", module: "exports" }];
    assert.deepEqual(await sidecar.check(pairs), [true, true, false]);
    assert.deepEqual(await sidecar.check([]), []);
    const big = Array.from({ length: 2100 }, (_, i) => [customer, i % 2 ? "reports" : "nope"]);
    assert.deepEqual(await sidecar.check(big), big.map((_, i) => Boolean(i % 2)));

    assert.equal(await sidecar.invalidate(customer), undefined);
    assert.equal((await sidecar.getEntitlements(customer)).cache, "miss");
    assert.equal((await sidecar.getEntitlements("cus_active")).cache, "hit");
    await sidecar.invalidate();
    assert.equal((await sidecar.getEntitlements("cus_active")).cache, "miss");
  });

  test("ids are quoted one path segment each", async () => {
    const odd = "cus;ä b?c#d%2F..";
    await setEntitlements(odd, { status: "active", modules: ["x?y"], config: {} });
    assert.equal(await sidecar.can(odd, "x?y"), true);
    assert.equal((await sidecar.getEntitlements(odd)).data.customerId, odd);
    // An id the sidecar refuses on every surface (a / once decoded) is its JSON 400.
    await assert.rejects(sidecar.can("cus/1", "x?y"), {
      name: "SidecarApiError", status: 400, code: "invalid_id",
    });
  });

  test("empty ids are refused before any request", async () => {
    await assert.rejects(sidecar.can("", "reports"), /customerId must be a non-empty string/);
    await assert.rejects(sidecar.getSubscription({ accountId: "", customerId: "c" }), /accountId/);
    await assert.rejects(sidecar.check([["a", "b"], ["a", ""]]), /pairs\[1\] moduleId/);
  });
});

describe("flags, live", () => {
  const sidecar = new SidecarClient({ baseUrl: process.env.VSC_URL });
  const tenant = () => env("VSC_TENANT");
  const upstreamCount = async (operation) =>
    (await admin("GET", `/requests?operation=${operation}&tenant=${tenant()}`)).requests.length;

  test("flags, flag, globalFlags, invalidateFlags", async () => {
    const customer = uid("cus");
    const name = uid("flag");
    await admin("PUT", `/tenants/${tenant()}/flags/${name}`, { value: false });
    await admin("PUT", `/tenants/${tenant()}/customers/${customer}/flags/${name}`, { value: true });
    const mine = await sidecar.flags(customer);
    assert.equal(mine[name], true);
    assert.equal(mine["bulk-export"], true, "the globals under the overrides");
    assert.equal((await sidecar.globalFlags())[name], false);
    assert.equal(await sidecar.flag(name, customer, { default: false }), true);
    assert.equal(await sidecar.flag(name, uid("other"), { default: true }), false);
    assert.equal(await sidecar.flag(uid("undefined"), customer, { default: true }), true);
    await assert.rejects(sidecar.flag(name, customer), TypeError);
    await assert.rejects(sidecar.flag("", customer, { default: true }), /flagId/);

    const fetched = await upstreamCount("flags");
    await sidecar.invalidate(customer); // entitlements only, as the SDK's
    await sidecar.flags(customer);
    assert.equal(await upstreamCount("flags"), fetched);
    assert.equal(await sidecar.invalidateFlags(customer), undefined);
    await sidecar.flags(customer);
    assert.equal(await upstreamCount("flags"), fetched + 1);
    const globalsFetched = await upstreamCount("global_flags");
    await sidecar.invalidateFlags();
    await sidecar.globalFlags();
    assert.equal(await upstreamCount("global_flags"), globalsFetched + 1);
  });
});

describe("billing, live", () => {
  const sidecar = new SidecarClient({ baseUrl: process.env.VSC_URL });

  test("every billing method", async () => {
    const accountId = uid("acct");
    const customerId = uid("cus");
    const created = await sidecar.createAccount({ accountId, name: "Acme", email: "b@acme.example" });
    assert.deepEqual([created.accountId, created.status], [accountId, "active"]);
    assert.deepEqual((await lastUpstream("create_account")).body, {
      accountId, name: "Acme", email: "b@acme.example",
    });
    assert.equal((await sidecar.createCustomer({ accountId, customerId })).customerId, customerId);

    const session = await sidecar.createCheckout({
      accountId, customerId, planId: "pro", planVersion: 2,
      successUrl: "https://app.example/ok", cancelUrl: "https://app.example/cancel",
    });
    assert.equal(session.mode, "subscription");
    assert.deepEqual((await lastUpstream("create_checkout")).body, {
      customerId, planId: "pro", planVersion: 2, seats: 1,
      successUrl: "https://app.example/ok", cancelUrl: "https://app.example/cancel",
    });
    const setup = await sidecar.createSetupCheckout({
      accountId, successUrl: "https://app.example/ok", cancelUrl: "https://app.example/cancel",
    });
    assert.equal(setup.mode, "setup");

    assert.equal(await sidecar.can(customerId, "api"), false);
    const sub = await sidecar.createSubscription({
      accountId, customerId, planId: "pro", planVersion: 1, seats: 3, idempotencyKey: uid("idem"),
    });
    assert.deepEqual([sub.planId, sub.seats, sub.status], ["pro", 3, "active"]);
    const sent = await lastUpstream("create_subscription");
    assert.deepEqual(sent.body, { planId: "pro", planVersion: 1, seats: 3 });
    assert.ok(sent.idempotencyKey);
    assert.equal(await sidecar.can(customerId, "api"), true, "the write dropped the cache");
    assert.deepEqual(await sidecar.getSubscription({ accountId, customerId }), sub);

    const methods = await sidecar.listPaymentMethods({ accountId });
    assert.equal(methods.length, 2);
    const spare = methods.find((m) => !m.isDefault).ref;
    const made = await sidecar.setDefaultPaymentMethod({ accountId, methodId: spare });
    assert.deepEqual([made.ref, made.isDefault], [spare, true]);
    const paying = await sidecar.setSubscriptionPaymentMethod({ accountId, customerId, methodId: spare });
    assert.equal(paying.defaultPaymentMethodRef, spare);
    const unused = methods.find((m) => m.ref !== spare).ref;
    assert.deepEqual(await sidecar.removePaymentMethod({ accountId, methodId: unused }), {
      ref: unused, removed: true,
    });
    assert.deepEqual((await sidecar.listPaymentMethods({ accountId })).map((m) => m.ref), [spare]);

    const invoices = await sidecar.listInvoices({ accountId });
    assert.equal(invoices.length, 1);
    assert.deepEqual(await sidecar.listInvoices({ accountId, customerId }), invoices);
    assert.deepEqual(await sidecar.listInvoices({ accountId, customerId: "someone_else" }), []);
    assert.deepEqual((await lastUpstream("list_invoices")).query, { customerId: "someone_else" });
    const pdf = await sidecar.invoicePdf({ accountId, invoiceId: invoices[0].ref });
    assert.ok(pdf instanceof Uint8Array, "bytes, not text");
    assert.equal(new TextDecoder("latin1").decode(pdf.slice(0, 5)), "%PDF-");
    assert.ok(Buffer.from(pdf).includes(invoices[0].number), "the invoice's own PDF");
    assert.ok(pdf.some((b) => b > 127), "binary bytes survive (a text decode would break them)");
    // invoicePdfUrl: an upstream from before SDK 1.2 redirects (invoicePdf then throws).
    await admin("PATCH", "/settings", { invoicePdf: "redirect" });
    try {
      const url = await sidecar.invoicePdfUrl({ accountId, invoiceId: invoices[0].ref });
      assert.ok(url.endsWith(`/${invoices[0].number}.pdf`), url);
      await assert.rejects(sidecar.invoicePdf({ accountId, invoiceId: invoices[0].ref }), {
        name: "SidecarApiError", status: 302,
      });
    } finally {
      await admin("PATCH", "/settings", { invoicePdf: "bytes" });
    }

    const status = await sidecar.setCustomerStatus({ accountId, customerId, status: "past_due" });
    assert.equal(status.status, "past_due");
    assert.equal((await sidecar.getEntitlements(customerId)).status, "past_due");
    const later = await sidecar.cancelSubscription({ accountId, customerId, atPeriodEnd: true });
    assert.equal(later.cancelAtPeriodEnd, true);
    assert.deepEqual((await lastUpstream("cancel_subscription")).query, { atPeriodEnd: "true" });
    const now = await sidecar.cancelSubscription({ accountId, customerId });
    assert.equal(now.status, "canceled");
    assert.deepEqual((await lastUpstream("cancel_subscription")).query, {});
    assert.equal(await sidecar.can(customerId, "api"), false);
    assert.equal((await sidecar.setAccountStatus({ accountId, status: "suspended" })).status, "suspended");
  });

  test("subscription changes", async () => {
    const accountId = uid("acct");
    const customerId = uid("cus");
    const account = await sidecar.createAccount({ accountId, billingCustomerId: "cus_billing_js" });
    assert.equal(account.billingCustomerId, "cus_billing_js");
    assert.deepEqual((await lastUpstream("create_account")).body, {
      accountId, billingCustomerId: "cus_billing_js",
    });
    assert.equal((await sidecar.createAccount({ accountId })).accountId, accountId, "the existing one");
    await assert.rejects(sidecar.createAccount({ accountId, billingCustomerId: "cus_other" }), {
      status: 409, code: "billing_customer_conflict",
    });
    await sidecar.createCustomer({ accountId, customerId, name: "Jane" });
    assert.deepEqual((await lastUpstream("create_customer")).body, { customerId, name: "Jane" });
    const sub = await sidecar.createSubscription({ accountId, customerId, planId: "team" });
    assert.deepEqual([sub.planId, sub.planVersion, sub.seats], ["team", 2, 1], "the newest version");
    assert.deepEqual((await lastUpstream("create_subscription")).body, { planId: "team", seats: 1 });
    const ents = await sidecar.getEntitlements(customerId);
    assert.deepEqual([ents.hasAccess(), ents.has("exports"), ents.has("sso")], [true, true, false]);

    const preview = await sidecar.previewChange({ accountId, customerId, seats: 4, addOnModuleIds: ["sso"] });
    assert.deepEqual([preview.current.seats, preview.proposed.seats], [1, 4]);
    assert.deepEqual((await lastUpstream("preview_change")).body, { seats: 4, addOnModuleIds: ["sso"] });
    assert.equal((await sidecar.setSeats({ accountId, customerId, seats: 3 })).seats, 3);
    assert.equal((await sidecar.getEntitlements(customerId)).config("seats"), 3, "dropped at once");
    await sidecar.addAddOn({ accountId, customerId, moduleId: "sso" });
    assert.deepEqual((await lastUpstream("change_add_ons")).body, { add: ["sso"] });
    assert.equal(await sidecar.can(customerId, "sso"), true);
    await sidecar.removeAddOn({ accountId, customerId, moduleId: "sso" });
    assert.deepEqual((await lastUpstream("change_add_ons")).body, { remove: ["sso"] });
    assert.equal(await sidecar.can(customerId, "sso"), false);
    const planned = await sidecar.changePlan({ accountId, customerId, planId: "pro", planVersion: 1 });
    assert.deepEqual([planned.planId, planned.planVersion], ["pro", 1]);
    assert.equal(await sidecar.can(customerId, "api"), true);
    const updated = await sidecar.updateSubscription({
      accountId, customerId, planId: "team", planVersion: 1, seats: 2, addOnModuleIds: ["audit"],
    });
    assert.deepEqual([updated.planId, updated.seats, updated.addOnModuleIds], ["team", 2, ["audit"]]);
    assert.deepEqual(
      [await sidecar.can(customerId, "audit"), await sidecar.can(customerId, "api")],
      [true, false],
    );
    await sidecar.cancelSubscription({ accountId, customerId });
    assert.equal(await sidecar.can(customerId, "audit"), false);
    assert.equal((await sidecar.reactivate({ accountId, customerId })).status, "active");
    assert.equal((await lastUpstream("reactivate")).body, null, "no body");
    assert.equal(await sidecar.can(customerId, "audit"), true);
    await assert.rejects(sidecar.setSeats({ accountId, customerId, seats: "3" }), {
      status: 400, code: "invalid_body",
    });
  });

  test("credits", async () => {
    const types = await sidecar.listCreditTypes();
    assert.deepEqual(types.map((t) => t.creditTypeId), ["api-calls", "exports"]);
    const packs = await sidecar.listCreditPacks({ creditTypeId: "exports" });
    assert.deepEqual(packs.map((p) => [p.packId, p.credits]), [["exports-10", 10]]);
    const customerId = uid("cus");
    await sidecar.createCustomer({ accountId: "acme", customerId });
    const tenant = env("VSC_TENANT");
    await admin("PUT", `/tenants/${tenant}/customers/${customerId}/credits/exports`, { balance: 12 });
    const balances = await sidecar.listCredits({ customerId });
    assert.deepEqual(
      Object.fromEntries(balances.map((c) => [c.creditTypeId, c.balance])),
      { "api-calls": 0, exports: 12 },
    );
    const idempotencyKey = uid("use");
    const spent = await sidecar.consumeCredits({ customerId, creditTypeId: "exports", amount: 5, idempotencyKey });
    assert.deepEqual([spent.balance, spent.consumed], [7, 5]);
    assert.deepEqual((await lastUpstream("consume_credits")).body, { amount: 5, idempotencyKey });
    const again = await sidecar.consumeCredits({ customerId, creditTypeId: "exports", amount: 5, idempotencyKey });
    assert.deepEqual(again, spent, "deducted once");
    await assert.rejects(
      sidecar.consumeCredits({ customerId, creditTypeId: "exports", amount: 8, idempotencyKey: uid("use") }),
      { status: 409, code: "insufficient_credits" },
    );
    await admin("PUT", `/tenants/${tenant}/customers/${customerId}/credits/exports`, { balance: 40 });
    const balance = await sidecar.getCreditBalance({ customerId, creditTypeId: "exports" });
    assert.equal(balance.balance, 40, "balances are never cached");
    const urls = { successUrl: "https://app.example/ok", cancelUrl: "https://app.example/no" };
    const one = await sidecar.createCreditCheckout({
      accountId: "acme", customerId, creditTypeId: "exports", packId: "exports-10", quantity: 2, ...urls,
    });
    assert.deepEqual([one.mode, one.amountTotal], ["payment", 1000]);
    const items = [{ creditTypeId: "api-calls", packId: "calls-1k" }];
    const several = await sidecar.createCreditCheckout({ accountId: "acme", customerId, items, ...urls });
    assert.deepEqual(several.items.map((i) => i.credits), [1000]);
    assert.deepEqual((await lastUpstream("create_credit_checkout")).body, { customerId, ...urls, items });
  });

  test("consumeCredits with wait: false is queued, and usage() tells its outcome", async () => {
    const tenant = env("VSC_TENANT");
    const customerId = uid("cus");
    await sidecar.createCustomer({ accountId: "acme", customerId });
    await admin("PUT", `/tenants/${tenant}/customers/${customerId}/credits/exports`, { balance: 12 });
    const idempotencyKey = uid("use");
    const args = { customerId, creditTypeId: "exports", amount: 5, idempotencyKey, wait: false };
    assert.deepEqual(await sidecar.consumeCredits(args), { queued: true, idempotencyKey });
    const deadline = Date.now() + 15000;
    let record = await sidecar.usage(idempotencyKey);
    while (record.state === "queued") {
      assert.ok(Date.now() < deadline, JSON.stringify(record));
      await new Promise((resolve) => setTimeout(resolve, 50));
      record = await sidecar.usage(idempotencyKey);
    }
    assert.deepEqual([record.state, record.answer.balance], ["delivered", 7]);
    assert.deepEqual((await lastUpstream("consume_credits")).body, { amount: 5, idempotencyKey });
    const again = await sidecar.consumeCredits(args);
    assert.deepEqual([again.queued, again.state], [false, "delivered"], "the same record");
    await assert.rejects(sidecar.consumeCredits({ ...args, amount: 6 }), {
      status: 422, code: "idempotency_key_reused",
    });
    await assert.rejects(sidecar.usage(uid("nobody")), { status: 404, code: "usage_not_found" });
    await assert.rejects(sidecar.usage(""), TypeError);
  });

  test("upstream errors carry status, code and body", async () => {
    const missing = await sidecar
      .getSubscription({ accountId: "acme", customerId: uid("ghost") })
      .then(() => null, (e) => e);
    assert.ok(missing instanceof SidecarApiError && missing instanceof SidecarError);
    assert.deepEqual([missing.status, missing.code], [404, "customer_not_found"]);
    assert.equal(missing.body.error.code, "customer_not_found");
    assert.match(missing.message, /404/);
    await assert.rejects(
      sidecar.createCustomer({ accountId: "acme", customerId: "cus_trial" }),
      { status: 409, code: "customer_exists" },
    );
    await assert.rejects(
      sidecar.setCustomerStatus({ accountId: "acme", customerId: "cus_trial", status: "x" }),
      { status: 400, code: "invalid_status" },
    );
  });
});

describe("unix socket", () => {
  test("a unix: base URL", async () => {
    const sidecar = new SidecarClient({ baseUrl: env("VSC_UNIX_URL") });
    try {
      assert.equal(await sidecar.can("cus_active", "reports"), true);
      assert.equal((await sidecar.getEntitlements("cus_trial")).status, "trialing");
      assert.deepEqual(await sidecar.check([["cus_trial", "exports"]]), [false]);
      // tests/test_client_js.py switched this stack's emulator to redirect (pre-1.2) PDFs.
      const [first] = await sidecar.listInvoices({ accountId: "acme" });
      const url = await sidecar.invoicePdfUrl({ accountId: "acme", invoiceId: first.ref });
      assert.match(url, /\/ACME-0001\.pdf$/);
    } finally {
      sidecar.close();
    }
  });
});

describe("fail closed", () => {
  test("the sidecar stopped: can and check answer false (true with failOpen)", async () => {
    const closed = new SidecarClient({ baseUrl: env("VSC_STOPPED_URL") });
    const open = new SidecarClient({ baseUrl: env("VSC_STOPPED_URL"), failOpen: true });
    assert.equal(await closed.can("cus_active", "reports"), false);
    assert.deepEqual(await closed.check([["cus_active", "reports"], ["cus_trial", "reports"]]), [false, false]);
    assert.equal(await open.can("cus_active", "reports"), true);
    assert.deepEqual(await open.check([["cus_active", "reports"]]), [true]);
    await assert.rejects(closed.getEntitlements("cus_active"), (e) => {
      assert.ok(e instanceof SidecarUnavailable);
      assert.equal(e.status, null);
      assert.match(e.message, /cannot reach the sidecar/);
      return true;
    });
    await assert.rejects(closed.listInvoices({ accountId: "acme" }), SidecarUnavailable);
    assert.equal(await closed.flag("beta", "cus_active", { default: true }), true);
    await assert.rejects(closed.flags("cus_active"), SidecarUnavailable);
  });

  test("the sidecar answers 503: can and check answer false (true with failOpen)", async () => {
    const baseUrl = env("VSC_UPSTREAM_DOWN_URL");
    const closed = new SidecarClient({ baseUrl, timeout: 10000 });
    const open = new SidecarClient({ baseUrl, timeout: 10000, failOpen: true });
    const customer = uid("cus");
    assert.equal(await closed.can(customer, "reports"), false);
    assert.equal(await open.can(customer, "reports"), true);
    assert.deepEqual(await closed.check([[customer, "a"], [customer, "b"]]), [false, false]);
    assert.deepEqual(await open.check([[customer, "a"]]), [true]);
    await assert.rejects(closed.getEntitlements(customer), {
      name: "SidecarUnavailable", status: 503, code: "upstream_unavailable",
    });
    assert.equal(await closed.flag("beta", customer, { default: false }), false);
    assert.equal(await closed.flag("beta", customer, { default: true }), true);
    await assert.rejects(closed.globalFlags(), { name: "SidecarUnavailable", status: 503 });
  });

  test("the sidecar's fail-open modules answer true even for a fail-closed client", async () => {
    const closed = new SidecarClient({ baseUrl: env("VSC_UPSTREAM_DOWN_URL"), timeout: 10000 });
    const customer = uid("cus");
    assert.equal(await closed.can(customer, "status_page"), true);
    assert.deepEqual(await closed.check([[customer, "status_page"], [customer, "reports"]]), [true, false]);
  });

  describe("a sidecar that never answers", () => {
    const held = [];
    const server = net.createServer((socket) => held.push(socket));
    before(() => new Promise((resolve) => server.listen(0, "127.0.0.1", resolve)));
    after(() => {
      for (const socket of held) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    });

    test("times out and fails closed", async () => {
      const baseUrl = `http://127.0.0.1:${server.address().port}`;
      const sidecar = new SidecarClient({ baseUrl, timeout: 300 });
      const started = performance.now();
      assert.equal(await sidecar.can("cus_active", "reports"), false);
      assert.ok(performance.now() - started < 3000);
      await assert.rejects(sidecar.getEntitlements("cus_active"), /timed out after 300 ms/);
    });
  });
});
