"""The hub: takes prompts, fans them out to nodes, and answers every one.

    async with Hub(config, url) as hub:     # or Hub(config, links=MemoryBroker().links())
        ...                                 # it serves until the block ends

(or ``await hub.run()`` until ``hub.stop()``, as ``swarm-hub serve`` does).

This module is the wiring: it owns the broker session, the stores and the background loops,
and routes what comes in. Node messages feed the registry (who is there, how busy, how hot);
prompts, results, stream pieces and cancels go to ``Requests`` (``requests.py``), which drives
each prompt's ``RequestMachine`` (``lifecycle.py``) to its one reply. Replies that cannot be
sent while the broker is away wait in an outbox (``broker/link/outbox.py``) and go out on
reconnect.

Accepted prompts and their replies are journalled (``journal.py``): a hub that crashes resumes
what it had accepted, and a client that sends the same request id again gets the same reply.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from nova_swarm.broker.contract.errors import ProtocolError, SwarmError
from nova_swarm.broker.contract.messages import (
    HubStatus,
    NodeChunk,
    NodeProgress,
    TaskResult,
    decode,
)
from nova_swarm.broker.contract.signing import PublicKey, SigningKey
from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.identity import hub_client_id
from nova_swarm.broker.link.base import Link, Links, Message, Will
from nova_swarm.broker.link.connection import ConnectionLost, links_for
from nova_swarm.broker.link.outbox import Outbox
from nova_swarm.broker.link.reconnect import raise_if_cancelled, reconnecting
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.broker.service import Service

from . import accounting, context, credits, metrics, pins, rerank
from .config import HubConfig
from .journal import Entry, Journal, JournalWriter, Unsent
from .ledger import Ledger, receipts
from .ledger import uptime as ledger_uptime
from .placement import Placement
from .registry import Registry
from .requests import Requests
from .runs import Wiring
from .scheduler import Scheduler
from .store import Store
from .trust import Trust
from .winrate import WinRates

log = structlog.get_logger("nova_swarm.hub")


class Hub(Service):
    def __init__(
        self,
        config: HubConfig,
        url: BrokerURL | None = None,
        *,
        links: Links | None = None,
        reranker: rerank.Reranker | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """The broker is ``url`` (MQTT, with ``ca_file`` for TLS) or ``links`` (any ``Links``:
        a ``MemoryBroker``'s in a test)."""
        self.config = config
        self.links = links_for(url, links, ca_file=ca_file)
        self.url = self.links.url
        self.topics = Topics(config.swarm)
        self.registry = Registry(heartbeat_timeout_s=config.heartbeat_timeout_s)
        self.winrates = WinRates(half_life_s=config.winrate_half_life_s)
        self.trust = Trust()
        #: what each node has given (from the ledger at start, then live), for the credit metrics
        self.accounts: dict[str, credits.Contribution] = {}
        self.rates = config.credit_rates
        self.scheduler = Scheduler(self.winrates, random.Random(config.seed), self.trust)
        self.placement = Placement(config, self.registry, self.scheduler, self.trust)
        self.reranker = reranker or rerank.load_reranker(config.reranker)
        #: who hears of every settled attempt and request: filled by ``run`` once the ledger and
        #: the stored win rates are loaded
        self.observers = accounting.Observers()
        self._store: Store | None = None
        #: the requests in flight: made by ``run``, once the journal is open
        self._requests: Requests | None = None
        self._journal: JournalWriter | None = None
        #: what a previous run left in the journal, resumed once the hub is first online
        self._resume: tuple[list[Entry], list[Unsent]] | None = None
        #: the contribution ledger, when the hub has a signing key (swarm-hub up/serve always do)
        self._ledger: Ledger | None = None
        #: what checks the retained route table: the hub's own public key (None: no signing key)
        self._hub_key: PublicKey | None = None
        self._outbox = Outbox()
        self._tg: asyncio.TaskGroup | None = None
        self._stop_requested = asyncio.Event()
        #: set once the hub said it is offline: no status publish may say "online" after that
        self._gone_offline = False
        self._status_changed = asyncio.Event()
        self.ready = asyncio.Event()
        #: the last minute of settled requests, for the metrics (and the totals since start)
        self.window = metrics.Window()
        self.started_at = time.time()
        #: retrieval (``config.retrieval``), or None
        self._context = context.for_hub(config, self.links, self.registry)

    @property
    def requests(self) -> Requests:
        """The requests in flight and waiting (while the hub runs)."""
        if self._requests is None:
            raise RuntimeError("the hub is not running")
        return self._requests

    @property
    def answered(self) -> int:
        """Requests answered since the hub started."""
        return self.window.answered_total

    @property
    def failed(self) -> int:
        """Requests refused or failed since the hub started (not those their client cancelled)."""
        return self.window.failed_total

    @property
    def connected(self) -> bool:
        """Whether the hub is on the broker now."""
        return self._outbox.link is not None

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop_requested.set()

    async def run(self) -> None:
        self._store = Store(self.config.db_path)
        self.registry.load(await asyncio.to_thread(self._store.load_nodes))
        self.winrates = WinRates(
            half_life_s=self.config.winrate_half_life_s, rows=await asyncio.to_thread(self._store.load_win_rates)
        )
        self.scheduler.winrates = self.winrates
        journal = Journal(self.config.db_path)
        self._journal = JournalWriter(journal, keep_s=self.config.journal_keep_s, remember=self.config.journal_remember)
        self._resume = await self._journal.load()
        log.info("journal loaded", unfinished=len(self._resume[0]), unsent=len(self._resume[1]))
        key = None
        if self.config.signing_key_file is not None:
            key = await asyncio.to_thread(SigningKey.load, self.config.signing_key_file)
            self._hub_key = key.public
        if self.config.ledger_path is not None and key is not None:
            self._ledger = await asyncio.to_thread(Ledger, self.config.ledger_path, key)
            past, up = await asyncio.to_thread(
                lambda path: (list(receipts(path)), ledger_uptime(path)), self.config.ledger_path
            )
            log.info("trust rebuilt from the ledger", receipts=self.trust.replay(r.body for r in past))
            self.accounts = credits.by_node(past, self.rates, uptime_s=up)
        self.observers = accounting.for_hub(
            self.registry,
            self.trust,
            self.winrates,
            self.window,
            ledger=self._ledger,
            accounts=self.accounts,
            rates=self.rates,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                wiring = Wiring(
                    self.config,
                    self.topics,
                    self._journal,
                    self._outbox,
                    self.registry,
                    self.placement,
                    self.observers,
                    self.reranker,
                    changed=self._status_changed.set,
                )
                self._requests = Requests(wiring, context=self._context, spawn=self._spawn)
                writer = tg.create_task(self._journal.run())
                session = tg.create_task(reconnecting(self._connect, self._session, name="hub"))
                background = [
                    session,
                    tg.create_task(self._liveness_loop()),
                    tg.create_task(self._traffic_loop()),
                    tg.create_task(self._flush_loop()),
                    tg.create_task(self._metrics_loop()),
                    *([tg.create_task(self._ledger.run())] if self._ledger is not None else []),
                ]
                await self._stop_requested.wait()
                # Stop starting prompts; those still running get a moment, then a clear error.
                # The hub stays subscribed to its prompt topics meanwhile: leaving them would end
                # them in its persistent session, and what clients send while it is down would be
                # lost. What comes while it drains is journalled for its next run.
                await self._requests.drain()
                await self._go_offline()
                # Leave the broker before the journal's last write: a prompt sent after this
                # waits in our session for the next run, one that came before is journalled.
                session.cancel()
                await asyncio.wait([session])
                await self._requests.finished()
                await self._journal.flushed()
                for task in [*background, writer]:
                    task.cancel()
        finally:
            if self._context is not None:
                await self._context.aclose()
            await self._persist()
            self._store.close()
            journal.close()
            if self._ledger is not None:
                self._ledger.close()
            log.info("hub stopped", answered=self.answered, failed=self.failed)

    def _connect(self) -> Link:
        offline = HubStatus(hub_id=self.config.hub_id, state="offline")
        return self.links.open(
            # Derived from the hub's password: stable across restarts, and no other login can
            # take it over (identity.py).
            client_id=hub_client_id(self.config.swarm, self.url.password),
            will=Will(self.topics.hub_status(), offline.encode()),
            protocol=self.config.protocol,
            # The broker keeps our subscriptions and queues QoS 1 prompts while the hub restarts
            # (so a fire-and-forget mosquitto_pub sent meanwhile is still answered); this needs
            # the client id to stay the same from one run to the next.
            persistent=True,
        )

    async def _session(self, conn: Link) -> None:
        t = self.topics
        await conn.subscribe(
            t.prompt(),
            t.prompt_filter(),
            t.all_nodes(NodeTopic.ANNOUNCE),
            t.all_nodes(NodeTopic.STATUS),
            t.all_nodes(NodeTopic.RESULT),
            t.all_nodes(NodeTopic.STREAM),
            t.cancel(),
            t.cancel_filter(),
            t.model(),
            t.bundle(),
            t.routes(),
            qos=1,
        )
        # Liveness at QoS 0, as it is sent: our persistent session must not queue stale
        # heartbeats while the hub is away (amqtt delivers at the subscription's QoS), where
        # they would crowd out the prompts the queue is for.
        await conn.subscribe(t.all_nodes(NodeTopic.HEARTBEAT), t.all_nodes(NodeTopic.PROGRESS), qos=0)
        await self._outbox.attach(conn)
        # Nodes reappear within moments of a restart (they answer our online status with a
        # heartbeat); until then a prompt waits for them rather than failing at once.
        self.requests.reconnected(asyncio.get_running_loop().time())
        try:
            await self._publish_status()
            if self._resume is not None:
                resume, self._resume = self._resume, None
                self._spawn(self.requests.resume(*resume))
            self.ready.set()
            log.info("hub online", broker=self.url.redacted(), mqtt5=conn.mqtt5, swarm=self.config.swarm)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._status_loop())
                async for message in conn.messages():
                    self._on_message(message)
        finally:
            self._outbox.detach()

    async def _go_offline(self) -> None:
        self._gone_offline = True
        status = HubStatus(hub_id=self.config.hub_id, state="offline", ts=time.time(), version=__version__)
        await self._outbox.send(self.topics.hub_status(), status.encode(), retain=True)

    # ------------------------------------------------------------------ messages in

    def _on_message(self, message: Message) -> None:
        if self.topics.prompt_scope(message.topic) is not None:
            if message.retain:
                # A retained prompt would be re-run on every hub restart; only live ones count.
                # What our persistent session queued while the hub was away is live: brokers
                # deliver it unflagged (the embedded one too: hardened.py fixes amqtt's flag).
                log.warning("ignored retained prompt")
                return
            self.requests.on_prompt(message)
            return
        if message.topic in (self.topics.model(), self.topics.bundle()):
            self._on_pin(message)
            return
        if message.topic == self.topics.routes():
            self._on_routes(message.payload)
            return
        if (scope := self.topics.cancel_scope(message.topic)) is not None:
            self.requests.on_cancel(message, scope)
            return
        parsed = self.topics.parse_node_topic(message.topic)
        if parsed is None:
            return
        node_id, kind = parsed
        try:
            if kind is NodeTopic.RESULT:
                self.requests.on_result(node_id, decode(TaskResult, message.payload))
            elif kind is NodeTopic.STREAM:
                self.requests.on_chunk(node_id, decode(NodeChunk, message.payload))
            elif kind is NodeTopic.PROGRESS:
                self.requests.on_progress(node_id, decode(NodeProgress, message.payload))
            else:
                heard = self.registry.hear(node_id, kind, message.payload, retain=message.retain, now=time.time())
                if heard.lost is not None:
                    self._node_lost(node_id, heard.lost)
                if heard.changed:
                    self._status_changed.set()
                if heard.available and (rec := self.registry.nodes.get(node_id)) is not None:
                    self.requests.wake(rec)
        except ProtocolError as exc:
            log.warning("dropped malformed node message", node_id=node_id, topic=message.topic, error=str(exc))

    def _on_pin(self, message: Message) -> None:
        """Remember what is pinned, so the node table can say who lags and why.

        Not verified: nodes check signatures; the hub only reports what it sees retained."""
        signed = pins.unverified_signed(message.payload) or {}
        if message.payload and not signed:
            log.warning("ignored malformed pin", topic=message.topic)
        self.registry.pins = self.registry.pins.seen(signed, bundle=message.topic == self.topics.bundle())
        self._status_changed.set()

    def _on_routes(self, payload: bytes) -> None:
        """The route table (experts by tag): only one signed with this hub's key, and not older
        than the one it follows; an empty payload clears it."""
        try:
            table = pins.verified_routes(payload, self._hub_key, self.config.swarm, follows=self.requests.routes)
        except (ValueError, SwarmError) as exc:
            log.warning("ignored a route table", error=str(exc))
            return
        self.requests.routes = table
        log.info("route table", routes=table.routes if table else None)

    # ------------------------------------------------------------------ node presence

    def _node_lost(self, node_id: str, reason: str) -> None:
        log.warning("node lost", node_id=node_id, reason=reason)
        self._status_changed.set()
        self.requests.node_lost(node_id, reason)

    async def _liveness_loop(self) -> None:
        interval = max(0.1, min(1.0, self.config.heartbeat_timeout_s / 10))
        while True:
            raise_if_cancelled()
            await asyncio.sleep(interval)
            now = time.time()
            for node_id in self.registry.expire(now):
                self._node_lost(node_id, f"silent for over {self.config.heartbeat_timeout_s:.0f} s")
            for rec in self.registry.nodes.values():  # online and not paused: uptime credit
                if rec.available(now, self.config.heartbeat_timeout_s):
                    self.observers.node_up(rec.node_id, interval)

    async def _traffic_loop(self) -> None:
        """Once a second, when there was any, one line of what the hub did: each request is
        logged at debug only, since three lines a request cost more than a tenth of its time."""
        answered, failed = self.answered, self.failed
        while True:
            raise_if_cancelled()
            await asyncio.sleep(1.0)
            if (self.answered, self.failed) == (answered, failed) or self._requests is None:
                continue
            log.info(
                "traffic",
                answered=self.answered - answered,
                failed=self.failed - failed,
                running=len(self._requests.runs),
                waiting=len(self._requests.waiting),
            )
            answered, failed = self.answered, self.failed

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None
        self._tg.create_task(coro)

    # ------------------------------------------------------------------ status and metrics out

    def status(self) -> HubStatus:
        inflight, queued = self._counts()
        return self.window.hub_status(
            self.config, self.registry, now=time.time(), inflight=inflight, queued=queued, started_at=self.started_at
        )

    def _counts(self) -> tuple[int, int]:
        """Requests in flight, and those of them waiting for a node."""
        requests = self._requests
        return (len(requests.runs), len(requests.waiting)) if requests is not None else (0, 0)

    async def _publish_status(self) -> None:
        if self._gone_offline:
            # The status loop runs until the session is cancelled, after the offline status: an
            # "online" retained after it would show a stopped hub as up to every client.
            return
        await self._outbox.send(self.topics.hub_status(), self.status().encode(), retain=True)
        await self._outbox.send(self.topics.hub_nodes(), self.registry.table(time.time()).encode(), retain=True)

    async def _status_loop(self) -> None:
        while True:
            raise_if_cancelled()
            try:
                async with asyncio.timeout(self.config.status_interval_s):  # not wait_for: see requests.py
                    await self._status_changed.wait()
            except TimeoutError:
                pass
            self._status_changed.clear()
            await self._publish_status()
            await asyncio.sleep(0.5)  # at most two status publishes a second, however busy

    async def _metrics_loop(self) -> None:
        interval = self.config.metrics_interval_s
        if interval <= 0:
            return
        while True:
            raise_if_cancelled()
            await asyncio.sleep(interval)
            conn = self._outbox.link
            if conn is None:
                continue  # live readings only: nothing is queued for later
            batch = metrics.readings(
                self.topics,
                self.window,
                self.registry,
                self.winrates,
                self.accounts,
                self.rates,
                heartbeat_timeout_s=self.config.heartbeat_timeout_s,
                load=self._counts(),
                now=time.time(),
                mono=asyncio.get_running_loop().time(),
            )
            try:
                for topic, payload in batch:
                    await conn.publish(topic, payload, qos=0)
            except ConnectionLost:
                pass  # the next tick publishes fresh ones

    # ------------------------------------------------------------------ stores

    async def _persist(self) -> None:
        """Write what changed since the last flush; rows are built here, on the loop."""
        assert self._store is not None
        nodes = [Store.node_row(r) for r in self.registry.take_dirty()]
        rates = self.winrates.take_dirty()
        if nodes or rates:
            await asyncio.to_thread(self._store.save, nodes, rates)

    async def _flush_loop(self) -> None:
        assert self._journal is not None
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self.config.flush_interval_s)
            await self._persist()
            await self._journal.prune(time.time())
            self.requests.limiter.forget_idle(asyncio.get_running_loop().time())
