"""Unit-test filters in pytest: no sockets, no proxy, the same objects the proxy passes.

    from meshpy import testing

    def test_missing_tenant_is_refused():
        result = testing.run(RequireTenant(), testing.request("GET", "/x"))
        assert result.response.status == 403

`run` calls the hooks the way a route does: ``on_request`` of each filter in order until
one answers, then (given an upstream ``response``) ``on_response`` in reverse order.
`async def` hooks are awaited. A filter's ``body_limit`` is enforced as the proxy does,
with a 413. Exceptions propagate, so a test sees the filter's own traceback.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._core import Headers, LogRecord, Request, Response
from .filters import Filter

__all__ = ["Result", "log", "request", "response", "run", "run_async"]

HeadersInput = Mapping[str, str | list[str]] | Iterable[tuple[str, str]] | Headers | None


def request(
    method: str = "GET",
    path: str = "/",
    headers: HeadersInput = None,
    *,
    body: bytes | str | None = None,
    authority: str = "localhost",
    scheme: str = "http",
    client_addr: str = "127.0.0.1",
    identity: str | None = None,
    route: str = "test",
    cluster: str = "test",
) -> Request:
    """A request as a route's hooks would see it; `path` may include a query string."""
    return Request(
        method,
        path,
        headers,
        body=body,
        authority=authority,
        scheme=scheme,
        client_addr=client_addr,
        identity=identity,
        route=route,
        cluster=cluster,
    )


def response(status: int = 200, headers: HeadersInput = None) -> Response:
    """An upstream response head for ``on_response``."""
    return Response(status, None, headers)


@dataclass
class Result:
    """What a route would do with the request after its filters ran."""

    request: Request
    """The request as it would go upstream, with every mutation applied."""
    response: Response | None
    """A filter's own answer, or the upstream `response` after ``on_response``; else None."""
    short_circuited: bool
    """Whether ``on_request`` answered, so the upstream would never be contacted."""

    @property
    def cluster(self) -> str:
        """The cluster the request would go to, a filter's ``route_to`` included."""
        return self.request.cluster


def _chain(filters: Filter | Iterable[Filter]) -> list[Filter]:
    chain = [filters] if isinstance(filters, Filter) else list(filters)
    for f in chain:
        if not isinstance(f, Filter):
            raise TypeError(f"expected meshpy.Filter instances, got {type(f).__name__}")
    return chain


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def run_async(
    filters: Filter | Iterable[Filter], req: Request, response: Response | None = None
) -> Result:
    """`run` for tests that already have an event loop."""
    chain = _chain(filters)
    limits = [f.body_limit for f in chain if f.body_limit is not None]
    if limits and req.body is not None and len(req.body) > max(limits):
        too_large = Response(413, f"request body larger than {max(limits)} bytes\n")
        return Result(req, too_large, short_circuited=True)
    for f in chain:
        hook = getattr(f, "on_request", None)
        if hook is None:
            continue
        answer = await _resolve(hook(req))
        if answer is not None:
            if not isinstance(answer, Response):
                raise TypeError(
                    f"on_request must return a meshpy.Response or None, not {type(answer).__name__}"
                )
            return Result(req, answer, short_circuited=True)
    if response is not None:
        for f in reversed(chain):
            hook = getattr(f, "on_response", None)
            if hook is not None:
                await _resolve(hook(req, response))
    return Result(req, response, short_circuited=False)


def run(
    filters: Filter | Iterable[Filter], req: Request, response: Response | None = None
) -> Result:
    """Run a filter (or a list, in route order) on `req` as a route would."""
    return asyncio.run(run_async(filters, req, response))


def log(
    filters: Filter | Iterable[Filter],
    req: Request,
    status: int = 200,
    duration: float = 0.0,
    error: str | None = None,
) -> LogRecord:
    """Call ``on_log`` of each filter with a record of a finished exchange; returns the record."""
    record = LogRecord(req, status, duration, None, error)

    async def call_all() -> None:
        for f in _chain(filters):
            hook = getattr(f, "on_log", None)
            if hook is not None:
                await _resolve(hook(record))

    asyncio.run(call_all())
    return record
