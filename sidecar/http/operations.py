"""The one operation table: every Vellum operation the sidecar serves, as data.

Each row says where the operation lives upstream, which SDK methods call it
(and with which keywords: its fields in the SDK's order, their defaults), what
``/v1`` checks before calling it, whose cache a write drops, whether a write is
safe to retry, and what it answers. Everything else is derived from it: the
routes on both surfaces (``http/routes.py``), the forwarding and its log lines
(``http/forwarding.py``), the ``paths`` and the request schemas of
``sidecar/openapi.json`` (``scripts/gen_openapi.py``), the clients' call tables
and their methods (``scripts/gen_clients.py``), the table in ``docs/api.md``
(``scripts/gen_api_docs.py``), and the SDK stand-in of ``tests/test_proxy.py``.
A new upstream operation is one row here, its handler in the emulator
(``sidecar/emulator/operations.py``) and a test.

Every operation is served on two surfaces (:data:`SURFACES`):

- ``/v1<path>``, the local API, where ``<path>`` is the upstream path without
  ``/tenants/{t}``;
- ``/tenants/{t}<path>``, the drop-in mirror, for the configured tenant only, so
  an existing Vellum SDK works by pointing its base URL at the sidecar.

A tenant-scoped mirror path the table does not know is forwarded too (unless
``SIDECAR_FORWARD_UNKNOWN=false``); :func:`path_shape` names such a path for
metrics and logs without its ids.

Plain data: this module imports nothing from aiohttp or the rest of the sidecar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "ID_AFTER",
    "OPERATIONS",
    "SURFACES",
    "Answer",
    "Drops",
    "Field",
    "FieldKind",
    "Operation",
    "Surface",
    "id_field",
    "path_shape",
    "snake",
]

Surface = Literal["v1", "mirror"]
Drops = Literal["customer", "account"]
#: How ``/v1`` checks a body field: ``id`` is a non-empty string of at most 512
#: characters, ``string`` any non-empty string, ``integer`` a JSON integer (not a
#: boolean), ``strings`` a list of strings, ``objects`` a list of JSON objects.
FieldKind = Literal["id", "string", "integer", "boolean", "strings", "objects"]

#: Path prefix of each surface; the mirror's ``{tenant}`` must be the configured one.
SURFACES: Final[Mapping[Surface, str]] = {"v1": "/v1", "mirror": "/tenants/{tenant}"}

JSON: Final = "application/json"

_PARAM: Final = re.compile(r"\{([a-z_]+)\}")


def id_field(param: str) -> str:
    """A path parameter as logs, bodies and the JS client name its id (``credit_type``:
    ``creditTypeId``); any name a row gives a parameter has one."""
    first, *rest = param.split("_")
    return first + "".join(word.capitalize() for word in rest) + "Id"


def snake(name: str) -> str:
    """A JSON field's name as a Python keyword (``addOnModuleIds``: ``add_on_module_ids``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True, slots=True)
class Answer:
    """One success answer of an operation, as the OpenAPI document describes it."""

    status: int
    description: str
    schema: str | None = None
    """The JSON body's schema in ``components/schemas``; ``None``: no JSON body."""
    media_type: str | None = None
    """A body that is not JSON (``application/pdf``), passed on byte for byte."""
    list_field: str | None = None
    """The list the SDK method answers instead of the whole body (``methods``)."""


@dataclass(frozen=True, slots=True)
class Field:
    """One body (or query) field: what ``/v1`` checks before calling the upstream, and
    the SDK method's keyword for it (:attr:`arg`, in the row's order)."""

    name: str
    kind: FieldKind
    required: bool = False
    default: bool | int | None = None
    """The SDK keyword's default when it is not ``None`` (``seats=1``), sent as given;
    ``False`` for a boolean that is sent only when true."""

    @property
    def arg(self) -> str:
        return snake(self.name)


