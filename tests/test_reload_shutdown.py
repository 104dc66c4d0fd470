"""Hot reload (file watch and SIGHUP) and graceful shutdown (SIGTERM drain)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import (
    client,
    cluster,
    config,
    connect,
    eventually,
    http_listener,
    read_response,
    wait_for,
)

import meshpy


def routed_to(target: str, clusters: dict[str, str]) -> dict:
    """One listener ``edge`` whose catch-all route ``main`` goes to cluster ``target``."""
    route = {"name": "main", "match": {"path_prefix": "/"}, "cluster": target}
    return config(
        [http_listener([route])], [cluster(name, [addr]) for name, addr in clusters.items()]
    )


def served_by(proxy, path: str = "/probe") -> str:
    with client(timeout=5) as c:
        r = c.get(proxy.url() + path)
    assert r.status_code == 200, r.text
    return r.headers["x-upstream"]


@pytest.fixture
def ab(upstreams):
    a, b = upstreams.many("a", "b")
    return a, b, {"ca": a.addr, "cb": b.addr}


def test_file_change_reroutes_new_requests(run_proxy, ab):
    _, _, clusters = ab
    proxy = run_proxy(routed_to("ca", clusters))
    assert served_by(proxy) == "a"
    version = proxy.config_version()
    addr = proxy.addr()
    proxy.write_config(routed_to("cb", clusters))  # no signal: the file watch picks it up

    def switched():
        assert served_by(proxy) == "b"

    eventually(switched, timeout=3)
    assert proxy.config_version() == version + 1
    assert proxy.addr() == addr


def test_sighup_reloads(run_proxy, ab):
    _, _, clusters = ab
    proxy = run_proxy(routed_to("ca", clusters))
    success = proxy.metrics().get("config_reload_total", result="success")

    # SIGHUP with an unchanged file still performs a reload (only the signal can cause it)
    proxy.signal(signal.SIGHUP)

    def reloaded():
        assert proxy.metrics().get("config_reload_total", result="success") == success + 1

    eventually(reloaded, timeout=3)
    assert served_by(proxy) == "a"

    proxy.reload(routed_to("cb", clusters), sighup=True)
    assert served_by(proxy) == "b"


def python_thread_wakeups(pid: int) -> int:
    """Times the sidecar's threads other than the data-plane workers went to sleep and woke."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().startswith("meshpy-worker"):
            continue
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def test_an_idle_sidecar_without_filters_lets_its_core_sleep(run_proxy, ab):
    """Its Python side wakes only to look at the config file, twice a second (signals and
    the mesh agent's calls wake it when they come)."""
    _, _, clusters = ab
    proxy = run_proxy(routed_to("ca", clusters))
    time.sleep(0.5)  # past start-up
    before = python_thread_wakeups(proxy.pid)
    time.sleep(2)
    assert python_thread_wakeups(proxy.pid) - before <= 12


def test_calls_and_signals_wake_the_sleeping_sidecar_loop(tmp_path, ab, monkeypatch):
    """The loop sleeps until its next timed job; made an hour away here, a call handed to
    it and then a SIGTERM are still acted on, since they wake it (left to the timed look,
    the call times out, or run() hangs until pytest-timeout fails the test)."""
    from meshpy import proxy as proxy_module
    from meshpy.proxy import Sidecar

    _, _, clusters = ab
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(routed_to("ca", clusters), sort_keys=False))
    monkeypatch.setattr(proxy_module, "_POLL_INTERVAL", 3600.0)
    sidecar = Sidecar(path)
    version = sidecar.version
    answers: list[int] = []

    def drive() -> None:
        try:
            sidecar.call_in_loop(lambda: None).result(timeout=30)  # the loop has started
            time.sleep(0.2)  # and is asleep
            answers.append(sidecar.call_in_loop(lambda: sidecar.version).result(timeout=30))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    assert sidecar.run(drain_timeout=1) == 0
    driver.join(5)
    assert answers == [version]


INVALID = {
    "yaml-syntax": "listeners: [ {name: edge, listen: \n  - oops: [\n",
    "schema": "bad-lb",
    "unknown-cluster": "missing-cluster",
}


@pytest.mark.parametrize("kind", list(INVALID))
def test_invalid_file_keeps_old_config(run_proxy, ab, kind):
    _, _, clusters = ab
    good = routed_to("ca", clusters)
    proxy = run_proxy(good)
    version = proxy.config_version()
    failures = proxy.metrics().get("config_reload_total", result="failure")

    if kind == "schema":
        bad = routed_to("ca", clusters)
        bad["clusters"][0]["lb"] = "bogus_lb"
        proxy.write_raw_config(yaml.safe_dump(bad))
    elif kind == "unknown-cluster":
        proxy.write_raw_config(yaml.safe_dump(routed_to("nope", clusters)))
    else:
        proxy.write_raw_config(INVALID[kind])

    def rejected():
        assert proxy.metrics().get("config_reload_total", result="failure") >= failures + 1

    eventually(rejected, timeout=3)
    assert proxy.config_version() == version
    assert [served_by(proxy, f"/still/{i}") for i in range(5)] == ["a"] * 5
    assert proxy.proc.poll() is None

    # and a good file afterwards is picked up again
    proxy.write_config(routed_to("cb", clusters))

    def recovered():
        assert served_by(proxy) == "b"

    eventually(recovered, timeout=3)


