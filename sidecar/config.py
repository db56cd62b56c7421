"""Settings: one declaration per variable, read once from the environment (and flags).

Each ``Settings`` field is declared with ``setting`` or ``secret_setting``
(``sidecar/declare.py``): the variable's name, parser, default, help and README
text, in one place. Everything else derives from those declarations:
``Settings.from_env`` (parsing), ``add_flags`` (one flag per variable),
``Settings.redacted`` (what ``check-config`` prints) and the README's configuration
table (``scripts/gen_config_docs.py``, whose ``--check`` runs in CI).

``Settings.from_env(env)`` collects *every* problem before failing, so an operator
fixes a broken deployment in one round; ``ConfigError.problems`` holds one line
per bad variable, each naming the variable.

Credentials never show: secret values are ``Secret`` / ``ApiKeySource`` objects,
and ``redact_url`` / ``redact_text`` hide the credentials of any URL (userinfo,
password or token options) in the redacted print, in configuration errors and,
through ``sidecar/logs.py``, in every log line. Those value types and the
redaction live in ``sidecar/values.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from .declare import SETTING_KEY, Setting, Variable, secret_setting, setting
from .redis.url import parse_redis_url
from .values import ApiKeySource, Listen, Secret, redact_text, redact_url

__all__ = [
    "SETTINGS",
    "VARIABLES",
    "ConfigError",
    "Settings",
    "add_flags",
    "env_with_flags",
]


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def _text(value: str) -> str:
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {redact_url(value)!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return value.rstrip("/")


def _redis_url(value: str, _path: Path | None) -> Secret:
    parse_redis_url(value)  # the forms and their options; its errors never repeat the URL
    return Secret(value)


def _secret_list(value: str, _path: Path | None) -> tuple[Secret, ...]:
    parts = (s.strip() for s in value.replace("\n", ",").split(","))
    secrets = tuple(Secret(s) for s in parts if s)
    if not secrets:
        raise ValueError("set but holds no secret")
    return secrets


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


def _pool_size(value: str) -> int:
    number = _non_negative_int(value)
    if number < 2:
        # The fan-out subscription holds one pooled connection for good: with only
        # one, every other command would wait for it and fail.
        raise ValueError("must be at least 2 (the fan-out subscription holds one connection)")
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


class ConfigError(Exception):
    """Raised with one line per problem; every line names its variable.

    Every line goes through ``redact_text``, so a URL echoed in a problem never
    shows its credentials.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = [redact_text(p) for p in problems]
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Settings:
    """Every setting; each field's declaration (``setting``) is its variable's one source.

    The field order is the order of ``VARIABLES``, of ``check-config``'s output
    and of the README's configuration table.
    """

    api_key: ApiKeySource = secret_setting(
        "VELLUM_API_KEY",
        ApiKeySource,
        required=True,
        help="the secret Vellum API key",
        file_help="file holding the API key (re-read when it changes)",
        doc="the secret key; `_FILE` reads it from a mounted secret and re-reads it when the "
        "file changes (checked at most once a second), so a rotated Kubernetes Secret takes "
        "effect without a restart",
        show=lambda _key: "***",
    )
    tenant_id: str = setting(
        "VELLUM_TENANT_ID",
        _text,
        None,
        help="the tenant this sidecar serves",
        doc="the tenant this sidecar serves",
    )
    base_url: str = setting(
        "VELLUM_BASE_URL",
        _http_url,
        "https://api.vellumcharter.com",
        help="upstream base URL",
        doc="upstream base URL (`http://` or `https://`, no query); credentials in it are "
        "never shown",
        show=redact_url,
    )
    webhook_secrets: tuple[Secret, ...] = secret_setting(
        "VELLUM_WEBHOOK_SECRETS",
        _secret_list,
        unset=(),
        help="comma-separated push signing secrets",
        file_help="file holding the signing secrets (comma- or line-separated)",
        doc="comma-separated signing secrets (several during rotation; one per line in the "
        "file works too); unset = webhook listener off",
        show=lambda secrets: (
            f"*** ({len(secrets)} secret(s))" if secrets else "(unset: webhook listener off)"
        ),
    )
    redis_url: Secret | None = secret_setting(
        "SIDECAR_REDIS_URL",
        _redis_url,
        help="redis://, rediss://, unix:// or redis+sentinel:// URL; unset = memory only",
        file_help="file holding SIDECAR_REDIS_URL (keeps a Redis password out of a ConfigMap)",
        doc="`redis://`, `rediss://` (TLS), `unix://` or `redis+sentinel://` URL, or Cluster "
        "seed nodes (see [Redis topologies](docs/deploy.md#redis-one-server-tls-sentinel-"
        "cluster)); unset = in-process memory cache only. `_FILE` reads it from a mounted "
        "secret at start, so a password never sits in a ConfigMap. Credentials in it are never "
        "shown",
        show=lambda url: redact_url(url.reveal()) if url else "(unset: memory only)",
    )
    redis_cluster: bool = setting(
        "SIDECAR_REDIS_CLUSTER",
        _bool,
        "false",
        help="true when SIDECAR_REDIS_URL names Cluster nodes",
        doc="`true` when `SIDECAR_REDIS_URL` names Redis Cluster nodes (`redis://n1:6379,n2:6379`)",
    )
    listen: Listen = setting(
        "SIDECAR_LISTEN",
        Listen.parse,
        "127.0.0.1:8700",
        help="local API: host:port or unix:/path.sock",
        doc="local API; `host:port` or `unix:/path.sock` (the socket file is created mode 0660)",
    )
    webhook_listen: Listen = setting(
        "SIDECAR_WEBHOOK_LISTEN",
        Listen.parse,
        "0.0.0.0:8701",
        help="push webhook receiver",
        doc="push webhook receiver",
    )
    ops_listen: Listen = setting(
        "SIDECAR_OPS_LISTEN",
        Listen.parse,
        "0.0.0.0:9700",
        help="health and metrics",
        doc="health and metrics",
    )
    cache_ttl: float = setting(
        "SIDECAR_CACHE_TTL",
        _positive_float,
        "300",
        help="seconds an entitlement stays fresh",
        doc="seconds an entitlement stays fresh (jittered ±10 %)",
    )
    flags_ttl: float = setting(
        "SIDECAR_FLAGS_TTL",
        _positive_float,
        "30",
        help="seconds a customer's flags (and the global flags) stay fresh",
        doc="seconds a customer's flags and the tenant's global flags stay fresh (jittered "
        "±10 %; 30 s, the Vellum SDK's flag cache TTL)",
    )
    stale_ttl: float = setting(
        "SIDECAR_STALE_TTL",
        _non_negative_float,
        "86400",
        help="seconds a stale entry may be served if upstream fails",
        doc="seconds past freshness a stale entry may still be served while the upstream fails",
    )
    negative_ttl: float = setting(
        "SIDECAR_NEGATIVE_TTL",
        _non_negative_float,
        "30",
        help="seconds an unknown customer (404) stays cached",
        doc='seconds a "customer not found" (upstream 404) stays cached (jittered ±10 %)',
    )
    negative_stale_ttl: float = setting(
        "SIDECAR_NEGATIVE_STALE_TTL",
        _non_negative_float,
        "600",
        help="seconds past freshness a 'not found' may be served stale",
        doc='seconds past freshness a "customer not found" may still be served stale while '
        "the upstream fails: short, so ids nobody has (a typo, a flood of random ids) cost "
        "memory and Redis only briefly (an unknown customer's keys live at most "
        "`SIDECAR_NEGATIVE_TTL` + this)",
    )
    strict_drops: bool = setting(
        "SIDECAR_STRICT_DROPS",
        _bool,
        "false",
        help="true: never serve stale what a push, DELETE or write dropped",
        doc="`false`: a dropped entry (a push, a cache `DELETE`, a billing write) is "
        "revalidated on its next read and, while the upstream cannot answer, served as it "
        "was, marked `stale` (RFC 5861 stale-if-error). `true`: after such an explicit "
        "drop the customer fails closed (503, `allowed: false`) until the upstream answers. "
        "Precautionary expiries (a lost fan-out, a Redis that lost writes) are served stale "
        "either way. See [Drops and staleness](docs/operations.md#drops-and-staleness)",
    )
    memory_max_entries: int = setting(
        "SIDECAR_MEMORY_MAX_ENTRIES",
        _non_negative_int,
        "100000",
        help="in-process cache size (LRU)",
        doc="entries in the in-process layer, per document kind (entitlements, flags; least "
        "recently used evicted); `0` disables it",
    )
    memory_ttl: float = setting(
        "SIDECAR_MEMORY_TTL",
        _non_negative_float,
        "10",
        help="seconds an entry lives in-process while the fan-out is not confirmed",
        doc="with Redis, while the fan-out subscription is not confirmed live: seconds the "
        "in-process layer answers alone before asking Redis again. While it is confirmed "
        "(heartbeats answered) the fan-out keeps the layer coherent and entries answer until "
        "their freshness ends; losing it expires the layer (kept as the stale fallback). "
        "`0`: every read asks Redis. Without Redis the in-process layer is the cache and "
        "uses `SIDECAR_CACHE_TTL`",
    )
    allow_remote: bool = setting(
        "SIDECAR_ALLOW_REMOTE",
        _bool,
        "false",
        help="true to bind the local API off loopback",
        doc="must be `true` to bind the local API to a non-loopback address",
    )
    allowed_hosts: frozenset[str] = setting(
        "SIDECAR_ALLOWED_HOSTS",
        _name_set,
        "",
        help="extra Host names the local API accepts",
        doc="extra `Host` names the local API accepts (the browser guard); a non-wildcard "
        "remote bind address is added automatically",
    )
    forward_unknown: bool = setting(
        "SIDECAR_FORWARD_UNKNOWN",
        _bool,
        "true",
        help="false to refuse mirror paths the operation table does not know",
        doc="`true`: a tenant-scoped mirror path the sidecar does not know (an operation newer "
        "than this release) is forwarded with the sidecar's key, counted and logged by its "
        "shape; `false`: 404 `unknown_operation`, so only the operations listed in "
        "[docs/api.md](docs/api.md#billing-and-the-drop-in-mirror) reach the upstream. See "
        "[Unknown operations](docs/api.md#unknown-operations)",
    )
    upstream_timeout: float = setting(
        "SIDECAR_UPSTREAM_TIMEOUT",
        _positive_float,
        "5",
        help="total seconds for one upstream call, retries included",
        doc="total seconds for one upstream call, retries included",
    )
    upstream_connect_timeout: float = setting(
        "SIDECAR_UPSTREAM_CONNECT_TIMEOUT",
        _positive_float,
        "2",
        help="seconds to connect to the upstream",
        doc="seconds to open a connection to the upstream",
    )
    redis_timeout: float = setting(
        "SIDECAR_REDIS_TIMEOUT",
        _positive_float,
        "0.5",
        help="seconds for one Redis command or connect",
        doc="seconds for one Redis command, connect, or wait for a pooled connection",
    )
    redis_pool_size: int = setting(
        "SIDECAR_REDIS_POOL_SIZE",
        _pool_size,
        "50",
        help="maximum Redis connections",
        doc="maximum Redis connections (per worker; per node for a Cluster), at least 2: "
        "the fan-out subscription holds one, and up to a quarter (at most 4) carry the "
        "coalesced cache reads",
    )
    fail_open_modules: frozenset[str] = setting(
        "SIDECAR_FAIL_OPEN_MODULES",
        _csv_set,
        "",
        help="modules that `can` allows when no answer exists",
        doc='comma-separated modules that `can` allows (with `"fallback": true`) when no '
        "answer can be had; every other module fails closed",
    )
    # -- metered usage (docs/api.md, docs/operations.md) -------------------------------
    usage_outcome_ttl: float = setting(
        "SIDECAR_USAGE_OUTCOME_TTL",
        _positive_float,
        "86400",
        help="seconds a usage record's outcome is kept after its final answer",
        doc="seconds a metered usage record's outcome (`GET /v1/usage/{idempotencyKey}`) is "
        "kept in Redis after the upstream's final answer; the same key sent again meanwhile "
        "is the same record. See [Metered usage](docs/operations.md#metered-usage-through-"
        "outages)",
    )
    usage_max_queued: int = setting(
        "SIDECAR_USAGE_MAX_QUEUED",
        _positive_int,
        "100000",
        help="usage records the tenant's queue holds before refusing more (503)",
        doc="usage records the tenant's queue in Redis holds, not yet delivered, before a "
        "new one is refused (503 `usage_queue_full`, `Retry-After`); about 400 bytes of "
        "Redis memory each (a UUID key; 100,000 take about 40 MB)",
    )
    usage_retry_max: float = setting(
        "SIDECAR_USAGE_RETRY_MAX",
        _positive_float,
        "10",
        help="longest pause between delivery attempts of a usage record",
        doc="seconds, at most, between two delivery attempts of a usage record while the "
        "upstream fails (exponential backoff with jitter from 0.25 s; a longer "
        "`Retry-After` is honoured, up to an hour): how soon deliveries resume after an "
        "outage",
    )
    shutdown_grace: float = setting(
        "SIDECAR_SHUTDOWN_GRACE",
        _non_negative_float,
        "10",
        help="seconds in-flight requests get on SIGTERM",
        doc="seconds in-flight requests get to finish after SIGTERM",
    )
    log_level: str = setting(
        "SIDECAR_LOG_LEVEL",
        _log_level,
        "info",
        help="debug, info, warning or error",
        doc="`debug`, `info`, `warning` or `error`; logs are one JSON object per line on stderr",
    )
    access_log: bool = setting(
        "SIDECAR_ACCESS_LOG",
        _bool,
        "false",
        help="true to log every request (off the hot path by default)",
        doc="`true` logs every request (off by default: it costs on the hot path)",
    )
    workers: int = setting(
        "SIDECAR_WORKERS",
        _positive_int,
        "1",
        help="worker processes sharing the listeners; >1 needs Redis",
        doc="worker processes serving the same addresses (`SO_REUSEPORT`), one supervisor; more "
        "than 1 needs Redis (`SIDECAR_REDIS_URL` or its `_FILE`). See [Multiple workers]"
        "(docs/operations.md#multiple-workers-sidecar_workers)",
    )
    # -- listener limits, guards, active checks and drain (docs/operations.md) --------
    header_timeout: float = setting(
        "SIDECAR_HEADER_TIMEOUT",
        _positive_float,
        "5",
        help="seconds a request's line and headers may take to arrive",
        doc="seconds a request's line and headers may take to arrive (a slow client gets a "
        "JSON 408 and the connection is closed). See [Listener limits]"
        "(docs/operations.md#listener-limits)",
    )
    body_timeout: float = setting(
        "SIDECAR_BODY_TIMEOUT",
        _positive_float,
        "10",
        help="seconds a request body may take to arrive after its headers",
        doc="seconds a request body may take to arrive after its headers (408, then closed)",
    )
    keepalive_timeout: float = setting(
        "SIDECAR_KEEPALIVE_TIMEOUT",
        _positive_float,
        "30",
        help="seconds an idle keep-alive connection stays open",
        doc="seconds an idle keep-alive connection stays open (the tiny clients retry a "
        "request once when the sidecar closed their idle connection under it)",
    )
    max_connections: int = setting(
        "SIDECAR_MAX_CONNECTIONS",
        _positive_int,
        "1024",
        help="open connections the local API accepts",
        doc="open connections the local API accepts; beyond it new connections are refused "
        "(counted in `vellum_sidecar_connections_refused_total`)",
    )
    webhook_max_connections: int = setting(
        "SIDECAR_WEBHOOK_MAX_CONNECTIONS",
        _positive_int,
        "128",
        help="open connections the webhook listener accepts",
        doc="open connections the webhook listener accepts",
    )
    ops_max_connections: int = setting(
        "SIDECAR_OPS_MAX_CONNECTIONS",
        _positive_int,
        "32",
        help="open connections the ops listener accepts",
        doc="open connections the ops listener accepts",
    )
    ops_allowed_hosts: frozenset[str] = setting(
        "SIDECAR_OPS_ALLOWED_HOSTS",
        _name_set,
        "",
        help="Host names the ops listener accepts besides loopback names and IP literals "
        "(.suffix matches subdomains)",
        doc="`Host` names the ops listener accepts besides loopback names and IP literals (a "
        "leading dot, `.svc.cluster.local`, matches every name under it). See [Browser guards]"
        "(docs/operations.md#browser-guards)",
    )
    check_interval: float = setting(
        "SIDECAR_CHECK_INTERVAL",
        _positive_float,
        "0.25",
        help="seconds between Redis PINGs and fan-out heartbeats",
        doc="seconds between the active Redis PINGs and the fan-out subscription's heartbeats "
        "(what `/readyz` and `vellum_sidecar_dependency_state` report)",
    )
    upstream_check_interval: float = setting(
        "SIDECAR_UPSTREAM_CHECK_INTERVAL",
        _non_negative_float,
        "1",
        help="seconds between upstream checks while idle; 0: off",
        doc="seconds without an upstream answer after which one authenticated check is sent "
        "(so an idle sidecar notices an outage or a refused key); `0` turns it off",
    )
    shutdown_drain: float = setting(
        "SIDECAR_SHUTDOWN_DRAIN",
        _non_negative_float,
        "1",
        help="seconds after SIGTERM that open connections still get answers "
        "(with Connection: close)",
        doc="seconds after SIGTERM during which open connections still get answers, each with "
        "`Connection: close` (ends early once every connection closed)",
    )
    #: The ``_FILE`` variables that supplied a value, with their paths (for ``redacted``).
    files: tuple[tuple[str, Path], ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; ``ConfigError`` lists every problem."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        given: set[str] = set()
        files: list[tuple[str, Path]] = []
        for f in fields(cls):
            decl: Setting | None = f.metadata.get(SETTING_KEY)
            if decl is None:
                continue
            try:
                found = _lookup(env, decl)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if found is None:
                if decl.required:
                    problems.append(f"{decl.name}: required ({decl.required_hint})")
                else:
                    values[f.name] = f.default
                continue
            value, path, source = found
            given.add(decl.name)
            if path is not None:
                files.append((source, path))
            try:
                values[f.name] = decl.parse(value, path)
            except ValueError as exc:
                problems.append(f"{source}: {exc}")
        problems += _combination_problems(values, given)
        if problems:
            raise ConfigError(problems)

        listen: Listen = values["listen"]
        if listen.host and not listen.is_loopback and listen.host not in ("0.0.0.0", "::"):
            values["allowed_hosts"] = values["allowed_hosts"] | {listen.host.lower()}
        return cls(**values, files=tuple(files))

    @property
    def webhooks_enabled(self) -> bool:
        return bool(self.webhook_secrets)

    def __repr__(self) -> str:
        """The redacted print, so a logged or printed ``Settings`` shows no credential."""
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.redacted()) + ")"

    def redacted(self) -> list[tuple[str, str]]:
        """``(VARIABLE, shown value)`` pairs with every secret replaced by ``***``.

        A ``_FILE`` variable shows its path; URLs show no credentials.
        """
        paths = dict(self.files)
        out: list[tuple[str, str]] = []
        for f in fields(self):
            decl: Setting | None = f.metadata.get(SETTING_KEY)
            if decl is None:
                continue
            out.append((decl.name, redact_text(decl.show(getattr(self, f.name)))))
            if decl.file_name is not None:
                path = paths.get(decl.file_name)
                out.append((decl.file_name, str(path) if path is not None else "(unset)"))
        return out


