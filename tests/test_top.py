"""`swarm-hub top`: frames drawn from hand-made reports, then the real command under a terminal."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
import time
from pathlib import Path

from rich.console import Console

from nova_swarm.broker.contract.messages import HubMetrics, HubStatus, NodeRow, NodeState, NodeTable
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.link.base import Message
from nova_swarm.hub.top import Reports, apply, render

from .conftest import BIN, Processes, RunningBroker, env_for, wait_online

T = Topics("main")
NOW = 1_700_000_000.0


def row(node_id: str, state: NodeState, **overrides: object) -> NodeRow:
    fields: dict[str, object] = {
        "node_id": node_id,
        "state": state,
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "tokens_per_s": 31.5,
        "battery_pct": 76.0,
        "charging": True,
        "temp_c": 33.2,
        "busy": 1,
        "last_seen": NOW - 2,
        "agent_version": "0.1.0",
        "tags": [],
    }
    fields.update(overrides)
    return NodeRow.model_validate(fields)


def metrics(**overrides: float) -> HubMetrics:
    fields: dict[str, float] = {
        "nodes_online": 2,
        "nodes_paused": 1,
        "nodes_offline": 1,
        "inflight": 1,
        "queue_depth": 0,
        "requests_per_s": 0.25,
        "answered_per_s": 0.2,
        "errors_per_min": 4,
        "latency_p50_ms": 812.0,
        "latency_p95_ms": 2140.0,
        "answered_total": 42,
        "failed_total": 4,
    }
    fields.update(overrides)
    return HubMetrics.model_validate(fields)


def reports() -> Reports:
    status = HubStatus(
        hub_id="hub-laptop",
        state="online",
        ts=NOW - 1,
        version="0.1.0",
        nodes_online=2,
        nodes_paused=1,
        nodes_offline=1,
        inflight=1,
        queued=0,
        answered=42,
        failed=4,
        started_at=NOW - 3723,
    )
    nodes = NodeTable(
        ts=NOW - 1,
        nodes=[
            row("pixel7", NodeState.ONLINE),
            row("s20", NodeState.PAUSED, charging=False, busy=0, battery_pct=14.0),
            row("laptop", NodeState.ONLINE, battery_pct=None, charging=None, temp_c=None, busy=0),
            row("old-phone", NodeState.OFFLINE, agent_version="0.0.9", lag="bundle 0.1.0: refused: too old"),
        ],
    )
    return Reports(
        status=status,
        nodes=nodes,
        metrics=metrics(),
        metrics_at=NOW - 2,
        errors={"no_eligible_nodes": 3, "deadline_exceeded": 1, "hub_busy": 0},
        errors_at=NOW - 2,
    )


def draw(frame_of: Reports) -> str:
    console = Console(record=True, width=120, force_terminal=False)
    console.print(render(frame_of, now=NOW))
    return console.export_text()


def line_of(text: str, word: str) -> str:
    return next(line for line in text.splitlines() if word in line)


def test_frame_shows_the_hub_the_nodes_and_the_errors() -> None:
    text = draw(reports())
    assert "hub-laptop" in text and "online" in line_of(text, "hub-laptop") and "up 1h 02m" in text
    assert "2 online  1 paused  1 offline" in text
    assert "1 in flight  0 queued  42 answered  4 failed" in text
    assert "0.25 req/s" in text and "p50 812 ms" in text and "p95 2140 ms" in text
    for node_id, state in (("pixel7", "online"), ("s20", "paused"), ("laptop", "online"), ("old-phone", "offline")):
        assert state in line_of(text, node_id)
    assert "76%+" in line_of(text, "pixel7")  # charging
    assert "14%" in line_of(text, "s20") and "14%+" not in text
    assert "bundle 0.1.0: refused" in line_of(text, "old-phone")  # long reasons wrap in their column
    errors = line_of(text, "errors, last minute")
    assert "no_eligible_nodes 3" in errors and "deadline_exceeded 1" in errors
    assert "hub_busy" not in errors  # zero counts are left out


def test_nothing_yet_says_so() -> None:
    assert draw(Reports()).strip() == "waiting for the hub..."
    only_status = Reports(status=reports().status)
    text = draw(only_status)
    assert "hub-laptop" in text and "no node table yet" in text and "waiting for metrics..." in text
    assert "p50 -" in draw(Reports(nodes=reports().nodes, metrics=metrics(latency_p50_ms=-1, latency_p95_ms=-1)))


def test_stale_metrics_show_their_age() -> None:
    old = Reports(nodes=reports().nodes, metrics=metrics(), metrics_at=NOW - 95, errors={}, errors_at=NOW - 95)
    text = draw(old)
    assert "(1m 35s old)" in line_of(text, "req/s")
    assert "none (1m 35s old)" in line_of(text, "errors, last minute")


def test_messages_fold_in_and_malformed_ones_change_nothing() -> None:
    full = reports()
    current = Reports()
    for topic, payload in (
        (T.hub_status(), full.status.encode() if full.status else b""),
        (T.hub_nodes(), full.nodes.encode() if full.nodes else b""),
        (T.metrics_hub(), metrics().encode()),
        (T.metrics_fan_in("errors"), b'{"no_eligible_nodes": 3, "hub_busy": 0}'),
    ):
        current = apply(current, T, Message(topic, payload, 1, False), now=NOW)
    assert current.status == full.status and current.nodes == full.nodes and current.metrics == metrics()
    assert current.errors == {"no_eligible_nodes": 3, "hub_busy": 0} and current.errors_at == NOW
    bad = [
        (T.hub_status(), b"not json"),
        (T.hub_status(), b'{"hub_id": "h", "state": "sleeping"}'),
        (T.hub_nodes(), b'{"ts": 1, "nodes": [{"node_id": "X!"}]}'),
        (T.hub_nodes(), b"\xff\xfe"),
        (T.metrics_hub(), b'{"requests_per_s": "fast"}'),
        (T.metrics_hub(), b"[]"),
        (T.metrics_fan_in("errors"), b"[1, 2]"),
        (T.metrics_fan_in("errors"), b'{"no_eligible_nodes": -1}'),
        (T.metrics_fan_in("errors"), b'{"no_eligible_nodes": true}'),
        (T.metrics_fan_in("errors"), b'{"no_eligible_nodes": "3"}'),
        (T.metrics_fan_in("errors"), b'{"\\u001b[2J": 1}'),
        (T.metrics_fan_in("errors"), b'{"x": NaN}'),
        (T.metrics_fan_in("errors"), b"\xff"),
        (T.hub_status(), b""),  # a cleared retained message
        ("swarm/main/metrics/node/pixel7", b"{}"),  # not ours to show
    ]
    for topic, payload in bad:
        assert apply(current, T, Message(topic, payload, 1, False), now=NOW + 1) == current, payload


def test_free_text_cannot_reach_the_terminal_as_escapes_or_markup() -> None:
    nasty = NodeTable(ts=NOW, nodes=[row("pixel7", NodeState.ONLINE, model="\x1b[2J[bold red]evil", lag="\x07")])
    console = Console(record=True, width=120, force_terminal=True)
    console.print(render(Reports(nodes=nasty), now=NOW))
    out = console.export_text(styles=False)
    assert "\x1b" not in out and "\x07" not in out
    assert "[bold red]evil" in out  # shown as written, not taken as markup


# ---------------------------------------------------------------- the real command


ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def run_under_pty(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``argv`` on a 120x40 pseudo-terminal (so rich redraws in place, as for a person) and
    return its exit status and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    give_up = time.monotonic() + timeout
    try:
        # Keep draining: a child whose terminal buffer fills up blocks on its next write.
        while time.monotonic() < give_up:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child exited and closed its end
                break
            if not data:
                break
            chunks.append(data)
        if proc.poll() is None and time.monotonic() >= give_up:
            proc.kill()
        status = proc.wait(timeout=30)
    finally:
        os.close(master)
    return status, b"".join(chunks).decode(errors="replace")


async def test_top_shows_the_running_swarm(amqtt: RunningBroker, tmp_path: Path) -> None:
    procs = Processes(amqtt, tmp_path)
    try:
        procs.hub("--metrics-interval", "1")
        procs.node("n1", "--engine", "fake")
        await wait_online(procs, 1)
        argv = [str(BIN / "swarm-hub"), "top", "--frames", "16"]
        argv += ["--config-dir", str(amqtt.home.path), "--port", str(amqtt.port)]
        env = {**env_for(amqtt.home), "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        # 16 frames is about 8 s; the timeout only guards against a `top` that never stops.
        status, output = await asyncio.to_thread(run_under_pty, argv, env, 60.0)
    finally:
        procs.close()
    text = ANSI.sub("", output)
    assert status == 0, text
    assert "\x1b[" in output, "on a terminal, top redraws in place"
    assert "Traceback" not in text
    assert re.search(r"n1\s+online\s+", text), text
    assert "1 online  0 paused  0 offline" in text and "0 in flight" in text
    # the hub publishes metrics every second here: real payloads parse (no request, so no error)
    assert "req/s" in text and "errors, last minute: none" in text
