"""1,000 simulated nodes in one process: ``python -m nova_swarm.bench.simnodes``.

Each simulated node is its own MQTT connection (so the broker carries 1,000 sessions, as it
would with real nodes) that publishes a retained announce and ``online`` status and then a
heartbeat every ``--interval`` seconds, staggered. A few lines of MQTT 3.1.1 over asyncio
streams instead of 1,000 aiomqtt clients: the point is the hub's and broker's memory, not this
process's. They log in with the hub's login (which may publish for any node id), because 1,000
node enrolments would only measure the password file. Prints ``ready`` once all are connected.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import resource
import signal
import struct
import sys
import time

from nova_swarm.broker.contract.messages import Announce, Heartbeat, ModelInfo, NodeState, Status
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.contract.version import __version__


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, username: str, password: str, keepalive: int) -> bytes:
    body = _str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", keepalive)
    body += _str(client_id) + _str(username) + _str(password)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, retain: bool = False) -> bytes:
    """QoS 0: no acknowledgement to wait for."""
    body = _str(topic) + payload
    return bytes([0x30 | (1 if retain else 0)]) + _varint(len(body)) + body


class SimNode:
    def __init__(self, node_id: str, topics: Topics) -> None:
        self.node_id = node_id
        self.topics = topics
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self, host: str, port: int, username: str, password: str) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(connect_packet(f"sim-{self.node_id}", username, password, keepalive=120))
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), 30)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused {self.node_id}: {connack!r}")
        self.writer = writer
        # Read and drop whatever comes back (nothing is subscribed), so no buffer ever fills.
        asyncio.get_running_loop().create_task(_drain(reader))
        name = "SmolLM2-135M-Instruct.Q4_1"
        announce = Announce(
            node_id=self.node_id,
            model=ModelInfo(name=name, sha256=hashlib.sha256(name.encode()).hexdigest(), size_bytes=98_362_432,
                            ctx=2048),  # fmt: skip
            threads=4, tokens_per_s=40.0, ram_total_mb=4096.0, device="phone", agent_version=__version__,
            slots=1, queue_max=4, max_tokens=512, max_temperature=2.0, ts=time.time(),
        )  # fmt: skip
        status = Status(node_id=self.node_id, state=NodeState.ONLINE, ts=time.time())
        writer.write(publish_packet(self.topics.node_announce(self.node_id), announce.encode(), retain=True))
        writer.write(publish_packet(self.topics.node_status(self.node_id), status.encode(), retain=True))
        await writer.drain()

    async def heartbeat(self) -> None:
        assert self.writer is not None
        beat = Heartbeat(
            node_id=self.node_id, ts=time.time(), battery_pct=80.0, charging=True, temp_c=33.0, ram_free_mb=2048.0,
            load=0.5, tokens_per_s=None, busy=0, slots=1, queued=0, tokens_served=0, tasks_done=0, tasks_failed=0,
        )  # fmt: skip
        self.writer.write(publish_packet(self.topics.node_heartbeat(self.node_id), beat.encode()))
        await self.writer.drain()


async def _drain(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(4096):
            pass
    except (OSError, asyncio.CancelledError):
        pass


async def run(host: str, port: int, username: str, password: str, count: int, interval: float) -> None:
    topics = Topics("main")
    nodes = [SimNode(f"sim{i:04d}", topics) for i in range(count)]
    # Connect in batches: 1,000 CONNECTs at once make amqtt time some out.
    for start in range(0, count, 50):
        await asyncio.gather(*(n.connect(host, port, username, password) for n in nodes[start : start + 50]))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def beat(node: SimNode, offset: float) -> None:
        await asyncio.sleep(offset)  # staggered, as real nodes that started at different times
        while True:
            await node.heartbeat()
            await asyncio.sleep(interval)

    rng = random.Random(1)
    tasks = [asyncio.create_task(beat(n, rng.uniform(0, interval))) for n in nodes]
    await stop.wait()
    for t in tasks:
        t.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nova_swarm.bench.simnodes", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--password-env", default="NOVA_BENCH_PASSWORD", help="the password, from this variable")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.count + 256)), hard))
    import os

    asyncio.run(run("127.0.0.1", args.port, args.username, os.environ[args.password_env], args.count, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
