"""The reconnect loop, driven directly: it must stop when its owner cancels it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from nova_swarm.broker.contract.errors import ConnectionLost
from nova_swarm.broker.link.reconnect import Backoff, reconnecting


async def test_cancelling_a_session_whose_connection_fails_meanwhile_stops_the_loop() -> None:
    """A TaskGroup cancelled while a child fails with ConnectionLost reports the ConnectionLost,
    not the cancellation. The loop used to take that for a dropped connection and reconnect, so
    a hub or node being stopped never finished stopping."""
    connects = 0

    @asynccontextmanager
    async def connect() -> AsyncIterator[object]:
        nonlocal connects
        connects += 1
        yield object()

    async def session(_conn: object) -> None:
        async def reader() -> None:
            try:
                await asyncio.sleep(100)
            except asyncio.CancelledError:
                raise ConnectionLost("disconnected during message iteration") from None

        async with asyncio.TaskGroup() as tg:
            tg.create_task(reader())
            await asyncio.sleep(100)

    task = asyncio.create_task(reconnecting(connect, session, name="t", backoff=Backoff(first=0.01, cap=0.01)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert connects == 1


async def test_a_lost_connection_is_retried() -> None:
    connects = 0

    @asynccontextmanager
    async def connect() -> AsyncIterator[object]:
        nonlocal connects
        connects += 1
        if connects < 3:
            raise ConnectionLost("refused")
        yield object()

    async def session(_conn: object) -> None:
        return None

    await asyncio.wait_for(reconnecting(connect, session, name="t", backoff=Backoff(first=0.01, cap=0.01)), 5)
    assert connects == 3
