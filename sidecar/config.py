"""Settings: one declaration per variable, read once from the environment (and flags).

Each ``Settings`` field is declared with ``setting`` or ``secret_setting``
(``sidecar/declare.py``): the variable's name, parser, default, help and README
text, in one place. Everything else derives from those declarations:
``Settings.from_env`` (parsing), ``add_flags`` (one flag per variable),
``Settings.redacted`` (what ``check-config`` prints) and the README's configuration
table (``scripts/gen_config_docs.py``, whose ``--check`` runs in CI).

``Settings.from_env(env)`` collects *every* problem before failing (one line per bad
variable in ``ConfigError.problems``), so an operator fixes a deployment in one round.
Credentials never show: secrets are ``Secret`` / ``ApiKeySource`` objects, and
``redact_url`` / ``redact_text`` hide any URL's credentials in the redacted print,
configuration errors and (``sidecar/logs.py``) every log line. Those live in
``sidecar/values.py``, each variable's parser in ``sidecar/parsers.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from .declare import SETTING_KEY, Setting, Variable, secret_setting, setting
from .parsers import (
    parse_bool,
    parse_csv_set,
    parse_http_url,
    parse_log_level,
    parse_name_set,
    parse_non_negative_float,
    parse_non_negative_int,
    parse_pool_size,
    parse_positive_float,
    parse_positive_int,
    parse_redis_secret,
    parse_secret_list,
    parse_snapshot_path,
    parse_text,
)
from .redis.url import parse_redis_url
from .values import ApiKeySource, Listen, Secret, redact_text, redact_url

__all__ = [
    "SETTINGS",
    "VARIABLES",
    "ConfigError",
    "Settings",
    "add_flags",
    "env_with_flags",
    "flag_names",
    "settings_subset",
]


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
        parse_text,
        None,
        help="the tenant this sidecar serves",
        doc="the tenant this sidecar serves",
    )
    base_url: str = setting(
        "VELLUM_BASE_URL",
        parse_http_url,
        "https://api.vellumcharter.com",
        help="upstream base URL",
        doc="upstream base URL (`http://` or `https://`, no query); credentials in it are "
        "never shown",
        show=redact_url,
    )
    webhook_secrets: tuple[Secret, ...] = secret_setting(
        "VELLUM_WEBHOOK_SECRETS",
        parse_secret_list,
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
        parse_redis_secret,
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
        parse_bool,
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
        parse_positive_float,
        "300",
        help="seconds an entitlement stays fresh",
        doc="seconds an entitlement stays fresh (jittered ±10 %)",
    )
    flags_ttl: float = setting(
        "SIDECAR_FLAGS_TTL",
        parse_positive_float,
        "30",
        help="seconds a customer's flags (and the global flags) stay fresh",
        doc="seconds a customer's flags and the tenant's global flags stay fresh (jittered "
        "±10 %; 30 s, the Vellum SDK's flag cache TTL)",
    )
    stale_ttl: float = setting(
        "SIDECAR_STALE_TTL",
        parse_non_negative_float,
        "86400",
        help="seconds a stale entry may be served if upstream fails",
        doc="seconds past freshness a stale entry may still be served while the upstream fails",
    )
    negative_ttl: float = setting(
        "SIDECAR_NEGATIVE_TTL",
        parse_non_negative_float,
        "30",
        help="seconds an unknown customer (404) stays cached",
        doc='seconds a "customer not found" (upstream 404) stays cached (jittered ±10 %)',
    )
    negative_stale_ttl: float = setting(
        "SIDECAR_NEGATIVE_STALE_TTL",
        parse_non_negative_float,
        "600",
        help="seconds past freshness a 'not found' may be served stale",
        doc='seconds past freshness a "customer not found" may still be served stale while '
        "the upstream fails: short, so ids nobody has (a typo, a flood of random ids) cost "
        "memory and Redis only briefly (an unknown customer's keys live at most "
        "`SIDECAR_NEGATIVE_TTL` + this)",
    )
    strict_drops: bool = setting(
        "SIDECAR_STRICT_DROPS",
        parse_bool,
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
        parse_non_negative_int,
        "100000",
        help="in-process cache size (LRU)",
        doc="entries in the in-process layer, per document kind (entitlements, flags; least "
        "recently used evicted); `0` disables it",
    )
    memory_ttl: float = setting(
        "SIDECAR_MEMORY_TTL",
        parse_non_negative_float,
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
        parse_bool,
        "false",
        help="true to bind the local API off loopback",
        doc="must be `true` to bind the local API to a non-loopback address",
    )
    allowed_hosts: frozenset[str] = setting(
        "SIDECAR_ALLOWED_HOSTS",
        parse_name_set,
        "",
        help="extra Host names the local API accepts",
        doc="extra `Host` names the local API accepts (the browser guard); a non-wildcard "
        "remote bind address is added automatically",
    )
    forward_unknown: bool = setting(
        "SIDECAR_FORWARD_UNKNOWN",
        parse_bool,
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
        parse_positive_float,
        "5",
        help="total seconds for one upstream call, retries included",
        doc="total seconds for one upstream call, retries included",
    )
    upstream_connect_timeout: float = setting(
        "SIDECAR_UPSTREAM_CONNECT_TIMEOUT",
        parse_positive_float,
        "2",
        help="seconds to connect to the upstream",
        doc="seconds to open a connection to the upstream",
    )
    upstream_max_waiting: int = setting(
        "SIDECAR_UPSTREAM_MAX_WAITING",
        parse_positive_int,
        "256",
        help="upstream calls that may be under way or waiting at once; beyond, 503 at once",
        doc="upstream calls that may be under way or waiting for one of the 100 upstream "
        "connections at once (at most half of `SIDECAR_MAX_CONNECTIONS`); beyond it an "
        "uncached read is answered 503 `upstream_overloaded` with `Retry-After` at once, "
        "while a cached entry still answers (stale if it must). See [Overload]"
        "(docs/operations.md#overload-waiting-on-the-upstream)",
    )
    redis_timeout: float = setting(
        "SIDECAR_REDIS_TIMEOUT",
        parse_positive_float,
        "0.5",
        help="seconds for one Redis command or connect",
        doc="seconds for one Redis command, connect, or wait for a pooled connection",
    )
    redis_pool_size: int = setting(
        "SIDECAR_REDIS_POOL_SIZE",
        parse_pool_size,
        "50",
        help="maximum Redis connections",
        doc="maximum Redis connections (per worker; per node for a Cluster), at least 2: "
        "the fan-out subscription holds one, and up to a quarter (at most 4) carry the "
        "coalesced cache reads",
    )
    fail_open_modules: frozenset[str] = setting(
        "SIDECAR_FAIL_OPEN_MODULES",
        parse_csv_set,
        "",
        help="modules that `can` allows when no answer exists",
        doc='comma-separated modules that `can` allows (with `"fallback": true`) when no '
        "answer can be had; every other module fails closed",
    )
    # -- metered usage (docs/api.md, docs/operations.md) -------------------------------
    usage_outcome_ttl: float = setting(
        "SIDECAR_USAGE_OUTCOME_TTL",
        parse_positive_float,
        "86400",
        help="seconds a usage record's outcome is kept after its final answer",
        doc="seconds a metered usage record's outcome (`GET /v1/usage/{idempotencyKey}`) is "
        "kept in Redis after the upstream's final answer; the same key sent again meanwhile "
        "is the same record. See [Metered usage](docs/operations.md#metered-usage-through-"
        "outages)",
    )
    usage_max_queued: int = setting(
        "SIDECAR_USAGE_MAX_QUEUED",
        parse_positive_int,
        "100000",
        help="usage records the tenant's queue holds before refusing more (503)",
        doc="usage records the tenant's queue in Redis holds, not yet delivered, before a "
        "new one is refused (503 `usage_queue_full`, `Retry-After`); about 400 bytes of "
        "Redis memory each (a UUID key; 100,000 take about 40 MB)",
    )
    usage_retry_max: float = setting(
        "SIDECAR_USAGE_RETRY_MAX",
        parse_positive_float,
        "10",
        help="longest pause between delivery attempts of a usage record",
        doc="seconds, at most, between two delivery attempts of a usage record while the "
        "upstream fails (exponential backoff with jitter from 0.25 s; a longer "
        "`Retry-After` is honoured, up to an hour): how soon deliveries resume after an "
        "outage",
    )
    shutdown_grace: float = setting(
        "SIDECAR_SHUTDOWN_GRACE",
        parse_non_negative_float,
        "10",
        help="seconds in-flight requests get on SIGTERM",
        doc="seconds in-flight requests get to finish after SIGTERM",
    )
    log_level: str = setting(
        "SIDECAR_LOG_LEVEL",
        parse_log_level,
        "info",
        help="debug, info, warning or error",
        doc="`debug`, `info`, `warning` or `error`; logs are one JSON object per line on stderr",
    )
    access_log: bool = setting(
        "SIDECAR_ACCESS_LOG",
        parse_bool,
        "false",
        help="true to log every request (off the hot path by default)",
        doc="`true` logs every request (off by default: it costs on the hot path)",
    )
    workers: int = setting(
        "SIDECAR_WORKERS",
        parse_positive_int,
        "1",
        help="worker processes sharing the listeners; >1 needs Redis",
        doc="worker processes serving the same addresses (`SO_REUSEPORT`), one supervisor; more "
        "than 1 needs Redis (`SIDECAR_REDIS_URL` or its `_FILE`). See [Multiple workers]"
        "(docs/operations.md#multiple-workers-sidecar_workers)",
    )
    # -- listener limits, guards, active checks and drain (docs/operations.md) --------
    header_timeout: float = setting(
        "SIDECAR_HEADER_TIMEOUT",
        parse_positive_float,
        "5",
        help="seconds a request's line and headers may take to arrive",
        doc="seconds a request's line and headers may take to arrive (a slow client gets a "
        "JSON 408 and the connection is closed). See [Listener limits]"
        "(docs/operations.md#listener-limits)",
    )
    body_timeout: float = setting(
        "SIDECAR_BODY_TIMEOUT",
        parse_positive_float,
        "10",
        help="seconds a request body may take to arrive after its headers",
        doc="seconds a request body may take to arrive after its headers (408, then closed)",
    )
    webhook_body_timeout: float = setting(
        "SIDECAR_WEBHOOK_BODY_TIMEOUT",
        parse_positive_float,
        "2",
        help="seconds a push's body may take to arrive on the webhook listener",
        doc="seconds a push's body may take to arrive after its headers on the webhook "
        "listener (signed pushes are small; 408, then closed)",
    )
    min_rate: float = setting(
        "SIDECAR_MIN_RATE",
        parse_non_negative_float,
        "500",
        help="bytes/s a request's head and body must average after their first second; 0: off",
        doc="bytes per second a request's head (from its first byte) and body (from the end of "
        "its head) must average on every listener once their first second is over (Apache "
        "`mod_reqtimeout`'s `MinRate`); slower ones are cut with a JSON 408, and at a "
        "connection cap the slowest goes first. `0` turns the minimum off",
    )
    keepalive_timeout: float = setting(
        "SIDECAR_KEEPALIVE_TIMEOUT",
        parse_positive_float,
        "30",
        help="seconds an idle keep-alive connection stays open",
        doc="seconds an idle keep-alive connection stays open (the tiny clients retry a "
        "request once when the sidecar closed their idle connection under it)",
    )
    max_connections: int = setting(
        "SIDECAR_MAX_CONNECTIONS",
        parse_positive_int,
        "1024",
        help="open connections the local API accepts",
        doc="open connections the local API accepts; beyond it new connections are refused "
        "(counted in `vellum_sidecar_connections_refused_total`)",
    )
    webhook_max_connections: int = setting(
        "SIDECAR_WEBHOOK_MAX_CONNECTIONS",
        parse_positive_int,
        "128",
        help="open connections the webhook listener accepts",
        doc="open connections the webhook listener accepts",
    )
    ops_max_connections: int = setting(
        "SIDECAR_OPS_MAX_CONNECTIONS",
        parse_positive_int,
        "32",
        help="open connections the ops listener accepts",
        doc="open connections the ops listener accepts",
    )
    max_streams: int = setting(
        "SIDECAR_MAX_STREAMS",
        parse_non_negative_int,
        "256",
        help="open OFREP event streams the local API holds, apart from its connection cap",
        doc="open OFREP event streams (`GET /ofrep/v1/events`) the local API holds; a stream's "
        "connection does not count toward `SIDECAR_MAX_CONNECTIONS`, and beyond this a new "
        "stream is refused 503 (`0`: no streams)",
    )
    ops_allowed_hosts: frozenset[str] = setting(
        "SIDECAR_OPS_ALLOWED_HOSTS",
        parse_name_set,
        "",
        help="Host names the ops listener accepts besides loopback names and IP literals "
        "(.suffix matches subdomains)",
        doc="`Host` names the ops listener accepts besides loopback names and IP literals (a "
        "leading dot, `.svc.cluster.local`, matches every name under it). See [Browser guards]"
        "(docs/operations.md#browser-guards)",
    )
    check_interval: float = setting(
        "SIDECAR_CHECK_INTERVAL",
        parse_positive_float,
        "0.25",
        help="seconds between Redis PINGs and fan-out heartbeats",
        doc="seconds between the active Redis PINGs and the fan-out subscription's heartbeats "
        "(what `/readyz` and `vellum_sidecar_dependency_state` report)",
    )
    upstream_check_interval: float = setting(
        "SIDECAR_UPSTREAM_CHECK_INTERVAL",
        parse_non_negative_float,
        "1",
        help="seconds between upstream checks while idle; 0: off",
        doc="seconds without an upstream answer after which one authenticated check is sent "
        "(so an idle sidecar notices an outage or a refused key); `0` turns it off",
    )
    shutdown_drain: float = setting(
        "SIDECAR_SHUTDOWN_DRAIN",
        parse_non_negative_float,
        "1",
        help="seconds after SIGTERM that open connections still get answers "
        "(with Connection: close)",
        doc="seconds after SIGTERM during which open connections still get answers, each with "
        "`Connection: close` (ends early once every connection closed)",
    )
    # -- warm start: the local snapshot and readiness (docs/operations.md) -------------
    snapshot_file: Path | None = setting(
        "SIDECAR_SNAPSHOT_FILE",
        parse_snapshot_path,
        "",
        help="file the in-process layer is saved to and loaded from at start; empty: off",
        doc="file the in-process layer (every document kind, with its freshness and stale "
        "deadlines) is written to every `SIDECAR_SNAPSHOT_INTERVAL` and at shutdown, and "
        "loaded from at start as the stale fallback, so a restart answers cached customers "
        "even with Redis empty and the upstream down; its directory must exist and be "
        "writable (a volume under a read-only root filesystem); empty: off. See [Warm start]"
        "(docs/operations.md#warm-start-the-local-snapshot)",
        show=lambda path: str(path) if path is not None else "(unset: off)",
    )
    snapshot_interval: float = setting(
        "SIDECAR_SNAPSHOT_INTERVAL",
        parse_positive_float,
        "10",
        help="seconds between snapshot writes (skipped when nothing changed)",
        doc="seconds between snapshot writes (none when nothing changed since the last); a "
        "SIGKILL loses at most this much",
    )
    wait_for_data: bool = setting(
        "SIDECAR_WAIT_FOR_DATA",
        parse_bool,
        "false",
        help="true: /readyz stays 503 until a snapshot loaded, Redis answered or the "
        "upstream answered",
        doc='`true`: `/readyz` stays 503 (`"status": "waiting"`) after start until the '
        "sidecar has something to answer with: a snapshot loaded with at least one entry, "
        "Redis answered, or the upstream answered once; from then on it is the usual "
        "readiness. `false`: ready once listening (a sidecar that can reach nothing "
        "answers 503 `upstream_unavailable`, fail closed)",
    )
    #: The ``_FILE`` variables that supplied a value, with their paths (for ``redacted``).
    files: tuple[tuple[str, Path], ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; ``ConfigError`` lists every problem."""
        values, given, files, problems = _parse_fields(env, None)
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


