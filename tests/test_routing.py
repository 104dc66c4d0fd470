"""Route matching: host exact/wildcard, path exact/prefix/regex, headers, method, order."""

from __future__ import annotations

import pytest
from conftest import Proxy
from helpers import client, cluster, config, http_listener

ANY = {"path_prefix": "/"}


def route(name: str, cluster_name: str, **match) -> dict:
    return {"name": name, "match": match, "cluster": cluster_name}


@pytest.fixture(scope="module")
def routing_proxy(upstreams, tmp_path_factory):
    a, b, c = upstreams.many("a", "b", "c")
    routes = [
        route("exact-host", "ca", host="exact.test", **ANY),
        route("wildcard-host", "cb", host="*.wild.test", **ANY),
        route("path-exact", "ca", host="paths.test", path="/exact"),
        route("path-prefix", "cb", host="paths.test", path_prefix="/pre"),
        route("path-regex", "cc", host="paths.test", path_regex="^/v[0-9]+/"),
        route("hdr-exact", "ca", host="hdr.test", headers={"x-canary": "1"}, **ANY),
        route("hdr-regex", "cb", host="hdr.test", headers={"x-v": {"regex": "^v[0-9]$"}}, **ANY),
        route("hdr-present", "cc", host="hdr.test", headers={"x-p": {"present": True}}, **ANY),
        route("method-write", "ca", host="method.test", method=["POST", "PUT"], **ANY),
        route("method-any", "cb", host="method.test", **ANY),
        route("first", "ca", host="first.test", path_prefix="/"),
        route("shadowed", "cb", host="first.test", path_prefix="/api"),
        route(
            "combined",
            "cc",
            host="*.example.com",
            path_prefix="/api",
            method=["GET"],
            headers={"x-canary": "1"},
        ),
    ]
    cfg = config(
        [http_listener(routes)],
        [cluster("ca", [a.addr]), cluster("cb", [b.addr]), cluster("cc", [c.addr])],
    )
    workdir = tmp_path_factory.mktemp("routing")
    proxy = Proxy(cfg, workdir, [])
    yield proxy
    proxy.stop(5)


CASES = [
    # host exact (case-insensitive, port in Host ignored)
    ("exact.test", "GET", "/x", {}, "a"),
    ("EXACT.Test", "GET", "/x", {}, "a"),
    ("exact.test:8080", "GET", "/x", {}, "a"),
    ("exact.test.evil", "GET", "/x", {}, None),
    ("notexact.test", "GET", "/x", {}, None),
    # host wildcard
    ("api.wild.test", "GET", "/", {}, "b"),
    ("wild.test", "GET", "/", {}, None),
    ("api.wild.testx", "GET", "/", {}, None),
    # path exact / prefix / regex (query string is not part of the path)
    ("paths.test", "GET", "/exact", {}, "a"),
    ("paths.test", "GET", "/exact?x=1", {}, "a"),
    ("paths.test", "GET", "/exact/more", {}, None),
    ("paths.test", "GET", "/pre", {}, "b"),
    ("paths.test", "GET", "/pre/deeper/x", {}, "b"),
    ("paths.test", "GET", "/v2/items", {}, "c"),
    ("paths.test", "GET", "/v/items", {}, None),
    ("paths.test", "GET", "/x/v2/items", {}, None),
    # headers exact / regex / present
    ("hdr.test", "GET", "/", {"x-canary": "1"}, "a"),
    ("hdr.test", "GET", "/", {"x-canary": "2"}, None),
    ("hdr.test", "GET", "/", {"x-v": "v7"}, "b"),
    ("hdr.test", "GET", "/", {"x-v": "v77"}, None),
    ("hdr.test", "GET", "/", {"x-p": "anything"}, "c"),
    ("hdr.test", "GET", "/", {}, None),
    # method
    ("method.test", "POST", "/", {}, "a"),
    ("method.test", "PUT", "/", {}, "a"),
    ("method.test", "GET", "/", {}, "b"),
    ("method.test", "DELETE", "/", {}, "b"),
    # first match wins
    ("first.test", "GET", "/api/x", {}, "a"),
    # all conditions of one match must hold
    ("shop.example.com", "GET", "/api/x", {"x-canary": "1"}, "c"),
    ("shop.example.com", "POST", "/api/x", {"x-canary": "1"}, None),
    ("shop.example.com", "GET", "/web", {"x-canary": "1"}, None),
    ("shop.example.com", "GET", "/api/x", {}, None),
    ("example.com", "GET", "/api/x", {"x-canary": "1"}, None),
]


@pytest.mark.parametrize(("host", "method", "path", "headers", "expected"), CASES)
def test_route_matching(routing_proxy, host, method, path, headers, expected):
    with client() as c:
        r = c.request(method, routing_proxy.url() + path, headers={"host": host, **headers})
    if expected is None:
        assert r.status_code == 404, f"{host} {method} {path} {headers} -> {r.headers}"
    else:
        assert r.status_code == 200, r.text
        assert r.headers["x-upstream"] == expected
        assert r.json()["path"] == path.split("?")[0]


def test_unknown_route_404_names_the_host(routing_proxy):
    with client() as c:
        r = c.get(routing_proxy.url() + "/whatever", headers={"host": "nowhere.test"})
    assert r.status_code == 404
    assert "nowhere.test" in r.text
    # the connection-level service is unaffected
    with client() as c:
        r = c.get(routing_proxy.url() + "/", headers={"host": "exact.test"})
    assert r.status_code == 200
