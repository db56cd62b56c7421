"""The open OFREP event streams (``http/ofrep.py``'s ``events``), by customer.

Kept apart from the handlers so the app keys can name the type without an
import circle. The invalidator calls ``Streams.notify`` for every drop applied
on this sidecar, whether issued here or received from another sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator, Sequence

from ..cache.kinds import Axis

__all__ = ["Streams", "Subscriber"]


class Subscriber:
    """One open stream: ``pending`` when a refetch is owed, ``wake`` to tell it."""

    __slots__ = ("closing", "pending", "wake")

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.pending = False
        self.closing = False


class Streams:
    """The open event streams, by customer; told of every drop by the invalidator.

    A drop naming customers wakes their streams; a tenant-wide drop (or a fan-out
    resubscribe, after which messages may have been missed) wakes every stream.
    Notifications coalesce: a stream that has not sent its last one yet sends one.
    """

    def __init__(self) -> None:
        self._by_customer: dict[str, set[Subscriber]] = {}
        self._ids = itertools.count(1)
        self.closing = False

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_customer.values())

    def notify(self, customers: Sequence[str] | None, axes: tuple[Axis, ...]) -> None:
        """A ``DropWatcher``: either axis concerns OFREP (flags, and ``module:`` keys)."""
        if not axes:
            return
        if customers is None:
            targets = [s for subs in self._by_customer.values() for s in subs]
        else:
            targets = [s for c in customers for s in self._by_customer.get(c, ())]
        for sub in targets:
            sub.pending = True
            sub.wake.set()

    def close(self) -> None:
        """End every stream (shutdown: the listeners wait for open requests)."""
        self.closing = True
        for subs in self._by_customer.values():
            for sub in subs:
                sub.closing = True
                sub.wake.set()

    def next_id(self) -> str:
        return str(next(self._ids))

    @contextlib.contextmanager
    def subscribe(self, customer: str) -> Iterator[Subscriber]:
        sub = Subscriber()
        self._by_customer.setdefault(customer, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._by_customer.get(customer)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_customer[customer]
