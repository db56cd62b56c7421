"""Unit and integration tests: which is which, decided in one place (``tests/conftest.py``).

A test is a **unit** test when everything it uses is plain Python: its fixtures
(and theirs) are all in :data:`PURE_FIXTURES`, and it is not named in
:data:`STARTS_PROCESSES`. Every other test is an **integration** test: it
starts a ``redis-server``, the emulator, a sidecar, node, kubectl, or listens
on a socket (aiohttp's test servers do).

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

import sys
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["AUDITED", "PURE_FIXTURES", "STARTS_PROCESSES", "audit", "is_unit"]

#: Fixtures that start nothing: pytest's own and the plain values of conftest.py.
#: The ``_*event_loop*`` fixtures are pytest-asyncio's (a loop opens no socket).
PURE_FIXTURES: Final = frozenset(
    {
        "request", "tmp_path", "tmp_path_factory", "monkeypatch", "capsys", "capfd",
        "caplog", "recwarn", "pytestconfig", "cache", "record_property", "tenant",
        "event_loop_policy", "anyio_backend",
    }
)  # fmt: skip

#: Tests that start a process or open a socket with no fixture doing it: a module
#: (``test_x.py``) or one test (``test_x.py::test_name``), as pytest names them.
STARTS_PROCESSES: Final[tuple[str, ...]] = (
    # the generators' --check runs, as CI runs them
    "tests/test_api_docs.py::test_the_committed_table_is_current",
    "tests/test_config.py::test_readme_table_is_generated_from_the_declarations",
    "tests/test_openapi.py::test_committed_document_is_what_the_generator_writes",
    "tests/test_openapi.py::test_generator_check_fails_on_a_stale_document",
    # the command line, the bench and the deploy files' tools (kubectl)
    "tests/test_cli.py",
    "tests/test_bench_smoke.py",
    "tests/test_faults_smoke.py",
    "tests/test_soak_smoke.py",
    "tests/test_deploy.py",  # kubectl renders, cached for the module's tests
    # the clients against a socket of their own (nothing listening, a closing server)
    "tests/test_client_python.py::test_nothing_listening_fails_closed_fast",
    "tests/test_drain.py::test_async_client_",
    "tests/test_workers.py::test_a_unix_listener_",
    # the unit set itself, run in a child pytest
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


def is_unit(nodeid: str, fixtures: Iterable[str]) -> bool:
    """A unit test: only pure fixtures, and not named as starting a process itself."""
    if nodeid.startswith(STARTS_PROCESSES):
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
