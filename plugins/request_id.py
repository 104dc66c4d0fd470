"""Give every request a correlation id, pass it upstream and echo it to the client.

The upstream always receives ``header`` (default ``x-correlation-id``): the client's own
value when it sent one, else a copy of ``x-request-id`` (which the proxy adds to every
request that lacks it), else a new UUID4. The id is kept in ``req.ctx["correlation_id"]``
and, unless ``response_header`` is null, set on the response so the client can quote it.

.. code-block:: yaml

    routes:
      - match: {path_prefix: /}
        cluster: app
        filters:
          - plugins.request_id:CorrelationId:
              header: x-correlation-id      # default
              response_header: x-request-id # default; null for no echo
"""

import uuid
from collections.abc import Callable

import meshpy


class CorrelationId(meshpy.Filter):
    """Ensure a correlation id header upstream; echo the id on the response."""

    # Set per instance: a hook that is None is never called, so without an echo the route
    # skips the response phase entirely.
    on_response: Callable[[meshpy.Request, meshpy.Response], None] | None

    def __init__(
        self, header: str = "x-correlation-id", response_header: str | None = "x-request-id"
    ) -> None:
        self.header = header
        self.response_header = response_header
        self.on_response = self._echo if response_header is not None else None

    def on_request(self, req: meshpy.Request) -> None:
        correlation_id = (
            req.headers.get(self.header) or req.headers.get("x-request-id") or str(uuid.uuid4())
        )
        req.headers[self.header] = correlation_id
        req.ctx["correlation_id"] = correlation_id

    def _echo(self, req: meshpy.Request, resp: meshpy.Response) -> None:
        assert self.response_header is not None  # only installed when there is one
        resp.headers[self.response_header] = req.ctx["correlation_id"]
