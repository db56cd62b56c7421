"""Command line: ``vellum-sidecar [serve | demo | emulator | check-config | snapshot |
healthcheck]``."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__
from .config import ConfigError, Settings, add_flags, env_with_flags, settings_subset
from .logs import configure_logging
from .values import Listen

__all__ = ["main"]

EXIT_CONFIG = 2
#: The settings ``snapshot export`` and ``import`` read (no API key needed).
SNAPSHOT_FIELDS = (
    "tenant_id",
    "snapshot_file",
    "stale_ttl",
    "redis_url",
    "redis_cluster",
    "redis_timeout",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vellum-sidecar",
        description="A localhost entitlement sidecar for the Vellum API.",
    )
    parser.add_argument("--version", action="version", version=f"vellum-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the sidecar (the default)")
    add_flags(serve)
    check = sub.add_parser("check-config", help="validate the configuration and print it redacted")
    add_flags(check)
    demo = sub.add_parser("demo", help="the emulator and the sidecar together, no credentials")
    add_flags(demo)
    demo.add_argument("--emulator-listen", default="127.0.0.1:8710", metavar="HOST:PORT")
    emu = sub.add_parser("emulator", help="the built-in Vellum emulator alone")
    emu.add_argument(
        "--listen",
        default=os.environ.get("EMULATOR_LISTEN", "127.0.0.1:8710"),
        metavar="HOST:PORT",
        help="where to listen (EMULATOR_LISTEN)",
    )
    emu.add_argument(
        "--api-keys",
        default=None,
        metavar="KEYS",
        help="comma-separated accepted API keys (EMULATOR_API_KEYS, or VELLUM_API_KEY)",
    )
    emu.add_argument(
        "--webhook-url",
        default=os.environ.get("EMULATOR_WEBHOOK_URL"),
        metavar="URL",
        help="where admin changes are pushed (EMULATOR_WEBHOOK_URL)",
    )
    emu.add_argument(
        "--tenant",
        default=os.environ.get("EMULATOR_TENANT", "demo"),
        help="tenant of the seeded data and of /_emulator/customers/... (EMULATOR_TENANT)",
    )
    emu.add_argument("--no-seed", action="store_true", help="start with no demo data")
    snap = sub.add_parser("snapshot", help="export or import a local snapshot (offline use)")
    actions = snap.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export",
        help="write a snapshot file: the running sidecar's own (SIDECAR_SNAPSHOT_FILE) "
        "or, with --from-redis, what Redis holds for the tenant",
    )
    export.add_argument("--out", required=True, metavar="PATH", help="where ('-': stdout)")
    export.add_argument(
        "--from-redis", action="store_true", help="read the tenant's entries from Redis"
    )
    add_flags(export, SNAPSHOT_FIELDS)
    import_ = actions.add_parser(
        "import",
        help="check a snapshot file and install it as SIDECAR_SNAPSHOT_FILE, its entries "
        "servable stale for SIDECAR_STALE_TTL from now (before the sidecar starts)",
    )
    import_.add_argument("file", metavar="PATH", help="the snapshot file ('-': stdin)")
    add_flags(import_, SNAPSHOT_FIELDS)
    health = sub.add_parser("healthcheck", help="exit 0 when this host's sidecar is healthy")
    health.add_argument(
        "--url",
        default=None,
        help="health URL (default: /healthz on SIDECAR_OPS_LISTEN's port on 127.0.0.1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "healthcheck":
        return _healthcheck(args)
    if command == "emulator":
        return _emulator(args)
    if command == "demo":
        return _demo(args)
    if command == "snapshot":
        return _snapshot(args)
    env = env_with_flags(args)
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"vellum-sidecar: config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check-config":
        for name, value in settings.redacted():
            print(f"{name}={value}")
        print("configuration OK", file=sys.stderr)
        return 0
    configure_logging(settings.log_level)
    if settings.workers > 1:
        from .workers import run_workers

        return _run(run_workers(settings, env))
    return _run(_serve(settings))


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when the ``[fast]`` extra installed it, else on asyncio's loop
    (outside the ``except``: a traceback logged while serving must not carry the
    ``ImportError`` as its context)."""
    with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
        return runner.run(coro)


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(settings: Settings) -> int:
    from .server import run_sidecar

    return await run_sidecar(settings)


