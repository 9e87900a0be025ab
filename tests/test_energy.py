"""Energy per task: the sources read fake sysfs trees and a fake ``termux-battery-status`` (a
real script on PATH: the thing the code shells out to), the meter turns samples into joules,
and a node with the simulated source puts joules in its results, the hub's receipts, the node
table and the metrics. Without a source, energy is unknown (null) and everything else works.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.messages import UNKNOWN, Answer, PromptRequest, TaskResult, decode
from nova_swarm.broker.home import Role
from nova_swarm.hub import SwarmClient
from nova_swarm.hub.ledger import receipts
from nova_swarm.hub.metrics import node_metrics
from nova_swarm.node import FakeEngine
from nova_swarm.node.energy import (
    SIM_ENV,
    BatterySource,
    EnergyMeter,
    RaplSource,
    SimulatedSource,
    TermuxSource,
    battery_watts,
    detect,
    load_source,
    sample_while_busy,
    termux_watts,
)

from .conftest import (
    BIN,
    Processes,
    RunningBroker,
    env_for,
    hub_config,
    nodes_available,
    running_hub,
    running_node,
    until,
    wait_online,
)

# ---------------------------------------------------------------- fake sysfs trees


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def rapl_zone(root: Path, name: str, energy_uj: int, wrap_uj: int = 262_143_328_850) -> Path:
    zone = root / name
    write(zone / "energy_uj", str(energy_uj))
    write(zone / "max_energy_range_uj", str(wrap_uj))
    write(zone / "name", "package-0" if name.count(":") == 1 else "core")
    return zone


def test_rapl_sums_the_packages_not_their_subzones_and_unwraps_the_counter(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    rapl_zone(root, "intel-rapl:0", 1_000_000, wrap_uj=10_000_000)
    rapl_zone(root, "intel-rapl:1", 5_000_000)
    rapl_zone(root, "intel-rapl:0:0", 999_999_999)  # a part of package 0: counted there already
    write(root / "dtpm" / "energy_uj", "123")  # another powercap control type
    source = RaplSource(root)
    assert [z.name for z in source.zones()] == ["intel-rapl:0", "intel-rapl:1"]
    assert source.read() == 0.0  # the first read sets the origin
    write(root / "intel-rapl:0" / "energy_uj", "3000000")  # +2 J
    write(root / "intel-rapl:1" / "energy_uj", "5500000")  # +0.5 J
    assert source.read() == pytest.approx(2.5)
    write(root / "intel-rapl:0" / "energy_uj", "1000000")  # wrapped at 10 J: +8 J (to the wrap) +1 J
    assert source.read() == pytest.approx(2.5 + 8.000001)


def test_rapl_that_cannot_be_read_is_unknown(tmp_path: Path) -> None:
    assert RaplSource(tmp_path / "nothing").read() is None
    root = tmp_path / "powercap"
    zone = rapl_zone(root, "intel-rapl:0", 1_000_000)
    rapl_zone(root, "intel-rapl:1", 1_000_000)
    (zone / "energy_uj").unlink()  # as unreadable as root-only: one package missing is unknown
    assert RaplSource(root).read() is None


def battery(root: Path, status: str, **values: int) -> None:
    supply = root / "BAT0"
    write(supply / "type", "Battery")
    write(supply / "status", status)
    for name, value in values.items():
        write(supply / name, str(value))
    write(root / "AC" / "type", "Mains")


def test_battery_power_while_discharging_from_power_now_or_current_times_voltage(tmp_path: Path) -> None:
    root = tmp_path / "power_supply"
    battery(root, "Discharging", power_now=7_250_000)
    assert BatterySource(root).read() == pytest.approx(7.25)
    (root / "BAT0" / "power_now").unlink()
    battery(root, "Discharging", current_now=-1_500_000, voltage_now=3_900_000)  # signed on some kernels
    assert BatterySource(root).read() == pytest.approx(5.85)
    battery(root, "Charging")
    assert BatterySource(root).read() is None  # the charger feeds the device: unknown
    battery(root, "Full")
    assert BatterySource(root).read() is None
    assert BatterySource(tmp_path / "none").read() is None


def test_battery_watts_is_lenient() -> None:
    assert battery_watts(status="Discharging", power_uw=None, current_ua=None, voltage_uv=3_800_000) is None
    assert battery_watts(status="discharging\n", power_uw=0, current_ua=2_000_000, voltage_uv=4_000_000) == 8.0
    assert battery_watts(status=None, power_uw=5_000_000, current_ua=None, voltage_uv=None) is None


@pytest.mark.parametrize(
    ("raw", "watts"),
    [
        # microamperes and millivolts (most phones, older Termux:API)
        ({"status": "DISCHARGING", "plugged": "UNPLUGGED", "current": -450_000, "voltage": 3850}, 1.7325),
        # milliamperes (some Samsungs), volts (newer Termux:API)
        ({"status": "DISCHARGING", "plugged": "UNPLUGGED", "current": 450, "voltage": 3.85}, 1.7325),
        ({"status": "NOT_CHARGING", "current": 1_000_000, "voltage": 4000}, 4.0),
        ({"status": "CHARGING", "plugged": "PLUGGED_AC", "current": 900_000, "voltage": 4200}, None),
        ({"status": "FULL", "plugged": "PLUGGED_USB", "current": 10, "voltage": 4300}, None),
        ({"status": "DISCHARGING", "plugged": "UNPLUGGED", "percentage": 80}, None),  # no current: older app
        ({"status": "DISCHARGING", "current": "n/a", "voltage": 3900}, None),
        ({"status": "DISCHARGING", "current": 0, "voltage": 3900}, None),
        ({"status": "DISCHARGING", "current": 450_000_000, "voltage": 3900}, None),  # 1755 W: a unit mix-up
        ({}, None),
    ],
)
def test_termux_battery_json_becomes_watts_while_discharging(raw: dict[str, Any], watts: float | None) -> None:
    got = termux_watts(raw)
    assert got == (pytest.approx(watts) if watts is not None else None)


def fake_command(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def test_termux_source_runs_the_command_on_path_and_survives_one_that_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    reply = {"health": "GOOD", "percentage": 71, "plugged": "UNPLUGGED", "status": "DISCHARGING",
             "temperature": 31.2, "current": -620000, "voltage": 3912}  # fmt: skip
    fake_command(bin_dir, "termux-battery-status", f"cat <<'EOF'\n{json.dumps(reply, indent=2)}\nEOF")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert TermuxSource().read() == pytest.approx(0.62 * 3.912)

    fake_command(bin_dir, "termux-battery-status", "echo 'not json'")
    assert TermuxSource().read() is None
    # Without the Termux:API app the command never returns: the timeout ends it.
    fake_command(bin_dir, "termux-battery-status", "exec sleep 30")
    started = time.monotonic()
    assert TermuxSource(timeout_s=0.5).read() is None
    assert time.monotonic() - started < 20
    assert TermuxSource(command=str(tmp_path / "missing")).read() is None


def test_sources_by_name_and_the_simulated_one_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(load_source("rapl"), RaplSource)
    assert isinstance(load_source("battery"), BatterySource)
    assert isinstance(load_source("termux"), TermuxSource)
    assert load_source("none") is None
    sim = load_source("sim:2.5")
    assert isinstance(sim, SimulatedSource) and sim.read() == 2.5
    for bad in ("sim", "sim:-1", "sim:lots", "solar"):
        with pytest.raises(ConfigError):
            load_source(bad)
    found = detect({SIM_ENV: "4"})
    assert isinstance(found, SimulatedSource) and found.watts == 4.0
    with pytest.raises(ConfigError, match=SIM_ENV):
        detect({SIM_ENV: "zero"})


# ---------------------------------------------------------------- the meter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A source whose readings the test sets: power or counter, and slow (sampled by the loop)."""

    name = "scripted"

    def __init__(self, kind: str, cheap: bool = True) -> None:
        self.kind = kind
        self.cheap = cheap
        self.value: float | None = None

    def read(self) -> float | None:
        return self.value


