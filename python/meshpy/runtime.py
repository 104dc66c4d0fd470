"""The thread that runs filter hooks for the data plane.

The tokio workers queue calls and never take the GIL. A filter thread (`meshpy.dispatcher`)
sleeps in an asyncio event loop on the queue's descriptor; when woken it takes every waiting
call in one go and runs their hooks: plain hooks inline, `async` hooks as tasks on the same
loop under the route's time budget (cancelled past it). Answers wait in the workers'
mailboxes until `flush`, once per batch, so a batch wakes each worker once. A plain hook
that blocks cannot be cancelled, so a watchdog moves the work to a fresh thread when one
holds it too long.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from . import _core
from .filters import Hook

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

__all__ = ["FilterRuntime"]

log = logging.getLogger("meshpy.filters")

_MAX_DISTINCT_ERRORS = 1024  # errors remembered for log-once; past it every error is logged
_MAX_RETIRED = 16  # blocked threads abandoned before the watchdog stops replacing them
_WATCH_INTERVAL = 0.1  # seconds between the watchdog's looks
# The modules whose frames stand above a hook in a filter error's traceback: the filter
# thread's (`meshpy.dispatcher`) and this one. Paths, so the filter thread's module is not
# imported (with asyncio) before a filter is configured.
_HOOK_CALLERS = frozenset({__file__, os.path.join(os.path.dirname(__file__), "dispatcher.py")})


class ErrorLog:
    """Logs each distinct filter error once, with its traceback; the metrics count every one."""

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()
        self._lock = threading.Lock()

    def first(self, key: tuple[Any, ...]) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) < _MAX_DISTINCT_ERRORS:
                self._seen.add(key)
            return True

    def exception(self, hook: Hook, phase: str, exc: BaseException) -> None:
        # The traceback starts in the filter's code: the frames that called it say nothing.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in _HOOK_CALLERS:
            tb = tb.tb_next
        exc = exc.with_traceback(tb)
        frames = traceback.extract_tb(tb)
        where = (frames[-1].filename, frames[-1].lineno) if frames else None
        if self.first((hook.name, phase, type(exc), where)):
            text = "".join(traceback.format_exception(exc)).rstrip()
            log.error(
                "filter %s raised in %s (each distinct error is logged once;"
                " filter_errors_total counts them all):\n%s",
                hook.name,
                phase,
                text,
            )

    def timeout(self, hook: Hook, phase: str, budget: float) -> None:
        if self.first((hook.name, phase, "timeout")):
            log.error(
                "filter %s did not finish %s within the route's filter_timeout of %gms"
                " (logged once; filter_errors_total counts every time)",
                hook.name,
                phase,
                budget * 1000,
            )


class FilterRuntime:
    """Runs the hooks of every filter chain the proxy queues, on its own thread.

    A watchdog thread looks every `_WATCH_INTERVAL`: when one plain hook has held the
    thread longer than `stuck_after` seconds, that thread is abandoned to it and a fresh
    one takes over the queue. While no filter chain is configured (see `expect_calls`) and
    no hook is running, it does not look, so a sidecar without filters has no Python thread
    waking its core; and until one is first configured there is no filter thread at all, nor
    asyncio in memory (with the ssl module it imports, 2.5 MB of an idle sidecar's RSS).
    """

    def __init__(self, queue: _core.FilterQueue, stuck_after: float = 1.0) -> None:
        self.queue = queue
        self._stuck_after = stuck_after
        self._errors = ErrorLog()
        self._generation = 0
        self._retired: list[Dispatcher] = []
        self._dispatcher: Dispatcher | None = None
        self._stopping = threading.Event()
        self._calls_expected = threading.Event()
        self._calls_expected.set()
        self._started = False
        # Held while a filter thread is started: by `start`, by `expect_calls` (the first
        # chain configured) and by the watchdog (a replacement).
        self._lock = threading.Lock()
        self._watchdog = threading.Thread(
            target=self._watch, name="meshpy-filters-watchdog", daemon=True
        )

    def start(self) -> None:
        with self._lock:
            self._started = True
            if self._calls_expected.is_set():
                self._start_dispatcher()
        self._watchdog.start()

    def _start_dispatcher(self) -> None:
        from .dispatcher import Dispatcher

        self._generation += 1
        self._dispatcher = Dispatcher(self.queue, self._errors, self._generation)
        self._dispatcher.start()

    def expect_calls(self, expected: bool) -> None:
        """Say whether the proxy's config has filter chains, i.e. whether calls can come.

        The first time they can, the filter thread starts; it then stays.
        """
        if not expected:
            self._calls_expected.clear()
            return
        with self._lock:
            if self._started and self._dispatcher is None and not self._stopping.is_set():
                self._start_dispatcher()
        self._calls_expected.set()

    def _watch(self) -> None:
        while not self._stopping.wait(_WATCH_INTERVAL):
            self.check()
            dispatcher = self._dispatcher
            if dispatcher is None or dispatcher.busy is None:
                self._calls_expected.wait()  # returns at once while calls are expected

    def check(self) -> None:
        """Replace the filter thread if a plain hook has blocked it too long."""
        # Answers given before a slow hook in the same batch wait at most one look.
        self.queue.flush()
        dispatcher = self._dispatcher
        busy = dispatcher.busy if dispatcher is not None else None
        if dispatcher is None or busy is None:
            return
        name, since = busy
        blocked = time.monotonic() - since
        if blocked < self._stuck_after:
            return
        if len(self._retired) >= _MAX_RETIRED:
            if self._errors.first(("watchdog", "exhausted")):
                log.error(
                    "filter %s has blocked the filter thread for %.1fs and %d threads are already"
                    " abandoned to blocked filters; filtered routes wait for it",
                    name,
                    blocked,
                    len(self._retired),
                )
            return
        log.error(
            "filter %s has blocked the filter thread for %.1fs; leaving it that thread and"
            " running the other filter calls on a new one",
            name,
            blocked,
        )
        with self._lock:
            dispatcher.retired = True
            self._retired.append(dispatcher)
            self._start_dispatcher()

    def stop(self, timeout: float = 1.0) -> None:
        """Refuse further calls and stop the thread (threads blocked in a filter are left)."""
        self._stopping.set()
        self._calls_expected.set()  # ends the watchdog's wait
        self.queue.close()
        with self._lock:
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.stop(timeout)
        self.queue.flush()  # answers given but not yet handed back
