"""Reading request input: ids and JSON bodies, refused with a 400 naming the problem.

**Ids.** :func:`id_problem` is the one rule for every id the sidecar takes, on
every surface (path segments of ``/v1`` and the mirror, the mirror's tenant,
each segment of a forwarded unknown operation, ``POST /v1/check``'s pairs, OFREP's
``targetingKey`` and flag keys, ``/v1``'s id fields): once decoded, an id is
1 to ``MAX_ID_LENGTH`` characters, is not ``.`` or ``..``, and holds no ``/``,
no ``\\`` and no control character (C0, DEL, C1). The sidecar quotes every id
as exactly one upstream path segment, but an egress proxy that decodes and
normalises paths on its way (nginx's ``proxy_pass http://up/;``, some service
meshes) would turn ``..%2F..%2Fother`` back into two levels up, and some servers
read ``\\`` as ``/``: such an id is refused before any work, so it never reaches
one. The front door (``http/hot.py``) only takes ids made of characters this
rule allows, and leaves the rest to the router, which applies it.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeGuard

import orjson
from aiohttp import web

from ..errors import BadRequest

__all__ = [
    "DOT_SEGMENTS",
    "ID_RULE",
    "MAX_BATCH",
    "MAX_ID_LENGTH",
    "VALID_ID",
    "check_id",
    "id_problem",
    "is_id",
    "path_id",
    "read_json",
    "valid_id",
]

#: Checks in one ``POST /v1/check``.
MAX_BATCH: Final = 1000
#: Characters in one id (customer, account, module, ...), wherever it arrives.
MAX_ID_LENGTH: Final = 512
#: The path segments URL resolution removes or folds (RFC 3986 dot segments).
DOT_SEGMENTS: Final = frozenset({".", ".."})
#: The rule, as messages and docs state it.
ID_RULE: Final = f"1 to {MAX_ID_LENGTH} characters, not . or .., without / \\ or control characters"
#: Characters no id may hold once decoded: path separators and control characters.
_FORBIDDEN: Final = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")
#: The whole rule as one pattern (``VALID_ID(value) is None`` when it fails;
#: ``id_problem`` then says why); ``valid_id`` tries a cheaper test first.
VALID_ID: Final = re.compile(rf"(?!\.\.?\Z)[^/\\\x00-\x1f\x7f-\x9f]{{1,{MAX_ID_LENGTH}}}\Z").match


#: Ids that passed the rule lately, so that one asked again (``POST /v1/check``
#: names 200 per request, mostly the same customers and modules as the last) costs a
#: dict probe, not the test: the rule is a function of the string alone. Bounded:
#: emptied when full, so a flood of distinct ids costs the test, never memory.
_PASSED: dict[str, None] = {}
_PASSED_MAX: Final = 4096


def id_problem(value: str) -> str | None:
    """What is wrong with ``value`` as an id (``"is empty"``...), or ``None``."""
    if not value:
        return "is empty"
    if len(value) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    if value in DOT_SEGMENTS:
        return "is a dot segment (. or ..)"
    if _FORBIDDEN.search(value) is not None:
        return "contains / or \\ or a control character"
    return None


def valid_id(value: str) -> bool:
    """``value`` passes the rule (:func:`id_problem` finds nothing).

    An id that passed lately is looked up (one dict probe); otherwise the usual id
    is printable (so it holds no control character), has no ``/`` or ``\\`` and is
    not a dot segment: a few C calls decide it; anything else (a no-break space, a
    zero-width joiner, an id to refuse) goes to the pattern.
    """
    if value in _PASSED:
        return True
    if (
        0 < len(value) <= MAX_ID_LENGTH
        and value.isprintable()
        and "/" not in value
        and "\\" not in value
        and value not in DOT_SEGMENTS
    ) or VALID_ID(value) is not None:
        if len(_PASSED) >= _PASSED_MAX:
            _PASSED.clear()
        _PASSED[value] = None
        return True
    return False


def is_id(value: Any) -> TypeGuard[str]:
    """A string that passes the rule (:func:`valid_id`)."""
    return isinstance(value, str) and (value in _PASSED or valid_id(value))


def check_id(value: str, name: str) -> str:
    """``value``, or 400 ``invalid_id`` naming ``name`` and the problem (never the value)."""
    if not valid_id(value):
        raise BadRequest(f"{name} {id_problem(value)} (an id is {ID_RULE})", code="invalid_id")
    return value


def path_id(request: web.Request, name: str) -> str:
    """The URL-decoded path segment ``name``, checked by :func:`check_id`."""
    return check_id(request.match_info[name], name)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 400 for anything that is not (invalid UTF-8 included)."""
    raw = await request.read()
    if not raw:
        raise BadRequest("a JSON body is required", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
