"""A private multi-host network on one machine, built from Linux network namespaces.

``Network(["h1", "h2"])`` creates a "switch" namespace holding a bridge and one namespace per
host, each joined to the bridge by a veth pair and given one address in a /24 that nothing on
the machine uses. Nothing is added to the root namespace: the veths are created inside the
switch namespace with their peer placed straight into the host's. On exit every process
started through a ``Host`` is terminated (then killed) and every namespace deleted, which
removes its veths. Needs root and iproute2; tests using it carry ``requires_root_netns``.

Namespace names are ``<prefix>-<pid>-<token>-<host>``: the pid of the creating process lets
``remove_stale_namespaces`` tell a crashed run's leftovers from a live parallel run's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = [
    "CurlResult",
    "Host",
    "Network",
    "remove_stale_namespaces",
    "requires_root_netns",
]

PREFIX = "mpy"
SWITCH = "switch"
_HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,9}")  # "to-<name>" must fit in 15 characters


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def _ip_json(*args: str) -> list[dict[str, Any]]:
    # `ip -j netns list` prints nothing at all when there are none.
    out = _ip("-j", *args).stdout.strip()
    return json.loads(out) if out else []


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "curl", "ss"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}`"
    try:
        _ip("netns", "list")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` is unavailable: {exc}"
    return None


_REASON = _unavailable_reason()
requires_root_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kill whatever still runs in ``ns`` (a namespace outlives its unmount while in use)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def remove_stale_namespaces(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named by ``Network(prefix=prefix)`` whose creating process is gone."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-")
    removed = []
    for entry in _ip_json("netns", "list"):
        name = entry["name"]
        match = pattern.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_namespace(name)
            removed.append(name)
    return removed


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the root namespace's addresses and routes (all tables)."""
    found = []
    for link in _ip_json("addr"):
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet":
                found.append(
                    ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
                )
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst != "default":  # 0.0.0.0/0 overlaps everything but is no reason to avoid a subnet
            found.append(ipaddress.IPv4Network(dst, strict=False))
    return found


def _free_subnet() -> ipaddress.IPv4Network:
    in_use = _networks_in_use()
    for _ in range(100):
        candidate = ipaddress.IPv4Network(
            f"10.{secrets.randbelow(190) + 64}.{secrets.randbelow(256)}.0/24"
        )
        if not any(candidate.overlaps(net) for net in in_use):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 found")


@dataclass(frozen=True)
class CurlResult:
    """``status`` is 0 when no HTTP answer came; ``exit_code`` then says why (7: refused,
    28: timeout, 52: closed without a reply, 56: reset)."""

    status: int
    body: str
    exit_code: int
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


class Host:
    """One network namespace on the bridge: ``name`` is the logical name, ``ns`` the
    namespace's, ``ip`` its address on the shared /24."""

    def __init__(self, name: str, ns: str, ip: str) -> None:
        self.name = name
        self.ns = ns
        self.ip = ip
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, ip={self.ip!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host; it is stopped when the network closes.

        ``ip netns exec`` execs the command, so the Popen is the program itself; its own
        session lets ``terminate`` reach any children it starts.
        """
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(argv), **kw)
        self._procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(argv),
            check=check,
            capture_output=True,
            text=True,
            errors="replace",  # curl may hand back non-text bytes
            timeout=timeout,
        )

    def curl(self, url: str, *args: str, timeout: float = 5) -> CurlResult:
        """One request with curl from inside this host; ``args`` go to curl (``-H`` ...)."""
        # --noproxy: an http_proxy from the environment would be unreachable from here.
        argv = ["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout)]
        argv += ["-w", "\n%{http_code}", *args, url]
        done = self.run(argv, check=False, timeout=timeout + 5)
        body, _, code = done.stdout.rpartition("\n")
        return CurlResult(int(code or 0), body, done.returncode, done.stderr.strip())

    def listening(self, port: int, ip: str | None = None) -> bool:
        """Whether a TCP socket listens on ``port`` here (on ``ip``, or on any address)."""
        lines = self.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.splitlines()
        if ip is None:
            return bool(lines)
        wanted = {f"{ip}:{port}", f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}"}
        return any(line.split()[3] in wanted for line in lines)

    def wait_for_port(self, port: int, ip: str | None = None, timeout: float = 10) -> None:
        _poll(lambda: self.listening(port, ip), timeout, f"{self.name}: listen on {port}")

    def wait_for_http(self, url: str, status: int = 200, timeout: float = 10) -> None:
        """Poll ``url`` from this host until it answers ``status`` (a readiness probe)."""
        _poll(
            lambda: self.curl(url, timeout=1).status == status,
            timeout,
            f"{self.name}: {url} to answer {status}",
        )

    def terminate(self, proc: subprocess.Popen[Any], timeout: float = 5) -> None:
        """SIGTERM the process's session, then SIGKILL it if it outstays ``timeout``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        proc.wait()  # reap it even if it died of SIGKILL between the two polls
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self._procs.copy()):
            self.terminate(proc)


def _poll(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Network:
    """A bridge in its own namespace and one namespace per host, hosts at .1, .2, ... in
    order. Use as a context manager; ``net["h1"]`` gives a host."""

    def __init__(self, hosts: Iterable[str], prefix: str = PREFIX) -> None:
        self.names = list(hosts)
        for name in self.names:
            if not _HOST_NAME.fullmatch(name) or name == SWITCH:
                raise ValueError(f"bad host name {name!r}: [a-z][a-z0-9]{{0,9}}, not {SWITCH}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate host names in {self.names}")
        self.prefix = prefix
        self.base = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.switch = f"{self.base}-{SWITCH}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Network:
        remove_stale_namespaces(self.prefix)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self.subnet = subnet = _free_subnet()
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, name in enumerate(self.names, start=1):
            ns = f"{self.base}-{name}"
            self._add_namespace(ns)
            port = f"to-{name}"
            # Both ends are born where they belong: nothing appears in the root namespace.
            veth = ["type", "veth", "peer", "name", "eth0", "netns", ns]
            _ip("-n", self.switch, "link", "add", port, *veth)
            ip = str(subnet.network_address + index)
            _ip("-n", ns, "addr", "add", f"{ip}/{subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            self.hosts[name] = Host(name, ns, ip)

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop_all()
        for ns in reversed(self._namespaces):
            _delete_namespace(ns)
        self._namespaces.clear()
