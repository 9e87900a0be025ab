"""5b. Recovery after the link goes down: a phone drops off Wi-Fi mid-task. How long until its
task restarts on another phone, until the answer arrives, and until the phone is back by itself.

Unlike a SIGKILL, where the kernel closes the socket and the broker sees it at once, a phone that
walks out of range leaves a half-open TCP connection: no FIN, no RST. Here that is its port on a
virtual LAN's bridge going down (``lan.py``: network namespaces, one per phone, and the broker
and hub in the LAN's hub namespace). Three `swarm-node run --engine fake` phones; each trial
sends one request, drops the link of the phone that got it about 0.3 s in, and times the restart
on another phone; then the link comes back and the trial waits until the hub counts the phone
online again, which the phone does on its own.

Only a process inside the hub namespace can reach that broker, so the trials run in a child,
``python -m nova_swarm.bench.linkdown`` under `ip netns exec`, which prints its figures as JSON.
Needs root (network namespaces); without it the section says so and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from nova_swarm.broker.contract.messages import GenParams, PromptRequest
from nova_swarm.broker.home import Role
from nova_swarm.hub.client import SwarmClient

from .config import BenchConfig
from .lan import Lan, check_available
from .procs import BIN, PYTHON
from .recovery import _next_task
from .section import SectionResult, Table, fmt
from .stack import Stack, StackConfig, Watcher
from .stats import Summary
from .targets import Target

PHONES = 3
#: the issue's targets for a dropped phone
TARGET_P50_S = 3.0
TARGET_MAX_S = 5.0


async def measure(cfg: BenchConfig, broker: str, workdir: Path) -> dict[str, Any]:
    """Build the LAN, run the trials in its hub namespace, and tear it all down."""
    check_available()  # LanUnavailable (not root, no iproute2) becomes this part's error
    workdir.mkdir(parents=True, exist_ok=True)
    lan = await asyncio.to_thread(Lan(PHONES, workdir).__enter__)
    try:
        argv = [PYTHON, "-m", "nova_swarm.bench.linkdown", "--tag", lan.tag, "--phones", str(PHONES)]
        argv += ["--root", str(workdir), "--broker", broker, "--trials", str(cfg.linkdown_trials)]
        argv += ["--task-s", str(cfg.linkdown_task_s), "--heartbeat-s", str(cfg.node_heartbeat_s)]
        argv += ["--heartbeat-timeout", str(cfg.heartbeat_timeout_s)]
        log = workdir / "trials.log"
        with log.open("ab") as err:
            child = await asyncio.create_subprocess_exec(
                *lan.hub.argv(argv), stdout=asyncio.subprocess.PIPE, stderr=err, env=lan.hub.env()
            )
            try:
                out, _ = await child.communicate()
            finally:
                if child.returncode is None:  # cancelled (the part's time ran out)
                    child.kill()
                    await child.wait()
        if child.returncode != 0:
            raise RuntimeError(f"the trials exited with {child.returncode}: {log.read_text(errors='replace')[-1500:]}")
        return dict(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        await asyncio.to_thread(lan.close)


async def trials(
    lan: Lan, broker: str, workdir: Path, *, count: int, task_s: float, heartbeat_s: float, hub_timeout_s: float
) -> dict[str, Any]:
    """The trials themselves, run inside the hub namespace."""
    names = tuple(p.name for p in lan.phones)
    # 0.0.0.0 inside the hub namespace: the bridge for the phones, loopback for us, and nothing else.
    config = StackConfig(broker=broker, heartbeat_timeout_s=hub_timeout_s, node_ids=names, host="0.0.0.0")
    results: list[dict[str, float | str]] = []
    async with Stack(config, workdir / f"stack-{broker}") as stack:
        watcher = Watcher(stack.url(Role.HUB), stack.topics)
        await watcher.start(watch_tasks=True)
        try:
            for phone in lan.phones:
                url = stack.home.node_url(phone.name, port=stack.port, host=lan.hub.address)
                argv = [str(BIN / "swarm-node"), "run", "--broker", str(url), "--node-id", phone.name, "--engine",
                        "fake", "--engine-option", f"delay_s={task_s}", "--heartbeat", str(heartbeat_s),
                        "--no-updates", "--no-guard", "--no-log-file", "--log-level", "warning"]  # fmt: skip
                stack.procs.spawn(phone.name, phone.argv(argv), extra_env=phone.env())
            await stack.watch.nodes_online(len(names), timeout=120)
            async with SwarmClient(stack.client_url()) as client:
                for _ in range(count):
                    while not watcher.tasks.empty():
                        watcher.tasks.get_nowait()
                    request_id = f"linkdown-{uuid.uuid4().hex[:12]}"
                    request = PromptRequest(id=request_id, prompt="drop", params=GenParams(max_tokens=1), timeout_s=120)
                    reply = await client.send(request)
                    first = await _next_task(watcher.tasks, request_id, not_on=None, timeout=30)
                    await asyncio.sleep(min(0.3, task_s / 3))  # the phone is "generating"
                    victim = lan.phone(first.node_id)
                    await asyncio.to_thread(lan.link_down, victim)
                    down = time.perf_counter()
                    second = await _next_task(watcher.tasks, request_id, not_on=victim.name, timeout=120)
                    await asyncio.wait_for(reply, 120)
                    answered = time.perf_counter()
                    await asyncio.to_thread(lan.link_up, victim)
                    up = time.perf_counter()
                    # Back in range, the phone rejoins by itself: nothing here restarts it.
                    await stack.watch.nodes_online(len(names), timeout=120)
                    await watcher.node_state(victim.name, "online", timeout=120)
                    results.append({"dropped": victim.name, "restart_s": second.at - down,
                                    "answer_s": answered - down, "rejoin_s": time.perf_counter() - up})  # fmt: skip
        finally:
            await watcher.stop()
    return {
        "trials": [{k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()} for t in results],
        "restart_s": Summary.of([float(t["restart_s"]) for t in results]).to_json(),
        "answer_s": Summary.of([float(t["answer_s"]) for t in results]).to_json(),
        "rejoin_s": Summary.of([float(t["rejoin_s"]) for t in results]).to_json(),
        "task_s": task_s,
        "heartbeat_timeout_s": hub_timeout_s,
    }


def section(data: dict[str, Any], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    rows: list[tuple[str, ...]] = []
    targets: list[Target] = []
    for broker, d in data.items():
        r, a, j = d["restart_s"], d["answer_s"], d["rejoin_s"]
        rows.append((broker, str(r["n"]), fmt(r["p50"], ".3f"), fmt(r["max"], ".3f"), fmt(a["p50"], ".3f"),
                     fmt(a["max"], ".3f"), fmt(j["p50"], ".2f"), fmt(j["max"], ".2f")))  # fmt: skip
        targets.append(Target("linkdown", f"p50 restart after the link goes down, {broker}", "<=", TARGET_P50_S,
                              " s", r["p50"]))  # fmt: skip
        targets.append(Target("linkdown", f"max restart after the link goes down, {broker}", "<=", TARGET_MAX_S,
                              " s", r["max"]))  # fmt: skip
    table = Table(
        ("broker", "trials", "restart p50 s", "restart max s", "answer p50 s", "answer max s", "rejoin p50 s",
         "rejoin max s"),
        tuple(rows),
    )  # fmt: skip
    notes = (
        f"{PHONES} phones, each `swarm-node run --engine fake` (task time {cfg.linkdown_task_s:g} s) in its own "
        "network namespace on a virtual LAN; about 0.3 s into a task the phone's port on the bridge goes down "
        "(a half-open connection: no FIN, no RST). restart = link down until the hub publishes the task to another "
        "phone; answer = until the client has the answer (includes the task time); rejoin = link up until the hub "
        "counts the phone online again (at once when its connection outlived the outage, as TCP allows). "
        f"Hub heartbeat timeout {cfg.heartbeat_timeout_s:g} s, node heartbeat "
        f"{cfg.node_heartbeat_s:g} s, as in the SIGKILL section.",
    )
    return SectionResult("linkdown", TITLE, data, (table,), tuple(targets), notes, errors)


TITLE = "5b. Recovery after the link goes down"


def main(argv: list[str] | None = None) -> int:
    """The child: run the trials inside the hub namespace of a LAN the parent built."""
    parser = argparse.ArgumentParser(prog="python -m nova_swarm.bench.linkdown")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--phones", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--task-s", type=float, required=True)
    parser.add_argument("--heartbeat-s", type=float, required=True)
    parser.add_argument("--heartbeat-timeout", type=float, required=True)
    args = parser.parse_args(argv)
    lan = Lan.attach(args.tag, args.phones, args.root)
    figures = asyncio.run(
        trials(lan, args.broker, args.root, count=args.trials, task_s=args.task_s, heartbeat_s=args.heartbeat_s,
               hub_timeout_s=args.heartbeat_timeout)
    )  # fmt: skip
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
