"""A phone node that looks after its phone: driven by the simulated sensor, on a real broker and hub.

Fake engines stand in for inference (the test is about when work is taken, not the text).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.contract.messages import NodeState, PromptRequest
from nova_swarm.broker.home import Role
from nova_swarm.hub import SwarmClient
from nova_swarm.node import FakeEngine
from nova_swarm.node.guard import GuardConfig
from nova_swarm.node.sensors import SimulatedSource

from .conftest import RunningBroker, hub_config, nodes_available, running_hub, running_node, until

# (how the phone starts, what trips the guard, inside the margin (still paused), past it)
SCENARIOS = {
    "heat": ({"temp_c": 35, "battery_pct": 90, "charging": False}, {"temp_c": 44}, {"temp_c": 39}, {"temp_c": 36.5}),
    "battery": (
        {"temp_c": 30, "battery_pct": 50, "charging": False},
        {"battery_pct": 29},
        {"battery_pct": 35},
        {"battery_pct": 41},
    ),
    "charging-only": (
        {"temp_c": 30, "battery_pct": 90, "charging": True},
        {"charging": False},
        {"charging": None},
        {"charging": True},
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_a_node_pauses_finishes_its_task_takes_nothing_new_and_resumes_past_the_margin(
    amqtt: RunningBroker, tmp_path: Path, scenario: str
) -> None:
    start, trip, inside, past = SCENARIOS[scenario]
    sensor_file = tmp_path / "sensors.json"
    state: dict[str, Any] = dict(start)

    def phone(**change: Any) -> None:
        state.update(change)
        sensor_file.write_text(json.dumps(state))

    phone()
    guard = GuardConfig(charging_only=scenario == "charging-only")
    engine = FakeEngine(reply=lambda p: f"phone: {p}", delay_s=1.0)
    async with (
        running_hub(amqtt, hub_config(tmp_path)) as hub,
        running_node(amqtt, engine, "phone", sensor=SimulatedSource(sensor_file), sense_s=0.1, guard=guard) as node,
        running_node(amqtt, FakeEngine(reply=lambda p: f"laptop: {p}"), "laptop"),
    ):
        await nodes_available(hub, 2)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:

            def state_of(node_id: str) -> NodeState:
                return hub.registry.nodes[node_id].state

            # Under load: the phone is running a task when it trips.
            busy = [await client.send(PromptRequest(prompt=f"warm-up {i}")) for i in range(4)]
            await until(lambda: len(node._running) == 1, what="the phone to be working")
            in_flight = next(iter(node._running.values())).task.request_id
            phone(**trip)
            await until(lambda: state_of("phone") is NodeState.PAUSED, what="the hub to see the phone paused")
            assert node.guard.paused and node.guard.reason
            replies = await asyncio.wait_for(asyncio.gather(*busy), 30)
            assert all(r.ok for r in replies), replies  # nothing lost: run to the end, or handed back
            finished = {r.id: r.node_id for r in replies}  # type: ignore[union-attr]
            assert finished[in_flight] == "phone"  # the running task was finished, not abandoned

            async def who_answers(n: int) -> Counter[str]:
                answers = await asyncio.gather(
                    *(client.ask(PromptRequest(prompt=f"q{i}"), timeout=30) for i in range(n))
                )
                return Counter(a.node_id for a in answers)

            calls = engine.calls
            received: list[str] = []
            on_task = node._on_task

            async def spy(task: Any) -> None:
                received.append(task.task_id)
                await on_task(task)

            node._on_task = spy  # type: ignore[method-assign]
            assert await who_answers(6) == {"laptop": 6}
            phone(**inside)  # better, but not past the margin
            await asyncio.sleep(0.6)
            assert state_of("phone") is NodeState.PAUSED and node.guard.paused
            assert await who_answers(4) == {"laptop": 4}
            assert engine.calls == calls and received == []  # no task even reached the paused phone

            phone(**past)
            await until(lambda: state_of("phone") is NodeState.ONLINE, what="the phone to resume")
            assert node.guard.resumes == 1
            started = time.monotonic()
            while engine.calls == calls:  # it takes work again
                await who_answers(2)
                assert time.monotonic() - started < 30, "the resumed phone never got a task"
            heartbeat = hub.registry.nodes["phone"].heartbeat
            await until(lambda: hub.registry.nodes["phone"].heartbeat is not heartbeat, what="a fresh heartbeat")
            hb = hub.registry.nodes["phone"].heartbeat
            assert hb is not None and hb.pauses == 1 and hb.paused is False
