"""Every prompt the hub takes, from intake to the start of its run.

What comes in for requests arrives here from the hub's message loop: prompts (checked, rate
limited, refused when the hub is full, answered again when their id was seen before, and
journalled before any node hears of them), the results and stream pieces nodes send, and the
cancels clients send. Each accepted prompt then gets a ``Run``, driven by the ``Runner``
(``runs.py``) to its one reply: an answer or an error, on its reply topic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import structlog

from nova_swarm.broker.contract.errors import ErrorCode, ProtocolError
from nova_swarm.broker.contract.messages import (
    Answer,
    CancelRequest,
    ErrorInfo,
    ErrorReply,
    NodeChunk,
    NodeProgress,
    PromptRequest,
    RouteTable,
    TaskResult,
    decode,
)
from nova_swarm.broker.contract.topics import SHARED_SCOPE
from nova_swarm.broker.link.base import Message

from .context import Context
from .intake import Accepted, Rejected, parse_prompt, scoped_key, split_key
from .journal import Entry, Unsent, canonical, digest
from .lifecycle import RequestMachine
from .ratelimit import RateLimiter
from .registry import NodeRecord
from .runs import Abort, Chunk, ClientCancel, NodeLost, Run, Runner, Wiring, stopping
from .schemas import answer_problem
from .streams import ClientStream

log = structlog.get_logger("nova_swarm.hub")


class Requests:
    """The requests in flight, and those waiting for a node, oldest first."""

    def __init__(
        self,
        wiring: Wiring,
        *,
        context: Context | None,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        """``context``: the hub's retrieval, if on; ``spawn`` runs a coroutine in the hub's task
        group."""
        self.config, self.topics, self.journal = wiring.config, wiring.topics, wiring.journal
        self.outbox, self.registry, self.observers = wiring.outbox, wiring.registry, wiring.observers
        self.context = context
        self._spawn = spawn
        self.runner = Runner(wiring)
        self.runs: dict[str, Run] = {}
        #: experts by tag (the retained ``RouteTable`` the hub follows), or None
        self.routes: RouteTable | None = None
        self.limiter = RateLimiter(per_minute=self.config.limits.requests_per_minute)
        #: stopping: new prompts are journalled for the next run, not started (``_defer``)
        self.draining = False

    # ------------------------------------------------------------------ from the hub

    def on_prompt(self, message: Message) -> None:
        self._spawn(self._guarded_prompt(message))

    def on_cancel(self, message: Message, scope: str) -> None:
        try:
            cancel = decode(CancelRequest, message.payload)
        except ProtocolError as exc:
            log.warning("dropped malformed cancel", error=str(exc))
            return
        # Within the sender's scope only: another login cannot cancel this login's requests.
        run = self.runs.get(scoped_key(scope, cancel.id))
        if run is not None:
            log.info("client cancelled the request", request_id=cancel.id, reason=cancel.reason)
            run.inbox.put_nowait(ClientCancel(cancel.reason))

    def on_chunk(self, node_id: str, chunk: NodeChunk) -> None:
        run = self._run_of(chunk.task_id, node_id)
        if run is not None:
            run.inbox.put_nowait(Chunk(chunk))

    def on_progress(self, node_id: str, progress: NodeProgress) -> None:
        """A busy node's sign of life. Fed to the machines directly, not through their inboxes:
        it only moves a timestamp, which each run reads when it next wakes (lifecycle.py)."""
        if progress.node_id != node_id:
            return
        now = asyncio.get_running_loop().time()
        for task_id in progress.tasks:
            run = self._run_of(task_id, node_id)
            if run is not None:
                run.machine.on_progress(task_id, now)

    def on_result(self, node_id: str, result: TaskResult) -> None:
        run = self._run_of(result.task_id, node_id) if result.node_id == node_id else None
        if run is None:
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
            self.observers.tell(run.settlement.result_failed(result, ts=time.time()))
        run.inbox.put_nowait(result)

    def _run_of(self, task_id: str, node_id: str) -> Run | None:
        """The run whose attempt ``task_id`` is, when that attempt is ``node_id``'s."""
        run = self.runner.capacity.route(task_id)
        attempt = run.machine.attempts.get(task_id) if run is not None else None
        return run if attempt is not None and attempt.node_id == node_id else None

    def node_lost(self, node_id: str, reason: str) -> None:
        for run in list(self.runs.values()):
            # Quiet attempts too: their node is now gone for good, so stop waiting for them.
            if any(a.node_id == node_id for a in [*run.machine.active(), *run.machine.quiet()]):
                self.observers.tell(run.settlement.node_lost(node_id, ts=time.time()))
                run.inbox.put_nowait(NodeLost(node_id, reason))

    @property
    def waiting(self) -> dict[Run, None]:
        """Runs waiting for a free node, oldest first."""
        return self.runner.waiting

    def wake(self, node: NodeRecord) -> None:
        """``node`` may take work now (it came online, or back): its free places go to the
        oldest waiting runs it can serve."""
        self.runner.wake(node)

    def reconnected(self, now: float) -> None:
        """The hub is back on the broker: we heard nothing while away, so nobody's silence
        counts, and nodes get ``config.settle_s`` to reappear before a prompt gives up on them."""
        for run in self.runs.values():
            run.machine.excuse_silence(now)
        self.runner.settle(now + self.config.settle_s)

    async def drain(self) -> None:
        """Stop starting prompts, give in-flight requests ``config.drain_s``, then fail the rest
        clearly. Prompts that come meanwhile are journalled for the hub's next run (``_defer``)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.drain_s
        while self.runs and loop.time() < give_up:
            await asyncio.sleep(0.05)
        for run in list(self.runs.values()):
            run.inbox.put_nowait(Abort())
        await self.finished()

    async def finished(self) -> None:
        while self.runs:
            await asyncio.sleep(0.01)

    async def resume(self, entries: list[Entry], unsent: list[Unsent]) -> None:
        """Finish what a previous run of the hub left: re-send settled replies, re-run the rest."""
        for reply in unsent:
            await self.outbox.send(reply.reply_topic, reply.reply, correlation=reply.correlation)
            self.journal.sent(reply.request_id)
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
                await self.runner.finish_failed(run, error, ())
                continue
            accepted = Accepted(request, request_id, entry.reply_topic, entry.correlation, scope)
            self._spawn(self._serve(accepted, resumed=entry))

    # ------------------------------------------------------------------ intake

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
            self.runner.count_failure(outcome.error.code)
            await self._reply(
                outcome.reply_topic, ErrorReply(id=outcome.request_id, error=outcome.error), outcome.correlation
            )
            return
        await self._serve(outcome)

    def _new_run(self, accepted: Accepted, entry: Entry) -> Run:
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
        return Run(
            accepted,
            entry.digest,
            machine,
            started=loop.time(),
            stream=ClientStream(accepted.request_id, on=req.stream),
            messages=req.chat() if req.kind == "chat" else [],
        )

    async def _serve(self, accepted: Accepted, *, resumed: Entry | None = None) -> None:
        req, rid = accepted.request, accepted.request_id
        with structlog.contextvars.bound_contextvars(request_id=rid):
            if resumed is None:
                body = canonical(req)  # serialised once: hashed for retries, and journalled
                request_digest = digest(body)
                if await self._answer_retry(accepted, request_digest):
                    return
                # After the digest: a retry by id compares what the client sent, not the route.
                accepted = self._routed(accepted)
                refusal = self._refuse(accepted)
                if refusal is not None:
                    self.runner.count_failure(refusal.code)
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
                accepted = self._routed(accepted)
            run = self._new_run(accepted, entry)
            self.runs[accepted.key] = run
            try:
                if resumed is None and self.draining:
                    await self._defer(run, entry)
                    return
                if resumed is None and req.private:
                    log.debug("accepted private request", strategy=req.strategy, fanout=req.fanout)
                elif resumed is None:
                    await self.journal.accept(entry)  # before any node hears of it
                    log.debug("accepted request", strategy=req.strategy, fanout=req.fanout, tags=list(req.all_tags()))
                else:
                    log.debug("resumed request", strategy=req.strategy, fanout=req.fanout)
                    if req.stream:
                        # What the previous run streamed is unknown: start over, numbered past
                        # anything it can have sent, so readers drop it rather than splice.
                        run.stream.resume(int(time.time() * 1000))
                if self.context is not None and self.context.wanted(req):
                    run.messages = await self.context.add(run.messages, private=req.private)
                await self.runner.drive(run)
            except Exception:
                # One request's bug must not take the hub down; its client still gets a reply.
                log.exception("request failed inside the hub")
                if not run.machine.finished:
                    await self.runner.finish_failed(
                        run, ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message="the hub hit an internal error"), ()
                    )
            finally:
                self.runner.done(run)
                self.runs.pop(accepted.key, None)

    async def _defer(self, run: Run, entry: Entry) -> None:
        """A prompt that came while the hub stops: journalled, and answered by its next run (as
        it answers what a crash left). A private one may not touch the disk: it is refused."""
        if run.accepted.request.private:
            await self.runner.finish_failed(run, stopping(), ())
            return
        await self.journal.accept(entry)
        log.info("deferred to the hub's next run")

    async def _answer_retry(self, accepted: Accepted, request_digest: str) -> bool:
        """A request id seen before: the same reply again, or nothing while it is in flight."""
        rid = accepted.request_id
        # By id within the sender's scope: another login's request with the same id is another
        # request, so nobody can take an id first, or fetch someone else's stored reply by it.
        run = self.runs.get(accepted.key)
        known = run.digest if run is not None else self.journal.settled_ids.get(accepted.key)
        if known is None:
            return False
        if known != request_digest:
            self.runner.count_failure(ErrorCode.INVALID_REQUEST)
            error = ErrorInfo(
                code=ErrorCode.INVALID_REQUEST,
                message=f"request id {rid!r} was already used for a different request; use a fresh id",
            )
            await self._reply(accepted.reply_topic, ErrorReply(id=rid, error=error), accepted.correlation)
            return True
        if run is not None:
            log.info("retry of a request in flight; its reply is on the way")
            return True
        stored = await self.journal.stored_reply(accepted.key)
        if stored is None:
            return False  # pruned meanwhile: serve it afresh
        log.info("retry of a settled request; sending its reply again")
        await self.outbox.send(accepted.reply_topic, stored, correlation=accepted.correlation)
        return True

    def _routed(self, accepted: Accepted) -> Accepted:
        """A request that names no model takes the one its first routed tag names."""
        req = accepted.request
        named = req.model is not None or req.models is not None or req.diverse  # it chose its models itself
        model = self.routes.model_for(req.all_tags()) if self.routes is not None and not named else None
        if model is None:
            return accepted
        log.debug("routed by tag", model=model)
        return replace(accepted, request=req.model_copy(update={"model": model}))

    def _refuse(self, accepted: Accepted) -> ErrorInfo | None:
        req = accepted.request
        limits = self.config.limits
        if len(self.runs) >= limits.max_inflight or len(self.waiting) >= limits.max_queued:
            return ErrorInfo(
                code=ErrorCode.HUB_BUSY,
                message=(
                    f"the hub is full ({len(self.runs)} requests in flight, {len(self.waiting)} waiting for a node);"
                    " send it again later with the same id"
                ),
                retry_after_s=2.0,
            )
        named = [req.model] if req.model is not None else req.models or []
        known = self.registry.known_models() if named else set()
        for model in named:
            if model not in known:
                listed = ", ".join(sorted(known)) or "none yet"
                return ErrorInfo(
                    code=ErrorCode.UNKNOWN_MODEL, message=f"no node has announced model {model!r} (known: {listed})"
                )
            if (why := self.registry.too_large(model)) is not None:
                return ErrorInfo(code=ErrorCode.MODEL_TOO_LARGE, message=why)
        return None

    async def _reply(self, topic: str, reply: Answer | ErrorReply, correlation: bytes | None) -> None:
        await self.outbox.send(topic, reply.encode(), correlation=correlation)
