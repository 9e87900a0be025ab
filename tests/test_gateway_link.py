"""The gateway keeps its broker connection up: a broker restart is a short outage, not the end."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.hub.gateway import Gateway
from nova_swarm.hub.gateway_config import GatewayConfig

from .conftest import RunningBroker, start_broker


def nodes_status(base: str, token: str) -> int:
    request = urllib.request.Request(f"{base}/v1/swarm/nodes", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.load(response)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def status_becomes(base: str, token: str, status: int, *, timeout: float) -> None:
    """Poll from a thread: the gateway answers on this test's own event loop."""
    give_up = asyncio.get_running_loop().time() + timeout
    while (got := await asyncio.to_thread(nodes_status, base, token)) != status:
        assert asyncio.get_running_loop().time() < give_up, f"still {got}, not {status}"
        await asyncio.sleep(0.2)


async def test_the_gateway_reconnects_after_the_broker_restarts(
    amqtt: RunningBroker, home: SwarmHome, tmp_path: Path
) -> None:
    config = GatewayConfig(token=home.gateway_token(), port=0, connect_wait_s=0.5)
    async with Gateway(config, amqtt.url(Role.CLIENT)) as gateway:
        base = gateway.base_url
        await status_becomes(base, config.token, 200, timeout=10)
        amqtt.stop()
        # While the broker is away, a request says so (503) rather than hanging.
        await status_becomes(base, config.token, 503, timeout=15)
        again = await start_broker("amqtt", home, tmp_path, port=amqtt.port)
        try:
            await status_becomes(base, config.token, 200, timeout=30)
        finally:
            again.stop()
