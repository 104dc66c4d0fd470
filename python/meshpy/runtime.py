"""The thread that runs filter hooks for the data plane.

The tokio workers queue calls and never take the GIL. This thread sleeps in an asyncio
event loop on the queue's descriptor; when woken it takes every waiting call in one go
and runs their hooks: plain hooks inline, `async` hooks as tasks on the same loop under
the route's time budget (cancelled past it). Answers wait in the workers' mailboxes
until `flush`, once per batch, so a batch wakes each worker once. A plain hook that
blocks cannot be cancelled, so a watchdog moves the work to a fresh thread when one
holds it too long.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
import logging
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Coroutine
from typing import Any

from . import _core
from .filters import Chain, Hook, Response

__all__ = ["FilterRuntime"]

log = logging.getLogger("meshpy.filters")

_BATCH = 256  # calls taken per wake-up, so one burst cannot starve the loop's other work
_MAX_DISTINCT_ERRORS = 1024  # errors remembered for log-once; past it every error is logged
_MAX_RETIRED = 16  # blocked threads abandoned before the watchdog stops replacing them
_WATCH_INTERVAL = 0.1  # seconds between the watchdog's looks


class _ErrorLog:
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
        # The traceback starts in the filter's code: the frames of this module say nothing.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
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


class _Dispatcher:
    """One thread and its event loop, running the hooks of the calls it takes."""

    def __init__(self, queue: _core.FilterQueue, errors: _ErrorLog, generation: int) -> None:
        self._queue = queue
        self._errors = errors
        # Running hook tasks by deadline; the heap also keeps them referenced.
        self._deadlines: list[tuple[float, int, asyncio.Task[None]]] = []
        self._sequence = itertools.count()
        self._expired: set[asyncio.Task[None]] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._in_batch = False  # inside _drain, whose own flush comes after the batch
        self.loop: asyncio.AbstractEventLoop | None = None
        self.retired = False
        # The plain hook running now and since when, for the watchdog.
        self.busy: tuple[str, float] | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"meshpy-filters-{generation}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        self._ready.wait()

    def stop(self, timeout: float) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(loop.stop)
        self.thread.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        loop.add_reader(self._queue.fileno(), self._drain)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self._queue.fileno())
            tasks = [task for _, _, task in self._deadlines if not task.done()]
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _drain(self) -> None:
        if self.retired:
            # This thread was replaced while a hook blocked it; the new one serves the queue.
            assert self.loop is not None
            self.loop.stop()
            return
        self._in_batch = True
        try:
            for call in self._queue.take(_BATCH):
                phase = call.phase_name
                if phase == "request":
                    self._request(call)
                elif phase == "response":
                    self._response(call)
                else:
                    self._log(call)
                if self.retired:
                    return
        finally:
            self._in_batch = False
            self._queue.flush()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], budget: float) -> None:
        """Run `coroutine` as a task, cancelled if still running `budget` seconds from now.

        One timer serves every task (the earliest deadline): a timer or a timeout context
        per task would cost about as much as the task itself. A task that finished in its
        first, eager step needs no deadline.
        """
        loop = self.loop
        assert loop is not None
        deadline = loop.time() + budget
        # Python 3.12+ runs the first step at once, inside the task (current_task() and
        # asyncio.timeout() work as usual): a hook that does not wait costs no loop turn.
        if sys.version_info >= (3, 12):
            task = asyncio.Task(coroutine, loop=loop, eager_start=True)
            if task.done():
                return
        else:
            task = loop.create_task(coroutine)
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), task))
        handle = self._sweep_handle
        if handle is None or deadline < handle.when():
            if handle is not None:
                handle.cancel()
            self._sweep_handle = loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        loop = self.loop
        assert loop is not None
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            task = heapq.heappop(deadlines)[2]
            if not task.done():
                self._expired.add(task)
                task.cancel()
        self._sweep_handle = loop.call_at(deadlines[0][0], self._sweep) if deadlines else None

    def _flush_soon(self) -> None:
        """Flush after the callbacks ready now, so hook tasks finishing together share it."""
        if not self._flush_scheduled and not self._in_batch:
            self._flush_scheduled = True
            assert self.loop is not None
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._queue.flush()

    def _cancelled_at_deadline(self) -> bool:
        """Inside a hook task that got CancelledError: whether the budget ran out."""
        task = asyncio.current_task()
        if task is not None and task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _call(self, hook: Hook, *args: Any) -> Any:
        self.busy = (hook.name, time.monotonic())
        try:
            return hook.call(*args)
        finally:
            self.busy = None

    # --- request and response phases -------------------------------------------------------

    def _request(self, call: _core.FilterCall) -> None:
        self._run_phase(call, "on_request", call.chain.request_hooks, (call.request,))

    def _response(self, call: _core.FilterCall) -> None:
        self._run_phase(
            call, "on_response", call.chain.response_hooks, (call.request, call.response)
        )

    def _run_phase(
        self, call: _core.FilterCall, phase: str, hooks: tuple[Hook, ...], args: tuple[Any, ...]
    ) -> None:
        """Run a phase's hooks in order, inline until one is async, then as a task."""
        if call.expired():
            return  # the proxy stopped waiting while the call was queued
        for index, hook in enumerate(hooks):
            if hook.is_async:
                self._spawn(self._run_phase_async(call, phase, hooks, args, index), call.timeout)
                return
            try:
                result = self._call(hook, *args)
                if inspect.isawaitable(result):  # a plain def that returned an awaitable
                    task = self._run_phase_async(call, phase, hooks, args, index, result)
                    self._spawn(task, call.timeout)
                    return
                if result is not None and phase == "on_request":
                    self._answer(call, hook, result)
                    return
            except Exception as exc:
                self._failed(call, hook, phase, exc)
                return
            if call.expired():
                self._errors.timeout(hook, phase, call.timeout)
                return
        call.proceed()

    async def _run_phase_async(
        self,
        call: _core.FilterCall,
        phase: str,
        hooks: tuple[Hook, ...],
        args: tuple[Any, ...],
        start: int,
        pending: Awaitable[Any] | None = None,
    ) -> None:
        hook = hooks[start]
        try:
            for hook in hooks[start:]:
                result = pending if pending is not None else hook.call(*args)
                pending = None
                if inspect.isawaitable(result):
                    result = await result
                if result is not None and phase == "on_request":
                    self._answer(call, hook, result)
                    return
        except asyncio.CancelledError:
            if self._cancelled_at_deadline():
                self._errors.timeout(hook, phase, call.timeout)
                return
            raise
        except Exception as exc:
            self._failed(call, hook, phase, exc)
        else:
            call.proceed()
        finally:
            self._flush_soon()

    def _answer(self, call: _core.FilterCall, hook: Hook, result: object) -> None:
        """What an on_request hook returned: a Response answers the request, anything else fails."""
        if isinstance(result, Response):
            call.respond(result)
            return
        error = TypeError(
            f"on_request must return a meshpy.Response or None, not {type(result).__name__}"
        )
        self._failed(call, hook, "on_request", error)

    # --- log phase --------------------------------------------------------------------------

    def _log(self, call: _core.FilterCall) -> None:
        chain: Chain = call.chain
        record = call.record
        for hook in chain.log_hooks:
            try:
                result = self._call(hook, record)
                if inspect.isawaitable(result):
                    self._spawn(self._log_async(call, hook, result), call.timeout)
            except Exception as exc:
                self._failed(call, hook, "on_log", exc)

    async def _log_async(self, call: _core.FilterCall, hook: Hook, pending: Awaitable[Any]) -> None:
        try:
            await pending
        except asyncio.CancelledError:
            if self._cancelled_at_deadline():
                self._errors.timeout(hook, "on_log", call.timeout)
                return
            raise
        except Exception as exc:
            self._failed(call, hook, "on_log", exc)

    def _failed(self, call: _core.FilterCall, hook: Hook, phase: str, exc: BaseException) -> None:
        call.fail(hook.name)
        self._errors.exception(hook, phase, exc)


