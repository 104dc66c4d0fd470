"""Two control-plane replicas serving one mesh from a real 3-member etcd cluster.

Everything is a real process on loopback: etcd members, two ``meshpy control-plane``
replicas sharing one CA and one admin token, and ``meshpy proxy`` sidecars whose bootstrap
lists both replicas (A first). One mesh is built per module and the tests run in file order:
A is frozen and resumed, then killed, then an etcd member is killed; each test only relies on
what the earlier ones leave running, so any one also passes alone.
"""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import certifi
import httpx
import psutil
import pytest
import yaml
from cp import ControlPlaneProcess
from etcd_cluster import EtcdCluster, require_etcd
from helpers import eventually
from mesh import Process, Traffic, bootstrap, meshpy

from meshpy.controlplane.client import Unreachable, WorkloadClient

NAMESPACE = "shop"
LEASE_TTL = 2.0  # seconds; what the replicas grant each sidecar's endpoint
PROXY_READY = re.compile(r"meshpy proxy ready: (.*)")


def _replica(
    name: str, workdir: Path, store: str, ca: Path, token_file: Path
) -> ControlPlaneProcess:
    """One ``meshpy control-plane`` over the shared etcd, CA and admin token (not started)."""
    return ControlPlaneProcess(
        "--store", store,
        "--ca", str(ca),
        "--admin-token-file", str(token_file),
        "--lease-ttl", f"{LEASE_TTL:g}s",
        "--name", name,
        data_dir=workdir / f"data-{name}",
    )  # fmt: skip


class Sidecar:
    """``meshpy proxy -c FILE`` whose bootstrap names every replica."""

    def __init__(
        self,
        name: str,
        service: str,
        workdir: Path,
        replicas: list[ControlPlaneProcess],
        app: str,
    ) -> None:
        self.name = name
        self.service = service
        self.state_dir = workdir / "state" / name
        token = replicas[0].token(service, NAMESPACE, "10m")
        token_file = workdir / f"{name}.token"
        token_file.write_text(token + "\n")
        bootstrap_file = workdir / f"{name}.yaml"
        bootstrap_file.write_text(
            bootstrap(
                [replica.url for replica in replicas],
                replicas[0].ca_bundle,
                str(token_file),
                service,
                NAMESPACE,
                app,
                str(self.state_dir),
            )
        )
        self.process = Process(name, meshpy("proxy", "-c", str(bootstrap_file)), workdir, {})
        self.addresses: dict[str, str] = {}

    def wait_ready(self) -> None:
        line = self.process.wait_line(lambda text: (m := PROXY_READY.search(text)) and m[1])
        self.addresses = dict(item.split("=", 1) for item in line.split())

    @property
    def sidecar_id(self) -> str:
        return (self.state_dir / "id").read_text().strip()

    def clusters(self) -> dict[str, list[str]]:
        """Cluster name -> endpoints, in the config the agent last applied."""
        config = yaml.safe_load((self.state_dir / "sidecar.yaml").read_text())
        return {cluster["name"]: cluster["endpoints"] for cluster in config["clusters"]}

    def connected_to(self, replica: ControlPlaneProcess) -> bool:
        """Whether the agent holds a TCP connection to `replica` (its long-poll)."""
        port = int(replica.url.rsplit(":", 1)[1])
        connections = psutil.Process(self.process.proc.pid).net_connections(kind="tcp")
        return any(c.raddr and c.raddr.port == port for c in connections)


class _App(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the test output


def _service(name: str) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {}}


