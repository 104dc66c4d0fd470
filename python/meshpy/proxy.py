"""Run the Rust data plane from a config file: start, hot reload, graceful shutdown."""

import contextlib
import datetime as dt
import importlib
import importlib.util
import logging
import math
import os
import queue
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from . import _core
from .config import Identity, SidecarConfig, _read_file, loads_config
from .errors import ConfigError, ListenError, MeshpyError
from .filters import FilterSet, build_filter_set
from .runtime import FilterRuntime

# meshpy.ca and cryptography (8 MB of RSS) are imported where an identity needs them: a
# sidecar without one never does.
if TYPE_CHECKING:
    from .ca import IssuedCertificate

__all__ = ["Sidecar"]

log = logging.getLogger("meshpy.proxy")

_POLL_INTERVAL = 0.5  # seconds between looks at the config file
_RETRY_FIRST = 0.5  # seconds before retrying a failed self-issue, doubled per failure
_RETRY_MAX = 30.0


@contextlib.contextmanager
def _core_errors(source: str) -> Iterator[None]:
    """Map the core's exceptions onto meshpy's, in this one place."""
    try:
        yield
    except _core.CoreConfigError as exc:
        raise ConfigError([str(exc)], source) from exc
    except _core.ListenError as exc:
        raise ListenError(str(exc)) from exc
    except _core.CoreError as exc:
        raise MeshpyError(str(exc)) from exc


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _reimport(name: str, source: str) -> None:
    """Import module `name` afresh from `source`; raises whatever its code raises."""
    # The bytecode cache keys on mtime in whole seconds: a quick second edit could hit it.
    with contextlib.suppress(OSError, NotImplementedError, ValueError):
        os.unlink(importlib.util.cache_from_source(source))
    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    importlib.import_module(name)


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


