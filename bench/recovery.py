"""5. Recovery: SIGKILL a real ``swarm-node run`` process mid-task; how long until the task
restarts on another node, and until its answer arrives.

Three node processes with the fake engine (a fixed task time, so the kill always lands mid-task).
A watcher with the hub's login sees each task published to a node: the first tells us whom to
kill, the second (same request id, the other node) is the restart. The killed node is started
again before the next trial. On Mosquitto the node's Last Will fires when its socket dies; on
amqtt the hub may have to wait for the heartbeat timeout, which is printed with the figures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from typing import Any

from nova_swarm.broker.contract.messages import GenParams, PromptRequest
from nova_swarm.broker.home import Role
from nova_swarm.hub.client import SwarmClient

from .config import BenchConfig
from .section import SectionResult, Table, fmt
from .stack import Stack, TaskSeen, Watcher
from .stats import Summary
from .targets import Target

#: three, so a trial never waits for the last victim to restart: two are always up to race
NODES = ("r-a", "r-b", "r-c")
#: recovery times other systems document, in seconds, printed for comparison
PEERS = (("Petals", "15 s"), ("GPUStack", "15-20 s"), ("LocalAI", "40 s"), ("AI Horde", "150 s"))
PEERS_S = {"Petals": 15.0, "GPUStack": 17.5, "LocalAI": 40.0, "AI Horde": 150.0}


async def _next_task(
    tasks: asyncio.Queue[TaskSeen], request_id: str, *, not_on: str | None, timeout: float
) -> TaskSeen:
    give_up = time.monotonic() + timeout
    while True:
        seen = await asyncio.wait_for(tasks.get(), max(0.01, give_up - time.monotonic()))
        if seen.request_id == request_id and seen.node_id != not_on:
            return seen


async def measure(stack: Stack, cfg: BenchConfig) -> dict[str, Any]:
    def start(node_id: str) -> subprocess.Popen[bytes]:
        argv = stack.node_argv(node_id, "--engine", "fake", "--engine-option", f"delay_s={cfg.recovery_task_s}",
                               "--heartbeat", str(cfg.node_heartbeat_s))  # fmt: skip
        return stack.procs.spawn(f"node-{node_id}", argv)

    base = stack.watch.hub.nodes_online if stack.watch.hub else 0
    watcher = Watcher(stack.url(Role.HUB), stack.topics)
    await watcher.start(watch_tasks=True)
    procs = {node_id: start(node_id) for node_id in NODES}
    trials: list[dict[str, float | str]] = []
    try:
        await stack.watch.nodes_online(base + len(NODES), timeout=120)
        async with SwarmClient(stack.client_url()) as client:
            for _ in range(cfg.recovery_trials):
                while not watcher.tasks.empty():
                    watcher.tasks.get_nowait()
                request_id = f"recover-{uuid.uuid4().hex[:12]}"
                request = PromptRequest(id=request_id, prompt="recover", params=GenParams(max_tokens=1), timeout_s=120)
                reply = await client.send(request)
                first = await _next_task(watcher.tasks, request_id, not_on=None, timeout=30)
                # Well inside the task: the node has taken it and is "generating".
                await asyncio.sleep(min(0.3, cfg.recovery_task_s / 3))
                victim = first.node_id
                killed = time.perf_counter()
                os.kill(procs[victim].pid, signal.SIGKILL)
                second = await _next_task(watcher.tasks, request_id, not_on=victim, timeout=120)
                await asyncio.wait_for(reply, 120)
                answered = time.perf_counter()
                trials.append({"killed": victim, "restart_s": second.at - killed, "answer_s": answered - killed})
                await stack.procs.stop(procs[victim])
                procs[victim] = start(victim)  # back in a second or two, while the next trial runs
                # The next trial needs one node to hold its task and another to restart it on.
                await stack.watch.nodes_online(base + len(NODES) - 1, timeout=120)
            await stack.watch.nodes_online(base + len(NODES), timeout=120)
    finally:
        await watcher.stop()
        for proc in procs.values():
            await stack.procs.stop(proc)
        await stack.watch.nodes_online(base, exactly=True, timeout=60)
    restart = [float(t["restart_s"]) for t in trials]
    answer = [float(t["answer_s"]) for t in trials]
    return {
        "trials": [{k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()} for t in trials],
        "restart_s": Summary.of(restart).to_json(),
        "answer_s": Summary.of(answer).to_json(),
        "task_s": cfg.recovery_task_s,
        "heartbeat_timeout_s": stack.config.heartbeat_timeout_s,
    }


def section(data: dict[str, Any], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    rows: list[tuple[str, ...]] = []
    targets: list[Target] = []
    for broker, d in data.items():
        r, a = d["restart_s"], d["answer_s"]
        rows.append((broker, str(r["n"]), fmt(r["p50"], ".3f"), fmt(r["max"], ".3f"), fmt(a["p50"], ".3f"),
                     fmt(a["max"], ".3f"), f"{d['heartbeat_timeout_s']:g} s"))  # fmt: skip
        if broker == "mosquitto":
            targets.append(Target("recovery", "p50 restart after SIGKILL, mosquitto", "<", 1.0, " s", r["p50"]))
    table = Table(
        ("broker", "trials", "restart p50 s", "restart max s", "answer p50 s", "answer max s", "hub heartbeat timeout"),
        tuple(rows),
    )
    peers = Table(("peer", "documented recovery"), PEERS, "peers, for comparison")
    notes = (
        f"three `swarm-node run --engine fake` processes (task time {cfg.recovery_task_s:g} s); the node holding the "
        "task is killed with SIGKILL about 0.3 s into it; restart = kill until the hub publishes the task to the "
        "other node; answer = kill until the client has the answer (includes the task time).",
    )
    return SectionResult("recovery", "5. Recovery after SIGKILL", data, (table, peers), tuple(targets), notes, errors)
