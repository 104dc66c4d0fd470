"""Authorization policies on inbound listeners, decided by the data plane: real callers over
mTLS (identities from meshpy.ca, one outbound sidecar per caller) and plaintext callers for
path, method and header rules, default deny, metrics and reloads."""

from __future__ import annotations

import socket
import ssl
import uuid
from dataclasses import dataclass

import pytest
import yaml
from helpers import client, cluster, config, connect, eventually, http_listener, read_until_close
from servers import echo_handler
from test_mtls import DOMAIN, Creds, issue, sid

from meshpy.ca import CertificateAuthority, write_pem_files
from meshpy.config import loads_config
from meshpy.errors import ConfigError

OPS = f"spiffe://{DOMAIN}/ns/ops/sa/x"


def tag() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Ids:
    ca: CertificateAuthority
    a: Creds  # spiffe://example.org/ns/shop/sa/a
    b: Creds  # the inbound sidecar
    c: Creds  # spiffe://example.org/ns/shop/sa/c
    ops: Creds  # spiffe://example.org/ns/ops/sa/x


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Ids:
    d = tmp_path_factory.mktemp("authz")
    ca = CertificateAuthority.create_root(DOMAIN)
    ops = write_pem_files(d / "ops", ca.issue("x", "ops", "1h"))
    return Ids(
        ca=ca,
        a=issue(ca, d / "a", "a"),
        b=issue(ca, d / "b", "b"),
        c=issue(ca, d / "c", "c"),
        ops=Creds(ops["cert.pem"], ops["key.pem"], ops["bundle.pem"]),
    )


def inbound_config(ids: Ids, upstream_addr: str, authz: dict, mode: str = "strict") -> dict:
    route = {"name": "app", "match": {"path_prefix": "/"}, "cluster": "app"}
    cfg = config(
        [http_listener([route], name="inbound", mtls=mode, authz=authz)],
        [cluster("app", [upstream_addr])],
    )
    cfg["identity"] = ids.b.identity()
    return cfg


def outbound(creds: Creds, b_addr: tuple[str, int]) -> dict:
    route = {"name": "to-b", "match": {"path_prefix": "/"}, "cluster": "b"}
    cfg = config(
        [http_listener([route], name="outbound")],
        [cluster("b", [f"{b_addr[0]}:{b_addr[1]}"], tls="mesh")],
    )
    cfg["identity"] = creds.identity()
    return cfg


MESH_POLICY = {
    "default": "deny",
    "rules": [
        {"name": "frontend", "action": "allow", "from": [sid("a")]},
        {
            "name": "ops-tools",
            "action": "allow",
            "from": [f"spiffe://{DOMAIN}/ns/ops/*"],
            "paths": ["/ops/*"],
        },
        {"name": "no-admin", "action": "deny", "paths": ["/admin/*"]},
    ],
}


def test_identity_rules_between_two_sidecars(run_proxy, upstream, ids):
    b = run_proxy(inbound_config(ids, upstream.addr, MESH_POLICY))
    a = run_proxy(outbound(ids.a, b.addr("inbound")))
    o = run_proxy(outbound(ids.ops, b.addr("inbound")))
    c = run_proxy(outbound(ids.c, b.addr("inbound")))
    t = tag()
    with client() as http:
        # allowed by the exact identity
        r = http.get(a.url("outbound") + f"/orders/{t}")
        assert r.status_code == 200, r.text
        assert r.json()["path"] == f"/orders/{t}"
        # allowed by the glob, only where its paths say
        assert http.get(o.url("outbound") + f"/ops/{t}").status_code == 200
        r = http.get(o.url("outbound") + f"/orders/ops-{t}")
        assert r.status_code == 403
        assert r.text == "meshpy: denied by authorization policy (default deny)\n"
        # an identity no rule names: default deny, and the app never sees the request
        r = http.get(c.url("outbound") + f"/orders/c-{t}")
        assert r.status_code == 403
        assert r.headers["content-type"].startswith("text/plain")
        # deny wins over the allow rule that also matches
        r = http.get(a.url("outbound") + f"/admin/{t}")
        assert r.status_code == 403
        assert r.text == 'meshpy: denied by authorization rule "no-admin"\n'
    seen = upstream.stats()["paths"]
    assert f"/orders/{t}" in seen and f"/ops/{t}" in seen
    assert f"/orders/ops-{t}" not in seen
    assert f"/orders/c-{t}" not in seen
    assert f"/admin/{t}" not in seen
    metrics = b.metrics()
    assert metrics.get("authz_allow_total", listener="inbound", rule="frontend") == 1
    assert metrics.get("authz_allow_total", listener="inbound", rule="ops-tools") == 1
    assert metrics.get("authz_deny_total", listener="inbound", rule="no-admin") == 1
    assert metrics.get("authz_deny_total", listener="inbound", rule="default") == 2
    assert metrics.get("authz_deny_total", listener="inbound", rule="frontend") == 0
    # the identity is still counted per caller, denied or not
    assert metrics.get("inbound_requests_total", listener="inbound", client_id=OPS) == 2


