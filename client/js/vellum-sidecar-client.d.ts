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

// BEGIN GENERATED argument types
export interface CreateCheckoutArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  planId: string;
  successUrl: string;
  cancelUrl: string;
  planVersion?: number | null;
  productId?: string | null;
  seats?: number;
  addOnModuleIds?: string[] | null;
}

export interface CreateSetupCheckoutArgs extends WriteOptions {
  accountId: string;
  successUrl: string;
  cancelUrl: string;
}

export interface CreateSubscriptionArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  planId: string;
  planVersion?: number | null;
  productId?: string | null;
  seats?: number;
  addOnModuleIds?: string[] | null;
}

export interface GetSubscriptionArgs {
  accountId: string;
  customerId: string;
}

export interface UpdateSubscriptionArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  planId: string;
  planVersion: number;
  productId?: string | null;
  seats?: number | null;
  addOnModuleIds?: string[] | null;
}

export interface CancelSubscriptionArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  atPeriodEnd?: boolean;
}

export interface PreviewChangeArgs {
  accountId: string;
  customerId: string;
  productId?: string | null;
  planId?: string | null;
  planVersion?: number | null;
  seats?: number | null;
  addOnModuleIds?: string[] | null;
}

export interface SetSeatsArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  seats: number;
}

export interface ChangePlanArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  planId: string;
  planVersion: number;
  productId?: string | null;
}

export interface ReactivateArgs extends WriteOptions {
  accountId: string;
  customerId: string;
}

export interface CreateAccountArgs extends WriteOptions {
  accountId: string;
  name?: string | null;
  email?: string | null;
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

export interface ListPaymentMethodsArgs {
  accountId: string;
}

export interface SetDefaultPaymentMethodArgs extends WriteOptions {
  accountId: string;
  methodId: string;
}

export interface RemovePaymentMethodArgs extends WriteOptions {
  accountId: string;
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
  invoiceId: string;
}

export interface ListCreditPacksArgs {
  creditTypeId: string;
}

export interface ListCreditsArgs {
  customerId: string;
}

export interface GetCreditBalanceArgs {
  customerId: string;
  creditTypeId: string;
}

export interface ConsumeCreditsArgs {
  customerId: string;
  creditTypeId: string;
  amount: number;
  idempotencyKey: string;
  wait?: boolean;
}

export interface PauseSubscriptionArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  cycles?: number | null;
}
// END GENERATED argument types

/** The names these argument types had before they were generated. */
export type SubscriptionArgs = GetSubscriptionArgs;
export type AccountArgs = ListPaymentMethodsArgs;
export type PaymentMethodArgs = SetDefaultPaymentMethodArgs;
export type CreditTypeArgs = ListCreditPacksArgs;
export type CustomerArgs = ListCreditsArgs;
export type CreditBalanceArgs = GetCreditBalanceArgs;

export interface AddOnArgs extends WriteOptions {
  accountId: string;
  customerId: string;
  moduleId: string;
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

  // BEGIN GENERATED billing methods
  /** Start a hosted subscription checkout. */
  createCheckout(args: CreateCheckoutArgs): Promise<JsonObject>;
  /** Start a checkout session that adds a payment method. */
  createSetupCheckout(args: CreateSetupCheckoutArgs): Promise<JsonObject>;
  /** Subscribe a customer to a plan (no hosted page; the account's card pays). */
  createSubscription(args: CreateSubscriptionArgs): Promise<JsonObject>;
  /** A customer's subscription. */
  getSubscription(args: GetSubscriptionArgs): Promise<JsonObject>;
  /** Change a subscription's plan, seats and add-ons at once. */
  updateSubscription(args: UpdateSubscriptionArgs): Promise<JsonObject>;
  /** Cancel a customer's subscription (atPeriodEnd=true to cancel at the period's end). */
  cancelSubscription(args: CancelSubscriptionArgs): Promise<JsonObject>;
  /** What a change would cost, changing nothing. */
  previewChange(args: PreviewChangeArgs): Promise<JsonObject>;
  /** Set a subscription's seats. */
  setSeats(args: SetSeatsArgs): Promise<JsonObject>;
  /** Move a subscription to another plan or plan version. */
  changePlan(args: ChangePlanArgs): Promise<JsonObject>;
  /** Withdraw a pending cancel, or restart an ended subscription. */
  reactivate(args: ReactivateArgs): Promise<JsonObject>;
  /** Create an account (or answer the existing one), with its billing customer. */
  createAccount(args: CreateAccountArgs): Promise<JsonObject>;
  /** Create a customer under an account. */
  createCustomer(args: CreateCustomerArgs): Promise<JsonObject>;
  /** Set an account's status. */
  setAccountStatus(args: SetAccountStatusArgs): Promise<JsonObject>;
  /** Set a customer's status. */
  setCustomerStatus(args: SetCustomerStatusArgs): Promise<JsonObject>;
  /** An account's saved cards. */
  listPaymentMethods(args: ListPaymentMethodsArgs): Promise<JsonObject[]>;
  /** Make a payment method (its ref) the account's default. */
  setDefaultPaymentMethod(args: SetDefaultPaymentMethodArgs): Promise<JsonObject>;
  /** Remove a payment method (its ref) from an account. */
  removePaymentMethod(args: RemovePaymentMethodArgs): Promise<JsonObject | null>;
  /** Set the payment method (its ref) that pays a customer's subscription. */
  setSubscriptionPaymentMethod(args: SetSubscriptionPaymentMethodArgs): Promise<JsonObject>;
  /** An account's invoices (customerId to filter). */
  listInvoices(args: ListInvoicesArgs): Promise<JsonObject[]>;
  /** An invoice's PDF (its ref), after the upstream's ownership check. */
  invoicePdf(args: InvoicePdfArgs): Promise<Uint8Array>;
  /** The tenant's credit types. */
  listCreditTypes(): Promise<JsonObject[]>;
  /** The packs for sale within a credit type. */
  listCreditPacks(args: ListCreditPacksArgs): Promise<JsonObject[]>;
  /** A customer's credit balances (uncached: balances change out of band). */
  listCredits(args: ListCreditsArgs): Promise<JsonObject[]>;
  /** A customer's balance of one credit type (uncached). */
  getCreditBalance(args: GetCreditBalanceArgs): Promise<JsonObject>;
  /**
   * Spend credits: all or nothing, idempotent on the body's idempotencyKey. `wait: false`: queued
   * by the sidecar instead (`Prefer: respond-async`) and delivered by it later, even through an
   * outage: the 202 `{queued, idempotencyKey}`, or the outcome once the key's record is final;
   * `usage(key)` reads it.
   */
  consumeCredits(args: ConsumeCreditsArgs): Promise<JsonObject>;
  /**
   * Pause a subscription: no access and no bill until reactivate resumes it, or until cycles
   * periods have passed.
   */
  pauseSubscription(args: PauseSubscriptionArgs): Promise<JsonObject>;
  // END GENERATED billing methods

  addAddOn(args: AddOnArgs): Promise<JsonObject>;
  removeAddOn(args: AddOnArgs): Promise<JsonObject>;
  /** A queued usage record (consumeCredits with wait: false) by its idempotency key. */
  usage(idempotencyKey: string): Promise<JsonObject>;
  /** Upstreams before SDK 1.2: the Location of the redirect, not followed. */
  invoicePdfUrl(args: InvoicePdfArgs): Promise<string>;
  /** A hosted checkout buying credit packs: one pack, or several (items). */
  createCreditCheckout(args: CreateCreditCheckoutArgs): Promise<JsonObject>;
}

export default SidecarClient;
