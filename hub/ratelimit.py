"""Requests per client per minute: a token bucket per client, with bounded memory.

    limiter = RateLimiter(per_minute=600)
    wait = limiter.take("alice", now)    # None: go ahead; else seconds until a request is allowed

Each client may burst ``per_minute`` requests, then gets ``per_minute / 60`` a second. A full
bucket holds no information, so idle clients are forgotten; past ``max_clients`` tracked at once,
the least recently seen is dropped (it comes back with a full bucket, which errs towards serving).
No I/O, no clock of its own: the caller passes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, *, per_minute: int, max_clients: int = 10_000) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        #: client -> (tokens, when they were counted), least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float) -> float | None:
        """Spend one request for ``client``; ``None`` if allowed, else seconds to wait."""
        tokens, then = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + max(0.0, now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return None

    def forget_idle(self, now: float) -> None:
        """Drop clients whose bucket has refilled: they are indistinguishable from new ones."""
        full_after = self.capacity / self.rate
        for client, (_, then) in list(self._buckets.items()):
            if now - then < full_after:
                break  # ordered by last use: everyone after this one is more recent
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)
