"""The local API's one flag route: ``GET /v1/customers/{c}/flags/{name}?default=``.

A flag is read from the customer's cached flags document (``cache.kinds.FLAGS``).
The caller's ``default`` is the answer, marked ``"fallback": true``, whenever the
document cannot say: the upstream does not define the flag, or there is no
answer at all (upstream down, nothing cached). Without a default those are a
404 ``flag_not_found`` and a 503 ``upstream_unavailable``. There is no single
safe default (a new feature wants ``false``, a kill switch ``true``), which is
why the Vellum SDK requires one too.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest

from ..appkeys import CACHES
from ..cache.entry import Lookup
from ..errors import BadRequest, NotFound, UpstreamError, UpstreamUnavailable
from .inputs import path_id
from .responses import cached_response, json_response, source_response

__all__ = ["flag", "flag_route", "parse_default"]

_BOOLS: dict[str, bool] = {"true": True, "false": False}


def parse_default(request: web.Request) -> bool | None:
    """``?default=true|false``; ``None`` when absent, 400 ``invalid_query`` otherwise."""
    given = request.query.getall("default", [])
    if not given:
        return None
    value = _BOOLS.get(given[0]) if len(given) == 1 else None
    if value is None:
        raise BadRequest("default must be true or false, once", code="invalid_query")
    return value


async def flag(
    app: web.Application,
    request: BaseRequest,
    customer: str,
    name: str,
    default: bool | None = None,
) -> web.StreamResponse:
    """A hot route (``http/hot.py``): the front door calls it with the ids it matched
    (and no ``default``: a query string goes to the router), the router through
    ``flag_route`` (``request`` is not read)."""
    cache = app[CACHES].flags
    entry = cache.hit_entry(customer)
    if entry is not None:
        value = entry.flag(name)
        if value is not None:
            # The memory hit of a defined flag: no Lookup, no answer dict to merge.
            body = orjson.dumps({"flag": name, "customerId": customer, "value": value})
            return source_response(body, "hit", entry.fetched_at)
    answer: dict[str, Any] = {"flag": name, "customerId": customer}
    try:
        # A memory hit without the flag is still the document's answer.
        lookup = Lookup(entry, "hit") if entry is not None else await cache.get_missed(customer)
    except UpstreamError as exc:
        if default is None:
            raise UpstreamUnavailable(
                exc.message, code=exc.code, retry_after=exc.retry_after, **answer, value=None
            ) from None
        return json_response({**answer, "value": default, "fallback": True})
    value = lookup.entry.flag(name)
    if value is not None:
        answer["value"] = value
        if lookup.source == "stale":
            answer["stale"] = True
        return cached_response(orjson.dumps(answer), lookup)
    if default is None:
        missing = NotFound(
            f"the upstream defines no flag {name!r} for this customer",
            code="flag_not_found",
            **answer,
        )
        # Still a cached read (the document said so): the cache headers stay.
        return cached_response(orjson.dumps(missing.body()), lookup, missing.status)
    return cached_response(orjson.dumps({**answer, "value": default, "fallback": True}), lookup)


async def flag_route(request: web.Request) -> web.StreamResponse:
    """``flag`` for what the router serves: decoded ids, ``?default=``."""
    customer = path_id(request, "customer")
    name = path_id(request, "name")
    default = parse_default(request) if request.query_string else None
    return await flag(request.app, request, customer, name, default)