@dataclass(frozen=True, slots=True)
class Operation:
    """One upstream operation: where it lives and what the sidecar does around it."""

    name: str
    method: str
    path: str
    """The upstream path without ``/tenants/{t}``; ``{name}`` is one id segment."""
    summary: str
    answer: Answer
    """The upstream's usual success answer, passed through as it is."""
    sdk: tuple[str, ...] = ()
    """The ``vellumcharter`` 1.4.2 methods that call it (default: ``name`` alone), and so
    the clients' methods for it."""
    newer: bool = False
    """Added upstream after ``vellumcharter`` 1.4.2: no method of that SDK calls it
    (``sdk`` is the name the clients give it, and a newer SDK would)."""
    also: tuple[Answer, ...] = ()
    """Other success answers the upstream gives (an existing account's 200, an older
    upstream's redirect)."""
    request: str | None = None
    """The JSON object body's schema (``components/schemas``); ``None``: no body."""
    fields: tuple[Field, ...] = ()
    """Body fields ``/v1`` checks: the required ones must be there (not null) and any
    one present and not null must have its kind. Unknown fields pass untouched. In
    the SDK's keyword order (required ones first)."""
    query: tuple[Field, ...] = ()
    """Query parameters the operation takes; ``/v1`` refuses an ``id`` one empty or
    too long."""
    drops: Drops | None = None
    """Whose cache a write drops: the customer it names, or the account's customers."""
    retry_safe: bool = False
    """A write that may be retried without an ``Idempotency-Key``: it changes nothing,
    or the upstream deduplicates it by a key in its body."""
    cache: str | None = None
    """The document kind (``cache.kinds.KINDS``) whose cache answers it instead of the
    upstream; ``None``: forwarded."""
    local_answer: Answer | None = None
    """What ``/v1`` answers where it differs from the upstream (the cached read adds ``found``)."""
    deferred: bool = False
    """``/v1`` queues it on ``Prefer: respond-async`` (202; the fleet delivers it later,
    ``sidecar/usage``); without the header, and on the mirror, it is forwarded."""
    params: tuple[str, ...] = field(init=False)
    """The path's ids, in order."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(_PARAM.findall(self.path)))
        if not self.sdk:
            object.__setattr__(self, "sdk", (self.name,))

    @property
    def cached(self) -> bool:
        """Answered from a cache instead of forwarded."""
        return self.cache is not None

    @property
    def body(self) -> bool:
        """Takes a JSON object body, forwarded byte for byte (operations without one drop it)."""
        return self.request is not None

    @property
    def write(self) -> bool:
        return self.method != "GET"

    @property
    def query_ids(self) -> tuple[str, ...]:
        """The query parameters that are ids."""
        return tuple(f.name for f in self.query if f.kind == "id")

    @property
    def required(self) -> tuple[str, ...]:
        """The body fields the upstream requires; ``/v1`` refuses a body without them."""
        return tuple(f.name for f in self.fields if f.required)

    @property
    def answers(self) -> tuple[Answer, ...]:
        return (self.answer, *self.also)

    def route(self, surface: Surface) -> str:
        """The aiohttp route: every ``{name}`` takes any one segment, even an empty one.

        ``[^/]*`` rather than aiohttp's default ``[^{}/]+``: ids may contain braces,
        and an empty id should be a 400 naming it, not a bare 404.
        """
        return _PARAM.sub(r"{\1:[^/]*}", SURFACES[surface] + self.path)

    def segments(self, ids: Mapping[str, str]) -> list[str]:
        """The upstream path's segments after the tenant, ids in place (unquoted)."""
        out: list[str] = []
        for part in self.path.strip("/").split("/"):
            match = _PARAM.fullmatch(part)
            out.append(ids[match.group(1)] if match else part)
        return out

    def matches(self, segments: Sequence[str]) -> bool:
        """Whether a path (its decoded segments after the tenant) has this operation's shape."""
        template = self.path.strip("/").split("/")
        return len(template) == len(segments) and all(
            _PARAM.fullmatch(want) is not None or want == got
            for want, got in zip(template, segments, strict=True)
        )


_SUB: Final = "/accounts/{account}/customers/{customer}/subscription"
_URLS: Final = (Field("successUrl", "string", True), Field("cancelUrl", "string", True))
_PLAN: Final = (
    Field("planId", "id"),
    Field("planVersion", "integer"),
    Field("productId", "id"),
    Field("seats", "integer"),
    Field("addOnModuleIds", "strings"),
)


