"""The entitlement cache: an in-process LRU in front of Redis, filled from the upstream.

- ``entry``: one cached answer, its freshness and stale window, its stored form;
- ``memory``: the in-process LRU layer;
- ``cache``: ``EntitlementCache``, the lookups and single-flight fills;
- ``invalidation``: drops across every sidecar (Redis deletes and the fan-out).
"""
