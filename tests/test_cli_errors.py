"""A user's mistake at the command line is one line and exit status 2, never a traceback.

Every test runs the real installed commands (swarm-hub, swarm-node, swarm-broker) as a person
would; the last ones start a real broker, hub and node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import PromptRequest
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.server import cli as broker_cli
from nova_swarm.hub import cli as hub_cli
from nova_swarm.hub.client import SwarmClient
from nova_swarm.node import cli as node_cli

from .conftest import BIN, Processes, RunningBroker, env_for, require_mosquitto, wait_online


def run(home: SwarmHome, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout, env=env_for(home)
    )


def assert_one_line_refusal(out: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stderr}"
    assert "Traceback" not in out.stderr and out.stdout == "", out.stderr
    assert len(lines) == 1, f"not one line:\n{out.stderr}"
    for word in words:
        assert word in lines[0], lines[0]


BAD_ASK = [
    (["--max-tokens", "-5"], "--max-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--timeout", "-1"], "--timeout"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--fanout", "-3"], "--fanout"),
    (["--fanout", "0"], "--fanout"),
    (["--fanout", "17"], "--fanout"),
    (["--max-tokens", "lots"], "--max-tokens"),
    (["--schema", "/no/such/schema.json"], "--schema"),
    (["--port", "0"], "--port"),
    (["--port", "70000"], "--port"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_ASK, ids=[" ".join(f) for f, _ in BAD_ASK])
def test_ask_refuses_a_bad_value_in_one_line(home: SwarmHome, flags: list[str], named: str) -> None:
    assert_one_line_refusal(run(home, "swarm-hub", "ask", "hi", *flags), "swarm-hub ask: error:", named)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_ask_refuses_an_empty_prompt(home: SwarmHome, prompt: str) -> None:
    assert_one_line_refusal(run(home, "swarm-hub", "ask", prompt), "prompt", "empty")


def test_a_value_the_wire_contract_refuses_is_one_line_too(home: SwarmHome) -> None:
    """A tag with a space passes argparse; the request model refuses it, in one line."""
    assert_one_line_refusal(run(home, "swarm-hub", "ask", "hi", "--tags", "no spaces"), "tags")


BAD_OTHERS = [
    ("swarm-hub", "up", "--port", "0"),
    ("swarm-hub", "up", "--port", "65536"),
    ("swarm-hub", "up", "--model", "/missing.gguf"),
    ("swarm-hub", "up", "--threads", "0"),
    ("swarm-hub", "up", "--http", "nowhere:port"),
    ("swarm-hub", "up", "--bridge", "/no/bridge.conf"),
    ("swarm-hub", "serve", "--retries", "-1"),
    ("swarm-hub", "serve", "--max-inflight", "0"),
    ("swarm-hub", "serve", "--request-timeout", "-2"),
    ("swarm-hub", "serve", "--metrics-interval", "-1"),
    ("swarm-hub", "serve", "--retrieval", "/no/such/dir"),
    ("swarm-hub", "serve", "--db", "/no/such/dir/hub.sqlite"),
    ("swarm-hub", "ledger", "export", "--out", "/no/such/dir/receipts.jsonl"),
    ("swarm-hub", "embed", ""),
    ("swarm-hub", "embed", "text", "--timeout", "-1"),
    ("swarm-hub", "nodes", "--wait", "-1"),
    ("swarm-hub", "status", "--wait", "0"),
    ("swarm-hub", "top", "--frames", "0"),
    ("swarm-hub", "top", "--duration", "-1"),
    ("swarm-hub", "creds", "--port", "99999"),
    ("swarm-hub", "enroll", "n1", "--port", "-1"),
    ("swarm-hub", "ledger", "--credits-per-hour", "-1"),
    ("swarm-hub", "model", "pin", "m", "--sha256", "00", "--size", "0"),
    ("swarm-node", "run", "--port", "0"),
    ("swarm-node", "run", "--slots", "0"),
    ("swarm-node", "run", "--queue-max", "-1"),
    ("swarm-node", "run", "--ctx", "0"),
    ("swarm-node", "run", "--heartbeat", "0"),
    ("swarm-node", "run", "--min-battery", "120"),
    ("swarm-node", "run", "--ca-file", "/no/ca.pem"),
    ("swarm-node", "join", "token", "--discover-timeout", "-1"),
    ("swarm-broker", "--port", "0"),
    ("swarm-broker", "--max-packet", "0"),
    ("swarm-broker", "--connect-timeout", "-1"),
    ("swarm-broker", "--bridge", "/no/bridge.conf"),
]


@pytest.mark.parametrize("argv", BAD_OTHERS, ids=[" ".join(a) for a in BAD_OTHERS])
def test_every_command_refuses_a_bad_value_in_one_line(home: SwarmHome, argv: tuple[str, ...]) -> None:
    assert_one_line_refusal(run(home, *argv), "error: argument")


# ---------------------------------------------------------------- help


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


@pytest.mark.parametrize("module", [hub_cli, node_cli, broker_cli], ids=["swarm-hub", "swarm-node", "swarm-broker"])
def test_every_subcommand_says_what_it_does_and_every_option_has_help(module: object) -> None:
    top = module.build_parser()  # type: ignore[attr-defined]
    missing = []
    for name, parser in _parsers(top, top.prog):
        description = (parser.description or "").strip()
        if not description:
            missing.append(f"{name}: no description")
        elif description.startswith(("`", ":", "..")):
            missing.append(f"{name}: description starts with markup: {description[:40]!r}")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "\n".join(missing)


def test_top_level_help_starts_with_plain_words(home: SwarmHome) -> None:
    out = run(home, "swarm-hub", "--help")
    assert out.returncode == 0
    description = out.stdout.split("\n\n")[1]
    assert description.startswith("swarm-hub: run the hub"), description
    assert "``" not in out.stdout
    sub = run(home, "swarm-hub", "ask", "--help")
    assert "ask the swarm" in sub.stdout and "longest answer, in tokens" in sub.stdout


# ---------------------------------------------------------------- up


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_up_on_a_port_in_use_is_one_line_and_keeps_the_stored_port(home: SwarmHome, taken_port: int) -> None:
    before = home.local_file.read_bytes() if home.local_file.exists() else None
    out = run(home, "swarm-hub", "up", "--port", str(taken_port), "--no-node", "--no-http", "--no-log-file")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and "address already in use" in lines[0] and str(taken_port) in lines[0], out.stderr
    after = home.local_file.read_bytes() if home.local_file.exists() else None
    assert after == before


@pytest.mark.parametrize("engine", ["amqtt", "mosquitto"])
def test_swarm_broker_on_a_port_in_use_keeps_the_stored_port(home: SwarmHome, taken_port: int, engine: str) -> None:
    """One line, and local.json as it was; Mosquitto would have taken the listening port for its own."""
    if engine == "mosquitto":
        require_mosquitto()
    home.save_local(home.local())
    before = home.local_file.read_bytes()
    out = run(home, "swarm-broker", "--engine", engine, "--port", str(taken_port), "--no-log-file")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and "cannot listen" in lines[0], out.stderr
    assert home.local_file.read_bytes() == before


def test_up_stops_when_its_node_cannot_start(home: SwarmHome, tmp_path: Path) -> None:
    """A model file that is not a GGUF passes the parser (it exists); the node refuses it, and
    `up` stops everything instead of serving a swarm with no node."""
    home.save_local(home.local())
    before = home.local_file.read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a model at all")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "swarm-hub"), "up", "--port", str(port), "--model", str(bad)]
        + ["--http", "127.0.0.1:0", "--no-log-file", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(home),
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "not a GGUF file" in stderr and "the local node could not start" in stderr, stderr
    assert "chat page" not in stderr and "swarm up" not in stderr, stderr
    assert home.local_file.read_bytes() == before
    with socket.socket() as again:  # nothing is left listening on the broker's port
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its closed connections may be in TIME_WAIT
        again.bind(("127.0.0.1", port))
        again.listen()


# ---------------------------------------------------------------- top and status, with a swarm


async def test_top_piped_prints_a_wide_snapshot_with_the_nodes(amqtt: RunningBroker, tmp_path: Path) -> None:
    procs = Processes(amqtt, tmp_path)
    long_id = "a-node-with-a-rather-long-name-" + "x" * 30
    try:
        procs.hub("--metrics-interval", "1")
        procs.node(long_id, "--engine", "fake", "--tags", "wide")
        await wait_online(procs, 1)
        env = env_for(amqtt.home)
        env.pop("COLUMNS", None)
        out = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "swarm-hub"), "top", *procs.common()],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        procs.close()
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "\x1b[" not in out.stdout  # plain text into a pipe
    assert "waiting for the hub" not in out.stdout
    assert long_id in out.stdout, out.stdout  # not cut at 80 columns
    row = next(line for line in out.stdout.splitlines() if long_id in line)
    assert "online" in row, row
    assert "1 online  0 paused  0 offline" in out.stdout and "req/s" in out.stdout, out.stdout


def test_top_piped_without_a_hub_says_so(home: SwarmHome, amqtt: RunningBroker) -> None:
    out = run(home, "swarm-hub", "top", "--port", str(amqtt.port), timeout=60)
    assert out.returncode == 1 and "no report from a hub" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


async def test_a_cancelled_request_is_not_a_failure(amqtt: RunningBroker, tmp_path: Path) -> None:
    procs = Processes(amqtt, tmp_path)
    try:
        procs.hub()
        procs.node("slow", "--engine", "fake", "--engine-option", "delay_s=30", "--drain", "1")
        await wait_online(procs, 1)
        url = amqtt.home.url(Role.CLIENT, port=amqtt.port)
        async with SwarmClient(url) as client:
            request = PromptRequest(id=f"stop-{uuid.uuid4().hex[:8]}", prompt="a long story", timeout_s=60)
            asking = asyncio.create_task(client.ask(request, timeout=60))
            await asyncio.sleep(1.0)  # the node has it
            await client.cancel(request.id or "")
            with pytest.raises(RequestFailed) as failed:
                await asyncio.wait_for(asking, 30)
            assert failed.value.code is ErrorCode.CANCELLED
        give_up = time.monotonic() + 30
        while True:
            out = await asyncio.to_thread(procs.swarm_hub, "status", "--json", "--wait", "2")
            status = json.loads(out.stdout) if out.returncode == 0 else {}
            if status.get("cancelled") == 1:
                break
            assert time.monotonic() < give_up, f"the cancel never showed in status: {status} {out.stderr}"
            await asyncio.sleep(1.0)
        assert status["failed"] == 0, status
        text = await asyncio.to_thread(procs.swarm_hub, "status")
        assert "0 failed, 1 cancelled" in text.stdout, text.stdout
    finally:
        procs.close()
