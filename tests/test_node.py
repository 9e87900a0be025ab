"""The node agent on a real broker, driven by hand as the hub would (fake engine: these are
queueing tests; inference is tested with llama-cpp in test_e2e.py)."""

from __future__ import annotations

import asyncio
import json

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import Cancel, ChatMessage, GenParams, Task, TaskResult, decode
from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection
from nova_swarm.node import FakeEngine

from .conftest import RunningBroker, running_node, until

T = Topics("main")


def task(task_id: str, timeout_s: float = 30.0) -> bytes:
    return Task(
        task_id=task_id,
        request_id=f"r-{task_id}",
        messages=[ChatMessage(role="user", content="hi")],
        params=GenParams(),
        timeout_s=timeout_s,
    ).encode()


async def results(conn: Connection, count: int, timeout: float = 15.0) -> dict[str, TaskResult]:
    out: dict[str, TaskResult] = {}
    async with asyncio.timeout(timeout):
        async for message in conn.messages():
            if message.topic.endswith("/result"):
                r = decode(TaskResult, message.payload)
                out[r.task_id] = r
                if len(out) == count:
                    return out
    return out


async def test_a_full_queue_refuses_with_node_busy_and_drops_nothing(amqtt: RunningBroker) -> None:
    async with Connection(amqtt.url(Role.HUB), client_id="hub-test") as hub:
        await hub.subscribe(T.node_result("n1"))
        async with running_node(amqtt, FakeEngine(reply="done", delay_s=0.5), "n1", slots=1, queue_max=1):
            for i in range(4):
                await hub.publish(T.node_task("n1"), task(f"t{i}"))
            got = await results(hub, 4)
    codes = {tid: (r.error.code if r.error else "ok") for tid, r in got.items()}
    assert codes == {"t0": "ok", "t1": "ok", "t2": ErrorCode.NODE_BUSY, "t3": ErrorCode.NODE_BUSY}


async def test_stopping_finishes_the_running_task_and_hands_back_the_queue(amqtt: RunningBroker) -> None:
    async with Connection(amqtt.url(Role.HUB), client_id="hub-test") as hub:
        await hub.subscribe(T.node_result("n1"), T.node_status("n1"))
        async with running_node(amqtt, FakeEngine(reply="done", delay_s=0.5), "n1", queue_max=3, drain_s=5) as node:
            for i in range(3):
                await hub.publish(T.node_task("n1"), task(f"t{i}"))
            await until(lambda: bool(node._running) and len(node._queued) == 2, what="one running, two queued")
        got: dict[str, object] = {}
        statuses = []
        async with asyncio.timeout(10):
            async for message in hub.messages():
                if message.topic.endswith("/status"):
                    statuses.append(json.loads(message.payload)["state"])
                else:
                    r = decode(TaskResult, message.payload)
                    got[r.task_id] = r.error.code if r.error else r.text
                if len(got) == 3 and statuses and statuses[-1] == "offline":
                    break
    assert got == {"t0": "done", "t1": ErrorCode.NODE_STOPPING, "t2": ErrorCode.NODE_STOPPING}


async def test_cancel_stops_a_running_task_and_unqueues_a_waiting_one(amqtt: RunningBroker) -> None:
    engine = FakeEngine(reply="done", delay_s=5.0)
    async with Connection(amqtt.url(Role.HUB), client_id="hub-test") as hub:
        await hub.subscribe(T.node_result("n1"))
        async with running_node(amqtt, engine, "n1") as node:
            await hub.publish(T.node_task("n1"), task("run"))
            await hub.publish(T.node_task("n1"), task("wait"))
            await until(lambda: bool(node._running) and bool(node._queued), what="one running, one queued")
            for tid in ("wait", "run"):
                await hub.publish(T.node_cancel("n1"), Cancel(task_id=tid, reason="test").encode())
            got = await results(hub, 2, timeout=3)
    assert {t: r.error.code for t, r in got.items() if r.error} == {
        "run": ErrorCode.CANCELLED,
        "wait": ErrorCode.CANCELLED,
    }
    assert engine.calls == 1


async def test_malformed_and_retained_tasks_are_ignored_and_the_node_carries_on(amqtt: RunningBroker) -> None:
    engine = FakeEngine(reply="fine")
    async with Connection(amqtt.url(Role.HUB), client_id="hub-test") as hub:
        await hub.subscribe(T.node_result("n1"))
        # A retained task (a stale one, or one amqtt leaked) must never run.
        await hub.publish(T.node_task("n1"), task("stale"), retain=True)
        async with running_node(amqtt, engine, "n1"):
            for garbage in (b"", b"not json", b'{"task_id": 5}', b"\xff" * 100, b"[" * 10_000):
                await hub.publish(T.node_task("n1"), garbage)
            await hub.publish(T.node_task("n1"), task("good"))
            got = await results(hub, 1)
        await hub.publish(T.node_task("n1"), b"", retain=True)
    assert list(got) == ["good"] and got["good"].text == "fine"
    assert engine.calls == 1


async def test_announce_status_and_heartbeat_describe_the_node(amqtt: RunningBroker) -> None:
    async with Connection(amqtt.url(Role.CLIENT), client_id="watcher") as watcher:
        await watcher.subscribe(*(T.all_nodes(k) for k in (NodeTopic.ANNOUNCE, NodeTopic.STATUS, NodeTopic.HEARTBEAT)))
        async with running_node(amqtt, FakeEngine(name="fake-model"), "n1", tags=("math",)):
            seen: dict[str, dict] = {}
            async with asyncio.timeout(10):
                async for message in watcher.messages():
                    seen[message.topic.rsplit("/", 1)[1]] = json.loads(message.payload)
                    if len(seen) == 3:
                        break
    announce, status, heartbeat = seen["announce"], seen["status"], seen["heartbeat"]
    assert announce["model"]["name"] == "fake-model" and announce["tags"] == ["math"]
    assert len(announce["model"]["sha256"]) == 64 and announce["agent_version"]
    assert status["state"] == "online"
    for key in ("battery_pct", "charging", "temp_c", "ram_free_mb", "load", "busy", "tokens_served"):
        assert key in heartbeat
    assert heartbeat["ram_free_mb"] is None or heartbeat["ram_free_mb"] > 0  # unknown is null, never 0
