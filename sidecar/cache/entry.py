"""One cached answer (``Entry``) of a document kind: its freshness, its stale window
and its stored form.

Times are ``time.time()`` seconds. An entry is *fresh* until ``fresh_until``
(answered as a hit), may be served *stale* until ``stale_until`` when the
upstream cannot answer, and from ``refresh_at`` (the last tenth of the fresh
window, at most 30 s) a hit starts one background refresh.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import orjson

from ..errors import UpstreamUnavailable, error_body
from .kinds import ENTITLEMENTS, NOT_FOUND_BODY, NOT_FOUND_DOC, Kind

__all__ = ["NOT_FOUND_BODY", "NOT_FOUND_DOC", "Entry", "Lookup", "Source"]

Source = Literal["hit", "miss", "stale"]

#: A 404 body the upstream sent is kept (for the mirror) only up to this size.
_MAX_NOT_FOUND_BODY: Final = 4096
#: The share of the fresh window at whose end a hit refreshes ahead, and its cap.
_REFRESH_SHARE: Final = 0.1
_MAX_REFRESH_AHEAD: Final = 30.0


class Entry:
    """One document's answer: the upstream document, or ``None`` for "not found"."""

    __slots__ = (
        "_body",
        "_modules",
        "doc",
        "fetched_at",
        "fresh_until",
        "kind",
        "not_found_body",
        "refresh_at",
        "stale_until",
    )

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
        self.doc = doc
        self.fetched_at = fetched_at
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        # Stale-while-revalidate: a hit in the last tenth of the fresh window
        # (at most 30 s) starts one background refresh.
        self.refresh_at = fresh_until - min(
            (fresh_until - fetched_at) * _REFRESH_SHARE, _MAX_REFRESH_AHEAD
        )
        self.not_found_body = not_found_body
        self._body: bytes | None = None
        self._modules: frozenset[str] | None = None

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
            kept = body if body and len(body) <= _MAX_NOT_FOUND_BODY and _is_json(body) else None
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
        """Whether a hit may answer with this entry at ``now``."""
        return now < self.fresh_until

    def is_servable_stale(self, now: float) -> bool:
        """Whether this entry may still answer, marked ``stale``, when the upstream cannot."""
        return now < self.stale_until

    @property
    def found(self) -> bool:
        return self.doc is not None

    @property
    def status(self) -> Any:
        return self.doc.get("status") if self.doc is not None else None

    @property
    def account_id(self) -> str | None:
        account = self.doc.get("accountId") if self.doc is not None else None
        return account if isinstance(account, str) and account else None

    def has(self, module: str) -> bool:
        if self._modules is None:
            modules = self.doc.get("modules") if self.doc is not None else None
            self._modules = frozenset(
                m for m in (modules if isinstance(modules, list) else ()) if isinstance(m, str)
            )
        return module in self._modules

    def flag(self, name: str) -> bool | None:
        """A flags document's value for ``name``; ``None`` when it defines no boolean one."""
        flags = self.doc.get("flags") if self.doc is not None else None
        value = flags.get(name) if isinstance(flags, dict) else None
        return value if isinstance(value, bool) else None

    def body(self) -> bytes:
        """The local API body (the kind's ``local_body``: an entitlement document plus
        ``"found"``); built once. A "not found" entry answers the kind's ``missing_body``
        (for entitlements ``NOT_FOUND_BODY``), with ``local_status``."""
        if self._body is None:
            # orjson returns bytes with a ~4 KiB allocation behind them; a body kept
            # for the entry's lifetime is copied to its own size (100,000 cached
            # customers: ~400 MiB less resident memory).
            self._body = (
                memoryview(self.kind.local_body(self.doc)).tobytes()
                if self.doc is not None
                else self.kind.missing_body
            )
        return self._body

    @property
    def local_status(self) -> int:
        """The local API's status for ``body()``."""
        return 200 if self.doc is not None else self.kind.missing_status

    def upstream_body(self) -> bytes:
        """The body as the upstream gave it (for the drop-in mirror)."""
        if self.doc is not None:
            return orjson.dumps(self.doc)
        return self.not_found_body or orjson.dumps(error_body("not_found", self.kind.missing))

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "f": self.fetched_at,
                "fu": self.fresh_until,
                "su": self.stale_until,
                "d": self.doc,
                "nf": self.not_found_body.decode("utf-8", "replace")
                if self.not_found_body
                else None,
            }
        )

    @classmethod
    def loads(cls, raw: bytes, kind: Kind = ENTITLEMENTS) -> Entry | None:
        """Parse a stored entry of ``kind``; anything unreadable counts as a miss, never
        an error."""
        try:
            data = orjson.loads(raw)
            doc = data["d"]
            if doc is not None and not isinstance(doc, dict):
                return None
            nf = data.get("nf")
            return cls(
                doc,
                float(data["f"]),
                float(data["fu"]),
                float(data["su"]),
                nf.encode() if isinstance(nf, str) else None,
                kind,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class Lookup:
    """An entry and where it came from (the ``X-Sidecar-Cache`` header's value)."""

    __slots__ = ("entry", "source")

    def __init__(self, entry: Entry, source: Source) -> None:
        self.entry = entry
        self.source = source


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True