def _plan(*required: str, seats: int | None = None) -> tuple[Field, ...]:
    """The plan choice's fields (``planId``, ``planVersion``, ...) in the SDK's order,
    ``required`` among them; ``seats`` is the SDK's default seat count, if any."""
    return tuple(
        Field(f.name, f.kind, f.name in required, seats if f.name == "seats" else None)
        for f in _PLAN
    )


# The interface's table, in its order: one row per upstream route (``get_entitlements``
# and ``can``, ``flags`` and ``flag``, ``add_add_on`` and ``remove_add_on`` share theirs),
# then the operations the upstream added since (``newer``).
OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "get_entitlements",
        "GET",
        "/customers/{customer}/entitlements",
        "A customer's entitlements, from the cache",
        Answer(200, "the upstream document as the upstream gave it", "UpstreamEntitlements"),
        sdk=("get_entitlements", "can"),
        cache="entitlements",
        local_answer=Answer(
            200,
            "the document plus found (found: false for a customer the upstream does not know)",
            "Entitlements",
        ),
    ),
    Operation(
        "flags",
        "GET",
        "/customers/{customer}/flags",
        "A customer's flags (the global values with the customer's overrides), from the cache",
        Answer(200, "the customer's flags as the upstream gave them", "Flags"),
        sdk=("flags", "flag"),
        cache="flags",
    ),
    Operation(
        "global_flags",
        "GET",
        "/flags",
        "The tenant's global flags, from the cache",
        Answer(200, "the tenant-global flags as the upstream gave them", "Flags"),
        cache="global_flags",
    ),
    Operation(
        "create_checkout",
        "POST",
        "/accounts/{account}/checkout",
        "Start a hosted subscription checkout",
        Answer(201, "the checkout session", "CheckoutSession"),
        request="CheckoutRequest",
        fields=(Field("customerId", "id", True), *_plan("planId", seats=1), *_URLS),
    ),
    Operation(
        "create_setup_checkout",
        "POST",
        "/accounts/{account}/billing/setup-checkout",
        "Start a checkout session that adds a payment method",
        Answer(201, "the setup checkout session", "CheckoutSession"),
        request="SetupCheckoutRequest",
        fields=_URLS,
    ),
    Operation(
        "create_subscription",
        "POST",
        "/accounts/{account}/customers/{customer}/subscribe",
        "Subscribe a customer to a plan (no hosted page; the account's card pays)",
        Answer(201, "the subscription", "Subscription"),
        request="SubscribeRequest",
        fields=_plan("planId", seats=1),
        drops="customer",
    ),
    Operation(
        "get_subscription",
        "GET",
        _SUB,
        "A customer's subscription",
        Answer(200, "the subscription", "Subscription"),
    ),
    Operation(
        "update_subscription",
        "PUT",
        _SUB,
        "Change a subscription's plan, seats and add-ons at once",
        Answer(200, "the changed subscription", "Subscription"),
        request="UpdateSubscriptionRequest",
        fields=_plan("planId", "planVersion"),
        drops="customer",
    ),
    Operation(
        "cancel_subscription",
        "DELETE",
        _SUB,
        "Cancel a customer's subscription (atPeriodEnd=true to cancel at the period's end)",
        Answer(200, "the canceled (or cancel-at-period-end) subscription", "Subscription"),
        query=(Field("atPeriodEnd", "boolean", default=False),),
        drops="customer",
    ),
    Operation(
        "preview_change",
        "POST",
        _SUB + "/preview",
        "What a change would cost, changing nothing",
        Answer(200, "the current and the proposed subscription, and what is due now", "Preview"),
        request="PreviewChangeRequest",
        fields=(
            Field("productId", "id"),
            Field("planId", "id"),
            Field("planVersion", "integer"),
            Field("seats", "integer"),
            Field("addOnModuleIds", "strings"),
        ),
        retry_safe=True,
    ),
    Operation(
        "set_seats",
        "PATCH",
        _SUB + "/seats",
        "Set a subscription's seats",
        Answer(200, "the changed subscription", "Subscription"),
        request="SeatsRequest",
        fields=(Field("seats", "integer", True),),
        drops="customer",
    ),
    Operation(
        "change_add_ons",
        "PATCH",
        _SUB + "/add-ons",
        "Add ({add: [module]}) or remove ({remove: [module]}) add-ons",
        Answer(200, "the changed subscription", "Subscription"),
        sdk=("add_add_on", "remove_add_on"),
        request="AddOnsRequest",
        fields=(Field("add", "strings"), Field("remove", "strings")),
        drops="customer",
    ),
    Operation(
        "change_plan",
        "PATCH",
        _SUB + "/plan",
        "Move a subscription to another plan or plan version",
        Answer(200, "the changed subscription", "Subscription"),
        request="ChangePlanRequest",
        fields=(
            Field("productId", "id"),
            Field("planId", "id", True),
            Field("planVersion", "integer", True),
        ),
        drops="customer",
    ),
    Operation(
        "reactivate",
        "POST",
        _SUB + "/reactivate",
        "Withdraw a pending cancel, or restart an ended subscription",
        Answer(200, "the reactivated subscription", "Subscription"),
        drops="customer",
    ),
    Operation(
        "create_account",
        "POST",
        "/accounts",
        "Create an account (or answer the existing one), with its billing customer",
        Answer(201, "the account, created", "Account"),
        also=(Answer(200, "the account, which already existed", "Account"),),
        request="CreateAccountRequest",
        fields=(
            Field("accountId", "id", True),
            Field("name", "string"),
            Field("email", "string"),
            Field("billingCustomerId", "id"),
            Field("createBillingCustomer", "boolean", default=False),
        ),
    ),
    Operation(
        "create_customer",
        "POST",
        "/accounts/{account}/customers",
        "Create a customer under an account",
        Answer(201, "the customer", "Customer"),
        request="CreateCustomerRequest",
        fields=(Field("customerId", "id", True), Field("name", "string"), Field("email", "string")),
        drops="customer",
    ),
    Operation(
        "set_account_status",
        "PATCH",
        "/accounts/{account}",
        "Set an account's status",
        Answer(200, "the account", "Account"),
        request="StatusRequest",
        fields=(Field("status", "string", True),),
        drops="account",
    ),
    Operation(
        "set_customer_status",
        "PATCH",
        "/accounts/{account}/customers/{customer}",
        "Set a customer's status",
        Answer(200, "the customer", "Customer"),
        request="StatusRequest",
        fields=(Field("status", "string", True),),
        drops="customer",
    ),
    Operation(
        "list_payment_methods",
        "GET",
        "/accounts/{account}/payment-methods",
        "An account's saved cards",
        Answer(200, "the account's payment methods", "PaymentMethodList", list_field="methods"),
    ),
    Operation(
        "set_default_payment_method",
        "PATCH",
        "/accounts/{account}/payment-methods/{method}",
        "Make a payment method (its ref) the account's default",
        Answer(200, "the payment method, now the default", "PaymentMethod"),
    ),
    Operation(
        "remove_payment_method",
        "DELETE",
        "/accounts/{account}/payment-methods/{method}",
        "Remove a payment method (its ref) from an account",
        Answer(200, "removed", "RemovedPaymentMethod"),
        also=(Answer(204, "removed (upstreams before SDK 1.2 answered no body)"),),
    ),
    Operation(
        "set_subscription_payment_method",
        "PATCH",
        "/accounts/{account}/customers/{customer}/payment-method",
        "Set the payment method (its ref) that pays a customer's subscription",
        Answer(200, "the subscription", "Subscription"),
        request="SubscriptionPaymentMethodRequest",
        fields=(Field("methodId", "id", True),),
        drops="customer",
    ),
    Operation(
        "list_invoices",
        "GET",
        "/accounts/{account}/invoices",
        "An account's invoices (customerId to filter)",
        Answer(200, "the account's invoices", "InvoiceList", list_field="invoices"),
        query=(Field("customerId", "id"),),
    ),
    Operation(
        "invoice_pdf",
        "GET",
        "/accounts/{account}/invoices/{invoice}/pdf",
        "An invoice's PDF (its ref), after the upstream's ownership check",
        Answer(200, "the PDF's bytes, as the upstream sent them", media_type="application/pdf"),
        also=(
            Answer(
                302,
                "upstreams before SDK 1.2: a redirect to the hosted PDF, passed on and never "
                "followed",
            ),
        ),
    ),
    Operation(
        "create_credit_checkout",
        "POST",
        "/accounts/{account}/credit-checkout",
        "Start a hosted checkout that buys credit packs for a customer",
        Answer(201, "the checkout session", "CheckoutSession"),
        request="CreditCheckoutRequest",
        fields=(
            Field("customerId", "id", True),
            *_URLS,
            Field("creditTypeId", "id"),
            Field("packId", "id"),
            Field("quantity", "integer", default=1),
            Field("items", "objects"),
        ),
    ),
    Operation(
        "list_credit_types",
        "GET",
        "/credit-types",
        "The tenant's credit types",
        Answer(200, "the credit types", "CreditTypeList", list_field="creditTypes"),
    ),
    Operation(
        "list_credit_packs",
        "GET",
        "/credit-types/{credit_type}/packs",
        "The packs for sale within a credit type",
        Answer(200, "the packs", "CreditPackList", list_field="packs"),
    ),
    Operation(
        "list_credits",
        "GET",
        "/customers/{customer}/credits",
        "A customer's credit balances (uncached: balances change out of band)",
        Answer(200, "one balance per credit type", "CreditList", list_field="credits"),
    ),
    Operation(
        "get_credit_balance",
        "GET",
        "/customers/{customer}/credits/{credit_type}",
        "A customer's balance of one credit type (uncached)",
        Answer(200, "the balance", "CreditBalance"),
    ),
    Operation(
        "consume_credits",
        "POST",
        "/customers/{customer}/credits/{credit_type}/consume",
        "Spend credits: all or nothing, idempotent on the body's idempotencyKey",
        Answer(200, "the balance after the deduction", "ConsumedCredits"),
        request="ConsumeCreditsRequest",
        fields=(Field("amount", "integer", True), Field("idempotencyKey", "string", True)),
        retry_safe=True,
        deferred=True,
    ),
    # Added upstream after vellumcharter 1.4.2.
    Operation(
        "pause_subscription",
        "POST",
        _SUB + "/pause",
        "Pause a subscription: no access and no bill until reactivate resumes it, or "
        "until cycles periods have passed",
        Answer(200, "the paused subscription", "Subscription"),
        newer=True,
        request="PauseSubscriptionRequest",
        fields=(Field("cycles", "integer"),),
        drops="customer",
    ),
)

