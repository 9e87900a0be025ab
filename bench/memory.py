"""6. Memory: the hub and the broker with 1,000 simulated nodes heartbeating, and the node
agent's overhead on top of its model.

Hub and broker: a fresh swarm (the hub's default 35 s heartbeat timeout, so nodes that beat every
10 s stay online), idle first, then with the ``simnodes`` process's 1,000 connections. RSS is
sampled while they beat and the largest sample is reported.

Node: a real ``swarm-node run`` process on the bundled model against a bare process that only
loads the same model with the same settings and generates once (``bare_llama``), side by side.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from nova_swarm.broker.home import Role

from .config import BenchConfig
from .overhead import bundled_model
from .procs import PYTHON, rss_mb
from .section import SectionResult, Table, fmt
from .stack import Stack, StackConfig

HUB_TARGET_MB = 150.0
NODE_TARGET_MB = 60.0


async def _sample(read: dict[str, Any], seconds: float) -> dict[str, float | None]:
    """The largest of each reading over ``seconds`` (at least one sample)."""
    peak: dict[str, float | None] = {k: None for k in read}
    end = time.monotonic() + seconds
    while True:
        for name, fn in read.items():
            value = fn()
            if value is not None and (peak[name] is None or value > (peak[name] or 0)):
                peak[name] = value
        if time.monotonic() >= end:
            return peak
        await asyncio.sleep(0.5)


async def hub_and_broker(broker: str, cfg: BenchConfig, workdir: Path) -> dict[str, Any]:
    async with Stack(StackConfig(broker=broker, heartbeat_timeout_s=35.0), workdir) as stack:
        await asyncio.sleep(cfg.memory_idle_s)
        read = {"hub_mb": stack.hub_rss_mb, "broker_mb": stack.broker_rss_mb}
        idle = await _sample(read, 0.5)
        password = stack.home.logins()[Role.HUB].password
        started = time.perf_counter()
        sim = stack.procs.spawn(
            "simnodes",
            [PYTHON, "-m", "nova_swarm.bench.simnodes", "--port", str(stack.port), "--username", "hub",
             "--count", str(cfg.memory_nodes), "--interval", str(cfg.memory_heartbeat_s)],
            extra_env={"NOVA_BENCH_PASSWORD": password},
        )  # fmt: skip
        await stack.printed_ready("simnodes", sim, timeout=180)
        connected_s = time.perf_counter() - started
        await stack.watch.nodes_online(cfg.memory_nodes, timeout=120)
        online_s = time.perf_counter() - started
        loaded = await _sample(read, cfg.memory_window_s)
        await stack.procs.stop(sim)
    return {
        "nodes": cfg.memory_nodes,
        "heartbeat_s": cfg.memory_heartbeat_s,
        "window_s": cfg.memory_window_s,
        "connect_s": round(connected_s, 2),
        "all_online_s": round(online_s, 2),
        "idle": {k: None if v is None else round(v, 1) for k, v in idle.items()},
        "loaded": {k: None if v is None else round(v, 1) for k, v in loaded.items()},
    }


async def node_overhead(stack: Stack, node_pid: int, cfg: BenchConfig) -> dict[str, Any]:
    bare = stack.procs.spawn(
        "bare-llama",
        [PYTHON, "-m", "nova_swarm.bench.bare_llama", bundled_model(), str(cfg.llama_threads), "16"],
    )
    try:
        await stack.printed_ready("bare-llama", bare, timeout=120)
        await asyncio.sleep(0.5)
        peak = await _sample({"node_mb": lambda: rss_mb(node_pid), "bare_mb": lambda: rss_mb(bare.pid)}, 2.0)
    finally:
        await stack.procs.stop(bare)
    node, model = peak["node_mb"], peak["bare_mb"]
    return {
        "node_mb": None if node is None else round(node, 1),
        "model_only_mb": None if model is None else round(model, 1),
        "overhead_mb": None if node is None or model is None else round(node - model, 1),
    }


def section(data: dict[str, Any], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    from .targets import Target

    rows: list[tuple[str, ...]] = []
    targets: list[Target] = []
    for broker, d in data.get("brokers", {}).items():
        rows.append((broker, "hub, idle", fmt(d["idle"]["hub_mb"], ".1f")))
        rows.append((broker, f"hub, {d['nodes']} nodes", fmt(d["loaded"]["hub_mb"], ".1f")))
        rows.append((broker, "broker, idle", fmt(d["idle"]["broker_mb"], ".1f")))
        rows.append((broker, f"broker, {d['nodes']} nodes", fmt(d["loaded"]["broker_mb"], ".1f")))
        targets.append(Target("memory", f"hub RSS at {d['nodes']} nodes, {broker}", "<=", HUB_TARGET_MB, " MB",
                              d["loaded"]["hub_mb"]))  # fmt: skip
    node = data.get("node")
    if node:
        rows.append(("-", "node agent (swarm-node run)", fmt(node["node_mb"], ".1f")))
        rows.append(("-", "bare process, model only", fmt(node["model_only_mb"], ".1f")))
        rows.append(("-", "node overhead", fmt(node["overhead_mb"], "+.1f")))
        targets.append(Target("memory", "node agent overhead above the model", "<=", NODE_TARGET_MB, " MB",
                              node["overhead_mb"]))  # fmt: skip
    notes = (
        f"{cfg.memory_nodes} simulated nodes = {cfg.memory_nodes} MQTT connections from one `simnodes` process, "
        f"each with a retained announce and status and a heartbeat every {cfg.memory_heartbeat_s:g} s; largest RSS "
        f"over {cfg.memory_window_s:g} s once the hub counts them all online. Mosquitto's RSS is the mosquitto "
        "process's; amqtt's is the swarm-broker process's.",
        "node: `swarm-node run` on the bundled model vs a process that only loads it (same ctx and threads) and "
        "generates once, side by side.",
    )
    table = Table(("broker", "process", "RSS MB"), tuple(rows))
    return SectionResult("memory", "6. Memory", data, (table,), tuple(targets), notes, errors)
