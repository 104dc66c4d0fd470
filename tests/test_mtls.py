"""Mutual TLS between sidecars, with real peers: client -> sidecar A (plain outbound) -> mTLS
-> sidecar B (inbound, strict or permissive) -> app. Certificates come from meshpy.ca; the
rejections (plaintext, another CA, an expired certificate, the wrong server identity, no
client certificate) are each checked against a real client, OpenSSL's s_client included."""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import client, cluster, config, connect, eventually, http_listener, read_until_close
from servers import echo_handler, wait_for

from meshpy.ca import CertificateAuthority, write_pem_files
from meshpy.errors import ConfigError
from meshpy.proxy import Sidecar

DOMAIN = "example.org"


def sid(service: str) -> str:
    return f"spiffe://{DOMAIN}/ns/shop/sa/{service}"


@dataclass
class Creds:
    cert: Path
    key: Path
    bundle: Path

    def identity(self, **extra: str) -> dict:
        return {"cert": str(self.cert), "key": str(self.key), "bundle": str(self.bundle), **extra}


@dataclass
class Pki:
    ca: CertificateAuthority
    a: Creds
    b: Creds
    other_ca: Creds  # signed by an unrelated root of the same trust domain name
    expired: Creds
    dir: Path


def issue(ca: CertificateAuthority, out: Path, service: str, ttl: str | float = "1h") -> Creds:
    paths = write_pem_files(out, ca.issue(service, "shop", ttl))
    return Creds(paths["cert.pem"], paths["key.pem"], paths["bundle.pem"])


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("mtls")
    ca = CertificateAuthority.create_root(DOMAIN)
    other = CertificateAuthority.create_root(DOMAIN)
    expired = issue(ca, d / "expired", "a", ttl=1)
    pki = Pki(
        ca=ca,
        a=issue(ca, d / "a", "a"),
        b=issue(ca, d / "b", "b"),
        other_ca=issue(other, d / "other", "a"),
        expired=expired,
        dir=d,
    )
    # The one-second certificate is past its end (validity is checked to the second).
    time.sleep(2.2)
    return pki


def inbound_config(pki: Pki, upstream_addr: str, mode: str = "strict", **listener: object) -> dict:
    route = {"name": "app", "match": {"path_prefix": "/"}, "cluster": "app"}
    cfg = config(
        [http_listener([route], name="inbound", mtls=mode, **listener)],
        [cluster("app", [upstream_addr])],
    )
    cfg["identity"] = pki.b.identity()
    return cfg


def outbound_config(pki: Pki, b_addr: tuple[str, int], **mesh: str) -> dict:
    route = {"name": "to-b", "match": {"path_prefix": "/"}, "cluster": "b"}
    cfg = config(
        [http_listener([route], name="outbound")],
        [cluster("b", [f"{b_addr[0]}:{b_addr[1]}"], tls="mesh", **mesh)],
    )
    cfg["identity"] = pki.a.identity()
    return cfg


def xfcc(response: httpx.Response) -> list[str]:
    return [v for k, v in response.json()["headers"] if k == "x-forwarded-client-cert"]


