"""Require a tenant header on every request, optionally from a fixed list of tenants.

A request without the header (or with an empty one) is refused with 403, as is one whose
tenant is not in ``allowed`` when that list is given. A request carrying the header more
than once is refused with 400: the filter and the upstream could read different values.
The tenant is stored in ``req.ctx["tenant"]`` for later filters of the route; the request
goes upstream unchanged. With ``response_header`` set, the tenant is echoed to the client.

.. code-block:: yaml

    routes:
      - match: {path_prefix: /api}
        cluster: api
        filters:
          - plugins.tenant:RequireTenant:
              header: x-tenant              # default
              allowed: [acme, globex]       # default: any non-empty value
              response_header: x-tenant     # default: no echo
"""

from collections.abc import Callable

import meshpy


class RequireTenant(meshpy.Filter):
    """Refuse requests without an (allowed) tenant header; remember the tenant."""

    # Set per instance: a hook that is None is never called, so a route without an echo
    # skips the response phase entirely.
    on_response: Callable[[meshpy.Request, meshpy.Response], None] | None

    def __init__(
        self,
        header: str = "x-tenant",
        allowed: list[str] | None = None,
        response_header: str | None = None,
    ) -> None:
        if allowed is not None and not allowed:
            raise ValueError("allowed is empty, so every request would be refused")
        self.header = header
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.response_header = response_header
        self.on_response = self._echo if response_header is not None else None

    def on_request(self, req: meshpy.Request) -> meshpy.Response | None:
        values = req.headers.get_all(self.header)
        if len(values) > 1:
            return meshpy.Response(400, f"more than one {self.header} header\n")
        tenant = values[0] if values else ""
        if not tenant:
            return meshpy.Response(403, f"missing {self.header} header\n")
        if self.allowed is not None and tenant not in self.allowed:
            return meshpy.Response(403, "tenant not allowed\n")
        req.ctx["tenant"] = tenant
        return None

    def _echo(self, req: meshpy.Request, resp: meshpy.Response) -> None:
        assert self.response_header is not None  # only installed when there is one
        resp.headers[self.response_header] = req.ctx["tenant"]
