"""Metered usage that survives outages: ``consume_credits`` accepted now, delivered later.

``POST /v1/customers/{c}/credits/{ct}/consume`` with ``Prefer: respond-async`` is
answered 202 once the record is in Redis (``store.UsageStore.accept``), and any
sidecar of the fleet delivers it (``delivery.Deliverer``) exactly once in effect:
the upstream deduplicates on the record's idempotency key, so a record sent again
(after a sidecar died with it, or lost its lease) is never a second deduction.

- ``records``: a record, what an upstream answer means for it, its partition;
- ``store``: every Redis command (streams with a consumer group, the outcomes,
  the leases) and the invariants they keep;
- ``delivery``: leases, lanes (order per customer and credit type), backoff;
- ``queue``: the facade the HTTP handlers and the app use.

Without Redis there is no queue: the route answers 409 ``async_requires_redis``
(docs/api.md says why).
"""

from __future__ import annotations

from .queue import UsageQueue
from .records import Record

__all__ = ["Record", "UsageQueue"]
