"""Browser guards for the unauthenticated local API and the ops listener.

A web page can make a user's browser send requests to ``127.0.0.1`` (directly,
or through DNS rebinding with its own host name). Browsers always send the page's
``Host``; for cross-origin requests made by scripts they add ``Origin``, and
for every request, ``<img>`` and ``<script>`` tags included, modern browsers
send Fetch Metadata (``Sec-Fetch-Site``) and usually a ``Referer``. Local apps
and tiny clients send none of these. So a request is refused (403, before any
work) when it carries:

- an ``Origin`` header;
- ``Sec-Fetch-Site`` other than ``none`` (typed in the address bar, a
  bookmark) or ``same-origin``;
- a ``Referer`` whose origin is not the request's own ``Host`` (older
  browsers without Fetch Metadata still send it);
- a ``Host`` that is not a loopback name or an allowed name.

The ops listener (``/healthz``, ``/readyz``, ``/metrics``) gets the same
checks, except that its ``Host`` may also be any IP literal: the kubelet's
probes and Prometheus' scrapes address the pod by IP and send that IP as
``Host``. DNS rebinding needs a host *name* that later resolves to the pod, so
IP literals give it nothing; names (a Service's DNS name in a static scrape
config, say) are added with ``SIDECAR_OPS_ALLOWED_HOSTS``. An allowed name
starting with a dot (``.svc.cluster.local``) matches every name under it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Collection, Mapping
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from .responses import json_response

__all__ = ["HostGuard", "guard_middleware"]

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_SAME_SITE = frozenset({"none", "same-origin"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HostGuard:
    def __init__(self, allowed_hosts: Collection[str] = (), *, ip_literals: bool = False) -> None:
        names = frozenset(h.lower() for h in allowed_hosts)
        self.allowed = frozenset(n for n in names if not n.startswith(".")) | _LOOPBACK_NAMES
        self.suffixes = (".localhost", *sorted(n for n in names if n.startswith(".")))
        #: Any IP address is an allowed Host (the ops listener's kubelet and Prometheus).
        self.ip_literals = ip_literals
        self._cache: dict[str, bool] = {}

    def refusal(self, headers: Mapping[str, str]) -> str | None:
        """Why a request with these headers is refused, or ``None`` when it may pass."""
        host = headers.get("Host")
        origin = headers.get("Origin")
        fetch_site = headers.get("Sec-Fetch-Site")
        referer = headers.get("Referer")
        if origin is not None:
            return "requests from browsers (with an Origin header) are not accepted"
        if fetch_site is not None and fetch_site.lower() not in _SAME_SITE:
            return "cross-site requests from browsers (Sec-Fetch-Site) are not accepted"
        if referer and not _same_origin(referer, host):
            return "requests referred by another site (Referer) are not accepted"
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
        if name in self.allowed or name.endswith(self.suffixes):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.ip_literals or address.is_loopback


def _same_origin(referer: str, host: str | None) -> bool:
    """Is the Referer's origin this very server (its scheme's default port included)?"""
    if host is None:
        return False
    try:
        ref, own = urlsplit(referer), urlsplit("//" + host)
        ref_port = ref.port or _DEFAULT_PORTS.get(ref.scheme)
        own_port = own.port or _DEFAULT_PORTS.get(ref.scheme)
    except ValueError:
        return False
    return bool(ref.hostname) and (ref.hostname, ref_port) == (own.hostname, own_port)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guard_middleware(guard: HostGuard) -> Middleware:
    """A middleware refusing what ``guard`` refuses, with a JSON 403 (the ops listener's)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = guard.refusal(request.headers)
        if refusal is not None:
            return json_response({"error": {"code": "forbidden", "message": refusal}}, 403)
        return await handler(request)

    return middleware
