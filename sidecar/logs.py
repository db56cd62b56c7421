"""Structured logs: one JSON object per line on stderr.

Call sites log an event name as the message and put ids and timings in
``extra={"fields": {...}}``. Nothing logged carries a secret: the formatter only
prints what call sites pass, and no call site passes a key, a secret or a body.
As a last line of defence every line goes through ``redact_text``, so a URL that
reaches a log (in an exception's message, say) never shows its credentials.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from .values import redact_text

__all__ = ["JsonFormatter", "configure_logging"]


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
            out.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and message only: frames' locals never reach a log.
            exc = record.exc_info[1]
            out["error"] = f"{record.exc_info[0].__name__}: {exc}"
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
