"""What the node can read about its machine for heartbeats. Unknown is ``None``, never 0.

psutil can raise PermissionError on Android (/proc/stat) and may be missing on a phone, so
every reading is guarded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Reading:
    battery_pct: float | None
    charging: bool | None
    temp_c: float | None
    ram_free_mb: float | None
    ram_total_mb: float | None
    load: float | None


def read() -> Reading:
    psutil = _psutil()
    battery_pct = charging = temp_c = ram_free = ram_total = None
    if psutil is not None:
        battery = _guard(psutil.sensors_battery) if hasattr(psutil, "sensors_battery") else None
        if battery is not None:
            battery_pct = float(battery.percent)
            charging = None if battery.power_plugged is None else bool(battery.power_plugged)
        temps = _guard(psutil.sensors_temperatures) if hasattr(psutil, "sensors_temperatures") else None
        if temps:
            readings = [t.current for entries in temps.values() for t in entries if t.current is not None]
            temp_c = float(max(readings)) if readings else None
        memory = _guard(psutil.virtual_memory)
        if memory is not None:
            ram_free = memory.available / 2**20
            ram_total = memory.total / 2**20
    load = None
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        pass
    return Reading(battery_pct, charging, temp_c, ram_free, ram_total, load)


def _psutil() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _guard(fn: Any) -> Any:
    try:
        return fn()
    except (OSError, PermissionError, NotImplementedError, RuntimeError):
        return None


def is_termux() -> bool:
    return "com.termux" in os.environ.get("PREFIX", "")
