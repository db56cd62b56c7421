"""Unit and integration tests: which is which, decided in one place (``tests/conftest.py``).

A test is a **unit** test when everything it uses is plain Python: its fixtures
(and theirs) are all in :data:`PURE_FIXTURES`, its own code names none of
:data:`SPAWNING` (``subprocess``, the harness's ``Stack``, ``socket``, ...), and
it is not named in :data:`STARTS_PROCESSES` (for a helper that starts one out of
sight). Every other test is an **integration** test: it starts a
``redis-server``, the emulator, a sidecar, node, kubectl, or listens on a socket
(aiohttp's test servers do).

    uv run pytest -m unit            # seconds: no process, no socket
    uv run pytest -m integration     # the rest
    uv run pytest                    # both, what CI runs

The split is checked, not trusted: ``tests/test_layers.py`` runs the unit set
in a child pytest with ``SIDECAR_TEST_AUDIT=1``, where :func:`audit` fails any
test that binds or connects a socket or starts a process (Python's audit
hooks see every such call, whoever makes it). A new test that starts a process
without a fixture fails there by name; add it to :data:`STARTS_PROCESSES`.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterable
from typing import Any, Final

__all__ = ["AUDITED", "PURE_FIXTURES", "SPAWNING", "STARTS_PROCESSES", "audit", "is_unit"]

#: Fixtures that start nothing: pytest's own and the plain values of conftest.py.
#: The ``_*event_loop*`` fixtures are pytest-asyncio's (a loop opens no socket).
PURE_FIXTURES: Final = frozenset(
    {
        "request", "tmp_path", "tmp_path_factory", "monkeypatch", "capsys", "capfd",
        "caplog", "recwarn", "pytestconfig", "cache", "record_property", "tenant",
        "event_loop_policy", "anyio_backend",
    }
)  # fmt: skip

#: Names that, in a test's own code, mean it starts a process or opens a socket.
SPAWNING: Final = frozenset(
    {
        "subprocess", "socket", "Stack", "RedisServer", "Process", "free_port", "Popen",
        "create_subprocess_exec", "create_subprocess_shell", "open_connection",
        "start_server", "ClosingServer", "urlopen", "HTTPConnection",
    }
)  # fmt: skip

#: Tests that start a process or open a socket through a helper (where no name of
#: :data:`SPAWNING` shows in the test's own code): a module
#: (``test_x.py``) or one test (``test_x.py::test_name``), as pytest names them.
STARTS_PROCESSES: Final[tuple[str, ...]] = (
    # the command line, run by helpers; kubectl renders, cached for the module's tests
    "tests/test_cli.py",
    "tests/test_deploy.py",
    "tests/test_warm_start.py::test_the_cli_reads_and_replaces_only_regular_files",
    # the generators' --check runs, and the soak script, through helpers
    "tests/test_openapi.py::test_committed_document_is_what_the_generator_writes",
    "tests/test_openapi.py::test_generator_check_fails_on_a_stale_document",
    "tests/test_soak_smoke.py",
    # the async client against a closing server of its own
    "tests/test_drain.py::test_async_client_",
    # the unit set itself, and planted offenders, each in a child pytest
    "tests/test_layers.py::test_the_unit_set_",
    "tests/test_layers.py::test_a_unit_test_that_binds_or_spawns_",
)

#: Audit events that mean a socket or a process (``sys.addaudithook``).
AUDITED: Final = frozenset(
    {
        "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg",
        "subprocess.Popen", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.exec", "os.system", "pty.spawn",
    }
)  # fmt: skip


def _pure(name: str) -> bool:
    return name in PURE_FIXTURES or "event_loop" in name


def names_in(function: Callable[..., Any]) -> set[str]:
    """Every name and attribute a function's own source mentions."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return set()
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
    return found


def is_unit(
    nodeid: str, fixtures: Iterable[str], function: Callable[..., Any] | None = None
) -> bool:
    """A unit test: only pure fixtures, no spawning name in its code, not listed."""
    if nodeid.startswith(STARTS_PROCESSES):
        return False
    if function is not None and names_in(function) & SPAWNING:
        return False
    return all(_pure(name) for name in fixtures)


class _Audit:
    """Events of :data:`AUDITED` seen while a test runs (the hook cannot be removed)."""

    def __init__(self) -> None:
        self.seen: list[str] | None = None

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.seen is not None and event in AUDITED:
            self.seen.append(f"{event}{_short(args)}")


def _short(args: tuple[Any, ...]) -> str:
    text = repr(args)
    return text if len(text) <= 120 else text[:117] + "..."


audit: Final = _Audit()


def install_audit() -> None:
    """Watch for sockets and processes from now on (``SIDECAR_TEST_AUDIT=1``)."""
    sys.addaudithook(audit)
