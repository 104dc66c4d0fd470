"""A self-issued mesh identity (development): the sidecar issues its own certificate from a
CA directory and renews it at `renew_at` of its lifetime. Under continuous load through
A (tls: mesh) -> B (mtls: strict) -> app, with 3-second certificates, no request fails while
both sidecars rotate several times."""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from helpers import client, cluster, config, connect, http_listener

from meshpy.ca import CertificateAuthority, write_pem_files
from meshpy.config import parse_config
from meshpy.errors import ConfigError
from meshpy.proxy import Sidecar

DOMAIN = "example.org"


def sid(service: str) -> str:
    return f"spiffe://{DOMAIN}/ns/shop/sa/{service}"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("selfissue") / "dev-ca"
    CertificateAuthority.create_root(DOMAIN).save(path)
    return path


def self_issued(ca_dir: Path, service: str, **extra: object) -> dict:
    return {"ca": str(ca_dir), "service": service, "namespace": "shop", **extra}


def served_serial(addr: tuple[str, int], ca_dir: Path, tmp: Path) -> int:
    """The serial of the certificate B presents, seen by a mesh client."""
    creds = write_pem_files(tmp, CertificateAuthority.load(ca_dir).issue("probe", "shop", "1h"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(creds["bundle.pem"]))
    ctx.load_cert_chain(str(creds["cert.pem"]), str(creds["key.pem"]))
    with connect(addr) as raw, ctx.wrap_socket(raw) as sock:
        der = sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_under_load_fails_no_request(run_proxy, upstream, ca_dir, tmp_path):
    to_app = {"name": "app", "match": {"path_prefix": "/"}, "cluster": "app"}
    b_cfg = config(
        [http_listener([to_app], name="inbound", mtls="strict")],
        [cluster("app", [upstream.addr])],
    )
    b_cfg["identity"] = self_issued(ca_dir, "b", ttl="3s")
    b = run_proxy(b_cfg)
    host, port = b.addr("inbound")
    to_b = {"name": "to-b", "match": {"path_prefix": "/"}, "cluster": "b"}
    a_cfg = config(
        [http_listener([to_b], name="outbound")],
        [cluster("b", [f"{host}:{port}"], tls="mesh", server_identity=sid("b"))],
    )
    a_cfg["identity"] = self_issued(ca_dir, "a", ttl="3s", renew_at=0.5)
    a = run_proxy(a_cfg)

    first_serial = served_serial(b.addr("inbound"), ca_dir, tmp_path / "p1")
    results: list[int | str] = []
    stop = threading.Event()

    def load(fresh_connections: bool) -> None:
        with client() as keepalive:
            while not stop.is_set():
                try:
                    if fresh_connections:
                        with client() as c:
                            r = c.get(a.url("outbound") + "/load")
                    else:
                        r = keepalive.get(a.url("outbound") + "/load")
                    results.append(r.status_code)
                except Exception as exc:  # any failure counts
                    results.append(repr(exc))

    threads = [threading.Thread(target=load, args=(fresh,)) for fresh in (False, True, True)]
    for t in threads:
        t.start()
    time.sleep(10)
    stop.set()
    for t in threads:
        t.join(15)

    failed = [r for r in results if r != 200]
    assert len(results) > 100
    assert failed == [], failed[:10]
    assert b.stderr().count(f"identity {sid('b')} renewed") >= 3, b.stderr()
    assert a.stderr().count(f"identity {sid('a')} renewed") >= 3, a.stderr()
    assert served_serial(b.addr("inbound"), ca_dir, tmp_path / "p2") != first_serial
    assert b.config_version() >= 4


def test_sidecar_issues_into_a_private_directory_removed_at_shutdown(tmp_path, ca_dir, upstream):
    cfg = config(
        [http_listener([{"cluster": "app"}], name="inbound", mtls="strict")],
        [cluster("app", [upstream.addr])],
    )
    cfg["identity"] = self_issued(ca_dir, "payments", ttl="1h")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sidecar = Sidecar(path)
    try:
        identity = sidecar.config.identity
        assert identity is not None and identity.cert is not None
        directory = Path(identity.cert).parent.parent
        assert directory.name.startswith("meshpy-identity-")
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert Path(identity.key).exists() and Path(identity.bundle).exists()
        before = sidecar.version
        assert sidecar.renew_identity()
        assert sidecar.version == before + 1
        assert Path(identity.cert).exists()
    finally:
        sidecar.shutdown(0.1)
    assert not directory.exists()


def test_a_failed_renewal_keeps_the_certificate_and_retries(tmp_path, ca_dir, upstream, caplog):
    cfg = config(
        [http_listener([{"cluster": "app"}], name="inbound", mtls="strict")],
        [cluster("app", [upstream.addr])],
    )
    moving = tmp_path / "ca"
    shutil.copytree(ca_dir, moving)
    cfg["identity"] = self_issued(moving, "payments", ttl="1h")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with Sidecar(path) as sidecar:
        cert = sidecar.config.identity.cert
        shutil.rmtree(moving)
        with caplog.at_level("ERROR", logger="meshpy.proxy"):
            assert not sidecar.renew_identity()
        assert "identity renewal failed, retrying in 0.5s" in caplog.text
        assert "no such CA directory" in caplog.text
        assert sidecar.config.identity.cert == cert and Path(cert).exists()
        shutil.copytree(ca_dir, moving)
        assert sidecar.renew_identity()


BASE = {
    "listeners": [
        {"name": "in", "listen": "127.0.0.1:0", "mtls": "strict", "routes": [{"cluster": "c"}]}
    ],
    "clusters": [{"name": "c", "endpoints": ["127.0.0.1:1"]}],
}
EITHER = "identity: give either cert, key and bundle, or ca, service and namespace"


@pytest.mark.parametrize(
    ("identity", "error"),
    [
        ({"ca": "CA", "service": "b"}, f"{EITHER} (missing namespace)"),
        (
            {"cert": "c", "key": "k", "bundle": "b", "ca": "CA"},
            f"{EITHER}, not both (found cert, key, bundle, ca)",
        ),
        ({"min_tls": "1.3"}, f"{EITHER} (missing cert, key, bundle)"),
        (
            {"cert": "c", "key": "k", "bundle": "b", "ttl": "1h"},
            "identity: ttl applies only to a self-issued identity (with ca)",
        ),
        (
            {"ca": "CA", "service": "a/b", "namespace": "shop"},
            "identity.service: invalid service name 'a/b':",
        ),
        ({"ca": "CA", "service": "a", "namespace": ".."}, "identity.namespace: invalid namespace"),
        (
            {"ca": "CA", "service": "a", "namespace": "s", "ttl": "0s"},
            "identity.ttl: expected a ttl of at least 1s, got '0s'",
        ),
        (
            {"ca": "CA", "service": "a", "namespace": "s", "renew_at": 1},
            "identity.renew_at: expected a fraction of the lifetime between 0 and 1, got 1",
        ),
        ({"ca": "missing", "service": "a", "namespace": "s"}, "identity.ca: "),
    ],
)
def test_bad_identity_shapes_name_the_field(identity, error, ca_dir, tmp_path):
    identity = {k: (str(ca_dir) if v == "CA" else v) for k, v in identity.items()}
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "identity": identity}, base_dir=tmp_path)
    assert any(line.startswith(error) for line in info.value.errors), info.value.errors


