"""A TCP relay in its own process (``harness.Gate``): an upstream that goes down and
comes back without losing its data.

    python tests/gate.py LISTEN_PORT TARGET_PORT

Sidecars pointed at the relay's port reach the emulator behind it; killing the relay
is the upstream going away (open connections reset, new ones refused), starting it
again on the same port is the upstream back, with everything it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    dst.close()


async def main(listen: int, target: int) -> None:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))

    server = await asyncio.start_server(pipe, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
