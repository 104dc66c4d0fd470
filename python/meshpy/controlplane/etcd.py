"""`EtcdStore`: the control plane's store in an etcd v3 cluster, so several replicas share a mesh.

It talks to etcd's JSON gRPC gateway (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/watch``,
``/v3/lease/...``) with httpx rather than an etcd client library: the API surface needed is
small and the gateway ships with every etcd since 3.4. Keys and values travel base64-encoded;
int64 fields come back as JSON strings.

Every key lives under a prefix (``/meshpy/`` unless the URL names one), added and stripped
here so callers see the same keys as with `SqliteStore`. A request goes to one member and, on
a connection error or timeout, to the next, so the store survives losing a member. One
background watch over the whole prefix follows the cluster revision for `wait`, which thus
wakes on changes made by any replica, including lease expiries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from .store import Entry, Store, StoreError

__all__ = ["EtcdStore"]

log = logging.getLogger("meshpy.controlplane.etcd")

DEFAULT_PREFIX = "/meshpy/"
DEFAULT_PORT = 2379
_REQUEST_TIMEOUT = 2.0  # seconds before a member counts as unreachable and the next is tried
_RECONNECT_DELAY = 0.2  # seconds between watch reconnects, so a dead cluster is not spun on
_GRPC_NOT_FOUND = 5  # the gRPC status etcd returns for an unknown lease
_GRPC_UNAVAILABLE = 14  # no leader, leader changed, member stopping: another member may answer


class _EtcdError(StoreError):
    """etcd answered with a gRPC error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class EtcdStore(Store):
    """A `Store` in etcd, reached through its v3 JSON gateway at any of `endpoints`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout: float = _REQUEST_TIMEOUT,
    ) -> None:
        if not endpoints:
            raise StoreError("etcd: no endpoints given")
        self.endpoints = list(endpoints)  # "host:port"
        self.prefix = prefix
        self._timeout = timeout
        self._current = 0  # index of the member requests go to first
        self._client: httpx.AsyncClient | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._latest = 0  # the highest cluster revision the watch has reported
        self._changed = asyncio.Condition()

    @classmethod
    def from_url(cls, url: str) -> EtcdStore:
        """``etcd://h1:p1,h2:p2[/prefix]``; the prefix defaults to ``/meshpy/``."""
        parts = urlsplit(url)
        if parts.scheme != "etcd" or not parts.netloc:
            raise StoreError(f"bad etcd url {url!r}: expected etcd://host:port[,host:port...]")
        endpoints = []
        for endpoint in parts.netloc.split(","):
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit():
                host, port = endpoint, str(DEFAULT_PORT)
            if not host:
                raise StoreError(f"bad etcd url {url!r}: empty host")
            endpoints.append(f"{host}:{port}")
        name = parts.path.strip("/")
        return cls(endpoints, f"/{name}/" if name else DEFAULT_PREFIX)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout)
        self._latest = await self.revision()  # also fails start() early when no member answers
        self._watcher = asyncio.create_task(self._watch_forever())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def get(self, key: str) -> Entry | None:
        reply = await self._call("/v3/kv/range", {"key": _b64(self.prefix + key)})
        kvs = reply.get("kvs", [])
        return self._entry(kvs[0]) if kvs else None

    async def list(self, prefix: str) -> list[Entry]:
        start = self.prefix + prefix
        reply = await self._call(
            "/v3/kv/range", {"key": _b64(start), "range_end": _b64(_prefix_end(start))}
        )
        return [self._entry(kv) for kv in reply.get("kvs", [])]  # etcd sorts by key bytes

    async def put_all(
        self,
        puts: Iterable[tuple[str, dict[str, Any]]],
        deletes: Iterable[str] = (),
        *,
        lease: int | None = None,
    ) -> int:
        # etcd refuses a txn naming a key twice; keep SqliteStore's meaning instead: the
        # last put of a key wins and a delete beats a put.
        deleted = dict.fromkeys(deletes)
        latest = {key: value for key, value in puts if key not in deleted}
        operations: list[dict[str, Any]] = []
        for key, value in latest.items():
            put: dict[str, Any] = {"key": _b64(self.prefix + key), "value": _b64(json.dumps(value))}
            if lease is not None:
                put["lease"] = str(lease)
            operations.append({"requestPut": put})
        operations += [{"requestDeleteRange": {"key": _b64(self.prefix + key)}} for key in deleted]
        try:
            reply = await self._call("/v3/kv/txn", {"success": operations})
        except _EtcdError as exc:
            if exc.code == _GRPC_NOT_FOUND and lease is not None:
                raise StoreError(f"lease {lease} has expired") from None
            raise
        return _revision(reply)

    async def delete(self, key: str) -> bool:
        reply = await self._call("/v3/kv/deleterange", {"key": _b64(self.prefix + key)})
        return int(reply.get("deleted", 0)) > 0

    async def revision(self) -> int:
        # A count-only range is the cheapest linearizable read that carries the header.
        reply = await self._call("/v3/kv/range", {"key": _b64(self.prefix), "count_only": True})
        return _revision(reply)

    async def wait(self, after: int, timeout: float) -> int:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: self._latest > after)
            return self._latest

    async def grant_lease(self, ttl: float) -> int:
        # etcd counts whole seconds and raises a TTL below its minimum (1.5 election
        # timeouts, rounded up to a second) to that minimum.
        reply = await self._call("/v3/lease/grant", {"TTL": max(1, math.ceil(ttl))})
        return int(reply["ID"])

    async def keepalive(self, lease: int) -> bool:
        # A streaming call: the gateway answers one {"result": ...} line per request line.
        try:
            reply = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        except _EtcdError as exc:
            if exc.code == _GRPC_NOT_FOUND:
                return False
            raise
        return int(reply.get("TTL", 0)) > 0  # an expired lease comes back with no TTL

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except _EtcdError as exc:
            if exc.code != _GRPC_NOT_FOUND:  # already expired: its keys are gone too
                raise

    def _entry(self, kv: dict[str, Any]) -> Entry:
        lease = int(kv.get("lease", 0))
        return Entry(
            key=_unb64(kv["key"]).removeprefix(self.prefix),
            value=json.loads(_unb64(kv.get("value", ""))),
            revision=int(kv["mod_revision"]),
            lease=lease or None,  # etcd's "no lease" is lease 0
        )

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to the first member that answers; its reply's result."""
        if self._client is None:
            raise StoreError("the store is not started")
        failures = []
        for _ in self.endpoints:
            index = self._current
            endpoint = self.endpoints[index]
            try:
                reply = await self._client.post(f"http://{endpoint}{path}", json=body)
                return _result(reply)
            except httpx.TransportError as exc:
                failures.append(f"{endpoint}: {type(exc).__name__} {exc}".rstrip())
            except _EtcdError as exc:
                if exc.code != _GRPC_UNAVAILABLE:
                    raise
                failures.append(f"{endpoint}: {exc}")
            self._move_on_from(index)
        raise StoreError(f"etcd {path}: no member answered ({'; '.join(failures)})")

    def _move_on_from(self, index: int) -> None:
        # Concurrent callers may fail on the same member at once: skip it only once.
        if self._current == index:
            self._current = (index + 1) % len(self.endpoints)

    async def _watch_forever(self) -> None:
        """Follow the cluster revision from the last one seen, across stream breaks."""
        assert self._client is not None
        while True:
            index = self._current
            endpoint = self.endpoints[index]
            request = {
                "create_request": {
                    "key": _b64(self.prefix),
                    "range_end": _b64(_prefix_end(self.prefix)),
                    "start_revision": str(self._latest + 1),
                }
            }
            reason = "the stream ended"
            try:
                async with self._client.stream(
                    "POST",
                    f"http://{endpoint}/v3/watch",
                    json=request,
                    # Ask etcd to end the stream when this member loses its leader, so a member
                    # cut off from the cluster does not hold the watch silently.
                    headers={"Grpc-Metadata-hasleader": "true"},
                    timeout=httpx.Timeout(self._timeout, read=None),  # idle streams are normal
                ) as stream:
                    async for line in stream.aiter_lines():
                        if line.strip() and not await self._follow(json.loads(line)):
                            reason = f"etcd ended it: {line.strip()[:200]}"
                            break
            except Exception as exc:  # whatever broke it: a dead watcher would leave `wait` deaf
                reason = f"{type(exc).__name__}: {exc}"
            log.warning("etcd watch on %s broke (%s); reconnecting", endpoint, reason)
            self._move_on_from(index)
            await asyncio.sleep(_RECONNECT_DELAY)

    async def _follow(self, message: dict[str, Any]) -> bool:
        """Take the revision one watch message reports; False when etcd ended the watch."""
        if "error" in message:
            return False
        result = message.get("result", {})
        seen = [int(result.get("header", {}).get("revision", 0))]
        seen += [int(event["kv"]["mod_revision"]) for event in result.get("events", [])]
        # A watch that etcd cancels (its start revision compacted away) reports no revision
        # itself, but its creation message carried the current one, so nothing is lost.
        if max(seen) > self._latest:
            async with self._changed:
                self._latest = max(seen)
                self._changed.notify_all()
        return not result.get("canceled", False)


def _result(reply: httpx.Response) -> dict[str, Any]:
    """The body of a gateway reply, raising its gRPC error as `_EtcdError`."""
    try:
        data = reply.json()
    except ValueError:
        raise StoreError(
            f"etcd {reply.url}: HTTP {reply.status_code}: {reply.text[:200]}"
        ) from None
    # Unary calls fail with {"error", "code", "message"} and a 4xx/5xx status; streaming calls
    # answer 200 with {"result": ...} or {"error": {"grpc_code", "message"}}.
    error = data.get("error")
    if isinstance(error, dict):
        raise _EtcdError(int(error.get("grpc_code", 0)), f"etcd: {error.get('message')}")
    if error is not None or reply.status_code != 200:
        raise _EtcdError(int(data.get("code", 0)), f"etcd: {data.get('message') or error}")
    return data.get("result", data)


def _revision(reply: dict[str, Any]) -> int:
    return int(reply["header"]["revision"])


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: str) -> bytes:
    """The first key after every key starting with `prefix` (etcd's range_end for a prefix).

    UTF-8 never holds a 0xFF byte, so bumping the last byte cannot overflow.
    """
    raw = prefix.encode()
    return raw[:-1] + bytes([raw[-1] + 1])
