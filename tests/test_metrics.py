"""Metrics for dashboards: flat JSON, numbers only, a fixed key set, and never a word of a prompt."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import UNKNOWN, HubMetrics, NodeMetrics, PromptRequest
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub.metrics import ALL_TAGS, Window
from nova_swarm.hub.registry import Registry
from nova_swarm.node import FakeEngine

from .conftest import RunningBroker, hub_config, nodes_available, running_hub, running_node, until

T = Topics("main")
SECRET = "zebra-quokka-4471"  # in every prompt; must never appear in a metric


def test_the_window_keeps_one_minute_and_ranks_latencies() -> None:
    w = Window(span_s=60.0)
    assert w.latency_percentile(0.0, 0.5) == UNKNOWN  # no answers: -1, never a made-up 0
    for i, latency in enumerate([10.0, 20.0, 30.0, 40.0, 1000.0]):
        w.answered(float(i), latency)
    w.failed(1.0, ErrorCode.NODE_BUSY)
    assert w.latency_percentile(5.0, 0.5) == 30.0 and w.latency_percentile(5.0, 0.95) == 1000.0
    m = w.hub_metrics(5.0, Registry(), inflight=2, queued=1)
    assert m.requests_per_s == round(6 / 60, 3) and m.errors_per_min == 1 and m.queue_depth == 1
    errors = w.errors_by_code(5.0)
    assert set(errors) == {c.value for c in ErrorCode} and errors["node_busy"] == 1
    # A minute later it has all aged out; the totals stay.
    later = w.hub_metrics(100.0, Registry(), inflight=0, queued=0)
    assert later.latency_p50_ms == UNKNOWN and later.requests_per_s == 0 and later.errors_per_min == 0
    assert later.answered_total == 5 and later.failed_total == 1
    assert w.errors_by_code(100.0)["node_busy"] == 0


def flat_numbers(payload: bytes) -> dict[str, float]:
    value = json.loads(payload)
    assert isinstance(value, dict), payload
    for key, v in value.items():
        assert isinstance(v, int | float) and not isinstance(v, bool), (key, v)
    return value


async def test_every_metrics_payload_is_flat_numbers_with_a_fixed_key_set(amqtt: RunningBroker, tmp_path: Path) -> None:
    seen: dict[str, list[bytes]] = defaultdict(list)
    async with (
        running_hub(amqtt, hub_config(tmp_path, metrics_interval_s=0.3)) as hub,
        running_node(amqtt, FakeEngine(reply=lambda p: f"ok {p}"), "n1", tags=("poetry",)),
        running_node(amqtt, FakeEngine(), "n2"),
        Connection(amqtt.url(Role.CLIENT), client_id="grafana") as conn,
    ):
        await nodes_available(hub, 2)
        await conn.subscribe(T.metrics_all(), qos=0)

        async def read() -> None:
            async for message in conn.messages():
                seen[message.topic].append(message.payload)

        reader = asyncio.create_task(read())
        async with Connection(amqtt.url(Role.CLIENT), client_id="asker") as asker:
            for i in range(4):
                asker_reply = T.reply("default", "asker")
                body = PromptRequest(id=f"m{i}", prompt=f"{SECRET} {i}", tags=["poetry"], reply_to=asker_reply)
                await asker.publish(T.prompt(), body.encode())
            await asker.publish(T.prompt(), b'{"prompt": 12}')  # invalid_request: counted by code
            await until(lambda: hub.answered >= 4 and hub.failed >= 1, what="answers and the failure")
        await until(
            lambda: T.metrics_win_rate("poetry") in seen and T.metrics_node("n2") in seen,
            timeout=20,
            what="metrics after the requests",
        )
        await asyncio.sleep(0.7)  # one more round, with the counts in
        reader.cancel()

    for topic, payloads in seen.items():
        assert SECRET.encode() not in b"".join(payloads), topic
        for payload in payloads:
            flat_numbers(payload)
    hub_keys = [set(flat_numbers(p)) for p in seen[T.metrics_hub()]]
    assert all(keys == set(HubMetrics.model_fields) for keys in hub_keys)
    last_hub = json.loads(seen[T.metrics_hub()][-1])
    assert last_hub["nodes_online"] == 2 and last_hub["answered_total"] >= 4 and last_hub["failed_total"] >= 1
    assert last_hub["latency_p50_ms"] > 0
    for node in ("n1", "n2"):
        assert all(set(flat_numbers(p)) == set(NodeMetrics.model_fields) for p in seen[T.metrics_node(node)])
    # Fan-in: one topic per NodeMetrics key, one key per node; unknown readings left out.
    for name in NodeMetrics.model_fields:
        last = json.loads(seen[T.metrics_fan_in(name)][-1])
        assert set(last) <= {"n1", "n2"}
    assert set(json.loads(seen[T.metrics_fan_in("online")][-1])) == {"n1", "n2"}
    assert sum(json.loads(seen[T.metrics_fan_in("tasks_done")][-1]).values()) == 4
    errors = json.loads(seen[T.metrics_fan_in("errors")][-1])
    assert set(errors) == {c.value for c in ErrorCode} and errors["invalid_request"] == 1
    poetry = json.loads(seen[T.metrics_win_rate("poetry")][-1])
    # Every node's decayed win rate, and every model's beside them (winrate.model_key).
    assert poetry and set(poetry) <= {"n1", "n2", "model:fake"} and all(0 < r < 1 for r in poetry.values())
    assert "model:fake" in poetry
    assert set(json.loads(seen[T.metrics_win_rate(ALL_TAGS)][-1])) == set(poetry)
    # Nothing else is published under metrics/.
    allowed = {T.metrics_hub(), T.metrics_node("n1"), T.metrics_node("n2"), T.metrics_fan_in("errors")}
    allowed |= {T.metrics_fan_in(n) for n in NodeMetrics.model_fields}
    allowed |= {T.metrics_win_rate(tag) for tag in ("poetry", ALL_TAGS)}
    assert set(seen) <= allowed, set(seen) - allowed