#: Every declaration, in ``Settings``' field order.
SETTINGS: Final[tuple[Setting, ...]] = tuple(
    f.metadata[SETTING_KEY] for f in fields(Settings) if SETTING_KEY in f.metadata
)
#: Every variable (a ``_FILE`` twin after its variable), in the order ``check-config`` prints.
VARIABLES: Final[tuple[Variable, ...]] = tuple(v for s in SETTINGS for v in s.variables())


def _combination_problems(values: Mapping[str, Any], given: set[str]) -> list[str]:
    """Problems between settings; a setting that failed to parse is absent from ``values``."""
    problems: list[str] = []
    listen: Listen | None = values.get("listen")
    if listen is not None and not listen.is_loopback and values.get("allow_remote") is False:
        problems.append(
            f"SIDECAR_LISTEN: {listen} is not a loopback address; the local API has no "
            "authentication, so set SIDECAR_ALLOW_REMOTE=true to bind it there on purpose"
        )
    redis_given = "SIDECAR_REDIS_URL" in given
    redis_url: Secret | None = values.get("redis_url")
    cluster: bool | None = values.get("redis_cluster")
    if cluster and not redis_given:
        problems.append(
            "SIDECAR_REDIS_CLUSTER: true needs SIDECAR_REDIS_URL (cluster nodes' redis:// URL)"
        )
    elif redis_url is not None and cluster is not None:
        target = parse_redis_url(redis_url.reveal())
        problem = target.cluster_problem() if cluster else target.standalone_problem()
        if problem:
            var = "SIDECAR_REDIS_CLUSTER" if cluster else "SIDECAR_REDIS_URL"
            problems.append(f"{var}: {problem}")
    workers: int | None = values.get("workers")
    if workers is not None and workers > 1:
        # Each worker has its own in-process layer; only the Redis fan-out
        # keeps them coherent, and only SO_REUSEPORT spreads connections.
        if not redis_given:
            problems.append(
                "SIDECAR_WORKERS: more than one worker needs SIDECAR_REDIS_URL (the "
                "workers' in-process caches are kept coherent through Redis)"
            )
        if not hasattr(socket, "SO_REUSEPORT"):
            problems.append("SIDECAR_WORKERS: this platform has no SO_REUSEPORT")
    return problems


