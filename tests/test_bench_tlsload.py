"""``bench/tlsload``, the TLS handshake client of ``python -m bench churn`` and ``mesh``,
against an independent TLS server (Python's ssl, OpenSSL) that counts what it completed.

The client's counts are the handshake figures in RESULTS.md: every one it reports must be a
handshake the server finished, resumption must happen only when asked, and a server whose
chain does not verify must be an error, not a count.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import mesh, peers  # noqa: E402


@dataclass
class CountingTlsServer:
    """Accepts TLS 1.3 connections, one thread each; counts finished and resumed handshakes,
    then reads until the client closes."""

    context: ssl.SSLContext
    listener: socket.socket = field(default_factory=socket.socket)
    handshakes: int = 0
    resumed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> int:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        threading.Thread(target=self._accept, daemon=True).start()
        return self.listener.getsockname()[1]

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                with self.lock:
                    self.handshakes += 1
                    self.resumed += tls.session_reused
                while tls.recv(1024):
                    pass
        except (OSError, ssl.SSLError):
            pass


@pytest.fixture(scope="module")
def tlsload() -> Path:
    return peers.tlsload_binary()


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mesh.Creds]:
    return mesh.issue_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server(creds: dict[str, mesh.Creds]) -> Iterator[CountingTlsServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(creds["b"].cert, creds["b"].key)
    counting = CountingTlsServer(context)
    yield counting
    counting.listener.close()


def run_tlsload(tlsload: Path, port: int, bundle: Path | None, *extra: str) -> dict:
    command = [str(tlsload), "--connect", f"127.0.0.1:{port}"]
    command += ["--ca", str(bundle)] if bundle else []
    command += ["--connections", "4", "--seconds", "1", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_counted_handshake_was_finished_by_the_server_and_none_resumed(
    tlsload, server, creds
):
    port = server.start()
    counts = run_tlsload(tlsload, port, creds["b"].bundle)
    assert counts["errors"] == 0, counts["first_error"]
    assert counts["handshakes"] > 0
    assert server.handshakes >= counts["handshakes"]
    assert server.resumed == 0


def test_resume_resumes_the_sessions_after_each_connections_first(tlsload, server, creds):
    port = server.start()
    counts = run_tlsload(tlsload, port, creds["b"].bundle, "--resume")
    assert counts["errors"] == 0, counts["first_error"]
    assert server.resumed >= counts["handshakes"] - 4  # one full handshake per connection


@pytest.mark.parametrize("verify", ["signature", "none"])
def test_a_chain_that_does_not_verify_is_an_error_unless_only_less_is_checked(
    tlsload, server, tmp_path, verify
):
    port = server.start()
    stranger = mesh.issue_certificates(tmp_path / "other-ca")["b"].bundle
    refused = run_tlsload(tlsload, port, stranger)
    assert refused["handshakes"] == 0 and refused["errors"] > 0
    assert "certificate" in refused["first_error"].lower()
    unchecked = run_tlsload(tlsload, port, stranger, "--verify", verify)
    assert unchecked["errors"] == 0 and unchecked["handshakes"] > 0
    # with no chain to check, no bundle is needed
    without_ca = run_tlsload(tlsload, port, None, "--verify", verify)
    assert without_ca["errors"] == 0 and without_ca["handshakes"] > 0


def test_bad_arguments_get_the_usage_and_exit_2(tlsload):
    for bad, named in (
        (["--connect", "nowhere"], "--connect nowhere"),
        (["--verify", "some"], "--verify some"),
        (["--connect", "127.0.0.1:1"], "needs --ca"),
    ):
        done = subprocess.run([str(tlsload), *bad], capture_output=True, text=True)
        assert done.returncode == 2
        assert named in done.stderr and "usage:" in done.stderr
