"""The hub's scheduling through the in-memory link: no broker process, seconds to run.

The memory broker (``broker/link/memory.py``) keeps what the swarm relies on from MQTT; the
first tests here hold it to that. The rest run a real hub and real nodes (with scripted engines:
these are tests of scheduling, not inference) over it: race, best_of_n, a lost node's task
answered by another, waiting for capacity, and a streamed answer's sequence. The same flows run
on real brokers in test_hub.py, test_streaming.py and test_reliability.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.contract.errors import ConfigError, ConnectionLost, ProtocolError
from nova_swarm.broker.contract.messages import PromptRequest
from nova_swarm.broker.identity import node_client_id
from nova_swarm.broker.link.base import Message, Will
from nova_swarm.broker.link.memory import MemoryBroker, MemoryLink
from nova_swarm.hub import Hub, SwarmClient
from nova_swarm.hub.lifecycle import Action, Dispatch
from nova_swarm.hub.runs import Run, Runner
from nova_swarm.node import FakeEngine, Node, NodeConfig

from .conftest import hub_config, nodes_available, until, within


async def next_message(link: MemoryLink, timeout: float = 2.0) -> Message:
    return await asyncio.wait_for(anext(aiter(link.messages())), timeout)


async def nothing_for(link: MemoryLink, seconds: float = 0.05) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(aiter(link.messages())), seconds)


# ---------------------------------------------------------------- the broker itself


async def test_wildcards_qos_and_order_as_mqtt_has_them() -> None:
    broker = MemoryBroker()
    links = broker.links()
    async with links.open(client_id="reader") as reader, links.open(client_id="writer") as writer:
        await reader.subscribe("swarm/+/nodes/#", qos=0)
        await reader.subscribe("swarm/main/nodes/a/result", qos=1)  # overlaps: delivered once
        for i in range(3):
            await writer.publish("swarm/main/nodes/a/result", str(i).encode(), qos=1)
        await writer.publish("swarm/other/hub/status", b"not ours")
        got = [await next_message(reader) for _ in range(3)]
        assert [m.payload for m in got] == [b"0", b"1", b"2"]
        assert {(m.qos, m.retain) for m in got} == {(1, False)}  # the higher of the two grants
        await nothing_for(reader)
        for topic in ("swarm/+/x", "swarm/#", "$SYS/x", ""):
            with pytest.raises(ProtocolError):
                await writer.publish(topic, b"x")


async def test_retained_messages_reach_late_subscribers_and_an_empty_one_clears() -> None:
    broker = MemoryBroker()
    async with broker.links().open() as link:
        await link.publish("swarm/main/hub/status", b"online", retain=True)
        await link.subscribe("swarm/main/hub/status")
        first = await next_message(link)
        assert (first.payload, first.retain) == (b"online", True)
        await link.publish("swarm/main/hub/status", b"", retain=True)
        assert (await next_message(link)).payload == b""  # the clearing publish itself, live
        assert broker.retained("swarm/main/hub/status") is None


async def test_a_cut_link_fires_its_will_and_a_closed_one_does_not() -> None:
    broker = MemoryBroker()
    links = broker.links()
    will = Will("swarm/main/nodes/n1/status", b"offline")
    async with links.open(client_id="watcher") as watcher:
        await watcher.subscribe("swarm/main/nodes/+/status")
        async with links.open(client_id="n1", will=will):
            pass
        await nothing_for(watcher)
        async with links.open(client_id="n1", will=will) as doomed:
            broker.cut("n1")
            with pytest.raises(ConnectionLost, match="cut"):
                await next_message(doomed)
            with pytest.raises(ConnectionLost):
                await doomed.publish("swarm/main/x", b"too late")
        assert (await next_message(watcher)).payload == b"offline"
        assert broker.retained(will.topic) == b"offline"
        with pytest.raises(ConfigError, match="no link"):
            broker.cut("n1")


async def test_a_newer_link_takes_the_client_id_over() -> None:
    broker = MemoryBroker()
    links = broker.links()
    async with links.open(client_id="twin", will=Will("w", b"gone")) as old, links.open(client_id="twin") as new:
        with pytest.raises(ConnectionLost, match="took this client id"):
            await next_message(old)
        assert broker.connected() == ["twin"]
        await new.subscribe("w")
        assert (await next_message(new)).payload == b"gone"  # the older link's Will, retained


async def test_a_persistent_session_queues_qos1_while_away() -> None:
    broker = MemoryBroker()
    links = broker.links()
    async with links.open(client_id="hub", persistent=True) as hub:
        await hub.subscribe("swarm/main/prompt", qos=1)
        await hub.subscribe("swarm/main/nodes/+/heartbeat", qos=0)
    async with links.open(client_id="client") as client:
        await client.publish("swarm/main/prompt", b"sent while the hub was away", qos=1)
        await client.publish("swarm/main/nodes/n1/heartbeat", b"stale", qos=0)
    async with links.open(client_id="hub", persistent=True) as hub:
        await hub.subscribe("swarm/main/prompt", qos=1)
        assert (await next_message(hub)).payload == b"sent while the hub was away"
        await nothing_for(hub)  # QoS 0 is not kept for an absent session
    with pytest.raises(ConfigError, match="stable client id"):
        links.open(persistent=True)


async def test_unsubscribing_drops_what_is_pending_unless_told_to_keep_it() -> None:
    broker = MemoryBroker()
    async with broker.links().open() as link:
        await link.subscribe("a", "b")
        await link.publish("a", b"1")
        await link.publish("b", b"2")
        await link.unsubscribe("a")
        await link.unsubscribe("b", drop_pending=False)
        assert (await next_message(link)).payload == b"2"
        await link.publish("a", b"3")
        await nothing_for(link)


# ---------------------------------------------------------------- the swarm on it


@asynccontextmanager
async def swarm(tmp_path: Path, **hub_settings: Any) -> AsyncIterator[tuple[MemoryBroker, Hub]]:
    broker = MemoryBroker()
    async with Hub(hub_config(tmp_path, **hub_settings), links=broker.links("mqtt://hub@memory")) as hub:
        await within(asyncio.shield(hub.ready.wait()), 10)
        yield broker, hub


@asynccontextmanager
async def node(broker: MemoryBroker, engine: FakeEngine, node_id: str, **settings: Any) -> AsyncIterator[Node]:
    config = NodeConfig(node_id=node_id, heartbeat_s=0.5, profile_tokens=0, drain_s=1.0, **settings)
    async with Node(config, engine, links=broker.links(f"mqtt://{node_id}@memory")) as running:
        await within(asyncio.shield(running.connected.wait()), 10)
        yield running


def client(broker: MemoryBroker) -> SwarmClient:
    return SwarmClient(links=broker.links("mqtt://memory"))


async def test_race_takes_the_first_answer_and_cancels_the_rest(tmp_path: Path) -> None:
    slow = FakeEngine(reply="slow", delay_s=5.0)
    async with swarm(tmp_path) as (broker, hub):
        async with node(broker, FakeEngine(reply="fast", delay_s=0.05), "fast"), node(broker, slow, "slow") as loser:
            await nodes_available(hub, 2)
            async with client(broker) as asker:
                answer = await asker.ask(PromptRequest(prompt="go", fanout=2), timeout=10)
            await until(lambda: not loser._running, timeout=3, what="the loser to drop its cancelled task")
            assert {n.node_id: n.inflight for n in hub.registry.nodes.values()} == {"fast": 0, "slow": 0}
    assert (answer.text, answer.node_id, answer.attempts) == ("fast", "fast", 2)
    assert slow.calls == 1 and loser.tasks_done == 0


async def test_best_of_n_ranks_every_answer(tmp_path: Path) -> None:
    good = FakeEngine(reply="The capital of France is Paris.")
    bad = FakeEngine(reply="turtles turtles turtles turtles turtles turtles turtles turtles")
    async with swarm(tmp_path) as (broker, hub):
        async with node(broker, good, "good"), node(broker, bad, "bad"):
            await nodes_available(hub, 2)
            async with client(broker) as asker:
                request = PromptRequest(prompt="What is the capital of France?", strategy="best_of_n", fanout=2)
                answer = await asker.ask(request, timeout=10)
    assert answer.node_id == "good"
    assert [c.node_id for c in answer.candidates] == ["good", "bad"]
    assert answer.candidates[0].score > answer.candidates[1].score


async def test_a_lost_node_s_task_is_answered_by_another_and_the_node_comes_back(tmp_path: Path) -> None:
    async with swarm(tmp_path) as (broker, hub):
        async with node(broker, FakeEngine(reply="never sent", delay_s=3.0), "doomed") as doomed:
            await nodes_available(hub, 1)
            async with client(broker) as asker:
                reply = await asker.send(PromptRequest(prompt="hello"))
                await until(lambda: bool(doomed._running), timeout=5, what="the doomed node to start")
                async with node(broker, FakeEngine(reply="spare here"), "spare"):
                    await nodes_available(hub, 2)
                    cut_at = time.monotonic()
                    broker.cut(node_client_id("doomed", None))  # its Will says offline
                    answer = await within(reply, 10)
                    redispatched_in = time.monotonic() - cut_at
                    # The node reconnects by itself, and the hub takes it back.
                    await until(lambda: doomed.connected.is_set(), timeout=5, what="the node to rejoin")
                    await nodes_available(hub, 2)
    assert (answer.text, answer.node_id, answer.attempts) == ("spare here", "spare", 2)
    assert redispatched_in < 3.0  # well before the lost node's own answer would have come


async def test_a_prompt_waits_for_a_full_node_and_is_answered_in_turn(tmp_path: Path) -> None:
    async with swarm(tmp_path) as (broker, hub):
        async with node(broker, FakeEngine(reply="one at a time", delay_s=0.5), "solo", slots=1, queue_max=0):
            await nodes_available(hub, 1)
            async with client(broker) as asker:
                first = await asker.send(PromptRequest(prompt="first"))
                await until(lambda: hub.status().inflight == 1, timeout=5, what="the first to run")
                second = await asker.send(PromptRequest(prompt="second"))
                await until(lambda: hub.status().queued == 1, timeout=5, what="the second to wait for the node")
                answers = await within(asyncio.gather(first, second), 10)
    assert [a.text for a in answers] == ["one at a time", "one at a time"]  # type: ignore[union-attr]
    assert hub.status().queued == 0 and hub.answered == 2


async def test_a_freed_place_wakes_one_waiting_request_the_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve requests wait for one node with one place. Each answer wakes only the oldest
    waiting request, so placement runs twice a request: 23 times here, where it ran 78 times
    when every answer woke every waiting request. They are answered in the order they came."""
    tries = 0
    dispatch = Runner._dispatch

    async def counted(self: Runner, run: Run, action: Dispatch) -> list[Action]:
        nonlocal tries
        tries += 1
        return await dispatch(self, run, action)

    monkeypatch.setattr(Runner, "_dispatch", counted)
    done: list[str] = []
    async with swarm(tmp_path) as (broker, hub):
        async with node(broker, FakeEngine(delay_s=0.02), "solo", slots=1, queue_max=0):
            await nodes_available(hub, 1)
            async with client(broker) as asker:
                for i in range(12):  # one client link: they reach the hub in this order
                    answer = await asker.send(PromptRequest(prompt=f"p{i}"))
                    answer.add_done_callback(lambda _, i=i: done.append(f"p{i}"))
                await until(lambda: len(done) == 12, timeout=20, what="every answer")
    assert done == [f"p{i}" for i in range(12)]
    assert tries <= 2 * 12, tries  # its arrival, and the wake that gets it the node