class FilterRuntime:
    """Runs the hooks of every filter chain the proxy queues, on its own thread.

    A watchdog thread looks every `_WATCH_INTERVAL`: when one plain hook has held the
    thread longer than `stuck_after` seconds, that thread is abandoned to it and a fresh
    one takes over the queue. While no filter chain is configured (see `expect_calls`) and
    no hook is running, it does not look, so a sidecar without filters has no Python thread
    waking its core.
    """

    def __init__(self, queue: _core.FilterQueue, stuck_after: float = 1.0) -> None:
        self.queue = queue
        self._stuck_after = stuck_after
        self._errors = _ErrorLog()
        self._generation = 0
        self._retired: list[_Dispatcher] = []
        self._dispatcher: _Dispatcher | None = None
        self._stopping = threading.Event()
        self._calls_expected = threading.Event()
        self._calls_expected.set()
        self._watchdog = threading.Thread(
            target=self._watch, name="meshpy-filters-watchdog", daemon=True
        )

    def start(self) -> None:
        self._start_dispatcher()
        self._watchdog.start()

    def _start_dispatcher(self) -> None:
        self._generation += 1
        self._dispatcher = _Dispatcher(self.queue, self._errors, self._generation)
        self._dispatcher.start()

    def expect_calls(self, expected: bool) -> None:
        """Say whether the proxy's config has filter chains, i.e. whether calls can come."""
        if expected:
            self._calls_expected.set()
        else:
            self._calls_expected.clear()

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
        dispatcher.retired = True
        self._retired.append(dispatcher)
        self._start_dispatcher()

    def stop(self, timeout: float = 1.0) -> None:
        """Refuse further calls and stop the thread (threads blocked in a filter are left)."""
        self._stopping.set()
        self._calls_expected.set()  # ends the watchdog's wait
        self.queue.close()
        if self._dispatcher is not None:
            self._dispatcher.stop(timeout)
            self._dispatcher = None
        self.queue.flush()  # answers given but not yet handed back