def test_permissive_plaintext_caller_matches_no_from_rule(run_proxy, upstream, ids):
    policy = {
        "default": "deny",
        "rules": [
            {"name": "public", "action": "allow", "paths": ["/public"]},
            {"name": "from-a", "action": "allow", "from": [sid("a")], "paths": ["/private*"]},
        ],
    }
    b = run_proxy(inbound_config(ids, upstream.addr, policy, mode="permissive"))
    a = run_proxy(outbound(ids.a, b.addr("inbound")))
    with client() as http:
        # a rule without `from` matches a plaintext caller; one with `from` never does
        assert http.get(b.url("inbound") + "/public").status_code == 200
        r = http.get(b.url("inbound") + "/private")
        assert r.status_code == 403
        assert "default deny" in r.text
        # the same path over mTLS from a
        assert http.get(a.url("outbound") + "/private").status_code == 200
    metrics = b.metrics()
    assert metrics.get("authz_allow_total", listener="inbound", rule="public") == 1
    assert metrics.get("authz_allow_total", listener="inbound", rule="from-a") == 1
    assert metrics.get("authz_deny_total", listener="inbound", rule="default") == 1


def plain_config(upstream_addr: str, authz: dict) -> dict:
    route = {"name": "app", "match": {"path_prefix": "/"}, "cluster": "app"}
    return config(
        [http_listener([route], name="inbound", authz=authz)], [cluster("app", [upstream_addr])]
    )


READS = {
    "default": "deny",
    "rules": [
        {
            "name": "reads",
            "action": "allow",
            "paths": ["/orders", "/catalog/*"],
            "methods": ["GET", "HEAD"],
            "headers": {"x-env": "prod"},
        },
        {"name": "tokens", "action": "allow", "headers": {"x-token": {"present": True}}},
        {"name": "mesh-only", "action": "allow", "from": [f"spiffe://{DOMAIN}/*"]},
        {"name": "no-admin", "action": "deny", "paths": ["/catalog/admin*"]},
    ],
}


def test_path_method_and_header_rules_for_plaintext_callers(run_proxy, upstream):
    proxy = run_proxy(plain_config(upstream.addr, READS))
    prod = {"x-env": "prod"}
    url = proxy.url("inbound")
    t = tag()
    with client() as http:
        assert http.get(url + "/orders", headers=prod).status_code == 200
        assert http.head(url + f"/catalog/{t}", headers=prod).status_code == 200
        assert http.get(url + "/orders/1", headers=prod).status_code == 403  # exact path
        assert http.post(url + "/orders", headers=prod).status_code == 403  # method
        assert http.get(url + "/orders", headers={"x-env": "dev"}).status_code == 403  # header
        assert http.get(url + "/orders").status_code == 403  # header missing
        assert http.post(url + f"/write/{t}", headers={"x-token": ""}).status_code == 200
        r = http.get(url + f"/catalog/admin/{t}", headers={**prod, "x-token": "1"})
        assert r.status_code == 403
        assert r.text == 'meshpy: denied by authorization rule "no-admin"\n'
        # gRPC callers get PERMISSION_DENIED
        r = http.post(
            url + "/pkg.Svc/Call", headers={"content-type": "application/grpc"}, content=b""
        )
        assert r.headers["grpc-status"] == "7"
        assert "default deny" in r.headers["grpc-message"]
    assert f"/catalog/admin/{t}" not in upstream.stats()["paths"]
    metrics = proxy.metrics()
    assert metrics.get("authz_allow_total", listener="inbound", rule="reads") == 2
    assert metrics.get("authz_allow_total", listener="inbound", rule="tokens") == 1
    assert metrics.get("authz_allow_total", listener="inbound", rule="mesh-only") == 0
    assert metrics.get("authz_deny_total", listener="inbound", rule="no-admin") == 1
    assert metrics.get("authz_deny_total", listener="inbound", rule="default") == 5