class Sidecar:
    """One proxy serving the config file at `path`, reloadable while it runs.

    Construction binds every listener and starts serving; it raises ConfigError for a bad
    config and ListenError when an address cannot be bound.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        workers: int | None = None,
        *,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        # Where relative paths and filter modules resolve: the config's directory by default.
        self.base_dir = Path(base_dir) if base_dir is not None else self.path.parent
        self.last_error: str | None = None  # why the last refused config was refused
        # Work other threads hand to run()'s loop, which owns the proxy (see call_in_loop).
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        # While run() is looping: what a call or a signal writes to, to end its sleep.
        self._wake_send: socket.socket | None = None
        # A self-issued identity: its private directory, its key, the certificate, its renewal.
        self._identity_dir: Path | None = None
        self._issue_key: tuple[object, ...] | None = None
        self._issued: IssuedCertificate | None = None
        self._issued_dir: Path | None = None  # where self._issued's files are
        self._generation = 0
        self._renew_due = math.inf  # time.time() at which to renew
        self._retry_delay = _RETRY_FIRST
        # File mode: the certificate file last looked at, when to warn about it, and whether done.
        self._expiry_watch: tuple[object, float | None, bool] = (None, None, False)
        data = _read_file(self.path)
        try:
            self._config = self._parse(data)
            self._filters = self._build_filters(self._config)
        except BaseException:
            self._remove_identity_dir()
            raise
        # The content last applied or rejected, kept whole: a config file is small, and a
        # digest would load OpenSSL through hashlib (3.4 MB resident), which meshpy needs nowhere.
        self._seen = data
        self._stat = _stat_key(self.path)
        self._module_stats = self._filter_module_stats()
        self._identity_stats = self._identity_file_stats(self._config)
        self._runtime = FilterRuntime(_core.FilterQueue())
        self._runtime.expect_calls(bool(self._filters.chains))
        self._runtime.start()
        try:
            with _core_errors(str(self.path)):
                self._proxy = _core.Proxy(
                    self._config.to_core_json(self._filters),
                    self._runtime.queue,
                    self._filters.handles(),
                    workers,
                )
        except BaseException:
            self._runtime.stop()
            self._remove_identity_dir()
            raise

    @property
    def config(self) -> SidecarConfig:
        """The config currently in force."""
        return self._config

    @property
    def version(self) -> int:
        """Starts at the core's first version and grows by one per applied reload."""
        return self._proxy.version

    @property
    def addresses(self) -> dict[str, str]:
        """Listener name -> bound "ip:port", with the admin listener under "admin"."""
        return self._proxy.addresses()

    def is_running(self) -> bool:
        return self._proxy.is_running()

    def reload(self) -> bool:
        """Re-read the file and apply it; on any error log it and keep the current config."""
        try:
            data = _read_file(self.path)
        except ConfigError as exc:
            log.error("config reload failed, keeping version %d:\n%s", self.version, exc)
            return False
        return self._apply(data)

    def apply_config(self, data: bytes) -> bool:
        """Apply config text that does not come from the file (the control plane's push).

        On refusal the current config stays and `last_error` says why.
        """
        return self._apply(data)

    def call_in_loop(self, call: Callable[[], Any]) -> "Future[Any]":
        """Run `call` on the thread in run(), which owns the proxy; its result comes back
        through the future. For threads that drive the sidecar (the mesh agent)."""
        future: Future[Any] = Future()
        self._calls.put((call, future))
        self._wake_loop()
        return future

    def _wake_loop(self) -> None:
        wake = self._wake_send
        # None or closed: run() is not looping, and takes queued calls when it starts.
        # Full: it is already due to wake.
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(b"\0")

    def _run_calls(self) -> None:
        while True:
            try:
                call, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:
                    future.set_exception(exc)

    def shutdown(self, drain_timeout: float = 5.0) -> None:
        """Stop accepting, give in-flight requests up to `drain_timeout` seconds, then stop."""
        if self._proxy.is_running():
            with _core_errors(str(self.path)):
                self._proxy.shutdown(drain_timeout)
        # In-flight requests may need their filters until the drain is over.
        self._runtime.stop()
        self._remove_identity_dir()

    def run(self, drain_timeout: float) -> int:
        """Serve until SIGTERM or SIGINT, reloading on SIGHUP and when the file changes.

        Must be called from the main thread (signal handlers). Returns the exit status.
        """
        pending: set[str] = set()  # what the signal handlers asked for, acted on below

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            pending.add("reload" if signum == signal.SIGHUP else "stop")

        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {signum: signal.signal(signum, on_signal) for signum in signals}
        # The loop sleeps until its next timed job (the config look, a renewal), so an idle
        # sidecar does not keep waking its core; signals and calls end the sleep through
        # this pair.
        woken, wake = socket.socketpair()
        woken.setblocking(False)
        wake.setblocking(False)
        previous_wakeup_fd = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
        self._wake_send = wake
        try:
            print(f"meshpy proxy ready: {self._describe_addresses()}", flush=True)
            next_poll = time.monotonic() + _POLL_INTERVAL
            while "stop" not in pending:
                if "reload" in pending:
                    pending.discard("reload")
                    self.reload()
                self._run_calls()
                if time.time() >= self._renew_due:
                    self.renew_identity()
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + _POLL_INTERVAL
                    self._poll()
                if not self._proxy.is_running():
                    log.error("the proxy stopped unexpectedly")
                    return 1
                timeout = min(next_poll - time.monotonic(), self._renew_due - time.time())
                select.select([woken], [], [], max(0.0, timeout))
                with contextlib.suppress(BlockingIOError):  # drained
                    while woken.recv(4096):
                        pass
            log.info("shutting down, draining for up to %gs", drain_timeout)
            self.shutdown(drain_timeout)
            return 0
        finally:
            signal.set_wakeup_fd(previous_wakeup_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._wake_send = None
            woken.close()
            wake.close()

    def __enter__(self) -> "Sidecar":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _parse(self, data: bytes) -> SidecarConfig:
        config = loads_config(data, base_dir=self.base_dir, source=str(self.path))
        identity = config.identity
        if identity is not None and identity.self_issued:
            self._use_self_issued(identity)
        return config

    # -- self-issued identity (development): issue from a CA directory, renew before expiry

    def _issue(self, identity: Identity) -> "tuple[IssuedCertificate, Path]":
        """Issue a certificate from identity.ca into a new directory; raises CAError."""
        from .ca import CertificateAuthority, write_pem_files

        assert identity.ca and identity.service and identity.namespace
        if self._identity_dir is None:
            self._identity_dir = Path(tempfile.mkdtemp(prefix="meshpy-identity-"))  # 0700
        ca = CertificateAuthority.load(identity.ca)
        issued = ca.issue(identity.service, identity.namespace, identity.ttl)
        self._generation += 1
        out = self._identity_dir / str(self._generation)
        write_pem_files(out, issued)
        return issued, out

    def _use_self_issued(self, identity: Identity) -> None:
        """Point `identity` at files of a certificate issued for it; raises ConfigError."""
        from .ca import BUNDLE_FILE, CERT_FILE, KEY_FILE, CAError

        key = (identity.ca, identity.service, identity.namespace, identity.ttl)
        if key != self._issue_key or self._issued is None:
            try:
                issued, out = self._issue(identity)
            except (CAError, OSError) as exc:
                raise ConfigError([f"identity.ca: cannot issue: {exc}"], str(self.path)) from None
            self._issue_key, self._issued, self._issued_dir = key, issued, out
            self._schedule_renewal(identity)
            log.info(
                "identity %s issued from %s, valid until %s",
                issued.spiffe_id,
                identity.ca,
                _when(issued.not_after),
            )
        else:
            self._schedule_renewal(identity)  # renew_at may have changed
        issued_dir = self._issued_dir
        assert issued_dir is not None
        identity.cert = str(issued_dir / CERT_FILE)
        identity.key = str(issued_dir / KEY_FILE)
        identity.bundle = str(issued_dir / BUNDLE_FILE)

    def _schedule_renewal(self, identity: Identity) -> None:
        assert self._issued is not None
        self._renew_due = self._issued.renew_at(identity.renew_at).timestamp()
        self._retry_delay = _RETRY_FIRST

    def renew_identity(self) -> bool:
        """Issue a new self-issued certificate now and switch new handshakes to it.

        Open connections stay. On failure the current certificate keeps serving and the
        renewal is retried with backoff. `run()` calls this when a renewal is due.
        """
        from .ca import BUNDLE_FILE, CERT_FILE, KEY_FILE, CAError

        identity = self._config.identity
        if identity is None or not identity.self_issued or self._issued is None:
            self._renew_due = math.inf
            return False
        previous = (identity.cert, identity.key, identity.bundle)
        try:
            issued, out = self._issue(identity)
        except (CAError, OSError) as exc:
            return self._renewal_failed(str(exc))
        identity.cert = str(out / CERT_FILE)
        identity.key = str(out / KEY_FILE)
        identity.bundle = str(out / BUNDLE_FILE)
        if not self._swap(self._config, self._filters, "renewed identity refused"):
            identity.cert, identity.key, identity.bundle = previous
            shutil.rmtree(out, ignore_errors=True)
            return self._renewal_failed("the core refused the new certificate")
        self._identity_stats = self._identity_file_stats(self._config)
        if previous[0] is not None:
            shutil.rmtree(Path(previous[0]).parent, ignore_errors=True)
        self._issued, self._issued_dir = issued, out
        self._schedule_renewal(identity)
        log.info(
            "identity %s renewed, valid until %s, version %d",
            issued.spiffe_id,
            _when(issued.not_after),
            self.version,
        )
        return True

    def _renewal_failed(self, reason: str) -> bool:
        assert self._issued is not None
        delay = self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)
        self._renew_due = time.time() + delay
        log.error(
            "identity renewal failed, retrying in %gs; the current certificate keeps serving"
            " until %s: %s",
            delay,
            _when(self._issued.not_after),
            reason,
        )
        return False

    def _remove_identity_dir(self) -> None:
        if self._identity_dir is not None:
            shutil.rmtree(self._identity_dir, ignore_errors=True)
            self._identity_dir = None

    def _build_filters(self, config: SidecarConfig) -> FilterSet:
        try:
            return build_filter_set(config, self.base_dir)
        except ConfigError as exc:
            raise ConfigError(exc.errors, str(self.path)) from None

    def _apply(self, data: bytes) -> bool:
        # Remember rejected content too, so polling does not retry (and re-log) the same bytes.
        self._seen = data
        before = self.addresses
        try:
            config = self._parse(data)
            filters = self._build_filters(config)
        except MeshpyError as exc:
            # Refused before reaching the core: count it there so metrics see every refusal.
            self._proxy.record_reload_failure()
            log.error("config rejected, keeping version %d:\n%s", self.version, exc)
            self.last_error = str(exc)
            return False
        if not self._swap(config, filters, "config rejected"):
            return False
        self._identity_stats = self._identity_file_stats(config)
        log.info("config version %d applied", self.version)
        if self.addresses != before:
            log.info("listening: %s", self._describe_addresses())
        return True

    def _swap(self, config: SidecarConfig, filters: FilterSet, refused: str) -> bool:
        # Watched from before the new chains can queue a call until the swap is decided.
        self._runtime.expect_calls(bool(self._filters.chains or filters.chains))
        try:
            with _core_errors(str(self.path)):
                self._proxy.reload(config.to_core_json(filters), filters.handles())
        except MeshpyError as exc:
            log.error("%s, keeping version %d:\n%s", refused, self.version, exc)
            self.last_error = str(exc)
            self._runtime.expect_calls(bool(self._filters.chains))
            return False
        self._config = config
        self._filters = filters
        self._runtime.expect_calls(bool(filters.chains))
        self._module_stats = self._filter_module_stats()
        return True

    def _identity_file_stats(self, config: SidecarConfig) -> dict[str, tuple[int, int, int] | None]:
        identity = config.identity
        if identity is None:
            return {}
        paths = (identity.cert, identity.key, identity.bundle)
        return {path: _stat_key(Path(path)) for path in paths if path is not None}

    def reload_identity(self) -> bool:
        """Re-read the identity files: new handshakes use the new certificate and bundle.

        Open connections and the clusters' pools are kept. On any error the old identity stays.
        """
        # Remember the attempt: a half-written rotation is retried when a file changes again.
        self._identity_stats = self._identity_file_stats(self._config)
        if not self._swap(self._config, self._filters, "identity files refused"):
            return False
        log.info("identity files reloaded, version %d", self.version)
        return True

    def _poll(self) -> None:
        """Reload when the file's content changed; a touch or a rewrite with equal bytes is not.

        Also reloads filter code whose source file changed.
        """
        key = _stat_key(self.path)
        if key is not None and key != self._stat:  # None: briefly missing while an editor saves
            try:
                data = self.path.read_bytes()
            except OSError:
                return
            self._stat = key
            if data != self._seen:
                self._apply(data)
                return
        changed = [
            name
            for name, seen in self._module_stats.items()
            if _stat_key(Path(seen[0])) not in (None, seen[1])
        ]
        if changed:
            self.reload_filters(changed)
        if self._identity_file_stats(self._config) != self._identity_stats:
            self.reload_identity()
        self._warn_if_near_expiry()

    def _warn_if_near_expiry(self) -> None:
        """File mode: warn once per file when its certificate is past two thirds of its life."""
        identity = self._config.identity
        if identity is None or identity.self_issued or identity.cert is None:
            return
        from cryptography import x509

        key = (identity.cert, self._identity_stats.get(identity.cert))
        seen, warn_at, warned = self._expiry_watch
        if key != seen:
            warn_at, warned = None, False
            with contextlib.suppress(OSError, ValueError):
                cert = x509.load_pem_x509_certificate(Path(identity.cert).read_bytes())
                start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
                warn_at = (start + (end - start) * 2 / 3).timestamp()
            self._expiry_watch = (key, warn_at, warned)
        if warned or warn_at is None or time.time() < warn_at:
            return
        self._expiry_watch = (key, warn_at, True)
        with contextlib.suppress(OSError, ValueError):
            cert = x509.load_pem_x509_certificate(Path(identity.cert).read_bytes())
            log.warning(
                "identity certificate %s expires at %s and has not been replaced yet",
                identity.cert,
                _when(cert.not_valid_after_utc),
            )

    def reload_filters(self, modules: list[str]) -> bool:
        """Re-import the filter `modules` and swap new instances in; on any error keep the old."""
        for name in modules:  # remember the attempt, so a broken file is not retried until saved
            path = self._module_stats[name][0]
            self._module_stats[name] = (path, _stat_key(Path(path)))
        previous = {name: sys.modules.get(name) for name in modules}
        try:
            for name in modules:
                _reimport(name, self._module_stats[name][0])
            filters = self._build_filters(self._config)
        except Exception as exc:
            for name, module in previous.items():
                if module is not None:
                    sys.modules[name] = module
            self._proxy.record_reload_failure()
            detail = str(exc) if isinstance(exc, ConfigError) else _format_exception(exc)
            log.error(
                "filter code in %s refused, keeping version %d:\n%s",
                ", ".join(modules),
                self.version,
                detail,
            )
            return False
        if not self._swap(self._config, filters, "filter reload refused"):
            return False
        log.info("filter code in %s reloaded, version %d", ", ".join(modules), self.version)
        return True

    def _filter_module_stats(self) -> dict[str, tuple[str, tuple[int, int, int] | None]]:
        stats = {}
        for name, module in self._filters.modules.items():
            source = getattr(module, "__file__", None)
            if source:
                stats[name] = (source, _stat_key(Path(source)))
        return stats

    def _describe_addresses(self) -> str:
        # Config order, then admin: the order users wrote them in.
        order = [listener.name for listener in self._config.listeners] + ["admin"]
        addresses = self.addresses
        names = sorted(addresses, key=lambda n: order.index(n) if n in order else len(order))
        return " ".join(f"{name}={addresses[name]}" for name in names)
