"""cancel_and_wait: a background loop that swallows its cancellation still stops."""

from __future__ import annotations

import asyncio

from sidecar.tasks import cancel_and_wait


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again() -> None:
    swallowed = 0
    started = asyncio.Event()

    async def stubborn() -> None:
        nonlocal swallowed
        started.set()
        while True:
            try:
                await asyncio.Event().wait()  # until cancelled
            except asyncio.CancelledError:
                # What a lost cancellation looks like to a loop that survives errors.
                if swallowed < 2:
                    swallowed += 1
                    continue
                raise

    async def failing() -> None:
        raise RuntimeError("ended on its own")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(cancel_and_wait(tasks), 5)
    assert swallowed == 2
    assert all(t.done() for t in tasks)
    assert tasks[0].cancelled()
