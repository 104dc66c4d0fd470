"""Limit each client to ``rate`` requests per second, with bursts of up to ``burst``.

Every client has a token bucket holding up to ``burst`` tokens, refilled at ``rate``
tokens per second; a request takes one token, and a request that finds none is answered
429 with ``Retry-After`` (whole seconds until a token is back), ``x-ratelimit-limit``
(the burst) and ``x-ratelimit-remaining`` (0). Who is a client depends on ``key``:

- ``client`` (default): the client's address, from ``x-forwarded-for``. The proxy
  appends the address of the peer it accepted the connection from, so the last entry is
  the only one a client cannot forge. Behind N load balancers or proxies that append
  to the header too, set ``trusted_hops: N`` to use the address the outermost one saw.
- ``identity``: the caller's mesh identity (SPIFFE ID) from mTLS.
- ``header:<name>``: the value of a request header, such as an API key.

Requests with no key (no such header, no identity) share one bucket.

Buckets live in the proxy's memory: the limit is per proxy process, and a config reload
(which makes new filter instances) starts every client with a full bucket. A bucket
idle long enough to be full again is dropped, and at most ``max_clients`` buckets are
kept (the least recently used go first), so memory stays bounded whatever the traffic.

.. code-block:: yaml

    routes:
      - match: {path_prefix: /api}
        cluster: api
        filters:
          - plugins.ratelimit:TokenBucket:
              rate: 10            # tokens per second
              burst: 20           # bucket size
              key: client         # or identity, or header:x-api-key
"""

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import meshpy


@dataclass(slots=True)
class Bucket:
    """One client's tokens, as of `updated` (a `TokenBucket.clock` reading)."""

    tokens: float
    updated: float


class TokenBucket(meshpy.Filter):
    """Per-client token bucket rate limiting; over the limit, 429 with Retry-After."""

    def __init__(
        self,
        rate: float,
        burst: int,
        key: str = "client",
        trusted_hops: int = 0,
        max_clients: int = 100_000,
    ) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        if trusted_hops < 0:
            raise ValueError(f"trusted_hops must be 0 or more, got {trusted_hops}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        source, _, header = key.partition(":")
        if not (key in ("client", "identity") or (source == "header" and header)):
            raise ValueError(f"key must be client, identity or header:<name>, got {key!r}")
        self.rate = rate
        self.burst = burst
        self.key = key
        self.header = header
        self.trusted_hops = trusted_hops
        self.max_clients = max_clients
        # Seconds after which an untouched bucket is full again, so no different from a new one.
        self.idle = burst / rate
        self.buckets: OrderedDict[str | None, Bucket] = OrderedDict()
        # Seconds from any fixed point; tests replace it to move time without sleeping.
        self.clock: Callable[[], float] = time.monotonic

    def client_key(self, req: meshpy.Request) -> str | None:
        """Who the request counts against, or None when its key is missing."""
        if self.key == "identity":
            return req.identity
        if self.header:
            return req.headers.get(self.header)
        hops = [hop.strip() for hop in req.headers.get("x-forwarded-for", "").split(",")]
        hops = [hop for hop in hops if hop]
        if not hops:
            return None
        return hops[max(0, len(hops) - 1 - self.trusted_hops)]

    def on_request(self, req: meshpy.Request) -> meshpy.Response | None:
        now = self.clock()
        self.evict_idle(now)
        key = self.client_key(req)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(float(self.burst), now)
            if len(self.buckets) > self.max_clients:
                self.buckets.popitem(last=False)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
            self.buckets.move_to_end(key)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        retry_after = math.ceil((1 - bucket.tokens) / self.rate)
        headers = {
            "retry-after": str(retry_after),
            "x-ratelimit-limit": str(self.burst),
            "x-ratelimit-remaining": "0",
        }
        return meshpy.Response(429, "rate limit exceeded\n", headers)

    def evict_idle(self, now: float) -> None:
        """Drop buckets untouched long enough to be full; the oldest are first in line."""
        while self.buckets:
            oldest = next(iter(self.buckets.values()))
            if now - oldest.updated < self.idle:
                return
            self.buckets.popitem(last=False)
