"""The objects filters see, and meshpy.testing, without a proxy."""

from __future__ import annotations

import subprocess
import sys

import pytest

import meshpy
from meshpy import testing


def test_headers_are_case_insensitive_multi_valued_and_mutable():
    h = meshpy.Headers([("Accept", "a"), ("accept", "b"), ("X-One", "1")])
    assert h["ACCEPT"] == "a" and h.get_all("Accept") == ["a", "b"]
    assert "x-one" in h and "X-ONE" in h and "x-two" not in h and 3 not in h
    assert len(h) == 2 and list(h) == ["accept", "x-one"]
    h["accept"] = "c"
    h.add("X-One", "2")
    assert h.items() == [("accept", "c"), ("x-one", "1"), ("x-one", "2")]
    assert h.pop("x-one") == "1" and "x-one" not in h and h.pop("x-one", "gone") == "gone"
    del h["accept"]
    assert len(h) == 0 and h.get("accept") is None and h.get("accept", "d") == "d"
    with pytest.raises(KeyError):
        h["accept"]
    with pytest.raises(KeyError):
        del h["accept"]


def test_headers_refuse_what_cannot_go_on_the_wire():
    h = meshpy.Headers({"x": ["1", "2"]})
    assert h.get_all("x") == ["1", "2"]
    with pytest.raises(ValueError, match="invalid header value"):
        h["x"] = "a\r\nInjected: yes"
    with pytest.raises(ValueError, match="invalid header name"):
        h["bad name"] = "v"
    with pytest.raises(ValueError, match="invalid header value"):
        h["x"] = "snowman \u2603"
    h["x"] = "caf\u00e9"  # Latin-1 maps one to one onto bytes
    assert h["x"] == "caf\u00e9"
    with pytest.raises(TypeError):
        meshpy.Headers([("x", 1)])


def test_request_target_and_its_validation():
    req = testing.request("POST", "/a/b?x=1&x=2&y", headers={"host": "h"}, body="data")
    assert (req.method, req.path, req.query_string) == ("POST", "/a/b", "x=1&x=2&y")
    assert req.query == {"x": ["1", "2"], "y": [""]}
    assert req.body == b"data" and req.ctx == {} and req.identity is None
    req.path = "/c"
    assert (req.path, req.query_string) == ("/c", "x=1&x=2&y")
    req.query_string = ""
    assert (req.path, req.query_string) == ("/c", "")
    with pytest.raises(ValueError, match="must start with '/'"):
        req.path = "relative"
    with pytest.raises(ValueError, match="invalid request target"):
        req.path = "/with space"
    with pytest.raises(ValueError, match="invalid method"):
        testing.request("BAD METHOD", "/")
    req.route_to("canary")
    assert req.cluster == "canary"


def test_response_status_and_body():
    resp = meshpy.Response(404, "not here\n", {"x": "1"})
    assert (resp.status, resp.body, resp.headers["x"]) == (404, b"not here\n", "1")
    resp.status = 200
    assert resp.status == 200
    for bad in (99, 1000, 100):
        with pytest.raises(ValueError, match="invalid response status"):
            meshpy.Response(bad)
    with pytest.raises(TypeError, match="a body must be bytes or str"):
        meshpy.Response(200, 42)
    upstream = testing.response(200)
    assert upstream.body == b""


class Order(meshpy.Filter):
    def __init__(self, name: str, answer: bool = False):
        self.name = name
        self.answer = answer

    async def on_request(self, req):
        req.headers.add("x-order", self.name)
        if self.answer:
            return meshpy.Response(401)

    def on_response(self, req, resp):
        resp.headers.add("x-order", self.name)


def test_run_calls_a_chain_like_a_route_does():
    result = testing.run(
        [Order("a"), Order("b")], testing.request(), response=testing.response(200)
    )
    assert not result.short_circuited
    assert result.request.headers.get_all("x-order") == ["a", "b"]
    assert result.response.headers.get_all("x-order") == ["b", "a"]  # reverse order
    stopped = testing.run([Order("a", answer=True), Order("b")], testing.request())
    assert stopped.short_circuited and stopped.response.status == 401
    assert stopped.request.headers.get_all("x-order") == ["a"]


def test_run_enforces_body_limit_and_return_types():
    class Limited(meshpy.Filter):
        body_limit = 4

        def on_request(self, req):
            return None

    assert testing.run(Limited(), testing.request(body=b"12345")).response.status == 413
    assert testing.run(Limited(), testing.request(body=b"1234")).response is None

    class Wrong(meshpy.Filter):
        def on_request(self, req):
            return "nope"

    with pytest.raises(TypeError, match=r"must return a meshpy\.Response or None"):
        testing.run(Wrong(), testing.request())


def test_log_passes_a_record():
    seen = []

    class Log(meshpy.Filter):
        def on_log(self, record):
            seen.append((record.status, record.cluster, record.request.path, record.error))

    testing.log(Log(), testing.request(path="/p", cluster="c"), status=503, error="down")
    assert seen == [(503, "c", "/p", "down")]


def test_the_stubs_match_the_compiled_module():
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "meshpy._core"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
