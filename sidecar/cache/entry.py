"""One cached answer (``Entry``) of a document kind: its freshness, its stale window
and its stored form.

Times are ``time.time()`` seconds. An entry is *fresh* until ``fresh_until``
(answered as a hit), may be served *stale* until ``stale_until`` when the
upstream cannot answer, and from ``refresh_at`` (the last tenth of the fresh
window, at most 30 s) a hit starts one background refresh.

**A drop expires, it never destroys** (RFC 5861's stale-if-error): a dropped
entry is kept, marked ``expired``, so it is never fresh again but is still the
stale fallback for when the upstream cannot answer. ``expired`` says why:
``PRECAUTION`` (the sidecar could not be sure nothing changed: a lost fan-out
subscription, a Redis that lost writes) or ``DROPPED`` (a push, a cache
``DELETE``, a billing write said it changed; with ``SIDECAR_STRICT_DROPS`` such an
entry is not served stale either).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, Final, Literal

import orjson

from ..errors import UpstreamUnavailable, error_body
from .kinds import ENTITLEMENTS, NOT_FOUND_BODY, NOT_FOUND_DOC, Kind

__all__ = [
    "DROPPED",
    "NOT_FOUND_BODY",
    "NOT_FOUND_DOC",
    "PRECAUTION",
    "Entry",
    "Lookup",
    "Source",
    "Stamp",
]

Source = Literal["hit", "miss", "stale"]

#: ``Entry.expired``: revalidate first, stale fallback meanwhile (see the module docstring).
PRECAUTION: Final = 1
#: ``Entry.expired``: an explicit drop said the document changed.
DROPPED: Final = 2

#: What a stored entry was filled under in the shared tier: the kind's tenant-wide
#: generation and the tenant's epoch (``cache.shared``); ``None`` for an entry never
#: stored there.
Stamp = tuple[str, str]

#: A 404 body the upstream sent is kept (for the mirror) only up to this size.
_MAX_NOT_FOUND_BODY: Final = 4096
#: The share of the fresh window at whose end a hit refreshes ahead, and its cap.
_REFRESH_SHARE: Final = 0.1
_MAX_REFRESH_AHEAD: Final = 30.0


class Entry:
    """One document's answer: the upstream document, or "not found".

    Compact, because a sidecar may hold 100,000 of them (docs/performance.md,
    "Memory"): the document is kept once, as the local API's body bytes, and
    the few fields the hot path reads (``status``, ``account_id``, the module set,
    a flags document's booleans) are pulled out of it when the entry is made,
    shared between entries where they repeat (interned strings, one frozenset per
    distinct module list, one mapping per distinct set of flags). ``doc`` parses
    the body again, for the rare reader that wants the whole document.
    """

    __slots__ = (
        "_raw",
        "account_id",
        "answer_until",
        "expired",
        "fetched_at",
        "flags",
        "found",
        "fresh_until",
        "kind",
        "modules",
        "refresh_at",
        "stale_until",
        "status",
    )

    #: The module set of a document (empty for "not found"), shared between entries.
    modules: frozenset[str]
    #: A flags document's boolean flags, shared between entries; empty for other kinds.
    flags: Mapping[str, bool]
    #: The in-process layer's deadline for answering with this entry alone
    #: (``MemoryLayer.put`` sets it).
    answer_until: float
    #: 0, ``PRECAUTION`` or ``DROPPED``: an expired entry is never fresh again.
    expired: int

    def __init__(
        self,
        doc: dict[str, Any] | None,
        fetched_at: float,
        fresh_until: float,
        stale_until: float,
        not_found_body: bytes | None = None,
        kind: Kind = ENTITLEMENTS,
    ) -> None:
        self.kind = kind
        self.fetched_at = fetched_at
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        # Stale-while-revalidate: a hit in the last tenth of the fresh window
        # (at most 30 s) starts one background refresh.
        self.refresh_at = fresh_until - min(
            (fresh_until - fetched_at) * _REFRESH_SHARE, _MAX_REFRESH_AHEAD
        )
        self.answer_until = fresh_until
        self.expired = 0
        if doc is None:
            self.found = False
            # "Not found": the upstream's own 404 body, kept for the mirror.
            self._raw = not_found_body
            self.status = None
            self.account_id = None
            self.modules = _NO_MODULES
            self.flags = _NO_FLAGS
            return
        self.found = True
        # orjson returns bytes with a ~4 KiB allocation behind them; the body is kept
        # for the entry's lifetime, so it is copied to its own size.
        self._raw = memoryview(kind.local_body(doc)).tobytes()
        status = doc.get("status")
        self.status = sys.intern(status) if type(status) is str else status
        account = doc.get("accountId")
        self.account_id = sys.intern(account) if isinstance(account, str) and account else None
        self.modules = _modules_of(doc.get("modules"))
        self.flags = _flags_of(doc.get("flags")) if kind.flags else _NO_FLAGS

    @classmethod
    def from_upstream(
        cls,
        status: int,
        body: bytes,
        *,
        now: float,
        fresh_for: float,
        stale_for: float,
        kind: Kind = ENTITLEMENTS,
    ) -> Entry:
        """The entry for the upstream's 200 or 404 answer, fresh for ``fresh_for`` seconds
        and servable stale for ``stale_for`` more.

        A 404 is a "not found" entry (its JSON body kept for the mirror); a 200 whose
        body is not a JSON object, or not a document of ``kind``, raises
        ``UpstreamUnavailable``. The kind's ``dropped`` fields are removed (an
        entitlement's ``found`` is the sidecar's word, not the upstream's).
        """
        fresh_until = now + fresh_for
        stale_until = fresh_until + stale_for
        if status == 404:
            kept = body if _small_json(body) else None
            if kept is not None:
                kept = memoryview(kept).tobytes()
            return cls(None, now, fresh_until, stale_until, kept, kind)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise UpstreamUnavailable(
                f"the upstream's {kind.name} answer is not JSON (an object was expected)"
            )
        problem = kind.check(doc)
        if problem is not None:
            raise UpstreamUnavailable(f"the upstream sent {problem}")
        for name in kind.dropped:
            doc.pop(name, None)
        return cls(doc, now, fresh_until, stale_until, None, kind)

    def is_fresh(self, now: float) -> bool:
        """Whether a hit may answer with this entry at ``now`` (never once expired)."""
        return not self.expired and now < self.fresh_until

    def is_servable_stale(self, now: float, strict: bool = False) -> bool:
        """Whether this entry may still answer, marked ``stale``, when the upstream cannot.

        ``strict`` (``SIDECAR_STRICT_DROPS``): not once an explicit drop expired it."""
        return now < self.stale_until and not (strict and self.expired == DROPPED)

    def expire(self, level: int) -> None:
        """Never fresh again, never answering alone; kept as the stale fallback. An
        explicit drop is never downgraded to a precaution."""
        self.answer_until = 0.0
        if level > self.expired:
            self.expired = level

    @property
    def doc(self) -> dict[str, Any] | None:
        """The upstream document (parsed again from the kept body: not for hot paths)."""
        if not self.found:
            return None
        doc = orjson.loads(self.upstream_body())
        assert isinstance(doc, dict)
        return doc

    @property
    def not_found_body(self) -> bytes | None:
        """The upstream's own 404 body, when it sent a small JSON one."""
        return None if self.found else self._raw

    def has(self, module: str) -> bool:
        return module in self.modules

    def flag(self, name: str) -> bool | None:
        """A flags document's value for ``name``; ``None`` when it defines no boolean one."""
        return self.flags.get(name)

    def body(self) -> bytes:
        """The local API body (the kind's ``local_body``: an entitlement document plus
        ``"found"``). A "not found" entry answers the kind's ``missing_body`` (for
        entitlements ``NOT_FOUND_BODY``), with ``local_status``."""
        if self.found:
            assert self._raw is not None
            return self._raw
        return self.kind.missing_body

    @property
    def local_status(self) -> int:
        """The local API's status for ``body()``."""
        return 200 if self.found else self.kind.missing_status

    def upstream_body(self) -> bytes:
        """The body as the upstream gave it (for the drop-in mirror)."""
        if self.found:
            assert self._raw is not None
            return self.kind.upstream_body(self._raw)
        return self._raw or orjson.dumps(error_body("not_found", self.kind.missing))

    def dumps(self, stamp: Stamp | None = None) -> bytes:
        """The stored form (``"v": 1``, which every sidecar version reads), with the
        shared tier's ``stamp`` (``"tg"``, ``"ep"``) and ``"x"`` when expired."""
        nf = None if self.found or self._raw is None else self._raw.decode("utf-8", "replace")
        data: dict[str, Any] = {
            "v": 1,
            "f": self.fetched_at,
            "fu": self.fresh_until,
            "su": self.stale_until,
            # The document's bytes as they are, not parsed and dumped again.
            "d": orjson.Fragment(self.upstream_body()) if self.found else None,
            "nf": nf,
        }
        if stamp is not None:
            data["tg"], data["ep"] = stamp
        if self.expired:
            data["x"] = self.expired
        return orjson.dumps(data)

    @classmethod
    def loads(cls, raw: bytes, kind: Kind = ENTITLEMENTS) -> Entry | None:
        """Parse a stored entry of ``kind``; anything unreadable counts as a miss, never
        an error."""
        return cls.loads_stamped(raw, kind)[0]

    @classmethod
    def loads_stamped(
        cls, raw: bytes, kind: Kind = ENTITLEMENTS
    ) -> tuple[Entry | None, Stamp | None]:
        """``loads`` plus the stamp it was stored with (``None`` when it has none)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None, None
        return cls.from_stored(data, kind)

    @classmethod
    def from_stored(cls, data: Any, kind: Kind = ENTITLEMENTS) -> tuple[Entry | None, Stamp | None]:
        """``loads_stamped`` of ``dumps``' form already parsed (a snapshot line holds it
        as an object); ``(None, None)`` when it is not that form."""
        try:
            doc = data["d"]
            if doc is not None and not isinstance(doc, dict):
                return None, None
            nf = data.get("nf")
            not_found = nf.encode() if isinstance(nf, str) else None
            if nf is not None and (not_found is None or not _small_json(not_found)):
                return None, None  # a "not found" keeps only the upstream's small JSON body
            entry = cls(
                doc,
                _instant(data["f"]),
                _instant(data["fu"]),
                _instant(data["su"]),
                not_found,
                kind,
            )
            expired = data.get("x")
            if type(expired) is int and expired in (PRECAUTION, DROPPED):
                entry.expire(expired)
            tg, ep = data.get("tg"), data.get("ep")
            stamp = (tg, ep) if type(tg) is str and type(ep) is str else None
        except (AttributeError, KeyError, TypeError, ValueError):
            return None, None
        return entry, stamp


class Lookup:
    """An entry and where it came from (the ``X-Sidecar-Cache`` header's value)."""

    __slots__ = ("entry", "source")

    def __init__(self, entry: Entry, source: Source) -> None:
        self.entry = entry
        self.source = source


def _instant(value: Any) -> float:
    """A stored instant: a finite JSON number. ``float()`` alone would take the strings
    "nan" and "inf" (a damaged snapshot line, a foreign writer), and an entry holding
    one breaks every answer that computes its age."""
    if type(value) is not float and type(value) is not int:
        raise TypeError("an instant is a number")
    if not math.isfinite(value):
        raise ValueError("an instant is finite")
    return float(value)


def _small_json(body: bytes) -> bool:
    """A "not found" body worth keeping for the mirror: small, and JSON."""
    if not body or len(body) > _MAX_NOT_FOUND_BODY:
        return False
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


#: Distinct module sets and flag sets kept for sharing (beyond it, entries keep their own).
_SHARED_LIMIT: Final = 4096
_NO_MODULES: Final[frozenset[str]] = frozenset()
_NO_FLAGS: Final[Mapping[str, bool]] = {}
_module_sets: dict[frozenset[str], frozenset[str]] = {}
_flag_sets: dict[tuple[tuple[str, bool], ...], Mapping[str, bool]] = {}


def _modules_of(modules: Any) -> frozenset[str]:
    """The strings of a ``modules`` list, as the one shared frozenset of that set."""
    if not isinstance(modules, list) or not modules:
        return _NO_MODULES
    found = frozenset(m for m in modules if isinstance(m, str))
    shared = _module_sets.get(found)
    if shared is not None:
        return shared
    if len(_module_sets) < _SHARED_LIMIT:
        found = frozenset(sys.intern(m) for m in found)
        _module_sets[found] = found
    return found


def _flags_of(flags: Any) -> Mapping[str, bool]:
    """The boolean flags of a ``flags`` object, as the one shared mapping of that set."""
    if not isinstance(flags, dict):
        return _NO_FLAGS
    items = tuple((k, v) for k, v in flags.items() if isinstance(v, bool))
    if not items:
        return _NO_FLAGS
    shared = _flag_sets.get(items)
    if shared is not None:
        return shared
    mapping: Mapping[str, bool] = {sys.intern(k): v for k, v in items}
    if len(_flag_sets) < _SHARED_LIMIT:
        _flag_sets[items] = mapping
    return mapping
