"""An example app container: it asks its sidecar, on the pod's loopback, as any app would.

It holds no Vellum credentials and knows nothing of Redis; it only calls
``http://127.0.0.1:8700`` (``SIDECAR_URL``). In compose it shares the sidecar's
network namespace (``network_mode: service:sidecar``), as containers of one
Kubernetes pod do. Standard library only, so it runs in any Python image.

    python example_app.py            # ask every INTERVAL seconds, forever
    python example_app.py --once     # ask once, exit 0 when every answer came back
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

SIDECAR_URL = os.environ.get("SIDECAR_URL", "http://127.0.0.1:8700").rstrip("/")
INTERVAL = float(os.environ.get("INTERVAL", "5"))
CHECKS = [("cus_active", "reports"), ("cus_trial", "exports"), ("cus_pastdue", "reports")]


def ask(customer: str, module: str) -> str:
    url = f"{SIDECAR_URL}/v1/customers/{customer}/can/{module}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - a fixed local URL
            body = json.load(resp)
            cache = resp.headers.get("X-Sidecar-Cache", "-")
    except urllib.error.HTTPError as exc:  # 503 still carries {"allowed": false}
        body = json.load(exc)
        cache = exc.headers.get("X-Sidecar-Cache", "-")
    verdict = "allowed" if body.get("allowed") else "denied"
    return f"{customer} {module}: {verdict} (status={body.get('status')}, cache={cache})"


def main(argv: list[str]) -> int:
    once = "--once" in argv
    deadline = time.monotonic() + 60
    while True:
        try:
            for customer, module in CHECKS:
                print(ask(customer, module), flush=True)
        except (urllib.error.URLError, OSError) as exc:
            # The sidecar is still starting: retry for a minute before giving up.
            print(f"sidecar not answering yet: {exc}", file=sys.stderr, flush=True)
            if time.monotonic() > deadline:
                return 1
            time.sleep(1)
            continue
        if once:
            return 0
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
