// Types for vellum-sidecar-client.js: a tiny client for vellum-sidecar's local API.

export declare const VERSION: string;
export declare const DEFAULT_URL: "http://127.0.0.1:8700";
export declare const ENV_URL: "VELLUM_SIDECAR_URL";
/** The sidecar's batch limit; check() splits longer lists into several requests. */
export declare const MAX_BATCH: 1000;

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
/** A JSON object as the Vellum API answers it; unknown fields are kept. */
export type JsonObject = { [key: string]: Json };

/** Where the sidecar found an answer (the X-Sidecar-Cache header). */
export type CacheSource = "hit" | "miss" | "stale";

/** Base of every error this client throws. */
export declare class SidecarError extends Error {}

/**
 * No answer could be had: the sidecar is unreachable or timed out (status is
 * null), or it answered 502, 503 or 504 because it, or the Vellum API behind
 * it, could not answer. upstream_auth_failed is a SidecarApiError instead.
 */
export declare class SidecarUnavailable extends SidecarError {
  readonly status: number | null;
  readonly code: string | null;
  readonly body: Json | null;
}

/** A non-2xx answer, from the sidecar or from the Vellum API passed through it. */
export declare class SidecarApiError extends SidecarError {
  /** The HTTP status. */
  readonly status: number;
  /** error.code of a {"error": {"code", "message"}} body, else null. */
  readonly code: string | null;
  /** The parsed JSON body, or its text when it is not JSON. */
  readonly body: Json | null;
}

/** The local API's entitlement document: the upstream's, plus found. */
export interface EntitlementDocument {
  found: boolean;
  status: string | null;
  modules: string[];
  config: JsonObject;
  [key: string]: Json;
}

/** One customer's entitlements, as the Vellum SDK's EntitlementSet. */
export declare class EntitlementSet {
  constructor(customerId: string, data: EntitlementDocument, cache?: CacheSource | null);
  readonly customerId: string;
  /** False for a customer Vellum has no record of (never an exception). */
  readonly found: boolean;
  readonly status: string | null;
  readonly modules: string[];
  /** The whole document, unknown fields included. */
  readonly data: EntitlementDocument;
  readonly cache: CacheSource | null;
  /** The upstream's hasAccess, as the SDK answers it; false when the document has none. */
  hasAccess(): boolean;
  /** True when the status is active or trialing (the status alone; see hasAccess()). */
  isActive(): boolean;
  /** True when moduleId is one of the customer's modules (what can() answers). */
  has(moduleId: string): boolean;
  /** One value of the document's config object, or defaultValue (null when omitted). */
  config<T = Json>(key: string, defaultValue?: T): Json | T;
}

export interface SidecarClientOptions {
  /** http(s)://host:port[/prefix] or unix:/path.sock; else VELLUM_SIDECAR_URL, else http://127.0.0.1:8700. */
  baseUrl?: string;
  /**
   * Milliseconds for a cached call (can, check, getEntitlements, flags, ...); default 1000.
   * Each wait for the sidecar's next bytes is bounded by it (a socket timeout), and an idle
   * keep-alive connection is closed after it.
   */
  timeout?: number;
  /** Milliseconds for a billing call, which waits for the Vellum API; default 10000. */
  billingTimeout?: number;
  /** What can() and check() answer when no answer can be had; default false (fail closed). */
  failOpen?: boolean;
}

/** A pair for check(): [customerId, moduleId], or an object as the sidecar takes it. */
export type CheckPair = readonly [customerId: string, moduleId: string] | {
  customerId: string;
  module: string;
};

/** Sent as Idempotency-Key: the sidecar (and Vellum) may then retry the write safely. */
export interface WriteOptions {
  idempotencyKey?: string;
}

/** The plan a checkout or a subscription sells; optional fields are omitted, never null. */
export interface PlanChoice {
  planId: string;
  /** Omitted: the newest version sold in the sidecar key's mode. */
  planVersion?: number;
  /** Omitted: resolved from the plan (400 ambiguous_plan when two products sell it). */
  productId?: string;
  seats?: number;
  addOnModuleIds?: string[];
}

