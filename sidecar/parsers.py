"""Each setting's parser: one variable's text to its typed value, or ``ValueError``
with the reason (``sidecar/config.py`` adds the variable's name). Pure functions,
so the declarations in ``config`` stay a table of facts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from .redis.url import parse_redis_url
from .values import Secret, redact_url

__all__ = [
    "parse_bool",
    "parse_csv_set",
    "parse_http_url",
    "parse_log_level",
    "parse_name_set",
    "parse_non_negative_float",
    "parse_non_negative_int",
    "parse_number",
    "parse_pool_size",
    "parse_positive_float",
    "parse_positive_int",
    "parse_redis_secret",
    "parse_secret_list",
    "parse_snapshot_path",
    "parse_text",
    "shown",
]

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def shown(value: Any) -> str:
    """How ``check-config`` prints a parsed value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value)


def parse_text(value: str) -> str:
    return value


def parse_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {redact_url(value)!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return value.rstrip("/")


def parse_redis_secret(value: str, _path: Path | None) -> Secret:
    parse_redis_url(value)  # the forms and their options; its errors never repeat the URL
    return Secret(value)


def parse_secret_list(value: str, _path: Path | None) -> tuple[Secret, ...]:
    parts = (s.strip() for s in value.replace("\n", ",").split(","))
    secrets = tuple(Secret(s) for s in parts if s)
    if not secrets:
        raise ValueError("set but holds no secret")
    return secrets


def parse_bool(value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def parse_positive_float(value: str) -> float:
    number = parse_number(value)
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return number


def parse_non_negative_float(value: str) -> float:
    number = parse_number(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return number


def parse_non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return number


def parse_positive_int(value: str) -> int:
    number = parse_non_negative_int(value)
    if number == 0:
        raise ValueError("must be greater than 0")
    return number


def parse_pool_size(value: str) -> int:
    number = parse_non_negative_int(value)
    if number < 2:
        # The fan-out subscription holds one pooled connection for good: with only
        # one, every other command would wait for it and fail.
        raise ValueError("must be at least 2 (the fan-out subscription holds one connection)")
    return number


def parse_snapshot_path(value: str) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if path.is_dir():
        raise ValueError(f"{value} is a directory (name a file in it)")
    if not path.parent.is_dir():
        raise ValueError(
            f"directory {str(path.parent)!r} does not exist (mount a writable volume there)"
        )
    return path


def parse_csv_set(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def parse_name_set(value: str) -> frozenset[str]:
    return frozenset(name.lower() for name in parse_csv_set(value))


def parse_log_level(value: str) -> Literal["debug", "info", "warning", "error"]:
    low = value.lower()
    if low not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return low  # type: ignore[return-value]
