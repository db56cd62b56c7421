"""The cache: an in-process LRU in front of Redis, filled from the upstream, for every
document kind (entitlements, a customer's flags, the tenant's global flags).

- ``kinds``: each document kind described once (path, TTL, Redis keys, checks);
- ``entry``: one cached answer, its freshness and stale window, its stored form;
- ``memory``: the in-process LRU layer;
- ``cache``: ``DocumentCache`` (one per kind) and ``Caches``, the lookups and
  single-flight fills;
- ``invalidation``: drops across every sidecar by axis (Redis deletes and the fan-out).
"""
