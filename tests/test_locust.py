# ruff: noqa: E501 -- the samples below are /metrics lines exactly as a sidecar wrote them
"""`python -m bench.locust_run`: locust against `meshpy demo`, and the mesh's view of the run.

The helpers that turn two /metrics scrapes into that view are checked on text captured from
the demo's sidecars (no locust needed); the end-to-end run needs locust (`pip install
meshpy[load]`), which the test extras leave out, and is skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `bench` is a top-level package of the repo, not installed

from bench.locust_run import (  # noqa: E402
    histogram_quantile,
    locust_percentile,
    metrics_delta,
    parse_metrics,
    short_identity,
    sidecar_view,
    sum_by,
)

RUN_TIMEOUT = 40.0

# Captured from `meshpy demo`: payments' sidecar after one checkout (before), then after three
# more checkouts, a declined card (402) and a call from the ingress that its policy refused.
PAYMENTS_BEFORE = """\
# HELP request_total HTTP requests received, by route.
# TYPE request_total counter
request_total{listener="inbound",route="app",cluster="app"} 1
# HELP response_total HTTP responses sent, by route and status code.
# TYPE response_total counter
response_total{listener="inbound",route="app",cluster="app",status_code="200",classification="success"} 1
# HELP response_latency_ms Time from receiving a request to sending the response headers, in milliseconds.
# TYPE response_latency_ms histogram
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="1"} 0
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="2"} 0
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="3"} 0
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="4"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="5"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="10"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="20"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="30"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="40"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="50"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="100"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="200"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="300"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="400"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="500"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="1000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="2000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="3000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="4000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="5000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="10000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="20000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="30000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="40000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="50000"} 1
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="+Inf"} 1
response_latency_ms_sum{listener="inbound",route="app",cluster="app"} 4.543
response_latency_ms_count{listener="inbound",route="app",cluster="app"} 1
# HELP inbound_requests_total HTTP requests on mTLS listeners, by the caller's SPIFFE ID.
# TYPE inbound_requests_total counter
inbound_requests_total{listener="inbound",client_id="spiffe://mesh.local/ns/shop/sa/checkout"} 1
# HELP authz_deny_total Requests denied by an authorization rule or the default action.
# TYPE authz_deny_total counter
authz_deny_total{listener="inbound",rule="default"} 0
authz_deny_total{listener="inbound",rule="payments.checkout"} 0
"""

PAYMENTS_AFTER = """\
# HELP request_total HTTP requests received, by route.
# TYPE request_total counter
request_total{listener="inbound",route="app",cluster="app"} 5
# HELP response_total HTTP responses sent, by route and status code.
# TYPE response_total counter
response_total{listener="inbound",route="app",cluster="app",status_code="200",classification="success"} 4
response_total{listener="inbound",route="app",cluster="app",status_code="402",classification="success"} 1
# HELP response_latency_ms Time from receiving a request to sending the response headers, in milliseconds.
# TYPE response_latency_ms histogram
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="1"} 4
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="2"} 4
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="3"} 4
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="4"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="5"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="10"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="20"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="30"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="40"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="50"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="100"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="200"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="300"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="400"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="500"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="1000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="2000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="3000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="4000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="5000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="10000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="20000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="30000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="40000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="50000"} 5
response_latency_ms_bucket{listener="inbound",route="app",cluster="app",le="+Inf"} 5
response_latency_ms_sum{listener="inbound",route="app",cluster="app"} 8.835
response_latency_ms_count{listener="inbound",route="app",cluster="app"} 5
# HELP inbound_requests_total HTTP requests on mTLS listeners, by the caller's SPIFFE ID.
# TYPE inbound_requests_total counter
inbound_requests_total{listener="inbound",client_id="spiffe://mesh.local/ns/shop/sa/checkout"} 5
inbound_requests_total{listener="inbound",client_id="spiffe://mesh.local/ns/shop/sa/ingress"} 1
# HELP authz_deny_total Requests denied by an authorization rule or the default action.
# TYPE authz_deny_total counter
authz_deny_total{listener="inbound",rule="default"} 1
authz_deny_total{listener="inbound",rule="payments.checkout"} 0
"""

CHECKOUT_OUTBOUND = """\
# HELP request_total HTTP requests received, by route.
# TYPE request_total counter
request_total{listener="outbound",route="service/shop/checkout/checkout",cluster="checkout.shop"} 0
request_total{listener="outbound",route="service/shop/inventory/inventory",cluster="inventory.shop"} 6
request_total{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop"} 5
# HELP response_total HTTP responses sent, by route and status code.
# TYPE response_total counter
response_total{listener="outbound",route="service/shop/inventory/inventory",cluster="inventory.shop",status_code="200",classification="success"} 6
response_total{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",status_code="200",classification="success"} 4
response_total{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",status_code="402",classification="success"} 1
# HELP response_latency_ms Time from receiving a request to sending the response headers, in milliseconds.
# TYPE response_latency_ms histogram
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="1"} 1
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="2"} 3
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="3"} 3
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="4"} 3
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="5"} 4
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="10"} 4
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="20"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="30"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="40"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="50"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="100"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="200"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="300"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="400"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="500"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="1000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="2000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="3000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="4000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="5000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="10000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="20000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="30000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="40000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="50000"} 5
response_latency_ms_bucket{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop",le="+Inf"} 5
response_latency_ms_sum{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop"} 28.734
response_latency_ms_count{listener="outbound",route="service/shop/payments/payments",cluster="payments.shop"} 5
"""


def test_parse_metrics_keys_samples_by_name_and_sorted_labels() -> None:
    metrics = parse_metrics(PAYMENTS_AFTER)
    key = (
        "inbound_requests_total",
        (("client_id", "spiffe://mesh.local/ns/shop/sa/ingress"), ("listener", "inbound")),
    )
    assert metrics[key] == 1
    assert (
        metrics[
            (
                "response_latency_ms_sum",
                (("cluster", "app"), ("listener", "inbound"), ("route", "app")),
            )
        ]
        == 8.835
    )
    assert not [name for name, _ in metrics if name.startswith("#")]


def test_delta_and_sum_by_count_only_what_happened_between_scrapes() -> None:
    delta = metrics_delta(parse_metrics(PAYMENTS_BEFORE), parse_metrics(PAYMENTS_AFTER))
    assert sum_by(delta, "response_total", "status_code", listener="inbound") == {
        "200": 3,
        "402": 1,
    }
    # A series that first appeared after the first scrape counts from zero.
    callers = sum_by(delta, "inbound_requests_total", "client_id", listener="inbound")
    assert callers == {
        "spiffe://mesh.local/ns/shop/sa/checkout": 4,
        "spiffe://mesh.local/ns/shop/sa/ingress": 1,
    }
    assert sum_by(delta, "request_total", "listener", listener="outbound") == {}


def test_histogram_quantile_interpolates_within_a_bucket() -> None:
    buckets = {"1": 1, "2": 3, "5": 4, "20": 5, "+Inf": 5}
    assert histogram_quantile(0.5, buckets) == pytest.approx(1.75)  # rank 2.5 of (1, 2]
    assert histogram_quantile(0.99, buckets) == pytest.approx(5 + 15 * 0.95)
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.5)  # the first bucket from 0
    # Beyond the last finite bound the histogram says only "more than 20".
    assert histogram_quantile(0.99, {"10": 1, "20": 2, "+Inf": 10}) == 20
    assert histogram_quantile(0.5, {"1": 0, "+Inf": 0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_sidecar_view_of_payments_inbound() -> None:
    view = sidecar_view(parse_metrics(PAYMENTS_BEFORE), parse_metrics(PAYMENTS_AFTER))
    assert view.inbound.requests == 4  # routed to the app; the refused call never was
    assert view.inbound.statuses == {"2xx": 3, "4xx": 1}
    assert view.callers == {"shop/checkout": 4, "shop/ingress": 1}
    assert view.denied == 1
    # All four new requests took at most 1 ms: interpolated within (0, 1].
    assert view.inbound.p50_ms == pytest.approx(0.5)
    assert view.inbound.p99_ms == pytest.approx(0.99)
    assert view.outbound == {}


def test_sidecar_view_of_checkout_outbound_per_cluster() -> None:
    # A sidecar first scraped after the run: every counter counts from zero.
    view = sidecar_view({}, parse_metrics(CHECKOUT_OUTBOUND))
    assert set(view.outbound) == {"inventory.shop", "payments.shop"}  # clusters with traffic
    payments = view.outbound["payments.shop"]
    assert (payments.requests, payments.statuses) == (5, {"2xx": 4, "4xx": 1})
    assert payments.p50_ms == pytest.approx(1.75)
    assert payments.p99_ms == pytest.approx(19.5)
    inventory = view.outbound["inventory.shop"]
    assert (inventory.requests, inventory.statuses) == (6, {"2xx": 6})
    assert inventory.p50_ms is None  # no latency series in the sample
    assert view.inbound.requests == 0 and view.callers == {}


def test_short_identity_and_locust_percentile() -> None:
    assert short_identity("spiffe://mesh.local/ns/shop/sa/frontend") == "shop/frontend"
    assert short_identity("") == "(plaintext)"
    times = {5: 50, 8: 45, 100: 4, 300: 1}  # locust's rounded ms -> count
    assert [locust_percentile(times, q) for q in (0.5, 0.95, 0.99)] == [8, 100, 300]
    assert math.isnan(locust_percentile({}, 0.5))


def _free_port() -> int:
    """A port free now, below the ephemeral range, so that no outgoing connection takes it
    before the demo's ingress binds it."""
    while True:
        port = random.randrange(20000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (pip install 'meshpy[load]'); it is not a test dependency",
)
def test_locust_run_against_the_demo(tmp_path: Path) -> None:
    # locust runs in its own process: importing it here would let gevent patch this one.
    users = 10
    report = tmp_path / "report.json"
    argv = [sys.executable, "-m", "bench.locust_run", "--demo", "--users", str(users),
            "--spawn-rate", "10", "--time", "5s", "--port", str(_free_port()),
            "--json", str(report)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the mesh's view" in done.stdout

    result = json.loads(report.read_text())
    total = result["locust"]["endpoints"][-1]
    assert total["name"] == "Aggregated"
    assert total["requests"] > 0
    # Declined cards (402) and the sold-out mug (409) are answers the locustfile expects.
    assert total["failures"] == 0, result["locust"]["error_report"]

    mesh = result["mesh"]
    assert set(mesh) == {"frontend", "checkout", "payments", "inventory"}
    for name, view in mesh.items():
        assert view["inbound"]["requests"] > 0, name
        assert view["denied"] == 0, name
        assert "5xx" not in view["inbound"]["statuses"], name
    # Each hop is called by exactly the identities shop_mesh.yaml's policies allow.
    assert set(mesh["frontend"]["callers"]) == {"shop/ingress"}
    assert set(mesh["checkout"]["callers"]) == {"shop/frontend"}
    assert set(mesh["payments"]["callers"]) == {"shop/checkout"}
    assert set(mesh["inventory"]["callers"]) <= {"shop/frontend", "shop/checkout"}
    assert "shop/frontend" in mesh["inventory"]["callers"]
    assert set(mesh["frontend"]["outbound"]) == {"inventory.shop", "checkout.shop"}
    # Every request locust counted went through the frontend's sidecar; at most one per user
    # more, cut off in flight when the run ended.
    frontend_in = mesh["frontend"]["inbound"]["requests"]
    assert total["requests"] <= frontend_in <= total["requests"] + users
