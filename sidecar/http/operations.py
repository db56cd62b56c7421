"""The one operation table: every Vellum operation the sidecar serves, as data.

Each row says where the operation lives upstream, what ``/v1`` checks before
calling it, whose cache a write drops, and what it answers. Everything else is
derived from it: the routes on both surfaces (``http/routes.py``), the
forwarding (``http/forwarding.py``), the ``paths`` of ``sidecar/openapi.json``
(``scripts/gen_openapi.py``) and the clients' call tables.

Every operation is served on two surfaces (:data:`SURFACES`):

- ``/v1<path>``, the local API, where ``<path>`` is the upstream path without
  ``/tenants/{t}``;
- ``/tenants/{t}<path>``, the drop-in mirror, for the configured tenant only, so
  an existing Vellum SDK works by pointing its base URL at the sidecar.

Plain data: this module imports nothing from aiohttp or the rest of the sidecar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = ["OPERATIONS", "SURFACES", "Answer", "Drops", "Operation", "Surface"]

Surface = Literal["v1", "mirror"]
Drops = Literal["customer", "account"]

#: Path prefix of each surface; the mirror's ``{tenant}`` must be the configured one.
SURFACES: Final[Mapping[Surface, str]] = {"v1": "/v1", "mirror": "/tenants/{tenant}"}

_PARAM: Final = re.compile(r"\{([a-z]+)\}")


@dataclass(frozen=True, slots=True)
class Answer:
    """An operation's success answer, as the OpenAPI document describes it."""

    status: int
    description: str
    schema: str | None = None
    """The JSON body's schema in ``components/schemas``; ``None``: no body (204, a redirect)."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One upstream operation: where it lives and what the sidecar does around it."""

    name: str
    method: str
    path: str
    """The upstream path without ``/tenants/{t}``; ``{name}`` is one id segment."""
    summary: str
    answer: Answer
    """The upstream's success answer, passed through as it is."""
    request: str | None = None
    """The JSON object body's schema (``components/schemas``); ``None``: no body."""
    required: tuple[str, ...] = ()
    """Body fields the upstream requires as non-empty strings; ``/v1`` checks them first."""
    query: tuple[str, ...] = ()
    """Query parameters the operation takes (``components/parameters`` by ``name``)."""
    query_ids: tuple[str, ...] = ()
    """Those of ``query`` that are ids; ``/v1`` refuses them empty or too long."""
    drops: Drops | None = None
    """Whose cache a write drops: the customer it names, or the account's customers."""
    cache: str | None = None
    """The document kind (``cache.kinds.KINDS``) whose cache answers it instead of the
    upstream; ``None``: forwarded."""
    local_answer: Answer | None = None
    """What ``/v1`` answers where it differs from the upstream (the cached read adds ``found``)."""
    params: tuple[str, ...] = field(init=False)
    """The path's ids, in order."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(_PARAM.findall(self.path)))

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


# The interface's table, in its order.
OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "get_entitlements",
        "GET",
        "/customers/{customer}/entitlements",
        "A customer's entitlements, from the cache",
        Answer(200, "the upstream document as the upstream gave it", "UpstreamEntitlements"),
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
        "Start a subscription checkout session",
        Answer(201, "the checkout session", "CheckoutSession"),
        request="CheckoutRequest",
        required=("customerId", "planId", "successUrl", "cancelUrl"),
    ),
    Operation(
        "create_setup_checkout",
        "POST",
        "/accounts/{account}/billing/setup-checkout",
        "Start a checkout session that adds a payment method",
        Answer(201, "the setup checkout session", "CheckoutSession"),
        request="SetupCheckoutRequest",
        required=("successUrl", "cancelUrl"),
    ),
    Operation(
        "create_subscription",
        "POST",
        "/accounts/{account}/customers/{customer}/subscribe",
        "Subscribe a customer to a plan",
        Answer(201, "the subscription", "Subscription"),
        request="SubscribeRequest",
        required=("planId",),
        drops="customer",
    ),
    Operation(
        "cancel_subscription",
        "DELETE",
        "/accounts/{account}/customers/{customer}/subscription",
        "Cancel a customer's subscription (atPeriodEnd=true to cancel at the period's end)",
        Answer(200, "the canceled (or cancel-at-period-end) subscription", "Subscription"),
        query=("atPeriodEnd",),
        drops="customer",
    ),
    Operation(
        "get_subscription",
        "GET",
        "/accounts/{account}/customers/{customer}/subscription",
        "A customer's subscription",
        Answer(200, "the subscription", "Subscription"),
    ),
    Operation(
        "create_account",
        "POST",
        "/accounts",
        "Create an account, adopting or creating its Stripe customer",
        Answer(201, "the account", "Account"),
        request="CreateAccountRequest",
        required=("accountId",),
    ),
    Operation(
        "create_customer",
        "POST",
        "/accounts/{account}/customers",
        "Create a customer under an account",
        Answer(201, "the customer", "Customer"),
        request="CreateCustomerRequest",
        required=("customerId",),
        drops="customer",
    ),
    Operation(
        "set_account_status",
        "PATCH",
        "/accounts/{account}",
        "Set an account's status",
        Answer(200, "the account", "Account"),
        request="StatusRequest",
        required=("status",),
        drops="account",
    ),
    Operation(
        "set_customer_status",
        "PATCH",
        "/accounts/{account}/customers/{customer}",
        "Set a customer's status",
        Answer(200, "the customer", "Customer"),
        request="StatusRequest",
        required=("status",),
        drops="customer",
    ),
    Operation(
        "list_payment_methods",
        "GET",
        "/accounts/{account}/payment-methods",
        "An account's payment methods",
        Answer(200, "the account's payment methods", "PaymentMethodList"),
    ),
    Operation(
        "set_default_payment_method",
        "PATCH",
        "/accounts/{account}/payment-methods/{method}",
        "Make a payment method the account's default",
        Answer(200, "the payment method, now the default", "PaymentMethod"),
    ),
    Operation(
        "remove_payment_method",
        "DELETE",
        "/accounts/{account}/payment-methods/{method}",
        "Remove a payment method from an account",
        Answer(204, "removed"),
    ),
    Operation(
        "set_subscription_payment_method",
        "PATCH",
        "/accounts/{account}/customers/{customer}/payment-method",
        "Set the payment method that pays a customer's subscription",
        Answer(200, "the subscription", "Subscription"),
        request="SubscriptionPaymentMethodRequest",
        required=("methodId",),
        drops="customer",
    ),
    Operation(
        "list_invoices",
        "GET",
        "/accounts/{account}/invoices",
        "An account's invoices (customerId to filter)",
        Answer(200, "the account's invoices", "InvoiceList"),
        query=("customerId",),
        query_ids=("customerId",),
    ),
    Operation(
        "invoice_pdf",
        "GET",
        "/accounts/{account}/invoices/{invoice}/pdf",
        "Redirect to an invoice's hosted PDF (never followed by the sidecar)",
        Answer(302, "redirect to the hosted PDF; the sidecar passes it on and never follows it"),
    ),
)
