"""Domain errors and the one JSON error envelope, ``{"error": {"code", "message"}}``.

:func:`error_body` is the only place the envelope is built: a ``SidecarError``'s
body, aiohttp's own refusals and every listener's error answers go through it.

The tree::

    SidecarError                      status  code
    ├── BadRequest                    400     bad_request (or a more precise code)
    ├── Forbidden                     403     forbidden              (the browser guard)
    ├── NotFound                      404     not_found
    ├── MethodNotAllowed              405     method_not_allowed     (aiohttp's 405)
    ├── Conflict                      409     conflict               (async_requires_redis)
    ├── PayloadTooLarge               413     payload_too_large      (a body over the limit)
    ├── Unprocessable                 422     unprocessable          (idempotency_key_reused)
    ├── Unavailable                   503     unavailable            (usage_unavailable: not queued)
    └── UpstreamError                 502     upstream_error
        ├── UpstreamUnavailable       503     upstream_unavailable   (reads: nothing usable cached)
        │   └── UpstreamOverloaded    503     upstream_overloaded    (too many waiting: not sent)
        ├── UpstreamTimeout           504     upstream_timeout
        └── UpstreamAuthFailed        502     upstream_auth_failed   (the sidecar's key was refused)

An error with ``retry_after`` (seconds) is answered with that ``Retry-After``
header. aiohttp's own refusals are answered through the class of their status where the
tree has one (``http.responses.http_exception_response``); the rarer ones (414,
415, 431) keep their own code in the same envelope. Messages never contain
secrets: they are built from ids and status codes only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "SidecarError",
    "Unavailable",
    "Unprocessable",
    "UpstreamAuthFailed",
    "UpstreamError",
    "UpstreamOverloaded",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error envelope; ``extra`` adds top-level fields (``allowed: false``)."""
    return {**extra, "error": {"code": code, "message": message}}


class SidecarError(Exception):
    """Base of every error the local API turns into a JSON response."""

    status: int = 500
    code: str = "internal_error"
    #: Seconds the answer's ``Retry-After`` names; ``None``: no such header.
    retry_after: int | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after
        #: Extra top-level fields merged into the error body (e.g. ``allowed: false``).
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, **self.extra)


class BadRequest(SidecarError):
    status = 400
    code = "bad_request"


class Forbidden(SidecarError):
    status = 403
    code = "forbidden"


class NotFound(SidecarError):
    status = 404
    code = "not_found"


class MethodNotAllowed(SidecarError):
    status = 405
    code = "method_not_allowed"


class Conflict(SidecarError):
    status = 409
    code = "conflict"


class PayloadTooLarge(SidecarError):
    status = 413
    code = "payload_too_large"


class Unprocessable(SidecarError):
    status = 422
    code = "unprocessable"


class Unavailable(SidecarError):
    """The sidecar itself cannot do it now (not the upstream): try again shortly."""

    status = 503
    code = "unavailable"
    retry_after = 1


class UpstreamError(SidecarError):
    status = 502
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"


class UpstreamOverloaded(UpstreamUnavailable):
    """Not sent: ``SIDECAR_UPSTREAM_MAX_WAITING`` upstream calls were already waiting."""

    code = "upstream_overloaded"
    retry_after = 1


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamAuthFailed(UpstreamError):
    status = 502
    code = "upstream_auth_failed"