def tls_context(creds: Creds | None, pki: Pki, alpn: str = "http/1.1") -> ssl.SSLContext:
    """A client context trusting the mesh CA, presenting `creds` (no host name: SPIFFE IDs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(pki.b.bundle))
    if creds is not None:
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
    ctx.set_alpn_protocols([alpn])
    return ctx


def mtls_get(addr: tuple[str, int], creds: Creds | None, pki: Pki) -> bytes:
    """Send one HTTP/1.1 request over TLS; returns what came back before the close.

    A refused client certificate (TLS 1.3) surfaces after the client's handshake is done,
    as an alert or a close on the first read: that is returned as b"" too.
    """
    with connect(addr) as raw, tls_context(creds, pki).wrap_socket(raw) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        try:
            return read_until_close(sock, 5)
        except (ssl.SSLError, ConnectionError):
            return b""


@pytest.fixture
def mesh(run_proxy, upstream, pki):
    """Sidecar B (inbound, strict) in front of the echo app, sidecar A (outbound) to B."""

    def start(a_mesh: dict | None = None, b_files: dict | None = None, b_cfg: dict | None = None):
        b = run_proxy(b_cfg or inbound_config(pki, upstream.addr), files=b_files)
        a = run_proxy(outbound_config(pki, b.addr("inbound"), **(a_mesh or {})))
        return a, b

    return start


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_two_sidecars_carry_the_caller_identity(mesh, pki, http2):
    a, b = mesh({"server_identity": sid("b")})
    forged = "By=spiffe://evil/x;URI=spiffe://example.org/ns/shop/sa/admin"
    with client(http1=not http2, http2=http2) as c:
        r = c.get(a.url("outbound") + "/hello", headers={"x-forwarded-client-cert": forged})
    assert r.status_code == 200, r.text
    echo = r.json()
    assert echo["path"] == "/hello"
    assert echo["http_version"] == ("2" if http2 else "1.1")
    assert xfcc(r) == [f"By={sid('b')};URI={sid('a')}"]
    assert ["x-forwarded-proto", "https"] in echo["headers"]
    metrics = b.metrics()
    assert metrics.get("inbound_requests_total", listener="inbound", client_id=sid("a")) == 1
    assert metrics.get("inbound_connections_total", listener="inbound", client_id=sid("a")) >= 1
    assert a.metrics().get("upstream_connect_total", cluster="b") >= 1


def test_any_identity_of_the_trust_domain_when_server_identity_is_omitted(mesh):
    a, _ = mesh()
    with client() as c:
        r = c.get(a.url("outbound") + "/x")
    assert r.status_code == 200, r.text
    assert xfcc(r) == [f"By={sid('b')};URI={sid('a')}"]


def test_a_filter_sees_the_caller_identity(mesh, pki, upstream):
    module = (
        "import meshpy\n\n"
        "class Who(meshpy.Filter):\n"
        "    def on_request(self, req):\n"
        "        return meshpy.Response(200, (req.identity or 'none').encode())\n"
    )
    cfg = inbound_config(pki, upstream.addr)
    cfg["listeners"][0]["routes"][0]["filters"] = ["mod:Who"]
    a, _ = mesh(b_cfg=cfg, b_files={"mod.py": module})
    with client() as c:
        r = c.get(a.url("outbound") + "/who")
    assert r.status_code == 200
    assert r.text == sid("a")


def test_wrong_server_identity_is_a_503_naming_the_mismatch(mesh):
    a, _ = mesh({"server_identity": sid("payments")})
    with client() as c:
        r = c.get(a.url("outbound") + "/x")
    assert r.status_code == 503
    assert 'cluster "b"' in r.text
    assert r.text.endswith(
        f"TLS handshake failed: invalid peer certificate: peer identity {sid('b')}"
        f" is not the expected {sid('payments')}\n"
    ), r.text
    assert a.metrics().get("upstream_connect_errors_total", cluster="b") >= 1


def test_strict_refuses_plaintext(run_proxy, upstream, pki):
    b = run_proxy(inbound_config(pki, upstream.addr), "--log-level", "debug")
    with connect(b.addr("inbound")) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        data = read_until_close(sock, 5)
    assert b"HTTP/" not in data
    eventually(lambda: _logged(b, "mTLS connection refused: handshake failed"))


def _logged(proxy, text: str) -> None:
    assert text in proxy.stderr()


@pytest.mark.parametrize("who", ["other_ca", "expired", "none"])
def test_strict_refuses_bad_client_certificates(run_proxy, upstream, pki, who):
    b = run_proxy(inbound_config(pki, upstream.addr), "--log-level", "debug")
    # The control: the same request with a good certificate is answered.
    assert mtls_get(b.addr("inbound"), pki.a, pki).startswith(b"HTTP/1.1 200")
    creds = None if who == "none" else getattr(pki, who)
    assert b"HTTP/" not in mtls_get(b.addr("inbound"), creds, pki)
    # The other root has the same name (same trust domain): its signature is what fails.
    reason = {
        "other_ca": "BadSignature",
        "expired": "certificate expired",
        "none": "peer sent no certificates",
    }
    eventually(lambda: _logged(b, "mTLS connection refused"))
    eventually(lambda: _logged(b, reason[who]))


def test_permissive_accepts_plaintext_and_mtls(run_proxy, upstream, pki):
    b = run_proxy(inbound_config(pki, upstream.addr, mode="permissive"))
    forged = {"x-forwarded-client-cert": "By=x;URI=spiffe://example.org/ns/shop/sa/admin"}
    with client() as c:
        plain = c.get(b.url("inbound") + "/plain", headers=forged)
    assert plain.status_code == 200
    assert xfcc(plain) == []  # removed, and nothing vouched for
    with client(http1=False, http2=True) as c:  # h2c prior knowledge still detected
        assert c.get(b.url("inbound") + "/h2c").json()["http_version"] == "2"
    answer = mtls_get(b.addr("inbound"), pki.a, pki)
    assert answer.startswith(b"HTTP/1.1 200")
    assert f"By={sid('b')};URI={sid('a')}".encode() in answer
    metrics = b.metrics()
    assert metrics.get("inbound_requests_total", listener="inbound", client_id="") == 2
    assert metrics.get("inbound_requests_total", listener="inbound", client_id=sid("a")) == 1


def s_client(
    addr: tuple[str, int], *args: str, request: bytes = b""
) -> subprocess.CompletedProcess:
    """Without `request`, s_client quits after the handshake; with it, it waits for the answer."""
    wait = ["-ign_eof"] if request else []
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{addr[0]}:{addr[1]}", *wait, *args],
        input=request,
        capture_output=True,
        timeout=20,
    )


def test_openssl_negotiates_tls13_aead_and_h2(run_proxy, upstream, pki):
    b = run_proxy(inbound_config(pki, upstream.addr))
    addr = b.addr("inbound")
    common = ["-CAfile", str(pki.b.bundle), "-verify_return_error"]
    ok = s_client(
        addr, *common, "-cert", str(pki.a.cert), "-key", str(pki.a.key), "-alpn", "h2,http/1.1"
    )
    out = ok.stdout.decode(errors="replace")
    assert "New, TLSv1.3, Cipher is TLS_" in out, out
    cipher = out.split("Cipher is ", 1)[1].split()[0]
    assert cipher in (
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    )
    assert "ALPN protocol: h2" in out
    assert "Verify return code: 0 (ok)" in out

    # TLS 1.2 is off unless identity.min_tls says "1.2".
    old = s_client(addr, *common, "-cert", str(pki.a.cert), "-key", str(pki.a.key), "-tls1_2")
    assert old.returncode != 0
    assert "New, TLSv1.2" not in old.stdout.decode(errors="replace")

    # No client certificate: the server's alert comes after the client's side of the TLS 1.3
    # handshake, so send a request and check that no HTTP response comes back.
    request = b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    refused = s_client(addr, *common, "-alpn", "http/1.1", request=request)
    text = (refused.stdout + refused.stderr).decode(errors="replace")
    assert "HTTP/1.1" not in text
    assert "certificate required" in text, text


def test_min_tls_12_allows_tls12(run_proxy, upstream, pki):
    cfg = inbound_config(pki, upstream.addr)
    cfg["identity"]["min_tls"] = "1.2"
    b = run_proxy(cfg)
    args = ["-cert", str(pki.a.cert), "-key", str(pki.a.key), "-CAfile", str(pki.b.bundle)]
    r = s_client(b.addr("inbound"), *args, "-tls1_2")
    out = r.stdout.decode(errors="replace")
    assert "New, TLSv1.2, Cipher is ECDHE-" in out, out
    assert "GCM" in out or "CHACHA20" in out


def test_tcp_listeners_over_mtls(run_proxy, tcp_server, pki):
    echo = tcp_server(echo_handler)
    b_cfg = config(
        [
            {
                "name": "tcpin",
                "listen": "127.0.0.1:0",
                "protocol": "tcp",
                "cluster": "echo",
                "mtls": "strict",
            }
        ],
        [cluster("echo", [echo.addr])],
    )
    b_cfg["identity"] = pki.b.identity()
    b = run_proxy(b_cfg)
    host, port = b.addr("tcpin")
    a_cfg = config(
        [{"name": "tcpout", "listen": "127.0.0.1:0", "protocol": "tcp", "cluster": "b"}],
        [cluster("b", [f"{host}:{port}"], tls="mesh", server_identity=sid("b"))],
    )
    a_cfg["identity"] = pki.a.identity()
    a = run_proxy(a_cfg)
    payload = bytes(range(256)) * 1000
    with connect(a.addr("tcpout")) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = b""
        while len(got) < len(payload):
            data = sock.recv(65536)
            assert data, "closed early"
            got += data
        sender.join()
    assert got == payload
    # Plaintext straight to B's strict tcp listener is refused (with a TLS alert at most).
    with connect((host, port)) as sock:
        sock.sendall(b"hello\n")
        assert b"hello" not in read_until_close(sock, 5)
    metrics = b.metrics()
    assert metrics.get("inbound_connections_total", listener="tcpin", client_id=sid("a")) == 1
    assert metrics.get("inbound_connections_total", listener="tcpin", client_id="") == 0


def test_permissive_tcp_listener_takes_plaintext_and_mtls(run_proxy, tcp_server, pki):
    echo = tcp_server(echo_handler)
    listener = {"name": "tcpin", "listen": "127.0.0.1:0", "protocol": "tcp", "cluster": "echo"}
    b_cfg = config([{**listener, "mtls": "permissive"}], [cluster("echo", [echo.addr])])
    b_cfg["identity"] = pki.b.identity()
    b = run_proxy(b_cfg)
    with connect(b.addr("tcpin")) as sock:
        sock.sendall(b"plain bytes")
        assert sock.recv(100) == b"plain bytes"
    with connect(b.addr("tcpin")) as raw, tls_context(pki.a, pki).wrap_socket(raw) as sock:
        sock.sendall(b"secret bytes")
        assert sock.recv(100) == b"secret bytes"
    metrics = b.metrics()
    assert metrics.get("inbound_connections_total", listener="tcpin", client_id="") == 1
    assert metrics.get("inbound_connections_total", listener="tcpin", client_id=sid("a")) == 1


# --- identity config ----------------------------------------------------------------------------


def _self_signed(path: Path, uris: list[str]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names.append(x509.DNSName("localhost"))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    path.mkdir(parents=True, exist_ok=True)
    (path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path / "cert.pem", path / "key.pem"


def _refused(tmp_path: Path, identity: dict) -> str:
    cfg = {
        "identity": identity,
        "listeners": [
            {"name": "in", "listen": "127.0.0.1:0", "mtls": "strict", "routes": [{"cluster": "c"}]}
        ],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"]}],
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as caught:
        Sidecar(path, workers=1).shutdown()
    return str(caught.value)


def test_identity_files_are_checked(tmp_path, pki):
    no_san, no_san_key = _self_signed(tmp_path / "nosan", [])
    two, two_key = _self_signed(tmp_path / "two", [sid("a"), sid("b")])
    bundle = str(pki.a.bundle)
    message = _refused(tmp_path, {"cert": str(no_san), "key": str(no_san_key), "bundle": bundle})
    assert "identity.cert: the certificate has no spiffe:// URI SAN" in message
    message = _refused(tmp_path, {"cert": str(two), "key": str(two_key), "bundle": bundle})
    assert (
        "identity.cert: the certificate has 2 spiffe:// URI SANs, expected exactly one" in message
    )
    message = _refused(tmp_path, {"cert": str(pki.a.cert), "key": str(pki.b.key), "bundle": bundle})
    assert "identity.cert: the certificate does not match the key" in message
    missing = str(tmp_path / "missing.pem")
    message = _refused(
        tmp_path, {"cert": str(pki.a.cert), "key": str(pki.a.key), "bundle": missing}
    )
    assert f"identity.bundle: cannot read certificate {missing}" in message


def test_identity_config_is_validated(tmp_path):
    from meshpy.config import parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "identity": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem", "min_tls": "1.1"},
                "listeners": [
                    {
                        "name": "in",
                        "listen": "127.0.0.1:0",
                        "mtls": "sometimes",
                        "routes": [{"cluster": "c"}],
                    }
                ],
                "clusters": [
                    {
                        "name": "c",
                        "endpoints": ["127.0.0.1:1"],
                        "tls": "mesh",
                        "server_identity": "c",
                    }
                ],
            },
            tmp_path,
        )
    assert caught.value.errors == [
        "identity.min_tls: expected one of 1.2, 1.3, got '1.1'",
        "listeners[0].mtls: expected one of strict, permissive, got 'sometimes'",
        "clusters[0].server_identity: expected a SPIFFE ID such as"
        " spiffe://example.org/ns/shop/sa/payments, got 'c'",
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "listeners": [
                    {
                        "name": "in",
                        "listen": "127.0.0.1:0",
                        "mtls": "strict",
                        "tls": {"cert": "c.pem", "key": "k.pem"},
                        "routes": [{"cluster": "c"}],
                    }
                ],
                "clusters": [
                    {"name": "c", "endpoints": ["127.0.0.1:1"], "server_identity": sid("b")}
                ],
            },
            tmp_path,
        )
    assert caught.value.errors == [
        "listeners[0].mtls: needs the top-level identity (cert, key, bundle)",
        "listeners[0].mtls: cannot be combined with tls",
        "clusters[0].server_identity: only used with tls: mesh",
    ]


# --- rotation -----------------------------------------------------------------------------------


def test_rotation_keeps_open_connections_and_pools(run_proxy, upstream, pki, tmp_path):
    a_creds, b_creds = issue(pki.ca, tmp_path / "a", "a"), issue(pki.ca, tmp_path / "b", "b")
    b_cfg = inbound_config(pki, upstream.addr)
    b_cfg["identity"] = b_creds.identity()
    b = run_proxy(b_cfg)
    a_cfg = outbound_config(pki, b.addr("inbound"), server_identity=sid("b"))
    a_cfg["identity"] = a_creds.identity()
    a = run_proxy(a_cfg)
    with client() as c:
        assert c.get(a.url("outbound") + "/before").status_code == 200
        issue(pki.ca, tmp_path / "a", "a")
        issue(pki.ca, tmp_path / "b", "b")
        eventually(lambda: _logged(a, "identity files reloaded"))
        eventually(lambda: _logged(b, "identity files reloaded"))
        assert c.get(a.url("outbound") + "/after").status_code == 200
    # The second request went over the first mTLS connection: pool and connection were kept.
    assert a.metrics().get("upstream_connect_total", cluster="b") == 1
    metrics = b.metrics()
    assert metrics.get("inbound_connections_total", listener="inbound", client_id=sid("a")) == 1
    assert metrics.get("inbound_requests_total", listener="inbound", client_id=sid("a")) == 2


def test_short_lived_certificates_rotate_under_load(run_proxy, upstream, pki, tmp_path):
    """Certificates of 4 s re-issued every second: zero failed requests, and once the first ones
    have expired, new connections (a burst the pool must open them for) still succeed."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_creds, b_creds = issue(pki.ca, a_dir, "a", ttl=4), issue(pki.ca, b_dir, "b", ttl=4)
    first_expiry = time.monotonic() + 3
    b_cfg = inbound_config(pki, upstream.addr)
    b_cfg["identity"] = b_creds.identity()
    b = run_proxy(b_cfg)
    a_cfg = outbound_config(pki, b.addr("inbound"), server_identity=sid("b"))
    a_cfg["identity"] = a_creds.identity()
    a = run_proxy(a_cfg)

    stop = threading.Event()
    results: list[int | str] = []

    def load() -> None:
        with client() as c:
            while not stop.is_set():
                try:
                    results.append(c.get(a.url("outbound") + "/load").status_code)
                except httpx.HTTPError as exc:
                    results.append(repr(exc))

    def rotate() -> None:
        while not stop.wait(1.0):
            issue(pki.ca, a_dir, "a", ttl=4)
            issue(pki.ca, b_dir, "b", ttl=4)

    threads = [threading.Thread(target=load), threading.Thread(target=rotate)]
    for t in threads:
        t.start()
    try:
        time.sleep(max(0.0, first_expiry - time.monotonic()) + 3)
        # The first certificates have expired: a burst makes the pool open new connections.
        with client(limits=httpx.Limits(max_connections=16)) as c:
            burst: list[int | str] = []

            def one() -> None:
                try:
                    burst.append(c.get(a.url("outbound") + "/delay?ms=300").status_code)
                except httpx.HTTPError as exc:
                    burst.append(repr(exc))

            workers = [threading.Thread(target=one) for _ in range(8)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [r for r in results + burst if r != 200]
    assert not failed, failed[:5]
    assert len(results) > 50
    assert burst == [200] * 8
    assert a.metrics().get("upstream_connect_total", cluster="b") >= 2
    assert b.stderr().count("identity files reloaded") >= 3
    assert a.stderr().count("identity files reloaded") >= 3
    # B now presents a certificate issued after the first one expired.
    with connect(b.addr("inbound")) as raw, tls_context(a_creds, pki).wrap_socket(raw) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    served = x509.load_der_x509_certificate(der)
    assert served.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)