def _demo(args: argparse.Namespace) -> int:
    from .emulator import create_emulator_app
    from .server import Listener, run_sidecar

    env: dict[str, str] = {
        k: v for k, v in env_with_flags(args).items() if k.startswith("SIDECAR_")
    }
    emulator_listen = Listen.parse(args.emulator_listen)
    api_key = "demo_" + secrets.token_hex(16)
    webhook_secret = "whsec_" + secrets.token_hex(16)
    env.update(
        VELLUM_API_KEY=api_key,
        VELLUM_TENANT_ID="demo",
        VELLUM_BASE_URL=emulator_listen.url(),
        VELLUM_WEBHOOK_SECRETS=webhook_secret,
    )
    env.setdefault("SIDECAR_WEBHOOK_LISTEN", "127.0.0.1:8701")
    env.setdefault("SIDECAR_OPS_LISTEN", "127.0.0.1:9700")
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"vellum-sidecar: config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging("warning" if settings.log_level == "info" else settings.log_level)
    webhook_url = settings.webhook_listen.url() + "/webhooks/vellum"
    emulator = create_emulator_app(
        api_keys=[api_key],
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        seed=True,
        default_tenant="demo",
    )

    def banner() -> None:
        print(_demo_banner(settings, emulator_listen, webhook_url), flush=True)

    return _run(
        run_sidecar(
            settings, before=[Listener("emulator", emulator, emulator_listen)], on_ready=banner
        )
    )


def _demo_banner(settings: Settings, emulator: Listen, webhook_url: str) -> str:
    api = settings.listen.url()
    emu = emulator.url()
    ops = settings.ops_listen.url()
    curl = "curl" if not settings.listen.is_unix else f"curl --unix-socket {settings.listen.path}"
    if settings.listen.is_unix:
        api = "http://localhost"
    cache = (
        "redis + memory" if settings.redis_url else "memory only (set SIDECAR_REDIS_URL for Redis)"
    )
    return f"""
vellum-sidecar demo: the built-in Vellum emulator and a sidecar in front of it.

  local API   {api}
  webhooks    {webhook_url}   (the emulator pushes signed events here)
  ops         {ops}/healthz  {ops}/readyz  {ops}/metrics
  emulator    {emu}   (tenant "demo"; the API key is generated, apps never see it)
  cache       {cache}

Try these:
  {curl} -i {api}/v1/customers/cus_active/entitlements    # X-Sidecar-Cache: miss
  {curl} -i {api}/v1/customers/cus_active/entitlements    # X-Sidecar-Cache: hit
  {curl} -s {api}/v1/customers/cus_active/can/reports     # "allowed":true
  {curl} -s {api}/v1/customers/cus_trial/can/exports      # "allowed":false
  {curl} -s {api}/v1/customers/nobody/entitlements        # "found":false
  curl -s -X PUT {emu}/_emulator/customers/cus_trial/entitlements \\
       -d '{{"status":"active","modules":["reports","exports"]}}'   # emulator pushes a webhook
  {curl} -s {api}/v1/customers/cus_trial/can/exports      # "allowed":true at once
  {curl} -s {api}/v1/customers/cus_active/flags           # "new-dashboard":true (its override)
  {curl} -s {api}/v1/customers/cus_active/credits/exports # "balance":20
  {curl} -s {api}/tenants/demo/accounts/acme/invoices     # the mirror, as the Vellum SDK calls it
  curl -s {ops}/readyz

Ctrl-C stops it.
"""


