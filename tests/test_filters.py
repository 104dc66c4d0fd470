"""Python filters through a real proxy: every hook, short-circuit, mutations both ways, the
body opt-in, identity, failures (raise, time out, block forever), hot reload of filter code,
and bad filter config refused with a clear message."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import meshpy_cmd
from helpers import client, cluster, config, http_listener
from servers import wait_for

FILTERS = '''
import asyncio
import json
import time

import meshpy


class Tenant(meshpy.Filter):
    def __init__(self, header: str = "x-tenant"):
        self.header = header

    def on_request(self, req):
        if self.header not in req.headers:
            return meshpy.Response(403, b"missing tenant\\n", {"x-refused-by": "Tenant"})
        req.headers["x-tenant-checked"] = req.headers[self.header]
        req.headers.pop("x-secret", None)
        req.headers.add("x-multi", "one")
        req.headers.add("x-multi", "two")
        req.ctx["tenant"] = req.headers[self.header]

    def on_response(self, req, resp):
        resp.headers["x-tenant-seen"] = req.ctx.get("tenant", "?")
        del resp.headers["x-upstream"]


class Inspect(meshpy.Filter):
    """Reports what a hook sees, in a response header."""

    def on_request(self, req):
        seen = {
            "method": req.method,
            "scheme": req.scheme,
            "authority": req.authority,
            "path": req.path,
            "query": req.query,
            "identity": req.identity,
            "client_addr": req.client_addr,
            "route": req.route,
            "cluster": req.cluster,
            "body": req.body,
            "accept": req.headers.get_all("accept"),
            "has_request_id": "x-request-id" in req.headers,
        }
        req.ctx["seen"] = json.dumps(seen)

    def on_response(self, req, resp):
        resp.headers["x-seen"] = req.ctx["seen"]


class Rewrite(meshpy.Filter):
    def on_request(self, req):
        req.path = "/rewritten" + req.path
        req.query_string = "added=1"


class StatusFlip(meshpy.Filter):
    def on_response(self, req, resp):
        if resp.status == 200:
            resp.status = 202
            resp.headers["x-flipped"] = "yes"


class AsyncStamp(meshpy.Filter):
    async def on_request(self, req):
        await asyncio.sleep(0.001)
        req.headers["x-async"] = "request"

    async def on_response(self, req, resp):
        await asyncio.sleep(0.001)
        resp.headers["x-async"] = "response"


class AsyncGate(meshpy.Filter):
    """An async hook inside its own asyncio.timeout, answering at once or after a wait."""

    async def on_request(self, req):
        async with asyncio.timeout(1):  # needs the hook to run inside a task
            if req.path.endswith("/wait"):
                await asyncio.sleep(0.001)
        if req.headers.get("x-deny") == "1":
            return meshpy.Response(403, b"denied by an async hook\\n")
        req.headers["x-gate"] = "passed"


class BodyGuard(meshpy.Filter):
    body_limit = 1024

    def on_request(self, req):
        if b"forbidden" in req.body:
            return meshpy.Response(422, b"forbidden word\\n")
        req.body = req.body.upper()


class Canary(meshpy.Filter):
    def on_request(self, req):
        if req.headers.get("x-canary") == "1":
            req.route_to("canary")


class Boom(meshpy.Filter):
    def on_request(self, req):
        raise RuntimeError("boom in on_request")


class BoomResponse(meshpy.Filter):
    def on_response(self, req, resp):
        raise KeyError("boom in on_response")


class Slow(meshpy.Filter):
    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def on_request(self, req):
        time.sleep(self.seconds)


class SlowAsync(meshpy.Filter):
    def __init__(self, marker: str):
        self.marker = marker

    async def on_request(self, req):
        await asyncio.sleep(2)
        open(self.marker, "w").write("the hook was not cancelled")


class BlockForever(meshpy.Filter):
    def on_request(self, req):
        time.sleep(3600)


class Recorder(meshpy.Filter):
    def __init__(self, path: str):
        self.path = path

    def on_request(self, req):
        req.ctx["mark"] = "from on_request"

    def on_log(self, record):
        with open(self.path, "a") as out:
            out.write(json.dumps({
                "status": record.status,
                "cluster": record.cluster,
                "duration": record.duration,
                "error": record.error,
                "path": record.request.path,
                "ctx": dict(record.request.ctx),
            }) + "\\n")


class BadReturn(meshpy.Filter):
    def on_request(self, req):
        return 42


class PathStamp(meshpy.Filter):
    """Answers /teapot paths itself; stamps the others with their own path."""

    def on_request(self, req):
        if req.path.endswith("/teapot"):
            return meshpy.Response(418, req.path.encode())
        req.headers["x-stamp"] = req.path


class AsyncPathStamp(meshpy.Filter):
    async def on_request(self, req):
        await asyncio.sleep(0)
        req.headers["x-async-stamp"] = req.path
'''


def route(prefix: str, filters: list, cluster_name: str = "backend", **extra) -> dict:
    name = prefix.strip("/") or "root"
    return {
        "name": name,
        "match": {"path_prefix": prefix},
        "cluster": cluster_name,
        "filters": filters,
        **extra,
    }


def filtered_config(routes: list[dict], endpoints: list[str], **clusters: list[str]) -> dict:
    plain = {"name": "plain", "match": {"path_prefix": "/"}, "cluster": "backend"}
    extra = [cluster(name, eps) for name, eps in clusters.items()]
    return config([http_listener([*routes, plain])], [cluster("backend", endpoints), *extra])


@pytest.fixture
def start(run_proxy, upstream):
    """Start a proxy whose routes use the filters above; the catch-all route has none."""

    def go(routes: list[dict], *args: str, **clusters: list[str]):
        cfg = filtered_config(routes, [upstream.addr], **clusters)
        return run_proxy(cfg, "--workers", "1", *args, files={"testfilters.py": FILTERS})

    return go


def echoed_headers(response: httpx.Response) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


def test_request_hook_mutates_headers_and_short_circuits(start, upstream):
    proxy = start([route("/t", ["testfilters:Tenant"])])
    with client() as c:
        ok = c.get(proxy.url() + "/t/x", headers={"x-tenant": "acme", "x-secret": "s"})
        refused = c.get(proxy.url() + "/t/x")
    assert ok.status_code == 200
    seen = echoed_headers(ok)
    assert seen["x-tenant-checked"] == ["acme"]
    assert "x-secret" not in seen
    assert seen["x-multi"] == ["one", "two"]
    # on_response saw the ctx on_request left, and removed an upstream header.
    assert ok.headers["x-tenant-seen"] == "acme"
    assert "x-upstream" not in ok.headers
    assert refused.status_code == 403
    assert refused.text == "missing tenant\n"
    assert refused.headers["x-refused-by"] == "Tenant"
    assert refused.headers["content-type"].startswith("text/plain")


def test_short_circuit_never_contacts_the_upstream(run_proxy):
    # The only endpoint refuses connections: any attempt would turn into a 503.
    cfg = config(
        [http_listener([route("/", ["testfilters:Tenant"], cluster_name="dead")])],
        [cluster("dead", ["127.0.0.1:1"])],
    )
    proxy = run_proxy(cfg, files={"testfilters.py": FILTERS})
    with client() as c:
        assert c.get(proxy.url() + "/").status_code == 403
        assert c.get(proxy.url() + "/", headers={"x-tenant": "a"}).status_code == 503
    assert proxy.metrics().get("upstream_connect_errors_total", cluster="dead") == 1


def test_hooks_see_the_request_as_it_goes_upstream(start):
    proxy = start([route("/inspect", ["testfilters:Inspect"])])
    with client() as c:
        r = c.get(
            proxy.url() + "/inspect/p?a=1&a=2&b=",
            headers=[("accept", "text/html"), ("accept", "application/json")],
        )
    seen = json.loads(r.headers["x-seen"])
    host, port = proxy.addr()
    assert seen == {
        "method": "GET",
        "scheme": "http",
        "authority": f"{host}:{port}",
        "path": "/inspect/p",
        "query": {"a": ["1", "2"], "b": [""]},
        "identity": None,  # no mTLS on this listener
        "client_addr": "127.0.0.1",
        "route": "inspect",
        "cluster": "backend",
        "body": None,  # no filter of the route asked for the body
        "accept": ["text/html", "application/json"],
        "has_request_id": True,
    }


def test_concurrent_requests_each_get_their_own_answer(start):
    """Answers cross back to the workers in batches: each must reach its own request."""
    proxy = start(
        [
            route("/sync", ["testfilters:PathStamp"]),
            route("/both", ["testfilters:PathStamp", "testfilters:AsyncPathStamp"]),
        ],
        "--workers",
        "2",
    )
    paths = [
        f"/{kind}/{i}" + ("/teapot" if i % 3 == 0 else "")
        for kind in ("sync", "both")
        for i in range(150)
    ]

    def fetch(chunk: list[str]) -> list[tuple[str, httpx.Response]]:
        with client() as c:
            return [(path, c.get(proxy.url() + path)) for path in chunk]

    chunks = [paths[i::30] for i in range(30)]
    with ThreadPoolExecutor(len(chunks)) as pool:
        results = [pair for answers in pool.map(fetch, chunks) for pair in answers]
    assert len(results) == len(paths)
    for path, response in results:
        if path.endswith("/teapot"):
            assert (response.status_code, response.text) == (418, path)
            continue
        assert response.status_code == 200, path
        seen = echoed_headers(response)
        assert seen["x-stamp"] == [path]
        assert seen.get("x-async-stamp") == ([path] if path.startswith("/both") else None)


def test_path_and_query_rewrites_go_upstream(start):
    proxy = start([route("/old", ["testfilters:Rewrite"])])
    with client() as c:
        echo = c.get(proxy.url() + "/old/x?dropped=1").json()
    assert echo["path"] == "/rewritten/old/x"
    assert echo["query"] == "added=1"


def test_response_hook_changes_status_and_headers(start):
    proxy = start([route("/flip", ["testfilters:StatusFlip"])])
    with client() as c:
        r = c.get(proxy.url() + "/flip")
        plain = c.get(proxy.url() + "/other")
    assert (r.status_code, r.headers["x-flipped"]) == (202, "yes")
    assert r.json()["path"] == "/flip"  # the body still streams through untouched
    assert plain.status_code == 200 and "x-flipped" not in plain.headers


def test_async_hooks_both_ways_over_http1_and_http2(start):
    proxy = start([route("/async", ["testfilters:AsyncStamp"])])
    for http2 in (False, True):
        with httpx.Client(trust_env=False, http1=not http2, http2=http2, timeout=10) as c:
            r = c.get(proxy.url() + "/async")
        assert r.status_code == 200
        assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert echoed_headers(r)["x-async"] == ["request"]
        assert r.headers["x-async"] == "response"


def test_async_hooks_that_do_not_wait_and_that_do_run_as_tasks(start):
    """Whether the hook returns at once or waits first, it runs inside an asyncio task,
    can answer, and hands on to the next hook in the chain."""
    proxy = start([route("/gate", ["testfilters:AsyncGate", "testfilters:PathStamp"])])
    with client() as c:
        for path in ("/gate", "/gate/wait"):
            passed = c.get(proxy.url() + path)
            assert passed.status_code == 200, passed.text
            assert echoed_headers(passed)["x-gate"] == ["passed"]
            assert echoed_headers(passed)["x-stamp"] == [path]
            denied = c.get(proxy.url() + path, headers={"x-deny": "1"})
            assert denied.status_code == 403
            assert denied.text == "denied by an async hook\n"
    assert proxy.metrics().get("filter_errors_total", route="gate", reason="exception") == 0


def test_chain_runs_in_order_and_stops_at_the_first_answer(start):
    proxy = start([route("/chain", ["testfilters:Tenant", "testfilters:AsyncStamp"])])
    with client() as c:
        ok = c.get(proxy.url() + "/chain", headers={"x-tenant": "t"})
        refused = c.get(proxy.url() + "/chain")
    assert echoed_headers(ok)["x-async"] == ["request"]
    assert ok.headers["x-tenant-seen"] == "t"
    assert refused.status_code == 403 and "x-async" not in refused.headers


def test_body_opt_in_buffers_checks_and_replaces_the_body(start):
    proxy = start([route("/body", ["testfilters:BodyGuard"])])
    with client() as c:
        echo = c.post(proxy.url() + "/body", content=b"hello").json()
        refused = c.post(proxy.url() + "/body", content=b"a forbidden word")
        too_large = c.post(proxy.url() + "/body", content=b"x" * 1025)
        streamed = c.post(proxy.url() + "/body", content=iter([b"chunk-", b"ed"]))
    assert (echo["body"], echo["body_len"]) == ("HELLO", 5)
    assert refused.status_code == 422
    assert too_large.status_code == 413
    # A chunked body is read whole too, and sent on with its new length.
    assert streamed.json()["body"] == "CHUNK-ED"
    assert ["content-length", "8"] in streamed.json()["headers"]


def test_a_filter_can_choose_the_cluster(start, upstreams):
    canary = upstreams.get("canary")
    proxy = start([route("/c", ["testfilters:Canary"])], canary=[canary.addr])
    with client() as c:
        assert c.get(proxy.url() + "/c").json()["name"] == "a"
        assert c.get(proxy.url() + "/c", headers={"x-canary": "1"}).json()["name"] == "canary"
    assert proxy.metrics().get("upstream_connect_total", cluster="canary") >= 1


def test_log_hook_gets_the_finished_exchange(start, tmp_path):
    log = tmp_path / "log.jsonl"
    proxy = start(
        [
            route("/log", [{"testfilters:Recorder": {"path": str(log)}}]),
            route("/refused", ["testfilters:Tenant", {"testfilters:Recorder": {"path": str(log)}}]),
        ]
    )
    with client() as c:
        assert c.get(proxy.url() + "/log/a").status_code == 200
        assert c.get(proxy.url() + "/refused").status_code == 403
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2, 5, "two records")
    lines = log.read_text().splitlines()
    records = sorted((json.loads(line) for line in lines), key=lambda r: r["path"])
    assert records[0]["path"] == "/log/a"
    assert (records[0]["status"], records[0]["cluster"], records[0]["error"]) == (
        200,
        "backend",
        None,
    )
    assert records[0]["ctx"] == {"mark": "from on_request"}
    assert 0 < records[0]["duration"] < 5
    assert (records[1]["path"], records[1]["status"]) == ("/refused", 403)
    assert proxy.metrics().get("filter_calls_total", route="log", phase="log") == 1


def test_raising_filter_fails_closed_or_open_and_is_logged_once(start):
    proxy = start(
        [
            route("/closed", ["testfilters:Boom"]),
            route("/open", ["testfilters:Boom"], on_error="fail_open"),
            route("/resp", ["testfilters:BoomResponse"]),
            route("/badreturn", ["testfilters:BadReturn"]),
        ]
    )
    with client() as c:
        closed = [c.get(proxy.url() + "/closed") for _ in range(3)]
        opened = c.get(proxy.url() + "/open")
        resp = c.get(proxy.url() + "/resp")
        bad = c.get(proxy.url() + "/badreturn")
        plain = c.get(proxy.url() + "/plain")
    assert [r.status_code for r in closed] == [500, 500, 500]
    assert "filter testfilters:Boom raised" in closed[0].text
    assert opened.status_code == 200 and opened.json()["path"] == "/open"
    assert resp.status_code == 500
    assert bad.status_code == 500
    assert plain.status_code == 200
    metrics = proxy.metrics()
    errors = dict(
        ((labels["route"], labels["phase"], labels["reason"]), value)
        for labels, value in metrics.series("filter_errors_total")
    )
    assert errors[("closed", "request", "exception")] == 3
    assert errors[("open", "request", "exception")] == 1
    assert errors[("resp", "response", "exception")] == 1
    stderr = proxy.stderr()
    # One traceback per distinct error, however often it happens.
    assert stderr.count("RuntimeError: boom in on_request") == 1
    assert "Traceback" in stderr and "testfilters.py" in stderr
    # The traceback starts in the filter: the frames of the thread that called it say nothing.
    assert "meshpy/dispatcher.py" not in stderr and "meshpy/runtime.py" not in stderr
    assert "on_request must return a meshpy.Response or None, not int" in stderr


def test_slow_filters_time_out_closed_or_open_and_async_ones_are_cancelled(start, tmp_path):
    marker = tmp_path / "not-cancelled"
    proxy = start(
        [
            route("/closed", [{"testfilters:Slow": {"seconds": 0.5}}], filter_timeout="50ms"),
            route(
                "/open",
                [{"testfilters:Slow": {"seconds": 0.5}}],
                filter_timeout="50ms",
                on_error="fail_open",
            ),
            route("/async", [{"testfilters:SlowAsync": {"marker": str(marker)}}]),
        ]
    )
    with client() as c:
        started = time.monotonic()
        closed = c.get(proxy.url() + "/closed")
        assert time.monotonic() - started < 0.45  # answered at the budget, not after the hook
        assert closed.status_code == 503
        assert "did not finish within its time budget" in closed.text
        opened = c.get(proxy.url() + "/open")
        assert opened.status_code == 200 and opened.json()["path"] == "/open"
        slow_async = c.get(proxy.url() + "/async")
        assert slow_async.status_code == 503  # the default budget, 100 ms
    time.sleep(2.5)
    assert not marker.exists(), "the async hook ran on past its budget"
    metrics = proxy.metrics()
    assert metrics.get("filter_errors_total", route="closed", reason="timeout") == 1
    assert metrics.get("filter_errors_total", route="async", reason="timeout") == 1
    assert "did not finish on_request within the route's filter_timeout" in proxy.stderr()


BLOCKING_ROUTES = [
    route("/block", ["testfilters:BlockForever"], filter_timeout="200ms"),
    route("/t", ["testfilters:Tenant"]),
]


def test_a_filter_blocking_forever_stops_nothing_else(start):
    assert_blocked_filter_thread_is_replaced(start(BLOCKING_ROUTES))


def test_filters_added_by_a_reload_are_watched_too(start, upstream):
    """A sidecar started without filters leaves its watchdog asleep; a reload wakes it."""
    proxy = start([])
    proxy.reload(filtered_config(BLOCKING_ROUTES, [upstream.addr]))
    assert_blocked_filter_thread_is_replaced(proxy)


# A filter module that imports nothing but meshpy, so asyncio in the process is the runtime's.
PLAIN_FILTERS = """
import meshpy


