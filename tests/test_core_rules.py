"""The hub's protocol rules, called directly: no broker, no asyncio, no clock but the ``now``
passed in (as h11 tests its ``_state.py``).

* ``streams.py``: what a streaming client is sent, and that it adds up to the answer.
"""

from __future__ import annotations

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import (
    ErrorInfo,
    FunctionCall,
    FunctionDelta,
    NodeChunk,
    StreamChunk,
    StreamEnd,
    TaskResult,
    ToolCall,
    ToolCallDelta,
)
from nova_swarm.hub.lifecycle import Cancel, RequestMachine
from nova_swarm.hub.streams import ClientStream, StreamMessage

# ---------------------------------------------------------------- streams


def piece(task: str, seq: int, text: str = "", calls: list[ToolCallDelta] | None = None) -> NodeChunk:
    return NodeChunk(task_id=task, seq=seq, text=text, tool_calls=calls)


def answer(task: str, node: str, text: str, calls: list[ToolCall] | None = None) -> TaskResult:
    return TaskResult(
        task_id=task,
        request_id="r",
        node_id=node,
        ok=True,
        text=text,
        model="m",
        finish_reason="stop",
        tool_calls=calls,
    )


def read(messages: list[StreamMessage]) -> tuple[str, list[int]]:
    """What a client makes of the stream: the text (a ``restart`` drops what came before), and
    the ``seq`` of each message."""
    text = ""
    for m in messages:
        if isinstance(m, StreamChunk):
            text = m.text if m.restart else text + m.text
    return text, [m.seq for m in messages]


def test_a_stream_numbers_every_message_and_its_end_adds_the_rest() -> None:
    s = ClientStream("r", on=True)
    sent: list[StreamMessage] = []
    for p in (piece("t1", 0, "Hel"), piece("t1", 1, "lo")):
        assert s.received(p)
        sent.append(s.forward(p, "a"))
    # "lo" is delivered twice (QoS 1), then a piece is lost on the way (seq 2 never comes)
    assert not s.received(piece("t1", 1, "lo"))
    assert s.received(piece("t1", 3, "!"))  # a gap is taken: the end fills what is missing
    sent.append(s.forward(piece("t1", 3, "!"), "a"))
    assert read(sent) == ("Hello!", [0, 1, 2])
    end = s.end(winner=answer("t1", "a", "Hello, world"))
    # "Hello!" is not a prefix of the answer: the whole answer again, as a restart
    assert [type(m) for m in end] == [StreamChunk, StreamEnd]
    assert read(sent + end) == ("Hello, world", [0, 1, 2, 3, 4])
    assert isinstance(end[-1], StreamEnd) and end[-1].ok and end[-1].finish_reason == "stop"


def test_the_end_sends_only_what_the_client_lacks() -> None:
    s = ClientStream("r", on=True)
    sent = [s.forward(piece("t1", 0, "The answer"), "a")]
    end = s.end(winner=answer("t1", "a", "The answer is 42"))
    assert isinstance(end[0], StreamChunk) and end[0].text == " is 42" and not end[0].restart
    assert read(sent + end) == ("The answer is 42", [0, 1, 2])
    # all of it streamed already: just the end
    s = ClientStream("r", on=True)
    s.forward(piece("t1", 0, "done"), "a")
    assert [type(m) for m in s.end(winner=answer("t1", "a", "done"))] == [StreamEnd]


def test_a_new_leader_restarts_the_stream_and_the_end_follows_it() -> None:
    m = RequestMachine(request_id="r", strategy="race", fanout=2, deadline=100.0, stream=True)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    m.assigned(task_id="t2", node_id="b", deadline=50)
    s = ClientStream("r", on=True)
    sent: list[StreamMessage] = []

    def arrive(p: NodeChunk, node: str) -> list[object]:
        if not s.received(p):
            return []
        forward, actions = m.on_chunk(p.task_id, 1)
        if forward:
            sent.append(s.forward(p, node))
        return list(actions)

    assert arrive(piece("t1", 0, "one"), "a") == [Cancel("t2", "b", "another node streamed first")]
    m.on_result(TaskResult(task_id="t1", request_id="r", node_id="a", ok=False, error=err()), 2)
    m.assigned(task_id="t3", node_id="c", deadline=50)  # the machine's re-dispatch, placed
    arrive(piece("t3", 0, "two"), "c")
    assert isinstance(sent[-1], StreamChunk) and sent[-1].restart and sent[-1].node_id == "c"
    arrive(piece("t3", 1, " three"), "c")
    end = s.end(winner=answer("t3", "c", "two three"))
    assert read(sent + end) == ("two three", [0, 1, 2, 3])


def err() -> ErrorInfo:
    return ErrorInfo(code=ErrorCode.ENGINE_ERROR, message="boom")


def test_an_answer_the_client_never_saw_comes_whole_with_its_tool_calls() -> None:
    call = ToolCall(id="c1", function=FunctionCall(name="weather", arguments='{"city": "Paris"}'))
    # best_of_n streams nothing until the ranking: the winner comes in one piece
    s = ClientStream("r", on=True)
    end = s.end(winner=answer("t2", "b", "", [call]))
    assert isinstance(end[0], StreamChunk) and not end[0].restart
    assert end[0].tool_calls == [
        ToolCallDelta(
            index=0, id="c1", type="function", function=FunctionDelta(name="weather", arguments='{"city": "Paris"}')
        )
    ]
    # the client read a loser's text: the winner's answer replaces it
    s = ClientStream("r", on=True)
    s.forward(piece("t1", 0, "loser"), "a")
    end = s.end(winner=answer("t2", "b", "winner"))
    assert isinstance(end[0], StreamChunk) and end[0].restart and end[0].node_id == "b"
    # the text streamed but the calls did not: whole again, so the calls arrive
    s = ClientStream("r", on=True)
    s.forward(piece("t1", 0, "Let me look"), "a")
    end = s.end(winner=answer("t1", "a", "Let me look", [call]))
    assert isinstance(end[0], StreamChunk) and end[0].restart and end[0].tool_calls


def test_a_failed_stream_ends_with_its_error_and_an_unstreamed_request_sends_nothing() -> None:
    s = ClientStream("r", on=True)
    s.forward(piece("t1", 0, "half"), "a")
    [end] = s.end(error=err())
    assert isinstance(end, StreamEnd) and not end.ok and end.error == err() and end.seq == 1
    assert ClientStream("r", on=False).end(winner=answer("t1", "a", "x")) == []
    assert ClientStream("r", on=False).end(error=err()) == []


def test_a_resumed_stream_starts_past_the_old_one_and_says_restart() -> None:
    s = ClientStream("r", on=True)
    s.resume(first_seq=1_000)
    first = s.forward(piece("t9", 0, "again"), "a")
    assert first.seq == 1_000 and first.restart
    s = ClientStream("r", on=True)
    s.resume(first_seq=5_000)
    end = s.end(winner=answer("t9", "a", "whole"))
    assert isinstance(end[0], StreamChunk) and end[0].restart and [m.seq for m in end] == [5_000, 5_001]


def test_pieces_are_deduplicated_per_attempt() -> None:
    s = ClientStream("r", on=True)
    assert s.received(piece("t1", 0)) and s.received(piece("t2", 0))  # each attempt counts its own
    assert not s.received(piece("t1", 0)) and not s.received(piece("t2", 0))
    assert s.received(piece("t1", 1)) and not s.received(piece("t1", 1))
