"""Keeping a link up: the loop its owner writes around ``async with``, and its delays.

    await reconnecting(lambda: links.open(client_id=...), session, name="node pixel7")

``session`` runs on each fresh link until the link is lost (``ConnectionLost``); then the loop
waits a jittered backoff and opens another. It works with any ``base.Link``, and with anything
that owns one (a ``SwarmClient``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TypeVar

import structlog

from nova_swarm.broker.contract.errors import ConnectionLost

log = structlog.get_logger("nova_swarm.connection")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: exponential with full jitter, so a restarted broker is not stampeded."""

    first: float = 0.5
    cap: float = 15.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        rng = rng or random.Random()
        return rng.uniform(0, min(self.cap, self.first * 2**attempt))


def raise_if_cancelled() -> None:
    """Call once per turn of a forever-loop that publishes.

    On Python 3.11, ``asyncio.wait_for`` (which aiomqtt uses inside ``publish``) swallows a cancel
    that lands just as the awaited thing completes; the loop would go round forever and its
    TaskGroup would never close. The task still counts the cancel request, so honour it here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


#: what ``reconnecting`` keeps up: a Connection, or something that owns one (a SwarmClient)
Held = TypeVar("Held")


async def reconnecting(
    connect: Callable[[], AbstractAsyncContextManager[Held]],
    session: Callable[[Held], Awaitable[None]],
    *,
    name: str,
    backoff: Backoff = Backoff(),
) -> None:
    """Run ``session`` on a fresh connection, again and again, until it returns or is cancelled.

    A session ends its connection by raising ``ConnectionLost``; ``connect`` makes a
    ``Connection`` or anything that owns one and raises ``ConnectionLost`` when it cannot."""
    attempt = 0
    while True:
        try:
            async with connect() as conn:
                attempt = 0
                await session(conn)
                return
        except ConnectionLost as exc:
            error = str(exc)
        except BaseExceptionGroup as group:
            # A session runs its loops in a TaskGroup, which wraps the ConnectionLost.
            lost, rest = group.split(ConnectionLost)
            if rest is not None or lost is None:
                raise
            error = "; ".join(sorted({str(e) for e in _leaves(lost)}))
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # We were cancelled while the connection was failing: a TaskGroup then reports the
            # connection's error, not the cancellation. Reconnecting would swallow the cancel
            # and the owner would wait for us forever.
            raise asyncio.CancelledError
        delay = backoff.delay(attempt)
        attempt += 1
        log.warning("connection lost, reconnecting", who=name, error=error, retry_in_s=round(delay, 2))
        await asyncio.sleep(delay)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
