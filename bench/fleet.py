"""Many fake nodes in one process: ``python -m nova_swarm.bench.fleet``.

The real ``Node`` agent, each with its own MQTT connection and login, driving a ``FakeEngine``.
One process for up to 128 nodes is the practical way to put that many on a 2-core machine; the
hub they talk to is still its own process. Prints ``ready`` once every node is connected and runs
until SIGTERM, when each node leaves cleanly (its status goes ``offline``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nova_swarm.broker import logs
from nova_swarm.broker.home import SwarmHome
from nova_swarm.node import FakeEngine, Node, NodeConfig
from nova_swarm.node.guard import GuardConfig
from nova_swarm.node.sensors import Power

from .procs import PYTHON
from .stack import Stack


@dataclass(frozen=True, slots=True)
class FleetConfig:
    config_dir: Path
    port: int
    node_ids: tuple[str, ...]
    #: "fixed": every task takes ``delay_s``; "lognormal": median ``delay_s``, shape ``sigma``
    delay: str = "fixed"
    delay_s: float = 0.0
    sigma: float = 1.0
    slots: int = 1
    queue_max: int = 4
    heartbeat_s: float = 1.0
    seed: int = 1


class MainsPower:
    """A sensor source for a plugged-in machine: nothing to report, so the guard never pauses."""

    name = "mains"

    def read(self) -> Power:
        return Power()


def engine_for(config: FleetConfig, node_id: str) -> FakeEngine:
    if config.delay == "lognormal":
        # Each node its own seeded generator, so a run is repeatable and nodes are independent.
        rng = random.Random(f"{config.seed}-{node_id}")
        mu = math.log(config.delay_s)
        return FakeEngine(name="fake", delay_s=lambda _prompt: rng.lognormvariate(mu, config.sigma))
    return FakeEngine(name="fake", delay_s=config.delay_s)


async def run_fleet(config: FleetConfig) -> None:
    # FakeEngine blocks a worker thread per task, as llama does. asyncio's default executor has
    # min(32, cores + 4) threads: 6 here, which would cap 128 nodes at 6 tasks at once. Each real
    # node has its own process and its own pool; give this shared process one thread per slot.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=len(config.node_ids) * config.slots + 4))
    home = SwarmHome(config.config_dir)
    nodes = [
        Node(
            NodeConfig(
                node_id=node_id,
                heartbeat_s=config.heartbeat_s,
                profile_tokens=0,
                slots=config.slots,
                queue_max=config.queue_max,
                drain_s=2.0,
                sense_s=3600.0,
                guard=GuardConfig(enabled=False),
            ),
            engine_for(config, node_id),
            home.node_url(node_id, port=config.port, host="127.0.0.1"),
            sensor=MainsPower(),
        )
        for node_id in config.node_ids
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as tg:
        for node in nodes:
            tg.create_task(node.run())
        await asyncio.gather(*(node.connected.wait() for node in nodes))
        print("ready", flush=True)
        await stop.wait()
        for node in nodes:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    # Each flag's dest is a FleetConfig field and a flag left out keeps the field's default, so
    # the parsed namespace is the config.
    parser = argparse.ArgumentParser(
        prog="python -m nova_swarm.bench.fleet", description=__doc__, argument_default=argparse.SUPPRESS
    )
    parser.add_argument("--config-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--node-ids", type=lambda s: tuple(s.split(",")), required=True, help="comma-separated, already enrolled"
    )
    parser.add_argument("--delay", choices=["fixed", "lognormal"])
    parser.add_argument("--delay-s", type=float)
    parser.add_argument("--sigma", type=float)
    parser.add_argument("--slots", type=int)
    parser.add_argument("--queue-max", type=int)
    parser.add_argument("--heartbeat", dest="heartbeat_s", type=float)
    parser.add_argument("--seed", type=int)
    config = FleetConfig(**vars(parser.parse_args(argv)))
    # One process stands for many devices: per-task logging at info would be this harness's
    # cost, not a node's (each real node logs in its own process).
    logs.configure(level="warning")
    asyncio.run(run_fleet(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- launching one from the benchmark


class Fleet:
    """A running fleet process; ``async with`` waits until the hub sees every node online, and on
    exit until it sees them all gone again (so the next section starts from an empty swarm)."""

    def __init__(self, stack: Stack, name: str, config: FleetConfig) -> None:
        self.stack = stack
        self.name = name
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self._before = 0

    def argv(self) -> list[str]:
        c = self.config
        return [
            PYTHON, "-m", "nova_swarm.bench.fleet", "--config-dir", str(c.config_dir), "--port", str(c.port),
            "--node-ids", ",".join(c.node_ids), "--delay", c.delay, "--delay-s", str(c.delay_s),
            "--sigma", str(c.sigma), "--slots", str(c.slots), "--queue-max", str(c.queue_max),
            "--heartbeat", str(c.heartbeat_s), "--seed", str(c.seed),
        ]  # fmt: skip

    async def __aenter__(self) -> Fleet:
        before = self._before = self.stack.watch.hub.nodes_online if self.stack.watch.hub else 0
        self.proc = self.stack.procs.spawn(self.name, self.argv())
        try:
            await self.stack.printed_ready(self.name, self.proc, timeout=120)
            await self.stack.watch.nodes_online(before + len(self.config.node_ids), timeout=120)
        except BaseException:
            await self.stack.procs.stop(self.proc)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            await self.stack.procs.stop(self.proc, grace=30)
            await self.stack.watch.nodes_online(self._before, exactly=True, timeout=60)


def fleet_config(stack: Stack, node_ids: Sequence[str], **options: Any) -> FleetConfig:
    return FleetConfig(config_dir=stack.home.path, port=stack.port, node_ids=tuple(node_ids), **options)
