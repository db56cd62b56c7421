"""Browser guards: Fetch Metadata and Referer on the local API, Host on the ops listener."""

from __future__ import annotations

import pytest

from sidecar.emulator import Emulator

from .conftest import SidecarFactory
from .served import ServeFactory, exchange, json_of, serve, status_of

__all__ = ["serve"]

#: What a page's <img src="http://127.0.0.1:8700/..."> sends from another site.
IMG_TAG = {
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Mode": "no-cors",
    "Sec-Fetch-Dest": "image",
    "Referer": "https://evil.example/page",
}


@pytest.mark.parametrize(
    "headers",
    [
        IMG_TAG,
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "CROSS-SITE"},
        {"Referer": "https://evil.example/"},
        {"Referer": "http://localhost:3000/"},  # another origin on this machine
        {"Referer": "not a url"},
    ],
)
async def test_cross_site_requests_are_refused_before_any_work(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, headers: dict[str, str]
) -> None:
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": ["m"]})
    sc = await make_sidecar(None)
    emulator.clear_requests()
    for method, path in (
        ("GET", "/v1/customers/cus_1/can/m"),
        ("GET", "/v1/customers/cus_1/entitlements"),
        ("GET", f"/tenants/{tenant}/customers/cus_1/entitlements"),
        ("DELETE", "/v1/cache"),
        ("GET", "/v1/accounts/acct_1/invoices"),
        ("GET", "/v1/customers/cus_1/flags"),
        ("POST", "/ofrep/v1/evaluate/flags"),
        ("POST", "/ofrep/v1/evaluate/flags/new_ui"),
        ("GET", f"/tenants/{tenant}/an_operation_newer_than_this_release"),  # forwarded
        ("GET", "/no/such/path"),  # the catch-all
    ):
        resp = await sc.client.request(method, path, headers=headers)
        assert resp.status == 403, (method, path)
        assert (await resp.json())["error"]["code"] == "forbidden"
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert emulator.count() == 0, "no upstream call with the sidecar's key"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"},  # typed into the address bar
        {"Sec-Fetch-Site": "same-origin"},
        {"Referer": "{origin}/openapi.json"},
        {"Referer": ""},
    ],
)
async def test_local_and_same_origin_requests_pass(
    make_sidecar: SidecarFactory, headers: dict[str, str]
) -> None:
    sc = await make_sidecar(None)
    origin = str(sc.client.make_url("")).rstrip("/")
    sent = {k: v.replace("{origin}", origin) for k, v in headers.items()}
    resp = await sc.client.get("/openapi.json", headers=sent)
    assert resp.status == 200


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:9700", 200),
        ("localhost", 200),
        ("10.1.2.3:9700", 200),  # the kubelet's probe: the pod IP
        ("[fd00::12]:9700", 200),
        ("sidecar.shop.svc.cluster.local:9700", 200),  # SIDECAR_OPS_ALLOWED_HOSTS below
        ("metrics.internal", 200),
        ("evil.example", 403),  # DNS rebinding
        ("evil.example:9700", 403),
        ("10.1.2.3.nip.io:9700", 403),
        ("svc.cluster.local.evil.example", 403),
    ],
)
async def test_ops_host_guard_admits_probes_and_scrapes_only(
    make_sidecar: SidecarFactory, host: str, status: int
) -> None:
    sc = await make_sidecar(None, SIDECAR_OPS_ALLOWED_HOSTS=".svc.cluster.local, Metrics.Internal")
    for path in ("/metrics", "/readyz", "/healthz"):
        resp = await sc.ops.get(path, headers={"Host": host})
        assert resp.status == status, path
        if status == 403:
            assert (await resp.json())["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, IMG_TAG],
)
async def test_ops_refuses_browsers_from_other_sites(
    make_sidecar: SidecarFactory, headers: dict[str, str]
) -> None:
    sc = await make_sidecar(None)
    resp = await sc.ops.get("/metrics", headers={"Host": "10.1.2.3:9700", **headers})
    assert resp.status == 403


async def test_guards_on_the_real_listeners(serve: ServeFactory) -> None:
    sc = await serve()
    rebinding = b"GET /metrics HTTP/1.1\r\nHost: attacker.example:9700\r\nConnection: close\r\n\r\n"
    answer, _ = await exchange(sc.ports["ops"], rebinding)
    assert status_of(answer) == 403
    assert json_of(answer)["error"]["code"] == "forbidden"
    probe = b"GET /readyz HTTP/1.1\r\nHost: 10.0.0.7:9700\r\nConnection: close\r\n\r\n"
    answer, _ = await exchange(sc.ports["ops"], probe)
    assert status_of(answer) == 200
    http10 = b"GET /healthz HTTP/1.0\r\n\r\n"  # no Host at all
    answer, _ = await exchange(sc.ports["ops"], http10)
    assert status_of(answer) == 200
    img = (
        b"GET /v1/customers/c/can/m HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: cross-site\r\n"
        b"Sec-Fetch-Mode: no-cors\r\nReferer: https://evil.example/\r\nConnection: close\r\n\r\n"
    )
    answer, _ = await exchange(sc.ports["local"], img)
    assert status_of(answer) == 403
