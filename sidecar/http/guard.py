"""Browser guard for the unauthenticated local API.

A web page can make a user's browser send requests to ``127.0.0.1`` (directly,
or through DNS rebinding with its own host name). Browsers always send the page's
``Host`` and, for cross-origin requests, an ``Origin`` header; local apps and
tiny clients send neither an unexpected ``Host`` nor an ``Origin``. So: a request
carrying ``Origin`` is refused, and so is one whose ``Host`` is not a loopback name
or one of ``SIDECAR_ALLOWED_HOSTS``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

__all__ = ["HostGuard"]

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class HostGuard:
    def __init__(self, allowed_hosts: Collection[str] = ()) -> None:
        self.allowed = frozenset(h.lower() for h in allowed_hosts) | _LOOPBACK_NAMES
        self._cache: dict[str, bool] = {}

    def refusal(self, host: str | None, origin: str | None) -> str | None:
        """Why the request is refused, or ``None`` when it may pass."""
        if origin is not None:
            return "requests from browsers (with an Origin header) are not accepted"
        if host is None or host == "":
            return None  # HTTP/1.0 clients and unix-socket callers may send no Host
        ok = self._cache.get(host)
        if ok is None:
            ok = self._host_allowed(host)
            if len(self._cache) < 1024:
                self._cache[host] = ok
        return None if ok else "the Host header is not a loopback name or an allowed host"

    def _host_allowed(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        if name in self.allowed or name.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False
