"""The Vellum API client: one ``ClientSession``, the key injected, retries and a breaker.

Reads (and writes that carry an ``Idempotency-Key``) are retried with exponential
backoff and full jitter, all inside one deadline (``SIDECAR_UPSTREAM_TIMEOUT``).
A circuit breaker stops calling an upstream that keeps failing and lets one probe
through after a cool-down, so a dead upstream costs callers nothing but a fast
``upstream_unavailable`` (and the stale entry, where one exists). Each cached
read (entitlements, a customer's flags, the global flags) has a breaker, and
billing calls share one: failing billing endpoints must not cut the hot path off
from an upstream whose entitlement reads still work.

Every call is one of at most ``SIDECAR_UPSTREAM_MAX_WAITING`` under way or
waiting for a connection at once (``VellumClient.waiting``): each holds a local
caller's connection, so a slow upstream with many distinct misses would
otherwise fill the local API's connection cap and shut out reads the cache could
answer. Past the bound a call is not sent: it raises ``UpstreamOverloaded`` at
once (503 ``upstream_overloaded`` with ``Retry-After`` to an uncached read), which
the cache answers like any upstream failure, from the stale entry where one
exists. The breaker does not count it: the upstream was never asked.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Settings
from .errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .metrics import Metrics
from .tracing import NO_TRACING, Tracing, record

__all__ = [
    "Breaker",
    "UpstreamResponse",
    "VellumClient",
    "quote_segment",
    "requote_segment",
    "tenant_path",
]

log = logging.getLogger("sidecar.upstream")

UpstreamState = Literal["ok", "degraded", "down"]

#: Statuses worth retrying: the request did not take effect or may succeed later.
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
#: Response headers passed back to local callers of forwarded operations.
_PASSED_HEADERS: Final = (
    "Allow",
    "Content-Type",
    "Content-Disposition",
    "Location",
    "Retry-After",
    "Idempotency-Key",
    "Idempotent-Replayed",
)
_MAX_BODY: Final = 8 * 1024 * 1024


def quote_segment(segment: str) -> str:
    """Percent-encode one path segment so no id can leave its place in the path.

    ``quote(safe="")`` encodes ``/``, ``%``, ``?`` and ``#``, but leaves ``.`` alone;
    a segment made only of dots would be a dot-segment that servers resolve
    (``..`` climbs a level), so those dots are encoded too.
    """
    quoted = quote(segment, safe="")
    if quoted.strip(".") == "":
        quoted = quoted.replace(".", "%2E")
    return quoted


def requote_segment(raw: str) -> str:
    """One segment of a request's raw path, decoded to its bytes and quoted again.

    For paths the operation table does not know: the bytes are kept exactly (even
    ones that are not UTF-8), and ``/``, ``%``, ``?``, ``#`` and dot-segments come
    out encoded, as :func:`quote_segment` does, so the segment stays one segment.
    """
    quoted = quote_from_bytes(unquote_to_bytes(raw), safe="")
    if quoted.strip(".") == "":
        quoted = quoted.replace(".", "%2E")
    return quoted


def tenant_path(tenant: str, *segments: str) -> str:
    return "/tenants/" + "/".join(quote_segment(s) for s in (tenant, *segments))


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    def passed_headers(self) -> dict[str, str]:
        return {h: self.headers[h] for h in _PASSED_HEADERS if h in self.headers}


class Breaker:
    """Consecutive-failure circuit breaker with a doubling cool-down.

    closed: calls pass; ``failure_threshold`` consecutive failures open it.
    open: calls fail fast until the cool-down ends; then one probe is let through
    (half-open). The probe's success closes it, its failure re-opens it for twice
    as long (capped).
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown: float = 2.0,
        max_cooldown: float = 30.0,
        degraded_window: float = 30.0,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.degraded_window = degraded_window
        self._failures = 0
        self._cooldown = cooldown
        self._open_until = 0.0
        self._probing = False
        self._last_failure = -1e9

    def allow(self, now: float) -> bool:
        if self._failures < self.failure_threshold:
            return True
        if now < self._open_until or self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._cooldown = self.base_cooldown

    def failure(self, now: float) -> None:
        self._last_failure = now
        self._failures += 1
        if self._probing:
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
        if self._failures >= self.failure_threshold:
            self._open_until = now + self._cooldown
        self._probing = False

    @property
    def last_failure(self) -> float:
        """When (``time.monotonic()``) the latest failure was recorded."""
        return self._last_failure

    def state(self, now: float) -> UpstreamState:
        if self._failures >= self.failure_threshold:
            return "down"
        if self._failures or now - self._last_failure < self.degraded_window:
            return "degraded"
        return "ok"


