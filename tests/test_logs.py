"""Logs: JSON in size-rotated files, one per process, with ids on every task line and no prompt text."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from nova_swarm.broker import logs

from .conftest import Processes, RunningBroker, wait_online

SECRET = "platypus-marmalade-9917"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    logs.configure(level="info")  # back to stderr only, as the other tests expect


def test_files_rotate_by_size_and_hold_one_json_object_per_line(tmp_path: Path, restore_logging: None) -> None:
    file = tmp_path / "logs" / "hub.log"
    logs.configure(level="info", file=file, max_bytes=4000, backups=2)
    log = structlog.get_logger("nova_swarm.test")
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        for i in range(200):
            log.info("settled", i=i)
    log.debug("not at info level")
    logging.getLogger("amqtt.broker").info("third-party chatter below WARNING is dropped")
    logging.getLogger("amqtt.broker").warning("third-party warning")
    names = sorted(p.name for p in file.parent.iterdir())
    assert names == ["hub.log", "hub.log.1", "hub.log.2"]  # rotated, and no more than two kept
    assert all(p.stat().st_size <= 4000 + 200 for p in file.parent.iterdir())
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    ours = [line for line in lines if line["event"] == "settled"]
    assert ours and all(line["request_id"] == "req-1" and line["level"] == "info" for line in ours)
    assert all("timestamp" in line and "logger" in line for line in lines)
    events = {line["event"] for line in lines}
    assert "third-party warning" in events and "not at info level" not in events
    assert not any("chatter" in e for e in events)


async def test_each_process_logs_to_its_own_file_with_ids_and_never_the_prompt(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    procs = Processes(amqtt, tmp_path)
    try:
        procs.hub()
        procs.node("n1", "--engine", "fake", "--no-updates")
        await wait_online(procs, 1)
        out = procs.swarm_hub("ask", f"Please repeat {SECRET}", "--timeout", "60")
        assert out.returncode == 0, out.stderr
    finally:
        procs.close()
    folder = amqtt.home.path / "logs"
    assert {"hub.log", "node-n1.log", "broker.log"} <= {p.name for p in folder.iterdir()}
    for path in folder.glob("*.log"):
        text = path.read_text()
        assert SECRET not in text, f"prompt text in {path.name}"
        for line in text.splitlines():
            record = json.loads(line)
            if "task_id" in record:  # a line about a task says which request and which node
                assert record.get("request_id") and record.get("node_id"), (path.name, record)
    node_lines = [json.loads(line) for line in (folder / "node-n1.log").read_text().splitlines()]
    assert any(r["event"] == "answered" for r in node_lines)
    assert all(r.get("node_id") == "n1" for r in node_lines if r["logger"].startswith("nova_swarm.node"))
