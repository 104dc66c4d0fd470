"""Send opted-in requests, and optionally a fixed share of the others, to a canary cluster.

A request goes to ``cluster`` when its ``header`` or its ``cookie`` equals ``value``.
With ``percent`` above 0, that share of the remaining requests goes there too, chosen by
a hash of ``x-request-id``: the same id always lands on the same side, so a client that
retries with its request id keeps its cluster. (The proxy gives every request an
``x-request-id``; a request without one is never picked by the percentage.) The route's
own cluster gets everything else. Set ``header`` or ``cookie`` to null to turn it off;
at least one of header, cookie and percent must be in use.

``cluster`` must be one of the config's clusters: a request routed to an unknown cluster
fails with 500 (or goes to the route's cluster with ``on_error: fail_open``).

.. code-block:: yaml

    routes:
      - match: {path_prefix: /}
        cluster: web
        filters:
          - plugins.canary:CanaryRouter:
              cluster: web-canary
              header: x-canary   # default
              cookie: canary     # default
              value: "1"         # default
              percent: 5         # default 0
"""

import hashlib

import meshpy


def cookie_values(req: meshpy.Request, name: str) -> list[str]:
    """The values of the cookie `name` in every ``Cookie`` header, quotes removed."""
    found = []
    for header in req.headers.get_all("cookie"):
        for pair in header.split(";"):
            key, sep, value = pair.partition("=")
            if sep and key.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                found.append(value)
    return found


def share(request_id: str) -> float:
    """Where `request_id` falls in [0, 100), the same on every call and every proxy."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest) * 100 / 2**64


class CanaryRouter(meshpy.Filter):
    """Route requests that opt in by header or cookie, plus `percent` of the rest, to a canary."""

    def __init__(
        self,
        cluster: str,
        header: str | None = "x-canary",
        cookie: str | None = "canary",
        value: str = "1",
        percent: float = 0,
    ) -> None:
        if not cluster:
            raise ValueError("cluster must name the canary cluster")
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be between 0 and 100, got {percent}")
        if header is None and cookie is None and percent == 0:
            raise ValueError("give a header, a cookie or a percent, or nothing is ever routed")
        self.cluster = cluster
        self.header = header
        self.cookie = cookie
        self.value = value
        self.percent = percent

    def on_request(self, req: meshpy.Request) -> None:
        if self.opted_in(req) or self.sampled(req):
            req.route_to(self.cluster)

    def opted_in(self, req: meshpy.Request) -> bool:
        """Whether the request asks for the canary by header or cookie."""
        if self.header is not None and self.value in req.headers.get_all(self.header):
            return True
        return self.cookie is not None and self.value in cookie_values(req, self.cookie)

    def sampled(self, req: meshpy.Request) -> bool:
        """Whether the request's id falls in the canary's share of traffic."""
        if self.percent == 0:
            return False
        request_id = req.headers.get("x-request-id")
        return request_id is not None and share(request_id) < self.percent
