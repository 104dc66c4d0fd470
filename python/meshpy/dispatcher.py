"""The filter thread: an asyncio event loop running the hooks of the calls the data plane
queues (see `meshpy.runtime`). Imported when the first filter chain is configured, so a
sidecar without filters does not load asyncio (and the ssl module it brings) at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
import sys
import threading
import time
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any

from . import _core
from .filters import Chain, Hook, Response

if TYPE_CHECKING:
    from .runtime import ErrorLog

_BATCH = 256  # calls taken per wake-up, so one burst cannot starve the loop's other work


class Dispatcher:
    """One thread and its event loop, running the hooks of the calls it takes."""

    def __init__(self, queue: _core.FilterQueue, errors: ErrorLog, generation: int) -> None:
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