def _lookup(env: Mapping[str, str], decl: Setting) -> tuple[str, Path | None, str] | None:
    """``(value, file path or None, variable that supplied it)``, or ``None`` when unset.

    Raises ``ValueError`` with a line naming the variable when both forms are
    set or the file cannot be read.
    """
    direct = _given(env, decl.name)
    file_name = decl.file_name
    path_s = _given(env, file_name) if file_name is not None else None
    if file_name is None or path_s is None:
        return None if direct is None else (direct, None, decl.name)
    if direct is not None:
        raise ValueError(f"{decl.name}: set either {decl.name} or {file_name}, not both")
    path = Path(path_s)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{file_name}: cannot read {path_s}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file_name}: {path_s} is not UTF-8 text") from None
    if not value:
        raise ValueError(f"{file_name}: {path_s} is empty")
    return value, path, file_name


def _given(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, stripped; ``None`` when unset or blank (the default applies)."""
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per variable (``--redis-url`` for ``SIDECAR_REDIS_URL``); flags win over env."""
    group = parser.add_argument_group("configuration (each flag overrides its variable)")
    for var in VARIABLES:
        help_ = var.help.replace("%", "%%")  # argparse formats help with %
        group.add_argument(var.flag, dest=var.name, default=None, metavar="VALUE", help=help_)


def env_with_flags(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    merged = dict(os.environ if env is None else env)
    for var in VARIABLES:
        value = getattr(args, var.name, None)
        if value is not None:
            merged[var.name] = value
    return merged
