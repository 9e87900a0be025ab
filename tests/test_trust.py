"""Trust: bad work costs a node its share of requests, and new nodes never work alone."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from nova_swarm.broker.contract.messages import Announce, Answer, ErrorReply, ModelInfo, PromptRequest
from nova_swarm.broker.home import Role
from nova_swarm.hub import SwarmClient
from nova_swarm.hub.registry import Registry
from nova_swarm.hub.scheduler import Scheduler
from nova_swarm.hub.trust import Trust, TrustConfig
from nova_swarm.hub.winrate import WinRates
from nova_swarm.node import FakeEngine

from .conftest import BIN, Processes, RunningBroker, hub_config, nodes_available, running_hub, running_node, wait_online


def announce(node_id: str) -> Announce:
    model = ModelInfo(name="m", sha256="a" * 64, size_bytes=1, ctx=512)
    return Announce(
        node_id=node_id, model=model, threads=1, tokens_per_s=10.0, ram_total_mb=None, device="laptop",
        agent_version="0", slots=1, queue_max=1, max_tokens=64, max_temperature=1.0, ts=0.0,
    )  # fmt: skip


def test_trust_moves_with_the_work_and_probation_ends_after_enough_answers() -> None:
    t = Trust(TrustConfig(start=0.5, step=0.1, probation_tasks=3))
    assert t.score("new") == 0.5 and t.on_probation("new")
    for _ in range(3):
        t.answered("good")
        t.answered("garbage", lost_every_ranking=True)
    assert t.score("good") > 0.6 > 0.4 > t.score("garbage")
    assert not t.on_probation("good") and not t.on_probation("garbage")
    before = t.score("flaky")
    t.failed("flaky", "node_busy")  # a refusal costs nothing
    assert t.score("flaky") == before
    for code in ("deadline_exceeded", "engine_error", "node_lost"):
        t.failed("flaky", code)
    assert t.score("flaky") < before
    # The ledger replays to the same scores.
    bodies = [
        {"node_id": "good", "ok": True, "rank": 1, "ranked": 2},
        {"node_id": "garbage", "ok": True, "rank": 2, "ranked": 2},
        {"node_id": "garbage", "ok": False, "error_code": "engine_error"},
    ]
    again = Trust(TrustConfig(step=0.1))
    assert again.replay(bodies) == 3
    assert again.score("good") > 0.5 > again.score("garbage")


def test_the_scheduler_prefers_the_trusted_node_when_all_else_is_equal() -> None:
    registry = Registry()
    trust = Trust()
    for _ in range(20):
        trust.answered("good")
        trust.answered("bad", lost_every_ranking=True)
    scheduler = Scheduler(WinRates(), random.Random(1), trust)
    for node_id in ("good", "bad"):
        rec = registry.record(node_id)
        rec.announce = announce(node_id)
    picks = Counter(scheduler.pick(list(registry.nodes.values()), 1, tags=[], now=0.0)[0].node_id for _ in range(400))
    assert picks["good"] > 0.75 * 400, picks


async def test_a_node_returning_garbage_loses_trust_and_stops_being_chosen(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    good = FakeEngine(reply=lambda p: f"The answer to {p} is a clear and relevant sentence about {p}.")
    bad = FakeEngine(reply="zzzz zzzz zzzz zzzz zzzz zzzz")
    async with (
        running_hub(amqtt, hub_config(tmp_path)) as hub,
        running_node(amqtt, good, "good"),
        running_node(amqtt, bad, "bad"),
        SwarmClient(amqtt.url(Role.CLIENT)) as client,
    ):
        await nodes_available(hub, 2)
        # best_of_n puts both to work and ranks them: the garbage always comes last.
        for i in range(20):
            reply = await client.ask(PromptRequest(prompt=f"topic {i}", strategy="best_of_n", fanout=2), timeout=30)
            assert reply.node_id == "good"
        assert hub.trust.score("bad") < 0.25 < 0.75 < hub.trust.score("good")
        bad_calls = bad.calls
        # Now single-node races: the good node takes nearly all of them.
        for i in range(40):
            reply = await client.ask(PromptRequest(prompt=f"race {i}"), timeout=30)
            assert isinstance(reply, Answer)
        assert bad.calls - bad_calls <= 6, f"the distrusted node still got {bad.calls - bad_calls} of 40"


def test_a_new_node_never_works_a_request_alone_while_a_proven_node_is_free(tmp_path: Path) -> None:
    from nova_swarm.broker.link.url import BrokerURL
    from nova_swarm.hub import Hub

    hub = Hub(hub_config(tmp_path), BrokerURL("127.0.0.1", 1))  # the rule alone: nothing connects
    for node_id in ("veteran", "newcomer", "other-newcomer"):
        rec = hub.registry.record(node_id)
        rec.announce = announce(node_id)
    for _ in range(hub.trust.config.probation_tasks):
        hub.trust.answered("veteran")
    nodes = hub.registry.nodes
    vet, new, new2 = nodes["veteran"], nodes["newcomer"], nodes["other-newcomer"]
    race, best = PromptRequest(prompt="x"), PromptRequest(prompt="x", strategy="best_of_n", fanout=2)
    assert hub.placement.with_a_proven_node([new], [new, vet], race, 0.0) == [new, vet]  # a proven node runs alongside
    assert hub.placement.with_a_proven_node([new, new2], [new, new2, vet], best, 0.0) == [new, vet]  # and takes a seat
    assert hub.placement.with_a_proven_node([vet], [new, vet], race, 0.0) == [vet]
    assert hub.placement.with_a_proven_node([new], [new, new2], race, 0.0) == [new]  # a new swarm: nobody proven yet
    vet.inflight = vet.capacity  # the veteran is full: the newcomer may work alone rather than wait
    assert hub.placement.with_a_proven_node([new], [new, vet], race, 0.0) == [new]


async def test_a_private_request_reaches_only_trusted_nodes_and_leaves_no_text(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    secret = "walrus-trombone-3301"
    home = amqtt.home
    home.enroll("vault", trusted=True)
    home.enroll("stranger")  # not trusted (the default)
    procs = Processes(amqtt, tmp_path)
    try:
        procs.hub()
        for node_id in ("vault", "stranger"):
            procs.node(node_id, "--engine", "fake", "--engine-option", f"reply=echo {secret}", "--no-updates")
        await wait_online(procs, 2)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            replies = [
                await client.ask(PromptRequest(prompt=f"{secret} {i}", private=True, fanout=2), timeout=60)
                for i in range(12)
            ]
            assert all(r.node_id == "vault" and r.attempts == 1 for r in replies)  # fanout 2, one trusted node
        # The owner stops trusting the only trusted node: private requests now have nowhere to go.
        home.enroll("vault", trusted=False)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            reply = await (await client.send(PromptRequest(prompt=f"{secret} late", private=True)))
        assert isinstance(reply, ErrorReply) and "trusted with private requests" in reply.error.message
    finally:
        procs.close()
    receipts_out = procs.run([str(BIN / "swarm-hub"), "ledger", "export", "--config-dir", str(home.path)]).stdout
    bodies = [json.loads(line)["body"] for line in receipts_out.splitlines()]
    private = [b for b in bodies if b["private"]]
    assert len(private) == 12 and {b["node_id"] for b in private} == {"vault"}
    # Not a word of it anywhere on disk: logs, journal, registry, ledger.
    for path in [*home.path.glob("logs/*"), *home.path.glob("*.sqlite*")]:
        assert secret.encode() not in path.read_bytes(), path.name