def test_the_meter_gives_watts_times_seconds_for_a_steady_draw() -> None:
    clock = Clock()
    meter = EnergyMeter(SimulatedSource(3.0), clock=clock)
    mark = meter.begin()
    clock.now += 2.5
    assert meter.end(mark) == pytest.approx(7.5)


def test_the_meter_integrates_a_changing_draw_and_carries_the_last_reading_past_it() -> None:
    clock, source = Clock(), Scripted("power", cheap=False)
    meter = EnergyMeter(source, clock=clock)  # type: ignore[arg-type]
    mark = meter.begin()  # a slow source: not read here
    assert meter.between(mark.t, clock.now) is None  # nothing read yet: unknown
    source.value = 2.0
    clock.now += 1
    meter.sample()
    source.value = 4.0
    clock.now += 1
    meter.sample()
    clock.now += 0.5
    # 1 s before the first sample at 2 W (carried back), 1 s rising from 2 to 4 W, 0.5 s at 4 W
    assert meter.end(mark) == pytest.approx(2.0 + 3.0 + 2.0)


def test_an_unreadable_moment_inside_a_task_makes_its_energy_unknown() -> None:
    clock, source = Clock(), Scripted("power")
    meter = EnergyMeter(source, clock=clock)  # type: ignore[arg-type]
    source.value = 5.0
    mark = meter.begin()
    clock.now += 1
    source.value = None  # plugged in mid-task
    meter.sample()
    clock.now += 1
    source.value = 5.0
    assert meter.end(mark) is None
    later = meter.begin()
    clock.now += 2
    assert meter.end(later) == pytest.approx(10.0)  # and known again once it reads


