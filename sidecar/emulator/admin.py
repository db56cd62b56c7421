"""The admin API under ``/_emulator/``: no key, JSON in and out.

It changes the emulated service the way its operators, its customers' browsers
and time would (documents, flags, balances, completed checkouts, renewals), reads
what the service saw and sent (requests, events, pushes), and steers faults and
settings. Every route under ``/_emulator/tenants/{tenant}/...`` also exists as
``/_emulator/...`` for the default tenant. A change answers once its pushes were
delivered or dropped, with ``"pushed"`` saying whether all of them arrived.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import web

from .bodies import bad_request, json_object, optional_str
from .operations import OPERATIONS
from .service import EMULATOR, Emulator, to_response
from .wire import Answer, EmulatorError

__all__ = ["ADMIN_ROUTES"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(payload: Any, status: int = 200) -> web.Response:
    return to_response(Answer.json(payload, status))


def _em(request: web.Request) -> Emulator:
    return request.app[EMULATOR]


def _tenant(request: web.Request) -> str:
    return request.match_info.get("tenant") or _em(request).default_tenant


async def _body(request: web.Request) -> dict[str, Any]:
    return json_object(await request.read())


async def _optional_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    return json_object(raw) if raw.strip() else {}


def _bool_value(body: dict[str, Any]) -> bool:
    value = body.get("value")
    if not isinstance(value, bool):
        bad_request("invalid_field", "value must be a boolean")
    return value


async def _healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})


# -- entitlements ------------------------------------------------------------------


async def _get_entitlements(request: web.Request) -> web.Response:
    customer_id = request.match_info["customer"]
    doc = _em(request).get_entitlements(_tenant(request), customer_id)
    if doc is None:
        raise EmulatorError(
            404, "entitlements_not_found", f"customer {customer_id!r} has no entitlements"
        )
    return _json(doc)


async def _put_entitlements(request: web.Request) -> web.Response:
    body = await _body(request)
    em = _em(request)
    tenant, customer = _tenant(request), request.match_info["customer"]
    doc, pushed = await em.run(lambda: em.set_entitlements(tenant, customer, body))
    return _json({"entitlements": doc, "pushed": bool(pushed)})


async def _delete_entitlements(request: web.Request) -> web.Response:
    em = _em(request)
    tenant, customer = _tenant(request), request.match_info["customer"]
    deleted, pushed = await em.run(lambda: em.delete_entitlements(tenant, customer))
    return _json({"deleted": deleted, "pushed": bool(pushed)})


# -- flags -------------------------------------------------------------------------


async def _get_flags(request: web.Request) -> web.Response:
    return _json(_em(request).flag_state(_tenant(request)))


async def _put_flag(request: web.Request) -> web.Response:
    value = _bool_value(await _body(request))
    em = _em(request)
    tenant, name = _tenant(request), request.match_info["flag"]
    customer = request.match_info.get("customer")
    flags, pushed = await em.run(lambda: em.set_flag(tenant, name, value, customer_id=customer))
    return _json({**flags, "pushed": bool(pushed)})


async def _delete_flag(request: web.Request) -> web.Response:
    em = _em(request)
    tenant, name = _tenant(request), request.match_info["flag"]
    customer = request.match_info.get("customer")
    deleted, pushed = await em.run(lambda: em.delete_flag(tenant, name, customer_id=customer))
    return _json({"deleted": deleted, "pushed": bool(pushed)})


# -- credits, checkouts, renewals ----------------------------------------------------


async def _get_credits(request: web.Request) -> web.Response:
    credits = _em(request).credits_of(_tenant(request), request.match_info["customer"])
    return _json({"credits": credits})


async def _put_credits(request: web.Request) -> web.Response:
    body = await _body(request)
    balance = _em(request).set_credits(
        _tenant(request),
        request.match_info["customer"],
        request.match_info["credit_type"],
        body.get("balance"),  # type: ignore[arg-type]  # validated by set_credits
    )
    return _json(balance)


async def _get_checkouts(request: web.Request) -> web.Response:
    return _json({"checkouts": _em(request).checkouts(_tenant(request))})


async def _complete_checkout(request: web.Request) -> web.Response:
    em = _em(request)
    tenant, session = _tenant(request), request.match_info["checkout"]
    result, pushed = await em.run(lambda: em.complete_checkout(tenant, session))
    return _json({"result": result, "pushed": bool(pushed)})


async def _renew(request: web.Request) -> web.Response:
    body = await _optional_body(request)
    outcome = optional_str(body, "outcome") or "succeeded"
    if outcome not in ("succeeded", "failed"):
        bad_request("invalid_field", "outcome must be succeeded or failed")
    mode = optional_str(body, "mode") or "test"
    if mode not in ("test", "live"):
        bad_request("invalid_field", "mode must be test or live")
    em = _em(request)
    tenant = _tenant(request)
    account, customer = request.match_info["account"], request.match_info["customer"]
    sub, pushed = await em.run(
        lambda: em.renew(tenant, account, customer, mode=mode, succeeded=outcome == "succeeded")
    )
    return _json({"subscription": sub, "pushed": bool(pushed)})


# -- pushes and events -----------------------------------------------------------------


async def _push(request: web.Request) -> web.Response:
    body = await _optional_body(request)
    data = body.get("data", {})
    if not isinstance(data, dict):
        bad_request("invalid_field", "data must be an object")
    push = await _em(request).push_event(
        _tenant(request),
        customer_id=optional_str(body, "customerId"),
        account_id=optional_str(body, "accountId"),
        event_type=optional_str(body, "type") or "entitlements.updated",
        **data,
    )
    return _json({"event": push.event, "pushed": push.delivered, "status": push.status})


async def _pushes(request: web.Request) -> web.Response:
    return _json({"pushes": [p.to_json() for p in _em(request).pushes]})


async def _events(request: web.Request) -> web.Response:
    return _json({"events": _em(request).events})


# -- the request log, reset, faults, settings --------------------------------------------


async def _requests(request: web.Request) -> web.Response:
    operation = request.query.get("operation")
    tenant = request.query.get("tenant")
    records = [
        r.to_json()
        for r in _em(request).requests
        if (operation is None or r.operation == operation)
        and (tenant is None or r.tenant == tenant)
    ]
    return _json({"requests": records})


async def _clear_requests(request: web.Request) -> web.Response:
    _em(request).clear_requests()
    return web.Response(status=204)


async def _reset(request: web.Request) -> web.Response:
    _em(request).reset()
    return web.Response(status=204)


async def _get_faults(request: web.Request) -> web.Response:
    return _json({"faults": _em(request).faults()})


async def _add_fault(request: web.Request) -> web.Response:
    body = await _body(request)
    operation = optional_str(body, "operation")
    if operation is not None and operation not in OPERATIONS:
        bad_request("invalid_field", f"unknown operation {operation!r}")
    times = body.get("times")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        bad_request("invalid_field", "times must be a positive integer or null")
    status, seconds, hold = body.get("status"), body.get("delay"), body.get("hold", False)
    if not isinstance(hold, bool):
        bad_request("invalid_field", "hold must be a boolean")
    if status is None and seconds is None and not hold:
        bad_request("missing_field", "status, delay or hold is required")
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599
    ):
        bad_request("invalid_field", "status must be an HTTP error status (400-599)")
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0
    ):
        bad_request("invalid_field", "delay must be a non-negative number of seconds")
    em = _em(request)
    if seconds is not None:
        em.delay(operation, float(seconds), times)
    if status is not None:
        em.fail(operation, status, times)
    if hold:
        # Held until DELETE /_emulator/faults: the answer is computed, its delivery waits.
        em.hold(operation)
    return _json({"faults": em.faults()}, 201)


async def _clear_faults(request: web.Request) -> web.Response:
    _em(request).clear_faults()
    return web.Response(status=204)


async def _get_settings(request: web.Request) -> web.Response:
    return _json(_em(request).settings.to_json())


async def _patch_settings(request: web.Request) -> web.Response:
    em = _em(request)
    em.settings.update(await _body(request))
    return _json(em.settings.to_json())


def _per_tenant(method: str, path: str, handler: Handler) -> list[tuple[str, str, Handler]]:
    return [
        (method, f"/_emulator/tenants/{{tenant}}{path}", handler),
        (method, f"/_emulator{path}", handler),
    ]


ADMIN_ROUTES: Final[Sequence[tuple[str, str, Handler]]] = [
    ("GET", "/_emulator/healthz", _healthz),
    ("GET", "/_emulator/requests", _requests),
    ("DELETE", "/_emulator/requests", _clear_requests),
    ("GET", "/_emulator/pushes", _pushes),
    ("GET", "/_emulator/events", _events),
    ("POST", "/_emulator/reset", _reset),
    ("GET", "/_emulator/faults", _get_faults),
    ("POST", "/_emulator/faults", _add_fault),
    ("DELETE", "/_emulator/faults", _clear_faults),
    ("GET", "/_emulator/settings", _get_settings),
    ("PATCH", "/_emulator/settings", _patch_settings),
    *_per_tenant("GET", "/customers/{customer}/entitlements", _get_entitlements),
    *_per_tenant("PUT", "/customers/{customer}/entitlements", _put_entitlements),
    *_per_tenant("DELETE", "/customers/{customer}/entitlements", _delete_entitlements),
    *_per_tenant("POST", "/push", _push),
    *_per_tenant("GET", "/flags", _get_flags),
    *_per_tenant("PUT", "/flags/{flag}", _put_flag),
    *_per_tenant("DELETE", "/flags/{flag}", _delete_flag),
    *_per_tenant("PUT", "/customers/{customer}/flags/{flag}", _put_flag),
    *_per_tenant("DELETE", "/customers/{customer}/flags/{flag}", _delete_flag),
    *_per_tenant("GET", "/customers/{customer}/credits", _get_credits),
    *_per_tenant("PUT", "/customers/{customer}/credits/{credit_type}", _put_credits),
    *_per_tenant("GET", "/checkouts", _get_checkouts),
    *_per_tenant("POST", "/checkouts/{checkout}/complete", _complete_checkout),
    *_per_tenant("POST", "/accounts/{account}/customers/{customer}/renew", _renew),
]
