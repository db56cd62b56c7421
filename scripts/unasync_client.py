"""Write the blocking ``SidecarClient``'s API from ``AsyncSidecarClient``'s, as httpcore's unasync.

The Python client's methods (what each builds, which operation it calls, how it
reads the answer, the fail-closed rule) are written once, in the asyncio client
between ``# BEGIN the API`` and ``# END the API``. This script copies them into
``SidecarClient`` between its ``GENERATED blocking API`` markers with ``async``
and ``await`` taken out; each class keeps its own hand-written transport
(``_exchange``: its own HTTP/1.1 on blocking sockets with a thread-safe pool, or
``asyncio`` streams; both share the request encoder and the response head parser).

    uv run python scripts/unasync_client.py          # rewrite the blocking copy
    uv run python scripts/unasync_client.py --check  # exit 1 when it is stale (CI)
"""

from __future__ import annotations

import re
import sys
from typing import Final

from regions import ROOT, region, replace_region, ruff_format, run

CLIENT: Final = ROOT / "client" / "python" / "vellum_sidecar_client.py"
SOURCE: Final = ("# BEGIN the API", "# END the API")
TARGET: Final = ("# BEGIN GENERATED blocking API", "# END GENERATED blocking API")

#: (pattern, replacement) in order, on whole words, as httpcore's ``scripts/unasync.py``.
RULES: Final = (
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait\s+", ""),
    (r"\bAsyncSidecarClient\b", "SidecarClient"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\baclose\b", "close"),
)


def unasync(source: str) -> str:
    """The blocking twin of the asyncio client's API text."""
    if re.search(r"\basyncio\b", source):
        raise SystemExit(
            f"{CLIENT.name}: the shared API uses asyncio itself, which has no blocking "
            "twin; keep asyncio in AsyncSidecarClient's transport, above '# BEGIN the API'"
        )
    for pattern, replacement in RULES:
        source = re.sub(pattern, replacement, source)
    return source


def render(text: str) -> str:
    """The client module with its blocking API regenerated from the asyncio one."""
    api = unasync(region(text, *SOURCE, path=CLIENT.name))
    return ruff_format(replace_region(text, *TARGET, api, path=CLIENT.name), CLIENT)


if __name__ == "__main__":
    sys.exit(run(__doc__.splitlines()[0], {CLIENT: render}))
