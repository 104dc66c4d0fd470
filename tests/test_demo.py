"""`meshpy demo`: the shop as a real mesh (control plane, four apps, five sidecars) on localhost.

One demo runs for the module; the last test stops it with SIGINT and checks that nothing is
left behind, so it must stay last.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import meshpy_cmd

READY_LINE = "Press Ctrl-C to stop."
READY_TIMEOUT = 40.0  # ten Python processes start on what may be a small, busy machine
SHOP_SERVICES = {"frontend", "checkout", "payments", "inventory", "ingress"}
DECLINED = "4000000000000002"


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def find(self, pattern: str) -> re.Match[str]:
        for line in self.lines:
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    @property
    def data_dir(self) -> Path:
        return Path(self.find(r"files and logs in (\S+)")[1])

    @property
    def entry(self) -> str:
        return self.find(r"^  ingress +(\d+\.\d+\.\d+\.\d+:\d+) ")[1]

    @property
    def env(self) -> dict[str, str]:
        """The environment the demo's export line sets."""
        line = self.find(r"^  export (MESHPY_\S+=.*)$")[1]
        return dict(pair.split("=", 1) for pair in line.split())


def _free_port() -> int:
    """A free port below Linux's ephemeral range, which no port-0 bind or outgoing connection
    can take before the demo binds it."""
    while True:
        port = random.randrange(10000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    port = _free_port()
    proc = subprocess.Popen(
        meshpy_cmd("demo", "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = Demo(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            running.lines.append(line.rstrip("\n"))
            if line.strip() == READY_LINE:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, stderr = proc.communicate()
            pytest.fail(f"meshpy demo not ready (exit {proc.returncode}):\n{stderr}")
    try:
        assert running.entry == f"127.0.0.1:{port}"  # the ingress listens on --port
        yield running
    finally:
        if proc.poll() is None:  # the SIGINT test did not run (or failed early)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def ingress(demo: Demo) -> Iterator[httpx.Client]:
    """A client using the ingress as its HTTP proxy, the way the demo tells users to curl."""
    with httpx.Client(proxy=f"http://{demo.entry}", trust_env=False, timeout=10) as client:
        yield client


def test_browse(demo: Demo, ingress: httpx.Client) -> None:
    index = ingress.get("http://frontend/")
    assert index.status_code == 200, index.text
    assert {product["id"] for product in index.json()["products"]} >= {1, 2, 6}
    product = ingress.get("http://frontend/products/2")
    assert product.status_code == 200
    assert product.json()["name"] == "Pour-over kettle"
    # The same call naming the service in the Host header, without proxy syntax.
    direct = httpx.get(
        f"http://{demo.entry}/products/2", headers={"Host": "frontend"}, trust_env=False
    )
    assert direct.status_code == 200
    assert direct.json() == product.json()


def test_add_to_cart_and_checkout(ingress: httpx.Client) -> None:
    cart = "http://frontend/cart/test-checkout"
    added = ingress.post(f"{cart}/items", json={"id": 2, "qty": 2})
    assert added.status_code == 200, added.text
    assert added.json()["total_cents"] == 2 * 4900
    assert ingress.get(cart).json()["items"][0]["qty"] == 2
    receipt = ingress.post(f"{cart}/checkout", json={"card": "4242424242424242"})
    assert receipt.status_code == 200, receipt.text
    assert receipt.json()["payment_id"].startswith("pay-")
    assert receipt.json()["total_cents"] == 2 * 4900
    assert ingress.get(cart).json()["items"] == []


def test_declined_card_is_402_and_keeps_the_cart(ingress: httpx.Client) -> None:
    cart = "http://frontend/cart/test-declined"
    assert ingress.post(f"{cart}/items", json={"id": 3, "qty": 1}).status_code == 200
    declined = ingress.post(f"{cart}/checkout", json={"card": DECLINED})
    assert declined.status_code == 402, declined.text
    assert "declined" in declined.json()["error"]
    assert len(ingress.get(cart).json()["items"]) == 1


def test_policies_deny_the_ingress_all_but_frontend(ingress: httpx.Client) -> None:
    # A real payment id: payments refuses the caller, not the request.
    cart = "http://frontend/cart/test-denied"
    assert ingress.post(f"{cart}/items", json={"id": 4, "qty": 1}).status_code == 200
    payment_id = ingress.post(f"{cart}/checkout", json={"card": "4242424242424242"}).json()[
        "payment_id"
    ]
    for url in (f"http://payments/payments/{payment_id}", "http://inventory/items"):
        denied = ingress.get(url)
        assert denied.status_code == 403, (url, denied.text)
        assert "denied by authorization policy" in denied.text


def test_status_shows_five_sidecars_in_sync(demo: Demo) -> None:
    result = subprocess.run(
        meshpy_cmd("status", "-o", "json"),
        env={**os.environ, **demo.env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    sidecars = [s for s in json.loads(result.stdout) if s["namespace"] == "shop"]
    assert {s["service"] for s in sidecars} == SHOP_SERVICES
    assert len(sidecars) == 5
    assert all(s["in_sync"] for s in sidecars), sidecars


def test_sigint_stops_everything_and_removes_the_data_dir(demo: Demo) -> None:
    """Must run last: it stops the module's demo."""
    children = psutil.Process(demo.proc.pid).children(recursive=True)
    assert len(children) == 10  # control plane, four apps, five sidecars
    data_dir = demo.data_dir
    assert data_dir.is_dir()
    started = time.monotonic()
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(10) == 0
    assert time.monotonic() - started < 8
    assert [child.pid for child in children if child.is_running()] == []
    leftovers = [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if str(data_dir) in " ".join(process.info["cmdline"] or [])
    ]
    assert leftovers == []
    assert not data_dir.exists()