class HaMesh:
    """The processes of the module's mesh; `close()` stops every one and deletes the dir."""

    def __init__(self) -> None:
        require_etcd()
        self.workdir = Path(tempfile.mkdtemp(prefix="meshpy-ha-"))
        self.etcd = EtcdCluster(3)
        self.replicas: dict[str, ControlPlaneProcess] = {}
        self.sidecars: dict[str, Sidecar] = {}
        self.apps: list[ThreadingHTTPServer] = []
        self._markers = 0

    def start(self) -> None:
        self.etcd.start()
        ca = self.workdir / "ca"
        subprocess.run(
            meshpy("ca", "init", "--trust-domain", "mesh.test", str(ca)),
            check=True,
            capture_output=True,
        )
        token_file = self.workdir / "admin-token"
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
        for name in ("cp-a", "cp-b"):
            self.replicas[name] = _replica(name, self.workdir, self.etcd.url, ca, token_file)
        for replica in self.replicas.values():  # side by side, then both waited for
            replica.spawn()
        for replica in self.replicas.values():
            replica.wait_ready()
        self.a.apply(
            _service("payments"),
            _service("checkout"),
            _service("ledger"),
            {
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "payments", "namespace": NAMESPACE},
                "spec": {
                    "service": "payments",
                    "rules": [{"name": "checkout", "action": "allow", "from": ["checkout"]}],
                },
            },
        )
        for service in ("payments", "checkout"):
            self.sidecar(service, service)
        for sidecar in self.sidecars.values():
            sidecar.wait_ready()
        # Traffic from checkout needs payments registered and in checkout's config.
        checkout = self.sidecars["checkout"]
        eventually(lambda: bool(checkout.clusters().get(f"payments.{NAMESPACE}")), timeout=10)

    @property
    def a(self) -> ControlPlaneProcess:
        return self.replicas["cp-a"]

    @property
    def b(self) -> ControlPlaneProcess:
        return self.replicas["cp-b"]

    def sidecar(self, name: str, service: str) -> Sidecar:
        """A sidecar (not yet waited for) in front of a new app on a free port."""
        app = ThreadingHTTPServer(("127.0.0.1", 0), _App)
        threading.Thread(target=app.serve_forever, daemon=True).start()
        self.apps.append(app)
        sidecar = Sidecar(
            name,
            service,
            self.workdir,
            list(self.replicas.values()),
            f"127.0.0.1:{app.server_port}",
        )
        self.sidecars[name] = sidecar
        return sidecar

    def marker(self) -> str:
        """The name of a Service not applied yet: a change every sidecar's config shows."""
        self._markers += 1
        return f"marker-{self._markers}"

    def close(self) -> None:
        for sidecar in self.sidecars.values():
            sidecar.process.terminate()
        for replica in self.replicas.values():
            replica.close()
        for app in self.apps:
            app.shutdown()
            app.server_close()
        self.etcd.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def mesh() -> Iterator[HaMesh]:
    mesh = HaMesh()
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.close()


def _time_until_seen(
    mesh: HaMesh, replica: ControlPlaneProcess, sidecars: list[Sidecar]
) -> tuple[str, float]:
    """Apply a new Service through `replica`: its name, and the seconds until every sidecar in
    `sidecars` runs a config that has it."""
    marker = mesh.marker()
    replica.apply(_service(marker))
    applied = time.monotonic()
    cluster = f"{marker}.{NAMESPACE}"
    eventually(lambda: all(cluster in s.clusters() for s in sidecars), timeout=5, interval=0.02)
    return marker, time.monotonic() - applied


def _in_sync(replica: ControlPlaneProcess, sidecars: list[Sidecar]) -> bool:
    """Whether `replica` lists every one of `sidecars` as running the latest config."""
    shown = {record["id"]: record for record in replica.sidecars()}
    return all(shown.get(s.sidecar_id, {}).get("in_sync") for s in sidecars)


def _etcd_endpoint_keys(member: str) -> dict[str, int]:
    """``/meshpy/endpoints/...`` keys in etcd itself, read from `member`: key -> lease ID."""
    prefix = b"/meshpy/endpoints/"
    body = {
        "key": base64.b64encode(prefix).decode(),
        "range_end": base64.b64encode(prefix[:-1] + b"0").decode(),  # "0" follows "/"
    }
    reply = httpx.post(f"http://{member}/v3/kv/range", json=body, timeout=5)
    reply.raise_for_status()
    return {
        base64.b64decode(kv["key"]).decode(): int(kv.get("lease", 0))
        for kv in reply.json().get("kvs", [])
    }


