"""``SIDECAR_REDIS_URL``: parsing every documented form, and building the redis-py client.

Four topologies, one URL variable (plus ``SIDECAR_REDIS_CLUSTER`` for a cluster):

- ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://...`` (TLS): one server.
- ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``: one server on a socket.
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
  (``rediss+sentinel://`` for TLS to the sentinels and the master): the master of
  ``service`` as the sentinels name it, followed through failovers. Sentinel
  ports default to 26379; ``?sentinel_password=...`` (and ``sentinel_username``)
  authenticate to the sentinels when they need it, the userinfo to the master.
- ``redis://host[:port][,host[:port]...]`` or ``rediss://...`` with
  ``SIDECAR_REDIS_CLUSTER=true``: a Redis Cluster, discovered from these seed
  nodes. Every key of a tenant carries the hash tag ``{tenant}`` (``redis.keys``), so
  scripts, transactions and the fan-out channel (sharded pub/sub, Redis 7+)
  stay in one slot.

TLS options go in the query string for every form: ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none``, ``optional``,
``required``) and ``ssl_check_hostname``. Error messages never repeat the URL,
which may hold a password.

Nothing here knows ``Settings``: the parser takes a string and ``create_redis``
the few values it needs, so ``config`` can validate URLs with this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

__all__ = [
    "REDIS_ERRORS",
    "RedisClient",
    "RedisTarget",
    "create_redis",
    "parse_redis_url",
]

#: What the sidecar may get from either client: one server, a sentinel-managed
#: master (also a ``Redis``) or a cluster.
RedisClient: TypeAlias = Redis | RedisCluster

#: Everything a Redis call can raise when Redis (or the network to it) fails.
#: ``RedisClusterException`` is not a ``RedisError`` (e.g. no seed node reachable).
REDIS_ERRORS: Final[tuple[type[BaseException], ...]] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)

SENTINEL_PORT: Final = 26379
REDIS_PORT: Final = 6379

_TLS_OPTIONS: Final = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
_SENTINEL_OPTIONS: Final = frozenset({"sentinel_username", "sentinel_password"})
_CERT_REQS: Final = ("none", "optional", "required")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})

Kind = Literal["standalone", "unix", "sentinel"]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``SIDECAR_REDIS_URL``; passwords never show in ``repr``."""

    kind: Kind
    tls: bool = False
    hosts: tuple[tuple[str, int], ...] = ()
    path: str | None = None
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls_options: dict[str, Any] = field(default_factory=dict)

    def cluster_problem(self) -> str | None:
        """Why this URL cannot name a Redis Cluster, or ``None`` when it can."""
        if self.kind == "unix":
            return "a Redis Cluster needs redis:// or rediss:// node addresses, not unix://"
        if self.kind == "sentinel":
            return "Sentinel and Cluster are different topologies; use one of them"
        if self.db != 0:
            return "a Redis Cluster has only database 0"
        return None

    def standalone_problem(self) -> str | None:
        """Why this URL needs ``SIDECAR_REDIS_CLUSTER=true``, or ``None``."""
        if self.kind == "standalone" and len(self.hosts) > 1:
            return (
                "several hosts name a Redis Cluster (set SIDECAR_REDIS_CLUSTER=true) "
                "or sentinels (use redis+sentinel://host1,host2/service)"
            )
        return None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any of the documented URL forms; ``ValueError`` says what is wrong."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ValueError("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        raise ValueError(
            "scheme must be redis://, rediss://, unix://, redis+sentinel:// or "
            f"rediss+sentinel://, got {scheme or 'none'}://"
        )
    if parts.fragment:
        raise ValueError("must not carry a #fragment")
    tls = scheme.startswith("rediss")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _userinfo(userinfo)
    options = _options(parts.query, sentinel=scheme.endswith("+sentinel"))
    tls_options = {k: v for k, v in options.items() if k in _TLS_OPTIONS}
    if tls_options and not tls and scheme != "unix":
        raise ValueError(
            f"{sorted(tls_options)[0]} needs TLS: use rediss:// (or rediss+sentinel://)"
        )
    if scheme == "unix":
        if tls_options:
            raise ValueError("TLS options do not apply to unix://")
        if hostlist or not parts.path:
            raise ValueError("unix:// needs a socket path, e.g. unix:///run/redis.sock")
        return RedisTarget(
            "unix",
            path=unquote(parts.path),
            db=_db(options.get("db", "0")),
            username=username,
            password=password,
        )
    if "db" in options:
        raise ValueError("put the database in the path (redis://host:6379/0), not in ?db=")
    if not hostlist:
        raise ValueError("needs a host, e.g. redis://127.0.0.1:6379/0")
    if scheme.endswith("+sentinel"):
        hosts = tuple(_host(h, SENTINEL_PORT) for h in hostlist.split(","))
        segments = [s for s in parts.path.split("/") if s]
        if not segments:
            raise ValueError(
                "needs the master's service name, e.g. redis+sentinel://sentinel:26379/mymaster"
            )
        if len(segments) > 2:
            raise ValueError("expected /service or /service/db after the sentinels")
        return RedisTarget(
            "sentinel",
            tls=tls,
            hosts=hosts,
            service=unquote(segments[0]),
            db=_db(segments[1]) if len(segments) == 2 else 0,
            username=username,
            password=password,
            sentinel_username=options.get("sentinel_username"),
            sentinel_password=options.get("sentinel_password"),
            tls_options=tls_options,
        )
    hosts = tuple(_host(h, REDIS_PORT) for h in hostlist.split(","))
    path = parts.path.strip("/")
    if "/" in path:
        raise ValueError("expected at most a database number after the host, e.g. /0")
    return RedisTarget(
        "standalone",
        tls=tls,
        hosts=hosts,
        db=_db(path) if path else 0,
        username=username,
        password=password,
        tls_options=tls_options,
    )


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, sep, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if sep and password else None)


