"""Settings: read once from the environment (and flags), validated, secrets redacted.

``Settings.from_env(env)`` collects *every* problem before failing, so an operator
fixes a broken deployment in one round; ``ConfigError.problems`` holds one line
per bad variable, each naming the variable.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from .redisclient import parse_redis_url

__all__ = [
    "VARIABLES",
    "ApiKeySource",
    "ConfigError",
    "Listen",
    "Secret",
    "Settings",
    "Variable",
    "add_flags",
    "env_with_flags",
]


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ApiKeySource:
    """The upstream API key, from a value or from a mounted file.

    A file is re-read when its modification time changes (checked at most once a
    second), so a rotated Kubernetes Secret takes effect without a restart. A file
    that becomes unreadable or empty keeps the last good key.
    """

    __slots__ = ("_checked", "_key", "_mtime", "path")

    def __init__(self, key: str, path: Path | None = None) -> None:
        self._key = key
        self.path = path
        self._mtime = path.stat().st_mtime_ns if path is not None else 0
        self._checked = 0.0

    def __repr__(self) -> str:
        return f"ApiKeySource(path={str(self.path) if self.path else None!r}, key='***')"

    def current(self, now: float) -> str:
        if self.path is not None and now - self._checked >= 1.0:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime_ns
                if mtime != self._mtime:
                    key = self.path.read_text(encoding="utf-8").strip()
                    if key:
                        self._key, self._mtime = key, mtime
            except OSError:
                pass
        return self._key


@dataclass(frozen=True, slots=True)
class Listen:
    """Where a listener binds: ``host:port`` or ``unix:/path.sock``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_loopback(self) -> bool:
        if self.path is not None:
            return True
        host = self.host or ""
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self) -> str:
        """A URL a local client can use to reach this listener."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @classmethod
    def parse(cls, value: str) -> Listen:
        value = value.strip()
        if value.startswith("unix:"):
            path = value[5:]
            if not path:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/sidecar.sock")
            return cls(path=path)
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port or unix:/path.sock, got {value!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"port must be a number, got {port_s!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, got {port}")
        return cls(host=host, port=port)


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    default: str | None
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        base = self.name.removeprefix("VELLUM_").removeprefix("SIDECAR_")
        return "--" + base.lower().replace("_", "-")


# -- listener limits, guards, active checks and drain (issue 14) ---------------------
#: name: (default, help, parser, Settings attribute). docs/operations.md explains each.
_LIMITS: Final[dict[str, tuple[str, str, Callable[[str], Any], str]]] = {
    "SIDECAR_HEADER_TIMEOUT": ("5", "seconds a request's line and headers may take to arrive",
                               lambda v: _positive_float(v), "header_timeout"),
    "SIDECAR_BODY_TIMEOUT": ("10", "seconds a request body may take to arrive after its headers",
                             lambda v: _positive_float(v), "body_timeout"),
    "SIDECAR_KEEPALIVE_TIMEOUT": ("30", "seconds an idle keep-alive connection stays open",
                                  lambda v: _positive_float(v), "keepalive_timeout"),
    "SIDECAR_MAX_CONNECTIONS": ("1024", "open connections the local API accepts",
                                lambda v: _positive_int(v), "max_connections"),
    "SIDECAR_WEBHOOK_MAX_CONNECTIONS": ("128", "open connections the webhook listener accepts",
                                        lambda v: _positive_int(v), "webhook_max_connections"),
    "SIDECAR_OPS_MAX_CONNECTIONS": ("32", "open connections the ops listener accepts",
                                    lambda v: _positive_int(v), "ops_max_connections"),
    "SIDECAR_OPS_ALLOWED_HOSTS": ("", "Host names the ops listener accepts besides loopback "
                                  "names and IP literals (.suffix matches subdomains)",
                                  lambda v: _name_set(v), "ops_allowed_hosts"),
    "SIDECAR_CHECK_INTERVAL": ("0.25", "seconds between Redis PINGs and fan-out heartbeats",
                               lambda v: _positive_float(v), "check_interval"),
    "SIDECAR_UPSTREAM_CHECK_INTERVAL": ("1", "seconds between upstream checks while idle; 0: off",
                                        lambda v: _non_negative_float(v),
                                        "upstream_check_interval"),
    "SIDECAR_SHUTDOWN_DRAIN": ("1", "seconds after SIGTERM that open connections still get "
                               "answers (with Connection: close)",
                               lambda v: _non_negative_float(v), "shutdown_drain"),
}  # fmt: skip

#: Every setting, in the order ``check-config`` prints them.
VARIABLES: Final[tuple[Variable, ...]] = (
    Variable("VELLUM_API_KEY", None, "the secret Vellum API key (required unless _FILE)", True),
    Variable("VELLUM_API_KEY_FILE", None, "file holding the API key (re-read when it changes)"),
    Variable("VELLUM_TENANT_ID", None, "the tenant this sidecar serves (required)"),
    Variable("VELLUM_BASE_URL", "https://api.vellumcharter.com", "upstream base URL"),
    Variable("VELLUM_WEBHOOK_SECRETS", None, "comma-separated push signing secrets", True),
    Variable("VELLUM_WEBHOOK_SECRETS_FILE", None, "file holding the signing secrets"),
    Variable(
        "SIDECAR_REDIS_URL",
        None,
        "redis://, rediss://, unix:// or redis+sentinel:// URL; unset = memory only",
    ),
    Variable("SIDECAR_REDIS_CLUSTER", "false", "true when SIDECAR_REDIS_URL names Cluster nodes"),
    Variable("SIDECAR_LISTEN", "127.0.0.1:8700", "local API: host:port or unix:/path.sock"),
    Variable("SIDECAR_WEBHOOK_LISTEN", "0.0.0.0:8701", "push webhook receiver"),
    Variable("SIDECAR_OPS_LISTEN", "0.0.0.0:9700", "health and metrics"),
    Variable("SIDECAR_CACHE_TTL", "300", "seconds an entitlement stays fresh"),
    Variable("SIDECAR_STALE_TTL", "86400", "seconds a stale entry may be served if upstream fails"),
    Variable("SIDECAR_NEGATIVE_TTL", "30", "seconds an unknown customer (404) stays cached"),
    Variable("SIDECAR_MEMORY_MAX_ENTRIES", "100000", "in-process cache size (LRU)"),
    Variable("SIDECAR_MEMORY_TTL", "10", "seconds an entry lives in-process when Redis is shared"),
    Variable("SIDECAR_ALLOW_REMOTE", "false", "true to bind the local API off loopback"),
    Variable("SIDECAR_ALLOWED_HOSTS", "", "extra Host names the local API accepts"),
    Variable(
        "SIDECAR_UPSTREAM_TIMEOUT", "5", "total seconds for one upstream call, retries included"
    ),
    Variable("SIDECAR_UPSTREAM_CONNECT_TIMEOUT", "2", "seconds to connect to the upstream"),
    Variable("SIDECAR_REDIS_TIMEOUT", "0.5", "seconds for one Redis command or connect"),
    Variable("SIDECAR_REDIS_POOL_SIZE", "50", "maximum Redis connections"),
    Variable("SIDECAR_FAIL_OPEN_MODULES", "", "modules that `can` allows when no answer exists"),
    Variable("SIDECAR_SHUTDOWN_GRACE", "10", "seconds in-flight requests get on SIGTERM"),
    Variable("SIDECAR_LOG_LEVEL", "info", "debug, info, warning or error"),
    Variable(
        "SIDECAR_ACCESS_LOG", "false", "true to log every request (off the hot path by default)"
    ),
    Variable("SIDECAR_WORKERS", "1", "worker processes sharing the listeners; >1 needs Redis"),
    *(Variable(name, default, help) for name, (default, help, _, _) in _LIMITS.items()),
)


_BY_NAME: Final = {v.name: v for v in VARIABLES}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """Raised with one line per problem; every line names its variable."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True)
class Settings:
    api_key: ApiKeySource = field(repr=False)
    tenant_id: str
    base_url: str = "https://api.vellumcharter.com"
    webhook_secrets: tuple[Secret, ...] = ()
    redis_url: Secret | None = None
    redis_cluster: bool = False
    listen: Listen = Listen("127.0.0.1", 8700)
    webhook_listen: Listen = Listen("0.0.0.0", 8701)
    ops_listen: Listen = Listen("0.0.0.0", 9700)
    cache_ttl: float = 300.0
    stale_ttl: float = 86400.0
    negative_ttl: float = 30.0
    memory_max_entries: int = 100_000
    memory_ttl: float = 10.0
    allow_remote: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    upstream_timeout: float = 5.0
    upstream_connect_timeout: float = 2.0
    redis_timeout: float = 0.5
    redis_pool_size: int = 50
    fail_open_modules: frozenset[str] = frozenset()
    shutdown_grace: float = 10.0
    log_level: str = "info"
    access_log: bool = False
    workers: int = 1
    # listener limits, guards, active checks and drain: see _LIMITS
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    max_connections: int = 1024
    webhook_max_connections: int = 128
    ops_max_connections: int = 32
    ops_allowed_hosts: frozenset[str] = frozenset()
    check_interval: float = 0.25
    upstream_check_interval: float = 1.0
    shutdown_drain: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; ``ConfigError`` lists every problem."""
        problems: list[str] = []

        def raw(name: str) -> str | None:
            value = env.get(name)
            if value is None or value.strip() == "":
                return _BY_NAME[name].default
            return value.strip()

        def parse(name: str, conv: Callable[[str], Any]) -> Any:
            value = raw(name)
            try:
                return conv(value) if value is not None else None
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
                return None

        api_key = _read_secret_pair(env, "VELLUM_API_KEY", problems, required=True)
        tenant = raw("VELLUM_TENANT_ID")
        if tenant is None:
            problems.append("VELLUM_TENANT_ID: required (the tenant this sidecar serves)")
        secrets_value = _read_secret_pair(env, "VELLUM_WEBHOOK_SECRETS", problems, required=False)
        webhook_secrets: tuple[Secret, ...] = ()
        if secrets_value is not None:
            parts = [s.strip() for s in secrets_value[0].replace("\n", ",").split(",")]
            webhook_secrets = tuple(Secret(s) for s in parts if s)
            if not webhook_secrets:
                problems.append("VELLUM_WEBHOOK_SECRETS: set but holds no secret")

        base_url = parse("VELLUM_BASE_URL", _http_url)
        redis_url = parse("SIDECAR_REDIS_URL", _redis_url)
        redis_cluster = parse("SIDECAR_REDIS_CLUSTER", _bool)
        listen = parse("SIDECAR_LISTEN", Listen.parse)
        webhook_listen = parse("SIDECAR_WEBHOOK_LISTEN", Listen.parse)
        ops_listen = parse("SIDECAR_OPS_LISTEN", Listen.parse)
        cache_ttl = parse("SIDECAR_CACHE_TTL", _positive_float)
        stale_ttl = parse("SIDECAR_STALE_TTL", _non_negative_float)
        negative_ttl = parse("SIDECAR_NEGATIVE_TTL", _non_negative_float)
        memory_max = parse("SIDECAR_MEMORY_MAX_ENTRIES", _non_negative_int)
        memory_ttl = parse("SIDECAR_MEMORY_TTL", _non_negative_float)
        allow_remote = parse("SIDECAR_ALLOW_REMOTE", _bool)
        allowed_hosts = parse("SIDECAR_ALLOWED_HOSTS", _name_set)
        upstream_timeout = parse("SIDECAR_UPSTREAM_TIMEOUT", _positive_float)
        connect_timeout = parse("SIDECAR_UPSTREAM_CONNECT_TIMEOUT", _positive_float)
        redis_timeout = parse("SIDECAR_REDIS_TIMEOUT", _positive_float)
        pool_size = parse("SIDECAR_REDIS_POOL_SIZE", _positive_int)
        fail_open = parse("SIDECAR_FAIL_OPEN_MODULES", _csv_set)
        grace = parse("SIDECAR_SHUTDOWN_GRACE", _non_negative_float)
        log_level = parse("SIDECAR_LOG_LEVEL", _log_level)
        access_log = parse("SIDECAR_ACCESS_LOG", _bool)
        workers = parse("SIDECAR_WORKERS", _positive_int)
        limits = {attr: parse(name, conv) for name, (_, _, conv, attr) in _LIMITS.items()}

        if listen is not None and not listen.is_loopback and allow_remote is False:
            problems.append(
                f"SIDECAR_LISTEN: {listen} is not a loopback address; the local API has no "
                "authentication, so set SIDECAR_ALLOW_REMOTE=true to bind it there on purpose"
            )
        if redis_cluster and raw("SIDECAR_REDIS_URL") is None:
            problems.append(
                "SIDECAR_REDIS_CLUSTER: true needs SIDECAR_REDIS_URL (cluster nodes' redis:// URL)"
            )
        elif redis_url is not None and redis_cluster is not None:
            target = parse_redis_url(redis_url)
            problem = target.cluster_problem() if redis_cluster else target.standalone_problem()
            if problem:
                var = "SIDECAR_REDIS_CLUSTER" if redis_cluster else "SIDECAR_REDIS_URL"
                problems.append(f"{var}: {problem}")
        if workers is not None and workers > 1:
            # Each worker has its own in-process layer; only the Redis fan-out
            # keeps them coherent, and only SO_REUSEPORT spreads connections.
            if raw("SIDECAR_REDIS_URL") is None:
                problems.append(
                    "SIDECAR_WORKERS: more than one worker needs SIDECAR_REDIS_URL (the "
                    "workers' in-process caches are kept coherent through Redis)"
                )
            if not hasattr(socket, "SO_REUSEPORT"):
                problems.append("SIDECAR_WORKERS: this platform has no SO_REUSEPORT")
        if problems:
            raise ConfigError(problems)

        assert api_key is not None
        assert tenant is not None
        hosts = set(allowed_hosts)
        if listen.host and not listen.is_loopback and listen.host not in ("0.0.0.0", "::"):
            hosts.add(listen.host.lower())
        return cls(
            api_key=ApiKeySource(api_key[0], api_key[1]),
            tenant_id=tenant,
            base_url=base_url,
            webhook_secrets=webhook_secrets,
            redis_url=Secret(redis_url) if redis_url else None,
            redis_cluster=redis_cluster,
            listen=listen,
            webhook_listen=webhook_listen,
            ops_listen=ops_listen,
            cache_ttl=cache_ttl,
            stale_ttl=stale_ttl,
            negative_ttl=negative_ttl,
            memory_max_entries=memory_max,
            memory_ttl=memory_ttl,
            allow_remote=allow_remote,
            allowed_hosts=frozenset(hosts),
            upstream_timeout=upstream_timeout,
            upstream_connect_timeout=connect_timeout,
            redis_timeout=redis_timeout,
            redis_pool_size=pool_size,
            fail_open_modules=fail_open,
            shutdown_grace=grace,
            log_level=log_level,
            access_log=access_log,
            workers=workers,
            **limits,
        )

    @property
    def webhooks_enabled(self) -> bool:
        return bool(self.webhook_secrets)

    def redacted(self) -> list[tuple[str, str]]:
        """``(VARIABLE, shown value)`` pairs with every secret replaced by ``***``."""
        shown: dict[str, str] = {
            "VELLUM_API_KEY": "***",
            "VELLUM_API_KEY_FILE": str(self.api_key.path) if self.api_key.path else "(unset)",
            "VELLUM_TENANT_ID": self.tenant_id,
            "VELLUM_BASE_URL": self.base_url,
            "VELLUM_WEBHOOK_SECRETS": (
                f"*** ({len(self.webhook_secrets)} secret(s))"
                if self.webhook_secrets
                else "(unset: webhook listener off)"
            ),
            "VELLUM_WEBHOOK_SECRETS_FILE": "(see VELLUM_WEBHOOK_SECRETS)",
            "SIDECAR_REDIS_URL": (
                redact_url(self.redis_url.reveal()) if self.redis_url else "(unset: memory only)"
            ),
            "SIDECAR_ALLOWED_HOSTS": ",".join(sorted(self.allowed_hosts)),
            "SIDECAR_FAIL_OPEN_MODULES": ",".join(sorted(self.fail_open_modules)),
            "SIDECAR_OPS_ALLOWED_HOSTS": ",".join(sorted(self.ops_allowed_hosts)),
        }
        out: list[tuple[str, str]] = []
        for var in VARIABLES:
            if var.name in shown:
                out.append((var.name, shown[var.name]))
                continue
            attr = var.name.removeprefix("SIDECAR_").lower()
            value = getattr(self, attr)
            out.append((var.name, str(value).lower() if isinstance(value, bool) else str(value)))
        return out


def redact_url(url: str) -> str:
    """Hide the password (and a lone username, which some providers use as a token).

    Works on the raw netloc, so a host list (``h1:26379,h2:26379``) survives, and
    hides ``*password*`` query options (``?sentinel_password=``) too.
    """
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    query = "&".join(
        f"{name}=***" if "password" in name.lower() else f"{name}={value}" if sep else name
        for name, sep, value in (p.partition("=") for p in parts.query.split("&") if p)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _read_secret_pair(
    env: Mapping[str, str], name: str, problems: list[str], *, required: bool
) -> tuple[str, Path | None] | None:
    direct = (env.get(name) or "").strip()
    file_name = f"{name}_FILE"
    path_s = (env.get(file_name) or "").strip()
    if direct and path_s:
        problems.append(f"{name}: set either {name} or {file_name}, not both")
        return None
    if path_s:
        path = Path(path_s)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"{file_name}: cannot read {path_s}: {exc.strerror or exc}")
            return None
        except UnicodeDecodeError:
            problems.append(f"{file_name}: {path_s} is not UTF-8 text")
            return None
        if not value:
            problems.append(f"{file_name}: {path_s} is empty")
            return None
        return value, path
    if direct:
        return direct, None
    if required:
        problems.append(f"{name}: required (set {name} or {file_name})")
    return None


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return value.rstrip("/")


def _redis_url(value: str) -> str:
    parse_redis_url(value)  # the forms and their options: sidecar/redisclient.py
    return value


def _bool(value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return number


def _non_negative_float(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return number


def _positive_int(value: str) -> int:
    number = _non_negative_int(value)
    if number == 0:
        raise ValueError("must be greater than 0")
    return number


def _csv_set(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def _name_set(value: str) -> frozenset[str]:
    return frozenset(name.lower() for name in _csv_set(value))


def _log_level(value: str) -> Literal["debug", "info", "warning", "error"]:
    low = value.lower()
    if low not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return low  # type: ignore[return-value]


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per variable (``--redis-url`` for ``SIDECAR_REDIS_URL``); flags win over env."""
    group = parser.add_argument_group("configuration (each flag overrides its variable)")
    for var in VARIABLES:
        group.add_argument(var.flag, dest=var.name, default=None, metavar="VALUE", help=var.help)


def env_with_flags(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    merged = dict(os.environ if env is None else env)
    for var in VARIABLES:
        value = getattr(args, var.name, None)
        if value is not None:
            merged[var.name] = value
    return merged
