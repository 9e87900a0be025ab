"""Win rates, the scheduler and the reranker, checked directly."""

from __future__ import annotations

import random
from collections import Counter

from nova_swarm.broker.contract.messages import Announce, ModelInfo, NodeState
from nova_swarm.hub.registry import NodeRecord, Registry
from nova_swarm.hub.rerank import Candidate, RuleReranker, repetition
from nova_swarm.hub.scheduler import Scheduler
from nova_swarm.hub.winrate import WinRates


def announce(node_id: str, slots: int = 1, queue_max: int = 1) -> Announce:
    return Announce(
        node_id=node_id,
        model=ModelInfo(name="m", sha256="0" * 64, size_bytes=1, ctx=512),
        threads=1,
        tokens_per_s=10.0,
        ram_total_mb=None,
        device="laptop",
        agent_version="t",
        slots=slots,
        queue_max=queue_max,
        max_tokens=64,
        max_temperature=1.0,
        ts=0.0,
    )


def node(node_id: str, inflight: int = 0) -> NodeRecord:
    return NodeRecord(node_id, announce(node_id), NodeState.ONLINE, last_seen=0.0, inflight=inflight)


def test_win_rates_decay_towards_the_prior() -> None:
    rates = WinRates(half_life_s=10.0)
    for _ in range(10):
        rates.record("a", ["math"], won=True, now=0.0)
    assert rates.rate("a", "math", 0.0) == 11 / 12
    assert rates.rate("a", "*", 0.0) == 11 / 12  # '*' counts every request
    assert abs(rates.rate("a", "math", 10.0) - 6 / 7) < 1e-9  # half the evidence after one half-life
    assert rates.rate("a", "math", 1000.0) < 0.51
    assert rates.rate("b", "math", 0.0) == 0.5  # no history: the prior


def test_dirty_rows_are_handed_out_once() -> None:
    rates = WinRates()
    rates.record("a", ["x"], won=False, now=1.0)
    rows = rates.take_dirty()
    assert {(r[0], r[1]) for r in rows} == {("a", "x"), ("a", "*")}
    assert rates.take_dirty() == []
    again = WinRates(rows=rows)
    assert again.rate("a", "x", 1.0) == rates.rate("a", "x", 1.0)


def test_scheduler_prefers_the_tag_winner_but_still_explores() -> None:
    rates = WinRates()
    for _ in range(20):
        rates.record("fast", ["math"], won=True, now=0.0)
        rates.record("slow", ["math"], won=False, now=0.0)
    sched = Scheduler(rates, random.Random(1))
    picks = Counter(sched.pick([node("fast"), node("slow")], 1, tags=["math"], now=0.0)[0].node_id for _ in range(500))
    assert picks["fast"] > 450
    untagged = Counter(
        sched.pick([node("fast"), node("slow")], 1, tags=["poetry"], now=0.0)[0].node_id for _ in range(500)
    )
    assert 150 < untagged["slow"] < 350  # no evidence for 'poetry': both get traffic


def test_scheduler_skips_full_nodes_and_marks_down_busy_ones() -> None:
    sched = Scheduler(WinRates(), random.Random(2))
    assert sched.pick([node("full", inflight=2)], 1, tags=[], now=0.0) == []
    picks = Counter(
        sched.pick([node("idle"), node("busy", inflight=1)], 1, tags=[], now=0.0)[0].node_id for _ in range(300)
    )
    assert picks["idle"] > picks["busy"]


def test_registry_liveness_needs_live_messages() -> None:
    reg = Registry(heartbeat_timeout_s=5.0)
    reg.on_announce(announce("a"), live=False, now=100.0)
    from nova_swarm.broker.contract.messages import Status

    reg.on_status(Status(node_id="a", state=NodeState.ONLINE), live=False, now=100.0)
    assert reg.eligible(model=None, exclude=frozenset(), now=100.0) == []  # retained only: not yet live
    reg.on_status(Status(node_id="a", state=NodeState.ONLINE), live=True, now=100.0)
    assert [n.node_id for n in reg.eligible(model=None, exclude=frozenset(), now=101.0)] == ["a"]
    assert reg.expire(106.0) == ["a"]
    assert reg.counts(106.0) == {"online": 0, "paused": 0, "offline": 1}


def test_reranker_prefers_relevant_agreeing_answers() -> None:
    prompt = "What is the capital of France?"
    cands = [
        Candidate("The capital of France is Paris.", "stop"),
        Candidate("Paris is the capital of France.", "stop"),
        Candidate("I like turtles turtles turtles turtles turtles turtles turtles turtles", "stop"),
        Candidate("", "stop"),
    ]
    scores = RuleReranker().score(prompt, cands)
    assert scores[0] > scores[2] and scores[1] > scores[2] > scores[3]
    assert repetition("a b c a b c a b c a b c") > 0.5


def test_scheduler_prefers_cool_charging_nodes_when_it_has_a_choice() -> None:
    from nova_swarm.broker.contract.messages import Heartbeat

    def with_heartbeat(node_id: str, temp_c: float | None, charging: bool | None, battery: float | None) -> NodeRecord:
        rec = node(node_id)
        rec.heartbeat = Heartbeat(
            node_id=node_id,
            ts=0.0,
            battery_pct=battery,
            charging=charging,
            temp_c=temp_c,
            ram_free_mb=None,
            load=None,
            tokens_per_s=None,
            busy=0,
            slots=1,
            queued=0,
            tokens_served=0,
            tasks_done=0,
            tasks_failed=0,
        )
        return rec

    sched = Scheduler(WinRates(), random.Random(3))
    cool = with_heartbeat("cool", 31.0, True, 80.0)
    warm = with_heartbeat("warm", 40.0, False, 35.0)
    picks = Counter(sched.pick([cool, warm], 1, tags=[], now=0.0)[0].node_id for _ in range(500))
    assert picks["cool"] > 400 and picks["warm"] > 0  # preferred, not exclusive
    unknown = with_heartbeat("desktop", None, None, None)  # no sensors: no penalty
    picks = Counter(sched.pick([cool, unknown], 1, tags=[], now=0.0)[0].node_id for _ in range(500))
    assert 150 < picks["desktop"] < 350


def test_queued_work_counts_so_queues_do_not_pile_up_on_a_few_nodes() -> None:
    sched = Scheduler(WinRates(half_life_s=3600), random.Random(3))
    one_slot_queues = [NodeRecord(f"q{i}", announce(f"q{i}", queue_max=8), NodeState.ONLINE, 0.0) for i in range(2)]
    one_slot_queues[0].inflight = 1  # running one
    one_slot_queues[1].inflight = 4  # running one, three waiting
    picks = Counter(sched.pick(one_slot_queues, 1, tags=[], now=0.0)[0].node_id for _ in range(300))
    # with equal (unknown) win rates, the node with three tasks waiting gets almost nothing
    assert picks["q0"] > 290
