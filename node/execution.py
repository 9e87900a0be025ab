"""One task on the engine: from a ``Job`` the node accepted to the ``TaskResult`` it sends.

The agent (``agent.py``) decides which task runs when; this module runs it: the engine call in a
worker thread (llama-cpp blocks), tool calling and answer schemas through ``tools.py``, the
stream of pieces to the hub while it generates, and a result for every way it can end. The
engine is a boundary: whatever it raises becomes an ``engine_error`` result, never a dead node.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import structlog

from nova_swarm.broker.contract.errors import ConnectionLost, EngineError, ErrorCode
from nova_swarm.broker.contract.messages import (
    ErrorInfo,
    NodeChunk,
    Task,
    TaskResult,
    Timings,
    ToolCallDelta,
    Usage,
)

from . import tools
from .config import NodeConfig
from .engine import Engine, Generation, Sampling

log = structlog.get_logger("nova_swarm.node")

PROFILE_PROMPT = [{"role": "user", "content": "Count from one to twenty."}]

#: publishes a stream chunk now, or raises ConnectionLost (chunks are never held for later)
PublishNow = Callable[[bytes], Awaitable[None]]


@dataclass(eq=False)
class Job:
    """A task the node accepted, with the sampling it clamped and its own clock's deadline."""

    task: Task
    sampling: Sampling
    received: float
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: ErrorCode = ErrorCode.CANCELLED


def sampling_for(task: Task, config: NodeConfig) -> Sampling:
    """The sampling a task asked for, within the node's limits (its length and temperature caps)."""
    p = task.params
    return Sampling(
        max_tokens=min(p.max_tokens or config.default_max_tokens or config.max_tokens, config.max_tokens),
        temperature=min(config.default_temperature if p.temperature is None else p.temperature, config.max_temperature),
        top_p=p.top_p,
        seed=p.seed,
        stop=tuple(p.stop or ()),
        top_k=p.top_k,
        min_p=p.min_p,
        repeat_penalty=p.repeat_penalty,
        typical_p=p.typical_p,
    )


async def profile(engine: Engine, tokens: int) -> float:
    """Tokens a second of a short greedy generation: at start-up, so the hub can tell fast nodes
    from slow ones before they have answered anything (0.0 when it measured nothing)."""
    sampling = Sampling(max_tokens=tokens, temperature=0.0, seed=0)
    gen = await asyncio.to_thread(engine.generate, PROFILE_PROMPT, sampling, lambda: False)
    return gen.completion_tokens / gen.generate_s if gen.completion_tokens and gen.generate_s > 0 else 0.0


def failure(job: Job, node_id: str, model: str, code: ErrorCode, message: str) -> TaskResult:
    """The result of a task that did not produce an answer (refused, cancelled, failed)."""
    return TaskResult(
        task_id=job.task.task_id,
        request_id=job.task.request_id,
        node_id=node_id,
        ok=False,
        model=model,
        error=ErrorInfo(code=code, message=message),
    )


