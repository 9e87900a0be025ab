"""The contribution ledger: signed, hash-chained receipts that give away any change, and whose."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import re
import sqlite3
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.messages import Answer, PromptRequest
from nova_swarm.broker.contract.signing import SigningKey
from nova_swarm.broker.home import Role
from nova_swarm.hub import SwarmClient, credits, metrics
from nova_swarm.hub.credits import CreditRates
from nova_swarm.hub.ledger import Ledger, ReceiptBody, Verdict, export, receipt_hash, receipts, uptime, verify
from nova_swarm.node import FakeEngine

from .conftest import BIN, RunningBroker, env_for, hub_config, nodes_available, running_hub, running_node

SECRET = "narwhal-accordion-5120"  # in every prompt and answer; never in the ledger


def body(i: int, *, node: str = "pixel7", won: bool = True) -> ReceiptBody:
    return ReceiptBody(
        ts=1795450000.0 + i,
        request_id=f"req-{i}",
        node_id=node,
        model="SmolLM2-135M-Instruct.Q4_1",
        model_sha256="b1" * 32,
        model_size_bytes=98_362_432,
        prompt_tokens=20 + i,
        completion_tokens=7,
        wall_ms=123.4,
        energy_j=None,
        prompt_sha256="aa" * 32,
        result_sha256="bb" * 32,
        strategy="race",
        won=won,
        ok=True,
        error_code=None,
    )


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def filled(tmp_path: Path, key: SigningKey, n: int = 200) -> Path:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, key)
    for i in range(n):
        ledger.append(body(i, node=("pixel7", "s20", "laptop")[i % 3]))
        if i % 37 == 0:
            ledger.flush()  # written in batches, as the hub does
    ledger.close()
    return path


def test_two_hundred_receipts_verify_and_export(tmp_path: Path, key: SigningKey) -> None:
    path = filled(tmp_path, key)
    assert verify(path, key.public).ok and verify(path, key.public).count == 200
    out = io.StringIO()
    assert export(path, out) == 200
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, 201))
    assert lines[1]["prev_hash"] == lines[0]["hash"] and lines[0]["body"]["request_id"] == "req-0"
    # A ledger reopened later goes on with the same chain.
    again = Ledger(path, key)
    again.append(body(200))
    again.close()
    assert verify(path, key.public).count == 201


FIELDS = ["node_id", "completion_tokens", "won", "model_sha256", "result_sha256", "wall_ms", "energy_j"]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("seq", [1, 77, 200])
def test_altering_any_field_of_any_receipt_is_named(tmp_path: Path, key: SigningKey, field: str, seq: int) -> None:
    path = filled(tmp_path, key)
    db = sqlite3.connect(path)
    (raw,) = db.execute("SELECT body FROM receipts WHERE seq = ?", (seq,)).fetchone()
    changed = json.loads(raw)
    changed[field] = {"node_id": "mallory", "won": False, "energy_j": 1.0}.get(field, "f" * 64)
    if field in ("completion_tokens", "wall_ms"):
        changed[field] = 99999
    db.execute("UPDATE receipts SET body = ? WHERE seq = ?", (json.dumps(changed), seq))
    db.commit()
    db.close()
    verdict = verify(path, key.public)
    assert not verdict.ok and verdict.bad_seq == seq
    assert f"receipt #{seq}" in (verdict.problem or "") and "altered" in (verdict.problem or "")


@pytest.mark.parametrize("seq", [1, 100, 199])
def test_deleting_a_receipt_is_named(tmp_path: Path, key: SigningKey, seq: int) -> None:
    path = filled(tmp_path, key)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM receipts WHERE seq = ?", (seq,))
    verdict = verify(path, key.public)
    assert not verdict.ok and verdict.bad_seq == seq and f"#{seq} is missing" in (verdict.problem or "")


def test_cutting_off_the_end_or_rewriting_the_chain_without_the_key_is_caught(tmp_path: Path, key: SigningKey) -> None:
    path = filled(tmp_path, key)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM receipts WHERE seq > 190")
    verdict = verify(path, key.public)
    assert not verdict.ok and "after #190 are missing" in (verdict.problem or "")

    # Someone rebuilds a whole, consistent chain with their own key: the signatures give it away.
    forged = filled(tmp_path / "forged", SigningKey.generate(), n=5)
    verdict = verify(forged, key.public)
    assert not verdict.ok and verdict.bad_seq == 1 and "not signed by the hub key" in (verdict.problem or "")


def test_a_chain_rebuilt_from_the_middle_without_the_key_names_the_batch_it_rewrote(
    tmp_path: Path, key: SigningKey
) -> None:
    """Receipts are signed a batch at a time (flushes after receipts 1, 38, 75, 112, ...): an
    altered receipt whose hash, and every later one, was made again matches no checkpoint."""
    path = filled(tmp_path, key)
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, body FROM receipts WHERE seq >= 77 ORDER BY seq").fetchall()
        prev = db.execute("SELECT hash FROM receipts WHERE seq = 76").fetchone()[0]
        for seq, raw in rows:
            body = json.loads(raw)
            if seq == 77:
                body["node_id"] = "mallory"
            digest = receipt_hash(seq, body, prev)
            db.execute("UPDATE receipts SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                       (json.dumps(body), prev, digest, seq))  # fmt: skip
            prev = digest
    verdict = verify(path, key.public)
    assert not verdict.ok and verdict.bad_seq == 76 and verdict.count == 75
    assert "receipts #76 to #112 were rewritten" in (verdict.problem or "")


def test_a_ledger_from_before_checkpoints_still_verifies(tmp_path: Path, key: SigningKey) -> None:
    """Receipts once carried their own signature, and there was no checkpoints table."""
    path = filled(tmp_path, key, n=20)
    with sqlite3.connect(path) as db:
        for seq, hash_ in db.execute("SELECT seq, hash FROM receipts").fetchall():
            db.execute("UPDATE receipts SET signature = ? WHERE seq = ?", (key.sign({"hash": hash_})["signature"], seq))
        db.execute("DROP TABLE checkpoints")
    assert verify(path, key.public) == Verdict(True, 20)
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE receipts SET signature = ? WHERE seq = 7", (SigningKey.generate().sign({"hash": "x"})["signature"],)
        )
    verdict = verify(path, key.public)
    assert not verdict.ok and verdict.bad_seq == 7 and "not signed by the hub key" in (verdict.problem or "")


def test_a_missing_ledger_is_a_clear_error(tmp_path: Path, key: SigningKey) -> None:
    with pytest.raises(ConfigError, match="no ledger"):
        verify(tmp_path / "none.sqlite", key.public)


def test_credits_for_a_scripted_workload_match_the_hand_computed_figures(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, key)
    small, large = 98_362_432, 500 * 2**20  # SmolLM2 (multiplier 1) and a 500 MB model (multiplier 2)
    script = [
        ("pixel7", small, 100, 50, True, True),  # 150 tokens x1
        ("pixel7", small, 200, 100, False, True),  # 300 tokens x1, lost the race: still paid
        ("pixel7", small, 999, 999, False, False),  # failed: nothing
        ("s20", large, 600, 400, True, True),  # 1000 tokens x2
    ]
    for i, (node, size, tin, tout, won, ok) in enumerate(script):
        b = body(i, node=node, won=won)
        ledger.append(
            ReceiptBody(**{**asdict(b), "model_size_bytes": size, "prompt_tokens": tin, "completion_tokens": tout,
                           "ok": ok, "error_code": None if ok else "engine_error"})
        )  # fmt: skip
    ledger.credit_uptime("s20", 5400.0)
    ledger.credit_uptime("s20", 1800.0)  # two hours in all
    ledger.close()

    rates = CreditRates()  # 1 credit per 1000 tokens at x1, 250 MB per x1, 0.5 credit per hour online
    nodes = credits.by_node(receipts(path), rates, uptime_s=uptime(path))
    assert nodes["pixel7"].credits(rates) == 0.45
    assert (nodes["pixel7"].tasks, nodes["pixel7"].failed, nodes["pixel7"].wins, nodes["pixel7"].tokens) == (
        2,
        1,
        1,
        450,
    )
    assert nodes["s20"].credits(rates) == 2.0 + 1.0
    owners = credits.by_owner(nodes, {"pixel7": "ana", "s20": "ana"})
    assert owners["ana"].credits(rates) == 3.45 and owners["ana"].nodes == {"pixel7", "s20"}
    assert [credits.tier(c) for c in (0, 99.9, 100, 999, 1000, 10_000)] == [
        "bronze", "bronze", "silver", "silver", "gold", "platinum"
    ]  # fmt: skip


async def test_a_live_hub_keeps_a_receipt_per_finished_task_and_the_ledger_verifies(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    home = amqtt.home
    config = hub_config(tmp_path, ledger_path=home.ledger_file, signing_key_file=home.signing_key_file)
    home.enroll("n1", owner="ana")
    home.enroll("n2", owner="ana")
    async with (
        running_hub(amqtt, config) as hub,
        running_node(amqtt, FakeEngine(reply=lambda p: f"done {SECRET}"), "n1", slots=4),
        running_node(amqtt, FakeEngine(reply=lambda p: "done"), "n2", slots=4),
        SwarmClient(amqtt.url(Role.CLIENT)) as client,
    ):
        await nodes_available(hub, 2)
        requests = [
            PromptRequest(prompt=f"{SECRET} {i}", strategy="best_of_n", fanout=2)
            if i % 4 == 0
            else PromptRequest(prompt=f"{SECRET} {i}")
            for i in range(200)
        ]
        replies = await asyncio.gather(*[(await client.send(r)) for r in requests])
        assert all(isinstance(r, Answer) for r in replies)
        await asyncio.sleep(0.3)  # the last losers' results
        answered_tasks = sum(a.tasks for a in hub.accounts.values())
        assert sum(a.wins for a in hub.accounts.values()) == 200
        totals = metrics.ledger_totals(hub.accounts, hub.rates)  # published as fan-in metrics
        assert set(totals) == set(metrics.LEDGER_TOTALS) and set(totals["credits"]) == {"n1", "n2"}
        assert all(isinstance(v, int | float) for values in totals.values() for v in values.values())
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env_for(home))
    hub_cli = [str(BIN / "swarm-hub")]
    verified = run([*hub_cli, "ledger", "verify", "--config-dir", str(home.path)])
    assert verified.returncode == 0, verified.stderr
    count = int(re.search(r"ledger ok: (\d+) receipts?", verified.stdout)[1])  # type: ignore[index]
    assert count > 200  # best_of_n requests finish more than one task each
    exported = run([*hub_cli, "ledger", "export", "--config-dir", str(home.path)]).stdout
    assert SECRET not in exported and SECRET not in home.ledger_file.read_bytes().decode(errors="replace")
    bodies = [json.loads(line)["body"] for line in exported.splitlines()]
    assert sum(b["won"] for b in bodies) == 200 and {b["node_id"] for b in bodies} == {"n1", "n2"}
    assert all(len(b["prompt_sha256"]) == 64 and len(b["result_sha256"]) == 64 for b in bodies)
    assert all(b["model"] and b["model_sha256"] and b["model_size_bytes"] is not None for b in bodies)
    shown = json.loads(run([*hub_cli, "ledger", "--json", "--config-dir", str(home.path)]).stdout)
    assert shown["owners"]["ana"]["nodes"] == ["n1", "n2"]
    assert shown["owners"]["ana"]["tasks"] == count == answered_tasks and shown["owners"]["ana"]["wins"] == 200

    # Change one receipt's node in the database, as a cheat would: the command names it.
    with sqlite3.connect(home.ledger_file) as db:
        (raw,) = db.execute("SELECT body FROM receipts WHERE seq = 42").fetchone()
        changed = json.loads(raw)
        changed["completion_tokens"] += 1000
        db.execute("UPDATE receipts SET body = ? WHERE seq = 42", (json.dumps(changed),))
    broken = run([*hub_cli, "ledger", "verify", "--config-dir", str(home.path)])
    assert broken.returncode == 1 and "receipt #42" in broken.stderr and "altered" in broken.stderr
