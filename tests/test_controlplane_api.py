"""The control plane's API and the `meshpy` commands over it, against a real process.

One control plane serves the module (each test works in its own namespace); the
persistence test kills and restarts its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from cp import ControlPlaneProcess
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshpy.ca import CertificateAuthority, certificate_spiffe_id, generate_csr
from meshpy.controlplane.api import ControlPlane, create_app, openapi_document
from meshpy.controlplane.auth import sign_request
from meshpy.controlplane.models import PLURALS
from meshpy.controlplane.store import open_store

ROOT = Path(__file__).resolve().parent.parent
OPENAPI_FILE = ROOT / "docs" / "openapi.json"
UPDATE_OPENAPI = "MESHPY_UPDATE_OPENAPI"

SHOP = """\
kind: Service
metadata: {name: payments, namespace: shop}
spec: {lb: round_robin, timeout: 2s}
---
kind: Service
metadata: {name: checkout, namespace: shop}
---
kind: Route
metadata: {name: payments-v2, namespace: shop}
spec:
  host: payments
  match: {path_prefix: /v2/}
  service: payments
  priority: 10
---
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec:
  service: payments
  rules:
    - {name: checkout-pays, action: allow, from: [checkout], paths: ["/pay*"], methods: POST}
---
kind: FilterAttachment
metadata: {name: payments-audit, namespace: shop}
spec:
  service: payments
  filters:
    - "shop_filters:Audit": {level: 1}
"""


@pytest.fixture(scope="module")
def cp() -> Iterator[ControlPlaneProcess]:
    with ControlPlaneProcess() as control_plane:
        yield control_plane


@pytest.fixture(scope="module")
def admin(cp: ControlPlaneProcess) -> Iterator[httpx.Client]:
    with cp.admin_http() as client:
        yield client


def service(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"namespace": namespace, "name": name}, "spec": spec}


def route(namespace: str, name: str, target: str) -> dict[str, Any]:
    return {
        "kind": "Route",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"host": target, "service": target},
    }


def apply(admin: httpx.Client, *resources: dict[str, Any]) -> list[dict[str, Any]]:
    response = admin.post("/v1/apply", json={"resources": list(resources)})
    assert response.status_code == 200, response.text
    return response.json()


def revision(cp: ControlPlaneProcess) -> int:
    with cp.http() as client:
        return client.get("/v1/health").json()["revision"]


def join_token(admin: httpx.Client, namespace: str, service: str, ttl: str = "1h") -> str:
    response = admin.post(
        "/v1/tokens", json={"service": service, "namespace": namespace, "ttl": ttl}
    )
    assert response.status_code == 201, response.text
    return response.json()["token"]


class Workload:
    """A joined sidecar's credentials; its key never left this process."""

    def __init__(self, cp: ControlPlaneProcess, token: str) -> None:
        csr, self.key_pem = generate_csr()
        with cp.http() as client:
            response = client.post("/v1/join", json={"token": token, "csr": csr})
        assert response.status_code == 200, response.text
        self.chain_pem: str = response.json()["certificate"]

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.chain_pem.encode())

    def headers(self, method: str, target: str, body: bytes = b"") -> dict[str, str]:
        return sign_request(method, target, body, self.chain_pem, self.key_pem)


def signed(
    client: httpx.Client, workload: Workload, method: str, target: str, body: Any = None
) -> httpx.Response:
    content = json.dumps(body).encode() if body is not None else b""
    headers = {"content-type": "application/json", **workload.headers(method, target, content)}
    return client.request(method, target, content=content, headers=headers)


@pytest.fixture(scope="module")
def payments(cp: ControlPlaneProcess, admin: httpx.Client) -> Workload:
    """A joined sidecar of shop-id/payments."""
    apply(admin, service("shop-id", "payments"))
    return Workload(cp, join_token(admin, "shop-id", "payments"))


# --- 1. admin authentication -------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/v1/services", None),
    ("GET", "/v1/routes?namespace=authz", None),
    ("GET", "/v1/policies", None),
    ("GET", "/v1/filters", None),
    ("GET", "/v1/services/authz/kept", None),
    ("PUT", "/v1/services/authz/intruder", service("authz", "intruder")),
    ("DELETE", "/v1/services/authz/kept", None),
    ("POST", "/v1/apply", {"resources": [service("authz", "intruder")]}),
    ("GET", "/v1/tokens", None),
    ("POST", "/v1/tokens", {"service": "intruder", "namespace": "authz"}),
    ("DELETE", "/v1/tokens/0123456789abcdef", None),
    ("GET", "/v1/endpoints", None),
    ("POST", "/v1/endpoints", {"namespace": "authz", "service": "kept", "address": "10.0.0.9:80"}),
    ("DELETE", "/v1/endpoints/authz/kept/10.0.0.1:80", None),
    ("GET", "/v1/sidecars", None),
]