def _host(value: str, default_port: int) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("has a malformed [IPv6] host")
        port_s = rest[1:]
    else:
        host, _, port_s = value.partition(":")
    if not host:
        raise ValueError("has an empty host in its host list")
    if not port_s:
        return host, default_port
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError("has an invalid port") from None
    if not 0 < port < 65536:
        raise ValueError("has a port outside 1-65535")
    return host, port


def _db(value: str) -> int:
    try:
        db = int(value)
    except ValueError:
        raise ValueError("the database must be a number, e.g. /0") from None
    if db < 0:
        raise ValueError("the database must be 0 or more")
    return db


def _options(query: str, *, sentinel: bool) -> dict[str, Any]:
    known = _TLS_OPTIONS | {"db"} | (_SENTINEL_OPTIONS if sentinel else frozenset())
    out: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in known:
            raise ValueError(f"unknown option {name!r} (known: {', '.join(sorted(known))})")
        if name == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
            out[name] = value.lower()
        elif name == "ssl_check_hostname":
            low = value.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError("ssl_check_hostname must be true or false")
            out[name] = low in _TRUE
        else:
            out[name] = value
    return out


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's wait for a free connection.

    The plain ``SentinelConnectionPool`` raises at once when all connections are
    busy, which the sidecar would take for "Redis down".
    """


class _SentinelRedis(Redis):
    """A sentinel-managed master client that also closes its sentinel clients."""

    _sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self._sentinel is not None:
            await self._sentinel.aclose()


def create_redis(url: str, *, cluster: bool, timeout: float, pool_size: int) -> RedisClient:
    """A redis-py asyncio client with explicit timeouts, pool size and no hidden retries.

    ``url`` is any form :func:`parse_redis_url` accepts; ``cluster`` is
    ``SIDECAR_REDIS_CLUSTER``, ``timeout`` ``SIDECAR_REDIS_TIMEOUT`` (one command or
    connect) and ``pool_size`` ``SIDECAR_REDIS_POOL_SIZE``. redis-py 8 retries failed
    commands by default; the sidecar does its own backoff (``RedisConn``), so a dead
    Redis costs one timeout, not several.
    """
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
        "retry": Retry(NoBackoff(), 0),
        "client_name": "vellum-sidecar",
        "username": target.username,
        "password": target.password,
    }
    if cluster:
        return _cluster(target, pool_size, common)
    if target.kind == "sentinel":
        return _sentinel(target, timeout, pool_size, common)
    pool_kwargs: dict[str, Any] = {
        **common,
        "max_connections": pool_size,
        "timeout": timeout,
        "db": target.db,
    }
    if target.kind == "unix":
        pool_kwargs.update(connection_class=UnixDomainSocketConnection, path=target.path)
    else:
        host, port = target.hosts[0]
        pool_kwargs.update(host=host, port=port)
        if target.tls:
            pool_kwargs.update(connection_class=SSLConnection, **target.tls_options)
    return Redis.from_pool(BlockingConnectionPool(**pool_kwargs))


def _tls(target: RedisTarget) -> dict[str, Any]:
    return {"ssl": True, **target.tls_options} if target.tls else {}


def _sentinel(target: RedisTarget, timeout: float, pool_size: int, common: dict[str, Any]) -> Redis:
    assert target.service is not None
    tls = _tls(target)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.hosts),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            **tls,
        },
    )
    pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        target.service,
        sentinel,
        max_connections=pool_size,
        timeout=timeout,
        db=target.db,
        **common,
        **tls,
    )
    client = _SentinelRedis(connection_pool=pool)
    client.auto_close_connection_pool = True
    client._sentinel = sentinel
    return client


def _cluster(target: RedisTarget, pool_size: int, common: dict[str, Any]) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        # Per node; a tenant's keys all live on one node (the hash tag).
        max_connections=pool_size,
        **common,
        **_tls(target),
    )
