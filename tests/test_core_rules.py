"""The hub's protocol rules, called directly: no broker, no asyncio, no clock but the ``now``
passed in (as h11 tests its ``_state.py``).

* ``streams.py``: what a streaming client is sent, and that it adds up to the answer;
* ``placement.py``: which nodes a request goes to, and on what terms;
* ``capacity.py``: which attempts hold a place on a node, released exactly once.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ErrorCode, ProtocolError
from nova_swarm.broker.contract.messages import (
    Announce,
    ErrorInfo,
    FunctionCall,
    FunctionDelta,
    Heartbeat,
    ModelInfo,
    NodeChunk,
    NodeState,
    PromptRequest,
    Status,
    StreamChunk,
    StreamEnd,
    TaskResult,
    ToolCall,
    ToolCallDelta,
)
from nova_swarm.broker.contract.topics import NodeTopic
from nova_swarm.hub.capacity import Capacity
from nova_swarm.hub.config import HubConfig
from nova_swarm.hub.lifecycle import Cancel, RequestMachine
from nova_swarm.hub.placement import Assign, Placement, Shortfall, Terms, Wait, needs
from nova_swarm.hub.registry import FREE_SAMPLE, SCAN_ALL, Heard, NodeRecord, Pins, Registry
from nova_swarm.hub.scheduler import Scheduler
from nova_swarm.hub.streams import ClientStream, StreamMessage
from nova_swarm.hub.trust import Trust
from nova_swarm.hub.winrate import WinRates

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


# ---------------------------------------------------------------- presence


def beat(node_id: str, **kw: object) -> bytes:
    fields = {"battery_pct": None, "charging": None, "temp_c": None, "ram_free_mb": None, "load": None}
    return Heartbeat.model_validate(
        {"node_id": node_id, "ts": 0.0, "tokens_per_s": None, "busy": 0, "slots": 1, "queued": 0}
        | {"tokens_served": 0, "tasks_done": 0, "tasks_failed": 0}
        | fields
        | kw
    ).encode()


def test_what_a_node_s_messages_mean_for_the_hub() -> None:
    registry = Registry(heartbeat_timeout_s=30.0)
    hear = registry.hear
    # A retained announce is remembered, but the node is not live until it speaks.
    assert hear("a", NodeTopic.ANNOUNCE, announce("a").encode(), retain=True, now=1.0) == Heard(
        available=True, changed=True
    )
    assert not registry.nodes["a"].available(1.0, 30.0)
    online = Status(node_id="a", state=NodeState.ONLINE).encode()
    assert hear("a", NodeTopic.STATUS, online, retain=False, now=2.0) == Heard(available=True, changed=True)
    assert registry.nodes["a"].available(2.0, 30.0)
    assert hear("a", NodeTopic.HEARTBEAT, beat("a"), retain=False, now=3.0) == Heard()  # nothing new
    # Silent too long, then heard again: back, and waiting requests may use it.
    assert registry.expire(40.0) == ["a"]
    assert hear("a", NodeTopic.HEARTBEAT, beat("a"), retain=False, now=41.0) == Heard(available=True, changed=True)
    # A live re-announce keeps an available node's work (it says what it serves, again).
    assert hear("a", NodeTopic.ANNOUNCE, announce("a").encode(), retain=False, now=42.0) == Heard(
        available=True, changed=True
    )
    # Paused: no new work, nothing lost; offline: its work is lost, with its reason.
    paused = Status(node_id="a", state=NodeState.PAUSED, reason="hot").encode()
    assert hear("a", NodeTopic.STATUS, paused, retain=False, now=43.0) == Heard(changed=True)
    hear("a", NodeTopic.STATUS, online, retain=False, now=44.0)
    gone = Status(node_id="a", state=NodeState.OFFLINE, reason="shutdown").encode()
    assert hear("a", NodeTopic.STATUS, gone, retain=False, now=45.0) == Heard(
        lost="went offline (shutdown)", changed=True
    )
    # A message naming another node than its topic's, and a cleared status, change nothing.
    assert hear("b", NodeTopic.HEARTBEAT, beat("a"), retain=False, now=8.0) == Heard()
    assert hear("b", NodeTopic.ANNOUNCE, announce("a").encode(), retain=False, now=8.0) == Heard()
    assert hear("a", NodeTopic.STATUS, b"", retain=True, now=8.0) == Heard()
    assert "b" not in registry.nodes
    with pytest.raises(ProtocolError):
        hear("a", NodeTopic.HEARTBEAT, b"{not json", retain=False, now=9.0)


def test_retained_pins_as_the_hub_reads_them() -> None:
    pins = Pins().seen({"version": "1.4.0"}, bundle=True)
    pins = pins.seen({"name": "smollm2", "sha256": "ab" * 32, "tags": ["phone", 3]}, bundle=False)
    assert pins == Pins(bundle="1.4.0", model_name="smollm2", model_sha256="ab" * 32, model_tags=("phone",))
    assert pins.seen({}, bundle=True).bundle is None  # a cleared pin
    assert pins.seen({"name": 7}, bundle=False) == Pins(bundle="1.4.0")  # wrong types read as unset


# ---------------------------------------------------------------- placement


def announce(node_id: str, *, model: str = "m", capabilities: tuple[str, ...] = (), **kw: object) -> Announce:
    return Announce.model_validate(
        {
            "node_id": node_id,
            "model": ModelInfo(name=model, sha256="0" * 64, size_bytes=1, ctx=512),
            "threads": 1,
            "tokens_per_s": 10.0,
            "ram_total_mb": None,
            "device": "laptop",
            "agent_version": "t",
            "slots": 1,
            "queue_max": 0,
            "max_tokens": 256,
            "max_temperature": 1.0,
            "ts": 0.0,
            "capabilities": list(capabilities),
            **kw,
        }
    )


def swarm(*nodes: Announce, state: NodeState = NodeState.ONLINE) -> tuple[Placement, Registry, Trust]:
    registry = Registry(heartbeat_timeout_s=30.0)
    for a in nodes:
        registry.nodes[a.node_id] = NodeRecord(a.node_id, a, state, last_seen=0.0)
    trust = Trust()
    config = HubConfig(db_path=Path("unused.db"), quiet_s=2.0, attempt_min_s=10.0, attempt_slack=3.0)
    return Placement(config, registry, Scheduler(WinRates(), random.Random(0), trust), trust), registry, trust


def place(
    p: Placement,
    req: PromptRequest,
    count: int = 1,
    exclude: frozenset[str] = frozenset(),
    *,
    trusted: frozenset[str] = frozenset(),
    settling: bool = False,
) -> Assign | Wait | Shortfall:
    return p.place(req, count, exclude, trusted=trusted, now=1.0, settling=settling)


def test_what_a_request_needs_of_its_node() -> None:
    assert needs(PromptRequest(prompt="x")) == frozenset()
    assert needs(PromptRequest(prompt="x", stream=True)) == frozenset()  # any node can stream, whole
    assert needs(PromptRequest(kind="embed", input=["x"])) == {"embed"}
    assert needs(PromptRequest(kind="complete", prompt="x")) == {"complete"}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert needs(PromptRequest.model_validate({"prompt": "x", "tools": [tool]})) == {"tools"}
    assert needs(PromptRequest.model_validate({"prompt": "x", "tools": [tool], "tool_choice": "none"})) == frozenset()
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
    assert needs(PromptRequest.model_validate({"prompt": "x", "response_format": schema})) == {"json_schema"}


def test_free_nodes_are_assigned_and_a_partial_fit_says_what_is_missing() -> None:
    p, registry, _ = swarm(announce("a"), announce("b"))
    decision = place(p, PromptRequest(prompt="x"), 2)
    assert isinstance(decision, Assign) and {n.node_id for n in decision.nodes} == {"a", "b"}
    assert decision.short is None
    registry.nodes["b"].inflight = 1  # b is full (one slot, no queue)
    decision = place(p, PromptRequest(prompt="x"), 2)
    assert isinstance(decision, Assign) and [n.node_id for n in decision.nodes] == ["a"]
    assert decision.short == Shortfall(
        1, ErrorInfo(code=ErrorCode.NO_ELIGIBLE_NODES, message="only 1 of 2 wanted nodes were free", retry_after_s=5.0)
    )


def test_a_request_waits_for_full_paused_or_returning_nodes() -> None:
    p, registry, _ = swarm(announce("a"))
    registry.nodes["a"].inflight = 1
    assert place(p, PromptRequest(prompt="x")) == Wait()  # full: wait for its slot
    p, _, _ = swarm(announce("a"), state=NodeState.PAUSED)
    assert place(p, PromptRequest(prompt="x")) == Wait()  # paused by its guard: wait for it
    p, _, _ = swarm()
    assert place(p, PromptRequest(prompt="x"), settling=True) == Wait()  # nodes still coming back
    assert place(p, PromptRequest(prompt="x")) == Shortfall(
        1, ErrorInfo(code=ErrorCode.NO_ELIGIBLE_NODES, message="no node is online", retry_after_s=5.0)
    )


def big_swarm(n: int) -> tuple[Placement, Registry]:
    """``n`` one-slot nodes, as the hub learns of them (``Registry.record``): more than
    ``SCAN_ALL``, so placement weighs a few free ones rather than every node."""
    p, registry, _ = swarm()
    for i in range(n):
        rec = registry.record(f"n{i:04d}")
        rec.announce, rec.state, rec.last_seen = announce(rec.node_id), NodeState.ONLINE, 0.0
    return p, registry


def test_a_big_swarm_weighs_a_few_free_nodes_and_forgets_full_ones() -> None:
    p, registry = big_swarm(1000)
    assert len(registry.nodes) > SCAN_ALL
    free = registry.free(model=None, exclude=frozenset(), now=1.0, needs=frozenset(), count=1)
    assert [n.node_id for n in free] == [f"n{i:04d}" for i in range(FREE_SAMPLE)]  # free the longest first
    assert len(registry.free(model=None, exclude=frozenset(), now=1.0, needs=frozenset(), count=40)) == 40
    for rec in registry.nodes.values():
        rec.inflight = 1  # the whole swarm busy
    assert place(p, PromptRequest(prompt="x")) == Wait()
    assert registry._maybe_free == {}  # each full node was dropped as it was met, once
    back = registry.nodes["n0500"]
    back.inflight = 0
    registry.vacated(back)
    decision = place(p, PromptRequest(prompt="x"))
    assert isinstance(decision, Assign) and decision.nodes == (back,)
    assert place(p, PromptRequest(prompt="x"), exclude=frozenset({"n0500"})) == Wait()


def test_a_big_swarm_still_routes_a_tag_to_the_node_that_wins_it() -> None:
    p, registry = big_swarm(300)
    for _ in range(30):  # n0299 wins math; the sampled nodes have no record of it
        p.scheduler.winrates.record("n0299", ["math"], won=True, now=0.0)
    picks = Counter()
    for _ in range(50):
        decision = place(p, PromptRequest(prompt="x", tags=["math"]))
        assert isinstance(decision, Assign)
        picks[decision.nodes[0].node_id] += 1
    # Never weighed without the leaders (it is not among those free the longest); with them it
    # wins most draws against the 16 unknowns (each a uniform draw under Thompson sampling).
    assert picks["n0299"] >= 25, picks
    assert p.scheduler.winrates.leaders(["math"], 1.0) == ["n0299"]


@pytest.mark.parametrize(
    ("req", "exclude", "code", "message"),
    [
        (PromptRequest(prompt="x", model="other"), (), "no_eligible_nodes", "no online node serves model 'other'"),
        (PromptRequest(kind="embed", input=["x"]), (), "unsupported", "no online node can do embed"),
        (
            PromptRequest(prompt="x", model="m", kind="complete"),
            (),
            "unsupported",
            "no online node serving 'm' can do complete",
        ),
        (
            PromptRequest(prompt="x"),
            ("a",),
            "no_eligible_nodes",
            "every eligible node has already been tried for this request",
        ),
    ],
)
def test_why_no_node_can_take_a_request(req: PromptRequest, exclude: tuple[str, ...], code: str, message: str) -> None:
    p, _, _ = swarm(announce("a"))
    decision = place(p, req, 1, frozenset(exclude))
    assert isinstance(decision, Shortfall) and decision.missing == 1
    assert (decision.error.code.value, decision.error.message) == (code, message)


def test_a_private_request_goes_only_to_trusted_nodes() -> None:
    p, _, _ = swarm(announce("a"), announce("b"))
    private = PromptRequest(prompt="x", private=True)
    for _ in range(20):
        decision = place(p, private, trusted=frozenset({"b"}))
        assert isinstance(decision, Assign) and [n.node_id for n in decision.nodes] == ["b"]
    decision = place(p, private)
    assert isinstance(decision, Shortfall) and "trusted with private requests" in decision.error.message
    # a public request ignores the trusted set
    decision = place(p, PromptRequest(prompt="x"), 2, trusted=frozenset({"b"}))
    assert isinstance(decision, Assign) and len(decision.nodes) == 2


def test_a_new_node_is_joined_by_a_proven_one() -> None:
    p, registry, trust = swarm(announce("vet"), announce("new"))
    for _ in range(trust.config.probation_tasks):
        trust.answered("vet")
    seen = set()
    for _ in range(20):
        decision = place(p, PromptRequest(prompt="x"), 1)
        assert isinstance(decision, Assign)
        seen.add(tuple(sorted(n.node_id for n in decision.nodes)))
    assert seen <= {("vet",), ("new", "vet")} and ("new", "vet") in seen  # never the newcomer alone


def test_the_terms_of_an_attempt() -> None:
    p, registry, _ = swarm(announce("slow"), announce("live", progress_s=1.5))
    slow, live = registry.nodes["slow"], registry.nodes["live"]
    # no length asked: what 10 tokens/s writes in most of the 120 s left; and the time for the
    # node's cap of 256 of them, three times over
    terms = p.terms(slow, PromptRequest(prompt="x"), 120.0)
    assert (terms.max_tokens, terms.timeout_s, terms.quiet_s) == (960, pytest.approx(76.8), None)
    # a node that promised progress every 1.5 s may be quiet for 3 of them, never less than quiet_s
    assert p.terms(live, PromptRequest(prompt="x"), 120.0).quiet_s == 4.5
    # the request's own length; never past the deadline; never under the floor unless the deadline says so
    asked = PromptRequest.model_validate({"prompt": "x", "params": {"max_tokens": 20}})
    assert p.terms(slow, asked, 120.0) == Terms(max_tokens=20, timeout_s=10.0, quiet_s=None)
    assert p.terms(slow, asked, 3.0).timeout_s == 3.0
    assert p.terms(slow, asked, -1.0).timeout_s == 0.05
    # what the node can write before the deadline, by its recent speed
    slow.heartbeat = Heartbeat(
        node_id="slow", ts=0, battery_pct=None, charging=None, temp_c=None, ram_free_mb=None, load=None,
        tokens_per_s=2.0, busy=0, slots=1, queued=0, tokens_served=0, tasks_done=0, tasks_failed=0,
    )  # fmt: skip
    assert p.terms(slow, PromptRequest(prompt="x"), 10.0).max_tokens == 16
    assert p.terms(slow, PromptRequest(kind="embed", input=["x"]), 10.0).max_tokens is None


# ---------------------------------------------------------------- capacity


def test_an_attempt_holds_one_place_until_it_is_released_once() -> None:
    node = NodeRecord("a", announce("a"), NodeState.ONLINE)
    cap: Capacity[str] = Capacity()
    cap.assign("run1", "t1", node)
    cap.assign("run1", "t2", node)
    cap.assign("run2", "t3", node)
    assert node.inflight == 3 and sorted(cap.held("run1")) == ["t1", "t2"] and cap.route("t3") == "run2"
    assert cap.release("t1") and node.inflight == 2
    # again, from another path (a settled attempt, then the request's end): nothing more
    assert not cap.release("t1") and node.inflight == 2
    assert cap.route("t1") is None and cap.held("run1") == ["t2"]
    assert not cap.release("never-assigned") and node.inflight == 2
    with pytest.raises(ValueError, match="already assigned"):
        cap.assign("run1", "t2", node)
    assert node.inflight == 2


def test_a_quiet_attempt_frees_its_place_but_keeps_its_route_until_forgotten() -> None:
    node = NodeRecord("a", announce("a"), NodeState.ONLINE)
    cap: Capacity[str] = Capacity()
    cap.assign("run", "t1", node)
    assert cap.release("t1", keep_route=True) and node.inflight == 0
    assert cap.route("t1") == "run" and cap.held("run") == [] and not cap.holds("t1")
    cap.forget("t1")
    assert cap.route("t1") is None and node.inflight == 0
    # forgetting a task that still holds its place frees it, once
    cap.assign("run", "t2", node)
    cap.forget("t2")
    cap.forget("t2")
    assert node.inflight == 0 and not cap.release("t2")


def test_no_order_of_releases_can_take_a_node_below_what_it_runs() -> None:
    rng = random.Random(7)
    nodes = [NodeRecord(n, announce(n), NodeState.ONLINE) for n in "abc"]
    cap: Capacity[int] = Capacity()
    running: dict[str, NodeRecord] = {}
    for i in range(300):
        task = f"t{i % 40}"
        op = rng.choice(["assign", "release", "quiet", "forget"])
        if op == "assign" and not cap.holds(task):
            node = rng.choice(nodes)
            cap.assign(i % 3, task, node)
            running[task] = node
        elif op == "release":
            assert cap.release(task) is running.get(task)  # the node it held, or None
            running.pop(task, None)
        elif op == "quiet":
            cap.release(task, keep_route=True)
            running.pop(task, None)
        elif op == "forget":
            cap.forget(task)
            running.pop(task, None)
        for node in nodes:
            assert node.inflight == sum(1 for n in running.values() if n is node)