def state(cp: ControlPlaneProcess, admin: httpx.Client) -> tuple[Any, ...]:
    """What an unauthenticated call must not change."""
    lists = ("/v1/services?namespace=authz", "/v1/tokens", "/v1/endpoints?namespace=authz")
    return (revision(cp), *(admin.get(path).json() for path in lists))


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Basic YWRtaW46YWRtaW4=", "Bearer"],
    ids=["anonymous", "wrong-token", "basic-auth", "empty-bearer"],
)
def test_admin_endpoints_refuse_callers_without_the_admin_token(
    cp: ControlPlaneProcess, admin: httpx.Client, authorization: str | None
) -> None:
    apply(admin, service("authz", "kept"))
    registered = admin.post(
        "/v1/endpoints", json={"namespace": "authz", "service": "kept", "address": "10.0.0.1:80"}
    )
    assert registered.status_code == 201
    before = state(cp, admin)
    headers = {"authorization": authorization} if authorization is not None else {}
    with cp.http() as client:
        for method, path, body in ADMIN_CALLS:
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert state(cp, admin) == before


# --- 2. meshpy apply / get / validate ----------------------------------------------------------


def applied(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`meshpy apply` output as {kind/namespace/name: action}."""
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}


def test_apply_get_and_apply_back_through_the_cli(cp: ControlPlaneProcess, tmp_path: Path) -> None:
    shop = tmp_path / "shop.yaml"
    shop.write_text(SHOP)
    validated = cp.meshpy("validate", str(shop))
    assert validated.returncode == 0, validated.stderr
    assert "ok (5 resources)" in validated.stdout

    names = [
        "service/shop/payments",
        "service/shop/checkout",
        "route/shop/payments-v2",
        "authorizationpolicy/shop/payments",
        "filterattachment/shop/payments-audit",
    ]
    assert applied(cp.meshpy("apply", "-f", str(shop))) == dict.fromkeys(names, "created")
    assert applied(cp.meshpy("apply", "-f", str(shop))) == dict.fromkeys(names, "unchanged")

    changed = tmp_path / "changed.yaml"
    changed.write_text(SHOP.replace("lb: round_robin", "lb: least_request"))
    assert applied(cp.meshpy("apply", "-f", str(changed))) == {
        **dict.fromkeys(names, "unchanged"),
        "service/shop/payments": "configured",
    }

    table = cp.meshpy("get", "services", "-n", "shop")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "VERSION", "SPEC"]
    assert {tuple(row.split()[:2]) for row in rows} == {("shop", "payments"), ("shop", "checkout")}
    assert "lb=least_request timeout=2.0s" in table.stdout

    listed = []
    for kind in ("services", "routes", "policies", "filters"):
        result = cp.meshpy("get", kind, "-n", "shop", "-o", "yaml")
        assert result.returncode == 0, result.stderr
        documents = list(yaml.safe_load_all(result.stdout))
        assert documents and all(doc["metadata"]["version"] > 0 for doc in documents)
        listed.append(result.stdout)
    assert [doc["kind"] for doc in yaml.safe_load_all("---\n".join(listed))] == [
        "Service",
        "Service",
        "Route",
        "AuthorizationPolicy",
        "FilterAttachment",
    ]
    round_trip = tmp_path / "listed.yaml"
    round_trip.write_text("---\n".join(listed))
    assert applied(cp.meshpy("apply", "-f", str(round_trip))) == dict.fromkeys(names, "unchanged")


# --- 3. invalid changes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (service("bad", "payments", lb="fastest"), "spec.lb: expected one of"),
        (
            service("bad", "payments", timout="2s"),
            "spec.timout: unknown field (did you mean 'timeout'?",
        ),
        (route("bad", "to-nowhere", "nowhere"), "spec.service: no Service bad/nowhere"),
    ],
    ids=["bad-lb", "unknown-field", "dangling-route"],
)
def test_invalid_resources_are_refused_with_the_field_and_nothing_is_written(
    cp: ControlPlaneProcess, admin: httpx.Client, resource: dict[str, Any], expected: str
) -> None:
    before = revision(cp)
    put = admin.put(
        f"/v1/{PLURALS[resource['kind']]}/bad/{resource['metadata']['name']}", json=resource
    )
    assert put.status_code == 422
    assert expected in put.json()["detail"]

    # A batch with a valid resource first: the good one must not be written either.
    batch = [service("bad", "fine"), resource]
    applied = admin.post("/v1/apply", json={"resources": batch})
    assert applied.status_code == 422
    assert any(expected in line for line in applied.json()["errors"]), applied.json()
    assert admin.get("/v1/services?namespace=bad").json() == []
    assert revision(cp) == before


def test_cli_apply_of_a_bad_file_exits_1_with_the_field_path(
    cp: ControlPlaneProcess, admin: httpx.Client, tmp_path: Path
) -> None:
    before = revision(cp)
    bad_lb = tmp_path / "bad-lb.yaml"
    bad_lb.write_text(
        SHOP.replace("namespace: shop", "namespace: badcli").replace("round_robin", "x")
    )
    result = cp.meshpy("apply", "-f", str(bad_lb))
    assert result.returncode == 1
    assert "document 1: spec.lb: expected one of" in result.stderr

    # Valid on its own, so only the control plane can tell that the service is missing.
    dangling = tmp_path / "dangling.yaml"
    dangling.write_text(yaml.safe_dump_all([service("badcli", "a"), route("badcli", "r", "b")]))
    result = cp.meshpy("apply", "-f", str(dangling))
    assert result.returncode == 1
    assert "meshpy: 422: resources[1]: spec.service: no Service badcli/b" in result.stderr
    assert revision(cp) == before
    assert admin.get("/v1/services?namespace=badcli").json() == []


def test_deleting_a_service_a_route_refers_to_is_a_conflict(
    cp: ControlPlaneProcess, admin: httpx.Client
) -> None:
    apply(admin, service("refs", "payments"), route("refs", "pay", "payments"))
    response = admin.delete("/v1/services/refs/payments")
    assert response.status_code == 409
    assert "Route refs/pay" in response.json()["detail"]
    assert admin.get("/v1/services/refs/payments").status_code == 200

    assert admin.delete("/v1/routes/refs/pay").status_code == 204
    assert admin.delete("/v1/services/refs/payments").status_code == 204
    assert admin.get("/v1/services/refs/payments").status_code == 404


# --- 4. join tokens ----------------------------------------------------------------------------


def test_join_with_a_cli_token_and_a_csr_gives_a_certificate_of_the_tokens_service(
    cp: ControlPlaneProcess, tmp_path: Path
) -> None:
    created = cp.meshpy("token", "create", "--service", "payments", "-n", "shop")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()

    csr, key_pem = generate_csr()
    sent: list[bytes] = []
    with cp.http(event_hooks={"request": [lambda request: sent.append(request.read())]}) as client:
        response = client.post("/v1/join", json={"token": token, "csr": csr})
    assert response.status_code == 200, response.text
    answer = response.json()

    # Only the token and the CSR travelled: no private key.
    assert json.loads(sent[0]) == {"token": token, "csr": csr}
    assert b"PRIVATE KEY" not in sent[0]

    chain = x509.load_pem_x509_certificates(answer["certificate"].encode())
    leaf = chain[0]
    assert certificate_spiffe_id(leaf) == "spiffe://mesh.local/ns/shop/sa/payments"
    assert answer["spiffe_id"] == "spiffe://mesh.local/ns/shop/sa/payments"
    # Issued for the key that stayed here.
    kept_key = serialization.load_pem_private_key(key_pem.encode(), password=None).public_key()
    assert leaf.public_key() == kept_key
    assert answer["bundle"] == cp.ca_bundle.read_text()

    leaf_file, chain_file = tmp_path / "leaf.pem", tmp_path / "chain.pem"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    chain_file.write_text(answer["certificate"])
    verify = ["openssl", "verify", "-CAfile", str(cp.ca_bundle), "-untrusted", str(chain_file)]
    verified = subprocess.run([*verify, str(leaf_file)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_expired_tampered_and_revoked_tokens_are_refused(
    cp: ControlPlaneProcess, admin: httpx.Client
) -> None:
    short = cp.meshpy("token", "create", "--service", "payments", "-n", "shop", "--ttl", "1s")
    assert short.returncode == 0, short.stderr
    started = time.monotonic()
    revoked = admin.post("/v1/tokens", json={"service": "payments", "namespace": "shop"}).json()
    assert admin.delete(f"/v1/tokens/{revoked['id']}").status_code == 204
    good = join_token(admin, "shop", "payments")
    prefix, token_id, secret = good.split(".")
    tampered = [
        f"{prefix}.{token_id}.{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}",
        f"{prefix}.{token_id[:-1]}{'0' if token_id[-1] != '0' else '1'}.{secret}",
        f"{prefix}.{token_id}",
    ]
    time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))

    with cp.http() as client:
        for token in [short.stdout.strip(), revoked["token"], *tampered]:
            response = client.post("/v1/join", json={"token": token, "csr": generate_csr()[0]})
            assert response.status_code == 401, (token, response.text)
        # The good one still works: the refusals are about those tokens, not the endpoint.
        response = client.post("/v1/join", json={"token": good, "csr": generate_csr()[0]})
        assert response.status_code == 200, response.text


# --- 5. workload-signed requests ---------------------------------------------------------------


def test_signed_requests_are_accepted(cp: ControlPlaneProcess, payments: Workload) -> None:
    with cp.http() as client:
        config = signed(client, payments, "GET", "/v1/config")
        assert config.status_code == 200, config.text
        assert set(config.json()) == {"version", "hash", "config"}
        report = {"sidecar_id": "payments-1", "address": "127.0.0.1:15001"}
        assert signed(client, payments, "POST", "/v1/report", report).status_code == 200


def test_unsigned_or_missigned_requests_are_refused(
    cp: ControlPlaneProcess, payments: Workload
) -> None:
    report = json.dumps({"sidecar_id": "payments-1", "address": "127.0.0.1:15001"}).encode()
    json_type = {"content-type": "application/json"}
    with cp.http() as client:
        cases = {
            "unsigned": client.get("/v1/config"),
            "other path": client.get("/v1/config", headers=payments.headers("GET", "/v1/report")),
            "other query": client.get(
                "/v1/config?hash=x", headers=payments.headers("GET", "/v1/config")
            ),
            "other method": client.get(
                "/v1/config", headers=payments.headers("POST", "/v1/config")
            ),
            "other body": client.post(
                "/v1/report",
                content=report,
                headers={**json_type, **payments.headers("POST", "/v1/report", report + b" ")},
            ),
        }
    for case, response in cases.items():
        assert response.status_code == 401, (case, response.text)


@pytest.mark.parametrize("trust_domain", ["other.test", "mesh.local"])
def test_a_certificate_from_another_ca_is_refused(
    cp: ControlPlaneProcess, trust_domain: str
) -> None:
    # Same trust domain as the mesh or not: only this mesh's CA vouches for workloads.
    issued = CertificateAuthority.create_root(trust_domain).issue("payments", "shop-id")
    assert issued.key_pem is not None
    headers = sign_request("GET", "/v1/config", b"", issued.chain_pem, issued.key_pem)
    with cp.http() as client:
        response = client.get("/v1/config", headers=headers)
    assert response.status_code == 401
    assert "not issued by this mesh's CA" in response.json()["detail"]


def test_renewal_gives_a_new_certificate_for_the_same_identity(
    cp: ControlPlaneProcess, payments: Workload
) -> None:
    csr = generate_csr()[0]
    with cp.http() as client:
        response = signed(client, payments, "POST", "/v1/certificate", {"csr": csr})
    assert response.status_code == 200, response.text
    renewed = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    assert certificate_spiffe_id(renewed) == certificate_spiffe_id(payments.certificate)
    assert renewed.serial_number != payments.certificate.serial_number
    assert renewed.public_key() == x509.load_pem_x509_csr(csr.encode()).public_key()


# --- 6. long-poll config watch -----------------------------------------------------------------


def served_certificate(cp: ControlPlaneProcess) -> x509.Certificate:
    """The certificate a new handshake gets, verified as clients verify it (the bundle, the
    dates, the address as name)."""
    url = urlsplit(cp.url)
    assert url.hostname and url.port
    context = ssl.create_default_context(cafile=str(cp.ca_bundle))
    with (
        socket.create_connection((url.hostname, url.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=url.hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_control_plane_renews_its_own_certificate_while_it_runs() -> None:
    """Past two thirds of its lifetime the HTTPS certificate is replaced without a restart:
    new handshakes get the new one, and clients holding the same bundle keep working after
    the first certificate has expired."""
    with ControlPlaneProcess("--server-cert-ttl", "6s") as cp:
        first = served_certificate(cp)
        assert first.not_valid_after_utc - first.not_valid_before_utc < timedelta(seconds=90)
        seconds_left = (first.not_valid_after_utc - datetime.now(UTC)).total_seconds()
        time.sleep(max(seconds_left, 0) + 0.5)
        later = served_certificate(cp)
        assert later.serial_number != first.serial_number
        assert later.not_valid_after_utc > first.not_valid_after_utc
        with cp.admin_http() as admin:
            assert admin.get("/v1/endpoints").status_code == 200
        assert "renewed the control plane's certificate" in cp.stderr_path.read_text()


def test_a_failed_renewal_of_the_control_planes_certificate_is_tried_again() -> None:
    """A renewal that cannot write its files is logged, and tried again until it can, before
    the certificate in use expires."""
    with ControlPlaneProcess("--server-cert-ttl", "6s") as cp:
        first = served_certificate(cp)
        # The next renewal's files cannot replace a directory where one of them goes.
        blocked = cp.data_dir / "tls" / "bundle.pem"
        blocked.unlink()
        blocked.mkdir()
        (blocked / "keep").write_text("a non-empty directory cannot be renamed over")
        renew_at = first.not_valid_after_utc - timedelta(seconds=2)  # two thirds of 6 s in
        time.sleep(max((renew_at - datetime.now(UTC)).total_seconds(), 0) + 0.5)
        assert "cannot renew the control plane's certificate" in cp.stderr_path.read_text()
        assert served_certificate(cp).serial_number == first.serial_number
        shutil.rmtree(blocked)
        deadline = time.monotonic() + 5
        while "renewed the control plane's certificate" not in cp.stderr_path.read_text():
            assert time.monotonic() < deadline, "no renewal after the files could be written"
            time.sleep(0.1)
        assert datetime.now(UTC) < first.not_valid_after_utc, "renewed only after expiry"
        later = served_certificate(cp)
        assert later.serial_number != first.serial_number
        assert later.not_valid_after_utc > first.not_valid_after_utc


def test_config_watch_answers_within_a_second_of_a_change(
    cp: ControlPlaneProcess, admin: httpx.Client, payments: Workload
) -> None:
    with cp.http() as client:
        current = signed(client, payments, "GET", "/v1/config").json()["hash"]
        answer: dict[str, Any] = {}

        def watch() -> None:
            response = signed(client, payments, "GET", f"/v1/config?hash={current}&wait=5")
            answer.update(response=response, at=time.monotonic())

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.5)
        assert watcher.is_alive(), "the watch answered without a change"
        apply(admin, service("shop-id", "payments", lb="least_request"))
        applied_at = time.monotonic()
        watcher.join(6)
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert response.json()["hash"] != current
    assert answer["at"] - applied_at < 1.0


def test_config_watch_without_a_change_answers_204_after_wait(
    cp: ControlPlaneProcess, admin: httpx.Client, payments: Workload
) -> None:
    with cp.http() as client:
        current = signed(client, payments, "GET", "/v1/config").json()["hash"]
        started = time.monotonic()
        # A policy of another service wakes the watch, which must go back to waiting.
        other_policy = {
            "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "shop-id", "name": "checkout"},
            "spec": {"service": "checkout", "default": "allow"},
        }
        before = revision(cp)
        change = threading.Timer(0.3, apply, (admin, other_policy))
        change.start()
        response = signed(client, payments, "GET", f"/v1/config?hash={current}&wait=1.5")
        elapsed = time.monotonic() - started
        change.join()
    assert revision(cp) > before
    assert response.status_code == 204
    assert 1.4 <= elapsed < 2.5


# --- 7. endpoints registered by hand -----------------------------------------------------------


def endpoint_addresses(admin: httpx.Client, namespace: str) -> set[str]:
    return {e["address"] for e in admin.get(f"/v1/endpoints?namespace={namespace}").json()}


def test_endpoints_registered_by_hand_expire_after_their_ttl_or_stay_until_deleted(
    admin: httpx.Client,
) -> None:
    leased = {"namespace": "disc", "service": "legacy", "address": "10.1.0.1:8080", "ttl": 1}
    kept = {"namespace": "disc", "service": "legacy", "address": "10.1.0.2:8080"}
    assert admin.post("/v1/endpoints", json=leased).status_code == 201
    assert admin.post("/v1/endpoints", json=kept).status_code == 201
    assert endpoint_addresses(admin, "disc") == {"10.1.0.1:8080", "10.1.0.2:8080"}

    deadline = time.monotonic() + 3
    while "10.1.0.1:8080" in endpoint_addresses(admin, "disc"):
        assert time.monotonic() < deadline, "the leased endpoint outlived its ttl"
        time.sleep(0.1)
    assert endpoint_addresses(admin, "disc") == {"10.1.0.2:8080"}

    assert admin.delete("/v1/endpoints/disc/legacy/10.1.0.2:8080").status_code == 204
    assert endpoint_addresses(admin, "disc") == set()
    assert admin.delete("/v1/endpoints/disc/legacy/10.1.0.2:8080").status_code == 404


# --- 8. persistence ----------------------------------------------------------------------------


def test_a_killed_control_plane_comes_back_with_everything_it_acknowledged(
    tmp_path: Path,
) -> None:
    with ControlPlaneProcess(data_dir=tmp_path / "data") as cp, cp.admin_http() as admin:
        acknowledged = apply(
            admin,
            *yaml.safe_load_all(SHOP),
            service("other", "inventory", timeout="1s"),
        )
        listed = {kind: admin.get(f"/v1/{kind}").json() for kind in ("services", "routes")}
        token = join_token(admin, "shop", "checkout")
        workload = Workload(cp, join_token(admin, "shop", "payments"))
        bundle, admin_token, url = cp.ca_bundle.read_text(), cp.admin_token, cp.url

        cp.kill()
        cp.restart()

        assert (cp.url, cp.admin_token, cp.ca_bundle.read_text()) == (url, admin_token, bundle)
        # The old client, with the token it had, works against the new process.
        for kind, before in listed.items():
            assert admin.get(f"/v1/{kind}").json() == before
        for result in acknowledged:
            plural = PLURALS[result["kind"]]
            got = admin.get(f"/v1/{plural}/{result['namespace']}/{result['name']}")
            assert got.status_code == 200, result
            assert got.json()["metadata"]["version"] == result["version"]
        with cp.http() as client:
            assert signed(client, workload, "GET", "/v1/config").status_code == 200
        Workload(cp, token)  # a join token created before still joins


# --- 9. OpenAPI --------------------------------------------------------------------------------


def current_openapi() -> str:
    """The document the code describes, without a running server."""
    with tempfile.TemporaryDirectory() as data_dir:
        control_plane = ControlPlane(
            open_store(None, Path(data_dir)), CertificateAuthority.create_root("mesh.local"), "-"
        )
        return openapi_document(create_app(control_plane))


def test_openapi_is_served_publicly_and_describes_the_api(cp: ControlPlaneProcess) -> None:
    with cp.http() as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    for path in [
        "/v1/apply",
        "/v1/services",
        "/v1/routes/{namespace}/{name}",
        "/v1/policies",
        "/v1/filters/{namespace}/{name}",
        "/v1/tokens",
        "/v1/join",
        "/v1/certificate",
        "/v1/config",
        "/v1/report",
        "/v1/endpoints",
        "/v1/sidecars",
    ]:
        assert path in document["paths"], path
    put_service = document["paths"]["/v1/services/{namespace}/{name}"]["put"]
    assert put_service["requestBody"]["content"]["application/json"]["schema"]
    for name in ["Service", "Route", "AuthorizationPolicy", "FilterAttachment", "ServiceSpec"]:
        assert name in document["components"]["schemas"], name
    assert_refs_resolve(document)


def assert_refs_resolve(document: dict[str, Any]) -> None:
    """Every $ref points at something in the document (tools reject dangling ones)."""

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    for ref in set(walk(document)):
        assert ref.startswith("#/"), ref
        target: Any = document
        for part in ref[2:].split("/"):
            assert isinstance(target, dict) and part in target, f"dangling $ref {ref}"
            target = target[part]


def test_published_openapi_document_is_up_to_date() -> None:
    document = current_openapi()
    if os.environ.get(UPDATE_OPENAPI):
        OPENAPI_FILE.parent.mkdir(exist_ok=True)
        OPENAPI_FILE.write_text(document)
    regenerate = (
        f"{UPDATE_OPENAPI}=1 python -m pytest {Path(__file__).relative_to(ROOT)} -k openapi"
    )
    assert OPENAPI_FILE.exists(), f"docs/openapi.json is missing; run: {regenerate}"
    assert OPENAPI_FILE.read_text() == document, (
        f"docs/openapi.json is out of date; run: {regenerate}"
    )
