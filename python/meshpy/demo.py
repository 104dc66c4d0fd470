"""`meshpy demo`: a proxy in front of small echo services, all on localhost.

The echo services answer every request with a JSON description of what they received, so
the effect of routing, load balancing and the headers the proxy adds is visible with curl.
"""

import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from .errors import ListenError
from .proxy import Sidecar

__all__ = ["EchoServer", "demo_config", "run_demo"]


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the proxy's connection pooling is exercised
    server_version = "meshpy-demo"
    server: "EchoServer"

    def do_GET(self) -> None:
        self._answer()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool = True) -> None:
        received = self._read_body()
        if self.path.split("?", 1)[0] == "/health":
            body, content_type = b"ok\n", "text/plain"
        else:
            description = {
                "upstream": self.server.name,
                "method": self.command,
                "path": self.path,
                "x-request-id": self.headers.get("x-request-id"),
                "x-forwarded-for": self.headers.get("x-forwarded-for"),
                "headers": {name.lower(): value for name, value in self.headers.items()},
                "body_bytes": received,
            }
            body, content_type = (
                json.dumps(description, indent=2).encode() + b"\n",
                "application/json",
            )
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _read_body(self) -> int:
        """Consume the request body (so the connection can be reused) and return its size."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            received = 0
            while size := int(self.rfile.readline().split(b";", 1)[0], 16):
                received += len(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return received
        return len(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the proxy's logs tell the story; per-request lines here would drown them


class EchoServer(ThreadingHTTPServer):
    """An echo service on an ephemeral loopback port, served from a background thread."""

    block_on_close = False  # don't wait on handler threads idling in keep-alive reads

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.name = name
        # A short poll interval keeps close() quick: shutdown() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name=f"echo-{name}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def demo_config(port: int, admin_port: int, shop: list[str], canary: list[str]) -> dict[str, Any]:
    """The demo's sidecar config (examples/demo.yaml is the same with fixed upstream ports)."""
    return {
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "listeners": [
            {
                "name": "demo",
                "listen": f"127.0.0.1:{port}",
                "routes": [
                    {
                        "name": "canary",
                        "match": {"headers": {"x-canary": "1"}},
                        "cluster": "canary",
                        "timeout": "5s",
                    },
                    {
                        "name": "shop",
                        "match": {"path_prefix": "/"},
                        "cluster": "shop",
                        "timeout": "5s",
                    },
                ],
            }
        ],
        "clusters": [
            {"name": "shop", "endpoints": shop, "lb": "round_robin"},
            {"name": "canary", "endpoints": canary},
        ],
    }


_CONFIG_HEADER = """\
# Written by `meshpy demo`. Edit and save: the running proxy applies valid changes at once
# and keeps its current config (logging why) when a change is invalid.
"""


def run_demo(port: int = 8080, admin_port: int = 9901) -> int:
    """Run the demo until Ctrl-C; returns the exit status."""
    upstreams = {name: EchoServer(name) for name in ("shop-1", "shop-2", "canary-1")}
    try:
        with tempfile.TemporaryDirectory(prefix="meshpy-demo-") as workdir:
            config = demo_config(
                port,
                admin_port,
                shop=[upstreams["shop-1"].address, upstreams["shop-2"].address],
                canary=[upstreams["canary-1"].address],
            )
            path = Path(workdir) / "sidecar.yaml"
            path.write_text(_CONFIG_HEADER + yaml.safe_dump(config, sort_keys=False))
            try:
                sidecar = Sidecar(path)
            except ListenError as exc:
                print(
                    f"meshpy demo: {exc} (pick free ports with --port and --admin-port)",
                    file=sys.stderr,
                )
                return 1
            proxy = sidecar.addresses["demo"]
            admin = sidecar.addresses["admin"]
            print(
                f"meshpy demo: a proxy on {proxy} in front of echo services"
                " shop-1 and shop-2 (round robin) and canary-1\n"
                f"  curl http://{proxy}/                     # alternates shop-1, shop-2\n"
                f"  curl -H 'x-canary: 1' http://{proxy}/    # routed to canary-1\n"
                f"  curl http://{admin}/ready   (also /live, /config, /metrics)\n"
                f"  config: {path} (edits apply live)\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )
            return sidecar.run(drain_timeout=1.0)
    finally:
        for upstream in upstreams.values():
            upstream.close()
