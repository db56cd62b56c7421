"""A usage record, its outcome and the rules between them: plain Python, no I/O.

A record is one ``consume_credits`` call accepted for later: the customer, the
credit type, the amount and the caller's idempotency key, which names the record
in the tenant (``GET /v1/usage/{idempotencyKey}``) and is the key the upstream
deduplicates on, so a record delivered twice (a sidecar killed after sending it,
a partition changing hands) is applied once.

:func:`verdict` is what an upstream answer means for a record (the rule the docs
state); :func:`partition_of` is where a record queues, so that every record of one
(customer, credit type) shares a partition and is delivered in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal

import orjson

__all__ = [
    "FINAL_STATES",
    "MAX_AMOUNT",
    "MAX_KEY_LENGTH",
    "PARTITIONS",
    "Record",
    "State",
    "Verdict",
    "outcome_body",
    "partition_of",
    "retry_after_seconds",
    "verdict",
]

State = Literal["queued", "delivered", "insufficient", "rejected"]
FINAL_STATES: Final[frozenset[str]] = frozenset({"delivered", "insufficient", "rejected"})

#: Partitions of a tenant's queue. A fact of the data in Redis, not a setting: a
#: record's partition must not change while it waits, or its order would be lost.
PARTITIONS: Final = 16
#: The upstream's limit on an idempotency key.
MAX_KEY_LENGTH: Final = 255
#: Amounts beyond this lose precision in JavaScript (and no meter counts that high).
MAX_AMOUNT: Final = 2**53 - 1
#: The longest ``Retry-After`` honoured (a bogus hour-long header cannot park deliveries longer).
MAX_RETRY_AFTER: Final = 3600.0
#: The most of an upstream answer kept in a record's outcome.
MAX_ANSWER_BYTES: Final = 16 * 1024

#: Statuses about the upstream as a whole (its gateway, its capacity, its rate limit,
#: the sidecar's key): every record would get the same, so every delivery pauses.
_UPSTREAM_WIDE: Final = frozenset({401, 403, 429, 502, 503, 504})
#: 4xx statuses that do not judge the record: retried like a 5xx.
_RETRIED_4XX: Final = frozenset({401, 403, 408, 425, 429})


@dataclass(frozen=True, slots=True)
class Record:
    """One accepted consumption, as queued."""

    key: str
    customer: str
    credit_type: str
    amount: int

    @property
    def partition(self) -> int:
        return partition_of(self.customer, self.credit_type)

    def body(self) -> bytes:
        """The upstream request's body: exactly what ``consume_credits`` sends."""
        return orjson.dumps({"amount": self.amount, "idempotencyKey": self.key})


def partition_of(customer: str, credit_type: str) -> int:
    """The partition of every record of (``customer``, ``credit_type``): BLAKE2b, stable
    across processes and releases (Python's ``hash`` is salted per process) and well
    spread (CRC-32's low bits left partitions empty for ids like ``cus_1``, ``cus_2``)."""
    digest = hashlib.blake2b(f"{customer}\x00{credit_type}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % PARTITIONS


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one upstream answer (or its absence) means for a record."""

    state: State
    """``queued``: not final, try again."""
    upstream_wide: bool = False
    """A retry that every record would meet too: pause every delivery, not this one only."""
    reason: str = ""
    """Why it is retried (``vellum_sidecar_usage_retries_total``'s label)."""

    @property
    def final(self) -> bool:
        return self.state != "queued"


def verdict(status: int | None) -> Verdict:
    """The rule: 2xx delivered, 409 insufficient (the upstream deducted nothing),
    any other 4xx rejected, except those that do not judge the record (401/403: the
    sidecar's key; 408, 425, 429: try later), which are retried with 5xx, 3xx and no
    answer at all (``None``). Neither insufficient nor rejected is ever retried."""
    if status is None:
        return Verdict("queued", upstream_wide=True, reason="no_answer")
    if 200 <= status < 300:
        return Verdict("delivered")
    if status == 409:
        return Verdict("insufficient")
    if 400 <= status < 500 and status not in _RETRIED_4XX:
        return Verdict("rejected")
    if status in (401, 403):
        reason = "auth_failed"
    elif status == 429:
        reason = "rate_limited"
    elif status >= 500:
        reason = "server_error"
    else:
        reason = "other"
    return Verdict("queued", upstream_wide=status in _UPSTREAM_WIDE, reason=reason)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """``Retry-After`` (RFC 9110: delay-seconds or an HTTP-date) as seconds from ``now``
    (Unix time), at most :data:`MAX_RETRY_AFTER`; ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER)


def iso_ms(ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC with milliseconds (``2025-01-31T12:00:00.123Z``)."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def outcome_body(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """``GET /v1/usage/{key}``'s body from a record's stored fields (``usage.store``).

    Always: ``idempotencyKey``, ``state``, ``customerId``, ``creditTypeId``,
    ``amount``, ``acceptedAt``, ``attempts``. Once final: ``finishedAt``, the
    upstream's ``status`` and ``answer`` (its JSON body: the balance after a
    delivery, the error of a refusal) and ``replayed`` (the upstream had applied
    the key already: a delivery retried after an answer was lost, or a synchronous
    call with the same key). While queued after a failed attempt: ``lastAttempt``.
    """

    def text(name: bytes) -> str:
        return fields.get(name, b"").decode(errors="replace")

    def number(name: bytes) -> int:
        raw = fields.get(name)
        return int(raw) if raw is not None and raw.lstrip(b"-").isdigit() else 0

    out: dict[str, Any] = {
        "idempotencyKey": text(b"k"),
        "state": text(b"s"),
        "customerId": text(b"c"),
        "creditTypeId": text(b"t"),
        "amount": number(b"a"),
        "acceptedAt": iso_ms(number(b"at")),
        "attempts": number(b"n"),
    }
    if out["state"] in FINAL_STATES:
        out["finishedAt"] = iso_ms(number(b"ft"))
        out["status"] = number(b"st")
        raw = fields.get(b"b", b"")
        try:
            out["answer"] = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            out["answer"] = None
        out["replayed"] = fields.get(b"rp") == b"1"
    elif b"la" in fields:
        out["lastAttempt"] = {"at": iso_ms(number(b"la")), "error": text(b"le")}
    return out
