"""The shop behind `meshpy demo`: four small HTTP services that call each other through the mesh.

    frontend ──> inventory        catalog, stock reservations
        └──────> checkout ──> inventory
                     └──────> payments   card charges

Standard library only, JSON in and out, every failure answered as ``{"error": "..."}``. A
service reaches another through its sidecar's outbound listener, naming the target in the
Host header (``Host: payments``), so routing, retries and mTLS are the mesh's business; without
a mesh (tests), ``peers`` maps each dependency to its address instead. The ``x-request-id``
of an incoming request is sent on every call it causes, so one id follows a checkout through
all four services and their sidecars.

Run one service in the foreground::

    python -m meshpy.shop payments --listen 127.0.0.1:8083
    python -m meshpy.shop checkout --listen 127.0.0.1:8082 --outbound 127.0.0.1:15001
    python -m meshpy.shop checkout --peer inventory=127.0.0.1:8084 --peer payments=127.0.0.1:8083
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import signal
import socket
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["DEPENDENCIES", "SERVICES", "ShopServer", "main", "start_service"]

SERVICES = ("frontend", "checkout", "payments", "inventory")
DEPENDENCIES: dict[str, list[str]] = {
    "frontend": ["inventory", "checkout"],
    "checkout": ["inventory", "payments"],
    "payments": [],
    "inventory": [],
}

CALL_TIMEOUT = 5.0  # seconds a call to a dependency may wait to connect, or for each read
DECLINED_CARDS = frozenset({"4000000000000002"})  # the card networks' usual test "decline"

# Stock is warehouse-sized so long load tests don't run dry, except the mug, which lets
# tests and load runs see "out of stock" for real.
CATALOG: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "Espresso beans, 1 kg", "price_cents": 2400, "stock": 1_000_000},
    {"id": 2, "name": "Pour-over kettle", "price_cents": 4900, "stock": 1_000_000},
    {"id": 3, "name": "Ceramic dripper", "price_cents": 2200, "stock": 1_000_000},
    {"id": 4, "name": "Paper filters, 100", "price_cents": 600, "stock": 1_000_000},
    {"id": 5, "name": "Burr grinder", "price_cents": 12900, "stock": 1_000_000},
    {"id": 6, "name": "Limited-edition mug", "price_cents": 1800, "stock": 3},
)


class ShopError(Exception):
    """Ends a request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]  # the route pattern's named groups
    body: bytes
    request_id: str

    def json(self) -> dict[str, Any]:
        """The body as a JSON object, or a 400."""
        try:
            value = json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ShopError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(value, dict):
            raise ShopError(400, "expected a JSON object as the body")
        return value


Reply = tuple[int, Any]  # status, then a JSON-able body (a str is sent as text/plain)
Handler = Callable[[Request], Reply]


# ------------------------------------------------------------------------------ validation


def _positive_int(value: Any, field: str) -> int:
    # bool is an int subclass; `true` is not a quantity
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ShopError(400, f"{field}: expected a positive integer, got {json.dumps(value)}")
    return value


