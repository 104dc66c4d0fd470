"""The demo shop (meshpy.shop): four services on real sockets, first wired straight to each
other through ``peers``, then through a real ``meshpy proxy`` outbound listener."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import client, cluster, config, http_listener

from meshpy.shop import DEPENDENCIES, SERVICES, ShopServer, start_service

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"
MUG = 6  # the catalog's one item with little stock (3)


def url(server: ShopServer, path: str = "") -> str:
    return f"http://{server.address}{path}"


def stock(shop: dict[str, ShopServer], item_id: int) -> int:
    return httpx.get(url(shop["inventory"], f"/items/{item_id}")).json()["stock"]


def start_shop(outbound: str | None = None) -> dict[str, ShopServer]:
    """All four services; leaves first, so each one's dependencies have addresses."""
    shop: dict[str, ShopServer] = {}
    for name in ("inventory", "payments", "checkout", "frontend"):
        peers = {dep: shop[dep].address for dep in DEPENDENCIES[name]}
        shop[name] = start_service(name, outbound=outbound, peers=None if outbound else peers)
    return shop


@pytest.fixture
def shop() -> Iterator[dict[str, ShopServer]]:
    servers = start_shop()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def frontend(shop: dict[str, ShopServer]) -> Iterator[httpx.Client]:
    with client(base_url=url(shop["frontend"])) as c:
        yield c


def test_every_service_answers_health(shop: dict[str, ShopServer]) -> None:
    assert set(shop) == set(SERVICES)
    for name, server in shop.items():
        assert server.name == name
        r = httpx.get(url(server, "/health"))
        assert (r.status_code, r.text.strip()) == (200, "ok")


def test_browse(frontend: httpx.Client) -> None:
    index = frontend.get("/").json()
    assert {p["id"] for p in index["products"]} >= {1, MUG}
    assert any("checkout" in hint for hint in index["try"])

    product = frontend.get("/products/2").json()
    assert set(product) == {"id", "name", "price_cents", "stock"}

    missing = frontend.get("/products/999")
    assert missing.status_code == 404
    assert "999" in missing.json()["error"]
    assert frontend.get("/no/such/page").status_code == 404
    assert frontend.delete("/").json()["error"]


def test_checkout_end_to_end(shop: dict[str, ShopServer], frontend: httpx.Client) -> None:
    before = stock(shop, 1), stock(shop, 3)
    assert frontend.post("/cart/alice/items", json={"id": 1, "qty": 2}).status_code == 200
    cart = frontend.post("/cart/alice/items", json={"id": 3}).json()  # qty defaults to 1
    assert [(line["id"], line["qty"]) for line in cart["items"]] == [(1, 2), (3, 1)]
    assert frontend.get("/cart/alice").json() == cart

    r = frontend.post("/cart/alice/checkout", json={"card": GOOD_CARD})
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert receipt["total_cents"] == cart["total_cents"] > 0
    assert receipt["order_id"] and receipt["payment_id"].startswith("pay-")
    assert (stock(shop, 1), stock(shop, 3)) == (before[0] - 2, before[1] - 1)
    assert frontend.get("/cart/alice").json()["items"] == []  # emptied by the order

    payment = httpx.get(url(shop["payments"], f"/payments/{receipt['payment_id']}")).json()
    assert payment["amount_cents"] == receipt["total_cents"]
    assert payment["order_id"] == receipt["order_id"]


def test_request_id_follows_the_checkout(
    shop: dict[str, ShopServer], frontend: httpx.Client
) -> None:
    frontend.post("/cart/bob/items", json={"id": 4, "qty": 1})
    r = frontend.post(
        "/cart/bob/checkout", json={"card": GOOD_CARD}, headers={"x-request-id": "req-42"}
    )
    assert r.headers["x-request-id"] == "req-42"
    receipt = r.json()
    # frontend -> checkout -> payments, and frontend -> checkout -> inventory
    payment = httpx.get(url(shop["payments"], f"/payments/{receipt['payment_id']}")).json()
    reservation = httpx.get(
        url(shop["inventory"], f"/reservations/{receipt['reservation_id']}")
    ).json()
    assert payment["request_id"] == reservation["request_id"] == "req-42"

    # Without one, the first service makes one up and passes that along.
    frontend.post("/cart/bob/items", json={"id": 4, "qty": 1})
    r = frontend.post("/cart/bob/checkout", json={"card": GOOD_CARD})
    generated = r.headers["x-request-id"]
    payment = httpx.get(url(shop["payments"], f"/payments/{r.json()['payment_id']}")).json()
    assert generated and payment["request_id"] == generated


def test_declined_card_is_402_and_puts_stock_back(
    shop: dict[str, ShopServer], frontend: httpx.Client
) -> None:
    before = stock(shop, 2)
    frontend.post("/cart/carol/items", json={"id": 2, "qty": 3})
    r = frontend.post("/cart/carol/checkout", json={"card": DECLINED_CARD})
    assert r.status_code == 402
    assert "declined" in r.json()["error"]
    assert stock(shop, 2) == before  # the reservation was released
    # The cart survives a decline, so another card can pay for it.
    r = frontend.post("/cart/carol/checkout", json={"card": GOOD_CARD})
    assert r.status_code == 200
    assert stock(shop, 2) == before - 3


