"""The emulator as a service object: its state, push delivery, and answers as responses.

:class:`Emulator` is :class:`State` plus what needs the network: its events,
handed over by the state's ``on_event`` callback, are delivered as signed
pushes, each retried up to three times at once like the real service.
``app.py`` (the upstream routes) and ``admin.py`` (the admin API) both reach it
as ``app[EMULATOR]``; :func:`to_response` is the one place an :class:`Answer`
becomes an aiohttp response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from sidecar.signature import sign, sign_many

from .state import State
from .wire import Answer, Json

__all__ = ["EMULATOR", "Attempt", "Emulator", "Push", "to_response"]

log = logging.getLogger("sidecar.emulator")

# --------------------------------------------------------------------------- pushes


@dataclass(slots=True)
class Attempt:
    """One POST of a push to the receiver."""

    signature: str | None = None
    status: int | None = None
    """The receiver's HTTP status; None when nothing was received."""
    response_body: bytes = b""
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(slots=True)
class Push:
    """One event's delivery: up to ``pushAttempts`` attempts back to back, then dropped.

    ``status``, ``signature``, ``response_body`` and ``error`` describe the last
    attempt; ``error`` alone (no attempt) says why none was made.
    """

    event: Json
    url: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    reason: str | None = None

    @property
    def last(self) -> Attempt:
        return self.attempts[-1] if self.attempts else Attempt()

    @property
    def status(self) -> int | None:
        return self.last.status

    @property
    def signature(self) -> str | None:
        return self.last.signature

    @property
    def response_body(self) -> bytes:
        return self.last.response_body

    @property
    def error(self) -> str | None:
        return self.reason if self.reason is not None else self.last.error

    @property
    def delivered(self) -> bool:
        return self.last.delivered

    @property
    def dropped(self) -> bool:
        """Every attempt failed: the service will never send this event again."""
        return bool(self.attempts) and not self.delivered

    def to_json(self) -> Json:
        return {
            "event": self.event,
            "url": self.url,
            "status": self.status,
            "delivered": self.delivered,
            "attempts": len(self.attempts),
            "statuses": [a.status for a in self.attempts],
            "error": self.error,
        }


class Emulator(State):
    """The state plus the delivery of its events as signed pushes.

    ``api_keys``, ``webhook_url``, ``webhook_secret`` and ``push_timeout`` are plain
    attributes: a test may point pushes at a receiver that starts after the emulator.
    ``webhook_secret`` may be a list, in which case pushes carry one ``v1`` per secret.
    Events are delivered one after the other, in the order they happened.
    """

    def __init__(
        self,
        *,
        api_keys: Collection[str],
        webhook_url: str | None = None,
        webhook_secret: str | Sequence[str] | None = None,
        seed: bool = False,
        default_tenant: str | None = None,
        push_timeout: float = 5.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.push_timeout = push_timeout
        self.pushes: list[Push] = []
        self._tasks: set[asyncio.Task[Push]] = set()
        self._last: asyncio.Task[Push] | None = None
        self._capture: list[asyncio.Task[Push]] | None = None
        self._session: aiohttp.ClientSession | None = None
        super().__init__(
            api_keys=api_keys,
            seed=seed,
            default_tenant=default_tenant,
            clock=clock or time.time,
            on_event=self._schedule,
        )

    def reset(self) -> None:
        """Back to the initial state, the record of pushes included."""
        super().reset()
        self.pushes.clear()

    async def push_event(
        self,
        tenant: str,
        *,
        customer_id: str | None = None,
        account_id: str | None = None,
        event_type: str = "entitlements.updated",
        **extra: Any,
    ) -> Push:
        """Build an event like the emulator's own and deliver it now."""
        event = self.event(
            tenant, event_type=event_type, customer_id=customer_id, account_id=account_id, **extra
        )
        return await self.deliver(event)

    async def deliver(self, event: Mapping[str, Any], *, timestamp: int | None = None) -> Push:
        """Sign and POST ``event`` as-is to ``webhook_url``; record and return the delivery.

        Up to ``settings.push_attempts`` attempts with no delay between them, like the
        real service, then the event is dropped. Each attempt is signed afresh; the
        body (and so ``eventId``) is the same. Re-delivering a recorded ``push.event``
        sends a duplicate; ``timestamp`` signs with another time (a stale push).
        Never raises for delivery failures.
        """
        body = orjson.dumps(event)
        push = Push(event=dict(event), url=self.webhook_url)
        try:
            if self.webhook_url is None:
                push.reason = "no webhook_url configured"
                return push
            if self._session is None:
                push.reason = "the emulator app is not running"
                return push
            for _ in range(self.settings.push_attempts):
                attempt = await self._attempt(self._session, self.webhook_url, body, timestamp)
                push.attempts.append(attempt)
                if attempt.delivered:
                    break
            if not push.delivered:
                log.warning(
                    "push %s dropped after %d attempts: %s",
                    _event_id(event),
                    len(push.attempts),
                    push.error or push.status,
                )
        finally:
            self.pushes.append(push)
        return push

    async def _attempt(
        self, session: aiohttp.ClientSession, url: str, body: bytes, timestamp: int | None
    ) -> Attempt:
        attempt = Attempt()
        ts = int(self.clock()) if timestamp is None else timestamp
        headers = {"Content-Type": "application/json"}
        secret = self.webhook_secret
        secrets = [secret] if isinstance(secret, str) else list(secret or ())
        secrets = [s for s in secrets if s]  # empty means unsigned, never a weak HMAC
        if len(secrets) == 1:
            attempt.signature = sign(secrets[0], body, ts)
        elif secrets:
            attempt.signature = sign_many(secrets, body, ts)
        if attempt.signature is not None:
            headers["X-Vellum-Signature"] = attempt.signature
        timeout = aiohttp.ClientTimeout(total=self.push_timeout)
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout) as response:
                attempt.status = response.status
                attempt.response_body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            attempt.error = f"{type(exc).__name__}: {exc}"
        return attempt

    async def wait_pushes_idle(self) -> None:
        """Wait until every push scheduled so far has been delivered or dropped."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _schedule(self, event: Json) -> None:
        """The state's ``on_event``: deliver ``event`` after the one before it (order kept)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.pushes.append(Push(event, self.webhook_url, reason="no running event loop"))
            return
        task = loop.create_task(self._deliver_after(self._last, event))
        self._last = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._capture is not None:
            self._capture.append(task)

    async def _deliver_after(self, previous: asyncio.Task[Push] | None, event: Json) -> Push:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        return await self.deliver(event)

    async def run(self, change: Callable[[], Any]) -> tuple[Any, bool | None]:
        """Run a synchronous change and wait for the pushes it caused.

        Returns the change's result and whether every push was delivered (None when
        it caused none). Nothing else runs between the change and the capture, so
        exactly its own events are awaited.
        """
        self._capture = []
        try:
            result = change()
        finally:
            tasks, self._capture = self._capture, None
        if not tasks:
            return result, None
        pushes = await asyncio.gather(*tasks)
        return result, all(p.delivered for p in pushes)


def _event_id(event: Mapping[str, Any]) -> Any:
    return event.get("eventId", event.get("id"))


EMULATOR: Final = web.AppKey("emulator", Emulator)


def to_response(answer: Answer) -> web.Response:
    """The one place an :class:`Answer` becomes an aiohttp response."""
    response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    if answer.content_type is not None:
        response.content_type = answer.content_type
    return response
