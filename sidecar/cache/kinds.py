"""The document kinds the cache holds, each described once (``Kind``).

One cache mechanism (``cache.DocumentCache``) serves every kind; what differs
between them is data: the upstream path, the freshness TTL, the Redis key
prefix, what a valid document looks like and what the local API answers.

Kinds belong to an *axis*, the unit of invalidation: ``entitlements`` (a
customer's entitlement document) and ``flags`` (a customer's flags, and the
tenant's global flags). A push about flags drops the flags axis; the local
``DELETE`` routes take ``?axis=`` to narrow a drop to one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from ..config import Settings
from ..errors import error_body

__all__ = [
    "AXES",
    "ENTITLEMENTS",
    "FLAGS",
    "GLOBAL_FLAGS",
    "GLOBAL_ID",
    "KINDS",
    "NOT_FOUND_BODY",
    "NOT_FOUND_DOC",
    "Axis",
    "Kind",
]

Axis = Literal["entitlements", "flags"]
#: Every axis, in the order drops apply them.
AXES: Final[tuple[Axis, ...]] = ("entitlements", "flags")

#: The one id the tenant-wide kind (global flags) caches its document under.
GLOBAL_ID: Final = "-"

#: The local API's body for a customer the upstream has no entitlements for.
NOT_FOUND_DOC: Final[dict[str, Any]] = {"found": False, "status": None, "modules": [], "config": {}}
NOT_FOUND_BODY: Final = orjson.dumps(NOT_FOUND_DOC)


@dataclass(frozen=True, slots=True, eq=False)
class Kind:
    """One kind of cached document: everything the cache needs to know about it."""

    name: str
    """The metric label and log field (``entitlements``, ``flags``, ``global_flags``)."""
    axis: Axis
    operation: str
    """The operation table's row (and the upstream metrics' ``operation`` label)."""
    path: tuple[str, ...]
    """The upstream path after ``/tenants/{t}``; ``{customer}`` is the cached id."""
    key: str
    """Prefix of the kind's Redis keys inside the tenant's namespace (see ``redis.keys``)."""
    ttl: Callable[[Settings], float]
    """The freshness TTL, read from the settings."""
    check: Callable[[dict[str, Any]], str | None]
    """``None`` when a 200 body (a JSON object) is a document of this kind, else why not."""
    local_body: Callable[[dict[str, Any]], bytes]
    """The local API's body for a document (built once per entry)."""
    missing: str
    """What a 404 means, for the body answered when the upstream sent none worth keeping."""
    missing_status: int
    """The local API's status for a document the upstream does not have (its 404)."""
    missing_body: bytes
    """And its body."""
    dropped: tuple[str, ...] = ()
    """Fields removed from a document: the local API's own word replaces them."""
    upstream_body: Callable[[bytes], bytes] = lambda local: local
    """The upstream's document from the local body (an entry keeps only the latter)."""
    flags: bool = False
    """A flags document: entries keep its boolean flags for ``Entry.flag``."""

    @property
    def per_customer(self) -> bool:
        """Cached per customer (else one document for the tenant, under ``GLOBAL_ID``)."""
        return "{customer}" in self.path

    def segments(self, ident: str) -> tuple[str, ...]:
        """The upstream path's segments after the tenant for the document ``ident``."""
        return tuple(ident if part == "{customer}" else part for part in self.path)

    def __repr__(self) -> str:
        return f"Kind({self.name})"


_FOUND: Final = b',"found":true}'


def _entitlements_local(doc: dict[str, Any]) -> bytes:
    # "found" comes last (the document's own was dropped), which _entitlements_upstream
    # relies on.
    return orjson.dumps({**doc, "found": True})


def _entitlements_upstream(local: bytes) -> bytes:
    """The document without the ``"found": true`` that ``_entitlements_local`` appended."""
    if local.endswith(_FOUND):
        return local[: -len(_FOUND)] + b"}"
    return b"{}"  # {"found":true}: the document was empty


def _not_found(message: str) -> bytes:
    return orjson.dumps(error_body("not_found", message))


def _flags_check(doc: dict[str, Any]) -> str | None:
    flags = doc.get("flags")
    if not isinstance(flags, dict):
        return "a flags document without a flags object"
    return None


ENTITLEMENTS: Final = Kind(
    name="entitlements",
    axis="entitlements",
    operation="get_entitlements",
    path=("customers", "{customer}", "entitlements"),
    # No prefix: the entitlement keys keep the names they had before kinds, so
    # sidecars of both versions share a Redis during a rolling upgrade.
    key="",
    ttl=lambda s: s.cache_ttl,
    check=lambda _doc: None,
    local_body=_entitlements_local,
    missing="customer has no entitlements",
    # An unknown customer is a 200 with "found": false on /v1.
    missing_status=200,
    missing_body=NOT_FOUND_BODY,
    dropped=("found",),
    upstream_body=_entitlements_upstream,
)
FLAGS: Final = Kind(
    name="flags",
    axis="flags",
    operation="flags",
    path=("customers", "{customer}", "flags"),
    key="f:",
    ttl=lambda s: s.flags_ttl,
    check=_flags_check,
    local_body=orjson.dumps,
    flags=True,
    missing="the upstream has no flags for this customer",
    missing_status=404,
    missing_body=orjson.dumps(
        error_body("not_found", "the upstream has no flags for this customer")
    ),
)
GLOBAL_FLAGS: Final = Kind(
    name="global_flags",
    axis="flags",
    operation="global_flags",
    path=("flags",),
    key="gf:",
    ttl=lambda s: s.flags_ttl,
    check=_flags_check,
    local_body=orjson.dumps,
    flags=True,
    missing="the upstream has no global flags for this tenant",
    missing_status=404,
    missing_body=_not_found("the upstream has no global flags for this tenant"),
)

#: Every kind, by name.
KINDS: Final[Mapping[str, Kind]] = {k.name: k for k in (ENTITLEMENTS, FLAGS, GLOBAL_FLAGS)}