class Executor:
    """Runs tasks on an engine and counts what was served (the heartbeat reports the counts)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.tokens_served = 0
        self.tasks_done = 0
        self.tasks_failed = 0
        #: tokens a second of the last generation; None until one ran
        self.recent_tokens_per_s: float | None = None

    async def run(self, job: Job, engine: Engine, *, chunks_to: PublishNow) -> TaskResult:
        """``chunks_to`` takes a streamed task's pieces as they come."""
        task = job.task
        with structlog.contextvars.bound_contextvars(request_id=task.request_id, task_id=task.task_id):
            started = time.monotonic()
            if started > job.deadline:
                return self._failure(job, engine, ErrorCode.DEADLINE_EXCEEDED, "task expired while queued on the node")

            def should_stop() -> bool:
                return job.cancel.is_set() or time.monotonic() > job.deadline

            if task.kind == "embed":
                return await self._embed(job, engine, started)
            schema = task.response_format.answer_schema() if task.response_format else None
            if task.kind == "complete":
                # Raw text: no template and no tools, so nothing to decode but the text itself.
                decoder = tools.Decoder()
                prompt = task.prompt or ""  # the Task model guarantees one for this kind

                def run(on_text: Callable[[str], None] | None) -> Generation:
                    return engine.complete(prompt, job.sampling, should_stop, schema=schema, on_text=on_text)

            else:
                plan = tools.plan(
                    [m.engine_dict() for m in task.messages],
                    tools=task.tools,
                    tool_choice=task.tool_choice,
                    response_schema=schema,
                )
                decoder = plan.decoder()

                def run(on_text: Callable[[str], None] | None) -> Generation:
                    return engine.generate(
                        plan.messages, job.sampling, should_stop, schema=plan.schema, on_text=on_text
                    )

            async with ChunkSender(task.task_id, chunks_to if task.stream else None) as chunks:
                try:
                    gen = await asyncio.to_thread(run, chunks.from_thread(decoder) if task.stream else None)
                except Exception as exc:  # the engine boundary: a crash must become a reply, not a dead node
                    return self._engine_failed(job, engine, exc, "engine")
                if gen.stopped:
                    if job.cancel.is_set():
                        return self._failure(job, engine, job.cancel_reason, "generation stopped before it finished")
                    return self._failure(
                        job, engine, ErrorCode.DEADLINE_EXCEEDED, "generation ran past the task's deadline"
                    )
                outcome = decoder.finish(gen.text, finish_reason=gen.finish_reason)
                # What the decoder held back (text that might have begun a tool call) goes out
                # before the result, so the stream adds up to the answer.
                chunks.push(outcome.tail_text, outcome.tail_calls)
            self.tokens_served += gen.completion_tokens
            self.tasks_done += 1
            if gen.completion_tokens and gen.generate_s > 0:
                self.recent_tokens_per_s = gen.completion_tokens / gen.generate_s
            log.info("answered", tokens=gen.completion_tokens, ms=round(gen.generate_s * 1000, 1))
            return self._success(job, engine, gen, outcome, queue_s=started - job.received)

    async def _embed(self, job: Job, engine: Engine, started: float) -> TaskResult:
        task = job.task
        try:
            embedding = await asyncio.to_thread(engine.embed, task.input or [])
        except Exception as exc:  # the engine boundary, as in run
            return self._engine_failed(job, engine, exc, "embedding")
        self.tasks_done += 1
        return TaskResult(
            task_id=task.task_id,
            request_id=task.request_id,
            node_id=self.node_id,
            ok=True,
            model=engine.info.name,
            finish_reason="stop",
            embeddings=embedding.vectors,
            usage=Usage(
                prompt_tokens=embedding.prompt_tokens, completion_tokens=0, total_tokens=embedding.prompt_tokens
            ),
            timings=Timings(queue_ms=(started - job.received) * 1000, generate_ms=embedding.embed_s * 1000),
        )

    def _engine_failed(self, job: Job, engine: Engine, exc: Exception, what: str) -> TaskResult:
        """The engine raised: its own ``EngineError`` is reported as it is, anything else as a crash."""
        self.tasks_failed += 1
        if isinstance(exc, EngineError):
            log.error(f"{what} failed", error=exc.message)
            return self._failure(job, engine, ErrorCode.ENGINE_ERROR, exc.message)
        log.exception(f"{what} crashed")
        return self._failure(job, engine, ErrorCode.ENGINE_ERROR, f"engine crashed: {type(exc).__name__}: {exc}")

    def _failure(self, job: Job, engine: Engine, code: ErrorCode, message: str) -> TaskResult:
        return failure(job, self.node_id, engine.info.name, code, message)

    def _success(
        self, job: Job, engine: Engine, gen: Generation, outcome: tools.Outcome, *, queue_s: float
    ) -> TaskResult:
        return TaskResult(
            task_id=job.task.task_id,
            request_id=job.task.request_id,
            node_id=self.node_id,
            ok=True,
            text=outcome.content,
            tool_calls=outcome.tool_calls or None,
            model=engine.info.name,
            finish_reason=outcome.finish_reason,
            usage=Usage(
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                total_tokens=gen.prompt_tokens + gen.completion_tokens,
            ),
            timings=Timings(
                queue_ms=queue_s * 1000,
                ttft_ms=gen.ttft_s * 1000 if gen.ttft_s is not None else None,
                generate_ms=gen.generate_s * 1000,
                tokens_per_s=gen.completion_tokens / gen.generate_s if gen.generate_s > 0 else None,
            ),
        )


class ChunkSender:
    """Publishes a streamed task's pieces as they come; use it as an async context manager.

    The engine produces text in its worker thread; pieces are handed to the loop and sent in
    order, each publish carrying whatever piled up meanwhile, so a slow broker costs fewer,
    bigger chunks rather than a growing backlog. Chunks are not kept while the broker is away:
    the result carries the whole answer, and the hub makes the stream whole from it. Leaving the
    block sends what is pending; with no ``publish`` (a task not streamed) it sends nothing."""

    def __init__(self, task_id: str, publish: PublishNow | None) -> None:
        self._task_id = task_id
        self._publish = publish
        self._loop = asyncio.get_running_loop()
        self._text: list[str] = []
        self._calls: list[ToolCallDelta] = []
        self._more = asyncio.Event()
        self._closing = False
        self._seq = 0
        self._group = asyncio.TaskGroup()

    async def __aenter__(self) -> ChunkSender:
        await self._group.__aenter__()
        if self._publish is not None:
            self._group.create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        self._more.set()
        await self._group.__aexit__(exc_type, exc, tb)
        await self._flush()  # a last push after the sender saw the close

    def from_thread(self, decoder: tools.Decoder) -> Callable[[str], None]:
        """``on_text`` for the engine: decode in the engine's thread, send from the loop."""

        def on_text(piece: str) -> None:
            text, calls = decoder.feed(piece)
            if text or calls:
                self._loop.call_soon_threadsafe(self.push, text, calls)

        return on_text

    def push(self, text: str, calls: list[ToolCallDelta]) -> None:
        if text or calls:
            self._text.append(text)
            self._calls.extend(calls)
            self._more.set()

    async def _run(self) -> None:
        while True:
            await self._more.wait()
            self._more.clear()
            await self._flush()
            if self._closing and not self._text and not self._calls:
                return

    async def _flush(self) -> None:
        """Send what piled up as one chunk, if anything did."""
        if self._publish is None or (not self._text and not self._calls):
            return
        text, self._text = "".join(self._text), []
        calls, self._calls = tools.merge_deltas(self._calls), []
        chunk = NodeChunk(task_id=self._task_id, seq=self._seq, text=text, tool_calls=calls or None)
        self._seq += 1
        try:
            await self._publish(chunk.encode())
        except ConnectionLost:
            log.debug("stream chunk dropped: no broker; the result carries it")
