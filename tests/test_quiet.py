"""A dropped phone is noticed in seconds: a busy node that goes quiet loses its attempt.

The rule is the request machine's (``hub/lifecycle.py``), driven here directly with the ``now``
we pass; then the whole path, with a real broker, a real hub and two `swarm-node run` processes
on the fake engine, one of which is frozen with SIGSTOP mid-task (a frozen process keeps its
socket open, like a phone that dropped off Wi-Fi: no RST, no Last Will).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import (
    Answer,
    Heartbeat,
    NodeProgress,
    NodeState,
    PromptRequest,
    Status,
    TaskResult,
    decode,
    decode_reply,
)
from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection, keepalive_for, written_off_after
from nova_swarm.hub import HubConfig
from nova_swarm.hub.lifecycle import AttemptState, Cancel, Dispatch, Fail, Quiet, RequestMachine, Succeed
from nova_swarm.hub.registry import Registry
from nova_swarm.node import NodeConfig

from .conftest import BIN, Processes, RunningBroker, hub_config, nodes_available, running_hub, until
from .test_routing_units import announce

T = Topics()


def machine(**kw: object) -> RequestMachine:
    return RequestMachine(request_id="r", strategy="race", fanout=1, deadline=100.0, retries=2, **kw)  # type: ignore[arg-type]


def ok(task: str, node: str) -> TaskResult:
    return TaskResult(task_id=task, request_id="r", node_id=node, ok=True, text="late")


def test_a_quiet_attempt_is_written_off_and_the_request_goes_to_another_node() -> None:
    m = machine()
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=60, quiet_s=2.0, now=0.0)
    assert m.next_wakeup() == 2.0  # the quiet window, well before the attempt's deadline
    m.on_progress("t1", 1.5)
    assert m.on_tick(2.0) == []  # heard at 1.5: not quiet yet
    assert m.next_wakeup() == 3.5
    assert m.on_tick(3.5) == [Quiet("t1", "a"), Dispatch(1, frozenset({"a"}))]
    assert m.attempts["t1"].state is AttemptState.QUIET and m.active() == []
    assert m.attempts["t1"].error is not None and m.attempts["t1"].error.code is ErrorCode.NODE_LOST
    assert "went quiet" in m.attempts["t1"].error.message


def test_the_quiet_nodes_late_result_does_not_make_a_second_reply() -> None:
    m = machine()
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=60, quiet_s=2.0, now=0.0)
    m.on_tick(2.0)
    m.assigned(task_id="t2", node_id="b", deadline=60, quiet_s=2.0, now=2.0)
    m.on_progress("t2", 3.0)
    done = m.on_result(ok("t2", "b"), 3.5)
    # The quiet attempt is stopped with the rest once the request has its answer.
    assert done[0] == Cancel("t1", "a", "another node answered first")
    assert isinstance(done[1], Succeed) and done[1].answers[0].node_id == "b"
    assert m.on_result(ok("t1", "a"), 9.0) == []  # it woke up: ignored
    assert m.on_tick(9.0) == []


def test_a_quiet_node_that_comes_back_and_answers_first_still_wins() -> None:
    m = machine()
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=60, quiet_s=2.0, now=0.0)
    m.on_tick(2.0)  # a Wi-Fi gap, say
    m.assigned(task_id="t2", node_id="b", deadline=60, quiet_s=2.0, now=2.0)
    done = m.on_result(ok("t1", "a"), 2.5)
    assert done[0] == Cancel("t2", "b", "another node answered first")
    assert isinstance(done[1], Succeed) and done[1].answers[0].node_id == "a"


def test_with_nowhere_else_to_go_a_quiet_attempt_gets_until_its_deadline() -> None:
    m = RequestMachine(request_id="r", strategy="race", fanout=1, deadline=100.0, retries=0)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=30, quiet_s=2.0, now=0.0)
    assert m.on_tick(2.0) == [Quiet("t1", "a")]  # no retry left: nothing to dispatch, no failure yet
    assert not m.finished and m.next_wakeup() == 30
    late = m.on_tick(30.0)
    assert late[0] == Cancel("t1", "a", "attempt deadline passed") and isinstance(late[1], Fail)
    assert late[1].error.code is ErrorCode.DEADLINE_EXCEEDED


def test_no_silence_counts_while_the_hub_itself_cannot_hear() -> None:
    m = machine()
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=60, quiet_s=2.0, now=0.0)
    m.excuse_silence(5.0)  # the hub's broker link was down until 5.0
    assert m.on_tick(5.0) == [] and m.next_wakeup() == 7.0
    assert m.on_tick(7.0)[0] == Quiet("t1", "a")


def test_chunks_count_as_progress_and_nodes_that_promised_none_are_judged_by_their_deadline() -> None:
    m = RequestMachine(request_id="r", strategy="best_of_n", fanout=2, deadline=100.0)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=60, quiet_s=2.0, now=0.0)
    m.assigned(task_id="t2", node_id="old", deadline=60, now=0.0)  # an older node: no progress promised
    m.on_chunk("t1", 1.9)  # best_of_n streams nothing to the client, but the chunk is a sign of life
    assert m.on_tick(3.0) == []
    assert m.next_wakeup() == 3.9
    assert [a.task_id for a in m.active()] == ["t1", "t2"]
    assert m.on_tick(3.9) == [Quiet("t1", "a"), Dispatch(1, frozenset({"a", "old"}))]
    assert m.attempts["t2"].state is AttemptState.ASSIGNED  # silence means nothing from it
    assert m.on_tick(30.0) == []


def test_progress_for_a_settled_or_quiet_attempt_changes_nothing() -> None:
    m = machine()
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=60, quiet_s=2.0, now=0.0)
    m.on_tick(2.0)
    m.on_progress("t1", 2.5)
    m.on_progress("nope", 2.5)
    assert m.attempts["t1"].state is AttemptState.QUIET and m.attempts["t1"].heard == 0.0
    m.on_node_lost("a", "went offline", 3.0)  # its Last Will: now it is gone for good
    assert m.attempts["t1"].state is AttemptState.LOST


def test_a_node_that_went_quiet_gets_no_new_work_until_its_next_heartbeat() -> None:
    reg = Registry(heartbeat_timeout_s=20.0)
    reg.on_announce(announce("a"), live=True, now=100.0)
    reg.on_status(Status(node_id="a", state=NodeState.ONLINE), live=True, now=100.0)
    assert [n.node_id for n in reg.eligible(model=None, exclude=frozenset(), now=101.0)] == ["a"]
    reg.nodes["a"].quiet = True  # what the hub does on a Cancel(quiet=True)
    assert reg.eligible(model=None, exclude=frozenset(), now=101.0) == []
    beat = Heartbeat(
        node_id="a", ts=0.0, battery_pct=None, charging=None, temp_c=None, ram_free_mb=None, load=None,
        tokens_per_s=None, busy=0, slots=1, queued=0, tokens_served=0, tasks_done=0, tasks_failed=0,
    )  # fmt: skip
    assert reg.on_heartbeat(beat, now=102.0) is True  # back: the hub wakes whoever waits
    assert [n.node_id for n in reg.eligible(model=None, exclude=frozenset(), now=102.0)] == ["a"]


# ---------------------------------------------------------------- the whole path


def fake_node(procs: Processes, node_id: str, delay_s: float) -> subprocess.Popen[bytes]:
    argv = [str(BIN / "swarm-node"), "run", *procs.common(), "--node-id", node_id, "--heartbeat", "1"]
    argv += ["--engine", "fake", "--engine-option", f"delay_s={delay_s}", "--drain", "1"]
    return procs.spawn(f"node-{node_id}", argv)


async def test_a_frozen_busy_node_loses_its_task_in_seconds_and_its_late_result_is_ignored(
    broker: RunningBroker, tmp_path: Path
) -> None:
    procs = Processes(broker, tmp_path)
    # A heartbeat timeout far beyond the test: only the quiet rule can notice the frozen node.
    config = hub_config(tmp_path, heartbeat_timeout_s=120.0, quiet_s=2.0, attempt_min_s=60.0)
    try:
        async with running_hub(broker, config) as hub:
            nodes = {n: fake_node(procs, n, 4.0) for n in ("alpha", "beta")}
            await nodes_available(hub, 2)
            watch = Connection(broker.url(Role.HUB), client_id="quiet-watch")
            async with watch:
                await watch.subscribe(
                    T.all_nodes(NodeTopic.TASK),
                    T.all_nodes(NodeTopic.PROGRESS),
                    T.all_nodes(NodeTopic.RESULT),
                    T.reply(),
                )
                tasks: list[tuple[str, str, float]] = []  # (node, task id, when)
                progress: dict[str, set[str]] = {}
                results: list[TaskResult] = []
                replies: list[bytes] = []

                async def read() -> None:
                    async for m in watch.messages():
                        parsed = T.parse_node_topic(m.topic)
                        if m.topic == T.reply():
                            replies.append(m.payload)
                        elif parsed is not None and parsed[1] is NodeTopic.TASK:
                            tasks.append((parsed[0], json.loads(m.payload)["task_id"], time.monotonic()))
                        elif parsed is not None and parsed[1] is NodeTopic.PROGRESS:
                            progress.setdefault(parsed[0], set()).update(decode(NodeProgress, m.payload).tasks)
                        elif parsed is not None and parsed[1] is NodeTopic.RESULT:
                            results.append(decode(TaskResult, m.payload))

                reader = asyncio.create_task(read())
                try:
                    await asyncio.sleep(0.3)
                    await watch.publish(T.prompt(), PromptRequest(id="frozen-1", prompt="hi").encode())
                    await until(lambda: len(tasks) == 1, what="the first dispatch")
                    victim, first_task, _ = tasks[0]
                    # Busy for sure: it said so on its progress topic.
                    await until(lambda: first_task in progress.get(victim, set()), what="progress from the node")
                    proc = nodes[victim]
                    os.killpg(proc.pid, signal.SIGSTOP)
                    frozen_at = time.monotonic()
                    try:
                        await until(lambda: len(tasks) == 2, timeout=30, what="the re-dispatch")
                        other, _, dispatched_at = tasks[1]
                        took = dispatched_at - frozen_at
                        print(f"\n[{broker.engine}] frozen node {victim}: re-dispatched to {other} after {took:.2f} s")
                        assert other != victim
                        assert took < 10.0
                        await until(lambda: len(replies) == 1, timeout=30, what="the reply")
                        # Still frozen: the next request goes straight to the other node.
                        await watch.publish(T.prompt(), PromptRequest(id="frozen-2", prompt="again").encode())
                        await until(lambda: len(replies) == 2, timeout=30, what="the second reply")
                        again = decode_reply(replies[1])
                        assert isinstance(again, Answer) and again.node_id == other and again.attempts == 1
                    finally:
                        os.killpg(proc.pid, signal.SIGCONT)
                    answer = decode_reply(replies[0])
                    assert isinstance(answer, Answer) and answer.node_id == other and answer.attempts == 2
                    # Thawed, the victim finishes (or stops on the hub's cancel) and reports:
                    # that late result must not become a second reply.
                    await until(
                        lambda: any(r.task_id == first_task for r in results), timeout=30, what="the late result"
                    )
                    await asyncio.sleep(1.0)
                    assert len(replies) == 2, replies
                finally:
                    reader.cancel()
    finally:
        procs.close()


def test_the_keepalive_lets_heartbeats_stand_in_for_pings() -> None:
    # Longer than the heartbeat interval (paho pings only after a keepalive with nothing sent),
    # and the write-off 1.5 keepalives: 15 s and 22.5 s at the default 10 s heartbeat.
    assert keepalive_for(10.0) == 15 and written_off_after(10.0) == 22.5
    assert all(keepalive_for(h) > h for h in (0.5, 1.0, 7.0, 10.0, 30.0, 60.0))
    assert keepalive_for(0.5) == 5  # never a keepalive that pings several times a second
    assert HubConfig(db_path=Path("unused")).heartbeat_timeout_s == written_off_after(
        NodeConfig(node_id="n").heartbeat_s
    )


async def test_an_idle_frozen_node_is_written_off_within_its_keepalive_window(
    broker: RunningBroker, tmp_path: Path
) -> None:
    """No task, so no progress to miss: the broker's keepalive check fires the node's Last Will."""
    procs = Processes(broker, tmp_path)
    try:
        proc = fake_node(procs, "idle", 0.0)  # --heartbeat 1: keepalive 5 s, written off after 7.5 s
        async with Connection(broker.url(Role.HUB), client_id="idle-watch") as watch:
            await watch.subscribe(T.node_status("idle"))
            states: list[Status] = []

            async def read() -> None:
                async for m in watch.messages():
                    if m.payload and not m.retain:
                        states.append(decode(Status, m.payload))

            reader = asyncio.create_task(read())
            try:
                await until(lambda: any(s.state is NodeState.ONLINE for s in states), timeout=30, what="online")
                await asyncio.sleep(1.0)
                os.killpg(proc.pid, signal.SIGSTOP)
                frozen_at = time.monotonic()
                try:
                    await until(lambda: states[-1].state is NodeState.OFFLINE, timeout=30, what="the Last Will")
                finally:
                    os.killpg(proc.pid, signal.SIGCONT)
                took = time.monotonic() - frozen_at
                window = written_off_after(1.0)
                print(f"\n[{broker.engine}] idle frozen node written off after {took:.1f} s (window {window} s)")
                assert states[-1].reason == "connection lost"
                assert took < written_off_after(1.0) + 5.0  # the broker checks on its own clock
            finally:
                reader.cancel()
    finally:
        procs.close()