class NeedsTenant(meshpy.Filter):
    def on_request(self, req):
        if "x-tenant" not in req.headers:
            return meshpy.Response(403, b"missing tenant\\n")
"""


def test_a_sidecar_loads_the_filter_runtime_only_once_a_filter_is_configured(run_proxy, upstream):
    """Without filters there is no filter thread and no asyncio in the process (with the ssl
    module it imports, 2.5 MB of an idle sidecar's RSS); the first reload that configures a
    filter starts them, and the filter runs."""
    proxy = run_proxy(
        filtered_config([], [upstream.addr]),
        "--workers",
        "1",
        files={"plainfilters.py": PLAIN_FILTERS},
    )
    with client() as c:
        assert c.get(proxy.url() + "/t", headers={"x-tenant": "a"}).status_code == 200
    assert not loaded_extensions(proxy.pid) & {"_asyncio", "_ssl"}
    threads = len(list(Path(f"/proc/{proxy.pid}/task").iterdir()))

    proxy.reload(filtered_config([route("/t", ["plainfilters:NeedsTenant"])], [upstream.addr]))
    with client() as c:
        assert c.get(proxy.url() + "/t").status_code == 403  # no x-tenant: the filter refuses
        assert c.get(proxy.url() + "/t", headers={"x-tenant": "a"}).status_code == 200
    assert "_asyncio" in loaded_extensions(proxy.pid)
    assert len(list(Path(f"/proc/{proxy.pid}/task").iterdir())) == threads + 1


def loaded_extensions(pid: int) -> set[str]:
    """The names of the C extension modules a process has mapped (`_asyncio`, `_ssl`, ...)."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        file = line.split()[-1]
        if file.endswith(".so") and "/lib-dynload/" in file:
            names.add(Path(file).name.split(".")[0])
    return names


def assert_blocked_filter_thread_is_replaced(proxy) -> None:
    results: list[int] = []

    def blocked_request() -> None:
        with client() as c:
            results.append(c.get(proxy.url() + "/block").status_code)

    stuck = threading.Thread(target=blocked_request)
    stuck.start()
    time.sleep(0.1)  # the filter thread is now inside time.sleep(3600)
    with client() as c:
        plain = [c.get(proxy.url() + f"/plain/{i}").status_code for i in range(50)]
        assert plain == [200] * 50
        # Filtered routes fail closed within their budget while the thread is held...
        assert c.get(proxy.url() + "/t", headers={"x-tenant": "a"}).status_code == 503
        # ...until the watchdog hands the queue to a fresh thread.
        wait_for(
            lambda: c.get(proxy.url() + "/t", headers={"x-tenant": "a"}).status_code == 200,
            10,
            "filtered routes to recover",
        )
    stuck.join(10)
    assert results == [503]
    assert "testfilters:BlockForever has blocked the filter thread" in proxy.stderr()


def test_filter_code_reloads_when_its_file_changes(run_proxy, upstream):
    module = """
import meshpy

class Version(meshpy.Filter):
    def on_request(self, req):
        req.headers["x-version"] = "{version}"
"""
    cfg = config(
        [http_listener([route("/", ["versioned:Version"])])], [cluster("backend", [upstream.addr])]
    )
    proxy = run_proxy(cfg, files={"versioned.py": module.format(version="1")})
    source = proxy.workdir / "versioned.py"

    def version(c: httpx.Client) -> str:
        r = c.get(proxy.url() + "/")
        assert r.status_code == 200, r.text
        return echoed_headers(r)["x-version"][0]

    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:  # requests keep flowing through every swap
        with client() as c:
            while not stop.is_set():
                r = c.get(proxy.url() + "/load")
                if r.status_code != 200:
                    failures.append(r.text)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        with client() as c:
            assert version(c) == "1"
            source.write_text(module.format(version="2"))
            wait_for(lambda: version(c) == "2", 10, "the new filter code")
            reloads_failed = proxy.metrics().get("config_reload_total", result="failure")
            source.write_text("import meshpy\nclass Version(meshpy.Filter:\n")  # a syntax error
            wait_for(lambda: "refused" in proxy.stderr(), 10, "the broken file to be refused")
            assert version(c) == "2"
            assert (
                proxy.metrics().get("config_reload_total", result="failure") == reloads_failed + 1
            )
            source.write_text(module.format(version="3"))
            wait_for(lambda: version(c) == "3", 10, "the fixed filter code")
    finally:
        stop.set()
        loader.join(10)
    assert failures == []
    assert "SyntaxError" in proxy.stderr()


def test_config_reload_makes_new_instances_with_new_arguments(start):
    proxy = start([route("/t", [{"testfilters:Tenant": {"header": "x-tenant"}}])])
    with client() as c:
        assert c.get(proxy.url() + "/t", headers={"x-org": "o"}).status_code == 403
        cfg = json.loads(json.dumps(proxy.config))
        cfg["listeners"][0]["routes"][0]["filters"] = [{"testfilters:Tenant": {"header": "x-org"}}]
        proxy.reload(cfg)
        assert c.get(proxy.url() + "/t", headers={"x-org": "o"}).status_code == 200


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (["nosuchmodule:X"], "cannot import 'nosuchmodule:X': no module named 'nosuchmodule'"),
        (["testfilters:Nope"], "cannot import 'testfilters:Nope': testfilters has no 'Nope'"),
        (["testfilters"], "expected an import path such as 'plugins.tenant:RequireTenant'"),
        (["json:JSONDecoder"], "'json:JSONDecoder' is not a meshpy.Filter subclass"),
        (
            [{"testfilters:Tenant": {"hedaer": "x"}}],
            "invalid arguments for testfilters:Tenant: got an unexpected keyword argument"
            " 'hedaer' (it takes: header: str = 'x-tenant')",
        ),
        (
            [{"testfilters:Slow": {"seconds": "fast"}}],
            "invalid argument seconds='fast' for testfilters:Slow: input should be a valid number",
        ),
        (
            [{"testfilters:Recorder": None}],
            "invalid arguments for testfilters:Recorder: missing a required argument: 'path'",
        ),
        ([["testfilters:Tenant"]], "expected an import path such as plugins.tenant:RequireTenant"),
    ],
)
def test_bad_filter_config_is_refused_with_the_route_and_reason(
    tmp_path, upstream, filters, message
):
    import subprocess

    import yaml

    (tmp_path / "testfilters.py").write_text(FILTERS)
    cfg = filtered_config([route("/f", filters)], [upstream.addr])
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(meshpy_cmd("validate", str(path)), capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{path}: listeners[0].routes[0].filters[0]" in done.stderr
    assert message in done.stderr, done.stderr


def test_running_proxy_keeps_its_filters_when_a_reload_names_a_bad_one(start):
    proxy = start([route("/t", ["testfilters:Tenant"])])
    cfg = json.loads(json.dumps(proxy.config))
    cfg["listeners"][0]["routes"][0]["filters"] = ["testfilters:Missing"]
    proxy.write_config(cfg)
    wait_for(lambda: "testfilters has no 'Missing'" in proxy.stderr(), 10, "the refusal")
    with client() as c:
        assert c.get(proxy.url() + "/t").status_code == 403
        assert c.get(proxy.url() + "/t", headers={"x-tenant": "a"}).status_code == 200
    assert proxy.config_version() == 1


def test_filter_init_errors_name_the_filter(run_proxy, tmp_path, upstream):
    import subprocess

    import yaml

    (tmp_path / "initfail.py").write_text(
        "import meshpy\n\nclass Needy(meshpy.Filter):\n"
        "    def __init__(self, path: str):\n"
        "        open(path)\n\n    def on_request(self, req):\n        pass\n"
    )
    cfg = filtered_config([route("/f", [{"initfail:Needy": {"path": "/nonexistent"}}])], ["x:1"])
    cfg["clusters"][0]["endpoints"] = [upstream.addr]
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(meshpy_cmd("proxy", "-c", str(path)), capture_output=True, text=True)
    assert done.returncode == 2
    assert (
        "listeners[0].routes[0].filters[0]: initfail:Needy could not be created:"
        " FileNotFoundError" in done.stderr
    )


def test_filter_metrics_count_calls_and_latency(start):
    proxy = start([route("/t", ["testfilters:Tenant"])])
    with client() as c:
        for _ in range(5):
            c.get(proxy.url() + "/t", headers={"x-tenant": "a"})
    metrics = proxy.metrics()
    assert metrics.get("filter_calls_total", route="t", phase="request") == 5
    assert metrics.get("filter_calls_total", route="t", phase="response") == 5
    assert metrics.get("filter_latency_ms_count", route="t", phase="request") == 5
    # The route without filters never calls into Python.
    assert not [s for s in metrics.series("filter_calls_total") if s[0]["route"] == "plain"]


def test_validate_creates_the_filters_so_init_errors_show(tmp_path, upstream):
    import subprocess

    import yaml

    (tmp_path / "initfail.py").write_text(
        "import meshpy\n\nclass Needy(meshpy.Filter):\n"
        "    def __init__(self, percent: float):\n"
        "        if not 0 <= percent <= 100:\n"
        "            raise ValueError('percent must be between 0 and 100')\n\n"
        "    def on_request(self, req):\n        pass\n"
    )
    cfg = filtered_config([route("/f", [{"initfail:Needy": {"percent": 150.0}}])], [upstream.addr])
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(meshpy_cmd("validate", str(path)), capture_output=True, text=True)
    assert done.returncode == 1
    assert (
        f"{path}: listeners[0].routes[0].filters[0]: initfail:Needy could not be created:"
        " ValueError: percent must be between 0 and 100" in done.stderr
    ), done.stderr