async def test_a_streamed_race_forwards_the_leader_in_sequence_and_adds_up(tmp_path: Path) -> None:
    words = " ".join(f"word{i}" for i in range(40))
    async with swarm(tmp_path) as (broker, hub):
        async with node(broker, FakeEngine(reply=words), "quick"), node(broker, FakeEngine(delay_s=20.0), "slow"):
            await nodes_available(hub, 2)
            async with client(broker) as asker:
                request = PromptRequest(prompt="go", fanout=2, stream=True)
                async with asker.streaming(request, timeout=10) as stream:
                    chunks = [chunk async for chunk in stream]
                    answer = await stream.answer()
    assert (answer.node_id, answer.attempts) == ("quick", 2)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert "".join(c.text or "" for c in chunks) == answer.text == words
    assert {c.node_id for c in chunks} == {"quick"} and not any(c.restart for c in chunks)
    assert stream.ended is not None and stream.ended.ok and stream.ended.seq == len(chunks)
    assert stream.duplicates == 0 and stream.gaps == 0


async def test_hub_and_node_leave_no_task_behind(tmp_path: Path) -> None:
    before = asyncio.all_tasks()
    async with swarm(tmp_path) as (broker, hub), node(broker, FakeEngine(reply="ok"), "n1"):
        await nodes_available(hub, 1)
        async with client(broker) as asker:
            assert (await asker.ask(PromptRequest(prompt="hi"), timeout=10)).text == "ok"
    assert asyncio.all_tasks() == before
    assert broker.retained(hub.topics.hub_status()) is not None and broker.connected() == []
    with pytest.raises(ConfigError, match="not both"):
        Hub(hub_config(tmp_path), broker.links().url, links=broker.links())


async def test_the_readme_s_in_process_swarm_runs_as_written(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(b for b in readme.split("```python\n")[1:] if "MemoryBroker()" in b).split("```")[0]
    lines = code.splitlines()
    body = "\n".join("    " + line for line in lines if not line.startswith("from ") and line.strip())
    program = "\n".join(line for line in lines if line.startswith("from ")) + "\nasync def main(path):\n" + body
    scope: dict[str, Any] = {}
    exec(program + "\n    return answer\n", scope)  # noqa: S102 - our own README
    answer = await within(scope["main"](tmp_path / "hub.sqlite"), 20)
    assert answer.text == "hi"
