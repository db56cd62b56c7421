"""Redis for the sidecar.

- ``url``: ``SIDECAR_REDIS_URL``'s forms, parsed, and the redis-py client built from them;
- ``conn``: ``RedisConn``, health and reconnection (every Redis call goes through it);
- ``keys``: the Redis key names of one tenant.
"""
