"""2. Dispatch capacity: instant fake nodes, closed-loop load, against Celery + Redis.

Swarm: ``SwarmClient`` (benchmark process) → broker → hub (``swarm-hub serve``) → fake nodes
(the real ``Node`` agent with ``FakeEngine``, all in one fleet process) and back. Celery: the
benchmark process's threads → Redis → a prefork worker → Redis → the client. The same load
generator drives both, at the same concurrencies, in the same run.
"""

from __future__ import annotations

from typing import Any

from nova_swarm.broker.contract.errors import RequestFailed
from nova_swarm.broker.contract.messages import GenParams, PromptRequest
from nova_swarm.hub.client import SwarmClient

from .config import BenchConfig
from .fleet import Fleet, fleet_config
from .load import run_async
from .section import SectionResult, Table, fmt
from .stack import Stack
from .stats import ratio
from .targets import Target, all_below

PROMPT = PromptRequest(prompt="ping", params=GenParams(max_tokens=1), timeout_s=60)


async def swarm_load(client: SwarmClient, concurrency: int, seconds: float, warmup_s: float,
                     request: PromptRequest = PROMPT) -> Any:  # fmt: skip
    async def call(_: int) -> None:
        await client.ask(request, timeout=60)

    return await run_async(call, concurrency=concurrency, seconds=seconds, warmup_s=warmup_s)


async def measure(stack: Stack, cfg: BenchConfig) -> dict[str, Any]:
    ids = [f"n{i:03d}" for i in range(cfg.dispatch_nodes)]
    options = {"queue_max": cfg.dispatch_queue_max, "heartbeat_s": cfg.node_heartbeat_s}
    async with Fleet(stack, "fleet-dispatch", fleet_config(stack, ids, **options)):
        async with SwarmClient(stack.client_url()) as client:
            try:
                await client.ask(PROMPT, timeout=30)
            except RequestFailed as exc:
                raise RuntimeError(f"the swarm does not answer: {exc}") from exc
            results = [
                (await swarm_load(client, c, cfg.dispatch_seconds, cfg.dispatch_warmup_s)).to_json()
                for c in cfg.concurrencies
            ]
    return {"points": results, "nodes": cfg.dispatch_nodes}


# ---------------------------------------------------------------- report


def _by_c(points: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {p["concurrency"]: p for p in points}


def _p50(point: dict[str, Any] | None) -> float | None:
    return point["latency_ms"]["p50"] if point and "latency_ms" in point else None


def section(data: dict[str, Any], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    """``data``: {"amqtt": {...}, "mosquitto": {...}, "celery": {"points": [...]}}."""
    celery = _by_c(data["celery"]["points"]) if "celery" in data else {}
    rows: list[tuple[str, ...]] = []
    targets: list[Target] = []
    for system in [k for k in data if k != "celery"] + (["celery"] if "celery" in data else []):
        points = _by_c(data[system]["points"])
        for c in cfg.concurrencies:
            p = points.get(c)
            if p is None:
                continue
            lat = p.get("latency_ms", {})
            base = celery.get(c)
            x_tput = ratio(p["throughput"], base["throughput"]) if base and system != "celery" else None
            p50, base50 = _p50(p), _p50(base)
            x_p50 = ratio(p50, base50) if (p50 is not None and base50 is not None and system != "celery") else None
            p["vs_celery_throughput"] = None if x_tput is None else round(x_tput, 3)
            p["vs_celery_p50"] = None if x_p50 is None else round(x_p50, 3)
            name = system if system == "celery" else f"swarm/{system}"
            errs = sum(p["errors"].values())
            rows.append(
                (name, str(c), fmt(p["throughput"], ".0f"), fmt(lat.get("p50"), ".2f"), fmt(lat.get("p99"), ".2f"),
                 fmt(x_tput, ".2f", "x"), fmt(x_p50, ".2f", "x"), str(errs))
            )  # fmt: skip
        if system == "celery":
            continue
        peak = max((p["throughput"] for p in points.values()), default=0.0)
        celery_peak = max((p["throughput"] for p in celery.values()), default=0.0)
        need = {"mosquitto": 5.0, "amqtt": 1.5}.get(system)
        if need is not None:
            targets.append(Target("dispatch", f"peak throughput vs Celery's peak, {system}", ">=", need, "x",
                                  ratio(peak, celery_peak) if celery else None))  # fmt: skip
        if system == "mosquitto":
            targets.append(Target("dispatch", "p50 at concurrency 1, mosquitto", "<=", 2.0, " ms",
                                  _p50(points.get(1))))  # fmt: skip
        if system == "amqtt":
            beats = all_below([_p50(points.get(c)) for c in cfg.concurrencies],
                              [_p50(celery.get(c)) for c in cfg.concurrencies])  # fmt: skip
            worst = max((x for c in cfg.concurrencies if (x := points.get(c, {}).get("vs_celery_p50")) is not None),
                        default=None)  # fmt: skip
            targets.append(Target("dispatch", "worst p50 vs Celery's at any concurrency, amqtt", "<", 1.0, "x",
                                  worst if beats is not None else None))  # fmt: skip
    table = Table(
        ("system", "concurrency", "tasks/s", "p50 ms", "p99 ms", "tasks/s vs celery", "p50 vs celery", "errors"),
        tuple(rows),
    )
    notes = (
        f"swarm: {cfg.dispatch_nodes} instant FakeEngine nodes (Node agent, queue_max {cfg.dispatch_queue_max}) in one "
        "fleet process; hub = `swarm-hub serve`; client = one SwarmClient in the benchmark process; QoS 1.",
        "celery: Celery + Redis (redis-server on loopback, no persistence), prefork worker with one child per core, "
        "no-op task, `.delay().get()` from client threads in the benchmark process.",
        f"closed loop: each of `concurrency` workers sends its next request when the last returns; "
        f"{cfg.dispatch_seconds:g} s measured after {cfg.dispatch_warmup_s:g} s warm-up per point.",
    )
    return SectionResult("dispatch", "2. Dispatch capacity: the swarm vs Celery + Redis", data, (table,),
                         tuple(targets), notes, errors)  # fmt: skip