def test_out_of_stock_is_409(shop: dict[str, ShopServer], frontend: httpx.Client) -> None:
    frontend.post("/cart/dave/items", json={"id": MUG, "qty": 4})
    r = frontend.post("/cart/dave/checkout", json={"card": GOOD_CARD})
    assert r.status_code == 409
    assert "out of stock" in r.json()["error"] and "3 left" in r.json()["error"]
    assert stock(shop, MUG) == 3  # all or nothing


def test_reservations_are_thread_safe(shop: dict[str, ShopServer]) -> None:
    order = {"items": [{"id": MUG, "qty": 1}], "card": GOOD_CARD}
    with ThreadPoolExecutor(12) as pool:
        statuses = list(
            pool.map(
                lambda _: httpx.post(url(shop["checkout"], "/checkout"), json=order).status_code,
                range(12),
            )
        )
    assert sorted(statuses) == [200] * 3 + [409] * 9
    assert stock(shop, MUG) == 0


def test_payments_down_is_502_naming_payments(
    shop: dict[str, ShopServer], frontend: httpx.Client
) -> None:
    order = {"items": [{"id": 1, "qty": 1}], "card": GOOD_CARD}
    # A warm keep-alive connection from checkout to payments, cut by stop().
    assert httpx.post(url(shop["checkout"], "/checkout"), json=order).status_code == 200
    shop["payments"].stop()

    r = httpx.post(url(shop["checkout"], "/checkout"), json=order)
    assert r.status_code == 502
    assert "payments" in r.json()["error"]

    frontend.post("/cart/erin/items", json={"id": 1, "qty": 1})
    r = frontend.post("/cart/erin/checkout", json={"card": GOOD_CARD})
    assert r.status_code == 502
    assert "checkout" in r.json()["error"] and "payments" in r.json()["error"]


@pytest.mark.parametrize(
    ("service", "path"),
    [
        ("frontend", "/cart/x/items"),
        ("frontend", "/cart/x/checkout"),
        ("checkout", "/checkout"),
        ("payments", "/charge"),
        ("inventory", "/reserve"),
    ],
)
def test_malformed_json_is_400(shop: dict[str, ShopServer], service: str, path: str) -> None:
    r = httpx.post(url(shop[service], path), content=b'{"items": [')
    assert r.status_code == 400
    assert "invalid JSON" in r.json()["error"]


@pytest.mark.parametrize(
    ("service", "path", "body", "field"),
    [
        ("frontend", "/cart/x/items", {"id": 1, "qty": "two"}, "qty"),
        ("checkout", "/checkout", {"items": [], "card": GOOD_CARD}, "items"),
        ("checkout", "/checkout", {"items": [{"id": 1, "qty": 1}]}, "card"),
        ("payments", "/charge", {"order_id": "o", "amount_cents": 5, "card": "12ab"}, "card"),
        (
            "payments",
            "/charge",
            {"order_id": "o", "amount_cents": True, "card": GOOD_CARD},
            "amount",
        ),
        ("inventory", "/reserve", {"items": [{"id": 999, "qty": 1}]}, "999"),
    ],
)
def test_invalid_fields_are_400(
    shop: dict[str, ShopServer], service: str, path: str, body: dict, field: str
) -> None:
    r = httpx.post(url(shop[service], path), json=body)
    assert r.status_code == 400
    assert field in r.json()["error"]


def test_start_service_needs_an_address_for_each_dependency() -> None:
    with pytest.raises(ValueError, match="payments"):
        start_service("checkout", peers={"inventory": "127.0.0.1:1"})
    with pytest.raises(ValueError, match="unknown service"):
        start_service("shipping")


def test_runs_as_a_module_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpy.shop", "payments", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "payments listening on" in line, line
        address = line.split()[-1]
        assert httpx.get(f"http://{address}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_through_a_sidecar_outbound_listener(run_proxy) -> None:
    """checkout and frontend call out only via the proxy, which routes on the Host header."""
    servers = {name: start_service(name) for name in ("inventory", "payments")}

    def sidecar_config() -> dict:
        routes = [{"match": {"host": n}, "cluster": n, "timeout": "5s"} for n in servers]
        clusters = [cluster(n, [server.address]) for n, server in servers.items()]
        return config([http_listener(routes, name="outbound")], clusters)

    proxy = run_proxy(sidecar_config())
    host, port = proxy.addr("outbound")
    outbound = f"{host}:{port}"
    # checkout needs the sidecar's address and the sidecar checkout's: a live reload ties them.
    servers["checkout"] = start_service("checkout", outbound=outbound)
    proxy.reload(sidecar_config())
    servers["frontend"] = start_service("frontend", outbound=outbound)
    try:
        with client(base_url=url(servers["frontend"])) as frontend:
            assert frontend.get("/").json()["products"]
            frontend.post("/cart/s/items", json={"id": 5, "qty": 1})
            r = frontend.post(
                "/cart/s/checkout", json={"card": GOOD_CARD}, headers={"x-request-id": "mesh-1"}
            )
            assert r.status_code == 200, r.text
            payment_id = r.json()["payment_id"]
            payment = httpx.get(url(servers["payments"], f"/payments/{payment_id}")).json()
            assert payment["request_id"] == "mesh-1"

            servers["payments"].stop()
            frontend.post("/cart/s/items", json={"id": 5, "qty": 1})
            r = frontend.post("/cart/s/checkout", json={"card": GOOD_CARD})
            assert r.status_code == 502  # the sidecar's 503 for payments, told as a 502
            assert "payments" in r.json()["error"]
    finally:
        for server in servers.values():
            server.stop()
