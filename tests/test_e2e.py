"""The whole swarm as users run it: a real broker, `swarm-hub serve`, two `swarm-node run`
processes with the real llama-cpp engine and the bundled SmolLM2 model, and the real
mosquitto_pub / mosquitto_sub. Each test runs on the embedded broker and on Mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection

from .conftest import BIN, Processes, RunningBroker, env_for, require_mosquitto, wait_online

pytestmark = pytest.mark.llama
T = Topics("main")


async def start_swarm(procs: Processes, *node_ids: str, node_args: tuple[str, ...] = ()) -> None:
    procs.hub()
    for node_id in node_ids:
        procs.node(node_id, *node_args)
    await wait_online(procs, len(node_ids))


def sub(procs: Processes, topic: str, *extra: str) -> subprocess.Popen[str]:
    require_mosquitto()
    argv = ["mosquitto_sub", *procs.broker.mosquitto_flags(), "-t", topic, "-C", "1", "-W", "90", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def subscribed(proc: subprocess.Popen[str]) -> None:
    # mosquitto_sub prints nothing when its SUBSCRIBE is acknowledged; give it a moment.
    await asyncio.sleep(0.7)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""


async def test_mosquitto_pub_prompt_is_answered_on_the_reply_topic(procs: Processes) -> None:
    await start_swarm(procs, "alpha", "beta")
    reader = sub(procs, T.reply())
    await subscribed(reader)
    pub = procs.run(["mosquitto_pub", *procs.broker.mosquitto_flags(), "-t", T.prompt(), "-m", "What is 2+2?"])
    assert pub.returncode == 0, pub.stderr
    out, err = await asyncio.to_thread(reader.communicate, timeout=100)
    reply = json.loads(out)
    assert reply["ok"] is True, reply
    assert reply["text"].strip()
    assert reply["node_id"] in {"alpha", "beta"}
    assert reply["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert reply["usage"]["completion_tokens"] > 0 and reply["timings"]["tokens_per_s"] > 0


async def test_swarm_hub_ask_race_and_best_of_n(procs: Processes) -> None:
    await start_swarm(procs, "alpha", "beta")
    race = await asyncio.to_thread(
        procs.swarm_hub, "ask", "Name a colour.", "--fanout", "2", "--max-tokens", "32", "--json"
    )
    assert race.returncode == 0, race.stderr
    answer = json.loads(race.stdout)
    assert answer["strategy"] == "race" and answer["attempts"] == 2 and answer["text"].strip()

    best = await asyncio.to_thread(
        procs.swarm_hub,
        "ask",
        "Name a fruit.",
        "--strategy",
        "best_of_n",
        "--fanout",
        "2",
        "--max-tokens",
        "32",
        "--temperature",
        "0.9",
        "--json",
    )
    assert best.returncode == 0, best.stderr
    answer = json.loads(best.stdout)
    candidates = answer["candidates"]
    assert len(candidates) == 2
    assert {c["node_id"] for c in candidates} == {"alpha", "beta"}
    assert candidates[0]["score"] >= candidates[1]["score"]
    assert answer["text"] == candidates[0]["text"] and answer["node_id"] == candidates[0]["node_id"]

    human = await asyncio.to_thread(procs.swarm_hub, "ask", "Say hello.", "--max-tokens", "16")
    assert human.returncode == 0 and human.stdout.strip()
    assert "node " in human.stderr and "ms total" in human.stderr  # which node, and its timings


async def test_a_killed_node_does_not_lose_its_prompt(procs: Processes) -> None:
    await start_swarm(procs, "alpha", "beta", node_args=("--max-tokens", "400"))
    busy = await find_busy_node_after(
        procs, ["ask", "Write a long story about a dragon who learns to bake bread.", "--max-tokens", "400", "--json"]
    )
    asker, victim = busy
    os.killpg(procs_by_node(procs, victim).pid, signal.SIGKILL)  # the device dies
    out, err = await asyncio.to_thread(asker.communicate, timeout=120)
    answer = json.loads(out)
    assert answer.get("ok") is True, (out, err)
    assert answer["node_id"] != victim and answer["attempts"] == 2


async def test_a_frozen_node_is_written_off_by_heartbeat_timeout(procs: Processes) -> None:
    """SIGSTOP keeps the socket open, so no Will fires at once: the node's missing progress
    (2 s) notices first, then the 3 s heartbeat timeout and, later, the brokers' keepalive check."""
    await start_swarm(procs, "alpha", "beta", node_args=("--max-tokens", "400"))
    asker, victim = await find_busy_node_after(
        procs, ["ask", "Write a long story about a dragon who learns to bake bread.", "--max-tokens", "400", "--json"]
    )
    frozen = procs_by_node(procs, victim)
    os.killpg(frozen.pid, signal.SIGSTOP)  # the whole device freezes
    started = time.monotonic()
    try:
        out, err = await asyncio.to_thread(asker.communicate, timeout=120)
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    answer = json.loads(out)
    assert answer.get("ok") is True, (out, err)
    assert answer["node_id"] != victim
    assert time.monotonic() - started < 30  # the 2 s quiet rule, not a 120 s deadline


async def test_mqtt5_response_topic_and_correlation_data(mosquitto: RunningBroker, tmp_path: Path) -> None:
    procs = Processes(mosquitto, tmp_path)
    try:
        await start_swarm(procs, "alpha")
        # A reply topic of the login's own scope: the shared client login's is reply/client/...
        reader = sub(procs, "swarm/main/reply/client/v5", "-i", "v5", "-V", "5", "-F", "%D %p")
        await subscribed(reader)
        pub = procs.run(
            [
                "mosquitto_pub",
                *mosquitto.mosquitto_flags(),
                "-V",
                "5",
                "-t",
                T.prompt("client"),
                "-m",
                "Hi there",
                "-D",
                "publish",
                "response-topic",
                "swarm/main/reply/client/v5",
                "-D",
                "publish",
                "correlation-data",
                "abc123",
            ]
        )
        assert pub.returncode == 0, pub.stderr
        out, _ = await asyncio.to_thread(reader.communicate, timeout=100)
        correlation, _, payload = out.partition(" ")
        assert correlation == "abc123"
        assert json.loads(payload)["ok"] is True
    finally:
        procs.close()


# ---------------------------------------------------------------- helpers


def procs_by_node(procs: Processes, node_id: str) -> subprocess.Popen[bytes]:
    for proc in procs.procs:
        if isinstance(proc.args, list) and node_id in proc.args and "run" in proc.args:
            return proc
    raise AssertionError(f"no process for node {node_id}")


async def find_busy_node_after(procs: Processes, ask_args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start `swarm-hub ask` in the background; return it and the node the hub gave the task to.

    We watch the task topics (as the hub may), so we know the node the moment it is assigned,
    well before a generation of any length can finish.
    """
    async with Connection(procs.broker.url(Role.HUB), client_id="test-watcher") as watcher:
        await watcher.subscribe(T.all_nodes(NodeTopic.TASK))
        command, *rest = ask_args
        asker = subprocess.Popen(
            [str(BIN / "swarm-hub"), command, *procs.common(), *rest],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(procs.broker.home),
        )
        async with asyncio.timeout(30):
            async for message in watcher.messages():
                parsed = T.parse_node_topic(message.topic)
                if parsed is not None:
                    return asker, parsed[0]
    raise AssertionError("no task was assigned")
