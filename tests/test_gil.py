"""The data plane forwards while Python holds the GIL.

The proxy runs in this process (``meshpy._core.Proxy``); the upstream (hypercorn) and the
client (curl) are other processes.  The main thread then holds the GIL in one long C call
(a catastrophically backtracking regex: CPython's ``re`` never releases the GIL) while curl
makes requests through the in-process proxy.  They must all complete before the C call
returns.  A helper thread proves the GIL really was held: it cannot run during the call.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest
from helpers import client, simple_config, wait_for

core = pytest.importorskip("meshpy._core")
from meshpy.config import parse_config  # noqa: E402

PATTERN = re.compile(r"(a+)+$")


def calibrate(seconds: float) -> str:
    """A subject string on which PATTERN.match takes roughly ``seconds`` (doubling per 'a')."""
    n = 16
    while True:
        t0 = time.perf_counter()
        PATTERN.match("a" * n + "b")
        took = time.perf_counter() - t0
        if took > 0.05:
            break
        n += 1
    while took < seconds:
        n += 1
        took *= 2
    return "a" * n + "b"


def test_forwarding_needs_no_gil(upstream):
    cfg = simple_config([upstream.addr])
    proxy = core.Proxy(parse_config(cfg).to_core_json(), core.FilterQueue(), workers=2)
    try:
        addrs = proxy.addresses()
        url = f"http://{addrs['edge']}"
        with client() as c:
            wait_for(lambda: c.get(f"http://{addrs['admin']}/ready").status_code == 200, 10)
            assert c.get(url + "/warm").status_code == 200

        subject = calibrate(4.0)
        n_requests = 20
        # curl waits a moment (so the GIL is surely taken), then makes the requests and
        # stamps the wall-clock time it finished
        script = (
            "sleep 0.5; "
            "curl -sS --noproxy '*' --max-time 10 -w '%{http_code}\\n' "
            + " ".join(f"-o /dev/null '{url}/nogil/{i}'" for i in range(n_requests))
            + "; date +%s.%N"
        )
        heartbeat = {"max_gap": 0.0, "stop": False}

        def beat() -> None:
            last = time.monotonic()
            while not heartbeat["stop"]:
                now = time.monotonic()
                heartbeat["max_gap"] = max(heartbeat["max_gap"], now - last)
                last = now
                time.sleep(0.001)

        beater = threading.Thread(target=beat)
        beater.start()
        curl = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        PATTERN.match(subject)  # holds the GIL for ~4 s
        held = time.monotonic() - t0
        held_until = time.time()
        heartbeat["stop"] = True
        beater.join()
        out, _ = curl.communicate(timeout=30)
        *codes, finished = out.split()

        assert heartbeat["max_gap"] > 0.9 * held, "premise: the GIL was not actually held"
        assert codes == ["200"] * n_requests
        assert float(finished) < held_until, (
            f"curl finished {float(finished) - held_until:.2f}s after the GIL was released"
            f" (held {held:.1f}s): forwarding waited for the GIL"
        )
        # the requests really went through the proxy to the upstream
        paths = upstream.stats()["paths"]
        assert all(f"/nogil/{i}" in paths for i in range(n_requests))
    finally:
        proxy.shutdown(1.0)


def test_in_process_proxy_reload_and_version(upstreams):
    a, b = upstreams.many("a", "b")
    proxy = core.Proxy(
        parse_config(simple_config([a.addr])).to_core_json(), core.FilterQueue(), workers=2
    )
    try:
        url = f"http://{proxy.addresses()['edge']}"
        v1 = proxy.version
        with client() as c:
            assert c.get(url + "/x").headers["x-upstream"] == "a"
            v2 = proxy.reload(parse_config(simple_config([b.addr])).to_core_json())
            assert v2 == v1 + 1 == proxy.version
            assert c.get(url + "/x").headers["x-upstream"] == "b"
            cfg = json.loads(c.get(f"http://{proxy.addresses()['admin']}/config").text)
            assert cfg["version"] == v2
    finally:
        proxy.shutdown(1.0)
    assert not proxy.is_running()