export interface CreateCheckoutArgs extends WriteOptions, PlanChoice {
  accountId: string;
  customerId: string;
  successUrl: string;
  cancelUrl: string;
}

export interface CreateSetupCheckoutArgs extends WriteOptions {
  accountId: string;
  successUrl: string;
  cancelUrl: string;
}

export interface CreateSubscriptionArgs extends WriteOptions, PlanChoice {
  accountId: string;
  customerId: string;
}

export interface CancelSubscriptionArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  atPeriodEnd?: boolean;
}

export interface SubscriptionArgs {
  accountId: string;
  customerId: string;
}

export interface UpdateSubscriptionArgs extends WriteOptions, PlanChoice {
  accountId: string;
  customerId: string;
  planVersion: number;
}

export interface PreviewChangeArgs extends Partial<PlanChoice> {
  accountId: string;
  customerId: string;
}

export interface SetSeatsArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  seats: number;
}

export interface AddOnArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  moduleId: string;
}

export interface ChangePlanArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  planId: string;
  planVersion: number;
  productId?: string;
}

export interface ReactivateArgs extends WriteOptions {
  accountId: string;
  customerId: string;
}

export interface CreateAccountArgs extends WriteOptions {
  accountId: string;
  name?: string | null;
  email?: string | null;
  /** Adopt this existing billing customer (409 when the account has another). */
  billingCustomerId?: string | null;
  createBillingCustomer?: boolean;
}

export interface CreateCustomerArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  name?: string | null;
  email?: string | null;
}

export interface SetAccountStatusArgs extends WriteOptions {
  accountId: string;
  status: string;
}

export interface SetCustomerStatusArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  status: string;
}

export interface AccountArgs {
  accountId: string;
}

export interface PaymentMethodArgs extends WriteOptions {
  accountId: string;
  /** The payment method's ref (a raw provider id is a 404). */
  methodId: string;
}

export interface SetSubscriptionPaymentMethodArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  methodId: string;
}

export interface ListInvoicesArgs {
  accountId: string;
  customerId?: string | null;
}

export interface InvoicePdfArgs {
  accountId: string;
  /** The invoice's ref. */
  invoiceId: string;
}

/** One pack of a credit checkout with several. */
export interface CreditItem {
  creditTypeId: string;
  packId: string;
  quantity?: number;
}

export interface CreateCreditCheckoutArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  successUrl: string;
  cancelUrl: string;
  creditTypeId?: string;
  packId?: string;
  quantity?: number;
  /** Several packs at once; creditTypeId, packId and quantity are then not sent. */
  items?: CreditItem[];
}

export interface CreditTypeArgs {
  creditTypeId: string;
}

export interface CustomerArgs {
  customerId: string;
}

export interface CreditBalanceArgs {
  customerId: string;
  creditTypeId: string;
}

export interface ConsumeCreditsArgs {
  customerId: string;
  creditTypeId: string;
  amount: number;
  /** Sent in the body, as the SDK does: the same key answers the first answer again. */
  idempotencyKey: string;
}

export declare class SidecarClient {
  constructor(options?: SidecarClientOptions);
  /** The base URL in use, e.g. http://127.0.0.1:8700 or unix:/run/sidecar.sock. */
  readonly baseUrl: string;
  readonly timeout: number;
  readonly billingTimeout: number;
  readonly failOpen: boolean;
  /** Close the idle keep-alive connections (the client stays usable). */
  close(): void;

  /** May the customer use the module? Never rejects for an outage (fail closed). */
  can(customerId: string, moduleId: string): Promise<boolean>;
  /** The customer's entitlements; found is false for an unknown customer. */
  getEntitlements(customerId: string): Promise<EntitlementSet>;
  /** can() for many pairs at once, in order. */
  check(pairs: Iterable<CheckPair>): Promise<boolean[]>;
  /** Drop one customer's cached entitlements, or everyone's, on every sidecar (not flags). */
  invalidate(customerId?: string | null): Promise<void>;

