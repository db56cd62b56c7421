"""Reading request input: path ids and JSON bodies, refused with a 400 naming the problem."""

from __future__ import annotations

from typing import Any, Final, TypeGuard

import orjson
from aiohttp import web

from ..errors import BadRequest

__all__ = ["MAX_BATCH", "MAX_ID_LENGTH", "is_id", "path_id", "read_json"]

#: Checks in one ``POST /v1/check``.
MAX_BATCH: Final = 1000
#: Characters in one id (customer, account, module, ...), wherever it arrives.
MAX_ID_LENGTH: Final = 512


def is_id(value: Any) -> TypeGuard[str]:
    """A non-empty string of at most ``MAX_ID_LENGTH`` characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def path_id(request: web.Request, name: str) -> str:
    """The URL-decoded path segment ``name``; 400 ``invalid_id`` when empty or too long."""
    value = request.match_info[name]
    if not value:
        raise BadRequest(f"{name} must not be empty", code="invalid_id")
    if len(value) > MAX_ID_LENGTH:
        raise BadRequest(f"{name} is longer than {MAX_ID_LENGTH} characters", code="invalid_id")
    return value


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 400 for anything that is not (invalid UTF-8 included)."""
    raw = await request.read()
    if not raw:
        raise BadRequest("a JSON body is required", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
