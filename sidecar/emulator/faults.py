"""What a test changes about how the emulator answers: faults, and older upstreams' ways.

:class:`Faults` holds injected failures, delays and holds as data; the HTTP face
applies them to each upstream request (delays, then a failure, after
authentication and before the operation runs; holds after it). :class:`Settings`
switches between today's API and what older upstreams did (the admin API's
``/settings``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .bodies import bad_request
from .wire import Answer, Json, error_code

__all__ = ["DEFAULT_EVENT_ID_FIELDS", "Faults", "Hold", "Settings"]

#: The id fields an event carries: ``eventId`` only, as today's API sends them. The
#: ``eventIdFields`` setting changes it at run time (``["id"]``: an older upstream).
DEFAULT_EVENT_ID_FIELDS: Final[tuple[str, ...]] = ("eventId",)
_EVENT_ID_FIELDS: Final = frozenset({"eventId", "id"})


class Hold:
    """Holds the answers to matching requests until :meth:`release`; see :meth:`Faults.hold`."""

    def __init__(self, operation: str | None) -> None:
        self.operation = operation
        self.arrived = asyncio.Event()  # set as soon as one request is being held
        self.held = 0  # how many requests have been held so far
        self._released = asyncio.Event()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Let every held request go on; later requests are no longer held."""
        self._released.set()

    async def wait(self) -> None:
        """Hold one request (called by the HTTP face)."""
        self.held += 1
        self.arrived.set()
        await self._released.wait()


@dataclass(slots=True)
class _Failure:
    operation: str | None
    status: int
    remaining: int | None
    headers: Mapping[str, str]

    def to_json(self) -> Json:
        return {"operation": self.operation, "status": self.status, "times": self.remaining}


@dataclass(slots=True)
class _Delay:
    operation: str | None
    seconds: float
    remaining: int | None

    def to_json(self) -> Json:
        return {"operation": self.operation, "delay": self.seconds, "times": self.remaining}


def _matches(fault_operation: str | None, operation: str) -> bool:
    return fault_operation is None or fault_operation == operation


def _consume(remaining: int | None) -> int | None:
    return None if remaining is None else remaining - 1


class Faults:
    """Injected failures, delays and holds, each for one operation (of ``operations``)
    or every one (``None``), for a number of requests or until cleared."""

    def __init__(self, operations: Collection[str]) -> None:
        self._operations = operations
        self._failures: list[_Failure] = []
        self._delays: list[_Delay] = []
        self._holds: list[Hold] = []

    def _check(self, operation: str | None, times: int | None) -> None:
        if operation is not None and operation not in self._operations:
            raise ValueError(f"unknown operation {operation!r}")
        if times is not None and times < 1:
            raise ValueError("times must be positive or None")

    def fail(
        self,
        operation: str | None,
        status: int = 503,
        times: int | None = 1,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer ``status`` with a JSON error for the next ``times`` matching requests."""
        self._check(operation, times)
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        self._failures.append(_Failure(operation, status, times, dict(headers or {})))

    def delay(self, operation: str | None, seconds: float, times: int | None = None) -> None:
        """Wait ``seconds`` before answering matching requests (all until cleared)."""
        self._check(operation, times)
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._delays.append(_Delay(operation, seconds, times))

    def hold(self, operation: str | None) -> Hold:
        """Hold the answers to matching requests until ``Hold.release()``."""
        self._check(operation, None)
        hold = Hold(operation)
        self._holds.append(hold)
        return hold

    def clear(self) -> None:
        """Remove every failure and delay, and release every hold."""
        self._failures.clear()
        self._delays.clear()
        for hold in self._holds:
            hold.release()
        self._holds.clear()

    def listed(self) -> list[Json]:
        """The active failures, delays and holds, as the admin API lists them."""
        holds = [
            {"operation": h.operation, "hold": True, "held": h.held}
            for h in self._holds
            if not h.released
        ]
        return [
            *(f.to_json() for f in self._failures),
            *(d.to_json() for d in self._delays),
            *holds,
        ]

    def take_delays(self, operation: str) -> list[float]:
        """The delays that apply to one request of ``operation`` (each counted once)."""
        seconds = []
        for delay in list(self._delays):
            if _matches(delay.operation, operation):
                delay.remaining = _consume(delay.remaining)
                if delay.remaining == 0:
                    self._delays.remove(delay)
                seconds.append(delay.seconds)
        return seconds

    def take_failure(self, operation: str) -> Answer | None:
        """The injected answer for one request of ``operation``, if a failure matches."""
        for failure in self._failures:
            if _matches(failure.operation, operation):
                failure.remaining = _consume(failure.remaining)
                if failure.remaining == 0:
                    self._failures.remove(failure)
                message = f"injected {failure.status} for {operation}"
                return Answer.error(
                    failure.status, error_code(failure.status), message, failure.headers
                )
        return None

    def holds_for(self, operation: str) -> list[Hold]:
        """The holds one answer of ``operation`` must wait for."""
        self._holds = [h for h in self._holds if not h.released]
        return [h for h in self._holds if _matches(h.operation, operation)]


@dataclass(slots=True)
class Settings:
    """Switches between today's API and what older upstreams did; admin ``/settings``."""

    invoice_pdf: str = "bytes"
    """``bytes``: 200 ``application/pdf``; ``redirect``: 302 + ``Location`` (before SDK 1.2)."""
    event_id_fields: tuple[str, ...] = DEFAULT_EVENT_ID_FIELDS
    """The id fields events carry: ``eventId`` today, ``id`` on older upstreams."""
    has_access: bool = True
    """False: entitlement documents as older upstreams sent them (no ``hasAccess``,
    ``modules`` as stored)."""
    push_attempts: int = 3
    """Delivery attempts per push, back to back, before it is dropped."""

    def to_json(self) -> Json:
        return {
            "invoicePdf": self.invoice_pdf,
            "eventIdFields": list(self.event_id_fields),
            "hasAccess": self.has_access,
            "pushAttempts": self.push_attempts,
        }

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply the admin API's camelCase changes, all or nothing (400 on any bad one)."""
        known = {"invoicePdf", "eventIdFields", "hasAccess", "pushAttempts"}
        unknown = sorted(set(changes) - known)
        if unknown:
            bad_request("invalid_field", f"unknown settings: {', '.join(unknown)}")
        pdf = changes.get("invoicePdf", self.invoice_pdf)
        if pdf not in ("bytes", "redirect"):
            bad_request("invalid_field", "invoicePdf must be bytes or redirect")
        ids = changes.get("eventIdFields", list(self.event_id_fields))
        if (
            not isinstance(ids, list)
            or not set(ids) <= _EVENT_ID_FIELDS
            or len(set(ids)) != len(ids)
        ):
            bad_request("invalid_field", "eventIdFields must be a list of eventId and/or id")
        has_access = changes.get("hasAccess", self.has_access)
        if not isinstance(has_access, bool):
            bad_request("invalid_field", "hasAccess must be a boolean")
        attempts = changes.get("pushAttempts", self.push_attempts)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
            bad_request("invalid_field", "pushAttempts must be an integer from 1 to 10")
        self.invoice_pdf = pdf
        self.event_id_fields = tuple(ids)
        self.has_access = has_access
        self.push_attempts = attempts
