"""The HTTP faces of the sidecar: the local API, the webhook receiver and the ops listener.

- ``routes``: every local-API route, registered in one place;
- ``operations``: the one table of Vellum operations (plain data);
- ``entitlements``: any kind's cached read, ``can``, batch checks, cache drops;
- ``flags``: one flag with the caller's default;
- ``ofrep``: the OpenFeature Remote Evaluation Protocol (``streams``: its open
  event streams);
- ``forwarding``: every other operation, forwarded to the upstream (and mirror paths
  the table does not know);
- ``middleware``, ``inputs``, ``responses``: the local API's plumbing (the error
  envelope, path ids and JSON bodies, cached-read headers);
- ``guard``: the browser guard; ``webhooks``: ``POST /webhooks/vellum``;
  ``ops``: ``/healthz``, ``/readyz``, ``/metrics``; ``limits``: the listeners'
  timeouts, connection caps and shutdown drain.
"""