def test_reload_swaps_the_policy_and_an_invalid_one_is_refused(run_proxy, upstream):
    deny = {"rules": [{"name": "block", "action": "deny", "paths": ["/a*"]}]}
    proxy = run_proxy(plain_config(upstream.addr, deny))
    url = proxy.url("inbound")
    with client() as http:
        assert [http.get(url + p).status_code for p in ("/a", "/b")] == [403, 200]
        deny["rules"][0]["paths"] = ["/b*"]
        proxy.reload(plain_config(upstream.addr, deny))
        # the same keep-alive connection sees the new policy as a whole
        assert [http.get(url + p).status_code for p in ("/a", "/b")] == [200, 403]
        version = proxy.config_version()
        failures = proxy.metrics().get("config_reload_total", result="failure")

        bad = plain_config(
            upstream.addr, {"rules": [{"name": "x", "action": "deny", "paths": ["/a*b"]}]}
        )
        proxy.write_raw_config(yaml.safe_dump(bad))

        def rejected():
            assert proxy.metrics().get("config_reload_total", result="failure") >= failures + 1

        eventually(rejected, timeout=3)
        assert proxy.config_version() == version
        assert [http.get(url + p).status_code for p in ("/a", "/b")] == [200, 403]
    eventually(lambda: "listeners[0].authz.rules[0].paths[0]" in proxy.stderr(), timeout=3)
    metrics = proxy.metrics()
    # the series is keyed by name, so it carries its count across the reload
    assert metrics.get("authz_deny_total", listener="inbound", rule="block") == 3


def check(authz: dict, protocol: str = "http") -> str:
    listener: dict = {"name": "in", "listen": "127.0.0.1:0", "authz": authz}
    if protocol == "tcp":
        listener.update(protocol="tcp", cluster="c")
    else:
        listener["routes"] = [{"cluster": "c"}]
    cfg = {"listeners": [listener], "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"]}]}
    with pytest.raises(ConfigError) as caught:
        loads_config(yaml.safe_dump(cfg))
    return str(caught.value)


@pytest.mark.parametrize(
    ("authz", "expected"),
    [
        ({"default": "reject"}, "listeners[0].authz.default: expected one of allow, deny"),
        (
            {"rules": [{"name": "r", "action": "permit"}]},
            "listeners[0].authz.rules[0].action: expected one of allow, deny",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "paths": ["/a/*/b"]}]},
            "listeners[0].authz.rules[0].paths[0]: expected an exact path",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "paths": ["orders"]}]},
            "listeners[0].authz.rules[0].paths[0]: expected an exact path",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "from": ["frontend"]}]},
            "listeners[0].authz.rules[0].from[0]: expected a SPIFFE ID",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "from": ["spiffe://example.org/ns/*/sa"]}]},
            "listeners[0].authz.rules[0].from[0]: expected a SPIFFE ID",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "from": []}]},
            "listeners[0].authz.rules[0].from: expected at least one item",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "form": [sid("a")]}]},
            "listeners[0].authz.rules[0].form: unknown field (did you mean 'from'?",
        ),
        (
            {"rules": [{"name": "r", "action": "deny"}, {"name": "r", "action": "allow"}]},
            "listeners[0].authz.rules[1].name: duplicate rule name 'r' (also rules[0])",
        ),
        (
            {"rules": [{"name": "default", "action": "deny"}]},
            "listeners[0].authz.rules[0].name: 'default' is reserved",
        ),
    ],
)
def test_invalid_policies_name_the_field(authz, expected):
    assert expected in check(authz)