def _emulator(args: argparse.Namespace) -> int:
    from .emulator import create_emulator_app

    keys_s = (
        args.api_keys or os.environ.get("EMULATOR_API_KEYS") or os.environ.get("VELLUM_API_KEY")
    )
    if not keys_s:
        print(
            "vellum-sidecar: config error: EMULATOR_API_KEYS: required (the keys the emulator "
            "accepts; VELLUM_API_KEY works too)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    secret = _emulator_secret(os.environ)
    if args.webhook_url and not secret:
        print(
            "vellum-sidecar: config error: EMULATOR_WEBHOOK_SECRET: required with a webhook URL "
            "(or VELLUM_WEBHOOK_SECRETS, whose first secret signs)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        listen = Listen.parse(args.listen)
    except ValueError as exc:
        print(f"vellum-sidecar: config error: EMULATOR_LISTEN: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(os.environ.get("SIDECAR_LOG_LEVEL", "info"))
    app = create_emulator_app(
        api_keys=[k.strip() for k in keys_s.split(",") if k.strip()],
        webhook_url=args.webhook_url,
        webhook_secret=secret,
        seed=not args.no_seed,
        default_tenant=args.tenant,
    )
    print(f"vellum emulator on {listen.url()} (tenant {args.tenant!r})", flush=True)
    if listen.is_unix:
        web.run_app(app, path=listen.path, print=None, access_log=None)
    else:
        web.run_app(app, host=listen.host, port=listen.port, print=None, access_log=None)
    return 0


def _emulator_secret(env: Mapping[str, str]) -> str | None:
    secret = env.get("EMULATOR_WEBHOOK_SECRET")
    if secret:
        return secret
    path = env.get("EMULATOR_WEBHOOK_SECRET_FILE") or env.get("VELLUM_WEBHOOK_SECRETS_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read()
        except OSError:
            return None
    else:
        secret = env.get("VELLUM_WEBHOOK_SECRETS")
    if not secret:
        return None
    first = secret.replace("\n", ",").split(",")[0].strip()
    return first or None


def _snapshot(args: argparse.Namespace) -> int:
    """``snapshot export`` / ``snapshot import``: offline use of the local snapshot
    (docs/operations.md, "Offline use"). Nothing goes through an HTTP listener: the
    cache's contents are read from the snapshot files or from Redis directly."""
    from .cache import snapshot

    try:
        values = settings_subset(env_with_flags(args), SNAPSHOT_FIELDS)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"vellum-sidecar: config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    tenant: str = values["tenant_id"]
    target: Path | None = values["snapshot_file"]
    now = time.time()
    try:
        if args.action == "export":
            if args.from_redis:
                found = _redis_snapshot(values, now)
                if found is None:
                    return EXIT_CONFIG
                entries = found.entries
            else:
                if target is None:
                    return _config_error(
                        "SIDECAR_SNAPSHOT_FILE: required (the sidecar's snapshot to export), "
                        "or --from-redis"
                    )
                merged = _read_snapshots(target, tenant, now)
                if merged is None:
                    print(f"vellum-sidecar: snapshot: no usable snapshot at {target}",
                          file=sys.stderr)  # fmt: skip
                    return 1
                entries = merged
            lines, count = snapshot.encode_lines(tenant, entries, now)
            if args.out == "-":
                sys.stdout.buffer.write(snapshot.file_bytes(lines, count))
                sys.stdout.buffer.flush()
            else:
                snapshot.write_file(Path(args.out), lines, count)
            where = "standard output" if args.out == "-" else args.out
        else:
            if target is None:
                return _config_error("SIDECAR_SNAPSHOT_FILE: required (where to install it)")
            raw = (
                sys.stdin.buffer.read() if args.file == "-" else snapshot.read_file(Path(args.file))
            )
            # Read as of the epoch, so nothing counts as expired: every entry is kept,
            # servable stale for SIDECAR_STALE_TTL from now (a CI job's file may be old).
            entries = snapshot.parse_snapshot(raw, tenant, now=0.0).entries
            stale_until = now + values["stale_ttl"]
            for _, _, entry in entries:
                entry.stale_until = max(entry.stale_until, stale_until)
            lines, count = snapshot.encode_lines(tenant, entries, now)
            snapshot.write_file(target, lines, count)
            where = str(target)
    except snapshot.SnapshotError as exc:
        print(f"vellum-sidecar: snapshot: {exc.reason}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vellum-sidecar: snapshot: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except snapshot.UNFORESEEN as exc:
        print(f"vellum-sidecar: snapshot: damaged: unreadable contents ({type(exc).__name__})",
              file=sys.stderr)  # fmt: skip
        return 1
    kinds = Counter(kind.name for kind, _, _ in entries)
    by_kind = ", ".join(f"{name} {n}" for name, n in sorted(kinds.items())) or "none"
    verb = "exported" if args.action == "export" else "imported"
    print(f"{verb} {count} entries ({by_kind}) of tenant {tenant!r} to {where}",
          file=sys.stderr)  # fmt: skip
    return 0


def _config_error(line: str) -> int:
    print(f"vellum-sidecar: config error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def _read_snapshots(path: Path, tenant: str, now: float) -> list[Any] | None:
    """The entries of the snapshot at ``path`` and its workers' files, merged; ``None``
    when none of them could be used (each unusable one named on stderr)."""
    from .cache import snapshot

    read: list[snapshot.Snapshot] = []
    for source in snapshot.snapshot_sources(path):
        try:
            read.append(snapshot.read_snapshot(source, tenant, now))
        except FileNotFoundError:
            continue
        except snapshot.SnapshotError as exc:
            print(f"vellum-sidecar: snapshot: ignored {source}: {exc.reason}: {exc}",
                  file=sys.stderr)  # fmt: skip
    return snapshot.merge(read) if read else None


def _redis_snapshot(values: Mapping[str, Any], now: float) -> Any:
    """The tenant's entries from Redis (``None`` after a configuration error)."""
    from .cache import snapshot
    from .redis.url import REDIS_ERRORS, create_redis

    url = values["redis_url"]
    if url is None:
        _config_error("SIDECAR_REDIS_URL: required with --from-redis")
        return None

    async def read() -> snapshot.Snapshot:
        client = create_redis(
            url.reveal(),
            cluster=values["redis_cluster"],
            timeout=max(values["redis_timeout"], 5.0),  # a bulk read, not the hot path
            pool_size=2,
        )
        try:
            return await snapshot.read_redis(client, values["tenant_id"], now)
        finally:
            await client.aclose()

    try:
        return asyncio.run(read())
    except REDIS_ERRORS as exc:
        # The type only: a message may carry the URL (credentials).
        raise OSError(f"Redis did not answer ({type(exc).__name__})") from None


def _healthcheck(args: argparse.Namespace) -> int:
    url = args.url or _health_url(_serving_argv())
    if url is None:
        return EXIT_CONFIG
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own URL
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"vellum-sidecar: unhealthy: {exc}", file=sys.stderr)
        return 1


def _health_url(argv: Sequence[str]) -> str | None:
    """The health URL of the role started with ``argv`` (the server's own arguments).

    ``emulator``: ``/_emulator/healthz`` on its ``--listen`` (or ``EMULATOR_LISTEN``);
    anything else: ``/healthz`` on the sidecar's ops port (``--ops-listen`` or
    ``SIDECAR_OPS_LISTEN``). ``None`` after printing the problem when that address is
    invalid.
    """
    try:
        server = _parser().parse_args(argv)
    except SystemExit:
        server = _parser().parse_args([])
    if server.command == "emulator":
        name, value, path = "EMULATOR_LISTEN", server.listen, "/_emulator/healthz"
    else:
        env = env_with_flags(server) if server.command else dict(os.environ)
        name, value, path = "SIDECAR_OPS_LISTEN", env.get("SIDECAR_OPS_LISTEN"), "/healthz"
        if server.command == "demo":
            value = value or "127.0.0.1:9700"
    try:
        listen = Listen.parse(value or "0.0.0.0:9700")
    except ValueError as exc:
        print(f"vellum-sidecar: config error: {name}: {exc}", file=sys.stderr)
        return None
    return listen.url() + path


def _serving_argv(proc: str = "/proc") -> list[str]:
    """The arguments of the ``vellum-sidecar`` server this container runs.

    A container's HEALTHCHECK runs in the container's process namespace but is not
    told which command the container was started with (one image serves the sidecar,
    the emulator and the demo), so it reads the arguments of process 1, the
    container's command (or, under a minimal init such as ``docker run --init``'s,
    of its first child). ``[]`` (the sidecar's defaults) anywhere else: on a host,
    process 1 is the host's init and nothing is read.
    """
    first = _cmdline(proc, 1)
    rest = _own_arguments(first)
    if rest is None and first and os.path.basename(first[0]) in _INITS:
        children = _read(f"{proc}/1/task/1/children").split()
        rest = _own_arguments(_cmdline(proc, int(children[0]))) if children else None
    if rest is None or (rest and rest[0] in _NOT_SERVERS):
        return []
    return rest


_INITS = frozenset({"docker-init", "tini", "tini-static", "catatonit", "dumb-init"})


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _cmdline(proc: str, pid: int) -> list[str]:
    return _read(f"{proc}/{pid}/cmdline").split("\0")[:-1]


_NOT_SERVERS = frozenset({"healthcheck", "check-config", "-h", "--help", "--version"})


def _own_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments after the program when ``argv`` runs vellum-sidecar, else None."""
    for i, arg in enumerate(argv[:3]):
        if os.path.basename(arg) == "vellum-sidecar":
            return list(argv[i + 1 :])
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] == "sidecar":
            return list(argv[i + 2 :])
    return None


if __name__ == "__main__":
    sys.exit(main())
