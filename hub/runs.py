"""One request's run: the coroutine that drives its ``RequestMachine`` to its one reply.

The machine (``lifecycle.py``) decides; the ``Runner`` does what it decides. It asks the
placement for nodes (``placement.py``) and holds their capacity (``capacity.py``), sends tasks
and cancels, forwards a streamed answer's pieces (``streams.py``), tells the observers what
settled (``accounting.py``), and journals and sends the reply. What happens to a request
arrives in its run's inbox as an ``Event``: from the hub's message loop (results, pieces,
cancels, via ``requests.py``), from node presence (a node lost), or from capacity coming back
(a wake).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import structlog

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode
from nova_swarm.broker.contract.messages import (
    Answer,
    Candidate,
    ChatMessage,
    ErrorInfo,
    ErrorReply,
    NodeChunk,
    PromptRequest,
    Task,
    TaskResult,
)
from nova_swarm.broker.contract.messages import Cancel as CancelMessage
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import SwarmHome
from nova_swarm.broker.link.outbox import Outbox

from . import accounting, rerank
from .capacity import Capacity
from .config import HubConfig
from .intake import Accepted
from .journal import JournalWriter
from .lifecycle import Action, AttemptState, Cancel, Dispatch, Fail, Quiet, RequestMachine, Succeed
from .placement import Placement, Shortfall, Wait
from .registry import NodeRecord, Registry
from .streams import ClientStream, StreamMessage

log = structlog.get_logger("nova_swarm.hub")


@dataclass(frozen=True, slots=True)
class NodeLost:
    node_id: str
    reason: str


class Wake:
    """Capacity may have freed up: retry a waiting dispatch."""


class Abort:
    """The hub is stopping."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a streamed answer, from a node."""

    chunk: NodeChunk


@dataclass(frozen=True, slots=True)
class ClientCancel:
    reason: str


Event: TypeAlias = TaskResult | NodeLost | Wake | Abort | Chunk | ClientCancel


@dataclass(eq=False)
class Run:
    """One accepted request while the hub works on it."""

    accepted: Accepted
    digest: str
    machine: RequestMachine
    started: float
    #: what the client reads when it streams (``streams.py``)
    stream: ClientStream
    inbox: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    pending: Dispatch | None = None
    #: its attempts as they settle, for the hub's observers (receipts, win rates, energy)
    settlement: accounting.Settlement = field(init=False)
    #: what the nodes are given: the request's chat, with retrieved context when that is on
    messages: list[ChatMessage] = field(default_factory=list)
    #: the model each attempt was sent to (when the request or its route names one)
    attempt_models: dict[str, str] = field(default_factory=dict)
    #: across models: those no node can take for this request (they had a shortfall)
    unplaceable: set[str] = field(default_factory=set)
    #: a shortfall held back while other attempts wait for a node (``Runner._dispatch``)
    short: Shortfall | None = None
    #: a wake is on its way to it: a place freed up that it may take (``Runner.wake``)
    woken: bool = False

    def __post_init__(self) -> None:
        self.settlement = accounting.Settlement(accounting.Asked.of(self.accepted.request, self.digest))


def stopping() -> ErrorInfo:
    return ErrorInfo(code=ErrorCode.HUB_STOPPING, message="the hub is shutting down; send it again", retry_after_s=5.0)


@dataclass(frozen=True, slots=True)
class Wiring:
    """The hub's parts that requests and their runs use, made once by the hub."""

    config: HubConfig
    topics: Topics
    journal: JournalWriter
    outbox: Outbox
    registry: Registry
    placement: Placement
    observers: accounting.Observers
    reranker: rerank.Reranker
    #: says the hub's status (its node table, its counts) has news to publish
    changed: Callable[[], None]