def reload_counts(proxy) -> tuple[int, float, float]:
    metrics = proxy.metrics()
    return (
        proxy.config_version(),
        metrics.get("config_reload_total", result="success"),
        metrics.get("config_reload_total", result="failure"),
    )


def test_a_rewrite_with_equal_bytes_is_not_a_reload(run_proxy, ab):
    """Tools that rewrite every file they manage (config management, a k8s ConfigMap
    resync) change its mtime and inode; the sidecar reloads on content, not on those."""
    _, _, clusters = ab
    proxy = run_proxy(routed_to("ca", clusters))
    before = reload_counts(proxy)
    proxy.write_config(routed_to("ca", clusters))  # new inode and mtime, the same bytes
    time.sleep(1.5)  # three looks at the file
    assert reload_counts(proxy) == before

    proxy.write_config(routed_to("cb", clusters))  # and different bytes are
    eventually(lambda: served_by(proxy) == "b", timeout=3)
    assert reload_counts(proxy) == (before[0] + 1, before[1] + 1, before[2])


def test_a_rejected_file_is_not_retried_until_it_changes(run_proxy, ab):
    _, _, clusters = ab
    proxy = run_proxy(routed_to("ca", clusters))
    version, success, failure = reload_counts(proxy)
    proxy.write_raw_config(INVALID["yaml-syntax"])
    eventually(lambda: reload_counts(proxy)[2] == failure + 1, timeout=3)
    os.utime(proxy.config_path)  # touched: its mtime moves, its bytes do not
    time.sleep(0.6)  # a look at the file in between, so the touch and the rewrite are two
    proxy.write_raw_config(INVALID["yaml-syntax"])  # rewritten with the same bytes
    time.sleep(1.5)
    assert reload_counts(proxy) == (version, success, failure + 1)
    assert served_by(proxy) == "a"


# Who imports each OpenSSL binding: the innermost frame outside the import machinery.
_OPENSSL_IMPORTERS = """
import json, sys, traceback
importers = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("hashlib", "_hashlib", "hmac", "ssl", "_ssl"):
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")]
            importers.append([name, frames[-1].filename])
sys.meta_path.insert(0, Watch())
import meshpy.cli, meshpy.proxy
print(json.dumps(importers))
"""


def test_the_sidecar_modules_import_no_openssl_of_their_own():
    """OpenSSL's libcrypto is 3.4 MB resident in a process that maps it, and the data plane's
    TLS is rustls, so meshpy's own modules must not bring it in (hashlib, hmac, ssl). What a
    dependency imports is its own cost: pydantic 2.14 imports hmac through secrets."""
    done = subprocess.run(
        [sys.executable, "-c", _OPENSSL_IMPORTERS], capture_output=True, text=True, check=True
    )
    package = str(Path(meshpy.__file__).parent)
    ours = [(name, where) for name, where in json.loads(done.stdout) if where.startswith(package)]
    assert ours == []


