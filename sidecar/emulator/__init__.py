"""The built-in Vellum emulator: the upstream API in memory, an admin API, signed pushes.

It stands in for the hosted Vellum API (as ``vellumcharter`` 1.4.2 calls it) in
tests, ``vellum-sidecar demo`` and compose (docs/emulator.md). By concern:

- ``wire.py``: a call in, an answer out, the request log (the data the HTTP face
  translates);
- ``operations.py``: every upstream operation, its route and its handler;
- ``bodies.py``: the upstream's checks on bodies and queries;
- ``model.py``: the records (accounts, customers, subscriptions, invoices) and
  their views; ``ledger.py``: the data, the documents, flags, credits and the
  events; ``billing.py``: the billing rules; ``seed.py``: the demo dataset;
- ``faults.py``: injected failures, delays, holds, and older upstreams' ways;
- ``state.py``: :class:`State`, all of that as one plain-Python object;
- ``service.py``: :class:`Emulator`, the state plus signed push delivery;
- ``app.py``: the HTTP face; ``admin.py``: the admin API under ``/_emulator/``;
- ``catalog.py``: what every tenant sells; ``pdf.py``: the invoice PDFs.
"""

from __future__ import annotations

from .app import UPSTREAM_ROUTES, create_emulator_app
from .faults import DEFAULT_EVENT_ID_FIELDS, Hold, Settings
from .model import ACCESS_STATUSES, ACCOUNT_STATUSES, CUSTOMER_STATUSES
from .operations import OPERATIONS
from .service import EMULATOR, Attempt, Emulator, Push
from .state import DEMO_TENANT, State
from .wire import Answer, Call, EmulatorError, RecordedRequest

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