def _make_leader(cluster: EtcdCluster, index: int) -> None:
    """Hand the raft leadership of `cluster` to member `index`."""

    def status(member: str) -> dict[str, Any]:
        return httpx.post(f"http://{member}/v3/maintenance/status", json={}, timeout=5).json()

    target = status(cluster.endpoints[index])["header"]["member_id"]
    for member in cluster.endpoints:
        reply = status(member)
        if reply["header"]["member_id"] == reply["leader"] != target:
            httpx.post(
                f"http://{member}/v3/maintenance/transfer-leadership",
                json={"targetID": target},
                timeout=5,
            ).raise_for_status()
    eventually(lambda: status(cluster.endpoints[index])["leader"] == target, timeout=5)


def test_a_resource_applied_through_one_replica_is_served_by_the_other(mesh: HaMesh) -> None:
    [applied] = mesh.a.apply(_service("inventory"))
    shown = {
        service["metadata"]["name"]: service for service in mesh.b.request("GET", "/v1/services")
    }
    assert {"payments", "checkout", "ledger", "inventory"} <= shown.keys()
    # The same etcd revision, not a copy: B shows the version A's write was given.
    assert shown["inventory"]["metadata"]["version"] == applied["version"]


def test_a_change_through_b_reaches_a_sidecar_watching_a_within_a_second(mesh: HaMesh) -> None:
    sidecars = [mesh.sidecars["checkout"], mesh.sidecars["payments"]]
    assert all(s.connected_to(mesh.a) and not s.connected_to(mesh.b) for s in sidecars)
    _, elapsed = _time_until_seen(mesh, mesh.b, sidecars)
    print(f"change through B seen by sidecars on A after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0


def test_a_killed_sidecar_s_endpoint_expires_with_its_etcd_lease(mesh: HaMesh) -> None:
    ledger = mesh.sidecar("ledger-1", "ledger")
    ledger.wait_ready()
    key = f"/meshpy/endpoints/{NAMESPACE}/ledger/{ledger.sidecar_id}"

    def registered(replica: ControlPlaneProcess) -> bool:
        return any(e["service"] == "ledger" for e in replica.request("GET", "/v1/endpoints"))

    eventually(lambda: registered(mesh.a) and registered(mesh.b), timeout=5)
    member = mesh.etcd.endpoints[0]
    lease = _etcd_endpoint_keys(member)[key]
    assert lease != 0
    granted = httpx.post(
        f"http://{member}/v3/lease/timetolive", json={"ID": str(lease)}, timeout=5
    ).json()
    assert int(granted["grantedTTL"]) == LEASE_TTL

    ledger.process.kill()
    killed = time.monotonic()
    eventually(lambda: not registered(mesh.a) and not registered(mesh.b), timeout=6)
    elapsed = time.monotonic() - killed
    print(f"endpoint of the killed sidecar gone from both replicas after {elapsed:.2f} s")
    assert elapsed < 4.0
    assert key not in _etcd_endpoint_keys(member)
    # The survivors' endpoints are leased too, and alive.
    assert {k.split("/")[4] for k in _etcd_endpoint_keys(member)} == {"payments", "checkout"}


def test_a_hung_replica_a_does_not_let_the_sidecars_leases_expire(mesh: HaMesh) -> None:
    # SIGSTOP: A still accepts connections but never answers, as a hung host or a partition.
    checkout, payments = mesh.sidecars["checkout"], mesh.sidecars["payments"]

    def registered() -> set[str]:
        return {e["service"] for e in mesh.b.request("GET", "/v1/endpoints")}

    eventually(lambda: registered() == {"checkout", "payments"}, timeout=5)
    traffic = Traffic(f"http://{checkout.addresses['outbound']}/health", "payments")
    try:
        eventually(lambda: traffic.ok > 20, timeout=5)
        mesh.a.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        while time.monotonic() - frozen < 2 * LEASE_TTL + 1:
            listed = registered()
            assert listed == {"checkout", "payments"}, f"{time.monotonic() - frozen:.1f}s"
            time.sleep(0.1)
        assert checkout.connected_to(mesh.b) and payments.connected_to(mesh.b)
    finally:
        mesh.a.send_signal(signal.SIGCONT)
        traffic.stop()
    assert traffic.failures == [], traffic.failures[:5]


def test_killing_replica_a_under_traffic_fails_no_request(mesh: HaMesh) -> None:
    checkout, payments = mesh.sidecars["checkout"], mesh.sidecars["payments"]
    traffic = Traffic(f"http://{checkout.addresses['outbound']}/health", "payments")
    try:
        eventually(lambda: traffic.ok > 20, timeout=5)
        mesh.a.kill()
        killed = time.monotonic()

        # Reports (every second) renew the same etcd lease through B: nothing re-registers.
        eventually(
            lambda: checkout.connected_to(mesh.b) and payments.connected_to(mesh.b), timeout=5
        )
        eventually(lambda: _in_sync(mesh.b, [checkout, payments]), timeout=5)
        print(f"both sidecars on B and in sync {time.monotonic() - killed:.2f} s after the kill")
        _, elapsed = _time_until_seen(mesh, mesh.b, [checkout, payments])
        print(f"a change through B reached them after {elapsed * 1000:.0f} ms")
        assert elapsed < 2.0
        time.sleep(LEASE_TTL + 0.5)  # past a lease that a missed report would have let expire
    finally:
        traffic.stop()
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 100


def test_the_control_plane_survives_losing_an_etcd_member(mesh: HaMesh) -> None:
    # Member 0 is the one every replica's store talks to first, watch included; made the
    # leader too, its loss also costs the cluster an election.
    _make_leader(mesh.etcd, 0)
    mesh.etcd.kill(0)
    sidecars = [mesh.sidecars["checkout"], mesh.sidecars["payments"]]
    marker, elapsed = _time_until_seen(mesh, mesh.b, sidecars)
    print(f"with an etcd member down, a change through B reached the sidecars in {elapsed:.2f} s")
    assert elapsed < 3.0
    assert marker in {
        service["metadata"]["name"] for service in mesh.b.request("GET", "/v1/services")
    }
    eventually(lambda: _in_sync(mesh.b, sidecars), timeout=3)
    # Their leases are kept alive through the surviving members.
    time.sleep(LEASE_TTL + 0.5)
    assert _in_sync(mesh.b, sidecars)


def test_a_late_failure_does_not_send_the_client_back_to_a_replica_it_left() -> None:
    # The agent's watch and reports share one WorkloadClient. A long-poll hung on a replica
    # fails long after the reports moved on from it; that must not move them back.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()  # accepts (in the backlog) and never answers
        port = hung.getsockname()[1]
        client = WorkloadClient(
            [f"https://127.0.0.1:{port}", "https://127.0.0.1:1"], certifi.where(), lambda: None
        )
        failed: list[Unreachable] = []

        def long_poll() -> None:
            try:
                client.request("GET", "/v1/config?wait=25", timeout=1)
            except Unreachable as exc:
                failed.append(exc)

        try:
            poll = threading.Thread(target=long_poll)
            poll.start()
            time.sleep(0.1)
            with pytest.raises(Unreachable):
                client.request("POST", "/v1/report", {}, timeout=0.2)
            assert client.url == "https://127.0.0.1:1"
            poll.join()
            assert len(failed) == 1
            assert client.url == "https://127.0.0.1:1"
        finally:
            client.close()