def test_reload_under_load_drops_nothing(run_proxy, ab):
    _, _, clusters = ab
    proxy = run_proxy(routed_to("ca", clusters))
    stop = threading.Event()
    ok: list[int] = [0, 0]
    seen: set[str] = set()
    errors: list[str] = []

    def load(idx: int, keepalive: bool) -> None:
        limits = httpx.Limits(max_keepalive_connections=1 if keepalive else 0)
        with client(timeout=10, limits=limits) as c:
            while not stop.is_set():
                try:
                    r = c.get(proxy.url() + f"/load/{idx}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    errors.append(f"status {r.status_code}: {r.text[:200]}")
                else:
                    ok[idx] += 1
                    seen.add(r.headers["x-upstream"])

    threads = [threading.Thread(target=load, args=(i, i == 0)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(ok) >= 10, 10, "load to start")
        for n in range(6):
            proxy.reload(routed_to("cb" if n % 2 == 0 else "ca", clusters), sighup=n % 3 == 2)
            mark = list(ok)
            wait_for(lambda m=mark: all(o >= x + 10 for o, x in zip(ok, m, strict=True)), 10)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert errors == []
    assert seen == {"a", "b"}
    assert min(ok) >= 60


def get_in_background(url: str, timeout: float) -> tuple[threading.Thread, dict]:
    """GET ``url`` on a thread; the result dict gets "r" (the response) or "exc"."""
    result: dict = {}

    def get() -> None:
        try:
            with client(timeout=timeout) as c:
                result["r"] = c.get(url)
        except Exception as exc:
            result["exc"] = exc

    t = threading.Thread(target=get)
    t.start()
    return t, result


def test_inflight_request_finishes_on_old_config(run_proxy, ab):
    a, _, clusters = ab
    proxy = run_proxy(routed_to("ca", clusters))
    base = a.stats()["inflight"]
    t, result = get_in_background(proxy.url() + "/delay?ms=2000", timeout=15)
    wait_for(lambda: a.stats()["inflight"] > base, 5, "slow request to reach upstream a")
    # the new config routes elsewhere and drops the old cluster altogether
    proxy.reload(routed_to("cb", {"cb": clusters["cb"]}))
    assert served_by(proxy) == "b"
    t.join(15)
    assert "exc" not in result, result
    assert result["r"].status_code == 200
    assert result["r"].headers["x-upstream"] == "a"


def test_sigterm_drains_inflight_then_exits_zero(run_proxy, upstreams):
    up = upstreams.get("drain")
    proxy = run_proxy(routed_to("cd", {"cd": up.addr}), "--drain-timeout", "15s")
    idle = connect(proxy.addr())  # an idle keep-alive connection must not hold up shutdown
    idle.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
    first = read_response(idle)
    assert first.status == 200 and first.rest == b""
    base = up.stats()["inflight"]
    t, result = get_in_background(proxy.url() + "/delay?ms=4000", timeout=20)
    wait_for(lambda: up.stats()["inflight"] > base, 5, "slow request to reach the upstream")
    proxy.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            connect(proxy.addr(), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, 3, "listener to refuse new connections after SIGTERM")
    assert t.is_alive(), "new connections must be refused while the old request drains"
    t.join(20)
    assert "exc" not in result, result
    assert result["r"].status_code == 200
    assert result["r"].headers["connection"] == "close"  # answered while draining
    assert proxy.wait(5) == 0  # exits once drained, not at the 15 s deadline
    idle.settimeout(5)
    assert idle.recv(65536) == b""
    idle.close()


def test_an_error_answered_while_draining_closes_its_connection(run_proxy, tcp_server):
    """A request whose upstream fails once the drain has begun gets its 502 with
    ``connection: close``, as every response of a draining proxy does, and the connection
    then closes."""
    arrived, release = threading.Event(), threading.Event()

    def hang_up_when_released(conn) -> None:
        conn.recv(65536)
        arrived.set()
        release.wait(10)  # then closes without an answer

    up = tcp_server(hang_up_when_released)
    proxy = run_proxy(routed_to("c", {"c": up.addr}), "--drain-timeout", "15s")
    with connect(proxy.addr()) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert arrived.wait(5), "the request did not reach the upstream"
        proxy.signal(signal.SIGTERM)
        wait_for(lambda: proxy.admin_get("/ready").status_code == 503, 3, "the drain to begin")
        release.set()
        response = read_response(sock)
        assert response.status == 502
        assert response.header("connection") == "close"
        sock.settimeout(5)
        assert response.rest == b"" and sock.recv(65536) == b""
    assert proxy.wait(10) == 0


def test_sigterm_drain_deadline_is_enforced(run_proxy, upstreams):
    up = upstreams.get("drain")
    proxy = run_proxy(routed_to("cd", {"cd": up.addr}), "--drain-timeout", "1s")
    base = up.stats()["inflight"]
    t, result = get_in_background(proxy.url() + "/delay?ms=20000", timeout=30)
    wait_for(lambda: up.stats()["inflight"] > base, 5, "request to reach the upstream")
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(10) == 0  # would take ~20 s if the deadline were ignored
    t.join(10)
    assert "r" not in result, "the stuck request cannot have completed normally"


def test_ready_turns_503_while_draining_and_admin_keeps_answering(run_proxy, upstreams):
    up = upstreams.get("drain")
    proxy = run_proxy(routed_to("cd", {"cd": up.addr}), "--drain-timeout", "15s")
    assert proxy.admin_get("/ready").status_code == 200
    base = up.stats()["inflight"]
    t, result = get_in_background(proxy.url() + "/delay?ms=3000", timeout=20)
    wait_for(lambda: up.stats()["inflight"] > base, 5, "slow request to reach the upstream")
    proxy.signal(signal.SIGTERM)
    # new admin connections are still accepted while traffic drains: probes see 503
    wait_for(lambda: proxy.admin_get("/ready").status_code == 503, 3, "/ready to say draining")
    assert proxy.admin_get("/live").status_code == 200
    assert t.is_alive(), "the slow request is still draining"
    t.join(20)
    assert "exc" not in result, result
    assert result["r"].status_code == 200
    assert proxy.wait(5) == 0
