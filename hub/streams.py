"""A request's stream as its client reads it, with no I/O (no MQTT, no asyncio).

The hub feeds a ``ClientStream`` what happened (a node's piece arrived, the request settled)
and publishes the ``StreamChunk`` and ``StreamEnd`` messages it returns, in order. Which
attempt leads a streamed race is the request machine's call (``lifecycle.py``,
``RequestMachine.on_chunk``); this module only numbers and shapes what the client sees.

The rules:

* ``seq`` counts up from 0 across every message of the stream, the end included.
* A node's pieces carry their own ``seq`` per attempt; one already seen is dropped (QoS 1 may
  deliver twice). A gap (a piece lost on the way) is not filled here: the end fills it.
* The client reads one attempt's pieces at a time (``streamed_from``). When another attempt
  takes over (the leader failed), its first piece says ``restart``: drop what came before.
* The end makes the pieces add up to the winner's answer: the rest of its text when the client
  has a prefix of it, or the whole answer (a ``restart``) when the client read another attempt,
  a text the answer does not continue, or no tool calls of an answer that has some. Then the
  ``StreamEnd``, with usage, timings and the finish reason, or the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

from nova_swarm.broker.contract.messages import (
    ErrorInfo,
    FunctionDelta,
    NodeChunk,
    StreamChunk,
    StreamEnd,
    TaskResult,
    ToolCall,
    ToolCallDelta,
)

StreamMessage: TypeAlias = StreamChunk | StreamEnd
_M = TypeVar("_M", StreamChunk, StreamEnd)


@dataclass(slots=True)
class ClientStream:
    """The stream of request ``request_id``; ``on`` is False when its client did not ask to
    stream, and then it sends nothing."""

    request_id: str
    on: bool
    #: the ``seq`` of the next message to the client
    seq: int = 0
    #: the attempt whose pieces the client has: None before any, "" when unknown (resumed)
    streamed_from: str | None = None
    #: that attempt's text sent so far, and whether any of its tool calls went out
    streamed: list[str] = field(default_factory=list)
    streamed_calls: bool = False
    #: per attempt, the next piece ``seq`` expected from its node
    node_seq: dict[str, int] = field(default_factory=dict)

    def resume(self, first_seq: int) -> None:
        """A hub restart picked the request up: what the previous run streamed is unknown, so the
        stream starts over at ``first_seq``, past anything that run can have sent, and readers
        drop the old pieces rather than splice."""
        self.seq, self.streamed_from = first_seq, ""

    def received(self, chunk: NodeChunk) -> bool:
        """Whether ``chunk`` is news: False for one delivered twice."""
        if chunk.seq < self.node_seq.get(chunk.task_id, 0):
            return False
        self.node_seq[chunk.task_id] = chunk.seq + 1
        return True

    def forward(self, chunk: NodeChunk, node_id: str) -> StreamChunk:
        """The client's next message for a piece of the leading attempt (on node ``node_id``)."""
        restart = self.streamed_from not in (None, chunk.task_id)
        if self.streamed_from != chunk.task_id:
            self.streamed_from, self.streamed, self.streamed_calls = chunk.task_id, [], False
        self.streamed.append(chunk.text)
        self.streamed_calls |= bool(chunk.tool_calls)
        return self._next(
            StreamChunk(
                id=self.request_id,
                seq=self.seq,
                node_id=node_id,
                text=chunk.text,
                tool_calls=chunk.tool_calls,
                restart=restart,
            )
        )

    def end(self, *, winner: TaskResult | None = None, error: ErrorInfo | None = None) -> list[StreamMessage]:
        """The stream's last messages: what makes it add up to ``winner``'s answer, then its end;
        or the end with ``error`` when the request failed."""
        if not self.on:
            return []
        rid = self.request_id
        if winner is None:
            return [self._next(StreamEnd(id=rid, seq=self.seq, ok=False, error=error))]
        out: list[StreamMessage] = []
        sent = "".join(self.streamed) if self.streamed_from == winner.task_id else None
        calls_missing = bool(winner.tool_calls) and not (sent is not None and self.streamed_calls)
        if sent is None or calls_missing or not winner.text.startswith(sent):
            if winner.text or winner.tool_calls:
                whole = StreamChunk(
                    id=rid,
                    seq=self.seq,
                    node_id=winner.node_id,
                    text=winner.text,
                    tool_calls=as_deltas(winner.tool_calls),
                    restart=self.streamed_from is not None,
                )
                out.append(self._next(whole))
        elif len(winner.text) > len(sent):
            rest = winner.text[len(sent) :]
            out.append(self._next(StreamChunk(id=rid, seq=self.seq, node_id=winner.node_id, text=rest)))
        end = StreamEnd(
            id=rid,
            seq=self.seq,
            ok=True,
            node_id=winner.node_id,
            model=winner.model,
            finish_reason=winner.finish_reason,
            usage=winner.usage,
            timings=winner.timings,
        )
        out.append(self._next(end))
        return out

    def _next(self, message: _M) -> _M:
        self.seq = message.seq + 1
        return message


def as_deltas(calls: list[ToolCall] | None) -> list[ToolCallDelta] | None:
    """Whole tool calls as the stream's deltas: one piece each, with everything in it."""
    if not calls:
        return None
    return [
        ToolCallDelta(
            index=i,
            id=c.id,
            type="function",
            function=FunctionDelta(name=c.function.name, arguments=c.function.arguments),
        )
        for i, c in enumerate(calls)
    ]
