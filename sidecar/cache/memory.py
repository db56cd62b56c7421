"""The in-process layer: a bounded LRU of entries in front of Redis."""

from __future__ import annotations

from collections import OrderedDict

from .entry import Entry

__all__ = ["MemoryLayer"]


class MemoryLayer:
    """Bounded LRU of entries; each remembers until when memory may answer alone
    (``Entry.answer_until``, set here).

    An entry stays past its ``answer_until`` (until evicted) as the stale fallback
    for a fill whose upstream call fails.
    """

    __slots__ = ("changes", "data", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        #: Counts every store, removal and clear (not a hit's reordering): the local
        #: snapshot writes nothing while it has not moved (``cache/snapshot.py``).
        self.changes = 0
        #: customer -> entry, least recently used first. Public so
        #: ``DocumentCache.hit`` can answer a hit without a method call (the hot path).
        #: The entry itself holds ``answer_until``: no tuple per customer.
        self.data: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: str) -> tuple[Entry, float] | None:
        """The entry and its ``answer_until`` (even past it), marked recently used."""
        entry = self.data.get(key)
        if entry is None:
            return None
        self.data.move_to_end(key)
        return entry, entry.answer_until

    def put(self, key: str, entry: Entry, answer_until: float) -> None:
        """Store or replace ``key``, evicting the least recently used beyond the bound."""
        if self.max_entries <= 0:
            return
        entry.answer_until = answer_until
        self.changes += 1
        self.data[key] = entry
        self.data.move_to_end(key)
        while len(self.data) > self.max_entries:
            self.data.popitem(last=False)

    def pop(self, key: str) -> None:
        if self.data.pop(key, None) is not None:
            self.changes += 1

    def clear(self) -> None:
        if self.data:
            self.changes += 1
        self.data.clear()

    def customers_of(self, account: str) -> set[str]:
        """The customers held whose document names ``account``."""
        return {c for c, e in self.data.items() if e.account_id == account}
