"""The control-plane store: one conformance suite run against SqliteStore and a real etcd.

Each test runs its coroutine with ``asyncio.run``. The etcd tests share one 1-member cluster
per module and isolate themselves by key prefix; the failover test starts its own 3 members.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import EtcdCluster, require_etcd

from meshpy.controlplane.etcd import EtcdStore
from meshpy.controlplane.store import SqliteStore, Store, StoreError

PROMPT = 0.5  # seconds within which a change must wake `wait`
LEASE_TTL = 1.0  # etcd's minimum with the cluster's 500 ms election timeout


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


@dataclass
class Backend:
    name: str
    new_store: Callable[[], Store]  # an unstarted store over this test's data
    separate_clients: bool  # whether a second store sees and wakes on the first one's changes

    @asynccontextmanager
    async def started(self) -> AsyncIterator[Store]:
        store = self.new_store()
        await store.start()
        try:
            yield store
        finally:
            await store.close()

    @asynccontextmanager
    async def pair(self) -> AsyncIterator[tuple[Store, Store]]:
        """A store and another client of the same data (the same store for SQLite, which
        one process owns)."""
        async with self.started() as store:
            if not self.separate_clients:
                yield store, store
                return
            async with self.started() as other:
                yield store, other


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    require_etcd()
    with EtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", lambda: SqliteStore(tmp_path / "store.sqlite3"), False)
    cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
    url = f"{cluster.url}/test-{uuid.uuid4().hex}"  # a fresh prefix: no other test's keys
    return Backend("etcd", lambda: EtcdStore.from_url(url), True)


async def eventually_gone(store: Store, key: str, within: float) -> float:
    """Seconds until `key` disappears; fails after `within`."""
    started = time.monotonic()
    while await store.get(key) is not None:
        assert time.monotonic() - started < within, f"{key} still there after {within}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# ---------------------------------------------------------------------------- keys and values


def test_get_put_delete(backend: Backend) -> None:
    async def body() -> None:
        async with backend.started() as store:
            assert await store.get("resources/services/shop/payments") is None
            value = {"name": "payments", "ports": [8080], "labels": {"tier": "é"}}
            revision = await store.put("resources/services/shop/payments", value)
            entry = await store.get("resources/services/shop/payments")
            assert entry is not None
            assert (entry.key, entry.value, entry.revision, entry.lease) == (
                "resources/services/shop/payments",
                value,
                revision,
                None,
            )
            assert await store.delete("resources/services/shop/payments") is True
            assert await store.get("resources/services/shop/payments") is None
            assert await store.delete("resources/services/shop/payments") is False

    run(body)


def test_list_is_by_prefix_and_sorted(backend: Backend) -> None:
    async def body() -> None:
        async with backend.started() as store:
            for key in ["svc/b", "svc/a/2", "svc/a/10", "svc/a/1", "svcx", "other/a"]:
                await store.put(key, {"key": key})
            entries = await store.list("svc/a/")
            assert [entry.key for entry in entries] == ["svc/a/1", "svc/a/10", "svc/a/2"]
            assert [entry.value["key"] for entry in entries] == ["svc/a/1", "svc/a/10", "svc/a/2"]
            assert [entry.key for entry in await store.list("svc")] == [
                "svc/a/1",
                "svc/a/10",
                "svc/a/2",
                "svc/b",
                "svcx",
            ]
            assert len(await store.list("")) == 6
            assert await store.list("nothing/") == []

    run(body)


def test_put_all_is_one_change(backend: Backend) -> None:
    async def body() -> None:
        async with backend.pair() as (store, other):
            await store.put("a", {"v": 1})
            await store.put("b", {"v": 1})
            before = await store.revision()
            revision = await store.put_all([("c", {"v": 2}), ("d", {"v": 2})], ["a"])
            assert revision == before + 1  # the whole batch is one revision
            assert await other.revision() == revision
            assert await other.get("a") is None
            assert [(e.key, e.revision) for e in await other.list("")] == [
                ("b", before),
                ("c", revision),
                ("d", revision),
            ]

    run(body)


def test_put_all_keeps_last_put_and_lets_delete_win(backend: Backend) -> None:
    async def body() -> None:
        async with backend.started() as store:
            await store.put("gone", {"v": 0})
            await store.put_all([("k", {"v": 1}), ("k", {"v": 2}), ("gone", {"v": 1})], ["gone"])
            entry = await store.get("k")
            assert entry is not None and entry.value == {"v": 2}
            assert await store.get("gone") is None

    run(body)


def test_revisions_strictly_increase(backend: Backend) -> None:
    async def body() -> None:
        async with backend.started() as store:
            revisions = [await store.revision()]
            for i in range(3):
                revisions.append(await store.put(f"k{i}", {"i": i}))
                assert await store.revision() == revisions[-1]
            assert await store.delete("k0")
            revisions.append(await store.revision())
            assert revisions == sorted(set(revisions)), revisions

    run(body)


# ---------------------------------------------------------------------------- wait


def test_wait_returns_at_once_when_already_past(backend: Backend) -> None:
    async def body() -> None:
        async with backend.started() as store:
            revision = await store.put("k", {})
            started = time.monotonic()
            assert await store.wait(revision - 1, timeout=5) >= revision
            assert time.monotonic() - started < PROMPT

    run(body)


def test_wait_wakes_promptly_on_another_clients_change(backend: Backend) -> None:
    async def body() -> None:
        async with backend.pair() as (watcher, writer):
            revision = await writer.revision()
            await watcher.wait(revision - 1, timeout=5)  # the watcher has caught up

            async def write_later() -> int:
                await asyncio.sleep(0.2)
                return await writer.put("resources/services/shop/payments", {"v": 1})

            write = asyncio.create_task(write_later())
            started = time.monotonic()
            woke_at = await watcher.wait(revision, timeout=5)
            elapsed = time.monotonic() - started
            assert woke_at >= await write > revision
            assert 0.15 < elapsed < 0.2 + PROMPT, elapsed

    run(body)


def test_wait_wakes_on_delete(backend: Backend) -> None:
    async def body() -> None:
        async with backend.pair() as (watcher, writer):
            revision = await writer.put("k", {})
            await watcher.wait(revision - 1, timeout=5)
            waiting = asyncio.create_task(watcher.wait(revision, timeout=5))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            assert await writer.delete("k")
            assert await waiting > revision
            assert time.monotonic() - started < PROMPT

    run(body)


def test_wait_times_out_when_nothing_changes(backend: Backend) -> None:
    async def body() -> None:
        async with backend.started() as store:
            revision = await store.put("k", {})
            started = time.monotonic()
            assert await store.wait(revision, timeout=0.3) == revision
            assert 0.3 <= time.monotonic() - started < 0.3 + PROMPT

    run(body)


# ---------------------------------------------------------------------------- leases


def test_lease_expiry_deletes_keys_and_wakes_wait(backend: Backend) -> None:
    async def body() -> None:
        async with backend.pair() as (watcher, writer):
            lease = await writer.grant_lease(LEASE_TTL)
            await writer.put("sidecars/s1", {"id": "s1"}, lease=lease)
            revision = await writer.put("endpoints/shop/payments/s1", {"port": 1}, lease=lease)
            await writer.put("resources/kept", {})  # no lease: stays
            entry = await watcher.get("sidecars/s1")
            assert entry is not None and entry.lease == lease
            revision = await watcher.revision()

            started = time.monotonic()
            assert await watcher.wait(revision, timeout=5) > revision  # woken by the expiry
            elapsed = time.monotonic() - started
            assert LEASE_TTL * 0.8 < elapsed < LEASE_TTL + 1.5, elapsed
            await eventually_gone(watcher, "sidecars/s1", within=PROMPT)
            assert await watcher.get("endpoints/shop/payments/s1") is None
            assert await watcher.get("resources/kept") is not None
            with pytest.raises(StoreError, match="expired"):
                await writer.put("sidecars/s1", {"id": "s1"}, lease=lease)

    run(body)


def test_keepalive_keeps_a_lease_then_reports_it_gone(backend: Backend) -> None:
    async def body() -> None:
        async with backend.started() as store:
            lease = await store.grant_lease(LEASE_TTL)
            await store.put("sidecars/s1", {}, lease=lease)
            deadline = time.monotonic() + 2.5 * LEASE_TTL
            while time.monotonic() < deadline:
                assert await store.keepalive(lease) is True
                await asyncio.sleep(LEASE_TTL / 4)
            assert await store.get("sidecars/s1") is not None  # well past its ttl
            await eventually_gone(store, "sidecars/s1", within=LEASE_TTL + 1.5)
            assert await store.keepalive(lease) is False

    run(body)


def test_revoke_deletes_keys_at_once(backend: Backend) -> None:
    async def body() -> None:
        async with backend.pair() as (watcher, writer):
            lease = await writer.grant_lease(30)
            await writer.put_all([("sidecars/s1", {}), ("endpoints/e/s1", {})], lease=lease)
            revision = await writer.revision()
            await writer.revoke(lease)
            assert await watcher.wait(revision, timeout=PROMPT) > revision
            assert await watcher.list("") == []
            assert await writer.keepalive(lease) is False
            await writer.revoke(lease)  # revoking a lease that is gone is not an error

    run(body)


# ---------------------------------------------------------------------------- SqliteStore


def test_sqlite_data_survives_reopen(tmp_path: Path) -> None:
    async def body() -> None:
        store = SqliteStore(tmp_path / "store.sqlite3")
        await store.start()
        revision = await store.put("resources/services/shop/payments", {"v": 1})
        await store.close()

        store = SqliteStore(tmp_path / "store.sqlite3")
        await store.start()
        try:
            assert await store.revision() == revision
            entry = await store.get("resources/services/shop/payments")
            assert entry is not None and (entry.value, entry.revision) == ({"v": 1}, revision)
            assert await store.put("k", {}) == revision + 1
        finally:
            await store.close()

    run(body)


def test_sqlite_leases_get_their_full_ttl_again_on_restart(tmp_path: Path) -> None:
    async def body() -> None:
        store = SqliteStore(tmp_path / "store.sqlite3")
        await store.start()
        lease = await store.grant_lease(LEASE_TTL)
        await store.put("sidecars/s1", {}, lease=lease)
        await store.close()
        await asyncio.sleep(LEASE_TTL * 1.5)  # down for longer than the ttl

        store = SqliteStore(tmp_path / "store.sqlite3")
        await store.start()
        try:
            await asyncio.sleep(LEASE_TTL / 2)
            assert await store.get("sidecars/s1") is not None
            assert await store.keepalive(lease) is True
            gone_after = await eventually_gone(store, "sidecars/s1", within=LEASE_TTL + 1)
            assert gone_after > LEASE_TTL * 0.8
        finally:
            await store.close()

    run(body)


# ---------------------------------------------------------------------------- EtcdStore


def test_etcd_url_parsing() -> None:
    store = EtcdStore.from_url("etcd://10.0.0.1:2379,10.0.0.2:2380,etcd3")
    assert store.endpoints == ["10.0.0.1:2379", "10.0.0.2:2380", "etcd3:2379"]
    assert store.prefix == "/meshpy/"
    assert EtcdStore.from_url("etcd://h:1/mymesh").prefix == "/mymesh/"
    assert EtcdStore.from_url("etcd://h:1/a/b/").prefix == "/a/b/"
    with pytest.raises(StoreError):
        EtcdStore.from_url("etcd:///mymesh")


def test_etcd_prefix_is_added_and_stripped(etcd_cluster: EtcdCluster) -> None:
    async def body() -> None:
        base = f"{etcd_cluster.url}/{uuid.uuid4().hex}"
        outer, inner = EtcdStore.from_url(base), EtcdStore.from_url(f"{base}/inner")
        await outer.start()
        await inner.start()
        try:
            await inner.put("k", {"v": 1})
            assert [entry.key for entry in await inner.list("")] == ["k"]
            assert [entry.key for entry in await outer.list("")] == ["inner/k"]
            assert await outer.get("k") is None
        finally:
            await inner.close()
            await outer.close()

    run(body)


def test_etcd_unreachable_names_the_endpoints() -> None:
    async def body() -> None:
        port = _closed_port()
        store = EtcdStore.from_url(f"etcd://127.0.0.1:{port}")
        with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
            await store.start()
        await store.close()

    run(body)


def test_etcd_survives_losing_the_member_in_use() -> None:
    require_etcd()

    async def body(cluster: EtcdCluster) -> None:
        first, second = EtcdStore.from_url(cluster.url), EtcdStore.from_url(cluster.url)
        await first.start()
        await second.start()
        try:
            revision = await first.put("k", {"v": 1})
            await second.wait(revision - 1, timeout=5)
            cluster.kill(0)  # the member both stores talk to first

            started = time.monotonic()
            revision = await first.put("k", {"v": 2})
            # `second` makes no request before this: its watch alone must find another member.
            assert await second.wait(revision - 1, timeout=5) >= revision
            entry = await second.get("k")
            assert entry is not None and entry.value == {"v": 2}
            assert time.monotonic() - started < 5

            waiting = asyncio.create_task(second.wait(revision, timeout=5))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await first.put("k", {"v": 3})
            assert await waiting > revision
            assert time.monotonic() - started < PROMPT

            late = EtcdStore.from_url(cluster.url)  # starts with its first endpoint dead
            await late.start()
            entry = await late.get("k")
            await late.close()
            assert entry is not None and entry.value == {"v": 3}
        finally:
            await second.close()
            await first.close()

    with EtcdCluster(3) as cluster:
        asyncio.run(body(cluster))


def _closed_port() -> int:
    """A port nothing listens on: the kernel just handed it out and it was released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
