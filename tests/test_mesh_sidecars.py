"""Sidecars driven by a real control plane: `meshpy control-plane` and `meshpy proxy -c FILE`
processes on loopback, the shop's apps behind them, and changes made through the API.

One shop mesh serves the tests that only change resources (each puts them back); the tests
that kill processes get a mesh of their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cp import ControlPlaneProcess
from helpers import eventually
from mesh import Mesh, ShopApp, SidecarProcess, Traffic

NS = "shop"
TRUST = "spiffe://mesh.local/ns/shop/sa"
CARD = "4242424242424242"

SERVICES = """
kind: Service
metadata: {name: inventory, namespace: shop}
---
kind: Service
metadata: {name: checkout, namespace: shop}
---
kind: Service
metadata: {name: payments, namespace: shop}
spec: {timeout: 2s}
---
kind: Service
metadata: {name: payments-v2, namespace: shop}
"""
ONLY_CHECKOUT_PAYS = """
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec:
  service: payments
  rules:
    - {name: checkout, action: allow, from: [checkout]}
"""
ROUTE_V2 = """
kind: Route
metadata: {name: payments-v2, namespace: shop}
spec: {host: payments, match: {path_prefix: /v2}, service: payments-v2, priority: 10}
"""


def client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=5)


def charge(sidecar: SidecarProcess, order_id: str = "o1") -> httpx.Response:
    """A charge sent to payments through `sidecar`'s outbound, as an app would send it."""
    body = {"order_id": order_id, "amount_cents": 100, "card": CARD}
    with client() as http:
        return http.post(sidecar.outbound_url + "/charge", json=body, headers={"host": "payments"})