def test_the_meter_reads_a_counter_as_the_difference() -> None:
    clock, source = Clock(), Scripted("counter")
    meter = EnergyMeter(source, clock=clock)  # type: ignore[arg-type]
    source.value = 50.0
    mark = meter.begin()
    clock.now += 4
    source.value = 62.0
    assert meter.end(mark) == pytest.approx(12.0)


class Counting(Scripted):
    def __init__(self) -> None:
        super().__init__("power", cheap=False)
        self.value = 3.0
        self.reads = 0

    def read(self) -> float | None:
        self.reads += 1
        return self.value


async def test_the_sampling_loop_reads_a_slow_source_only_while_busy_and_once_as_work_ends() -> None:
    source = Counting()
    meter = EnergyMeter(source)  # type: ignore[arg-type]
    busy = asyncio.Event()
    loop = asyncio.create_task(sample_while_busy(meter, busy, interval_s=0.05))
    try:
        await asyncio.sleep(0.2)
        assert source.reads == 0  # idle: the phone is left alone
        mark = meter.begin()
        busy.set()
        await until(lambda: source.reads >= 3, what="samples while busy")
        busy.clear()
        reads = source.reads
        await until(lambda: source.reads > reads, what="the closing sample")
        await asyncio.sleep(0.3)
        settled = source.reads
        await asyncio.sleep(0.3)
        assert source.reads == settled  # idle again: no more reads
        assert meter.end(mark) is not None
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


# ---------------------------------------------------------------- a node and a hub