def settings_subset(env: Mapping[str, str], names: Collection[str]) -> dict[str, Any]:
    """Only the named ``Settings`` fields (their values by field name), parsed as
    ``from_env`` parses them, for a command that needs a few (``snapshot``):
    ``ConfigError`` lists every problem, a required one missing included."""
    values, _, _, problems = _parse_fields(env, names)
    if problems:
        raise ConfigError(problems)
    return values


def flag_names(names: Collection[str]) -> list[Variable]:
    """The variables (and ``_FILE`` twins) of the named ``Settings`` fields."""
    return [v for f in fields(Settings) if f.name in names for v in _decl(f).variables()]


def _decl(f: Any) -> Setting:
    decl: Setting = f.metadata[SETTING_KEY]
    return decl


def _parse_fields(
    env: Mapping[str, str], names: Collection[str] | None
) -> tuple[dict[str, Any], set[str], list[tuple[str, Path]], list[str]]:
    """Parse every declared field (``names``: only those): values by field name, the
    variables given, the ``_FILE`` paths read, and one problem line per bad variable."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    given: set[str] = set()
    files: list[tuple[str, Path]] = []
    for f in fields(Settings):
        decl: Setting | None = f.metadata.get(SETTING_KEY)
        if decl is None or (names is not None and f.name not in names):
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
    return values, given, files, problems


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
    if values.get("snapshot_file") is not None and values.get("memory_max_entries") == 0:
        problems.append(
            "SIDECAR_SNAPSHOT_FILE: the snapshot saves the in-process layer, which "
            "SIDECAR_MEMORY_MAX_ENTRIES=0 turns off"
        )
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


def add_flags(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """One flag per variable (``--redis-url`` for ``SIDECAR_REDIS_URL``); flags win over env.

    ``names``: only the variables of these ``Settings`` fields."""
    group = parser.add_argument_group("configuration (each flag overrides its variable)")
    for var in VARIABLES if names is None else flag_names(names):
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
