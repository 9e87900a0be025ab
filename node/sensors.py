"""What the node can read about its device: battery, charging, temperature, memory, load.

Battery, charging and temperature come from one *source*, picked automatically or by name:

    termux   ``termux-battery-status`` (Termux:API), the dependable reading on a phone
    sysfs    ``/sys/class/power_supply/*`` and ``/sys/class/thermal/thermal_zone*/temp``
    psutil   ``psutil.sensors_battery`` and ``sensors_temperatures``
    sim:PATH a JSON file (``{"battery_pct": 55, "charging": false, "temp_c": 38.5}``), re-read
             on every reading: for tests and demos, or to drive a node by hand

More sources plug in through the ``nova_swarm.sensors`` entry point (a callable taking the text
after ``name:`` and returning a :class:`Source`). Memory and load always come from psutil and
the OS. Anything that cannot be read is ``None``, never 0: SELinux blocks sysfs on many phones,
psutil can raise PermissionError on Android, and a desktop has no battery.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from nova_swarm.broker.contract.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Power:
    """What a source tells: the three readings the guard decides on."""

    battery_pct: float | None = None
    charging: bool | None = None
    temp_c: float | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    battery_pct: float | None
    charging: bool | None
    temp_c: float | None
    ram_free_mb: float | None
    ram_total_mb: float | None
    load: float | None
    source: str = "none"


class Source(Protocol):
    name: str

    def read(self) -> Power:
        """May block for a few seconds (``termux-battery-status`` does): call it off the loop."""
        ...


# ---------------------------------------------------------------- built-in sources


class TermuxSource:
    """``termux-battery-status``: needs the termux-api package *and* the Termux:API app. Without
    the app it hangs forever, and it sometimes hangs on repeat calls, so it runs under a timeout."""

    name = "termux"

    def __init__(self, command: str = "termux-battery-status", timeout_s: float = 8.0) -> None:
        self.command = command
        self.timeout_s = timeout_s

    def read(self) -> Power:
        raw = termux_battery_status(self.command, self.timeout_s)
        return Power() if raw is None else parse_termux(raw)


def termux_battery_status(command: str = "termux-battery-status", timeout_s: float = 8.0) -> dict[str, Any] | None:
    """``termux-battery-status``'s JSON object, or None when it failed, hung past ``timeout_s``
    or printed something else. Blocks: call it off the loop (the energy meter reads it too)."""
    try:
        out = subprocess.run([command], capture_output=True, text=True, timeout=timeout_s, check=False).stdout
        raw = json.loads(out)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def parse_termux(raw: dict[str, Any]) -> Power:
    """Lenient: fields come and go between Termux:API versions."""
    plugged = str(raw.get("plugged", "")).upper()
    status = str(raw.get("status", "")).upper()
    charging: bool | None = None
    if plugged.startswith("PLUGGED") or status in ("CHARGING", "FULL"):
        charging = True
    elif plugged == "UNPLUGGED" or status in ("DISCHARGING", "NOT_CHARGING"):
        charging = False
    return Power(number(raw.get("percentage")), charging, number(raw.get("temperature")))


class SysfsSource:
    name = "sysfs"

    def __init__(self, root: Path = Path("/sys/class")) -> None:
        self.root = root

    def read(self) -> Power:
        battery_pct = charging = battery_temp = None
        mains_online = False
        for supply in children(self.root / "power_supply"):
            kind = read_text(supply / "type")
            if kind == "Battery":
                battery_pct = number(read_text(supply / "capacity"))
                status = (read_text(supply / "status") or "").lower()
                if status in ("charging", "full"):
                    charging = True
                elif status in ("discharging", "not charging"):
                    charging = False
                tenths = number(read_text(supply / "temp"))
                battery_temp = tenths / 10 if tenths is not None else None
            elif kind in ("Mains", "USB", "Wireless") and read_text(supply / "online") == "1":
                mains_online = True
        if charging is None and battery_pct is not None:
            charging = mains_online
        return Power(battery_pct, charging, battery_temp if battery_temp is not None else self._hottest_zone())

    def _hottest_zone(self) -> float | None:
        temps = []
        for zone in children(self.root / "thermal"):
            if zone.name.startswith("thermal_zone"):
                milli = number(read_text(zone / "temp"))
                # Some zones report garbage (negative or absurd values) when their sensor is off.
                if milli is not None and 0 < milli < 150_000:
                    temps.append(milli / 1000)
        return max(temps) if temps else None


class PsutilSource:
    name = "psutil"

    def read(self) -> Power:
        psutil = _psutil()
        if psutil is None:
            return Power()
        battery_pct = charging = temp_c = None
        battery = _quietly(psutil.sensors_battery) if hasattr(psutil, "sensors_battery") else None
        if battery is not None:
            battery_pct = float(battery.percent)
            charging = None if battery.power_plugged is None else bool(battery.power_plugged)
        temps = _quietly(psutil.sensors_temperatures) if hasattr(psutil, "sensors_temperatures") else None
        if temps:
            readings = [t.current for entries in temps.values() for t in entries if t.current is not None]
            temp_c = float(max(readings)) if readings else None
        return Power(battery_pct, charging, temp_c)


class SimulatedSource:
    """A JSON file stands in for the hardware; a missing file or key reads as unknown."""

    name = "sim"

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Power:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return Power()
        if not isinstance(raw, dict):
            return Power()
        charging = raw.get("charging")
        return Power(
            number(raw.get("battery_pct")),
            charging if isinstance(charging, bool) else None,
            number(raw.get("temp_c")),
        )


# ---------------------------------------------------------------- choosing a source


def load_source(spec: str) -> Source:
    """``auto``, ``termux``, ``sysfs``, ``psutil``, ``sim:PATH``, or a plugin's ``name[:arg]``."""
    name, _, arg = spec.partition(":")
    if name == "auto":
        return detect()
    if name == "termux":
        return TermuxSource()
    if name == "sysfs":
        return SysfsSource()
    if name == "psutil":
        return PsutilSource()
    if name == "sim":
        if not arg:
            raise ConfigError("the simulated sensor needs a file: --sensors sim:/path/to/sensors.json")
        return SimulatedSource(Path(arg).expanduser())
    plugins = {ep.name: ep for ep in entry_points(group="nova_swarm.sensors")}
    if name not in plugins:
        known = ", ".join(["auto", "termux", "sysfs", "psutil", "sim:PATH", *sorted(plugins)])
        raise ConfigError(f"unknown sensor source {spec!r}; choose one of {known}")
    factory: Callable[[str], Source] = plugins[name].load()
    return factory(arg)


