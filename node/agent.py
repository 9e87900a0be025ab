"""The node agent: announce, heartbeat, take tasks from its own topic, answer them.

    node = Node(config, engine, url)     # or Node(config, ModelSet([...]), url): several models
    await node.run()          # until node.stop(); drains or hands back in-flight work

A task is never silently dropped: it is answered, or refused with an error (``node_busy``,
``node_stopping``, ``node_paused``, ``deadline_exceeded``, ``engine_error``) that the hub can act
on. Results that cannot be sent while the broker is away wait in an outbox and go out on reconnect.

The guard (``guard.py``) watches the device's sensors: when the phone gets too hot or too flat,
the node finishes what it is running, hands back what is queued, unsubscribes from its task
topic and reports ``paused`` with the reason, until the readings are back past a margin. A model
switch (``updater.py``) holds the node the same way while it swaps engines.

A node serves a set of models (``model_set.py``): a task names one, and the node loads it if it
is not in memory, evicting the least recently used idle model within its RAM budget. Whenever
what is loaded changes, the node announces again, so the hub routes to where a model is warm.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import structlog

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, ProtocolError, RequestFailed
from nova_swarm.broker.contract.messages import (
    Announce,
    Cancel,
    Heartbeat,
    HubStatus,
    NodeProgress,
    NodeState,
    Status,
    Task,
    TaskResult,
    decode,
)
from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.identity import node_client_id
from nova_swarm.broker.link.base import Link, Links, Message, Will
from nova_swarm.broker.link.connection import ConnectionLost, keepalive_for, links_for
from nova_swarm.broker.link.outbox import Outbox
from nova_swarm.broker.link.reconnect import raise_if_cancelled, reconnecting
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.broker.service import Service

from . import homeassistant, reports, sensors
from .config import NodeConfig
from .energy import EnergyMeter, sample_while_busy
from .engine import Engine
from .execution import Executor, Job, failure, profile, sampling_for
from .guard import Guard, Pause, Resume
from .model_set import ModelSet, model_spec
from .updater import Updater, UpdateSetup

log = structlog.get_logger("nova_swarm.node")


class Node(Service):
    def __init__(
        self,
        config: NodeConfig,
        engine: Engine | ModelSet,
        url: BrokerURL | None = None,
        *,
        links: Links | None = None,
        ca_file: Path | None = None,
        sensor: sensors.Source | None = None,
        updates: UpdateSetup | None = None,
        energy: EnergyMeter | None = None,
    ) -> None:
        self.config = config
        #: the models this node serves; an engine given alone is a set of one
        self.models = engine if isinstance(engine, ModelSet) else ModelSet.single(engine)
        self.models.watch(self._models_changed)
        self.sensor = sensor or sensors.PsutilSource()
        self.guard = Guard(config.guard)
        self.reading = sensors.UNKNOWN
        #: estimates each task's joules (``energy.py``); None: every task's energy is unknown
        self.energy = energy
        #: set while a task runs: the energy source is sampled then
        self._measuring = asyncio.Event()
        #: the broker: MQTT to ``url`` (``ca_file`` for TLS), or ``links`` (a memory broker's in a test)
        self.links = links_for(url, links, ca_file=ca_file)
        self.url = self.links.url
        self.topics = Topics(config.swarm)
        self._queued: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._work = asyncio.Condition()
        #: set while the node holds tasks: it then shows progress (``_progress``)
        self._holding = asyncio.Event()
        self._outbox = Outbox()
        self._stop_requested = asyncio.Event()
        self.connected = asyncio.Event()
        self.profile_tokens_per_s = 0.0
        #: runs each task on the engine, and counts what the node served
        self._executor = Executor(config.node_id)
        #: which run of the hub we work for (its ``started_at``); a new one means a restarted hub
        self._hub_started_at: float | None = None
        #: why the node takes no work apart from its guard (a model switch), or None
        self._hold: str | None = None
        #: the engine is being swapped: workers wait
        self._swapping = False
        self.updates = updates or UpdateSetup()
        #: the GGUF file the engine serves, when the node knows it (it can switch models then)
        self.model_path: Path | None = self.updates.model_path
        self.updater = Updater(self, self.updates)
        self._tg: asyncio.TaskGroup | None = None
        #: set when a new bundle is installed: the CLI exits so the supervisor restarts into it
        self.restart_requested = False
        self._online_reported = False

    @property
    def engine(self) -> Engine:
        """The engine used most recently: the one a task that names no model runs on."""
        return self.models.current

    @property
    def _conn(self) -> Link | None:
        """The broker link we have now, if any."""
        return self._outbox.link

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the node to stop: no new tasks, drain or hand back the rest, go offline."""
        self._stop_requested.set()

    async def run(self) -> None:
        # Every line this node logs, from every task it starts, says which node it is.
        structlog.contextvars.bind_contextvars(node_id=self.config.node_id)
        await self.models.start()
        await self._profile()
        await self._sense()  # before connecting: a node that starts hot starts paused
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            link = tg.create_task(reconnecting(self._connect, self._session, name=f"node {self.config.node_id}"))
            senses = tg.create_task(self._sense_loop())
            meters = [tg.create_task(sample_while_busy(self.energy, self._measuring))] if self.energy else []
            workers = [tg.create_task(self._worker()) for _ in range(self.config.slots)]
            await self._stop_requested.wait()
            senses.cancel()
            for meter in meters:
                meter.cancel()
            self.updater.cancel()
            await self._drain(workers)
            await self._go_offline()
            link.cancel()
        log.info("node stopped", node_id=self.config.node_id, tasks_done=self.tasks_done)

    async def _profile(self) -> None:
        if self.config.profile_tokens > 0:
            self.profile_tokens_per_s = await profile(self.engine, self.config.profile_tokens)
            log.info("profiled engine", tokens_per_s=round(self.profile_tokens_per_s, 1))

    def _connect(self) -> Link:
        offline = Status(node_id=self.config.node_id, state=NodeState.OFFLINE, reason="connection lost")
        return self.links.open(
            # Derived from our password: no other login can take our connection over.
            client_id=node_client_id(self.config.node_id, self.url.password),
            will=Will(self.topics.node_status(self.config.node_id), offline.encode()),
            # Heartbeats double as keepalive traffic, so a healthy node never wakes its radio for
            # a ping, and the broker writes off a dropped one within 1.5 keepalives (connection.py).
            keepalive=keepalive_for(self.config.heartbeat_s),
        )

    async def _session(self, conn: Link) -> None:
        node_id = self.config.node_id
        await conn.subscribe(
            self.topics.node_cancel(node_id), self.topics.hub_status(), self.topics.model(), self.topics.bundle(), qos=1
        )
        if self._accepting():
            await conn.subscribe(self.topics.node_task(node_id), qos=1)
        await conn.publish(self.topics.node_announce(node_id), self._announce().encode(), retain=True)
        await conn.publish(self.topics.node_status(node_id), self._current_status().encode(), retain=True)
        if self.config.home_assistant.enabled:
            await conn.subscribe(self.config.home_assistant.topics.status(), qos=1)
            await conn.publish(*reports.discovery(self.config), qos=1, retain=True)
        await self._outbox.attach(conn)
        try:
            self.connected.set()
            log.info("node online", node_id=node_id, broker=self.url.redacted(), version=__version__)
            if self.updates.on_online is not None and not self._online_reported:
                self._online_reported = True
                self.updates.on_online()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeats(conn))
                tg.create_task(self._progress(conn))
                async for message in conn.messages():
                    await self._on_message(message, conn, tg)
        finally:
            self._outbox.detach()
            self.connected.clear()

    async def _drain(self, workers: list[asyncio.Task[None]]) -> None:
        if self._conn is not None:
            try:
                await self._conn.unsubscribe(self.topics.node_task(self.config.node_id))
            except ConnectionLost:
                pass
        await self._hand_back_queue(ErrorCode.NODE_STOPPING, "node is shutting down")
        _, still_running = await asyncio.wait(workers, timeout=self.config.drain_s)
        if still_running:
            for job in list(self._running.values()):
                job.cancel_reason = ErrorCode.NODE_STOPPING
                job.cancel.set()
            await asyncio.wait(still_running)

    async def _go_offline(self) -> None:
        if self.restart_requested:  # back in a moment, on new code
            status = self._status(NodeState.PAUSED, reason=self._hold)
        else:
            status = self._status(NodeState.OFFLINE, reason="stopped")
        await self._send(self.topics.node_status(self.config.node_id), status.encode(), retain=True)
        if self._outbox:
            log.warning("stopped while disconnected; the broker publishes our Last Will instead")

    # ------------------------------------------------------------------ messages in

    async def _on_message(self, message: Message, conn: Link, session: asyncio.TaskGroup) -> None:
        topic = message.topic
        if topic == self.topics.hub_status():
            await self._on_hub_status(message)
            return
        # The pins are retained on purpose; a model switch outlives a reconnect, a bundle fetch
        # (which needs this connection's subscription) does not.
        if topic == self.topics.model():
            assert self._tg is not None
            await self.updater.on_model_pin(message.payload, self._tg)
            return
        if topic == self.topics.bundle():
            await self.updater.on_bundle(message.payload, conn, session)
            return
        if (index := self.topics.parse_bundle_chunk(topic)) is not None:
            self.updater.on_chunk(index, message.payload)
            return
        if self.config.home_assistant.enabled and topic == self.config.home_assistant.topics.status():
            if homeassistant.is_birth(message.payload):
                await conn.publish(*reports.discovery(self.config), qos=1, retain=True)
            return
        if message.retain:
            # Task and cancel topics are never retained; a retained one is stale or leaked.
            log.warning("ignored retained message", topic=message.topic)
            return
        parsed = self.topics.parse_node_topic(message.topic)
        if parsed is None:
            return
        _, kind = parsed
        try:
            if kind is NodeTopic.TASK:
                await self._on_task(decode(Task, message.payload))
            elif kind is NodeTopic.CANCEL:
                await self._on_cancel(decode(Cancel, message.payload))
        except ProtocolError as exc:
            # Without a valid task id there is nobody to answer; the hub's attempt timeout
            # re-dispatches whatever this was meant to be.
            log.warning("dropped malformed message", topic=message.topic, error=str(exc))

    async def _on_task(self, task: Task) -> None:
        with structlog.contextvars.bound_contextvars(request_id=task.request_id, task_id=task.task_id):
            now = time.monotonic()
            job = Job(task, sampling_for(task, self.config), received=now, deadline=now + task.timeout_s)
            if task.task_id in self._running or any(j.task.task_id == task.task_id for j in self._queued):
                log.info("ignored duplicate delivery")  # QoS 1 may deliver twice
                return
            if self._stop_requested.is_set():
                await self._send_result(self._failure(job, ErrorCode.NODE_STOPPING, "node is shutting down"))
                return
            if self.guard.paused:  # sent before the hub saw us pause
                await self._send_result(self._failure(job, ErrorCode.NODE_PAUSED, f"node paused: {self.guard.reason}"))
                return
            # A model switch (self._hold) still takes what the hub sent before it saw the pause:
            # queued work runs on the old model first, or on the new one right after the swap.
            async with self._work:
                if len(self._queued) + len(self._running) >= self.config.slots + self.config.queue_max:
                    busy = True
                else:
                    busy = False
                    self._queued.append(job)
                    self._work.notify()
                    self._holding.set()
            if busy:
                log.info("refused task: queue full")
                await self._send_result(
                    self._failure(job, ErrorCode.NODE_BUSY, f"node queue is full ({self.config.queue_max} waiting)")
                )

    async def _on_hub_status(self, message: Message) -> None:
        """A restarted hub knows us only from retained messages: speak up at once.

        Work from the hub's previous run is dropped: the new run re-dispatches it from its journal
        under new task ids and would ignore our results for the old ones.
        """
        try:
            status = decode(HubStatus, message.payload) if message.payload else None
        except ProtocolError as exc:
            log.warning("dropped malformed hub status", error=str(exc))
            return
        if status is None or status.state != "online" or status.started_at == self._hub_started_at:
            return
        previous, self._hub_started_at = self._hub_started_at, status.started_at
        if previous is not None:
            async with self._work:
                dropped = len(self._queued) + len(self._running)
                self._queued.clear()
                for job in self._running.values():
                    job.cancel_reason = ErrorCode.CANCELLED
                    job.cancel.set()
            log.info("hub restarted; dropped its old work", dropped=dropped)
        await self._send(self.topics.node_heartbeat(self.config.node_id), self._heartbeat().encode())

    # ------------------------------------------------------------------ the guard

    async def _sense(self) -> None:
        # termux-battery-status can take seconds (or hang until its timeout): never on the loop.
        self.reading = await asyncio.to_thread(sensors.read, self.sensor)
        change = self.guard.update(self.reading)
        if isinstance(change, Pause):
            await self._pause(change.reason)
        elif isinstance(change, Resume):
            await self._resume(change.reason)

    async def _sense_loop(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.config.sense_s)
            await self._sense()

    async def _pause(self, reason: str) -> None:
        log.warning("pausing", reason=reason, pauses=self.guard.pauses)
        conn = self._conn
        if conn is not None:
            try:
                await conn.unsubscribe(self.topics.node_task(self.config.node_id), drop_pending=False)
            except ConnectionLost:
                pass  # the next session starts paused anyway
        # Running tasks finish (a minute more on a warm phone is fine); queued ones go back.
        await self._hand_back_queue(ErrorCode.NODE_PAUSED, f"node paused: {reason}")
        await self.send_status()

    async def _hand_back_queue(self, code: ErrorCode, message: str) -> None:
        """Refuse every queued task with ``code`` (the hub re-dispatches them); running ones stay."""
        async with self._work:
            handed_back = list(self._queued)
            self._queued.clear()
            self._work.notify_all()  # idle workers re-check: when stopping, they exit
        for job in handed_back:
            await self._send_result(self._failure(job, code, message))

    async def _resume(self, reason: str) -> None:
        log.info("resuming", reason=reason, resumes=self.guard.resumes)
        await self._take_work()
        await self.send_status()

    async def _take_work(self) -> None:
        conn = self._conn
        if conn is not None and self._accepting():
            try:
                await conn.subscribe(self.topics.node_task(self.config.node_id), qos=1)
            except ConnectionLost:
                pass  # the next session subscribes

    def _accepting(self) -> bool:
        return not self.guard.paused and self._hold is None

    def _current_status(self) -> Status:
        if not self._accepting():
            return self._status(NodeState.PAUSED, reason=self.guard.reason if self.guard.paused else self._hold)
        return self._status(NodeState.ONLINE)

    # ------------------------------------------------------------------ model switch and restart

    async def switch_engine(self, model_path: Path, reason: str) -> None:
        """Serve ``model_path`` alone from now on (``serve_models``)."""
        await self.serve_models([model_path], reason)

    async def serve_models(self, paths: list[Path], reason: str) -> list[str]:
        """Serve every model of ``paths`` from now on, between tasks: take no new work, hand back
        what is queued, let what runs finish, then swap; the models already loaded that stay in
        the set stay loaded. Returns why each model that cannot fit does not. When none fits or
        the new set does not load, the node serves its old set again and ``ConfigError`` says why."""
        load = self.updates.load_model
        if load is None:
            raise ConfigError("this node's engine cannot switch models")
        specs = await asyncio.to_thread(lambda: [model_spec(p, self.updates.ram) for p in paths])
        old = list(self.models.specs.values())
        async with self._between_tasks(reason):
            try:
                await self.models.reset(specs, load)
            except ConfigError:
                if self.model_path is None:
                    raise
                await self.models.reset(old, load)  # every model it served, as before
                raise
            self.model_path = self.models.specs[self.models.default].path
        return list(self.models.unfit.values())

    @asynccontextmanager
    async def _between_tasks(self, reason: str) -> AsyncIterator[None]:
        """Take no new work (paused, with ``reason``), let what is accepted run, then hold the
        workers while the block swaps models; announce what is served after, and take work again."""
        await self._hold_work(reason)
        try:
            # What is queued was accepted: it runs on the old model. Then the workers stand still
            # while the engine is swapped.
            await self._until_idle(then_swap=True)
            yield
            await self._profile()
            await self._send(self.topics.node_announce(self.config.node_id), self._announce().encode(), retain=True)
        finally:
            async with self._work:
                self._swapping = False
                self._work.notify_all()
            self._hold = None
            await self._take_work()
            await self.send_status()

    async def restart_for_update(self, version: str) -> None:
        """A new bundle is installed: finish the accepted work, then stop so the supervisor restarts
        us into it. Meanwhile, and until the new code is online, we show as paused (not offline):
        the hub keeps prompts waiting for us instead of failing them."""
        self.restart_requested = True
        await self._hold_work(f"restarting into bundle {version}")
        try:
            async with asyncio.timeout(self.config.drain_s):
                await self._until_idle()
        except TimeoutError:
            log.warning("restarting with work still queued; it goes back to the hub")
        self.stop()

    async def _hold_work(self, reason: str) -> None:
        """Take no new work (the hub sees us paused with ``reason``); what is accepted still runs."""
        was_accepting = self._accepting()
        self._hold = reason
        if was_accepting and self._conn is not None:
            try:
                await self._conn.unsubscribe(self.topics.node_task(self.config.node_id), drop_pending=False)
            except ConnectionLost:
                pass
        await self.send_status()

    async def _until_idle(self, *, then_swap: bool = False) -> None:
        while True:
            async with self._work:
                if not self._running and not self._queued:
                    self._swapping = then_swap
                    return
            await asyncio.sleep(0.05)

    @property
    def swapping(self) -> bool:
        """The engine is being replaced right now (a model switch past its wait for idle)."""
        return self._swapping

    async def send_status(self) -> None:
        status = self._current_status()
        await self._send(self.topics.node_status(self.config.node_id), status.encode(), retain=True)
        await self._send(self.topics.node_heartbeat(self.config.node_id), self._heartbeat().encode())

    async def _on_cancel(self, cancel: Cancel) -> None:
        running = self._running.get(cancel.task_id)
        if running is not None:
            running.cancel.set()
            return
        async with self._work:
            for job in self._queued:
                if job.task.task_id == cancel.task_id:
                    self._queued.remove(job)
                    break
            else:
                return
        await self._send_result(self._failure(job, ErrorCode.CANCELLED, f"cancelled by hub: {cancel.reason}"))

    # ------------------------------------------------------------------ work

    async def _worker(self) -> None:
        while True:
            async with self._work:
                await self._work.wait_for(
                    lambda: (
                        (bool(self._queued) and not self._swapping)
                        or (self._stop_requested.is_set() and not self._queued)
                    )
                )
                if not self._queued:
                    return  # stopping, and nothing left to run
                job = self._queued.popleft()
                self._running[job.task.task_id] = job
                self._measuring.set()
            mark = self.energy.begin() if self.energy is not None else None
            try:
                result = await self._run(job)
            finally:
                sharing = len(self._running)
                self._running.pop(job.task.task_id, None)
                if not self._running:
                    self._measuring.clear()
            if self.energy is not None and mark is not None and result.ok:
                joules = self.energy.end(mark, sharing=sharing)
                result = result.model_copy(update={"energy_j": None if joules is None else round(joules, 3)})
            await self._send_result(result)

    async def _run(self, job: Job) -> TaskResult:
        """Run ``job`` on its model, loaded first if need be (``model_set.py``)."""
        try:
            async with self.models.use(job.task.model, deadline=job.deadline) as lease:
                result = await self._executor.run(job, lease.engine, chunks_to=self._publish_chunk)
        except RequestFailed as exc:  # a model this node cannot serve now, or not in time
            log.warning("refused task", code=exc.code.value, reason=exc.message)
            return self._failure(job, exc.code, exc.message)
        if lease.load_s is not None and result.timings is not None:
            result = result.model_copy(
                update={"timings": result.timings.model_copy(update={"load_ms": round(lease.load_s * 1000, 2)})}
            )
        return result

    def _failure(self, job: Job, code: ErrorCode, message: str) -> TaskResult:
        return failure(job, self.config.node_id, job.task.model or self.models.current_info().name, code, message)

    async def _models_changed(self) -> None:
        """A model was loaded or evicted: say so (retained), so the hub routes to warm models,
        and with a heartbeat, which counts the swaps."""
        await self._send(self.topics.node_announce(self.config.node_id), self._announce().encode(), retain=True)
        await self._send(self.topics.node_heartbeat(self.config.node_id), self._heartbeat().encode())

    # ------------------------------------------------------------------ messages out

    @property
    def tasks_done(self) -> int:
        """Tasks answered since the node started."""
        return self._executor.tasks_done

    async def _publish_chunk(self, payload: bytes) -> None:
        """A piece of a streamed answer, now or never (the result carries the whole answer)."""
        conn = self._conn
        if conn is None:
            raise ConnectionLost("no broker link")
        await conn.publish(self.topics.node_stream(self.config.node_id), payload, qos=1)

    async def _send_result(self, result: TaskResult) -> None:
        await self._send(self.topics.node_result(self.config.node_id), result.encode())

    async def _send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish now, or keep it for the next connection: a result is never dropped."""
        await self._outbox.send(topic, payload, retain=retain)

    async def _heartbeats(self, conn: Link) -> None:
        topic = self.topics.node_heartbeat(self.config.node_id)
        while True:
            raise_if_cancelled()
            await conn.publish(topic, self._heartbeat().encode(), qos=0)
            await asyncio.sleep(self.config.heartbeat_s)

    async def _progress(self, conn: Link) -> None:
        """While the node holds tasks, say so every ``progress_s``: the hub gives a task whose node
        goes quiet to another node within seconds (a phone off Wi-Fi or frozen keeps its socket
        half-open, so nothing else would tell). Idle, it sends nothing and sleeps."""
        topic = self.topics.node_progress(self.config.node_id)
        while True:
            raise_if_cancelled()
            held = [*self._running, *(job.task.task_id for job in self._queued)]
            if not held:
                self._holding.clear()  # no await since the check: a new task sets it again
                await self._holding.wait()
                continue
            progress = NodeProgress(node_id=self.config.node_id, tasks=held[:1024])
            await conn.publish(topic, progress.encode(), qos=0)  # liveness: the next one covers a loss
            await asyncio.sleep(self.config.progress_s)

    def _announce(self) -> Announce:
        return reports.announce(self.config, self.models, tokens_per_s=self.profile_tokens_per_s, reading=self.reading)

    def _status(self, state: NodeState, reason: str | None = None) -> Status:
        return reports.status(self.config, state, reason, self.updater.bundle_report, self.updater.model_report)

    def _heartbeat(self) -> Heartbeat:
        return reports.heartbeat(
            self.config,
            self.reading,
            self._executor,
            busy=len(self._running),
            queued=len(self._queued),
            paused=not self._accepting(),
            pauses=self.guard.pauses,
            swaps=len(self.models.swaps),
        )
