"""The hub's scheduling, with fake engines on a real broker (fakes stand in for inference only).

Inference itself is tested with the real llama-cpp engine in test_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import ErrorReply, GenParams, PromptRequest, decode_reply
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub import Limits, SwarmClient
from nova_swarm.hub.store import Store
from nova_swarm.node import FakeEngine

from .conftest import RunningBroker, hub_config, nodes_available, running_hub, running_node, until


async def test_every_bad_input_gets_its_error_and_the_hub_keeps_running(amqtt: RunningBroker, tmp_path: Path) -> None:
    config = hub_config(tmp_path, limits=Limits(max_payload_bytes=2048, max_prompt_chars=200))
    async with running_hub(amqtt, config) as hub:
        async with Connection(amqtt.url(Role.CLIENT), client_id="prober") as client:
            await client.subscribe(hub.topics.reply())
            replies = client.messages()

            async def send(payload: bytes) -> ErrorReply:
                await client.publish(hub.topics.prompt(), payload)
                message = await asyncio.wait_for(anext(replies), 10)
                reply = decode_reply(message.payload)
                assert isinstance(reply, ErrorReply), reply
                return reply

            cases = {
                b'{"prompt": "unterminated"': ErrorCode.BAD_JSON,
                b'{"prompt": "hi", "colour": "blue"}': ErrorCode.UNKNOWN_FIELD,
                b'{"prompt": "hi", "fanout": 0}': ErrorCode.INVALID_REQUEST,
                b"x" * 300: ErrorCode.PROMPT_TOO_LARGE,
                b"x" * 3000: ErrorCode.PAYLOAD_TOO_LARGE,
                b"\xc3\x28 not utf-8": ErrorCode.BAD_ENCODING,
                b"   ": ErrorCode.EMPTY_PROMPT,
                b'{"prompt": "hi", "reply_to": "swarm/main/hub/status"}': ErrorCode.BAD_REPLY_TO,
                b'{"prompt": "hi", "model": "no-such-model"}': ErrorCode.UNKNOWN_MODEL,
                b"no node is up yet": ErrorCode.NO_ELIGIBLE_NODES,
            }
            for payload, code in cases.items():
                reply = await send(payload)
                assert reply.error.code is code, (payload[:40], reply.error)
                assert reply.error.message
            assert (await send(b"again")).error.retry_after_s == 5.0

        async with running_node(amqtt, FakeEngine(reply="still alive"), "n1"):
            await nodes_available(hub, 1)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as asker:
                answer = await asker.ask(PromptRequest(prompt="are you there?"), timeout=10)
        assert answer.text == "still alive"
        assert hub.failed == len(cases) + 1 and hub.answered == 1


async def test_race_takes_the_first_answer_and_cancels_the_rest(amqtt: RunningBroker, tmp_path: Path) -> None:
    slow = FakeEngine(reply="slow", delay_s=5.0)
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with (
            running_node(amqtt, FakeEngine(reply="fast", delay_s=0.05), "fast"),
            running_node(amqtt, slow, "slow") as slow_node,
        ):
            await nodes_available(hub, 2)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                started = time.monotonic()
                answer = await client.ask(PromptRequest(prompt="go", fanout=2), timeout=10)
                elapsed = time.monotonic() - started
            # The loser was told to stop: its engine quits between tokens, nothing is counted as done.
            await until(lambda: not slow_node._running, timeout=3, what="the slow node to drop the cancelled task")
            # Both attempts stopped counting against their nodes' capacity.
            assert {n.node_id: n.inflight for n in hub.registry.nodes.values()} == {"fast": 0, "slow": 0}
    assert (answer.text, answer.node_id, answer.attempts) == ("fast", "fast", 2)
    assert elapsed < 2.0
    assert slow.calls == 1 and slow_node.tasks_done == 0


async def test_best_of_n_returns_every_candidate_ranked(amqtt: RunningBroker, tmp_path: Path) -> None:
    good = FakeEngine(reply="The capital of France is Paris.")
    bad = FakeEngine(reply="turtles turtles turtles turtles turtles turtles turtles turtles")
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, good, "good"), running_node(amqtt, bad, "bad"):
            await nodes_available(hub, 2)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                prompt = PromptRequest(prompt="What is the capital of France?", strategy="best_of_n", fanout=2)
                answer = await client.ask(prompt, timeout=10)
    assert answer.node_id == "good"
    assert [c.node_id for c in answer.candidates] == ["good", "bad"]
    assert answer.candidates[0].score > answer.candidates[1].score
    assert answer.text == answer.candidates[0].text


async def test_tag_routing_shifts_traffic_to_the_node_that_wins_the_tag(amqtt: RunningBroker, tmp_path: Path) -> None:
    # Each node is quick on its own speciality and slow otherwise, so it wins those races.
    def speciality(word: str):  # noqa: ANN202 - a small rule factory
        return lambda prompt: 0.02 if word in prompt else 0.4

    mathwiz = FakeEngine(reply="42", delay_s=speciality("math"))
    poet = FakeEngine(reply="roses", delay_s=speciality("poem"))
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, mathwiz, "mathwiz"), running_node(amqtt, poet, "poet"):
            await nodes_available(hub, 2)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:

                async def ask(prompt: str, tag: str, fanout: int) -> str:
                    req = PromptRequest(prompt=prompt, tags=[tag], fanout=fanout)
                    return (await client.ask(req, timeout=10)).node_id

                untrained = Counter([await ask(f"math {i}", "math", 1) for i in range(20)])
                for i in range(10):  # races teach the hub who wins what
                    assert await ask(f"math problem {i}", "math", 2) == "mathwiz"
                    assert await ask(f"poem {i}", "poetry", 2) == "poet"
                math = Counter([await ask(f"math {i}", "math", 1) for i in range(30)])
                poems = Counter([await ask(f"poem {i}", "poetry", 1) for i in range(30)])
    print("untrained math", dict(untrained), "trained math", dict(math), "trained poetry", dict(poems))
    assert untrained["poet"] >= 4  # before any race, both nodes got math traffic
    assert math["mathwiz"] >= 25
    assert poems["poet"] >= 25
    assert hub.winrates.rate("mathwiz", "math", time.time()) > 0.8 > hub.winrates.rate("poet", "math", time.time())


async def test_a_failing_engine_is_retried_on_another_node(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with (
            running_node(amqtt, FakeEngine(fail_with="GPU on fire"), "broken"),
            running_node(amqtt, FakeEngine(reply="fine"), "ok"),
        ):
            await nodes_available(hub, 2)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                answers = await asyncio.gather(
                    *(client.ask(PromptRequest(prompt=f"q{i}"), timeout=10) for i in range(8))
                )
    assert {a.text for a in answers} == {"fine"}
    assert any(a.attempts == 2 for a in answers)  # some went to the broken node first


async def test_no_eligible_nodes_and_all_attempts_failing_are_explicit_errors(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, FakeEngine(fail_with="boom"), "broken"):
            await nodes_available(hub, 1)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                with pytest.raises(RequestFailed) as failed:
                    await client.ask(PromptRequest(prompt="q"), timeout=10)
    assert failed.value.code is ErrorCode.ENGINE_ERROR
    assert "boom" in failed.value.message


async def test_stopping_node_hands_its_task_to_another_node(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, FakeEngine(reply="from first", delay_s=10), "first", drain_s=0.2) as first:
            await nodes_available(hub, 1)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                pending = await client.send(PromptRequest(prompt="long job"))
                await until(lambda: bool(first._running), what="the first node to start the task")
                async with running_node(amqtt, FakeEngine(reply="from second"), "second"):
                    await nodes_available(hub, 2)
                    first.stop()  # drain time runs out: the task goes back to the hub
                    reply = await asyncio.wait_for(pending, 15)
    assert not isinstance(reply, ErrorReply), reply
    assert (reply.text, reply.attempts) == ("from second", 2)


async def test_node_clamps_max_tokens_to_its_limit(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, FakeEngine(reply=" ".join(["word"] * 50)), "n", max_tokens=5):
            await nodes_available(hub, 1)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                answer = await client.ask(PromptRequest(prompt="talk", params=GenParams(max_tokens=1000)), timeout=10)
    assert answer.text.split() == ["word"] * 5
    assert answer.usage is not None and answer.usage.completion_tokens == 5


async def test_registry_and_win_rates_survive_a_hub_restart(amqtt: RunningBroker, tmp_path: Path) -> None:
    config = hub_config(tmp_path)
    async with running_node(amqtt, FakeEngine(reply="hi"), "keeper"):
        async with running_hub(amqtt, config) as hub:
            await nodes_available(hub, 1)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                await client.ask(PromptRequest(prompt="q", tags=["greeting"]), timeout=10)
        store = Store(config.db_path)
        try:
            saved = {r.node_id: r for r in store.load_nodes()}
            rates = {(n, t) for n, t, *_ in store.load_win_rates()}
        finally:
            store.close()
        assert saved["keeper"].announce is not None and saved["keeper"].announce.node_id == "keeper"
        assert ("keeper", "greeting") in rates
        async with running_hub(amqtt, config) as again:
            assert again.registry.nodes["keeper"].announce is not None  # from SQLite, before any message
            assert again.winrates.rate("keeper", "greeting", time.time()) > 0.5
            await nodes_available(again, 1)
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                assert (await client.ask(PromptRequest(prompt="q"), timeout=10)).node_id == "keeper"


async def test_hub_status_and_node_table_are_published(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, FakeEngine(), "n1"):
            await nodes_available(hub, 1)
            async with Connection(amqtt.url(Role.CLIENT)) as client:
                await client.subscribe(hub.topics.hub_nodes())
                async with asyncio.timeout(10):
                    async for message in client.messages():
                        table = json.loads(message.payload)
                        if any(n["node_id"] == "n1" and n["state"] == "online" for n in table["nodes"]):
                            break
