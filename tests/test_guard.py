"""The battery and thermal guard, and the sensor sources, checked directly (no I/O but files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nova_swarm.node.guard import Guard, GuardConfig, Pause, Resume
from nova_swarm.node.sensors import (
    Power,
    Reading,
    SimulatedSource,
    SysfsSource,
    TermuxSource,
    load_source,
    parse_termux,
)


def r(temp: float | None = 30.0, battery: float | None = 80.0, charging: bool | None = False) -> Reading:
    return Reading(battery, charging, temp, None, None, None, "test")


def test_heat_pauses_at_the_limit_and_resumes_only_5_degrees_cooler() -> None:
    guard = Guard(GuardConfig())
    assert guard.update(r(41.9)) is None
    change = guard.update(r(42.0))
    assert isinstance(change, Pause) and "too hot: 42.0 °C" in change.reason
    for t in (41.0, 39.0, 37.1):  # cooler, but not past the margin: still paused
        assert guard.update(r(t)) is None and guard.paused
    assert isinstance(guard.update(r(37.0)), Resume)
    assert (guard.pauses, guard.resumes) == (1, 1)


def test_low_battery_pauses_unless_charging_and_resumes_at_10_percent_more_or_on_charge() -> None:
    guard = Guard(GuardConfig())
    assert guard.update(r(battery=31)) is None
    assert isinstance(guard.update(r(battery=30)), Pause)
    assert guard.update(r(battery=39)) is None and guard.paused
    assert isinstance(guard.update(r(battery=40)), Resume)
    assert isinstance(guard.update(r(battery=20)), Pause)
    assert isinstance(guard.update(r(battery=20, charging=True)), Resume)  # plugged in
    assert guard.update(r(battery=5, charging=True)) is None  # charging: low is fine


def test_charging_only_mode_works_only_while_plugged_in() -> None:
    guard = Guard(GuardConfig(charging_only=True))
    assert isinstance(guard.update(r(charging=False)), Pause)
    assert isinstance(guard.update(r(charging=True)), Resume)
    change = guard.update(r(charging=None))
    assert isinstance(change, Pause) and "unknown" in change.reason


def test_unknown_readings_never_pause_and_the_reason_follows_the_readings() -> None:
    guard = Guard(GuardConfig())
    assert guard.update(r(None, None, None)) is None
    assert isinstance(guard.update(r(45.0, 20.0)), Pause)
    assert "too hot" in (guard.reason or "") and "battery low" in (guard.reason or "")
    assert guard.update(r(30.0, 20.0)) is None  # cool now, still flat
    assert guard.reason is not None and "too hot" not in guard.reason
    assert Guard(GuardConfig(enabled=False)).update(r(90.0, 1.0)) is None


def test_termux_battery_status_is_parsed_leniently() -> None:
    full = {"health": "GOOD", "percentage": 81, "plugged": "PLUGGED_USB", "status": "CHARGING", "temperature": 33.5}
    assert parse_termux(full) == Power(81.0, True, 33.5)
    assert parse_termux({"percentage": 12, "plugged": "UNPLUGGED"}) == Power(12.0, False, None)
    assert parse_termux({"percentage": "n/a", "status": "UNKNOWN"}) == Power(None, None, None)


def test_a_hanging_termux_battery_status_reads_as_unknown(tmp_path: Path) -> None:
    hang = tmp_path / "termux-battery-status"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    assert TermuxSource(str(hang), timeout_s=0.5).read() == Power()
    assert TermuxSource(str(tmp_path / "missing")).read() == Power()


def test_sysfs_reads_battery_and_thermal_zones_and_treats_blocked_files_as_unknown(tmp_path: Path) -> None:
    bat = tmp_path / "power_supply" / "battery"
    bat.mkdir(parents=True)
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("64\n")
    (bat / "status").write_text("Discharging\n")
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("47500\n")
    assert SysfsSource(tmp_path).read() == Power(64.0, False, 47.5)
    (bat / "temp").write_text("315\n")  # a battery temperature, in tenths: preferred
    assert SysfsSource(tmp_path).read() == Power(64.0, False, 31.5)
    assert SysfsSource(tmp_path / "nowhere").read() == Power()


def test_simulated_source_and_source_names(tmp_path: Path) -> None:
    path = tmp_path / "sensors.json"
    sim = load_source(f"sim:{path}")
    assert isinstance(sim, SimulatedSource) and sim.read() == Power()  # no file yet: unknown
    path.write_text(json.dumps({"battery_pct": 55, "charging": False, "temp_c": 38.5}))
    assert sim.read() == Power(55.0, False, 38.5)
    path.write_text(json.dumps({"temp_c": "hot"}))
    assert sim.read() == Power()
    for name in ("termux", "sysfs", "psutil", "auto"):
        assert load_source(name).name in ("termux", "sysfs", "psutil")
    with pytest.raises(Exception, match="unknown sensor source"):
        load_source("thermometer")
