"""The hub: takes prompts, fans them out to nodes, and answers every one.

    async with Hub(config, url) as hub:     # or Hub(config, links=MemoryBroker().links())
        ...                                 # it serves until the block ends

(or ``await hub.run()`` until ``hub.stop()``, as ``swarm-hub serve`` does).

Each accepted prompt gets a coroutine that drives its ``RequestMachine`` (``lifecycle.py``):
the machine decides, this module does the I/O. Every prompt ends in exactly one reply on its
reply topic, an answer or an error; replies that cannot be sent while the broker is away wait
in an outbox (``broker/link/outbox.py``) and go out on reconnect.

Accepted prompts and their replies are journalled (``journal.py``): a hub that crashes resumes
what it had accepted, and a client that sends the same request id again gets the same reply.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeAlias

import structlog

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, ProtocolError
from nova_swarm.broker.contract.messages import (
    Announce,
    Answer,
    CancelRequest,
    Candidate,
    ChatMessage,
    ErrorInfo,
    ErrorReply,
    Heartbeat,
    HubStatus,
    NodeChunk,
    NodeProgress,
    NodeState,
    PromptRequest,
    Status,
    Task,
    TaskResult,
    decode,
)
from nova_swarm.broker.contract.messages import Cancel as CancelMessage
from nova_swarm.broker.contract.signing import SigningKey
from nova_swarm.broker.contract.topics import SHARED_SCOPE, NodeTopic, Topics
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.home import SwarmHome
from nova_swarm.broker.identity import hub_client_id
from nova_swarm.broker.link.base import Link, Links, Message, Will
from nova_swarm.broker.link.connection import ConnectionLost, links_for
from nova_swarm.broker.link.outbox import Outbox
from nova_swarm.broker.link.reconnect import raise_if_cancelled, reconnecting
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.broker.service import Service

from . import accounting, credits, metrics, pins, rerank
from .capacity import Capacity
from .config import HubConfig
from .context import Context
from .intake import Accepted, Rejected, parse_prompt, scoped_key, split_key
from .journal import Entry, Journal, JournalWriter, Unsent, canonical, digest
from .ledger import Ledger, receipts
from .ledger import uptime as ledger_uptime
from .lifecycle import Action, AttemptState, Cancel, Dispatch, Fail, Quiet, RequestMachine, Succeed
from .placement import Placement, Shortfall, Wait
from .ratelimit import RateLimiter
from .registry import Registry
from .scheduler import Scheduler
from .schemas import answer_problem
from .store import Store
from .streams import ClientStream, StreamMessage
from .trust import Trust
from .winrate import WinRates

log = structlog.get_logger("nova_swarm.hub")


@dataclass(frozen=True, slots=True)
class _NodeLost:
    node_id: str
    reason: str


class _Wake:
    """Capacity may have freed up: retry a waiting dispatch."""


class _Abort:
    """The hub is stopping."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A piece of a streamed answer, from a node."""

    chunk: NodeChunk


@dataclass(frozen=True, slots=True)
class _ClientCancel:
    reason: str


_Event: TypeAlias = TaskResult | _NodeLost | _Wake | _Abort | _Chunk | _ClientCancel


