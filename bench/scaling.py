"""3. Scaling: N fake nodes with a fixed service time under saturating load; and 1 vs 2 real
llama nodes (one thread each) on this machine.

Efficiency = throughput / (N × single-node throughput), the single node measured the same way
in the same run. Every N gets a fresh fleet process; the hub and broker stay up.
"""

from __future__ import annotations

import uuid
from typing import Any

from nova_swarm.broker.contract.messages import GenParams, PromptRequest
from nova_swarm.hub.client import SwarmClient

from .config import BenchConfig
from .dispatch import swarm_load
from .fleet import Fleet, fleet_config
from .load import run_async
from .overhead import WARM_PROMPT
from .overhead import request as llama_request
from .section import SectionResult, Table, fmt
from .stack import Stack
from .stats import efficiency
from .targets import Target

WORK = PromptRequest(prompt="work", params=GenParams(max_tokens=1), timeout_s=120)


async def measure_fake(stack: Stack, cfg: BenchConfig) -> dict[str, Any]:
    points = []
    for n in cfg.scaling_ns:
        ids = [f"n{i:03d}" for i in range(n)]
        fleet = fleet_config(stack, ids, delay="fixed", delay_s=cfg.service_s, heartbeat_s=cfg.node_heartbeat_s)
        in_flight = n * cfg.saturation_per_node
        # All requests start at once; measure only once every one has been round at least once
        # (at a few hundred a second), so the window sees the steady state, not that first wave.
        warmup = cfg.scaling_warmup_s + in_flight / 250
        async with Fleet(stack, f"fleet-scale-{n}", fleet), SwarmClient(stack.client_url()) as client:
            result = await swarm_load(client, in_flight, cfg.scaling_seconds, warmup, WORK)
        points.append({"nodes": n, **result.to_json()})
    single = points[0]["throughput"] if points and points[0]["nodes"] == 1 else None
    for p in points:
        eff = efficiency(p["throughput"], p["nodes"], single) if single else None
        p["efficiency"] = None if eff is None else round(eff, 4)
    return {"points": points, "service_s": cfg.service_s}


async def measure_real(stack: Stack, cfg: BenchConfig, *, nodes: int) -> dict[str, Any]:
    """With ``nodes`` llama nodes online: closed loop at 2 per node, every prompt new (cold)."""

    async def call(_: int) -> None:
        await client.ask(llama_request(f"{uuid.uuid4().hex[:8]}: {WARM_PROMPT}", cfg), timeout=120)

    async with SwarmClient(stack.client_url()) as client:
        result = await run_async(
            call, concurrency=2 * nodes, seconds=cfg.real_scaling_seconds, warmup_s=cfg.real_warmup_s
        )
    return {"nodes": nodes, **result.to_json()}


# ---------------------------------------------------------------- report

EFFICIENCY_TARGET = {"mosquitto": 0.95, "amqtt": 0.9}
REAL_TARGET = 1.8


def section(data: dict[str, Any], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    rows: list[tuple[str, ...]] = []
    real_rows: list[tuple[str, ...]] = []
    targets: list[Target] = []
    for broker, d in data.items():
        fake = d.get("fake")
        if fake:
            for p in fake["points"]:
                ideal = p["nodes"] / cfg.service_s
                rows.append((broker, str(p["nodes"]), fmt(p["throughput"], ".1f"), fmt(ideal, ".0f"),
                             fmt(p["efficiency"], ".3f"), fmt(p.get("latency_ms", {}).get("p50"), ".0f"),
                             str(sum(p["errors"].values()))))  # fmt: skip
            upto = [p for p in fake["points"] if p["nodes"] <= 64 and p["efficiency"] is not None]
            worst = min(upto, key=lambda p: p["efficiency"]) if upto else None
            targets.append(
                Target("scaling", f"worst efficiency for N <= 64, {broker}", ">=", EFFICIENCY_TARGET[broker], "",
                       worst["efficiency"] if worst else None,
                       note=f"at N = {worst['nodes']}" if worst else "")
            )  # fmt: skip
        real = d.get("real")
        if real:
            one, two = real.get("one"), real.get("two")
            speedup = two["throughput"] / one["throughput"] if one and two and one["throughput"] else None
            real["speedup"] = None if speedup is None else round(speedup, 3)
            real_rows.append((broker, fmt(one["throughput"] if one else None, ".2f"),
                              fmt(two["throughput"] if two else None, ".2f"), fmt(speedup, ".2f", "x")))  # fmt: skip
            targets.append(Target("scaling", f"2 real llama nodes vs 1, {broker}", ">=", REAL_TARGET, "x", speedup))
    tables = (
        Table(
            ("broker", "nodes", "tasks/s", "ideal", "efficiency", "p50 ms", "errors"),
            tuple(rows),
            f"fake nodes, {cfg.service_s * 1000:.0f} ms fixed service time",
        ),  # fmt: skip
        Table(
            ("broker", "1 node req/s", "2 nodes req/s", "speedup"),
            tuple(real_rows),
            f"real llama nodes, 1 thread each, max_tokens {cfg.max_tokens}, every prompt new",
        ),  # fmt: skip
    )
    notes = (
        f"fake: N Node agents with FakeEngine in one fleet process, {cfg.saturation_per_node} requests in flight "
        f"per node (closed loop: its 5 places, 1 slot + a queue of 4, and one waiting at the hub), "
        f"{cfg.scaling_seconds:g} s measured per N after a warm-up of {cfg.scaling_warmup_s:g} s + in-flight/250 s; "
        "hub = `swarm-hub serve`.",
        "real: separate `swarm-node run` processes on the bundled model, 2 requests in flight per node, "
        f"{cfg.real_scaling_seconds:g} s measured; on this 2-core machine the broker, hub and client share the "
        "cores with the two llama threads.",
    )
    return SectionResult("scaling", "3. Scaling with N nodes", data, tables, tuple(targets), notes, errors)