def test_the_self_issue_shape_validates(ca_dir, tmp_path):
    identity = self_issued(ca_dir, "payments", ttl="1h", renew_at=0.67, min_tls="1.3")
    parsed = parse_config({**BASE, "identity": identity}, base_dir=tmp_path).identity
    assert parsed is not None and parsed.self_issued
    assert (parsed.ttl, parsed.renew_at, parsed.cert) == (3600.0, 0.67, None)


@pytest.mark.parametrize(("ttl", "warnings"), [("3s", 1), ("1h", 0)])
def test_file_mode_warns_once_about_a_certificate_near_expiry(
    tmp_path, ca_dir, upstream, caplog, ttl, warnings
):
    files = write_pem_files(
        tmp_path / "id", CertificateAuthority.load(ca_dir).issue("b", "shop", ttl)
    )
    cfg = config(
        [http_listener([{"cluster": "app"}], name="inbound", mtls="strict")],
        [cluster("app", [upstream.addr])],
    )
    cfg["identity"] = {name: str(files[f"{name}.pem"]) for name in ("cert", "key", "bundle")}
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with Sidecar(path) as sidecar, caplog.at_level("WARNING", logger="meshpy.proxy"):
        sidecar._poll()
        sidecar._poll()
    assert caplog.text.count("has not been replaced yet") == warnings, caplog.text


def test_a_config_reload_keeps_the_certificate_unless_the_identity_changes(
    tmp_path, ca_dir, upstream
):
    cfg = config(
        [http_listener([{"cluster": "app"}], name="inbound", mtls="strict")],
        [cluster("app", [upstream.addr])],
    )
    cfg["identity"] = self_issued(ca_dir, "payments", ttl="1h")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with Sidecar(path) as sidecar:
        first = sidecar.config.identity.cert
        cfg["identity"]["renew_at"] = 0.5
        path.write_text(yaml.safe_dump(cfg))
        assert sidecar.reload()
        assert sidecar.config.identity.cert == first
        cfg["identity"]["service"] = "orders"
        path.write_text(yaml.safe_dump(cfg))
        assert sidecar.reload()
        assert sidecar.config.identity.cert != first
        cert = x509.load_pem_x509_certificate(Path(sidecar.config.identity.cert).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sid("orders")]