@dataclass(eq=False)
class _Run:
    accepted: Accepted
    digest: str
    machine: RequestMachine
    started: float
    #: what the client reads when it streams (``streams.py``)
    stream: ClientStream
    inbox: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    pending: Dispatch | None = None
    #: its attempts as they settle, for the hub's observers (receipts, win rates, energy)
    settlement: accounting.Settlement = field(init=False)
    #: what the nodes are given: the request's chat, with retrieved context when that is on
    messages: list[ChatMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.settlement = accounting.Settlement(accounting.Asked.of(self.accepted.request, self.digest))


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
        self._store: Store | None = None
        self._runs: dict[str, _Run] = {}
        #: which attempts hold a place on which node, and which run each task id belongs to
        self.capacity: Capacity[_Run] = Capacity()
        #: runs waiting for a free node, oldest first (a dict keeps insertion order)
        self._waiting: dict[_Run, None] = {}
        self.limiter = RateLimiter(per_minute=config.limits.requests_per_minute)
        self._journal: JournalWriter | None = None
        #: the contribution ledger, when the hub has a signing key (swarm-hub up/serve always do)
        self._ledger: Ledger | None = None
        self._trusted: frozenset[str] = frozenset()
        self._trusted_mtime: int | None = None
        self._resume: tuple[list[Entry], list[Unsent]] | None = None
        self._settle_until = 0.0
        self._outbox = Outbox()
        self._tg: asyncio.TaskGroup | None = None
        self._stop_requested = asyncio.Event()
        #: set once the hub said it is offline: no status publish may say "online" after that
        self._gone_offline = False
        #: stopping: new prompts are journalled for the next run, not started (``_defer``)
        self._draining = False
        self._status_changed = asyncio.Event()
        self.ready = asyncio.Event()
        #: the last minute of settled requests, for the metrics (and the totals since start)
        self.window = metrics.Window()
        self.started_at = time.time()
        #: retrieval (``config.retrieval``): the document index, and the hub's own swarm client
        #: that asks nodes for embeddings; both made on first use
        self._context = (
            Context(
                config.retrieval,
                links=self.links,
                swarm=config.swarm,
                registry=self.registry,
                timeout_s=config.default_timeout_s,
            )
            if config.retrieval is not None
            else None
        )
        self.observers = self._observers()

    def _observers(self) -> list[accounting.Observer]:
        """Who hears of every settled attempt and request (``accounting.py``). ``run`` builds them
        again once it has loaded the ledger and the stored win rates."""
        return [
            accounting.LedgerObserver(
                registry=self.registry, trust=self.trust, ledger=self._ledger, accounts=self.accounts, rates=self.rates
            ),
            accounting.WinRateObserver(self.winrates),
            accounting.EnergyObserver(self.registry),
            accounting.WindowObserver(self.window),
        ]

    @property
    def answered(self) -> int:
        """Requests answered since the hub started."""
        return self.window.answered_total

    @property
    def failed(self) -> int:
        """Requests refused or failed since the hub started (not those their client cancelled)."""
        return self.window.failed_total

    @property
    def cancelled(self) -> int:
        """Requests their client cancelled since the hub started."""
        return self.window.cancelled_total

    @property
    def _conn(self) -> Link | None:
        """The broker link we have now, if any."""
        return self._outbox.link

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
        self._journal.load_recent(
            await asyncio.to_thread(
                journal.recent, time.time() - self.config.journal_keep_s, self.config.journal_remember
            )
        )
        self._resume = (await asyncio.to_thread(journal.unfinished), await asyncio.to_thread(journal.unsent))
        log.info("journal loaded", unfinished=len(self._resume[0]), unsent=len(self._resume[1]))
        if self.config.ledger_path is not None and self.config.signing_key_file is not None:
            key = await asyncio.to_thread(SigningKey.load, self.config.signing_key_file)
            self._ledger = await asyncio.to_thread(Ledger, self.config.ledger_path, key)
            past, up = await asyncio.to_thread(
                lambda path: (list(receipts(path)), ledger_uptime(path)), self.config.ledger_path
            )
            log.info("trust rebuilt from the ledger", receipts=self.trust.replay(r.body for r in past))
            self.accounts = credits.by_node(past, self.rates, uptime_s=up)
        self.observers = self._observers()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                writer = tg.create_task(self._journal.run())
                background = [
                    tg.create_task(reconnecting(self._connect, self._session, name="hub")),
                    tg.create_task(self._liveness_loop()),
                    tg.create_task(self._flush_loop()),
                    tg.create_task(self._metrics_loop()),
                    *([tg.create_task(self._ledger.run())] if self._ledger is not None else []),
                ]
                await self._stop_requested.wait()
                await self._drain()
                await self._go_offline()
                # Leave the broker before the journal's last write: a prompt sent after this
                # waits in our session for the next run, one that came before is journalled.
                background[0].cancel()
                await asyncio.wait([background[0]])
                while self._runs:
                    await asyncio.sleep(0.01)
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
            qos=1,
        )
        # Liveness at QoS 0, as it is sent: our persistent session must not queue stale
        # heartbeats while the hub is away (amqtt delivers at the subscription's QoS), where
        # they would crowd out the prompts the queue is for.
        await conn.subscribe(t.all_nodes(NodeTopic.HEARTBEAT), t.all_nodes(NodeTopic.PROGRESS), qos=0)
        await self._outbox.attach(conn)
        now = asyncio.get_running_loop().time()
        for run in self._runs.values():  # we heard nothing while away: nobody's silence counts
            run.machine.excuse_silence(now)
        # Nodes reappear within moments of a restart (they answer our online status with a
        # heartbeat); until then a prompt waits for them rather than failing at once.
        loop = asyncio.get_running_loop()
        self._settle_until = loop.time() + self.config.settle_s
        loop.call_at(self._settle_until, self._wake_waiters)
        try:
            await self._publish_status()
            if self._resume is not None:
                resume, self._resume = self._resume, None
                self._spawn(self._resume_journal(*resume))
            self.ready.set()
            log.info("hub online", broker=self.url.redacted(), mqtt5=conn.mqtt5, swarm=self.config.swarm)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._status_loop())
                async for message in conn.messages():
                    await self._on_message(message)
        finally:
            self._outbox.detach()

    async def _drain(self) -> None:
        """Stop starting prompts, give in-flight requests a moment, then fail the rest clearly.

        The hub stays subscribed to its prompt topics: leaving them would end them in its
        persistent session, and what clients send while it is down would be lost. Prompts that
        come while it drains are journalled for its next run instead (``_defer``)."""
        self._draining = True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.drain_s
        while self._runs and loop.time() < give_up:
            await asyncio.sleep(0.05)
        for run in list(self._runs.values()):
            run.inbox.put_nowait(_Abort())
        while self._runs:
            await asyncio.sleep(0.01)

    async def _go_offline(self) -> None:
        self._gone_offline = True
        status = HubStatus(hub_id=self.config.hub_id, state="offline", ts=time.time(), version=__version__)
        await self._send(self.topics.hub_status(), status.encode(), retain=True)

    # ------------------------------------------------------------------ messages in

    async def _on_message(self, message: Message) -> None:
        if self.topics.prompt_scope(message.topic) is not None:
            if message.retain:
                # A retained prompt would be re-run on every hub restart; only live ones count.
                # What our persistent session queued while the hub was away is live: brokers
                # deliver it unflagged (the embedded one too: hardened.py fixes amqtt's flag).
                log.warning("ignored retained prompt")
                return
            self._spawn(self._guarded_prompt(message))
            return
        if message.topic in (self.topics.model(), self.topics.bundle()):
            self._on_pin(message)
            return
        if (scope := self.topics.cancel_scope(message.topic)) is not None:
            self._on_client_cancel(message, scope)
            return
        parsed = self.topics.parse_node_topic(message.topic)
        if parsed is None:
            return
        node_id, kind = parsed
        now = time.time()
        try:
            if kind is NodeTopic.HEARTBEAT:
                heartbeat = decode(Heartbeat, message.payload)
                if heartbeat.node_id == node_id and self.registry.on_heartbeat(heartbeat, now=now):
                    self._node_available()
            elif kind is NodeTopic.RESULT:
                self._on_result(node_id, decode(TaskResult, message.payload))
            elif kind is NodeTopic.STREAM:
                self._on_chunk(node_id, decode(NodeChunk, message.payload))
            elif kind is NodeTopic.PROGRESS:
                self._on_progress(node_id, decode(NodeProgress, message.payload))
            elif kind is NodeTopic.ANNOUNCE:
                announce = decode(Announce, message.payload)
                if announce.node_id == node_id:
                    if self.registry.on_announce(announce, live=not message.retain, now=now):
                        self._node_lost(node_id, "re-announced")
                    self._node_available()
            elif kind is NodeTopic.STATUS:
                if not message.payload:
                    return  # a cleared retained status
                status = decode(Status, message.payload)
                if status.node_id == node_id:
                    unavailable = self.registry.on_status(status, live=not message.retain, now=now)
                    # A paused node takes no new work but finishes what it runs: only a node
                    # that went offline loses its attempts.
                    if unavailable and status.state is NodeState.OFFLINE:
                        self._node_lost(node_id, f"went offline ({status.reason or 'no reason given'})")
                    if status.state is NodeState.ONLINE:
                        self._node_available()
                    self._status_changed.set()
        except ProtocolError as exc:
            log.warning("dropped malformed node message", node_id=node_id, topic=message.topic, error=str(exc))

    def _on_pin(self, message: Message) -> None:
        """Remember what is pinned, so the node table can say who lags and why.

        Not verified: nodes check signatures; the hub only reports what it sees retained."""
        signed = pins.unverified_signed(message.payload) or {}
        if message.payload and not signed:
            log.warning("ignored malformed pin", topic=message.topic)
        pinned = self.registry.pins
        if message.topic == self.topics.bundle():
            version = signed.get("version")
            pinned = replace(pinned, bundle=version if isinstance(version, str) else None)
        else:
            name, sha, tags = signed.get("name"), signed.get("sha256"), signed.get("tags")
            pinned = replace(
                pinned,
                model_name=name if isinstance(name, str) else None,
                model_sha256=sha if isinstance(sha, str) else None,
                model_tags=tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else (),
            )
        self.registry.pins = pinned
        self._status_changed.set()

    def _on_client_cancel(self, message: Message, scope: str) -> None:
        try:
            cancel = decode(CancelRequest, message.payload)
        except ProtocolError as exc:
            log.warning("dropped malformed cancel", error=str(exc))
            return
        # Within the sender's scope only: another login cannot cancel this login's requests.
        run = self._runs.get(scoped_key(scope, cancel.id))
        if run is not None:
            log.info("client cancelled the request", request_id=cancel.id, reason=cancel.reason)
            run.inbox.put_nowait(_ClientCancel(cancel.reason))

    def _on_chunk(self, node_id: str, chunk: NodeChunk) -> None:
        run = self.capacity.route(chunk.task_id)
        attempt = run.machine.attempts.get(chunk.task_id) if run is not None else None
        if run is not None and attempt is not None and attempt.node_id == node_id:
            run.inbox.put_nowait(_Chunk(chunk))

    def _on_progress(self, node_id: str, progress: NodeProgress) -> None:
        """A busy node's sign of life. Fed to the machines directly, not through their inboxes:
        it only moves a timestamp, which each run reads when it next wakes (lifecycle.py)."""
        if progress.node_id != node_id:
            return
        now = asyncio.get_running_loop().time()
        for task_id in progress.tasks:
            run = self.capacity.route(task_id)
            attempt = run.machine.attempts.get(task_id) if run is not None else None
            if run is not None and attempt is not None and attempt.node_id == node_id:
                run.machine.on_progress(task_id, now)

    def _on_result(self, node_id: str, result: TaskResult) -> None:
        run = self.capacity.route(result.task_id)
        attempt = run.machine.attempts.get(result.task_id) if run is not None else None
        if run is None or attempt is None or not (result.node_id == node_id == attempt.node_id):
            # Late (its attempt was written off) or not ours: ignore it, cleanly.
            log.debug("ignored result", node_id=node_id, task_id=result.task_id)
            return
        if result.ok:
            problem = answer_problem(run.accepted.request, result)
            if problem is not None:
                # A grammar is not a validator: a wrong answer is a failed attempt, tried again
                # on another node while the budget lasts; the last reason reaches the client.
                log.warning("answer broke the request's schema", node_id=node_id, problem=problem)
                error = ErrorInfo(code=ErrorCode.INVALID_OUTPUT, message=f"node {node_id}: {problem}")
                result = result.model_copy(update={"ok": False, "error": error})
        if not result.ok:
            # At once, so trust moves before a retry picks a node; an answer's receipt waits to
            # know whether it won.
            self._observe(run.settlement.result_failed(result, ts=time.time()))
        run.inbox.put_nowait(result)

    def _observe(self, events: list[accounting.AttemptSettled]) -> None:
        """The one place settled attempts are accounted for: every observer hears of each."""
        for event in events:
            for observer in self.observers:
                observer.attempt_settled(event)

    async def _guarded_prompt(self, message: Message) -> None:
        """A prompt runs in the hub's task group: a bug in handling one must not stop the hub."""
        try:
            await self._on_prompt(message)
        except Exception:
            log.exception("prompt handling failed inside the hub")
            error = ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message="the hub hit an internal error")
            # A failure that gets here came before any reply went out (once a request runs,
            # _serve's own guard answers it), so this is its one reply: to its sender, with its
            # id. Intake is pure, so reading the prompt again tells both; failing that, the
            # sender's scope's default topic.
            scope = self.topics.prompt_scope(message.topic) or SHARED_SCOPE
            reply, request_id, correlation = self.topics.reply(scope), None, message.correlation_data
            try:
                outcome = parse_prompt(message, self.topics, self.config.limits)
                reply, request_id, correlation = outcome.reply_topic, outcome.request_id, outcome.correlation
            except Exception:
                log.exception("intake failed on this prompt")
            try:
                await self._reply(reply, ErrorReply(id=request_id, error=error), correlation)
            except Exception:
                log.exception("could not even report the internal error")

    async def _on_prompt(self, message: Message) -> None:
        outcome = parse_prompt(message, self.topics, self.config.limits)
        if isinstance(outcome, Accepted):
            client = outcome.scope  # the login that sent it
            wait = self.limiter.take(client, asyncio.get_running_loop().time())
            if wait is not None:
                limit = self.config.limits.requests_per_minute
                error = ErrorInfo(
                    code=ErrorCode.RATE_LIMITED,
                    message=f"login {client!r} is over its limit of {limit} requests a minute",
                    retry_after_s=round(wait, 2),
                )
                outcome = Rejected(outcome.request_id, outcome.reply_topic, outcome.correlation, error)
        if isinstance(outcome, Rejected):
            log.info("rejected prompt", code=outcome.error.code.value, request_id=outcome.request_id)
            self._count_failure(outcome.error.code)
            await self._reply(
                outcome.reply_topic, ErrorReply(id=outcome.request_id, error=outcome.error), outcome.correlation
            )
            return
        await self._serve(outcome)

    async def _resume_journal(self, entries: list[Entry], unsent: list[Unsent]) -> None:
        """Finish what a previous run of the hub left: re-send settled replies, re-run the rest."""
        assert self._journal is not None
        for reply in unsent:
            await self._send(reply.reply_topic, reply.reply, correlation=reply.correlation)
            self._journal.sent(reply.request_id)
        for entry in entries:
            # The journal keys a request by its id within its scope (intake.scoped_key).
            scope, request_id = split_key(entry.request_id)
            try:
                request = PromptRequest.model_validate_json(entry.request)
            except ValueError as exc:  # written by us, so only a bug or a damaged file gets here
                log.error("unreadable journal entry", request_id=request_id, error=str(exc))
                request = PromptRequest(id=request_id, prompt="(unreadable)")
                error = ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message="the hub could not resume this request")
                run = self._new_run(Accepted(request, request_id, entry.reply_topic, entry.correlation, scope), entry)
                await self._finish_failed(run, error, ())
                continue
            accepted = Accepted(request, request_id, entry.reply_topic, entry.correlation, scope)
            self._spawn(self._serve(accepted, resumed=entry))

    # ------------------------------------------------------------------ one request

    def _new_run(self, accepted: Accepted, entry: Entry) -> _Run:
        loop = asyncio.get_running_loop()
        req = accepted.request
        machine = RequestMachine(
            request_id=accepted.request_id,
            strategy=req.strategy,
            fanout=req.fanout,
            # Wall clock here: the deadline may have been set by a previous run of the hub.
            deadline=loop.time() + (entry.deadline_at - time.time()),
            retries=self.config.retries,
            stream=req.stream,
        )
        return _Run(
            accepted,
            entry.digest,
            machine,
            started=loop.time(),
            stream=ClientStream(accepted.request_id, on=req.stream),
            messages=req.chat() if req.kind == "chat" else [],
        )

    async def _serve(self, accepted: Accepted, *, resumed: Entry | None = None) -> None:
        assert self._journal is not None
        req, rid = accepted.request, accepted.request_id
        with structlog.contextvars.bound_contextvars(request_id=rid):
            if resumed is None:
                body = canonical(req)  # serialised once: hashed for retries, and journalled
                request_digest = digest(body)
                if await self._answer_retry(accepted, request_digest):
                    return
                refusal = self._refuse(accepted)
                if refusal is not None:
                    self._count_failure(refusal.code)
                    log.info("refused request", code=refusal.code.value)
                    await self._reply(accepted.reply_topic, ErrorReply(id=rid, error=refusal), accepted.correlation)
                    return
                now = time.time()
                entry = Entry(
                    request_id=accepted.key,
                    digest=request_digest,
                    request=body,
                    reply_topic=accepted.reply_topic,
                    correlation=accepted.correlation,
                    accepted_at=now,
                    deadline_at=now + (req.timeout_s or self.config.default_timeout_s),
                )
            else:
                entry = resumed
            run = self._new_run(accepted, entry)
            self._runs[accepted.key] = run
            try:
                if resumed is None and self._draining:
                    await self._defer(run, entry)
                    return
                if resumed is None and req.private:
                    log.info("accepted private request", strategy=req.strategy, fanout=req.fanout)
                elif resumed is None:
                    await self._journal.accept(entry)  # before any node hears of it
                    log.info("accepted request", strategy=req.strategy, fanout=req.fanout, tags=list(req.all_tags()))
                else:
                    log.info("resumed request", strategy=req.strategy, fanout=req.fanout)
                    if req.stream:
                        # What the previous run streamed is unknown: start over, numbered past
                        # anything it can have sent, so readers drop it rather than splice.
                        run.stream.resume(int(time.time() * 1000))
                if self._context is not None and self._context.wanted(req):
                    run.messages = await self._context.add(run.messages, private=req.private)
                await self._drive(run)
            except Exception:
                # One request's bug must not take the hub down; its client still gets a reply.
                log.exception("request failed inside the hub")
                if not run.machine.finished:
                    await self._finish_failed(
                        run, ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message="the hub hit an internal error"), ()
                    )
            finally:
                for task_id in self.capacity.held(run):
                    self._release(run, task_id)
                for task_id in run.machine.attempts:  # quiet ones kept their route until now
                    self.capacity.forget(task_id)
                self._waiting.pop(run, None)
                self._runs.pop(accepted.key, None)

    async def _defer(self, run: _Run, entry: Entry) -> None:
        """A prompt that came while the hub stops: journalled, and answered by its next run (as
        it answers what a crash left). A private one may not touch the disk: it is refused."""
        assert self._journal is not None
        if run.accepted.request.private:
            error = ErrorInfo(
                code=ErrorCode.HUB_STOPPING, message="the hub is shutting down; send it again", retry_after_s=5.0
            )
            await self._finish_failed(run, error, ())
            return
        await self._journal.accept(entry)
        log.info("deferred to the hub's next run")

    async def _answer_retry(self, accepted: Accepted, request_digest: str) -> bool:
        """A request id seen before: the same reply again, or nothing while it is in flight."""
        assert self._journal is not None
        rid = accepted.request_id
        # By id within the sender's scope: another login's request with the same id is another
        # request, so nobody can take an id first, or fetch someone else's stored reply by it.
        run = self._runs.get(accepted.key)
        known = run.digest if run is not None else self._journal.settled_ids.get(accepted.key)
        if known is None:
            return False
        if known != request_digest:
            self._count_failure(ErrorCode.INVALID_REQUEST)
            error = ErrorInfo(
                code=ErrorCode.INVALID_REQUEST,
                message=f"request id {rid!r} was already used for a different request; use a fresh id",
            )
            await self._reply(accepted.reply_topic, ErrorReply(id=rid, error=error), accepted.correlation)
            return True
        if run is not None:
            log.info("retry of a request in flight; its reply is on the way")
            return True
        stored = await self._journal.stored_reply(accepted.key)
        if stored is None:
            return False  # pruned meanwhile: serve it afresh
        log.info("retry of a settled request; sending its reply again")
        await self._send(accepted.reply_topic, stored, correlation=accepted.correlation)
        return True

    def _refuse(self, accepted: Accepted) -> ErrorInfo | None:
        req = accepted.request
        limits = self.config.limits
        if len(self._runs) >= limits.max_inflight or len(self._waiting) >= limits.max_queued:
            return ErrorInfo(
                code=ErrorCode.HUB_BUSY,
                message=(
                    f"the hub is full ({len(self._runs)} requests in flight, {len(self._waiting)} waiting for a node);"
                    " send it again later with the same id"
                ),
                retry_after_s=2.0,
            )
        if req.model is not None and req.model not in self.registry.known_models():
            known = ", ".join(sorted(self.registry.known_models())) or "none yet"
            return ErrorInfo(
                code=ErrorCode.UNKNOWN_MODEL, message=f"no node has announced model {req.model!r} (known: {known})"
            )
        return None

    async def _drive(self, run: _Run) -> None:
        loop = asyncio.get_running_loop()
        machine = run.machine
        actions: list[Action] = machine.begin(loop.time())
        while True:
            while actions:
                actions = await self._carry_out(run, actions)
            # The one place attempts stop counting against their node: whatever the machine
            # settled (answered, failed, lost, timed out, cancelled) frees that capacity.
            self._release_settled(run)
            if machine.finished:
                return
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands
                # as the awaited thing completes, and the loop would never stop.
                async with asyncio.timeout(max(0.0, machine.next_wakeup() - loop.time())):
                    event = await run.inbox.get()
            except TimeoutError:
                if self._conn is None:
                    machine.excuse_silence(loop.time())  # deaf ourselves: nobody's silence counts
                actions = machine.on_tick(loop.time())
                continue
            now = loop.time()
            if isinstance(event, TaskResult):
                actions = machine.on_result(event, now)
            elif isinstance(event, _NodeLost):
                actions = machine.on_node_lost(event.node_id, event.reason, now)
            elif isinstance(event, _Chunk):
                actions = await self._forward_chunk(run, event.chunk)
            elif isinstance(event, _ClientCancel):
                actions = machine.on_cancel(f"cancelled by the client: {event.reason}", now)
            elif isinstance(event, _Wake):
                # Stay in line (self._waiting) until the dispatch gets a node, so order holds.
                pending, run.pending = run.pending, None
                actions = [pending] if pending is not None and not machine.finished else []
            else:
                actions = []
                await self._finish_failed(
                    run,
                    ErrorInfo(
                        code=ErrorCode.HUB_STOPPING,
                        message="the hub is shutting down; send it again",
                        retry_after_s=5.0,
                    ),
                    (),
                )
                for attempt in machine.active():
                    await self._cancel(Cancel(attempt.task_id, attempt.node_id, "hub stopping"))
                return

    async def _carry_out(self, run: _Run, actions: list[Action]) -> list[Action]:
        """Perform actions; return any follow-up actions the machine produced meanwhile."""
        follow_up: list[Action] = []
        for action in actions:
            if isinstance(action, Dispatch):
                follow_up += await self._dispatch(run, action)
            elif isinstance(action, Cancel):
                await self._cancel(action)
            elif isinstance(action, Quiet):
                self._node_quiet(action.node_id)
            elif isinstance(action, Succeed):
                await self._finish_answered(run, action)
            elif isinstance(action, Fail):
                await self._finish_failed(run, action.error, action.losers)
        return follow_up

    async def _dispatch(self, run: _Run, action: Dispatch) -> list[Action]:
        """Carry out the placement's decision (``placement.py``) for ``action``."""
        req = run.accepted.request
        loop = asyncio.get_running_loop()
        decision = self.placement.place(
            req,
            action.count,
            action.exclude,
            trusted=self._trusted_nodes() if req.private else frozenset(),
            now=time.time(),
            settling=loop.time() < self._settle_until,
        )
        if isinstance(decision, Wait):
            # In line behind those already waiting, for capacity or the deadline.
            run.pending = action
            self._waiting.setdefault(run, None)
            return []
        self._waiting.pop(run, None)
        if isinstance(decision, Shortfall):
            return run.machine.shortfall(decision.missing, decision.error, loop.time())
        for node in decision.nodes:
            task_id = uuid.uuid4().hex
            terms = self.placement.terms(node, req, run.machine.deadline - loop.time())
            max_tokens, timeout = terms.max_tokens, terms.timeout_s
            run.machine.assigned(
                task_id=task_id,
                node_id=node.node_id,
                deadline=loop.time() + timeout,
                quiet_s=terms.quiet_s,
                now=loop.time(),
            )
            self.capacity.assign(run, task_id, node)
            task = Task(
                task_id=task_id,
                request_id=run.machine.request_id,
                messages=run.messages,
                # No max_tokens: until the model stops or its context ends, within the hub's
                # cap (which the hub's status shows); the node clamps to its own cap as well.
                params=(
                    req.params
                    if max_tokens == req.params.max_tokens
                    else req.params.model_copy(update={"max_tokens": max_tokens})
                ),
                timeout_s=round(timeout, 3),
                model=req.model,
                kind=req.kind,
                input=req.input,
                prompt=req.prompt if req.kind == "complete" else None,
                # best_of_n ranks whole answers: its nodes have nothing to stream to anyone
                stream=req.stream and req.strategy == "race",
                response_format=req.response_format,
                tools=req.tools,
                tool_choice=req.tool_choice,
            )
            log.info("dispatched", node_id=node.node_id, task_id=task_id, timeout_s=round(timeout, 1))
            # Fields at their defaults stay off the wire: a node still on an older bundle (which
            # refuses unknown fields) can take a plain chat task while the fleet updates.
            payload = task.model_dump_json(exclude_defaults=True).encode()
            await self._send(self.topics.node_task(node.node_id), payload)
        if decision.short is not None:
            return run.machine.shortfall(decision.short.missing, decision.short.error, loop.time())
        return []

    def _trusted_nodes(self) -> frozenset[str]:
        """Nodes the owner trusts with private requests, re-read when the enrolment file changes."""
        path = self.config.nodes_file
        try:
            mtime = path.stat().st_mtime_ns if path is not None else None
        except FileNotFoundError:
            mtime = None
        if mtime != self._trusted_mtime:
            try:
                found = SwarmHome(path.parent).enrolments() if path is not None and mtime is not None else {}
            except ConfigError as exc:  # caught mid-edit by hand: keep what we knew, try again next time
                log.warning("cannot read the enrolments; trusted nodes unchanged", error=str(exc))
                return self._trusted
            self._trusted_mtime = mtime
            self._trusted = frozenset(e.node_id for e in found.values() if e.trusted)
        return self._trusted

    async def _cancel(self, action: Cancel) -> None:
        cancel = CancelMessage(task_id=action.task_id, reason=action.reason)
        await self._send(self.topics.node_cancel(action.node_id), cancel.encode())

    async def _finish_answered(self, run: _Run, action: Succeed) -> None:
        req = run.accepted.request
        answers = list(action.answers)
        candidates: list[Candidate] = []
        if req.strategy == "best_of_n":
            prompt = "\n".join(m.content for m in req.chat())
            scores = self.reranker.score(prompt, [rerank.Candidate(a.text, a.finish_reason) for a in answers])
            ranked = sorted(zip(scores, range(len(answers)), answers, strict=True), key=lambda s: (-s[0], s[1]))
            answers = [a for _, _, a in ranked]
            candidates = [
                Candidate(
                    node_id=a.node_id,
                    text=a.text,
                    score=s,
                    finish_reason=a.finish_reason,
                    usage=a.usage,
                    timings=a.timings,
                )
                for s, _, a in ranked
            ]
        winner = answers[0]
        self._observe(run.settlement.request_answered(answers, action.losers, ts=time.time()))
        loop = asyncio.get_running_loop()
        answer = Answer(
            id=run.machine.request_id,
            text=winner.text,
            node_id=winner.node_id,
            model=winner.model or "",
            finish_reason=winner.finish_reason,
            usage=winner.usage,
            timings=winner.timings,
            latency_ms=round((loop.time() - run.started) * 1000, 2),
            strategy=req.strategy,
            attempts=len(run.machine.attempts),
            candidates=candidates,
            tool_calls=winner.tool_calls,
            embeddings=winner.embeddings,
        )
        await self._end_stream(run, winner=winner)
        for observer in self.observers:
            observer.request_answered(loop.time(), answer.latency_ms)
        log.info("answered", node_id=winner.node_id, latency_ms=answer.latency_ms, attempts=answer.attempts)
        await self._settle(run, answer)

    async def _finish_failed(self, run: _Run, error: ErrorInfo, losers: tuple[str, ...]) -> None:
        self._observe(run.settlement.request_failed(losers, ts=time.time()))
        self._count_failure(error.code)
        log.info("request failed", code=error.code.value, reason=error.message)
        await self._end_stream(run, error=error)
        await self._settle(run, ErrorReply(id=run.machine.request_id, error=error))

    async def _settle(self, run: _Run, reply: Answer | ErrorReply) -> None:
        """The request's one reply: journalled first, so a crash re-sends it rather than redoing it."""
        assert self._journal is not None
        payload = reply.encode()
        key = run.accepted.key
        if run.accepted.request.private:
            # Nothing of a private request touches the disk: a retry runs it again.
            await self._send(run.accepted.reply_topic, payload, correlation=run.accepted.correlation)
            return
        try:
            await self._journal.settle(key, run.digest, payload, time.time())
        except Exception as exc:
            log.error("could not journal the reply; sending it anyway", error=str(exc))
        await self._send(run.accepted.reply_topic, payload, correlation=run.accepted.correlation)
        self._journal.sent(key)

    # ------------------------------------------------------------------ streaming

    async def _forward_chunk(self, run: _Run, chunk: NodeChunk) -> list[Action]:
        """Pass a node's piece on to the client when its attempt leads the stream."""
        if not run.stream.received(chunk):
            return []
        forward, actions = run.machine.on_chunk(chunk.task_id, asyncio.get_running_loop().time())
        if forward:
            node_id = run.machine.attempts[chunk.task_id].node_id
            await self._stream_out(run, [run.stream.forward(chunk, node_id)])
        return actions

    async def _end_stream(self, run: _Run, *, winner: TaskResult | None = None, error: ErrorInfo | None = None) -> None:
        """Close a streamed request's stream so its pieces add up to the answer (``streams.py``)."""
        await self._stream_out(run, run.stream.end(winner=winner, error=error))

    async def _stream_out(self, run: _Run, messages: list[StreamMessage]) -> None:
        topic = self.topics.stream(run.accepted.reply_topic, run.machine.request_id)
        for message in messages:
            await self._send(topic, message.encode())

    def _release(self, run: _Run, task_id: str) -> None:
        """The hub no longer counts this attempt against its node's capacity."""
        attempt = run.machine.attempts.get(task_id)
        # A quiet attempt's answer still counts: it keeps its route.
        quiet = attempt is not None and attempt.state is AttemptState.QUIET
        if self.capacity.release(task_id, keep_route=quiet):
            self._wake_waiters()

    def _release_settled(self, run: _Run) -> None:
        for task_id in self.capacity.held(run):
            attempt = run.machine.attempts.get(task_id)
            if attempt is not None and attempt.state is not AttemptState.ASSIGNED:
                self._release(run, task_id)

    # ------------------------------------------------------------------ node presence

    def _node_lost(self, node_id: str, reason: str) -> None:
        log.warning("node lost", node_id=node_id, reason=reason)
        self._status_changed.set()
        for run in list(self._runs.values()):
            # Quiet attempts too: their node is now gone for good, so stop waiting for them.
            if any(a.node_id == node_id for a in [*run.machine.active(), *run.machine.quiet()]):
                self.trust.failed(node_id, ErrorCode.NODE_LOST.value)  # it dropped work it had taken
                run.inbox.put_nowait(_NodeLost(node_id, reason))

    def _node_quiet(self, node_id: str) -> None:
        """An attempt of this node went quiet: no new work for it until its next heartbeat, so a
        frozen phone does not cost every new request the quiet window too."""
        rec = self.registry.nodes.get(node_id)
        if rec is not None and not rec.quiet:
            log.warning("node went quiet; no new work until it is heard from", node_id=node_id)
            rec.quiet = True
            self._status_changed.set()

    def _node_available(self) -> None:
        self._status_changed.set()
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        # Oldest first: asyncio resumes them in this order, so the longest-waiting gets a slot.
        for run in self._waiting:
            if run.pending is not None:
                run.inbox.put_nowait(_Wake())

    async def _liveness_loop(self) -> None:
        interval = max(0.1, min(1.0, self.config.heartbeat_timeout_s / 10))
        while True:
            raise_if_cancelled()
            await asyncio.sleep(interval)
            now = time.time()
            for node_id in self.registry.expire(now):
                self._node_lost(node_id, f"silent for over {self.config.heartbeat_timeout_s:.0f} s")
            if self._ledger is not None:  # the uptime credit: online and not paused
                for rec in self.registry.nodes.values():
                    if rec.available(now, self.config.heartbeat_timeout_s):
                        self._ledger.credit_uptime(rec.node_id, interval)
                        self.accounts.setdefault(rec.node_id, credits.Contribution(rec.node_id)).uptime_s += interval

    # ------------------------------------------------------------------ messages out

    def _spawn(self, coro: object) -> None:
        assert self._tg is not None
        self._tg.create_task(coro)  # type: ignore[arg-type]

    async def _reply(self, topic: str, reply: Answer | ErrorReply, correlation: bytes | None) -> None:
        await self._send(topic, reply.encode(), correlation=correlation)

    async def _send(
        self, topic: str, payload: bytes, *, retain: bool = False, correlation: bytes | None = None
    ) -> None:
        """Publish now, or keep the message for the next connection: nothing is dropped."""
        await self._outbox.send(topic, payload, retain=retain, correlation=correlation)

    def status(self) -> HubStatus:
        counts = self.registry.counts(time.time())
        return HubStatus(
            hub_id=self.config.hub_id,
            state="online",
            ts=time.time(),
            version=__version__,
            nodes_online=counts["online"],
            nodes_paused=counts["paused"],
            nodes_offline=counts["offline"],
            inflight=len(self._runs),
            queued=len(self._waiting),
            answered=self.answered,
            failed=self.failed,
            cancelled=self.cancelled,
            started_at=self.started_at,
            max_tokens=self.config.limits.max_tokens,
        )

    async def _publish_status(self) -> None:
        if self._gone_offline:
            # The status loop runs until the session is cancelled, after the offline status: an
            # "online" retained after it would show a stopped hub as up to every client.
            return
        await self._send(self.topics.hub_status(), self.status().encode(), retain=True)
        await self._send(self.topics.hub_nodes(), self.registry.table(time.time()).encode(), retain=True)

    async def _status_loop(self) -> None:
        while True:
            raise_if_cancelled()
            try:
                async with asyncio.timeout(self.config.status_interval_s):  # not wait_for: see _drive
                    await self._status_changed.wait()
            except TimeoutError:
                pass
            self._status_changed.clear()
            await self._publish_status()
            await asyncio.sleep(0.5)  # at most two status publishes a second, however busy

    def _count_failure(self, code: ErrorCode) -> None:
        at = asyncio.get_running_loop().time()
        for observer in self.observers:
            observer.request_failed(at, code)

    async def _metrics_loop(self) -> None:
        interval = self.config.metrics_interval_s
        if interval <= 0:
            return
        while True:
            raise_if_cancelled()
            await asyncio.sleep(interval)
            if self._conn is not None:  # live readings only: nothing is queued for later
                await self._publish_metrics(self._conn)

    async def _publish_metrics(self, conn: Link) -> None:
        now, mono = time.time(), asyncio.get_running_loop().time()
        t = self.topics
        hub = self.window.hub_metrics(mono, self.registry, inflight=len(self._runs), queued=len(self._waiting))
        nodes = {
            rec.node_id: metrics.node_metrics(rec, now, self.config.heartbeat_timeout_s)
            for rec in metrics.reported(self.registry, now)
        }
        batch: list[tuple[str, bytes]] = [(t.metrics_hub(), hub.encode())]
        batch += [(t.metrics_node(node_id), m.encode()) for node_id, m in nodes.items()]
        batch += [(t.metrics_fan_in(name), json.dumps(v).encode()) for name, v in metrics.fan_in(nodes).items()]
        batch.append((t.metrics_fan_in("errors"), json.dumps(self.window.errors_by_code(mono)).encode()))
        for tag, rates in metrics.win_rates(self.winrates, nodes, now).items():
            batch.append((t.metrics_win_rate(tag), json.dumps(rates).encode()))
        if self.accounts:  # the ledger's totals, one key per node
            for name, values in metrics.ledger_totals(self.accounts, self.rates).items():
                batch.append((t.metrics_fan_in(name), json.dumps(values).encode()))
        try:
            for topic, payload in batch:
                await conn.publish(topic, payload, qos=0)
        except ConnectionLost:
            pass  # the next tick publishes fresh ones

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
            self.limiter.forget_idle(asyncio.get_running_loop().time())