def time_until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` holds (polled tightly); fails after `timeout`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout}s"
        time.sleep(0.005)
    return time.monotonic() - start


def status_json(cp: ControlPlaneProcess) -> list[dict]:
    result = cp.meshpy("status", "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def all_in_sync(cp: ControlPlaneProcess, count: int) -> bool:
    sidecars = status_json(cp)
    return len(sidecars) == count and all(s["in_sync"] for s in sidecars)


class Shop:
    """The shared mesh: inventory, payments and checkout apps, an echo app as payments-v2."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        # The production lease (5 s): these tests do not measure expiry, and a 2 s lease can
        # run out between reports on a saturated two-core machine.
        self.cp = mesh.control_plane()
        self.cp.apply(SERVICES + "---" + ONLY_CHECKOUT_PAYS)
        with ThreadPoolExecutor(4) as pool:
            started = {
                name: pool.submit(mesh.shop, name) for name in ("inventory", "payments", "checkout")
            }
            v2 = pool.submit(mesh.echo, "payments-v2", "payments-v2")
            self.apps: dict[str, ShopApp] = {n: f.result()[0] for n, f in started.items()}
            self.sidecars = {n: f.result()[1] for n, f in started.items()}
            self.sidecars["payments-v2"] = v2.result()[1]
        # Every sidecar knows every other one's endpoint before the tests start.
        checkout, inventory = self.sidecars["checkout"], self.sidecars["inventory"]
        for service in ("inventory", "payments", "payments-v2"):
            eventually(lambda s=service: len(checkout.endpoints(s, NS)) == 1, timeout=10)
            eventually(lambda s=service: len(inventory.endpoints(s, NS)) == 1, timeout=10)


@pytest.fixture(scope="module")
def shop(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Shop]:
    mesh = Mesh(tmp_path_factory.mktemp("shop-mesh"))
    failed_before = request.session.testsfailed
    try:
        yield Shop(mesh)
    finally:
        if request.session.testsfailed > failed_before:
            print(mesh.logs())
        mesh.close()


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path)
    try:
        yield mesh
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(mesh.logs())
        mesh.close()


# --- the shared shop mesh ---------------------------------------------------------------------


def test_checkout_goes_through_the_mesh_over_mtls(shop: Shop) -> None:
    payments = shop.sidecars["payments"]
    by_checkout = {"client_id": f"{TRUST}/checkout"}
    before = payments.metrics().get("inbound_requests_total", **by_checkout)
    order = {"items": [{"id": 1, "qty": 2}], "card": CARD}
    with client() as http:
        response = http.post(shop.apps["checkout"].url + "/checkout", json=order)
    assert response.status_code == 200, response.text
    assert response.json()["payment_id"].startswith("pay-")
    # Payments' sidecar saw the call come from checkout's certificate, and so did inventory's.
    assert payments.metrics().get("inbound_requests_total", **by_checkout) == before + 1
    inventory = shop.sidecars["inventory"].metrics()
    assert inventory.get("inbound_requests_total", **by_checkout) >= 1
    # The inbound speaks mTLS only: a plain HTTP caller gets nothing from the app.
    with client() as http, pytest.raises(httpx.HTTPError):
        http.get(f"http://{payments.inbound}/payments/x")


def test_app_sees_the_callers_identity_in_xfcc(shop: Shop) -> None:
    with client() as http:
        response = http.get(
            shop.sidecars["checkout"].outbound_url + "/whoami", headers={"host": "payments-v2"}
        )
    assert response.status_code == 200, response.text
    xfcc = response.json()["headers"]["x-forwarded-client-cert"]
    assert f"URI={TRUST}/checkout" in xfcc
    assert f"By={TRUST}/payments-v2" in xfcc


def test_policy_change_applies_within_a_second(shop: Shop) -> None:
    inventory = shop.sidecars["inventory"]
    assert charge(inventory).status_code == 403
    shop.cp.apply(ONLY_CHECKOUT_PAYS + "    - {name: inventory, action: allow, from: [inventory]}")
    try:
        elapsed = time_until(lambda: charge(inventory).status_code == 200, timeout=5)
        print(f"policy change took effect in {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0
        assert charge(shop.sidecars["checkout"]).status_code == 200
    finally:
        shop.cp.apply(ONLY_CHECKOUT_PAYS)
    eventually(lambda: charge(inventory).status_code == 403, timeout=5)


def test_route_change_reaches_every_sidecar_within_a_second(shop: Shop) -> None:
    callers = [shop.sidecars["checkout"], shop.sidecars["inventory"]]

    def served_by_v2(sidecar: SidecarProcess) -> bool:
        with client() as http:
            response = http.get(sidecar.outbound_url + "/v2/charges", headers={"host": "payments"})
        return response.headers.get("x-instance") == "payments-v2"

    assert not any(served_by_v2(s) for s in callers)  # payments' own app answers /v2 today
    shop.cp.apply(ROUTE_V2)
    try:
        start = time.monotonic()
        times = [time_until(lambda s=s: served_by_v2(s), timeout=5) for s in callers]
        elapsed = time.monotonic() - start
        print(f"route change on every sidecar in {elapsed * 1000:.0f} ms ({times})")
        assert elapsed < 1.0
        # Other paths still go to payments itself.
        assert charge(shop.sidecars["checkout"]).status_code == 200
    finally:
        shop.cp.request("DELETE", f"/v1/routes/{NS}/payments-v2")
    eventually(lambda: not any(served_by_v2(s) for s in callers), timeout=5)


def test_status_shows_versions_and_a_refused_filter(shop: Shop) -> None:
    ids = {name: (s.state_dir / "id").read_text().strip() for name, s in shop.sidecars.items()}
    eventually(lambda: all_in_sync(shop.cp, len(ids)), timeout=5)
    table = shop.cp.meshpy("status")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert set(rows) == set(ids.values())
    for name, sidecar_id in ids.items():
        _, service, address, version, in_sync, *_ = rows[sidecar_id]
        assert (service, address, in_sync) == (f"{NS}/{name}", shop.sidecars[name].inbound, "yes")
        assert int(version) == shop.sidecars[name].applied_version()

    version = next(s["version"] for s in status_json(shop.cp) if s["id"] == ids["payments"])
    shop.cp.apply("""
kind: FilterAttachment
metadata: {name: missing, namespace: shop}
spec: {service: payments, filters: [{plugins.no_such_module:Nothing: {}}]}
""")
    try:

        def payments_refused() -> dict:
            record = next(s for s in status_json(shop.cp) if s["id"] == ids["payments"])
            assert not record["in_sync"] and record["error"]
            return record

        record = eventually(payments_refused, timeout=5)
        assert "no_such_module" in record["error"]
        assert record["version"] == version  # the version it still runs
        table = shop.cp.meshpy("status")
        row = next(line.split() for line in table.stdout.splitlines() if ids["payments"] in line)
        assert row[3:5] == [str(version), "ERROR"]
        assert "no_such_module" in table.stderr
        # It keeps serving on the config it had; nobody else was concerned.
        assert charge(shop.sidecars["checkout"]).status_code == 200
        others = [s for s in status_json(shop.cp) if s["id"] != ids["payments"]]
        assert all(s["in_sync"] for s in others)
    finally:
        shop.cp.request("DELETE", f"/v1/filters/{NS}/missing")
    eventually(lambda: all_in_sync(shop.cp, len(ids)), timeout=5)


# --- meshes of their own ------------------------------------------------------------------------


def checkout_and_payments(
    mesh: Mesh, *cp_args: str
) -> tuple[ControlPlaneProcess, SidecarProcess, SidecarProcess]:
    """A control plane started with `cp_args`, the shop's services, and echo apps behind the
    sidecars of checkout and payments once checkout knows payments' endpoint."""
    cp = mesh.control_plane(*cp_args)
    cp.apply(SERVICES)
    with ThreadPoolExecutor(2) as pool:
        caller = pool.submit(mesh.echo, "checkout", "checkout")
        payments = pool.submit(mesh.echo, "payments", "payments-a").result()[1]
        checkout = caller.result()[1]
    eventually(lambda: checkout.endpoints("payments", NS) == [payments.inbound])
    return cp, checkout, payments


def test_discovery_balances_and_forgets_dead_instances(mesh: Mesh) -> None:
    cp = mesh.control_plane("--lease-ttl", "2s")
    # Round robin: p2c_ewma sends a one-at-a-time client to whichever instance answered
    # fastest, which says nothing about discovery.
    cp.apply(SERVICES.replace("spec: {timeout: 2s}", "spec: {timeout: 2s, lb: round_robin}"))
    with ThreadPoolExecutor(3) as pool:
        caller = pool.submit(mesh.echo, "checkout", "checkout")
        instances = [pool.submit(mesh.echo, "payments", f"payments-{n}") for n in "ab"]
        checkout = caller.result()[1]
        a, b = (f.result()[1] for f in instances)
    eventually(lambda: sorted(checkout.endpoints("payments", NS)) == sorted([a.inbound, b.inbound]))

    traffic = Traffic(checkout.outbound_url + "/pay", "payments", pause=0)
    time.sleep(0.5)
    traffic.stop()
    assert not traffic.failures
    assert set(traffic.instances) == {"payments-a", "payments-b"}
    assert min(traffic.instances.values()) >= traffic.ok * 0.4, traffic.instances

    # SIGKILL: nobody says goodbye; the lease (2 s) runs out and the endpoint goes.
    b.kill()
    gone = time_until(lambda: b.inbound not in checkout.endpoints("payments", NS), timeout=6)
    print(f"SIGKILLed sidecar's endpoint removed after {gone:.2f}s (lease 2s)")
    assert checkout.endpoints("payments", NS) == [a.inbound]
    traffic = Traffic(checkout.outbound_url + "/pay", "payments")
    time.sleep(1)
    traffic.stop()
    assert not traffic.failures and traffic.ok > 10
    assert set(traffic.instances) == {"payments-a"}

    # SIGTERM: the sidecar leaves on its way out, long before a lease could run out.
    _, c = mesh.echo("payments", "payments-c")
    eventually(lambda: c.inbound in checkout.endpoints("payments", NS))
    start = time.monotonic()
    assert c.terminate() == 0
    time_until(lambda: c.inbound not in checkout.endpoints("payments", NS), timeout=6)
    gone = time.monotonic() - start
    print(f"SIGTERMed sidecar's endpoint removed {gone:.2f}s after the signal (lease 2s)")
    assert gone < 1.0


def test_traffic_survives_the_control_plane(mesh: Mesh) -> None:
    cp, checkout, _ = checkout_and_payments(mesh)

    traffic = Traffic(checkout.outbound_url + "/pay", "payments")
    cp.kill()
    time.sleep(3)
    traffic.stop()
    assert not traffic.failures, traffic.failures[:5]
    assert traffic.ok > 50

    # A sidecar restarted meanwhile comes up on its saved config and certificate.
    checkout.terminate()
    checkout.start()
    assert "serving the saved config" in checkout.stderr()
    with client() as http:
        response = http.get(checkout.outbound_url + "/pay", headers={"host": "payments"})
    assert response.status_code == 200, response.text

    # Back on the same port and data: the sidecars reconnect and take new changes again.
    cp.start()
    eventually(lambda: all_in_sync(cp, 2), timeout=15)
    cp.apply("""
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec:
  service: payments
  rules:
    - {name: inventory-only, action: allow, from: [inventory]}
""")

    def denied() -> bool:
        with client() as http:
            return (
                http.get(checkout.outbound_url + "/pay", headers={"host": "payments"}).status_code
                == 403
            )

    eventually(denied, timeout=5)
    eventually(lambda: all_in_sync(cp, 2), timeout=5)


def test_certificates_are_renewed_without_dropping_requests(mesh: Mesh) -> None:
    _, checkout, payments = checkout_and_payments(mesh, "--cert-ttl", "3s")

    first = payments.cert_serial()
    serials: dict[str, set[int]] = {"checkout": set(), "payments": set()}
    traffic = Traffic(checkout.outbound_url + "/pay", "payments")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        serials["checkout"].add(checkout.cert_serial())
        serials["payments"].add(payments.cert_serial())
        time.sleep(0.1)
    traffic.stop()
    print({name: len(found) for name, found in serials.items()}, "certificates seen in 5 s")
    assert len(serials["checkout"]) >= 2 and len(serials["payments"]) >= 2
    # New handshakes get the renewed certificate (the first one has expired by now).
    eventually(lambda: payments.served_serial(checkout) == payments.cert_serial())
    assert payments.cert_serial() != first
    assert not traffic.failures, traffic.failures[:5]
    assert traffic.ok > 100
