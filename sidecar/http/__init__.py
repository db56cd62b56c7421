"""The HTTP faces of the sidecar: the local API, the webhook receiver and the ops listener.

- ``routes``: every local-API route, registered in one place;
- ``operations``: the one table of Vellum operations (plain data);
- ``entitlements``: the cached read, ``can``, batch checks, cache drops;
- ``forwarding``: every other operation, forwarded to the upstream;
- ``middleware``, ``inputs``, ``responses``: the local API's plumbing (the error
  envelope, path ids and JSON bodies, cached-read headers);
- ``guard``: the browser guard; ``webhooks``: ``POST /webhooks/vellum``;
  ``ops``: ``/healthz``, ``/readyz``, ``/metrics``.
"""