def detect() -> Source:
    """The best source this device has: Termux:API on a phone, else whatever reads something."""
    if is_termux() and shutil.which("termux-battery-status"):
        return TermuxSource()
    sysfs = SysfsSource()
    if sysfs.read() != Power():
        return sysfs
    return PsutilSource()


def read(source: Source) -> Reading:
    """One full reading. Blocks while the source does: call it in a worker thread."""
    try:
        power = source.read()
    except Exception:  # a plugin's bug must not take the node down; unknown is honest
        power = Power()
    ram_free = ram_total = None
    psutil = _psutil()
    if psutil is not None:
        memory = _quietly(psutil.virtual_memory)
        if memory is not None:
            ram_free = memory.available / 2**20
            ram_total = memory.total / 2**20
    load = None
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        pass
    return Reading(power.battery_pct, power.charging, power.temp_c, ram_free, ram_total, load, source.name)


UNKNOWN = Reading(None, None, None, None, None, None)


def is_termux() -> bool:
    return "com.termux" in os.environ.get("PREFIX", "")


# ---------------------------------------------------------------- helpers


def number(value: object) -> float | None:
    """``value`` as a finite float, or None (shared with energy.py for sysfs and Termux readings)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        got = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return got if got == got and abs(got) != float("inf") else None


def read_text(path: Path) -> str | None:
    """A sysfs file's stripped text, or None when it cannot be read."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):  # PermissionError included: SELinux on phones
        return None


def children(path: Path) -> list[Path]:
    """A directory's entries, sorted; none when it cannot be listed."""
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _psutil() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _quietly(fn: Any) -> Any:
    try:
        return fn()
    except (OSError, NotImplementedError, RuntimeError, AttributeError):
        return None
