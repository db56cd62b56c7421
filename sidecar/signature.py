"""Vellum push-webhook signatures: ``t=<unix>,v1=<hex>[,v1=<hex>...]``.

The hex is HMAC-SHA256(secret, ``b"<t>." + raw body``). Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final, Literal, NamedTuple

__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_HEADER_LENGTH",
    "MAX_SIGNATURES",
    "ParsedHeader",
    "Reason",
    "SignatureError",
    "parse",
    "sign",
    "sign_many",
    "verify",
]

Reason = Literal["missing", "malformed", "stale", "mismatch"]

DEFAULT_TOLERANCE: Final = 300
"""Seconds a signed timestamp may differ from the receiver's clock, either way."""

MAX_HEADER_LENGTH: Final = 4096
"""Longer headers are rejected before any parsing or hashing."""

MAX_SIGNATURES: Final = 8
"""At most this many well-formed ``v1`` entries are compared; later ones are ignored."""

# A unix timestamp in seconds; twelve digits reach the year 33658, more is nonsense
# and would only make int() do work for an attacker.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_V1 = re.compile(r"[0-9a-fA-F]{64}")


class SignatureError(ValueError):
    """A push signature did not verify; ``reason`` says why, safe to log and count."""

    reason: Reason

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _mac(secret: str, body: bytes, timestamp: str) -> bytes:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).digest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """Return the ``X-Vellum-Signature`` value for ``body`` sent at ``timestamp``."""
    return sign_many([secret], body, timestamp)


def sign_many(secrets: Sequence[str], body: bytes, timestamp: int) -> str:
    """Return a header with one ``v1`` entry per secret, as sent during rotation."""
    if isinstance(secrets, str):
        raise TypeError("secrets must be a sequence of strings, not a string")
    if not secrets:
        raise ValueError("at least one secret is required")
    if any(not secret for secret in secrets):
        raise ValueError("an empty secret would let anyone sign")
    if timestamp < 0:
        raise ValueError("timestamp must not be negative")
    t = str(timestamp)
    entries = [f"v1={_mac(secret, body, t).hex()}" for secret in secrets]
    return ",".join([f"t={t}", *entries])


class ParsedHeader(NamedTuple):
    """A header's timestamp as its raw digits (signed as they appear) and its digests."""

    timestamp: str
    digests: list[bytes]


def parse(header: str) -> ParsedHeader:
    """Split a header into its raw timestamp digits and the decoded ``v1`` digests.

    Syntax only, nothing is verified. Raises ``SignatureError("malformed")`` for a
    header over ``MAX_HEADER_LENGTH``, an entry that is not ``key=value``, no single
    numeric ``t=`` or no usable ``v1=``. Other schemes and unusable ``v1`` values
    are skipped, and only the first ``MAX_SIGNATURES`` usable ``v1`` are kept.
    """
    if len(header) > MAX_HEADER_LENGTH:
        raise SignatureError("malformed", "signature header is too long")
    timestamp: str | None = None
    digests: list[bytes] = []
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue  # tolerate "t=1,,v1=..." and a trailing comma
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise SignatureError("malformed", "signature header entry is not key=value")
        if key == "t":
            if timestamp is not None:
                raise SignatureError("malformed", "signature header has more than one t=")
            if not _TIMESTAMP.fullmatch(value):
                raise SignatureError("malformed", "signature timestamp is not a unix time")
            timestamp = value
        elif key == "v1" and len(digests) < MAX_SIGNATURES and _V1.fullmatch(value):
            digests.append(bytes.fromhex(value))
        # Other schemes (v0=, future ones) and unusable v1 values are ignored on purpose:
        # a sender may add entries we don't understand next to ones we do.
    if timestamp is None:
        raise SignatureError("malformed", "signature header has no t=")
    if not digests:
        raise SignatureError("malformed", "signature header has no usable v1=")
    return ParsedHeader(timestamp, digests)


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance: int = DEFAULT_TOLERANCE,
) -> int:
    """Check a push signature and return its timestamp.

    Raises :class:`SignatureError` with ``reason``:

    - ``missing``: no header, or only whitespace;
    - ``malformed``: too long, no single numeric ``t=``, no usable ``v1=`` entry;
    - ``mismatch``: no ``v1`` entry is the HMAC of this body under any secret;
    - ``stale``: the signature is genuine but ``t`` is more than ``tolerance``
      seconds from ``now``, in either direction.

    The signature is checked *before* the timestamp, so a forged request reports
    ``mismatch`` whatever its ``t``: ``stale`` then always means a real event that
    was replayed or delayed, or a skewed clock, which is what an operator needs to
    know. Every secret is compared with every entry (constant-time, no early exit)
    and both the header length and the number of entries are capped, so a hostile
    header costs bounded work.
    """
    if tolerance < 0:
        raise ValueError("tolerance must not be negative")
    if header is None or not header.strip():
        raise SignatureError("missing", "no signature header")
    timestamp, digests = parse(header)

    matched = False
    for secret in secrets:
        if not secret:
            continue  # an empty secret must never make anything valid
        expected = _mac(secret, body, timestamp)
        for digest in digests:
            matched |= hmac.compare_digest(expected, digest)
    if not matched:
        raise SignatureError("mismatch", "no signature matches a configured secret")

    value = int(timestamp)
    if abs(now - value) > tolerance:
        raise SignatureError("stale", "signature timestamp is outside the tolerance")
    return value