#: The literals of the table's paths that an id follows (``customers`` → ``customer``).
ID_AFTER: Final[Mapping[str, str]] = {
    literal: match.group(1)
    for op in OPERATIONS
    for literal, nxt in zip(op.path.split("/"), op.path.split("/")[1:], strict=False)
    if not _PARAM.fullmatch(literal) and (match := _PARAM.fullmatch(nxt)) is not None
}

#: A segment kept as it is in a path shape: a lowercase word, as collection and
#: action names are; anything else (digits, ``_``, capitals, dots) is an id.
_WORD: Final = re.compile(r"[a-z][a-z-]{0,31}")
#: Segments a shape shows; longer paths end in ``/*``.
_SHAPE_SEGMENTS: Final = 8


def path_shape(segments: Sequence[str]) -> str:
    """A path (its decoded segments after the tenant) with its ids replaced.

    The segment after a collection the table knows is that collection's id
    (``/customers/{customer}/usage``); any other segment that is not a short
    lowercase word is ``{id}``. The result names an unknown operation in metrics
    and logs without the ids in it (the metric also caps how many shapes it keeps).
    """
    out: list[str] = []
    after: str | None = None
    for segment in segments[:_SHAPE_SEGMENTS]:
        if after is not None:
            out.append("{" + after + "}")
            after = None
        elif segment in ID_AFTER:
            out.append(segment)
            after = ID_AFTER[segment]
        else:
            out.append(segment if _WORD.fullmatch(segment) else "{id}")
    if len(segments) > _SHAPE_SEGMENTS:
        out.append("*")
    return "/" + "/".join(out)