def _nonempty_str(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ShopError(400, f"{field}: expected a non-empty string, got {json.dumps(value)}")
    return value


def _order_lines(value: Any) -> list[dict[str, int]]:
    """``[{id, qty}, ...]`` checked and normalised; duplicates of an id are summed."""
    if not isinstance(value, list) or not value:
        raise ShopError(400, "items: expected a non-empty list of {id, qty}")
    quantities: dict[int, int] = {}
    for index, line in enumerate(value):
        if not isinstance(line, dict):
            raise ShopError(400, f"items[{index}]: expected an object {{id, qty}}")
        item_id = _positive_int(line.get("id"), f"items[{index}].id")
        qty = _positive_int(line.get("qty"), f"items[{index}].qty")
        quantities[item_id] = quantities.get(item_id, 0) + qty
    return [{"id": item_id, "qty": qty} for item_id, qty in quantities.items()]


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class _Ledger:
    """Recent records by id; the oldest are forgotten so memory stays bounded under load.
    Not locked itself: its service holds one lock over the ledger and what goes with it."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._capacity = capacity

    def add(self, record_id: str, record: dict[str, Any]) -> None:
        self._records[record_id] = record
        if len(self._records) > self._capacity:
            self._records.popitem(last=False)

    def get(self, record_id: str) -> dict[str, Any] | None:
        return self._records.get(record_id)


# ------------------------------------------------------------------------------ dependencies


class Dependencies:
    """Calls to other services: via the sidecar (``outbound``) or straight to ``peers``.

    Each handler thread keeps one keep-alive connection per target; a thread serves one
    incoming connection, so under load the calls reuse connections instead of opening one each.
    """

    def __init__(self, outbound: str | None, peers: dict[str, str]) -> None:
        self._outbound = outbound
        self._peers = peers
        self._local = threading.local()

    def _address(self, target: str) -> str:
        if self._outbound is not None:
            return self._outbound
        try:
            return self._peers[target]
        except KeyError:
            raise ShopError(502, f"{target}: no address configured") from None

    def _connection(self, target: str) -> http.client.HTTPConnection:
        connections: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "connections", {}
        )
        if target not in connections:
            host, port = _split_address(self._address(target))
            connections[target] = http.client.HTTPConnection(host, port, timeout=CALL_TIMEOUT)
        return connections[target]

    def call(
        self, target: str, method: str, path: str, request_id: str, payload: Any = None
    ) -> Reply:
        """``method path`` on ``target``; returns its status and JSON body when it answered
        200 or a 4xx in JSON (an answer of the app's own), else raises a 502 naming ``target``.
        """
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Host": target, "Accept": "application/json", "x-request-id": request_id}
        if body is not None:
            headers["Content-Type"] = "application/json"
        while True:
            connection = self._connection(target)
            reused = connection.sock is not None  # http.client reconnects a closed one
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                raw = response.read()
                break
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                connection.close()
                # A kept-alive connection the peer closed while idle: once more on a new one.
                if not reused:
                    raise ShopError(502, f"{target} unreachable: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
                raise ShopError(502, f"{target} unreachable: {reason}") from None
        if response.will_close:
            connection.close()
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            answer = None
        is_app_answer = isinstance(answer, dict) and (
            response.status == 200 or 400 <= response.status < 500
        )
        if not is_app_answer:
            # 5xx, or something that is not the app talking (say, the sidecar's 503 text)
            detail = answer.get("error") if isinstance(answer, dict) else None
            detail = detail or raw.decode("utf-8", "replace").strip()[:200] or "(empty body)"
            raise ShopError(502, f"{target} answered {response.status}: {detail}")
        return response.status, answer

    def call_ok(
        self, target: str, method: str, path: str, request_id: str, payload: Any = None
    ) -> dict[str, Any]:
        """Like ``call``, but a 4xx from ``target`` ends this request with the same answer."""
        status, answer = self.call(target, method, path, request_id, payload)
        if status != 200:
            raise ShopError(status, answer.get("error") or f"{target} answered {status}")
        return answer


# ------------------------------------------------------------------------------ services


class Service:
    """Routes plus state; subclasses add routes with ``self.route``."""

    name = ""

    def __init__(self, dependencies: Dependencies) -> None:
        self.dependencies = dependencies
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.route("GET", "/health", lambda request: (200, "ok\n"))

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """``pattern`` is a path with ``<name>`` placeholders for one path segment each."""
        regex = re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"{regex}$"), handler))

    def handle(self, method: str, path: str, body: bytes, request_id: str) -> Reply:
        path = path.split("?", 1)[0]
        path_known = False
        for route_method, regex, handler in self._routes:
            match = regex.match(path)
            if match is None:
                continue
            if route_method != method and not (route_method == "GET" and method == "HEAD"):
                path_known = True
                continue
            return handler(Request(method, path, match.groupdict(), body, request_id))
        if path_known:
            raise ShopError(405, f"method {method} not allowed on {path}")
        raise ShopError(404, f"{self.name} has no route for {method} {path}")


class Inventory(Service):
    name = "inventory"

    def __init__(self, dependencies: Dependencies) -> None:
        super().__init__(dependencies)
        self._lock = threading.Lock()  # over stock and reservations, which change together
        self._items = {item["id"]: dict(item) for item in CATALOG}
        self._reservations = _Ledger()
        self.route("GET", "/items", self.list_items)
        self.route("GET", "/items/<id>", self.get_item)
        self.route("POST", "/reserve", self.reserve)
        self.route("POST", "/release", self.release)
        self.route("GET", "/reservations/<id>", self.get_reservation)

    def list_items(self, request: Request) -> Reply:
        with self._lock:
            return 200, {"items": [dict(item) for item in self._items.values()]}

    def get_item(self, request: Request) -> Reply:
        item_id = request.params["id"]
        with self._lock:
            item = self._items.get(int(item_id)) if item_id.isdigit() else None
            if item is None:
                raise ShopError(404, f"no item with id {item_id}")
            return 200, dict(item)

    def reserve(self, request: Request) -> Reply:
        """Take stock for every line, or for none of them (409 naming what is short)."""
        lines = _order_lines(request.json().get("items"))
        reservation_id = _new_id("res")
        with self._lock:
            for line in lines:
                item = self._items.get(line["id"])
                if item is None:
                    raise ShopError(400, f"no item with id {line['id']}")
                if item["stock"] < line["qty"]:
                    raise ShopError(
                        409,
                        f"out of stock: {item['name']} (id {item['id']}):"
                        f" {line['qty']} wanted, {item['stock']} left",
                    )
            priced = []
            for line in lines:
                item = self._items[line["id"]]
                item["stock"] -= line["qty"]
                priced.append({**line, "price_cents": item["price_cents"]})
            total = sum(line["qty"] * line["price_cents"] for line in priced)
            self._reservations.add(
                reservation_id,
                {
                    "reservation_id": reservation_id,
                    "items": priced,
                    "total_cents": total,
                    "status": "reserved",
                    "request_id": request.request_id,
                },
            )
        return 200, {"reservation_id": reservation_id, "items": priced, "total_cents": total}

    def release(self, request: Request) -> Reply:
        """Put a reservation's stock back (a declined payment); releasing twice is harmless."""
        reservation_id = _nonempty_str(request.json().get("reservation_id"), "reservation_id")
        with self._lock:
            record = self._reservations.get(reservation_id)
            if record is None:
                raise ShopError(404, f"no reservation {reservation_id}")
            if record["status"] == "reserved":
                for line in record["items"]:
                    self._items[line["id"]]["stock"] += line["qty"]
                record["status"] = "released"
        return 200, {"reservation_id": reservation_id, "status": "released"}

    def get_reservation(self, request: Request) -> Reply:
        with self._lock:
            record = self._reservations.get(request.params["id"])
            if record is None:
                raise ShopError(404, f"no reservation {request.params['id']}")
            return 200, dict(record)


class Payments(Service):
    name = "payments"

    def __init__(self, dependencies: Dependencies) -> None:
        super().__init__(dependencies)
        self._lock = threading.Lock()
        self._payments = _Ledger()
        self.route("POST", "/charge", self.charge)
        self.route("GET", "/payments/<id>", self.get_payment)

    def charge(self, request: Request) -> Reply:
        body = request.json()
        order_id = _nonempty_str(body.get("order_id"), "order_id")
        amount = _positive_int(body.get("amount_cents"), "amount_cents")
        card = _nonempty_str(body.get("card"), "card").replace(" ", "")
        if not card.isdigit() or not 12 <= len(card) <= 19:
            raise ShopError(400, "card: expected 12 to 19 digits")
        if card in DECLINED_CARDS:
            raise ShopError(402, f"card ending {card[-4:]} was declined")
        payment_id = _new_id("pay")
        record = {
            "payment_id": payment_id,
            "order_id": order_id,
            "amount_cents": amount,
            "card_last4": card[-4:],
            "status": "approved",
            "request_id": request.request_id,
        }
        with self._lock:
            self._payments.add(payment_id, record)
        return 200, {"payment_id": payment_id, "status": "approved"}

    def get_payment(self, request: Request) -> Reply:
        with self._lock:
            record = self._payments.get(request.params["id"])
        if record is None:
            raise ShopError(404, f"no payment {request.params['id']}")
        return 200, record


class Checkout(Service):
    name = "checkout"

    def __init__(self, dependencies: Dependencies) -> None:
        super().__init__(dependencies)
        self.route("POST", "/checkout", self.checkout)

    def checkout(self, request: Request) -> Reply:
        """Reserve the stock, then charge the card; a declined card releases the stock."""
        body = request.json()
        lines = _order_lines(body.get("items"))
        card = _nonempty_str(body.get("card"), "card")
        call = self.dependencies.call_ok
        reservation = call("inventory", "POST", "/reserve", request.request_id, {"items": lines})
        order_id = _new_id("ord")
        charge = {"order_id": order_id, "amount_cents": reservation["total_cents"], "card": card}
        try:
            payment = call("payments", "POST", "/charge", request.request_id, charge)
        except ShopError as exc:
            if 400 <= exc.status < 500:
                # Payments gave a clear "no", so the stock can go back on the shelf. After a
                # 502 the charge may have gone through; the reservation stays.
                release = {"reservation_id": reservation["reservation_id"]}
                with contextlib.suppress(ShopError):  # the caller still needs the real answer
                    self.dependencies.call(
                        "inventory", "POST", "/release", request.request_id, release
                    )
            raise
        return 200, {
            "order_id": order_id,
            "total_cents": reservation["total_cents"],
            "payment_id": payment["payment_id"],
            "reservation_id": reservation["reservation_id"],
        }


class Frontend(Service):
    name = "frontend"

    def __init__(self, dependencies: Dependencies) -> None:
        super().__init__(dependencies)
        self._carts: dict[str, dict[int, dict[str, Any]]] = {}  # session -> id -> line
        self._carts_lock = threading.Lock()
        self.route("GET", "/", self.index)
        self.route("GET", "/products/<id>", self.product)
        self.route("GET", "/cart/<session>", self.get_cart)
        self.route("POST", "/cart/<session>/items", self.add_to_cart)
        self.route("POST", "/cart/<session>/checkout", self.checkout)

    def index(self, request: Request) -> Reply:
        items = self.dependencies.call_ok("inventory", "GET", "/items", request.request_id)
        return 200, {
            "shop": "meshpy demo shop",
            "products": items["items"],
            "try": [
                "GET /products/<id>",
                'POST /cart/<session>/items {"id": 1, "qty": 2}',
                "GET /cart/<session>",
                'POST /cart/<session>/checkout {"card": "4242424242424242"}',
                'POST /cart/<session>/checkout {"card": "4000000000000002"}  (declined)',
            ],
        }

    def product(self, request: Request) -> Reply:
        path = f"/items/{request.params['id']}"
        return 200, self.dependencies.call_ok("inventory", "GET", path, request.request_id)

    def _cart_view(self, session: str) -> dict[str, Any]:
        with self._carts_lock:
            lines = [dict(line) for line in self._carts.get(session, {}).values()]
        total = sum(line["qty"] * line["price_cents"] for line in lines)
        return {"session": session, "items": lines, "total_cents": total}

    def get_cart(self, request: Request) -> Reply:
        return 200, self._cart_view(request.params["session"])

    def add_to_cart(self, request: Request) -> Reply:
        body = request.json()
        item_id = _positive_int(body.get("id"), "id")
        qty = _positive_int(body.get("qty", 1), "qty")
        # Ask inventory, so unknown products are refused now and the cart can show prices.
        product = self.dependencies.call_ok(
            "inventory", "GET", f"/items/{item_id}", request.request_id
        )
        session = request.params["session"]
        with self._carts_lock:
            cart = self._carts.setdefault(session, {})
            line = cart.setdefault(
                item_id,
                {"id": item_id, "name": product["name"], "price_cents": product["price_cents"]},
            )
            line["qty"] = line.get("qty", 0) + qty
        return 200, self._cart_view(session)

    def checkout(self, request: Request) -> Reply:
        card = request.json().get("card")
        session = request.params["session"]
        with self._carts_lock:
            lines = [
                {"id": i, "qty": line["qty"]} for i, line in self._carts.get(session, {}).items()
            ]
        if not lines:
            raise ShopError(400, f"cart {session} is empty")
        order = {"items": lines, "card": card}
        receipt = self.dependencies.call_ok(
            "checkout", "POST", "/checkout", request.request_id, order
        )
        with self._carts_lock:
            self._carts.pop(session, None)
        return 200, receipt


SERVICE_CLASSES: dict[str, type[Service]] = {
    "frontend": Frontend,
    "checkout": Checkout,
    "payments": Payments,
    "inventory": Inventory,
}


# ------------------------------------------------------------------------------ HTTP server


class _ShopHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the sidecars pool their connections to apps
    # Longer than the sidecars' pool idle timeout (90 s) so they drop idle connections first,
    # yet a client that vanished does not hold a thread forever.
    timeout = 120
    # Headers and body go out in two writes; without this, Nagle holds the body back until
    # the client's delayed ACK of the headers, some 40 ms later.
    disable_nagle_algorithm = True
    server: ShopServer

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        request_id = self.headers.get("x-request-id") or str(uuid.uuid4())
        try:
            body = self._read_body()
            status, payload = self.server.service.handle(self.command, self.path, body, request_id)
        except ShopError as exc:
            status, payload = exc.status, {"error": exc.message}
        except Exception as exc:  # a bug: answer it rather than drop the connection
            status, payload = 500, {"error": f"{self.server.name}: internal error: {exc!r}"}
        if isinstance(payload, str):
            data, content_type = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(payload).encode() + b"\n", "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", request_id)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            try:
                while size := int(self.rfile.readline().split(b";", 1)[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            except ValueError:
                self.close_connection = True  # the body's end is unknown: the stream is lost
                raise ShopError(400, "malformed chunked body") from None
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            self.close_connection = True  # the body's end is unknown: the stream is lost
            raise ShopError(400, f"invalid Content-Length {length!r}")
        return self.rfile.read(int(length))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the sidecars' access logs and metrics cover every request


class ShopServer(ThreadingHTTPServer):
    """One shop service, served from a daemon thread; ``stop()`` ends it and its connections."""

    daemon_threads = True
    block_on_close = False  # stop() closes the connections itself
    request_queue_size = 1024  # the default 5 drops SYNs when many clients connect at once

    def __init__(self, service: Service, listen: tuple[str, int]) -> None:
        if ":" in listen[0]:
            self.address_family = socket.AF_INET6
        super().__init__(listen, _ShopHandler)
        self.service = service
        self.name = service.name
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        # A short poll interval keeps stop() quick: shutdown() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name=f"shop-{self.name}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # an AF_INET or AF_INET6 server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hang up; that's fine
            super().handle_error(request, client_address)

    def stop(self) -> None:
        """Stop accepting, cut open keep-alive connections (callers then see the service
        gone, as they would a crashed process) and join the serving thread."""
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                connection.shutdown(socket.SHUT_RDWR)
        self._thread.join()


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def start_service(
    name: str,
    listen: str = "127.0.0.1:0",
    *,
    outbound: str | None = None,
    peers: dict[str, str] | None = None,
) -> ShopServer:
    """Start service ``name`` on ``listen`` in a daemon thread.

    Calls to other services go to the sidecar at ``outbound`` (``Host: <service>``) or, when
    ``outbound`` is None, to ``peers[<service>]``.
    """
    if name not in SERVICE_CLASSES:
        raise ValueError(f"unknown service {name!r}; expected one of {', '.join(SERVICES)}")
    peers = dict(peers or {})
    if outbound is None:
        missing = [dep for dep in DEPENDENCIES[name] if dep not in peers]
        if missing:
            raise ValueError(f"{name} needs outbound= or peers= with {', '.join(missing)}")
    service = SERVICE_CLASSES[name](Dependencies(outbound, peers))
    return ShopServer(service, _split_address(listen))


def main(argv: list[str] | None = None) -> int:
    """``python -m meshpy.shop SERVICE ...``: run one service until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m meshpy.shop", description=main.__doc__)
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--listen", default="127.0.0.1:0", help="ip:port (default: a free port)")
    parser.add_argument("--outbound", help="the local sidecar's outbound listener, ip:port")
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=ADDR",
        help="a dependency's address when there is no sidecar; repeatable",
    )
    args = parser.parse_args(argv)
    peers = {}
    for value in args.peer:
        peer, sep, address = value.partition("=")
        if not sep:
            parser.error(f"--peer: expected NAME=ADDR, got {value!r}")
        peers[peer] = address
    try:
        server = start_service(args.service, args.listen, outbound=args.outbound, peers=peers)
    except (ValueError, OSError) as exc:
        print(f"meshpy shop: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    print(f"meshpy shop: {server.name} listening on {server.address}", flush=True)
    stopping.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
