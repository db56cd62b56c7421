"""Stopping background tasks for good.

On Python 3.11 a cancellation can be lost: when an ``asyncio.timeout`` (redis-py
wraps every connect, read and write in one) expires in the same instant as the
task is cancelled, the ``CancelledError`` comes out as ``TimeoutError``, and a
loop that survives Redis errors carries on as if nothing was asked of it. A
shutdown that cancels such a loop once and waits for it then waits forever
(seen in the test suite: an app's cleanup stuck on the health loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["cancel_and_wait"]

#: How often a task that survived its cancellation is cancelled again.
_RETRY_S: Final = 0.05


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again any
    that swallowed its cancellation. Their results and errors are discarded."""
    every = list(tasks)
    pending = {t for t in every if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=_RETRY_S)
        for task in pending:
            task.cancel()
    for task in every:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