class Runner:
    """Drives runs, and keeps what they share: node capacity, the line of runs waiting for a
    node, and the window after a (re)connect in which nodes are still reappearing."""

    def __init__(self, wiring: Wiring) -> None:
        self.config, self.topics, self.journal = wiring.config, wiring.topics, wiring.journal
        self.outbox, self.registry, self.placement = wiring.outbox, wiring.registry, wiring.placement
        self.observers, self.reranker, self._changed = wiring.observers, wiring.reranker, wiring.changed
        #: which attempts hold a place on which node, and which run each task id belongs to
        self.capacity: Capacity[Run] = Capacity()
        #: runs waiting for a free node, oldest first (a dict keeps insertion order)
        self.waiting: dict[Run, None] = {}
        #: until then (loop clock) nodes are still reappearing after a (re)connect: wait for them
        self.settle_until = 0.0
        self._trusted: frozenset[str] = frozenset()
        self._trusted_mtime: int | None = None

    def wake(self, node: NodeRecord | None = None) -> None:
        """Capacity came back. On ``node``: each of its free places goes to the oldest waiting
        run it can serve, one place a run. With no node (nodes are reappearing after a
        reconnect): every waiting run tries its dispatch again.

        Waking only as many runs as there are places keeps a finished task from costing every
        waiting request a try at placement: with W waiting, that was W tries per answer, each
        weighing every node, and throughput fell as nodes were added (issue 17)."""
        places = node.capacity - node.inflight if node is not None else len(self.waiting)
        if places <= 0:
            return
        now = time.time()
        # Oldest first: asyncio resumes them in this order, so the longest-waiting gets a slot.
        for run in self.waiting:
            if run.pending is None or run.woken:
                continue
            if node is not None:
                req = run.accepted.request
                trusted = self._trusted_nodes() if req.private else frozenset()
                if not self.placement.could_take(node, req, run.pending.exclude, now, trusted=trusted):
                    continue
            run.woken = True
            run.inbox.put_nowait(Wake())
            places -= 1
            if places == 0:
                return

    def settle(self, until: float) -> None:
        """Until ``until`` (loop clock), a dispatch with too few nodes waits rather than fails."""
        self.settle_until = until
        asyncio.get_running_loop().call_at(until, self.wake)

    def done(self, run: Run) -> None:
        """``run`` is over: everything it held goes back."""
        for task_id in self.capacity.held(run):
            self._release(run, task_id)
        for task_id in run.machine.attempts:  # quiet ones kept their route until now
            self.capacity.forget(task_id)
        self.waiting.pop(run, None)

    def count_failure(self, code: ErrorCode) -> None:
        self.observers.request_failed(asyncio.get_running_loop().time(), code)

    async def drive(self, run: Run) -> None:
        loop = asyncio.get_running_loop()
        machine = run.machine
        actions: list[Action] = machine.begin(loop.time())
        while True:
            # The one place attempts stop counting against their node: whatever the machine
            # settled (answered, failed, lost, timed out, cancelled) frees that capacity, and
            # before the reply is journalled and sent, so the node gets its next task at once.
            self._release_settled(run)
            while actions:
                actions = await self._carry_out(run, actions)
                self._release_settled(run)
            if machine.finished:
                return
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands
                # as the awaited thing completes, and the loop would never stop.
                async with asyncio.timeout(max(0.0, machine.next_wakeup() - loop.time())):
                    event = await run.inbox.get()
            except TimeoutError:
                if self.outbox.link is None:
                    machine.excuse_silence(loop.time())  # deaf ourselves: nobody's silence counts
                actions = machine.on_tick(loop.time())
                continue
            now = loop.time()
            if isinstance(event, TaskResult):
                actions = machine.on_result(event, now)
            elif isinstance(event, NodeLost):
                actions = machine.on_node_lost(event.node_id, event.reason, now)
            elif isinstance(event, Chunk):
                actions = await self._forward_chunk(run, event.chunk)
            elif isinstance(event, ClientCancel):
                actions = machine.on_cancel(f"cancelled by the client: {event.reason}", now)
            elif isinstance(event, Wake):
                # Stay in line (self.waiting) until the dispatch gets a node, so order holds.
                run.woken = False
                pending, run.pending = run.pending, None
                actions = [pending] if pending is not None and not machine.finished else []
            else:
                await self.finish_failed(run, stopping(), ())
                for attempt in machine.active():
                    await self._cancel(Cancel(attempt.task_id, attempt.node_id, "hub stopping"))
                return

    async def _carry_out(self, run: Run, actions: list[Action]) -> list[Action]:
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
                await self.finish_failed(run, action.error, action.losers)
        return follow_up

    async def _dispatch(self, run: Run, action: Dispatch) -> list[Action]:
        """Carry out the placement's decisions (``placement.py``) for ``action``: one for the
        whole count, or, across models (``models``, ``diverse``), one per model."""
        req = run.accepted.request
        loop = asyncio.get_running_loop()
        trusted = self._trusted_nodes() if req.private else frozenset()
        exclude, placed, waiting, short = action.exclude, [], 0, run.short
        for model, count in self._models_for(run, action.count):
            asked = req if model == req.model else req.model_copy(update={"model": model})
            decision = self.placement.place(
                asked, count, exclude, trusted=trusted, now=time.time(), settling=loop.time() < self.settle_until
            )
            if isinstance(decision, Wait):
                waiting += count
                continue
            if isinstance(decision, Shortfall):
                short = Shortfall((short.missing if short else 0) + decision.missing, decision.error)
                if model is not None and model != req.model:
                    run.unplaceable.add(model)  # across models: the next attempts go to the others
                continue
            placed += [(node, asked) for node in decision.nodes]
            exclude |= {node.node_id for node in decision.nodes}
            if decision.short is not None:
                short = Shortfall((short.missing if short else 0) + decision.short.missing, decision.short.error)
        if waiting:
            # In line behind those already waiting, for capacity or the deadline.
            run.pending = Dispatch(waiting, exclude)
            self.waiting.setdefault(run, None)
        else:
            self.waiting.pop(run, None)
        for node, asked in placed:
            await self._send_task(run, node, asked)
        if short is not None and waiting:
            # Across models, some attempts wait for a node while others have none: the machine
            # hears of the shortfall once those are placed, so it does not settle for fewer first.
            run.short = short
            return []
        run.short = None
        if short is not None:
            return run.machine.shortfall(short.missing, short.error, loop.time())
        return []

    def _models_for(self, run: Run, count: int) -> list[tuple[str | None, int]]:
        """Which models ``count`` more attempts go to, and how many each: the request's model
        for all of them, or, across models, those with the fewest attempts so far, in turn."""
        req = run.accepted.request
        pool = req.models or (self.registry.servable(time.time()) if req.diverse else None)
        pool = [m for m in pool or () if m not in run.unplaceable]
        if not pool:
            return [(req.model, count)]
        tried = Counter(run.attempt_models.values())
        out: Counter[str] = Counter()
        for _ in range(count):
            model = min(pool, key=lambda m: (tried[m] + out[m], pool.index(m)))
            out[model] += 1
        return list(out.items())

    async def _send_task(self, run: Run, node: NodeRecord, req: PromptRequest) -> None:
        loop = asyncio.get_running_loop()
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
        if req.model is not None:
            run.attempt_models[task_id] = req.model
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
        log.debug("dispatched", node_id=node.node_id, task_id=task_id, model=req.model, timeout_s=round(timeout, 1))
        # Fields at their defaults stay off the wire: a node still on an older bundle (which
        # refuses unknown fields) can take a plain chat task while the fleet updates.
        payload = task.model_dump_json(exclude_defaults=True).encode()
        await self.outbox.send(self.topics.node_task(node.node_id), payload)

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
        await self.outbox.send(self.topics.node_cancel(action.node_id), cancel.encode())

    def _node_quiet(self, node_id: str) -> None:
        """An attempt of this node went quiet: no new work for it until its next heartbeat, so a
        frozen phone does not cost every new request the quiet window too."""
        rec = self.registry.nodes.get(node_id)
        if rec is not None and not rec.quiet:
            log.warning("node went quiet; no new work until it is heard from", node_id=node_id)
            rec.quiet = True
            self._changed()

    # ------------------------------------------------------------------ its end

    async def _finish_answered(self, run: Run, action: Succeed) -> None:
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
                    model=a.model,
                    text=a.text,
                    score=s,
                    finish_reason=a.finish_reason,
                    usage=a.usage,
                    timings=a.timings,
                )
                for s, _, a in ranked
            ]
        winner = answers[0]
        self.observers.tell(run.settlement.request_answered(answers, action.losers, ts=time.time()))
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
        self.observers.request_answered(loop.time(), answer.latency_ms)
        log.debug("answered", node_id=winner.node_id, latency_ms=answer.latency_ms, attempts=answer.attempts)
        await self._settle(run, answer)

    async def finish_failed(self, run: Run, error: ErrorInfo, losers: tuple[str, ...]) -> None:
        self.observers.tell(run.settlement.request_failed(losers, ts=time.time()))
        self.count_failure(error.code)
        log.debug("request failed", code=error.code.value, reason=error.message)
        await self._end_stream(run, error=error)
        await self._settle(run, ErrorReply(id=run.machine.request_id, error=error))

    async def _settle(self, run: Run, reply: Answer | ErrorReply) -> None:
        """The request's one reply: journalled first, so a crash re-sends it rather than redoing it."""
        payload = reply.encode()
        key = run.accepted.key
        if run.accepted.request.private:
            # Nothing of a private request touches the disk: a retry runs it again.
            await self.outbox.send(run.accepted.reply_topic, payload, correlation=run.accepted.correlation)
            return
        try:
            await self.journal.settle(key, run.digest, payload, time.time())
        except Exception as exc:
            log.error("could not journal the reply; sending it anyway", error=str(exc))
        await self.outbox.send(run.accepted.reply_topic, payload, correlation=run.accepted.correlation)
        self.journal.sent(key)

    # ------------------------------------------------------------------ streaming

    async def _forward_chunk(self, run: Run, chunk: NodeChunk) -> list[Action]:
        """Pass a node's piece on to the client when its attempt leads the stream."""
        if not run.stream.received(chunk):
            return []
        forward, actions = run.machine.on_chunk(chunk.task_id, asyncio.get_running_loop().time())
        if forward:
            node_id = run.machine.attempts[chunk.task_id].node_id
            await self._stream_out(run, [run.stream.forward(chunk, node_id)])
        return actions

    async def _end_stream(self, run: Run, *, winner: TaskResult | None = None, error: ErrorInfo | None = None) -> None:
        """Close a streamed request's stream so its pieces add up to the answer (``streams.py``)."""
        await self._stream_out(run, run.stream.end(winner=winner, error=error))

    async def _stream_out(self, run: Run, messages: list[StreamMessage]) -> None:
        topic = self.topics.stream(run.accepted.reply_topic, run.machine.request_id)
        for message in messages:
            await self.outbox.send(topic, message.encode())

    # ------------------------------------------------------------------ capacity

    def _release(self, run: Run, task_id: str) -> None:
        """The hub no longer counts this attempt against its node's capacity."""
        attempt = run.machine.attempts.get(task_id)
        # A quiet attempt's answer still counts: it keeps its route.
        quiet = attempt is not None and attempt.state is AttemptState.QUIET
        node = self.capacity.release(task_id, keep_route=quiet)
        if node is not None:
            self.registry.vacated(node)
            self.wake(node)

    def _release_settled(self, run: Run) -> None:
        for task_id in self.capacity.held(run):
            attempt = run.machine.attempts.get(task_id)
            if attempt is not None and attempt.state is not AttemptState.ASSIGNED:
                self._release(run, task_id)
