"""`swarm-bench`: the quick run end to end, and the pure statistics and target checks.

The end-to-end test runs the real command (brokers, hub, nodes, llama, Celery + Redis) for about
a minute and a half; it carries the ``llama`` and ``mosquitto`` markers, so ``-m "not llama"``
deselects it, as does ``--deselect tests/test_bench.py::test_quick_run_prints_every_section``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.bench import dispatch, linkdown, recovery, report, scaling
from nova_swarm.bench.config import SECTIONS, BenchConfig
from nova_swarm.bench.section import Table
from nova_swarm.bench.stats import Summary, efficiency, percentile, ratio, tail_cut
from nova_swarm.bench.targets import Target, all_below, missed

BIN = Path(sys.executable).parent
TITLES = (
    "== 1. Overhead",
    "== 2. Dispatch capacity",
    "== 3. Scaling",
    "== 4. Race",
    "== 5. Recovery",
    "== 5b. Recovery after the link goes down",
    "== 6. Memory",
    "== 7. Ensembles across models",
    "== Targets ==",
)


# ---------------------------------------------------------------- the real command


@pytest.mark.llama
@pytest.mark.mosquitto
@pytest.mark.timeout(420)
def test_quick_run_prints_every_section(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("the benchmark compares against Celery + Redis: apt-get install redis-server")
    out = tmp_path / "results"
    run = subprocess.run(
        [str(BIN / "swarm-bench"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for title in TITLES:
        assert title in run.stdout, f"{title!r} not printed:\n{run.stdout}"
    assert "not measured: streaming not available" in run.stdout or "time to first token" in run.stdout
    assert "Petals" in run.stdout  # the peers are printed for comparison

    [path] = out.glob("*.json")
    doc = json.loads(path.read_text())
    assert set(doc["sections"]) == set(SECTIONS)
    for key, section in doc["sections"].items():
        assert not section["errors"], f"{key}: {section['errors']}"
    s = doc["sections"]
    overhead = s["overhead"]["data"]["mosquitto"]
    assert overhead["warm"]["direct_ms"]["p50"] > 0 and overhead["warm"]["swarm_ms"]["p50"] > 0
    assert overhead["cold"]["overhead_p50_ms"] is not None
    for system in ("amqtt", "mosquitto", "celery"):
        points = s["dispatch"]["data"][system]["points"]
        assert [p["concurrency"] for p in points] == [1, 16, 256]
        assert all(p["throughput"] > 0 for p in points)
    for broker in ("amqtt", "mosquitto"):
        fake = s["scaling"]["data"][broker]["fake"]["points"]
        assert fake[0]["nodes"] == 1 and fake[0]["efficiency"] == 1.0
        assert {p["fanout"] for p in s["race"]["data"][broker]["points"]} == {1, 2, 3}
        assert s["recovery"]["data"][broker]["restart_s"]["n"] >= 1
        assert s["linkdown"]["data"][broker]["restart_s"]["n"] >= 1  # phones on a virtual LAN (CI is root)
        assert s["memory"]["data"]["brokers"][broker]["loaded"]["hub_mb"] > 0
    assert s["scaling"]["data"]["mosquitto"]["real"]["speedup"] > 0
    assert s["memory"]["data"]["node"]["overhead_mb"] is not None
    [ensembles] = s["ensemble"]["data"].values()
    assert set(ensembles["ensembles"]) == {"SmolLM2 x2", "Gemma x2", "SmolLM2 + Gemma"}
    assert all(c["asked"] == 4 and c["failed"] == 0 for c in ensembles["ensembles"].values())
    assert doc["targets"] and all(t["met"] is not None for t in doc["targets"])
    assert doc["meta"]["machine"] and doc["meta"]["versions"]["celery"]

    pngs = {p.name.removeprefix(path.stem + "-") for p in out.glob("*.png")}
    assert pngs == {f"{k}.png" for k in SECTIONS} | {"summary.png"}
    assert all(p.stat().st_size > 10_000 for p in out.glob("*.png"))
    assert "| target | measured | goal | verdict |" in path.with_suffix(".md").read_text()


# ---------------------------------------------------------------- statistics


def test_percentile_interpolates_between_ranks() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 4.0
    assert percentile(samples, 50) == 2.5
    assert percentile([7.0], 99) == 7.0
    assert percentile(list(map(float, range(1, 21))), 99) == pytest.approx(19.81)


@pytest.mark.parametrize("bad", [[], [1.0]])
def test_percentile_refuses_nonsense(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        percentile(bad, 50 if not bad else 101)


def test_summary() -> None:
    s = Summary.of([10.0, 20.0, 30.0, 40.0, 1000.0])
    assert (s.n, s.p50, s.max, s.mean) == (5, 30.0, 1000.0, 220.0)
    assert s.p99 > s.p95 > s.p50
    assert Summary.of([1.23456]).to_json()["p50"] == 1.235


def test_ratios_efficiency_and_tail_cut() -> None:
    assert ratio(10, 4) == 2.5
    assert ratio(1, 0) is None
    assert efficiency(380.0, 4, 100.0) == 0.95
    assert efficiency(10.0, 1, 0.0) is None
    assert tail_cut(500.0, 200.0) == pytest.approx(0.6)
    assert tail_cut(0.0, 1.0) is None


# ---------------------------------------------------------------- targets


def test_target_verdicts() -> None:
    assert Target("s", "fast", "<=", 2.0, " ms", 1.5).met is True
    assert Target("s", "fast", "<=", 2.0, " ms", 2.5).verdict == "MISSED"
    assert Target("s", "strict", "<", 1.0, " s", 1.0).met is False
    assert Target("s", "big", ">=", 5.0, "x", None).verdict == "not measured"
    t = Target("s", "p50 overhead", "<=", 5.0, " ms", 7.25)
    assert t.describe() == "p50 overhead: 7.25 ms (target <= 5 ms) MISSED"
    assert Target("s", "ratio", "<=", 1.05, "", 1.0512).describe().startswith("ratio: 1.051 ")
    assert t.to_json()["met"] is False
    assert missed([t, Target("s", "ok", ">=", 1.0, "", 2.0)]) == [t]


def test_all_below() -> None:
    assert all_below([1.0, 2.0], [2.0, 3.0]) is True
    assert all_below([1.0, 3.0], [2.0, 3.0]) is False
    assert all_below([1.0, None], [2.0, 3.0]) is None
    assert all_below([], []) is None


# ---------------------------------------------------------------- sections from figures


def _point(c: int, tput: float, p50: float) -> dict[str, Any]:
    return {"concurrency": c, "throughput": tput, "errors": {}, "latency_ms": {"p50": p50, "p99": p50 * 2}}


def test_dispatch_section_compares_with_celery_side_by_side(tmp_path: Path) -> None:
    cfg = BenchConfig(out_dir=tmp_path, concurrencies=(1, 16))
    data = {
        "mosquitto": {"points": [_point(1, 900, 1.5), _point(16, 2000, 8.0)]},
        "amqtt": {"points": [_point(1, 300, 3.0), _point(16, 500, 40.0)]},
        "celery": {"points": [_point(1, 250, 4.0), _point(16, 350, 30.0)]},
    }
    section = dispatch.section(data, {}, cfg)
    verdicts = {t.name: (t.measured, t.met) for t in section.targets}
    assert verdicts["peak throughput vs Celery's peak, mosquitto"] == (pytest.approx(2000 / 350), True)
    assert verdicts["p50 at concurrency 1, mosquitto"] == (1.5, True)
    assert verdicts["peak throughput vs Celery's peak, amqtt"] == (pytest.approx(500 / 350), False)
    # amqtt is slower than Celery at concurrency 16: the worst ratio says so
    assert verdicts["worst p50 vs Celery's at any concurrency, amqtt"] == (pytest.approx(40 / 30, abs=1e-3), False)
    assert data["amqtt"]["points"][0]["vs_celery_p50"] == 0.75
    assert [row[0] for row in section.tables[0].rows] == ["swarm/mosquitto"] * 2 + ["swarm/amqtt"] * 2 + ["celery"] * 2


def test_linkdown_section_holds_restarts_to_3_s_at_p50_and_5_s_at_most(tmp_path: Path) -> None:
    fast, slow = Summary.of([1.4, 1.6, 1.9]).to_json(), Summary.of([1.5, 2.5, 6.5]).to_json()
    data = {
        broker: {"restart_s": restart, "answer_s": restart, "rejoin_s": restart, "task_s": 3.0}
        for broker, restart in (("amqtt", slow), ("mosquitto", fast))
    }
    section = linkdown.section(data, {}, BenchConfig(out_dir=tmp_path))
    verdicts = {t.name: t.met for t in section.targets}
    assert verdicts == {
        "p50 restart after the link goes down, amqtt": True,
        "max restart after the link goes down, amqtt": False,  # one trial took 6.5 s
        "p50 restart after the link goes down, mosquitto": True,
        "max restart after the link goes down, mosquitto": True,
    }
    assert [row[0] for row in section.tables[0].rows] == ["amqtt", "mosquitto"]


def test_scaling_section_takes_the_worst_efficiency_up_to_64(tmp_path: Path) -> None:
    cfg = BenchConfig(out_dir=tmp_path)
    points = [
        {"nodes": n, "throughput": t, "efficiency": e, "errors": {}, "latency_ms": {"p50": 300.0}}
        for n, t, e in ((1, 10.0, 1.0), (64, 600.0, 0.94), (128, 900.0, 0.7))
    ]
    real = {"one": {"throughput": 2.0}, "two": {"throughput": 3.8}}
    section = scaling.section({"mosquitto": {"fake": {"points": points}, "real": real}}, {}, cfg)
    verdicts = {t.name: t for t in section.targets}
    worst = verdicts["worst efficiency for N <= 64, mosquitto"]
    assert (worst.measured, worst.met, worst.note) == (0.94, False, "at N = 64")
    assert verdicts["2 real llama nodes vs 1, mosquitto"].measured == pytest.approx(1.9)


def test_recovery_section_prints_the_peers(tmp_path: Path) -> None:
    cfg = BenchConfig(out_dir=tmp_path)
    summary = Summary.of([0.2, 0.3, 0.4]).to_json()
    data = {"mosquitto": {"restart_s": summary, "answer_s": summary, "heartbeat_timeout_s": 5.0}}
    section = recovery.section(data, {}, cfg)
    peers = [row[0] for row in section.tables[1].rows]
    assert peers == ["Petals", "GPUStack", "LocalAI", "AI Horde"]
    assert section.targets[0].met is True


def test_table_rendering_and_markdown(tmp_path: Path) -> None:
    table = Table(("a", "bb"), (("1", "2"), ("333", "4")), "title")
    lines = report.render_table(table)
    assert lines[0] == "  title" and lines[1].split() == ["a", "bb"] and lines[3].split() == ["1", "2"]
    cfg = BenchConfig(out_dir=tmp_path)
    summary = Summary.of([0.2]).to_json()
    section = recovery.section(
        {"amqtt": {"restart_s": summary, "answer_s": summary, "heartbeat_timeout_s": 5.0}}, {}, cfg
    )
    md = report.markdown({"command": "swarm-hub bench", "date": "today", "machine": "2 cores"}, [section])
    assert "| peer | documented recovery |" in md and "`swarm-hub bench`" in md


def test_quick_profile_keeps_every_section(tmp_path: Path) -> None:
    quick = BenchConfig.quick_profile(tmp_path)
    full = BenchConfig.full(tmp_path)
    assert quick.sections == full.sections == SECTIONS
    assert quick.recovery_trials < full.recovery_trials == 20
    assert full.concurrencies == (1, 4, 16, 64, 256)
    assert full.scaling_ns == (1, 2, 4, 8, 16, 32, 64, 128)
    assert quick.memory_nodes < full.memory_nodes == 1000
