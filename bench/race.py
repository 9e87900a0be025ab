"""4. Race tail latency: nodes with a log-normal service time, ``race`` at fanout 1, 2 and 3.

The first answer wins and the hub cancels the others; with a heavy tail, asking two or three
nodes cuts the p99 far more than the p50.
"""

from __future__ import annotations

from typing import Any

from nova_swarm.broker.contract.messages import GenParams, PromptRequest
from nova_swarm.hub.client import SwarmClient

from .config import BenchConfig
from .dispatch import swarm_load
from .fleet import Fleet, fleet_config
from .section import SectionResult, Table, fmt
from .stack import Stack
from .stats import tail_cut


def _request(fanout: int) -> PromptRequest:
    return PromptRequest(prompt="race", params=GenParams(max_tokens=1), strategy="race", fanout=fanout, timeout_s=60)


async def measure(stack: Stack, cfg: BenchConfig) -> dict[str, Any]:
    ids = [f"n{i:03d}" for i in range(cfg.race_nodes)]
    fleet = fleet_config(stack, ids, delay="lognormal", delay_s=cfg.race_median_s, sigma=cfg.race_sigma,
                         heartbeat_s=cfg.node_heartbeat_s)  # fmt: skip
    # A fixed number of requests per fanout: at median 50 ms, about race_requests / concurrency
    # × 60 ms of wall time. The load generator is time-boxed, so convert.
    seconds = max(cfg.race_min_seconds, cfg.race_requests * cfg.race_median_s * 1.6 / cfg.race_concurrency)
    points = []
    async with Fleet(stack, "fleet-race", fleet), SwarmClient(stack.client_url()) as client:
        for fanout in cfg.race_fanouts:
            result = await swarm_load(client, cfg.race_concurrency, seconds, 0.3, _request(fanout))
            points.append({"fanout": fanout, **result.to_json()})
    return {"points": points}


def section(data: dict[str, Any], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    rows: list[tuple[str, ...]] = []
    for broker, d in data.items():
        base = next((p for p in d["points"] if p["fanout"] == 1 and "latency_ms" in p), None)
        for p in d["points"]:
            lat = p.get("latency_ms", {})
            cut99 = tail_cut(base["latency_ms"]["p99"], lat["p99"]) if base and lat else None
            p["p99_cut"] = None if cut99 is None else round(cut99, 3)
            rows.append((broker, str(p["fanout"]), str(p["completed"]), fmt(lat.get("p50"), ".0f"),
                         fmt(lat.get("p95"), ".0f"), fmt(lat.get("p99"), ".0f"),
                         "-" if cut99 is None else f"{cut99 * 100:.0f} %"))  # fmt: skip
    table = Table(("broker", "fanout", "requests", "p50 ms", "p95 ms", "p99 ms", "p99 cut vs fanout 1"), tuple(rows))
    notes = (
        f"{cfg.race_nodes} FakeEngine nodes in one fleet process, service time log-normal with median "
        f"{cfg.race_median_s * 1000:.0f} ms and sigma {cfg.race_sigma:g}; {cfg.race_concurrency} requests in flight; "
        "losers are cancelled by the hub.",
    )
    return SectionResult("race", "4. Race: tail latency with fanout", data, (table,), (), notes, errors)
