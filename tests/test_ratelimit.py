"""The per-client rate limiter, driven directly with a fake clock."""

from __future__ import annotations

import pytest

from nova_swarm.hub.ratelimit import RateLimiter


def test_a_client_may_burst_its_minute_then_waits() -> None:
    limiter = RateLimiter(per_minute=60)
    assert all(limiter.take("alice", 0.0) is None for _ in range(60))
    wait = limiter.take("alice", 0.0)
    assert wait == pytest.approx(1.0)  # one request a second refills
    assert limiter.take("bob", 0.0) is None  # others are not affected
    assert limiter.take("alice", 1.0) is None
    assert limiter.take("alice", 1.0) is not None


def test_idle_clients_are_forgotten_and_memory_is_bounded() -> None:
    limiter = RateLimiter(per_minute=10, max_clients=100)
    for i in range(1000):
        limiter.take(f"c{i}", 0.0)
    assert len(limiter) == 100
    limiter.forget_idle(59.0)
    assert len(limiter) == 100  # not yet refilled
    limiter.forget_idle(61.0)
    assert len(limiter) == 0


def test_bad_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(per_minute=0)
