// vellum-sidecar-client: a tiny client for vellum-sidecar's local API.
//
// One ES module, no dependencies: node:http with a keep-alive Agent (Node 18+,
// and Bun and Deno through their Node compatibility).
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

import http from "node:http";
import https from "node:https";

export const VERSION = "0.1.0";
export const DEFAULT_URL = "http://127.0.0.1:8700";
export const ENV_URL = "VELLUM_SIDECAR_URL";
/** The sidecar's batch limit; check() splits longer lists into several requests. */
export const MAX_BATCH = 1000;
const ACTIVE_STATUSES = new Set(["active", "trialing"]);
const IDEMPOTENT = new Set(["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]);
/** Every request's headers, unless it has a body or an Idempotency-Key; never changed. */
const HEADERS = Object.freeze({
  accept: "application/json",
  "user-agent": `vellum-sidecar-client/${VERSION} (js)`,
});

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

  /**
   * The upstream's word on access (its hasAccess), as the SDK answers it: false
   * when the document has none (an unknown customer, an upstream before SDK 1.2).
   * Gate features on has(): the upstream empties modules when access is withheld.
   */
  hasAccess() {
    return this.data.hasAccess === true;
  }

  /** True when the status is active or trialing (the status alone; see hasAccess()). */
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

// -- the Vellum operations: each one's method, /v1 path, ids ({name}, the methods'
// nameId argument), JSON body, and whether the sidecar's cache answers it (the short
// timeout) rather than the Vellum API (billingTimeout).

// BEGIN GENERATED operation table: scripts/gen_clients.py writes it from the sidecar's own
const OPERATIONS = Object.freeze({
  get_entitlements: { method: "GET", path: "/v1/customers/{customer}/entitlements", cached: true },
  flags: { method: "GET", path: "/v1/customers/{customer}/flags", cached: true },
  global_flags: { method: "GET", path: "/v1/flags", cached: true },
  create_checkout: { method: "POST", path: "/v1/accounts/{account}/checkout", body: true },
  create_setup_checkout: {
    method: "POST", path: "/v1/accounts/{account}/billing/setup-checkout", body: true,
  },
  create_subscription: {
    method: "POST", path: "/v1/accounts/{account}/customers/{customer}/subscribe", body: true,
  },
  get_subscription: {
    method: "GET", path: "/v1/accounts/{account}/customers/{customer}/subscription",
  },
  update_subscription: {
    method: "PUT", path: "/v1/accounts/{account}/customers/{customer}/subscription", body: true,
  },
  cancel_subscription: {
    method: "DELETE", path: "/v1/accounts/{account}/customers/{customer}/subscription",
  },
  preview_change: {
    method: "POST", path: "/v1/accounts/{account}/customers/{customer}/subscription/preview",
    body: true,
  },
  set_seats: {
    method: "PATCH", path: "/v1/accounts/{account}/customers/{customer}/subscription/seats",
    body: true,
  },
  change_add_ons: {
    method: "PATCH", path: "/v1/accounts/{account}/customers/{customer}/subscription/add-ons",
    body: true,
  },
  change_plan: {
    method: "PATCH", path: "/v1/accounts/{account}/customers/{customer}/subscription/plan",
    body: true,
  },
  reactivate: {
    method: "POST", path: "/v1/accounts/{account}/customers/{customer}/subscription/reactivate",
  },
  create_account: { method: "POST", path: "/v1/accounts", body: true },
  create_customer: { method: "POST", path: "/v1/accounts/{account}/customers", body: true },
  set_account_status: { method: "PATCH", path: "/v1/accounts/{account}", body: true },
  set_customer_status: {
    method: "PATCH", path: "/v1/accounts/{account}/customers/{customer}", body: true,
  },
  list_payment_methods: { method: "GET", path: "/v1/accounts/{account}/payment-methods" },
  set_default_payment_method: {
    method: "PATCH", path: "/v1/accounts/{account}/payment-methods/{method}",
  },
  remove_payment_method: {
    method: "DELETE", path: "/v1/accounts/{account}/payment-methods/{method}",
  },
  set_subscription_payment_method: {
    method: "PATCH", path: "/v1/accounts/{account}/customers/{customer}/payment-method", body: true,
  },
  list_invoices: { method: "GET", path: "/v1/accounts/{account}/invoices" },
  invoice_pdf: { method: "GET", path: "/v1/accounts/{account}/invoices/{invoice}/pdf" },
  create_credit_checkout: {
    method: "POST", path: "/v1/accounts/{account}/credit-checkout", body: true,
  },
  list_credit_types: { method: "GET", path: "/v1/credit-types" },
  list_credit_packs: { method: "GET", path: "/v1/credit-types/{credit_type}/packs" },
  list_credits: { method: "GET", path: "/v1/customers/{customer}/credits" },
  get_credit_balance: { method: "GET", path: "/v1/customers/{customer}/credits/{credit_type}" },
  consume_credits: {
    method: "POST", path: "/v1/customers/{customer}/credits/{credit_type}/consume", body: true,
    deferred: true,
  },
  pause_subscription: {
    method: "POST", path: "/v1/accounts/{account}/customers/{customer}/subscription/pause",
    body: true,
  },
});
// END GENERATED operation table

/**
 * The request for one operation of OPERATIONS, its ids quoted into the path. `wait: false`
 * asks the sidecar to queue a deferred operation (Prefer: respond-async).
 */
function op(name, ids, { body, query, idempotencyKey, wait = true } = {}) {
  const route = OPERATIONS[name];
  const params = [...route.path.matchAll(/\{(\w+)\}/g)].map((m) => m[1]);
  const given = Object.keys(ids);
  if (
    given.length !== params.length ||
    !params.every((p) => given.includes(p)) ||
    (body !== undefined) !== (route.body === true)
  ) {
    throw new TypeError(`${name} takes the ids ${params} and a body: ${route.body === true}`);
  }
  const camel = (p) => p.replace(/_(\w)/g, (_, c) => c.toUpperCase());
  const path = route.path.replace(/\{(\w+)\}/g, (_, p) => seg(`${camel(p)}Id`, ids[p]));
  const billing = route.cached !== true;
  if (!wait) {
    if (route.deferred !== true) throw new TypeError(`${name} cannot be queued (wait: false)`);
    return { method: route.method, path, query, body, billing, idempotencyKey, respondAsync: true };
  }
  return { method: route.method, path, query, body, billing, idempotencyKey };
}

function dropUndefined(body) {
  return Object.fromEntries(
    Object.entries(body).filter(([, v]) => v !== undefined && v !== null),
  );
}

/** A query string's parameters without the unset ones; undefined when none is set. */
function queryOf(values) {
  const query = dropUndefined(values);
  return Object.keys(query).length > 0 ? query : undefined;
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

/** A 2xx JSON object, or null for an answer without a body (a 204). */
function maybeObject(res) {
  if (res.status >= 200 && res.status < 300 && !res.text) return null;
  return object(res);
}

/** A 2xx body as it came (the invoice PDF): its bytes, never decoded. */
function bytes(res) {
  if (res.status < 200 || res.status >= 300) throw failure(res);
  return res.bytes;
}

/** A flags document's flags: a new object each call (the caller may change it). */
function flagsOf(res) {
  const flags = object(res).flags;
  if (flags === null || typeof flags !== "object" || Array.isArray(flags)) {
    throw new SidecarError(`${res.method} ${res.path} answered without a "flags" object`);
  }
  return Object.fromEntries(Object.entries(flags).filter(([, v]) => typeof v === "boolean"));
}

function flagValue(res) {
  const value = object(res).value;
  if (typeof value !== "boolean") {
    throw new SidecarError(`${res.method} ${res.path} answered without a boolean "value"`);
  }
  return value;
}

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
    // The browser guard wants a loopback Host; over a socket it is only a name.
    const connect = { socketPath: path, host: "localhost", port: undefined };
    return { socketPath: path, prefix: "", display: `unix:${path}`, secure: false, connect };
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
  const secure = parsed.protocol === "https:";
  // node:http wants an IPv6 literal without its brackets.
  const host = parsed.hostname.replace(/^\[(.*)\]$/, "$1");
  const port = parsed.port || (secure ? 443 : 80);
  const connect = { socketPath: undefined, host, port };
  return { socketPath: null, prefix, display: parsed.origin + prefix, secure, connect };
}

// -- the transport --------------------------------------------------------------------

/** An answer's headers, read as fetch's Headers are: get(name) -> string or null. */
class AnswerHeaders {
  #raw;

  constructor(raw) {
    this.#raw = raw; // node:http's, names in lower case
  }

  get(name) {
    const value = this.#raw[name.toLowerCase()];
    if (value === undefined) return null;
    return Array.isArray(value) ? value.join(", ") : String(value);
  }
}

/** One answer: status, headers, and its body as text (UTF-8, invalid bytes replaced) or bytes. */
class Answer {
  #body;
  #text = null;

  constructor(method, path, status, headers, body) {
    this.method = method;
    this.path = path;
    this.status = status;
    this.headers = headers;
    this.#body = body; // a Buffer
  }

  /** Decoded on first use, once. */
  get text() {
    this.#text ??= this.#body.toString("utf8");
    return this.#text;
  }

  /** A plain Uint8Array of its own (the invoice PDF), not a view of a pooled Buffer. */
  get bytes() {
    return new Uint8Array(this.#body);
  }
}

function timeoutError() {
  const error = new Error("timed out");
  error.name = "TimeoutError";
  return error;
}

// -- the client -----------------------------------------------------------------------

/**
 * The client. Options: baseUrl (else VELLUM_SIDECAR_URL, else
 * http://127.0.0.1:8700, or "unix:/path.sock"), timeout in milliseconds for
 * entitlement calls (answered from the sidecar's cache, default 1000),
 * billingTimeout for billing calls (they wait for the Vellum API, default
 * 10000), and failOpen (what can() and check() answer when no answer can be
 * had; default false: fail closed). A timeout bounds each wait for the
 * sidecar's next bytes (a socket timeout, as the Python client's).
 *
 * Connections are kept alive and reused, in one node:http Agent whose sockets
 * carry the entitlement timeout, so an entitlement call sets no timer of its
 * own (a billing call sets billingTimeout on its socket while it runs). An idle
 * connection is closed after that timeout too. close() closes the idle ones.
 */
export class SidecarClient {
  #target;
  #agents = new Map(); // socket timeout in ms -> a keep-alive Agent with it

  constructor({ baseUrl, timeout = 1000, billingTimeout = 10000, failOpen = false } = {}) {
    this.#target = parseBaseUrl(baseUrl ?? environmentUrl() ?? DEFAULT_URL);
    this.baseUrl = this.#target.display;
    this.timeout = timeout;
    this.billingTimeout = billingTimeout;
    this.failOpen = failOpen;
  }

  /** Close idle keep-alive connections (the client stays usable). */
  close() {
    for (const agent of this.#agents.values()) agent.destroy();
    this.#agents.clear();
  }

  #agent(timeout) {
    let agent = this.#agents.get(timeout);
    if (agent === undefined) {
      agent = new (this.#target.secure ? https : http).Agent({ keepAlive: true, timeout });
      this.#agents.set(timeout, agent);
    }
    return agent;
  }

  /** The answer to one call, or a SidecarUnavailable rejection when none can be had. */
  #send({ method, path, query, body, billing = false, idempotencyKey, respondAsync = false }) {
    const timeout = billing ? this.billingTimeout : this.timeout;
    const search = query ? `?${new URLSearchParams(query)}` : "";
    const target = this.#target.prefix + path + search;
    const payload = body === undefined ? undefined : JSON.stringify(body);
    let headers = HEADERS;
    if (payload !== undefined || idempotencyKey != null || respondAsync) {
      headers = { ...HEADERS };
      if (payload !== undefined) headers["content-type"] = "application/json";
      if (idempotencyKey != null) {
        if (/[\r\n]/.test(idempotencyKey)) {
          throw new TypeError("idempotencyKey must not contain line breaks");
        }
        headers["idempotency-key"] = idempotencyKey;
      }
      if (respondAsync) headers.prefer = "respond-async";
    }
    return new Promise((resolve, reject) => {
      this.#exchange(method, path, target, headers, payload, timeout, resolve, reject, 1);
    });
  }

  #exchange(method, path, target, headers, payload, timeout, resolve, reject, attempt) {
    const { secure, connect } = this.#target;
    // One literal of one shape: a spread here costs a tenth of a call's time.
    const options = {
      socketPath: connect.socketPath,
      host: connect.host,
      port: connect.port,
      agent: this.#agent(this.timeout),
      method,
      path: target,
      headers,
      timeout: timeout === this.timeout ? undefined : timeout, // else the Agent's
    };
    let answered = false;
    const req = (secure ? https : http).request(options, (res) => {
      answered = true;
      const chunks = [];
      res.on("data", (chunk) => chunks.push(chunk));
      res.on("end", () => {
        const bytes = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
        resolve(new Answer(method, path, res.statusCode, new AnswerHeaders(res.headers), bytes));
      });
      res.on("error", (error) => reject(this.#unreachable(method, path, error, timeout)));
    });
    // The socket's timeout: no bytes from the sidecar for `timeout` ms.
    req.on("timeout", () => req.destroy(timeoutError()));
    req.on("error", (error) => {
      // A kept-alive connection the sidecar closed meanwhile fails before any byte of
      // the answer: send it once more, on a new connection, when that is safe (a read,
      // PUT/DELETE, the read-only batch check, a write with an Idempotency-Key, a record
      // queued under its own key).
      if (attempt === 1 && !answered && req.reusedSocket &&
          (error.code === "ECONNRESET" || error.code === "EPIPE") &&
          (IDEMPOTENT.has(method) || path === "/v1/check" || "idempotency-key" in headers ||
           "prefer" in headers)) {
        this.#exchange(method, path, target, headers, payload, timeout, resolve, reject, 2);
        return;
      }
      reject(this.#unreachable(method, path, error, timeout));
    });
    req.end(payload);
  }

  #unreachable(method, path, error, timeout) {
    const reason = error?.name === "TimeoutError"
      ? `no answer: timed out after ${timeout} ms`
      : `${error?.code ?? error?.name ?? "error"}: ${error?.message ?? error}`;
    return new SidecarUnavailable(
      `${method} ${path}: cannot reach the sidecar at ${this.baseUrl} (${reason})`,
      { cause: error },
    );
  }

  async #run(call, read) {
    return read(await this.#send(call));
  }

  // -- entitlements

  /** May the customer use the module? Never throws for an outage (fail closed). */
  async can(customerId, moduleId) {
    const path = `/v1/customers/${seg("customerId", customerId)}/can/${seg("moduleId", moduleId)}`;
    try {
      return verdict(await this.#send({ method: "GET", path })).allowed === true;
    } catch (error) {
      if (error instanceof SidecarUnavailable) return this.failOpen;
      throw error;
    }
  }

  /** The customer's entitlements; found is false for an unknown customer. */
  async getEntitlements(customerId) {
    return this.#run(
      op("get_entitlements", { customer: customerId }),
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

  /** Drop one customer's cached entitlements, or everyone's, on every sidecar (not flags). */
  async invalidate(customerId) {
    await this.#drop(customerId, "entitlements");
  }

  async #drop(customerId, axis) {
    const path =
      customerId === undefined || customerId === null
        ? "/v1/cache"
        : `/v1/customers/${seg("customerId", customerId)}/cache`;
    await this.#run({ method: "DELETE", path, query: { axis } }, nothing);
  }

  // -- flags: a separate axis (a flag says a feature is on, never that it was paid for)

  /** Every flag for the customer: the global values with its overrides applied. */
  async flags(customerId) {
    return this.#run(op("flags", { customer: customerId }), flagsOf);
  }

  /**
   * One flag; `default` is the answer for a flag the upstream does not define and
   * when no answer can be had (never throws for an outage, like the Vellum SDK).
   */
  async flag(flagId, customerId, { default: fallback } = {}) {
    if (typeof fallback !== "boolean") {
      throw new TypeError("flag() needs { default: true | false }: there is no safe default");
    }
    const path =
      `/v1/customers/${seg("customerId", customerId)}/flags/${seg("flagId", flagId)}`;
    try {
      return await this.#run(
        { method: "GET", path, query: { default: String(fallback) } },
        flagValue,
      );
    } catch (error) {
      if (error instanceof SidecarUnavailable) return fallback;
      throw error;
    }
  }

  /** The tenant-global flag values, no customer applied (a job with no user at hand). */
  async globalFlags() {
    return this.#run(op("global_flags", {}), flagsOf);
  }

  /** Drop one customer's cached flags, or everyone's and the globals, on every sidecar. */
  async invalidateFlags(customerId) {
    await this.#drop(customerId, "flags");
  }

  // -- billing: a method per operation of the table, generated (scripts/gen_clients.py)

  // BEGIN GENERATED billing methods
  /** Start a hosted subscription checkout. */
  async createCheckout({
    accountId, customerId, planId, successUrl, cancelUrl, planVersion, productId, seats = 1,
    addOnModuleIds, idempotencyKey,
  }) {
    seg("customerId", customerId);
    seg("planId", planId);
    const body = dropUndefined({
      customerId, planId, planVersion, productId, seats, addOnModuleIds, successUrl, cancelUrl,
    });
    const ids = { account: accountId };
    const call = op("create_checkout", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Start a checkout session that adds a payment method. */
  async createSetupCheckout({ accountId, successUrl, cancelUrl, idempotencyKey }) {
    const body = dropUndefined({ successUrl, cancelUrl });
    const ids = { account: accountId };
    const call = op("create_setup_checkout", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Subscribe a customer to a plan (no hosted page; the account's card pays). */
  async createSubscription({
    accountId, customerId, planId, planVersion, productId, seats = 1, addOnModuleIds,
    idempotencyKey,
  }) {
    seg("planId", planId);
    const body = dropUndefined({ planId, planVersion, productId, seats, addOnModuleIds });
    const ids = { account: accountId, customer: customerId };
    const call = op("create_subscription", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** A customer's subscription. */
  async getSubscription({ accountId, customerId }) {
    const ids = { account: accountId, customer: customerId };
    const call = op("get_subscription", ids);
    return this.#run(call, object);
  }

  /** Change a subscription's plan, seats and add-ons at once. */
  async updateSubscription({
    accountId, customerId, planId, planVersion, productId, seats, addOnModuleIds, idempotencyKey,
  }) {
    seg("planId", planId);
    const body = dropUndefined({ planId, planVersion, productId, seats, addOnModuleIds });
    const ids = { account: accountId, customer: customerId };
    const call = op("update_subscription", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Cancel a customer's subscription (atPeriodEnd=true to cancel at the period's end). */
  async cancelSubscription({ accountId, customerId, atPeriodEnd = false, idempotencyKey }) {
    const query = queryOf({ atPeriodEnd: atPeriodEnd ? "true" : undefined });
    const ids = { account: accountId, customer: customerId };
    const call = op("cancel_subscription", ids, { query, idempotencyKey });
    return this.#run(call, object);
  }

  /** What a change would cost, changing nothing. */
  async previewChange({
    accountId, customerId, productId, planId, planVersion, seats, addOnModuleIds,
  }) {
    const body = dropUndefined({ productId, planId, planVersion, seats, addOnModuleIds });
    const ids = { account: accountId, customer: customerId };
    const call = op("preview_change", ids, { body });
    return this.#run(call, object);
  }

  /** Set a subscription's seats. */
  async setSeats({ accountId, customerId, seats, idempotencyKey }) {
    const body = dropUndefined({ seats });
    const ids = { account: accountId, customer: customerId };
    const call = op("set_seats", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Move a subscription to another plan or plan version. */
  async changePlan({ accountId, customerId, planId, planVersion, productId, idempotencyKey }) {
    seg("planId", planId);
    const body = dropUndefined({ productId, planId, planVersion });
    const ids = { account: accountId, customer: customerId };
    const call = op("change_plan", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Withdraw a pending cancel, or restart an ended subscription. */
  async reactivate({ accountId, customerId, idempotencyKey }) {
    const ids = { account: accountId, customer: customerId };
    const call = op("reactivate", ids, { idempotencyKey });
    return this.#run(call, object);
  }

  /** Create an account (or answer the existing one), with its billing customer. */
  async createAccount({
    accountId, name, email, billingCustomerId, createBillingCustomer = false, idempotencyKey,
  }) {
    seg("accountId", accountId);
    const body = dropUndefined({
      accountId, name, email, billingCustomerId,
      createBillingCustomer: createBillingCustomer ? true : undefined,
    });
    const call = op("create_account", {}, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Create a customer under an account. */
  async createCustomer({ accountId, customerId, name, email, idempotencyKey }) {
    seg("customerId", customerId);
    const body = dropUndefined({ customerId, name, email });
    const ids = { account: accountId };
    const call = op("create_customer", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Set an account's status. */
  async setAccountStatus({ accountId, status, idempotencyKey }) {
    const body = dropUndefined({ status });
    const ids = { account: accountId };
    const call = op("set_account_status", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** Set a customer's status. */
  async setCustomerStatus({ accountId, customerId, status, idempotencyKey }) {
    const body = dropUndefined({ status });
    const ids = { account: accountId, customer: customerId };
    const call = op("set_customer_status", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** An account's saved cards. */
  async listPaymentMethods({ accountId }) {
    const ids = { account: accountId };
    const call = op("list_payment_methods", ids);
    return this.#run(call, fieldList("methods"));
  }

  /** Make a payment method (its ref) the account's default. */
  async setDefaultPaymentMethod({ accountId, methodId, idempotencyKey }) {
    const ids = { account: accountId, method: methodId };
    const call = op("set_default_payment_method", ids, { idempotencyKey });
    return this.#run(call, object);
  }

  /** Remove a payment method (its ref) from an account. */
  async removePaymentMethod({ accountId, methodId, idempotencyKey }) {
    const ids = { account: accountId, method: methodId };
    const call = op("remove_payment_method", ids, { idempotencyKey });
    return this.#run(call, maybeObject);
  }

  /** Set the payment method (its ref) that pays a customer's subscription. */
  async setSubscriptionPaymentMethod({ accountId, customerId, methodId, idempotencyKey }) {
    seg("methodId", methodId);
    const body = dropUndefined({ methodId });
    const ids = { account: accountId, customer: customerId };
    const call = op("set_subscription_payment_method", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }

  /** An account's invoices (customerId to filter). */
  async listInvoices({ accountId, customerId }) {
    const query = queryOf({ customerId });
    const ids = { account: accountId };
    const call = op("list_invoices", ids, { query });
    return this.#run(call, fieldList("invoices"));
  }

  /** An invoice's PDF (its ref), after the upstream's ownership check. */
  async invoicePdf({ accountId, invoiceId }) {
    const ids = { account: accountId, invoice: invoiceId };
    const call = op("invoice_pdf", ids);
    return this.#run(call, bytes);
  }

  /** The tenant's credit types. */
  async listCreditTypes() {
    const call = op("list_credit_types", {});
    return this.#run(call, fieldList("creditTypes"));
  }

  /** The packs for sale within a credit type. */
  async listCreditPacks({ creditTypeId }) {
    const ids = { credit_type: creditTypeId };
    const call = op("list_credit_packs", ids);
    return this.#run(call, fieldList("packs"));
  }

  /** A customer's credit balances (uncached: balances change out of band). */
  async listCredits({ customerId }) {
    const ids = { customer: customerId };
    const call = op("list_credits", ids);
    return this.#run(call, fieldList("credits"));
  }

  /** A customer's balance of one credit type (uncached). */
  async getCreditBalance({ customerId, creditTypeId }) {
    const ids = { customer: customerId, credit_type: creditTypeId };
    const call = op("get_credit_balance", ids);
    return this.#run(call, object);
  }

  /**
   * Spend credits: all or nothing, idempotent on the body's idempotencyKey. `wait: false`: queued
   * by the sidecar instead (`Prefer: respond-async`) and delivered by it later, even through an
   * outage: the 202 `{queued, idempotencyKey}`, or the outcome once the key's record is final;
   * `usage(key)` reads it.
   */
  async consumeCredits({ customerId, creditTypeId, amount, idempotencyKey, wait = true }) {
    const body = dropUndefined({ amount, idempotencyKey });
    const ids = { customer: customerId, credit_type: creditTypeId };
    const call = op("consume_credits", ids, { body, wait });
    return this.#run(call, object);
  }

  /**
   * Pause a subscription: no access and no bill until reactivate resumes it, or until cycles
   * periods have passed.
   */
  async pauseSubscription({ accountId, customerId, cycles, idempotencyKey }) {
    const body = dropUndefined({ cycles });
    const ids = { account: accountId, customer: customerId };
    const call = op("pause_subscription", ids, { body, idempotencyKey });
    return this.#run(call, object);
  }
  // END GENERATED billing methods

  // -- billing written by hand: several SDK methods on one operation, or a body that
  // is not one argument per field (one pack or several), or an older upstream's answer

  async addAddOn({ accountId, customerId, moduleId, idempotencyKey }) {
    const ids = { account: accountId, customer: customerId };
    return this.#run(op("change_add_ons", ids, { body: { add: [moduleId] }, idempotencyKey }), object);
  }

  async removeAddOn({ accountId, customerId, moduleId, idempotencyKey }) {
    const ids = { account: accountId, customer: customerId };
    const body = { remove: [moduleId] };
    return this.#run(op("change_add_ons", ids, { body, idempotencyKey }), object);
  }

  /**
   * A queued usage record (consumeCredits({ ..., wait: false })) by its key: { state:
   * "queued" | "delivered" | "insufficient" | "rejected", ... }. Rejects with
   * SidecarApiError (404 usage_not_found) for a key no record has.
   */
  async usage(idempotencyKey) {
    const path = `/v1/usage/${seg("idempotencyKey", idempotencyKey)}`;
    return this.#run({ method: "GET", path, billing: true }, object);
  }

  /** Upstreams before SDK 1.2: the Location of the redirect, not followed. */
  async invoicePdfUrl({ accountId, invoiceId }) {
    return this.#run(op("invoice_pdf", { account: accountId, invoice: invoiceId }), location);
  }

  /** A hosted checkout buying one pack (creditTypeId, packId, quantity) or several (items). */
  async createCreditCheckout({
    accountId, customerId, successUrl, cancelUrl, creditTypeId, packId, quantity = 1, items,
    idempotencyKey,
  }) {
    const body = { customerId, successUrl, cancelUrl };
    if (items !== undefined && items !== null) body.items = items;
    else Object.assign(body, dropUndefined({ creditTypeId, packId, quantity }));
    const call = op("create_credit_checkout", { account: accountId }, { body, idempotencyKey });
    return this.#run(call, object);
  }
}

export default SidecarClient;
