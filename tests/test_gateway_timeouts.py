"""The gateway closes connections that send their request too slowly (issue: slow headers).

A real gateway (uvicorn, the same protocol class it serves with) on a real amqtt broker, and raw
sockets that dribble a request line by line, as a slowloris client does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.hub.gateway import Gateway
from nova_swarm.hub.gateway_config import GatewayConfig
from nova_swarm.hub.http_timeouts import HttpTimeouts

from .conftest import RunningBroker

#: a line every 4 s, as in the report; the default header timeout is 10 s
LINE_EVERY_S = 4.0
#: how late past its deadline a close may come on a busy two-core machine
SLACK_S = 8.0


@asynccontextmanager
async def gateway(broker: RunningBroker, home: SwarmHome, timeouts: HttpTimeouts) -> AsyncIterator[Gateway]:
    config = GatewayConfig(token=home.gateway_token(), port=0, timeouts=timeouts)
    async with Gateway(config, broker.url(Role.CLIENT)) as running:
        yield running


async def get_health(port: int, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None) -> int:
    """GET /health, on a new connection or on a kept-alive ``connection``; the status."""
    reader, writer = connection or await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    assert "hub" in json.loads(body)
    if connection is None:
        writer.close()
    return int(head.split(b" ", 2)[1])


async def dribble(port: int, lines: list[bytes], *, every_s: float, give_up_s: float) -> float | None:
    """Send ``lines`` one every ``every_s`` (then keep sending filler header lines); the seconds
    until the server closed the connection, or None if it was still open after ``give_up_s``."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = loop.time()
    queue = list(lines)
    try:
        while loop.time() - opened < give_up_s:
            writer.write(queue.pop(0) if queue else b"X-Slow: still here\r\n")
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(1024), every_s)
            except TimeoutError:
                continue
            if not data:
                return loop.time() - opened
            raise AssertionError(f"a response to a request that was never whole: {data!r}")
        return None
    except (ConnectionResetError, BrokenPipeError):
        return loop.time() - opened
    finally:
        writer.close()


async def test_slow_headers_are_cut_off_and_normal_requests_still_work(amqtt: RunningBroker, home: SwarmHome) -> None:
    timeouts = HttpTimeouts()
    async with gateway(amqtt, home, timeouts) as gw:
        assert await get_health(gw.port) == 200
        closed_after = await dribble(
            gw.port,
            [b"GET /health HTTP/1.1\r\n", b"Host: gateway\r\n"],
            every_s=LINE_EVERY_S,
            give_up_s=timeouts.headers_s + SLACK_S,
        )
        assert closed_after is not None, f"a connection sending a header line every {LINE_EVERY_S} s stayed open"
        # The line sent at 4 s and 8 s were taken: it is the header deadline that closed it.
        assert closed_after > 2 * LINE_EVERY_S
        assert await get_health(gw.port) == 200


async def test_headers_within_the_deadline_and_kept_alive_connections_are_served(
    amqtt: RunningBroker, home: SwarmHome
) -> None:
    async with gateway(amqtt, home, HttpTimeouts(headers_s=4.0)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            # Slower than at once, well within the deadline: served.
            for line in (b"GET /health HTTP/1.1\r\n", b"Host: gateway\r\n"):
                writer.write(line)
                await writer.drain()
                await asyncio.sleep(1.0)
            writer.write(b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            await reader.readexactly(length)
            # The same connection, kept alive: a second request starts a new header deadline.
            assert await get_health(gw.port, (reader, writer)) == 200
            # ... and a third that never finishes its headers is cut off by it.
            writer.write(b"GET /health HTTP/1.1\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 4.0 + SLACK_S) == b""
        finally:
            writer.close()


async def test_a_body_that_trickles_in_is_cut_off(amqtt: RunningBroker, home: SwarmHome) -> None:
    timeouts = HttpTimeouts(body_s=6.0)
    async with gateway(amqtt, home, timeouts) as gw:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {home.gateway_token()}\r\nContent-Type: application/json\r\n"
            "Content-Length: 4096\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        started = loop.time()
        closed_after: float | None = None
        try:
            writer.write(head + b'{"model": "x", ')
            while loop.time() - started < timeouts.body_s + SLACK_S:
                await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(1024), 2.0)
                except TimeoutError:
                    writer.write(b"       ")  # a few bytes every 2 s: never idle, never done
                    continue
                assert data == b"", f"a response to a body that never arrived whole: {data!r}"
                closed_after = loop.time() - started
                break
        except (ConnectionResetError, BrokenPipeError):
            closed_after = loop.time() - started
        finally:
            writer.close()
        assert closed_after is not None, "a body trickling in stayed open past the body deadline"
        assert closed_after > 2.0
        assert await get_health(gw.port) == 200


async def test_many_slow_connections_are_all_closed(amqtt: RunningBroker, home: SwarmHome) -> None:
    timeouts = HttpTimeouts()
    async with gateway(amqtt, home, timeouts) as gw:
        results = await asyncio.gather(
            *(
                dribble(
                    gw.port,
                    [b"GET /health HTTP/1.1\r\n"],
                    every_s=LINE_EVERY_S,
                    give_up_s=timeouts.headers_s + SLACK_S,
                )
                for _ in range(50)
            )
        )
        still_open = sum(1 for r in results if r is None)
        assert still_open == 0, f"{still_open} of 50 slow connections stayed open"
        assert await get_health(gw.port) == 200


def test_timeouts_check_themselves() -> None:
    with pytest.raises(ConfigError, match="headers_s"):
        HttpTimeouts(headers_s=0)
    with pytest.raises(ConfigError, match="body_s"):
        HttpTimeouts(body_s=-1)
