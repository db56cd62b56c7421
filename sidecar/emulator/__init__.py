"""The built-in Vellum emulator: the upstream API in memory, an admin API, signed pushes.

It stands in for the hosted Vellum API (as ``vellumcharter`` 1.4.2 calls it) in
tests, ``vellum-sidecar demo`` and compose. ``state.py`` is the service itself in
plain Python (its data, rules, faults and answers as data); ``app.py`` is its HTTP
face and push delivery; ``admin.py`` the admin API under ``/_emulator/``;
``catalog.py`` what every tenant sells.
"""

from __future__ import annotations

from .app import UPSTREAM_ROUTES, create_emulator_app
from .service import EMULATOR, Attempt, Emulator, Push
from .state import (
    ACCESS_STATUSES,
    ACCOUNT_STATUSES,
    CUSTOMER_STATUSES,
    DEFAULT_EVENT_ID_FIELDS,
    DEMO_TENANT,
    OPERATIONS,
    Answer,
    Call,
    EmulatorError,
    Hold,
    RecordedRequest,
    Settings,
    State,
)

__all__ = [
    "ACCESS_STATUSES",
    "ACCOUNT_STATUSES",
    "CUSTOMER_STATUSES",
    "DEFAULT_EVENT_ID_FIELDS",
    "DEMO_TENANT",
    "EMULATOR",
    "OPERATIONS",
    "UPSTREAM_ROUTES",
    "Answer",
    "Attempt",
    "Call",
    "Emulator",
    "EmulatorError",
    "Hold",
    "Push",
    "RecordedRequest",
    "Settings",
    "State",
    "create_emulator_app",
]
