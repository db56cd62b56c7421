"""Structured logs: one JSON object per line on stderr.

Call sites log an event name as the message and put ids and timings in
``extra={"fields": {...}}``. The line's own keys (``ts``, ``level``, ``logger``,
``event``, ``error``, ``traceback``) always hold what the formatter put there: a
field of the same name is kept beside them as ``field.<name>``, so grepping
for a documented event name always finds its lines. Nothing logged carries a
secret: the formatter only prints what call sites pass, and no call site passes
a key, a secret or a body. A record logged with an exception (``log.exception``)
carries ``error`` (its type and message) and ``traceback`` (the frames' files,
lines and source text; never their local variables). As a last line of defence
every line goes through ``redact_text``, so a URL that reaches a log (in an
exception's message, say) never shows its credentials.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any, Final

import orjson

from .values import redact_text

__all__ = ["RESERVED", "JsonFormatter", "configure_logging"]


#: Keys every line's formatter owns; fields never overwrite them.
RESERVED: Final = frozenset({"ts", "level", "logger", "event", "error", "traceback"})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out["field." + key if key in RESERVED else key] = value
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            out["error"] = f"{exc_type.__name__}: {exc}"
            # Files, lines and source text; a frame's locals never reach a log
            # (format_exception only shows them when asked to capture them).
            out["traceback"] = "".join(traceback.format_exception(exc_type, exc, tb)).rstrip()
        return redact_text(orjson.dumps(out, default=str).decode())


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access logger is only attached when SIDECAR_ACCESS_LOG=true.
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    logging.Formatter.converter = time.gmtime