def test_access_log_lines_carry_the_callers_identity(pki, run_proxy, upstream, tmp_path):
    import json

    log = tmp_path / "access.jsonl"
    b = run_proxy(inbound_config(pki, upstream.addr, access_log=str(log)))
    a = run_proxy(outbound_config(pki, b.addr("inbound")))
    with client() as c:
        ok = c.get(a.url("outbound") + "/orders?id=7", headers={"x-request-id": "req-1"})
        assert ok.status_code == 200
    wait_for(lambda: log.exists() and log.read_text().count("\n") == 1, 5, "the log line")
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["identity"] == sid("a")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/orders?id=7", 200)
    assert (line["listener"], line["route"], line["cluster"]) == ("inbound", "app", "app")
    assert line["request_id"] == "req-1"
    assert line["client"] == "127.0.0.1" and line["duration_ms"] > 0


def test_access_log_of_a_plain_listener(run_proxy, upstream, tmp_path):
    import json

    log = tmp_path / "plain.jsonl"
    route = {"name": "app", "match": {"path": "/known"}, "cluster": "app"}
    cfg = config(
        [http_listener([route], name="edge", access_log=str(log))],
        [cluster("app", [upstream.addr])],
    )
    proxy = run_proxy(cfg)
    with client() as c:
        assert c.get(proxy.url() + "/known").status_code == 200
        assert c.get(proxy.url() + "/unknown").status_code == 404
    wait_for(lambda: log.exists() and log.read_text().count("\n") == 2, 5, "two log lines")
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert [(x["path"], x["status"], x["route"], x["identity"]) for x in lines] == [
        ("/known", 200, "app", None),
        ("/unknown", 404, None, None),
    ]
    # The generated request id is the one the upstream got.
    assert all(len(x["request_id"]) == 36 for x in lines)
