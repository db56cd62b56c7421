// vellum-sidecar-client: a tiny client for vellum-sidecar's local API.
//
// One ES module, no dependencies: the platform's fetch (Node 18+, Deno, Bun).
// It keeps the Vellum SDK's method names (in camelCase) and argument names,
// without the API key, which only the sidecar holds.
//
//   import { SidecarClient } from "./vellum-sidecar-client.js";
//   const sidecar = new SidecarClient();  // VELLUM_SIDECAR_URL, else http://127.0.0.1:8700
//   if (await sidecar.can("cus_123", "reports")) { ... }
//
// The fail-closed rule: can() and check() answer false when no answer can be
// had (the sidecar is unreachable, times out, or answers 5xx), or true for
// every such answer with { failOpen: true }. Every other method throws
// SidecarUnavailable then, and SidecarApiError for any other non-2xx answer.

export const VERSION = "0.1.0";
export const DEFAULT_URL = "http://127.0.0.1:8700";
export const ENV_URL = "VELLUM_SIDECAR_URL";
/** The sidecar's batch limit; check() splits longer lists into several requests. */
export const MAX_BATCH = 1000;
const ACTIVE_STATUSES = new Set(["active", "trialing"]);

// -- errors ---------------------------------------------------------------------------

/** Base of every error this client throws. */
export class SidecarError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * No answer could be had: the sidecar is unreachable or timed out (status is
 * null), or it answered 502, 503 or 504 because it, or the Vellum API behind
 * it, could not answer. upstream_auth_failed is a SidecarApiError instead.
 */
