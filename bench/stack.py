"""A whole swarm for one broker: the broker and the hub as real processes, on loopback.

    async with Stack(StackConfig(broker="mosquitto", ...), workdir) as stack:
        async with SwarmClient(stack.client_url()) as client: ...

The broker runs as ``swarm-broker`` does (``python -m nova_swarm.broker``), the hub as
``swarm-hub serve``: the same commands, config and code a user runs, each in its own process.
A ``Watcher`` (one more MQTT connection, with the hub's login) follows the hub's retained status
and the nodes' status and, when asked, the task topics: how the benchmark knows who is online
and which node got which task, without reaching into the hub.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from nova_swarm.broker.contract.errors import ConnectionLost, ProtocolError
from nova_swarm.broker.contract.messages import HubStatus, Status, Task, decode
from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.link.connection import Connection, wait_for_broker
from nova_swarm.broker.link.net import free_port
from nova_swarm.broker.link.url import BrokerURL

from .procs import BIN, PYTHON, Procs, child_pid, rss_mb


@dataclass(frozen=True, slots=True)
class StackConfig:
    broker: str
    #: the hub's --heartbeat-timeout
    heartbeat_timeout_s: float
    #: logins made before the broker starts, so no node waits for a password-file reload
    node_ids: tuple[str, ...] = ()
    #: extra ``swarm-hub serve`` flags
    hub_args: tuple[str, ...] = ()
    #: where the broker listens; the benchmark itself always connects over loopback
    host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class TaskSeen:
    node_id: str
    request_id: str
    at: float


@dataclass
class Watcher:
    """What the benchmark can see on the broker, as the hub's login."""

    url: BrokerURL
    topics: Topics
    hub: HubStatus | None = None
    nodes: dict[str, str] = field(default_factory=dict)
    tasks: asyncio.Queue[TaskSeen] = field(default_factory=asyncio.Queue)
    _conn: Connection | None = None
    _reader: asyncio.Task[None] | None = None

    async def start(self, *, watch_tasks: bool = False) -> None:
        self._conn = Connection(self.url, client_id=f"bench-watch-{os.getpid()}-{time.monotonic_ns() % 10**8}")
        await self._conn.__aenter__()
        filters = [self.topics.hub_status(), self.topics.all_nodes(NodeTopic.STATUS)]
        # Task topics only when asked: every extra subscriber to them is extra broker work that
        # would be charged to the swarm in the throughput sections.
        if watch_tasks:
            filters.append(self.topics.all_nodes(NodeTopic.TASK))
        await self._conn.subscribe(*filters, qos=1)
        self._reader = asyncio.create_task(self._read(self._conn))

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, ConnectionLost):
                pass
        if self._conn is not None:
            await self._conn.__aexit__(None, None, None)

    async def _read(self, conn: Connection) -> None:
        async for message in conn.messages():
            now = time.perf_counter()
            try:
                if message.topic == self.topics.hub_status():
                    if message.payload:
                        self.hub = decode(HubStatus, message.payload)
                    continue
                parsed = self.topics.parse_node_topic(message.topic)
                if parsed is None or not message.payload:
                    continue
                node_id, kind = parsed
                if kind is NodeTopic.STATUS:
                    self.nodes[node_id] = decode(Status, message.payload).state.value
                elif kind is NodeTopic.TASK and not message.retain:
                    task = decode(Task, message.payload)
                    self.tasks.put_nowait(TaskSeen(node_id, task.request_id, now))
            except ProtocolError:
                continue

    async def until(self, condition: str, check: Callable[[], bool], *, timeout: float = 60.0) -> None:
        give_up = time.monotonic() + timeout
        while not check():
            if time.monotonic() > give_up:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {condition}")
            await asyncio.sleep(0.02)

    async def hub_online(self, timeout: float = 30.0) -> None:
        await self.until(
            "the hub to come online", lambda: self.hub is not None and self.hub.state == "online", timeout=timeout
        )

    async def nodes_online(self, count: int, *, timeout: float = 60.0, exactly: bool = False) -> None:
        """Until the hub's own status says ``count`` nodes are online (``exactly``: no more)."""

        def ready() -> bool:
            online = self.hub.nodes_online if self.hub is not None else -1
            return online == count if exactly else online >= count

        await self.until(f"the hub to see {count} nodes online", ready, timeout=timeout)

    async def node_state(self, node_id: str, state: str, *, timeout: float = 60.0) -> None:
        await self.until(f"node {node_id} {state}", lambda: self.nodes.get(node_id) == state, timeout=timeout)