  /** Every flag for the customer: the global values with its overrides applied. */
  flags(customerId: string): Promise<Record<string, boolean>>;
  /**
   * One flag. `default` answers for a flag the upstream does not define and when no
   * answer can be had: never rejects for an outage.
   */
  flag(flagId: string, customerId: string, options: { default: boolean }): Promise<boolean>;
  /** The tenant-global flag values, no customer applied. */
  globalFlags(): Promise<Record<string, boolean>>;
  /** Drop one customer's cached flags, or every customer's and the globals, on every sidecar. */
  invalidateFlags(customerId?: string | null): Promise<void>;

  createCheckout(args: CreateCheckoutArgs): Promise<JsonObject>;
  createSetupCheckout(args: CreateSetupCheckoutArgs): Promise<JsonObject>;
  createSubscription(args: CreateSubscriptionArgs): Promise<JsonObject>;
  cancelSubscription(args: CancelSubscriptionArgs): Promise<JsonObject>;
  getSubscription(args: SubscriptionArgs): Promise<JsonObject>;
  /** Change the plan, seats and add-ons at once. */
  updateSubscription(args: UpdateSubscriptionArgs): Promise<JsonObject>;
  /** The cost of a change (current, proposed, amountDueNow); changes nothing. */
  previewChange(args: PreviewChangeArgs): Promise<JsonObject>;
  setSeats(args: SetSeatsArgs): Promise<JsonObject>;
  addAddOn(args: AddOnArgs): Promise<JsonObject>;
  removeAddOn(args: AddOnArgs): Promise<JsonObject>;
  changePlan(args: ChangePlanArgs): Promise<JsonObject>;
  /** Withdraw a pending cancel, or restart an ended subscription. */
  reactivate(args: ReactivateArgs): Promise<JsonObject>;
  /** Create the account, or answer the existing one. */
  createAccount(args: CreateAccountArgs): Promise<JsonObject>;
  createCustomer(args: CreateCustomerArgs): Promise<JsonObject>;
  setAccountStatus(args: SetAccountStatusArgs): Promise<JsonObject>;
  setCustomerStatus(args: SetCustomerStatusArgs): Promise<JsonObject>;
  /** The account's payment methods (the methods array). */
  listPaymentMethods(args: AccountArgs): Promise<JsonObject[]>;
  setDefaultPaymentMethod(args: PaymentMethodArgs): Promise<JsonObject>;
  /** {ref, removed: true}; null from an upstream that answers 204. */
  removePaymentMethod(args: PaymentMethodArgs): Promise<JsonObject | null>;
  setSubscriptionPaymentMethod(args: SetSubscriptionPaymentMethodArgs): Promise<JsonObject>;
  /** The account's invoices (the invoices array), optionally one customer's. */
  listInvoices(args: ListInvoicesArgs): Promise<JsonObject[]>;
  /** The invoice's PDF, its bytes as the upstream sent them. */
  invoicePdf(args: InvoicePdfArgs): Promise<Uint8Array>;
  /** Upstreams before SDK 1.2: the Location of the redirect, not followed. */
  invoicePdfUrl(args: InvoicePdfArgs): Promise<string>;

  /** A hosted checkout buying credit packs. */
  createCreditCheckout(args: CreateCreditCheckoutArgs): Promise<JsonObject>;
  /** The tenant's credit types (the creditTypes array). */
  listCreditTypes(): Promise<JsonObject[]>;
  /** The packs for sale within a credit type (the packs array). */
  listCreditPacks(args: CreditTypeArgs): Promise<JsonObject[]>;
  /** A customer's balances (the credits array); never cached. */
  listCredits(args: CustomerArgs): Promise<JsonObject[]>;
  getCreditBalance(args: CreditBalanceArgs): Promise<JsonObject>;
  /** Spend credits, all or nothing (409 insufficient_credits). */
  consumeCredits(args: ConsumeCreditsArgs): Promise<JsonObject>;
}

export default SidecarClient;
