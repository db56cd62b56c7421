"""The framework ceiling: a bare aiohttp handler answering the ``can`` route's JSON.

Same route pattern, same JSON, same event loop choice (uvloop when installed) and
no access log, like the sidecar; but no middleware, cache, metrics or extra
headers. ``python -m bench.bare --port N``.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web


async def can(request: web.Request) -> web.Response:
    info = request.match_info
    body = orjson.dumps(
        {
            "allowed": True,
            "customerId": info["customer"],
            "module": info["module"],
            "status": "active",
        }
    )
    return web.Response(body=body, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/v1/customers/{customer}/can/{module}", can)
    app.router.add_get("/healthz", healthz)
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