async def test_a_task_on_the_simulated_source_carries_joules_to_its_receipt_the_table_and_metrics(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    home = amqtt.home
    config = hub_config(tmp_path, ledger_path=home.ledger_file, signing_key_file=home.signing_key_file)
    watts = 4.0
    async with (
        running_hub(amqtt, config) as hub,
        running_node(
            amqtt,
            FakeEngine(reply="one two three four five six seven eight", delay_s=0.3),
            "phone",
            energy=EnergyMeter(SimulatedSource(watts)),
        ),
        running_node(amqtt, FakeEngine(reply="one two three", delay_s=0.1), "desk"),  # no energy source
        SwarmClient(amqtt.url(Role.CLIENT)) as client,
    ):
        await nodes_available(hub, 2)
        for i in range(4):  # both nodes answer each request, so both have receipts
            answer = await (await client.send(PromptRequest(prompt=f"count {i}", strategy="best_of_n", fanout=2)))
            assert isinstance(answer, Answer), answer
        await asyncio.sleep(1.0)  # the last loser's result
        rows = {r.node_id: r for r in hub.registry.table(time.time()).nodes}
        assert {"phone", "desk"} <= set(rows)
        metrics = {n: node_metrics(hub.registry.nodes[n], time.time(), 3.0) for n in ("phone", "desk")}
    found = list(receipts(home.ledger_file))
    by_node: dict[str, list[dict[str, Any]]] = {}
    for receipt in found:
        by_node.setdefault(receipt.body["node_id"], []).append(receipt.body)
    assert by_node.get("phone") and by_node.get("desk"), by_node.keys()
    for body in by_node["phone"]:
        # At least the 0.3 s the fake engine took, at 4 W; never wildly more on a loaded machine.
        assert body["energy_j"] is not None and watts * 0.3 <= body["energy_j"] < watts * 30, body
    assert all(body["energy_j"] is None for body in by_node["desk"])
    per_token = rows["phone"].joules_per_token
    assert per_token is not None and per_token > 0
    assert rows["desk"].joules_per_token is None
    assert metrics["phone"].joules_per_token == pytest.approx(per_token, abs=1e-4)
    assert metrics["desk"].joules_per_token == UNKNOWN


def test_a_result_from_an_older_node_without_energy_still_parses() -> None:
    old = {"task_id": "t1", "request_id": "r1", "node_id": "n1", "ok": True, "text": "hi"}
    assert decode(TaskResult, json.dumps(old)).energy_j is None
    with pytest.raises(Exception, match="energy_j"):
        decode(TaskResult, json.dumps({**old, "energy_j": -1.0}))


async def test_swarm_node_with_the_simulated_source_shows_in_the_ledger_export_and_swarm_hub_nodes(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    procs = Processes(amqtt, tmp_path)
    try:
        procs.hub()
        procs.spawn(
            "node-phone",
            [str(BIN / "swarm-node"), "run", *procs.common(), "--node-id", "phone", "--heartbeat", "1",
             "--engine", "fake", "--engine-option", "delay_s=0.2", "--engine-option", "reply=\"a b c d e f\"",
             "--energy", "sim:2.5", "--no-updates"],
        )  # fmt: skip
        await wait_online(procs, 1)
        for i in range(3):
            out = procs.swarm_hub("ask", f"task {i}", "--json", "--timeout", "30")
            assert out.returncode == 0, out.stdout + out.stderr
        energies: list[float | None] = []
        for _ in range(40):  # the hub writes its receipts in batches
            exported = procs.run([str(BIN / "swarm-hub"), "ledger", "export", "--config-dir", str(amqtt.home.path)])
            assert exported.returncode == 0, exported.stderr
            lines = [json.loads(line) for line in exported.stdout.splitlines() if line]
            energies = [r["body"]["energy_j"] for r in lines if r["body"]["node_id"] == "phone"]
            if len(energies) >= 3:
                break
            await asyncio.sleep(0.5)
        assert len(energies) >= 3 and all(e is not None and e >= 2.5 * 0.2 for e in energies), energies
        shown = ""
        for _ in range(40):  # the node table is republished every few seconds
            table = procs.swarm_hub("nodes")
            assert table.returncode == 0, table.stderr
            shown = table.stdout
            row = next((line for line in shown.splitlines() if line.startswith("phone")), "")
            if "J/TOK" in shown and row and row.split()[5] != "-":
                break
            await asyncio.sleep(0.5)
        header = shown.splitlines()[0].split()
        row = next(line for line in shown.splitlines() if line.startswith("phone"))
        assert header[5] == "J/TOK", shown
        assert float(row.split()[5]) > 0, shown
    finally:
        procs.close()


def test_swarm_node_refuses_a_bad_energy_source(amqtt: RunningBroker) -> None:
    out = subprocess.run(
        [str(BIN / "swarm-node"), "run", "--config-dir", str(amqtt.home.path), "--port", str(amqtt.port),
         "--engine", "fake", "--energy", "sim:nothing", "--no-updates"],
        capture_output=True, text=True, timeout=60, env=env_for(amqtt.home),
    )  # fmt: skip
    assert out.returncode == 2 and "positive number of watts" in out.stderr, out.stderr
