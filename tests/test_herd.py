"""A thundering herd: 200 clients reconnecting at once after a broker restart.

Reconnects use exponential backoff with full jitter (``connection.Backoff``), so the restarted
broker sees the herd spread out and keeps serving everyone else while it arrives.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.link.connection import Connection
from nova_swarm.broker.link.reconnect import reconnecting

from .conftest import start_broker

T = Topics()
HERD = 200


@pytest.mark.parametrize("engine", ["amqtt", "mosquitto"])
@pytest.mark.timeout(180)
async def test_200_clients_reconnect_after_a_broker_restart_without_stalling_it(
    engine: str, home: SwarmHome, tmp_path: Path
) -> None:
    running = await start_broker(engine, home, tmp_path)
    port = running.port
    url = home.url(Role.CLIENT, port=port)
    connected: set[str] = set()
    sessions = 0

    def herd_member(name: str):  # type: ignore[no-untyped-def]
        async def session(conn: Connection) -> None:
            nonlocal sessions
            await conn.subscribe(T.reply("client", name))  # the client login's own replies
            sessions += 1
            connected.add(name)
            try:
                async for _ in conn.messages():
                    pass
            finally:
                connected.discard(name)

        return reconnecting(lambda: Connection(url, client_id=name), session, name=name)

    async with asyncio.TaskGroup() as tg:
        herd = [tg.create_task(herd_member(f"herd-{i:03d}")) for i in range(HERD)]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60
        while len(connected) < HERD:
            assert loop.time() < give_up, f"only {len(connected)} of {HERD} connected"
            await asyncio.sleep(0.1)

        running.proc.send_signal(signal.SIGKILL)
        running.proc.wait()
        running = await start_broker(engine, home, tmp_path, port=port)
        restarted = time.monotonic()

        # While the herd comes back, a request/reply round trip must still go through promptly.
        probe_rtts: list[float] = []
        back_after: float | None = None
        async with (
            Connection(home.url(Role.HUB, port=port), client_id="prober") as hub,
            Connection(url, client_id="probe") as probe,
        ):
            await probe.subscribe(T.reply("client", "probe"))
            replies = probe.messages()
            # Mosquitto takes the whole herd back in a fraction of a second: probe a few times anyway.
            while (len(connected) < HERD or len(probe_rtts) < 3) and time.monotonic() - restarted < 60:
                sent = time.monotonic()
                await hub.publish(T.reply("client", "probe"), b"ping")
                await asyncio.wait_for(anext(replies), 10)
                probe_rtts.append(time.monotonic() - sent)
                await asyncio.sleep(0.05)
                if len(connected) == HERD and back_after is None:
                    back_after = time.monotonic() - restarted
        back_after = back_after if back_after is not None else time.monotonic() - restarted
        came_back = len(connected)
        for task in herd:
            task.cancel()
    running.stop()

    worst = max(probe_rtts, default=0.0)
    print(
        f"\n{engine}: {HERD} clients back after {back_after:.1f} s; {len(probe_rtts)} probes during the herd,"
        f" worst round trip {worst * 1000:.0f} ms"
    )
    assert came_back == HERD, f"only {came_back} of {HERD} came back within 60 s"
    assert sessions >= 2 * HERD  # every member connected twice: before and after the restart
    assert worst < 5.0, f"the broker stalled for {worst:.1f} s under the reconnecting herd"