export class SidecarUnavailable extends SidecarError {
  constructor(message, { status = null, code = null, body = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

/** A non-2xx answer, from the sidecar or from the Vellum API passed through it. */
export class SidecarApiError extends SidecarError {
  constructor(message, { status, code = null, body = null }) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

// -- entitlements ---------------------------------------------------------------------

/** One customer's entitlements, as the Vellum SDK's EntitlementSet. */
export class EntitlementSet {
  constructor(customerId, data, cache = null) {
    this.customerId = customerId;
    this.data = data;
    this.found = data.found !== false;
    this.status = typeof data.status === "string" ? data.status : null;
    this.modules = Array.isArray(data.modules)
      ? data.modules.filter((m) => typeof m === "string")
      : [];
    this.cache = cache;
  }

  /** True when the status is active or trialing. */
  isActive() {
    return ACTIVE_STATUSES.has(this.status);
  }

  /** True when moduleId is one of the customer's modules (what can() answers). */
  has(moduleId) {
    return this.modules.includes(moduleId);
  }

  /** One value of the document's config object, or defaultValue. */
  config(key, defaultValue = null) {
    const config = this.data.config;
    if (config !== null && typeof config === "object" && Object.hasOwn(config, key)) {
      return config[key];
    }
    return defaultValue;
  }
}

// -- helpers --------------------------------------------------------------------------

function seg(name, value) {
  if (typeof value !== "string" || value === "") {
    throw new TypeError(`${name} must be a non-empty string, got ${JSON.stringify(value)}`);
  }
  return encodeURIComponent(value);
}

const account = (accountId) => `/v1/accounts/${seg("accountId", accountId)}`;
const customer = (accountId, customerId) =>
  `${account(accountId)}/customers/${seg("customerId", customerId)}`;

function dropUndefined(body) {
  return Object.fromEntries(
    Object.entries(body).filter(([, v]) => v !== undefined && v !== null),
  );
}

function decode(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function failure(res) {
  const body = res.text ? decode(res.text) : null;
  const error = body !== null && typeof body === "object" ? body.error : undefined;
  const code = error && typeof error.code === "string" ? error.code : null;
  const message = error && typeof error.message === "string" ? error.message : null;
  const text =
    `${res.method} ${res.path} answered ${res.status}` +
    (code ? ` ${code}` : "") +
    (message ? `: ${message}` : "");
  if ([502, 503, 504].includes(res.status) && code !== "upstream_auth_failed") {
    return new SidecarUnavailable(text, { status: res.status, code, body });
  }
  return new SidecarApiError(text, { status: res.status, code, body });
}

function json(res) {
  if (res.status < 200 || res.status >= 300) throw failure(res);
  if (!res.text) return null;
  try {
    return JSON.parse(res.text);
  } catch {
    throw new SidecarError(`${res.method} ${res.path} answered ${res.status} with a body that is not JSON`);
  }
}

function object(res) {
  const data = json(res);
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new SidecarError(`${res.method} ${res.path} answered ${res.status} without a JSON object`);
  }
  return data;
}

const nothing = (res) => {
  json(res);
  return undefined;
};

const fieldList = (name) => (res) => {
  const value = object(res)[name];
  if (!Array.isArray(value)) {
    throw new SidecarError(`${res.method} ${res.path} answered without a "${name}" list`);
  }
  return value;
};

function location(res) {
  const target = res.headers.get("location");
  if (res.status >= 300 && res.status < 400 && target) return target;
  if (res.status >= 200 && res.status < 400) {
    throw new SidecarError(`${res.method} ${res.path} answered ${res.status} without a Location`);
  }
  throw failure(res);
}

/** A 2xx body for the fail-closed routes; any 5xx means no answer. */
function verdict(res) {
  if (res.status >= 500) {
    const error = failure(res);
    if (error instanceof SidecarUnavailable) throw error;
    throw new SidecarUnavailable(error.message, {
      status: error.status,
      code: error.code,
      body: error.body,
    });
  }
  return object(res);
}

function results(res) {
  const list = verdict(res).results;
  if (!Array.isArray(list)) {
    throw new SidecarError(`${res.method} ${res.path} answered without a "results" list`);
  }
  // null where the sidecar had no answer for that customer.
  return list.map((r) => {
    if (r === null || typeof r !== "object") {
      throw new SidecarError(`${res.method} ${res.path} answered a result that is not an object`);
    }
    return "error" in r && !r.fallback ? null : r.allowed === true;
  });
}

function normalizePairs(pairs) {
  return Array.from(pairs, (pair, i) => {
    const [customerId, moduleId] = Array.isArray(pair) ? pair : [pair.customerId, pair.module];
    seg(`pairs[${i}] customerId`, customerId);
    seg(`pairs[${i}] moduleId`, moduleId);
    return { customerId, module: moduleId };
  });
}

function environmentUrl() {
  try {
    const fromNode = globalThis.process?.env?.[ENV_URL];
    if (fromNode) return fromNode;
    return globalThis.Deno?.env?.get(ENV_URL) || undefined;
  } catch {
    return undefined; // e.g. Deno without --allow-env
  }
}

function parseBaseUrl(raw) {
  const url = String(raw).trim();
  if (url.startsWith("unix:")) {
    let path = url.slice("unix:".length);
    if (path.startsWith("//")) path = path.slice(2); // unix:///run/sidecar.sock
    if (!path) throw new TypeError(`a unix: URL needs a socket path, got ${JSON.stringify(url)}`);
    return { socketPath: path, origin: "http://localhost", prefix: "", display: `unix:${path}` };
  }
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    parsed = null;
  }
  if (!parsed || !["http:", "https:"].includes(parsed.protocol)) {
    throw new TypeError(
      `expected http://host:port, https://host:port or unix:/path.sock, got ${JSON.stringify(url)}`,
    );
  }
  const prefix = parsed.pathname.replace(/\/+$/, "");
  return { socketPath: null, origin: parsed.origin, prefix, display: parsed.origin + prefix };
}

// -- retrying a request on a closed keep-alive connection -----------------------------

const CLOSED_UNANSWERED = Symbol("closedUnanswered");
// "other side closed" (undici), a reset, a write to a closed socket.
const CLOSED_CODES = new Set(["UND_ERR_SOCKET", "ECONNRESET", "EPIPE"]);
const IDEMPOTENT = new Set(["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]);

function markClosed(error) {
  if (error && typeof error === "object") error[CLOSED_UNANSWERED] = true;
}

// GET, PUT, DELETE, the batch check (read-only) and writes with an Idempotency-Key.
function isIdempotent({ method, path, idempotencyKey }) {
  return IDEMPOTENT.has(method) || idempotencyKey != null || path === "/v1/check";
}

// -- the client -----------------------------------------------------------------------

/**
 * The client. Options: baseUrl (else VELLUM_SIDECAR_URL, else
 * http://127.0.0.1:8700; "unix:/path.sock" needs Node), timeout in
 * milliseconds for entitlement calls (answered from the sidecar's cache,
 * default 1000), billingTimeout for billing calls (they wait for the Vellum
 * API, default 10000), and failOpen (what can() and check() answer when no
 * answer can be had; default false: fail closed).
 */
export class SidecarClient {
  #target;
  #agent = null;

  constructor({ baseUrl, timeout = 1000, billingTimeout = 10000, failOpen = false } = {}) {
    this.#target = parseBaseUrl(baseUrl ?? environmentUrl() ?? DEFAULT_URL);
    this.baseUrl = this.#target.display;
    this.timeout = timeout;
    this.billingTimeout = billingTimeout;
    this.failOpen = failOpen;
  }

  /** Close idle keep-alive connections of a unix-socket client (fetch pools its own). */
  close() {
    this.#agent?.destroy();
    this.#agent = null;
  }

  async #send(call) {
    // A kept-alive connection the sidecar closed (idle timeout, shutdown drain)
    // just as this request went out fails before any byte of the answer: send
    // an idempotent request once more, on a new connection.
    try {
      return await this.#sendOnce(call);
    } catch (error) {
      if (error?.cause?.[CLOSED_UNANSWERED] && isIdempotent(call)) return await this.#sendOnce(call);
      throw error;
    }
  }

  async #sendOnce({ method, path, query, body, billing = false, idempotencyKey }) {
    const timeout = billing ? this.billingTimeout : this.timeout;
    const search = query ? `?${new URLSearchParams(query)}` : "";
    const target = `${this.#target.prefix}${path}${search}`;
    const headers = { accept: "application/json", "user-agent": `vellum-sidecar-client/${VERSION} (js)` };
    const payload = body === undefined ? undefined : JSON.stringify(body);
    if (payload !== undefined) headers["content-type"] = "application/json";
    if (idempotencyKey != null) headers["idempotency-key"] = idempotencyKey;
    try {
      if (this.#target.socketPath !== null) {
        return { method, path, ...(await this.#overSocket(method, target, headers, payload, timeout)) };
      }
      const signal = AbortSignal.timeout(timeout);
      let res;
      try {
        res = await fetch(this.#target.origin + target, {
          method,
          headers,
          body: payload,
          redirect: "manual", // the invoice PDF's redirect is the answer, never followed
          signal,
        });
      } catch (error) {
        // fetch pools its own connections and does not say whether this one was
        // reused; a connection closed before the answer's first byte (not a
        // refused or timed-out one) is what a closed keep-alive connection gives.
        if (!signal.aborted && CLOSED_CODES.has(error?.cause?.code)) markClosed(error);
        throw error;
      }
      return { method, path, status: res.status, headers: res.headers, text: await res.text() };
    } catch (error) {
      if (error instanceof SidecarError) throw error;
      const timedOut = error?.name === "TimeoutError" || error?.name === "AbortError";
      const reason = timedOut
        ? `no answer: timed out after ${timeout} ms`
        : `${error?.cause?.code ?? error?.code ?? error?.name ?? "error"}: ${error?.cause?.message ?? error?.message ?? error}`;
      throw new SidecarUnavailable(
        `${method} ${path}: cannot reach the sidecar at ${this.baseUrl} (${reason})`,
        { cause: error },
      );
    }
  }

  async #overSocket(method, target, headers, payload, timeout) {
    // fetch cannot dial a unix socket; node:http can (Node, and Bun/Deno's node compat).
    const http = await import("node:http");
    this.#agent ??= new http.Agent({ keepAlive: true });
    return await new Promise((resolve, reject) => {
      const req = http.request(
        {
          socketPath: this.#target.socketPath,
          agent: this.#agent,
          method,
          path: target,
          headers: { ...headers, host: "localhost" },
        },
        (res) => {
          const chunks = [];
          res.on("data", (chunk) => chunks.push(chunk));
          res.on("error", reject);
          res.on("end", () => {
            const map = new Headers();
            for (const [name, value] of Object.entries(res.headers)) {
              if (value !== undefined) map.set(name, Array.isArray(value) ? value.join(", ") : value);
            }
            resolve({
              status: res.statusCode,
              headers: map,
              text: Buffer.concat(chunks).toString("utf8"),
            });
          });
        },
      );
      let answered = false;
      req.on("response", () => {
        answered = true;
      });
      req.setTimeout(timeout, () => {
        const error = new Error("timed out");
        error.name = "TimeoutError";
        req.destroy(error);
      });
      req.on("error", (error) => {
        // Node's own advice: a reused socket reset before any answer may be retried.
        if (req.reusedSocket && !answered && CLOSED_CODES.has(error?.code)) markClosed(error);
        reject(error);
      });
      req.end(payload);
    });
  }

  async #run(call, read) {
    return read(await this.#send(call));
  }

  // -- entitlements

  /** May the customer use the module? Never throws for an outage (fail closed). */
  async can(customerId, moduleId) {
    const path = `/v1/customers/${seg("customerId", customerId)}/can/${seg("moduleId", moduleId)}`;
    try {
      return await this.#run({ method: "GET", path }, (res) => verdict(res).allowed === true);
    } catch (error) {
      if (error instanceof SidecarUnavailable) return this.failOpen;
      throw error;
    }
  }

  /** The customer's entitlements; found is false for an unknown customer. */
  async getEntitlements(customerId) {
    const path = `/v1/customers/${seg("customerId", customerId)}/entitlements`;
    return this.#run(
      { method: "GET", path },
      (res) => new EntitlementSet(customerId, object(res), res.headers.get("x-sidecar-cache")),
    );
  }

  /** can() for many [customerId, moduleId] pairs (or {customerId, module}) at once, in order. */
  async check(pairs) {
    const checks = normalizePairs(pairs);
    const verdicts = [];
    for (let start = 0; start < checks.length; start += MAX_BATCH) {
      const chunk = checks.slice(start, start + MAX_BATCH);
      let answers;
      try {
        answers = await this.#run(
          { method: "POST", path: "/v1/check", body: { checks: chunk } },
          results,
        );
      } catch (error) {
        if (!(error instanceof SidecarUnavailable)) throw error;
        answers = chunk.map(() => null);
      }
      for (const answer of answers) verdicts.push(answer === null ? this.failOpen : answer);
    }
    return verdicts;
  }

  /** Drop one customer's cached entitlements, or everyone's, on every sidecar. */
  async invalidate(customerId) {
    const path =
      customerId === undefined || customerId === null
        ? "/v1/cache"
        : `/v1/customers/${seg("customerId", customerId)}/cache`;
    await this.#run({ method: "DELETE", path }, nothing);
  }

  // -- billing

  async createCheckout({
    accountId, customerId, planId, planVersion, successUrl, cancelUrl, seats = 1, idempotencyKey,
  }) {
    const body = { customerId, planId, planVersion, seats, successUrl, cancelUrl };
    const path = `${account(accountId)}/checkout`;
    return this.#run({ method: "POST", path, body, billing: true, idempotencyKey }, object);
  }

  async createSetupCheckout({ accountId, successUrl, cancelUrl, idempotencyKey }) {
    const path = `${account(accountId)}/billing/setup-checkout`;
    const body = { successUrl, cancelUrl };
    return this.#run({ method: "POST", path, body, billing: true, idempotencyKey }, object);
  }

  async createSubscription({ accountId, customerId, planId, planVersion, seats = 1, idempotencyKey }) {
    const path = `${customer(accountId, customerId)}/subscribe`;
    const body = { planId, planVersion, seats };
    return this.#run({ method: "POST", path, body, billing: true, idempotencyKey }, object);
  }

  async cancelSubscription({ accountId, customerId, atPeriodEnd = false, idempotencyKey }) {
    const path = `${customer(accountId, customerId)}/subscription`;
    const query = atPeriodEnd ? { atPeriodEnd: "true" } : undefined;
    return this.#run({ method: "DELETE", path, query, billing: true, idempotencyKey }, object);
  }

  async getSubscription({ accountId, customerId }) {
    const path = `${customer(accountId, customerId)}/subscription`;
    return this.#run({ method: "GET", path, billing: true }, object);
  }

  async createAccount({
    accountId, name, email, stripeCustomerId, createStripeCustomer = false, idempotencyKey,
  }) {
    seg("accountId", accountId);
    const body = dropUndefined({ accountId, name, email, stripeCustomerId });
    if (createStripeCustomer) body.createStripeCustomer = true;
    return this.#run(
      { method: "POST", path: "/v1/accounts", body, billing: true, idempotencyKey },
      object,
    );
  }