class Stack:
    def __init__(self, config: StackConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.home = SwarmHome(workdir / "config")
        self.port = 0
        self.topics = Topics("main")
        env = {
            **os.environ,
            "NOVA_SWARM_HOME": str(self.home.path),
            "XDG_STATE_HOME": str(workdir / "state"),
            "PYTHONUNBUFFERED": "1",
        }
        self.procs = Procs(workdir / "logs", env)
        self.watcher: Watcher | None = None
        self.broker_pid = 0
        self.hub_pid = 0

    async def __aenter__(self) -> Stack:
        await asyncio.to_thread(self._prepare_home)
        self.port = free_port()
        broker = self.procs.spawn(
            "broker",
            [PYTHON, "-m", "nova_swarm.broker", *self.common(), "--engine", self.config.broker]
            + ["--host", self.config.host]
            + ["--log-level", "warning", "--no-log-file"],
        )
        self.broker_pid = broker.pid
        try:
            await wait_for_broker(self.url(Role.HUB), exited=broker.poll, timeout=30)
            # --rate-limit: the load generators are single clients sending far more than a
            # person would; every other setting is the hub's default.
            hub = self.procs.spawn(
                "hub",
                [str(BIN / "swarm-hub"), "serve", *self.common(), "--no-log-file"]
                + ["--heartbeat-timeout", str(self.config.heartbeat_timeout_s), "--rate-limit", "100000000"]
                + list(self.config.hub_args),
            )
            self.hub_pid = hub.pid
            self.watcher = Watcher(self.url(Role.HUB), self.topics)
            await self.watcher.start()
            await self.watcher.hub_online()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
            self.watcher = None
        await self.procs.close()

    def _prepare_home(self) -> None:
        self.home.ensure()
        for node_id in self.config.node_ids:
            self.home.enroll(node_id)

    def common(self) -> list[str]:
        return ["--config-dir", str(self.home.path), "--port", str(self.port)]

    def url(self, role: Role) -> BrokerURL:
        return self.home.url(role, port=self.port, host="127.0.0.1")

    def client_url(self) -> BrokerURL:
        return self.url(Role.CLIENT)

    @property
    def watch(self) -> Watcher:
        if self.watcher is None:
            raise RuntimeError("the stack is not running")
        return self.watcher

    def broker_rss_mb(self) -> float | None:
        """The broker's own memory: amqtt is the python process, Mosquitto its child."""
        if self.config.broker == "mosquitto":
            pid = child_pid(self.broker_pid, "mosquitto")
            return rss_mb(pid) if pid is not None else None
        return rss_mb(self.broker_pid)

    def hub_rss_mb(self) -> float | None:
        return rss_mb(self.hub_pid)

    async def printed_ready(self, name: str, proc: subprocess.Popen[bytes], *, timeout: float) -> None:
        """Until the child ``name`` prints ``ready`` in its log; an error with its log if it exits first."""
        printed = lambda: "ready" in self.procs.log(name) or proc.poll() is not None  # noqa: E731
        await self.watch.until(f"{name} to be ready", printed, timeout=timeout)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {self.procs.log(name)[-2000:]}")

    def node_argv(self, node_id: str, *extra: str) -> list[str]:
        """``swarm-node run`` in this process (no update supervisor), so its pid is the node."""
        return [
            str(BIN / "swarm-node"), "run", *self.common(), "--node-id", node_id, "--no-updates", "--no-guard",
            "--no-log-file", "--log-level", "warning", *extra,
        ]  # fmt: skip
