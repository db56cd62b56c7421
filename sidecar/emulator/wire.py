"""What crosses the emulator's HTTP face, as data: a call in, an answer out, the log.

An upstream request reaches the service as a :class:`Call` (operation name,
tenant, the API key's mode, decoded path ids, query, raw body) and leaves as an
:class:`Answer` (status, body bytes, content type, headers), so every rule of
the API is testable without a server and ``app.py`` only translates. A refusal
is an :class:`EmulatorError`, answered as the upstream's error envelope.
:class:`Replays` keeps the answers an ``Idempotency-Key`` replays, and
:class:`RecordedRequest` is one line of the request log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

__all__ = [
    "Answer",
    "Call",
    "EmulatorError",
    "Json",
    "RecordedRequest",
    "Replays",
    "error_code",
]

Json = dict[str, Any]

_ERROR_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    402: "payment_required",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "unprocessable",
    429: "rate_limited",
}


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer as data: what the HTTP face sends back."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Answer:
        return cls(status, orjson.dumps(payload), "application/json", dict(headers or {}))

    @classmethod
    def error(
        cls, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> Answer:
        return cls.json({"error": {"code": code, "message": message}}, status, headers)

    @classmethod
    def empty(cls, status: int = 204) -> Answer:
        return cls(status)

    def parsed(self) -> Any:
        """The body as JSON (None when empty): for tests and logs."""
        return orjson.loads(self.body) if self.body else None


class EmulatorError(Exception):
    """An upstream-style error, answered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def answer(self) -> Answer:
        return Answer.error(self.status, self.code, self.message)


def error_code(status: int) -> str:
    """The ``code`` an injected failure of ``status`` carries."""
    return _ERROR_CODES.get(status, "injected_fault")


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated upstream request, as the service sees it."""

    operation: str
    tenant: str
    mode: str
    """The API key's mode: ``test`` or ``live``."""
    params: Mapping[str, str] = field(default_factory=dict)
    """Decoded path ids: ``account``, ``customer``, ``method``, ``invoice``, ``credit_type``."""
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One upstream (non-admin) request as the emulator saw it."""

    operation: str
    """One of the operations (``operations.OPERATIONS``), or ``"unknown"`` when no route
    matched."""
    method: str
    path: str
    """The raw path as sent, still percent-encoded, without the query."""
    params: Mapping[str, str]
    """Decoded path parameters: ``tenant``, ``account``, ``customer``, ``method``, ..."""
    query: Mapping[str, str]
    body: Any
    """The parsed JSON body, or None when there was none or it was not JSON."""
    api_key: str | None
    idempotency_key: str | None
    traceparent: str | None = None
    """W3C Trace Context headers as received (the caller's trace, carried by the sidecar)."""
    tracestate: str | None = None

    @property
    def tenant(self) -> str | None:
        return self.params.get("tenant")

    def to_json(self) -> Json:
        return {
            "operation": self.operation,
            "method": self.method,
            "path": self.path,
            "params": dict(self.params),
            "query": dict(self.query),
            "body": self.body,
            "apiKey": self.api_key,
            "idempotencyKey": self.idempotency_key,
            "traceparent": self.traceparent,
            "tracestate": self.tracestate,
        }


class Replays:
    """The answers to writes sent with an ``Idempotency-Key``, replayed for the same key."""

    def __init__(self) -> None:
        self._stored: dict[tuple[str, str, str], tuple[bytes, Answer]] = {}

    def replay(self, operation: str, path: str, key: str, raw: bytes) -> Answer | None:
        """The stored answer for a repeated key (422 when it came with another body)."""
        stored = self._stored.get((operation, path, key))
        if stored is None:
            return None
        body, answer = stored
        if body != raw:
            return Answer.error(422, "idempotency_key_reused", "the key was used with another body")
        headers = {**answer.headers, "Idempotent-Replayed": "true"}
        return Answer(answer.status, answer.body, answer.content_type, headers)

    def remember(self, operation: str, path: str, key: str, raw: bytes, answer: Answer) -> None:
        """Keep ``answer`` for the key, unless it is a server error (worth retrying)."""
        if answer.status < 500:
            self._stored[(operation, path, key)] = (raw, answer)

    def clear(self) -> None:
        self._stored.clear()