class VellumClient:
    """Calls the Vellum API for one tenant with the sidecar's key."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        breaker: Breaker | None = None,
        attempt_timeout: float | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.session = session
        self.metrics = metrics
        #: Guards entitlement reads (the hot path); its state is the one /readyz reports.
        self.breaker = breaker if breaker is not None else Breaker()
        metrics.upstream_state.follow(self.state)
        #: Guards every billing operation.
        self.billing_breaker = Breaker()
        #: (monotonic time, status or None for no answer) of the latest attempt (health.py).
        self.last_result: tuple[float, int | None] = (0.0, None)
        # One per cached read operation: failing flag reads must not cut the
        # entitlement reads off, nor the other way round.
        self._read_breakers: dict[str, Breaker] = {"get_entitlements": self.breaker}
        self.tenant = settings.tenant_id
        self._base = settings.base_url
        self._deadline = settings.upstream_timeout
        # An attempt that may be retried uses at most 60 % of the budget, leaving
        # room for the retry; a call that is never retried gets all of it.
        self._attempt_timeout = attempt_timeout or max(settings.upstream_timeout * 0.6, 0.05)
        #: Calls under way or waiting for a connection now, and the most allowed: at
        #: most half the local API's connection cap, so waiting calls never fill it
        #: (``server.run_sidecar`` lowers it again if the cap was fitted lower).
        self.waiting = 0
        self.max_waiting = max(1, min(settings.upstream_max_waiting, settings.max_connections // 2))
        metrics.upstream_waiting.set_function(lambda: self.waiting)

    def state(self) -> UpstreamState:
        return self.breaker.state(time.monotonic())

    def _read_breaker(self, operation: str) -> Breaker:
        breaker = self._read_breakers.get(operation)
        if breaker is None:
            breaker = self._read_breakers[operation] = Breaker()
        return breaker

    def url(self, *segments: str, quoted: bool = False) -> URL:
        """The upstream URL of ``segments`` under the tenant; ``quoted``: already quoted."""
        if quoted:
            path = tenant_path(self.tenant) + "".join("/" + s for s in segments)
            return URL(self._base + path, encoded=True)
        return URL(self._base + tenant_path(self.tenant, *segments), encoded=True)

    async def read(self, operation: str, segments: Sequence[str]) -> UpstreamResponse:
        """A cached read (entitlements, flags): the 200 or 404 response; raise
        ``UpstreamError`` for anything else.

        A timeout is reported as ``UpstreamUnavailable``: for a read, "did not
        answer in time" and "could not be reached" mean the same to the caller.
        """
        try:
            resp = await self.request(operation, "GET", segments, retry=True, read=True)
        except UpstreamTimeout as exc:
            raise UpstreamUnavailable(exc.message) from None
        if resp.status in (200, 404):
            return resp
        if resp.status in (401, 403):
            raise UpstreamAuthFailed(f"the upstream refused the sidecar's API key ({resp.status})")
        raise UpstreamUnavailable(f"the upstream answered {resp.status}")

    async def request(
        self,
        operation: str,
        method: str,
        segments: Sequence[str],
        *,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = False,
        read: bool = False,
        quoted: bool = False,
    ) -> UpstreamResponse:
        """One logical upstream call; retried (reads, idempotent writes) within the deadline.

        ``segments`` are the path's segments after the tenant, quoted here unless
        ``quoted`` says they already are (:func:`requote_segment`). ``read`` marks a
        cached read: each cached read operation has a breaker of its own (the
        entitlement read's is ``breaker``); every other operation shares
        ``billing_breaker``.

        Returns any response the upstream gave except retryable ones that ran out
        of attempts, which are returned as the last response seen. Raises
        ``UpstreamUnavailable`` (connect failure, breaker open),
        ``UpstreamOverloaded`` (``max_waiting`` calls already waiting: not sent)
        or ``UpstreamTimeout`` when no response came in time.
        """
        if self.waiting >= self.max_waiting:
            self.metrics.upstream_overloaded.inc()
            raise UpstreamOverloaded(
                f"{self.waiting} upstream calls are already waiting (the most allowed); "
                "not sent, try again shortly"
            )
        self.waiting += 1
        try:
            with self.tracing.upstream_call(operation, method) as span:
                resp = await self._attempts(
                    operation, method, segments, query, body, headers, retry, read, quoted
                )
                record(span, **{"http.response.status_code": resp.status})
                return resp
        finally:
            self.waiting -= 1

    async def _attempts(
        self,
        operation: str,
        method: str,
        segments: Sequence[str],
        query: Mapping[str, str] | None,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        retry: bool,
        read: bool,
        quoted: bool,
    ) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._deadline
        url = self.url(*segments, quoted=quoted)
        if query:
            url = url.with_query(query)
        send_headers = CIMultiDict(headers or {})
        if body is not None and "Content-Type" not in send_headers:
            send_headers["Content-Type"] = "application/json"
        breaker = self._read_breaker(operation) if read else self.billing_breaker
        attempt_timeout = self._attempt_timeout if retry else self._deadline
        attempt = 0
        last_error: UpstreamError | None = None
        last_resp: UpstreamResponse | None = None
        while True:
            now = time.monotonic()
            if not breaker.allow(now):
                self._count(operation, "breaker_open")
                raise UpstreamUnavailable("the upstream is failing; circuit breaker open")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise last_error or UpstreamTimeout("the upstream did not answer in time")
            send_headers["x-api-key"] = self.settings.api_key.current(time.time())
            started = loop.time()
            try:
                with self.tracing.upstream_attempt(attempt + 1, send_headers) as attempt_span:
                    resp = await self._send(
                        method, url, send_headers, body, min(attempt_timeout, remaining)
                    )
                    record(attempt_span, **{"http.response.status_code": resp.status})
            except TimeoutError:
                self.last_result = (time.monotonic(), None)
                breaker.failure(time.monotonic())
                self._count(operation, "timeout")
                last_error = UpstreamTimeout("the upstream did not answer in time")
            except (aiohttp.ClientError, OSError) as exc:
                self.last_result = (time.monotonic(), None)
                breaker.failure(time.monotonic())
                self._count(operation, "error")
                log.warning(
                    "upstream_request_failed",
                    extra={"fields": {"operation": operation, "error": type(exc).__name__}},
                )
                last_error = UpstreamUnavailable("the upstream could not be reached")
            else:
                self.last_result = (time.monotonic(), resp.status)
                self.metrics.upstream_latency.labels(operation).observe(loop.time() - started)
                self._count(operation, str(resp.status))
                if resp.status >= 500 or resp.status == 429:
                    breaker.failure(time.monotonic())
                else:
                    breaker.success()
                if not (retry and resp.status in _RETRY_STATUSES):
                    return resp
                last_error = None
                last_resp = resp
            if not retry:
                assert last_error is not None
                raise last_error
            attempt += 1
            # Full jitter: sleep uniformly in [0, min(cap, base * 2^attempt)).
            backoff = random.uniform(0, min(1.0, 0.05 * 2**attempt))
            if loop.time() + backoff >= deadline:
                if last_resp is not None and last_error is None:
                    return last_resp
                assert last_error is not None
                raise last_error
            await asyncio.sleep(backoff)

    async def send_once(
        self,
        operation: str,
        method: str,
        segments: Sequence[str],
        *,
        body: bytes | None,
        timeout: float,
    ) -> UpstreamResponse:
        """One attempt, neither retried nor behind a breaker: for a caller that paces its
        own retries (metered usage deliveries, ``usage.delivery``). Counted, timed and
        noted (``last_result``) like ``request``'s attempts. Returns any answer; raises
        ``UpstreamUnavailable`` (no connection) or ``UpstreamTimeout``."""
        loop = asyncio.get_running_loop()
        headers: CIMultiDict[str] = CIMultiDict()
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers["x-api-key"] = self.settings.api_key.current(time.time())
        started = loop.time()
        try:
            with (
                self.tracing.upstream_call(operation, method),
                self.tracing.upstream_attempt(1, headers) as span,
            ):
                resp = await self._send(method, self.url(*segments), headers, body, timeout)
                record(span, **{"http.response.status_code": resp.status})
        except TimeoutError:
            self.last_result = (time.monotonic(), None)
            self._count(operation, "timeout")
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            self.last_result = (time.monotonic(), None)
            self._count(operation, "error")
            log.debug(
                "upstream_request_failed",
                extra={"fields": {"operation": operation, "error": type(exc).__name__}},
            )
            raise UpstreamUnavailable("the upstream could not be reached") from None
        self.last_result = (time.monotonic(), resp.status)
        self.metrics.upstream_latency.labels(operation).observe(loop.time() - started)
        self._count(operation, str(resp.status))
        return resp

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | None,
        timeout: float,
    ) -> UpstreamResponse:
        client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(self.settings.upstream_connect_timeout, timeout)
        )
        async with self.session.request(
            method, url, headers=headers, data=body, timeout=client_timeout, allow_redirects=False
        ) as resp:
            data = await resp.content.read(_MAX_BODY + 1)
            if len(data) > _MAX_BODY:
                raise aiohttp.ClientPayloadError("upstream body too large")
            return UpstreamResponse(resp.status, resp.headers, data)

    def _count(self, operation: str, status: str) -> None:
        self.metrics.upstream_requests.labels(operation, status).inc()