  async createCustomer({ accountId, customerId, email, idempotencyKey }) {
    seg("customerId", customerId);
    const path = `${account(accountId)}/customers`;
    const body = dropUndefined({ customerId, email });
    return this.#run({ method: "POST", path, body, billing: true, idempotencyKey }, object);
  }

  async setAccountStatus({ accountId, status, idempotencyKey }) {
    const path = account(accountId);
    return this.#run(
      { method: "PATCH", path, body: { status }, billing: true, idempotencyKey },
      object,
    );
  }

  async setCustomerStatus({ accountId, customerId, status, idempotencyKey }) {
    const path = customer(accountId, customerId);
    return this.#run(
      { method: "PATCH", path, body: { status }, billing: true, idempotencyKey },
      object,
    );
  }

  async listPaymentMethods({ accountId }) {
    const path = `${account(accountId)}/payment-methods`;
    return this.#run({ method: "GET", path, billing: true }, fieldList("methods"));
  }

  async setDefaultPaymentMethod({ accountId, methodId, idempotencyKey }) {
    const path = `${account(accountId)}/payment-methods/${seg("methodId", methodId)}`;
    return this.#run({ method: "PATCH", path, billing: true, idempotencyKey }, object);
  }

  async removePaymentMethod({ accountId, methodId, idempotencyKey }) {
    const path = `${account(accountId)}/payment-methods/${seg("methodId", methodId)}`;
    return this.#run({ method: "DELETE", path, billing: true, idempotencyKey }, nothing);
  }

  async setSubscriptionPaymentMethod({ accountId, customerId, methodId, idempotencyKey }) {
    seg("methodId", methodId);
    const path = `${customer(accountId, customerId)}/payment-method`;
    return this.#run(
      { method: "PATCH", path, body: { methodId }, billing: true, idempotencyKey },
      object,
    );
  }

  async listInvoices({ accountId, customerId }) {
    const path = `${account(accountId)}/invoices`;
    const query = customerId === undefined || customerId === null ? undefined : { customerId };
    return this.#run({ method: "GET", path, query, billing: true }, fieldList("invoices"));
  }

  /** The hosted PDF's URL: the Location of the sidecar's redirect, not followed. */
  async invoicePdfUrl({ accountId, invoiceId }) {
    const path = `${account(accountId)}/invoices/${seg("invoiceId", invoiceId)}/pdf`;
    return this.#run({ method: "GET", path, billing: true }, location);
  }
}

export default SidecarClient;
