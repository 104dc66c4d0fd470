"""Load balancing: round_robin, least_request and p2c_ewma (the default)."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

from helpers import client, simple_config


def spread(url: str, n: int, concurrency: int = 1, order: list | None = None) -> Counter:
    """Send ``n`` GETs with ``concurrency`` keep-alive clients; count the answering upstream."""
    counts: Counter = Counter()
    order = order if order is not None else []
    lock = threading.Lock()
    remaining = iter(range(n))

    def worker() -> None:
        with client() as c:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                r = c.get(url)
                assert r.status_code == 200, r.text
                with lock:
                    counts[r.headers["x-upstream"]] += 1
                    order.append(r.headers["x-upstream"])

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts.values()) == n, counts
    return counts


def test_round_robin_spreads_evenly(run_proxy, upstreams):
    servers = upstreams.many("a", "b", "c")
    proxy = run_proxy(simple_config([s.addr for s in servers], cluster_extra={"lb": "round_robin"}))
    order: list[str] = []
    counts = spread(proxy.url() + "/rr", 60, order=order)
    assert set(counts) == {"a", "b", "c"}
    for name in ("a", "b", "c"):
        assert 17 <= counts[name] <= 23, counts
    # a rotation rarely hits the same endpoint twice in a row (random picks: ~20 of 59 times)
    repeats = sum(1 for x, y in itertools.pairwise(order) if x == y)
    assert repeats <= 6, order


def test_least_request_avoids_the_busy_endpoint(run_proxy, upstreams):
    a, b = upstreams.many("a", "b")
    slow = upstreams.get("slow", delay_ms=300)
    proxy = run_proxy(
        simple_config([a.addr, b.addr, slow.addr], cluster_extra={"lb": "least_request"})
    )
    counts = spread(proxy.url() + "/lr", 120, concurrency=4)
    # round robin would give the slow endpoint a third (40); least-request keeps requests
    # queued on it, so new ones go to the idle fast endpoints
    assert counts["slow"] <= 24, counts
    assert counts["a"] > 0 and counts["b"] > 0, counts


def test_p2c_ewma_default_prefers_the_fast_endpoint(run_proxy, upstreams):
    fast = upstreams.get("a")
    slow = upstreams.get("slow200", delay_ms=200)
    proxy = run_proxy(simple_config([fast.addr, slow.addr]))  # lb omitted: p2c_ewma
    counts = spread(proxy.url() + "/ewma", 50)
    # a latency-blind balancer would send ~25 to the slow endpoint
    assert counts["a"] >= 40, counts


def test_p2c_ewma_explicit(run_proxy, upstreams):
    fast = upstreams.get("a")
    slow = upstreams.get("slow200", delay_ms=200)
    proxy = run_proxy(simple_config([slow.addr, fast.addr], cluster_extra={"lb": "p2c_ewma"}))
    counts = spread(proxy.url() + "/ewma", 50)
    assert counts["a"] >= 40, counts