def test_tcp_listener_rules_take_only_from():
    message = check({"rules": [{"name": "r", "action": "allow", "paths": ["/x"]}]}, "tcp")
    assert "listeners[0].authz.rules[0].paths: not allowed on a tcp listener" in message
    message = check({"rules": [{"name": "r", "action": "deny", "methods": "GET"}]}, "tcp")
    assert "listeners[0].authz.rules[0].methods: not allowed on a tcp listener" in message


def tls_exchange(addr: tuple[str, int], creds: Creds | None, ids: Ids, data: bytes) -> bytes:
    """Send `data` over mTLS (plaintext without creds); what comes back before the close."""
    with connect(addr) as raw:
        if creds is None:
            raw.sendall(data)
            return read_until_close(raw, 5)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(ids.b.bundle))
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
        with ctx.wrap_socket(raw) as sock:
            try:
                sock.sendall(data)
                sock.settimeout(5)
                got = sock.recv(100)
                if got:
                    sock.shutdown(socket.SHUT_WR)
                return got + read_until_close(sock, 5)
            except (ssl.SSLError, ConnectionError):
                return b""


def test_tcp_connections_are_authorized_by_caller(run_proxy, tcp_server, ids):
    echo = tcp_server(echo_handler)
    policy = {
        "default": "deny",
        "rules": [
            {"name": "shop", "action": "allow", "from": [f"spiffe://{DOMAIN}/ns/shop/*"]},
            {"name": "no-c", "action": "deny", "from": [sid("c")]},
        ],
    }
    listener = {
        "name": "tcpin",
        "listen": "127.0.0.1:0",
        "protocol": "tcp",
        "cluster": "echo",
        "mtls": "permissive",
        "authz": policy,
    }
    cfg = config([listener], [cluster("echo", [echo.addr])])
    cfg["identity"] = ids.b.identity()
    b = run_proxy(cfg)
    addr = b.addr("tcpin")
    assert tls_exchange(addr, ids.a, ids, b"from a") == b"from a"
    assert tls_exchange(addr, ids.c, ids, b"from c") == b""  # deny wins over the shop glob
    assert tls_exchange(addr, ids.ops, ids, b"from ops") == b""  # default deny
    assert tls_exchange(addr, None, ids, b"plaintext") == b""  # no identity: default deny
    metrics = b.metrics()
    assert metrics.get("authz_allow_total", listener="tcpin", rule="shop") == 1
    assert metrics.get("authz_deny_total", listener="tcpin", rule="no-c") == 1
    assert metrics.get("authz_deny_total", listener="tcpin", rule="default") == 2
    assert metrics.get("inbound_connections_total", listener="tcpin", client_id=OPS) == 1


def test_valid_policies_load():
    ok = {
        "listeners": [
            {
                "name": "in",
                "listen": "127.0.0.1:0",
                "authz": {
                    "default": "allow",
                    "rules": [
                        {"name": "all-of-td", "action": "deny", "from": [f"spiffe://{DOMAIN}/*"]},
                        {"name": "one", "action": "allow", "methods": "get", "paths": ["/"]},
                    ],
                },
                "routes": [{"cluster": "c"}],
            }
        ],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"]}],
    }
    loaded = loads_config(yaml.safe_dump(ok))
    rules = loaded.listeners[0].authz.rules
    assert rules[0].from_ == [f"spiffe://{DOMAIN}/*"]
    assert rules[1].methods == ["GET"]
    assert loads_config(yaml.safe_dump({**ok, "listeners": [{**ok["listeners"][0], "authz": {}}]}))
