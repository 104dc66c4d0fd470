"""``bench/openload``, the evenly spaced load of ``--latency-load open``, against an
HTTP/1.1 keep-alive server in this process that notes when each request arrived.

What the fixed-rate tables rest on: requests reach the server about ``1/rate`` apart
rather than in bursts, a response that stalls makes the requests due behind it count
their wait (no coordinated omission), and a failed or non-2xx exchange is an error, never
a latency.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import (  # noqa: E402
    filters,
    harness,
    load,
    mesh,
    peers,
    report,
    suite,
)
from bench.report import SystemRuns  # noqa: E402


@dataclass
class NotingServer:
    """Answers each GET on a keep-alive connection, a thread per connection; notes when
    each request arrived. ``stall`` holds the response to request number ``stall[0]``
    (counted from 0) for ``stall[1]`` seconds."""

    status: int = 200
    chunked: bool = False
    stall: tuple[int, float] | None = None
    arrivals: list[float] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    listener: socket.socket = field(default_factory=socket.socket)

    def start(self) -> str:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pending = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        return
                    if not data:
                        return
                    pending += data
                head, pending = pending.split(b"\r\n\r\n", 1)
                with self.lock:
                    number = len(self.arrivals)
                    self.arrivals.append(time.monotonic())
                    self.heads.append(head)
                if self.stall and number == self.stall[0]:
                    time.sleep(self.stall[1])
                conn.sendall(self._response())

    def _response(self) -> bytes:
        if self.chunked:
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        body = b"x" * 100
        head = f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def openload() -> Path:
    return peers.openload_binary()


@pytest.fixture
def server() -> Iterator[NotingServer]:
    server = NotingServer()
    yield server
    server.close()


def run(
    binary: Path,
    url: str,
    log: Path,
    *,
    rate: float,
    connections: int,
    duration: float,
    warmup: float = 0,
    headers: Sequence[str] = (),
) -> dict[str, Any]:
    argv = [
        str(binary), "--url", url, "--log-file", str(log), "--rate", f"{rate:g}",
        "--connections", str(connections), "--duration", f"{duration:g}", "--warmup", f"{warmup:g}",
        *load.header_args(headers),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def test_requests_arrive_evenly_spaced_at_the_rate(
    openload: Path, server: NotingServer, tmp_path: Path
) -> None:
    url = server.start()
    log = tmp_path / "log"
    summary = run(openload, url, log, rate=400, connections=8, duration=1.5, warmup=0.25)
    # 1.5 s at 400 req/s is 600 requests due in the measured span, all answered.
    assert summary["measured"] == 600 and summary["succeeded"] == 600
    assert summary["errors"] == 0 and summary["bad_status"] == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 600 and all(line.split("\t")[1] == "200" for line in lines)
    # Due times 2.5 ms apart, and the requests reached the server that way: h2load --rps
    # over 8 connections would send 8 at once every 20 ms, 7 of 8 gaps near zero.
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
    assert abs(statistics.median(gaps) - 0.0025) < 0.0005
    near_zero = sum(1 for gap in gaps if gap < 0.0005)
    assert near_zero < 0.2 * len(gaps), f"{near_zero} of {len(gaps)} arrivals came in bursts"


def test_every_request_carries_the_headers_it_is_given(
    openload: Path, server: NotingServer, tmp_path: Path
) -> None:
    url = server.start()
    headers = ("x-tenant: bench", "Authorization: Bearer t0k")
    summary = run(
        openload, url, tmp_path / "log", rate=100, connections=2, duration=0.2, headers=headers
    )
    assert summary["succeeded"] == 20 and len(server.heads) == 20
    for head in server.heads:
        lines = head.decode().split("\r\n")
        assert lines[0] == "GET / HTTP/1.1" and lines[1].startswith("Host: 127.0.0.1:")
        assert lines[2:] == list(headers)


def test_a_stalled_response_makes_the_requests_due_behind_it_count_their_wait(
    openload: Path, server: NotingServer, tmp_path: Path
) -> None:
    # One connection, a request every 10 ms, and request 50 held 300 ms: the ~30 requests
    # due meanwhile wait for the connection, and each latency runs from its due time.
    server.stall = (50, 0.3)
    url = server.start()
    log = tmp_path / "log"
    summary = run(openload, url, log, rate=100, connections=1, duration=1.5)
    latencies, bad = load.parse_h2load_log(log.read_text())
    assert bad == 0 and len(latencies) == 150
    slow = [value for value in latencies if value > 100_000]
    # Timed from the write, only the held request would be slow.
    assert len(slow) >= 20, sorted(latencies)[-40:]
    assert max(latencies) >= 290_000
    assert summary["late_starts"] >= 20 and summary["start_delay_us"]["max"] >= 200_000


def test_non_2xx_responses_and_unsupported_framing_are_errors(
    openload: Path, server: NotingServer, tmp_path: Path
) -> None:
    server.status = 503
    url = server.start()
    log = tmp_path / "log"
    summary = run(openload, url, log, rate=200, connections=2, duration=0.5)
    assert summary["succeeded"] == 0 and summary["bad_status"] == summary["measured"] == 100
    assert {line.split("\t")[1] for line in log.read_text().splitlines()} == {"503"}

    server.status, server.chunked = 200, True
    summary = run(openload, url, log, rate=200, connections=2, duration=0.5)
    assert summary["succeeded"] == 0 and summary["errors"] == 100
    assert "chunked" in summary["first_error"]
    assert {line.split("\t")[1] for line in log.read_text().splitlines()} == {"-1"}


def test_a_server_that_is_gone_gives_errors_not_latencies(openload: Path, tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/"
    log = tmp_path / "log"
    summary = run(openload, url, log, rate=100, connections=2, duration=0.3)
    assert summary["succeeded"] == 0 and summary["errors"] == summary["measured"] == 30
    assert "connect" in summary["first_error"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--url", "https://127.0.0.1:1/", "--rate", "10"], "only http:// URLs"),
        (["--url", "http://127.0.0.1:1/", "--rate", "0"], "must be positive"),
        (["--url", "http://127.0.0.1:1/"], "--rate is required"),
        (["--url", "http://127.0.0.1:1/", "--rate", "2e6"], "above 1000000"),
    ],
)
def test_bad_arguments_exit_2_and_say_why(
    openload: Path, tmp_path: Path, options: list[str], message: str
) -> None:
    argv = [str(openload), "--log-file", str(tmp_path / "log"), *options]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert done.returncode == 2 and message in done.stderr


def test_the_suite_measures_fixed_rates_with_it_when_asked(
    server: NotingServer, tmp_path: Path
) -> None:
    url = server.start()
    args = suite.parse_args(
        ["--latency-load", "open", "--duration", "1", "--warmup", "0", "--rate-connections", "4"]
    )
    system = peers.System("direct", 1, peers.Service("upstream", 1, [], tmp_path))
    runs = SystemRuns("direct")
    harness.measure_fixed_rate(args, system, url, 0, 300.0, [], tmp_path, runs, (), "label")
    [result] = runs.runs
    assert result.tool == "openload" and result.requests == 300 and result.errors == 0
    assert result.command[0].endswith("meshpy-openload")
    assert 0 < result.latency_us["p50"] <= result.latency_us["p99"] <= result.latency_us["max"]
    # The table's >gap column has the run's count of late starts.
    assert runs.summary(None, None)["slower_than_gap"] == result.extra["slower_than_gap"]
    assert harness.fixed_rate_load(args)[0].startswith("meshpy-openload")


def test_the_suite_hands_its_latency_load_to_the_mesh_and_filter_parts() -> None:
    args = suite.parse_args(["--latency-load", "open"])
    assert mesh.parse_args(suite.scenario_argv(args, "shared")).latency_load == "open"
    assert filters.parse_args(suite.scenario_argv(args, "shared")).latency_load == "open"
    assert suite.parse_args([]).latency_load == "h2load"
    header = "\n".join(
        suite.header(args, "python -m bench suite", report.machine_info(), None, None, {})
    )
    assert "over 50 connections with --latency-load open" in header
