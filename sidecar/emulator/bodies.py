"""The emulated upstream's checks on request bodies and queries, as the real API makes them.

Each helper reads one field and raises :class:`~.wire.EmulatorError` (400, with
the upstream's codes: ``missing_field``, ``invalid_field``, ``invalid_json``, ...)
when it is absent or of the wrong kind. An optional field sent as ``null`` is a
400: the API wants it omitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import orjson

from .wire import EmulatorError, Json

__all__ = [
    "bad_request",
    "bool_query",
    "check_entitlements",
    "json_object",
    "optional_bool",
    "optional_int",
    "optional_str",
    "positive_int",
    "required_int",
    "required_str",
    "status_field",
    "str_list",
]


def bad_request(code: str, message: str) -> NoReturn:
    raise EmulatorError(400, code, message)


def json_object(raw: bytes) -> Json:
    if not raw.strip():
        bad_request("invalid_body", "a JSON object body is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        bad_request("invalid_json", "the body is not valid JSON")
    if not isinstance(body, dict):
        bad_request("invalid_body", "the body must be a JSON object")
    return body


def required_str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        bad_request("missing_field", f"{name} is required")
    if not isinstance(value, str) or not value:
        bad_request("invalid_field", f"{name} must be a non-empty string")
    return value


def _not_null(body: Mapping[str, Any], name: str) -> Any:
    value = body.get(name)
    if name in body and value is None:
        bad_request("invalid_field", f"{name} is optional: omit it rather than sending null")
    return value


def optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = _not_null(body, name)
    if value is not None and (not isinstance(value, str) or not value):
        bad_request("invalid_field", f"{name} must be a non-empty string")
    return value


def optional_bool(body: Mapping[str, Any], name: str) -> bool:
    value = _not_null(body, name)
    if value is None:
        return False
    if not isinstance(value, bool):
        bad_request("invalid_field", f"{name} must be a boolean")
    return value


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = _not_null(body, name)
    if value is None:
        return None
    if not positive_int(value):
        bad_request("invalid_field", f"{name} must be a positive integer")
    return int(value)


def required_int(body: Mapping[str, Any], name: str) -> int:
    if body.get(name) is None:
        bad_request("missing_field", f"{name} is required")
    value = optional_int(body, name)
    assert value is not None
    return value


def str_list(body: Mapping[str, Any], name: str) -> list[str] | None:
    """A list of non-empty strings without repeats (order kept), or None when absent."""
    value = _not_null(body, name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        bad_request("invalid_field", f"{name} must be a list of non-empty strings")
    return list(dict.fromkeys(value))


def status_field(body: Mapping[str, Any], allowed: frozenset[str]) -> str:
    status = required_str(body, "status")
    if status not in allowed:
        bad_request("invalid_status", f"status must be one of {', '.join(sorted(allowed))}")
    return status


def bool_query(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    bad_request("invalid_query", f"{name} must be true or false")


def check_entitlements(doc: Mapping[str, Any]) -> None:
    """The admin API's checks on a document it is given to store."""
    if "status" in doc and not isinstance(doc["status"], str):
        bad_request("invalid_field", "status must be a string")
    modules = doc.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        bad_request("invalid_field", "modules must be a list of strings")
    if not isinstance(doc.get("config", {}), dict):
        bad_request("invalid_field", "config must be an object")
    if "accountId" in doc and not isinstance(doc["accountId"], str):
        bad_request("invalid_field", "accountId must be a string")
    if "hasAccess" in doc and not isinstance(doc["hasAccess"], bool):
        bad_request("invalid_field", "hasAccess must be a boolean")
