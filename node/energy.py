"""How much energy a task used: sources that read the device's power, and a meter over them.

A *source* reads one of two things, picked automatically or by name (``--energy``):

    rapl     ``/sys/class/powercap/intel-rapl:N/energy_uj``: a counter of joules the CPU
             packages used, wrapping at ``max_energy_range_uj`` (kind ``counter``)
    battery  ``/sys/class/power_supply/*``: ``power_now``, or ``current_now`` x ``voltage_now``,
             while the battery discharges (kind ``power``; on a charger it is unknown)
    termux   ``termux-battery-status``: ``current`` x ``voltage`` while discharging (kind
             ``power``; slow, and it can hang, so it runs under a timeout)
    sim:W    a steady W watts, for tests and demos (also ``NOVA_SWARM_ENERGY_SIM=W``)
    none     no estimate: every task's energy is unknown

More sources plug in through the ``nova_swarm.energy`` entry point, as sensor sources do
(``sensors.py``). What a source cannot read is ``None``: a desktop without RAPL access (the
counter is root-only on current kernels), a phone on its charger, SELinux saying no.

The *meter* keeps the source's recent samples as a running total of joules and answers "how many
joules between these two moments", interpolating between samples and extending the nearest one
past the ends. Cheap sources are read at the start and end of every task as well as by the
node's sampling loop; a slow one (Termux) only by the loop, off the event loop. The figure is
the device's whole draw while the task ran: an estimate of what the task cost, not a
measurement of the process alone.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol

from nova_swarm.broker.contract.errors import ConfigError

from .sensors import children, is_termux, number, read_text, termux_battery_status

#: the environment variable that makes ``auto`` pick a simulated source of this many watts
SIM_ENV = "NOVA_SWARM_ENERGY_SIM"

Kind = Literal["counter", "power"]


class EnergySource(Protocol):
    name: str
    #: ``counter``: ``read`` gives joules since some origin; ``power``: watts right now
    kind: Kind
    #: a read takes microseconds (a file), so it may happen at a task's start and end
    cheap: bool

    def read(self) -> float | None:
        """None when it cannot be read now. Blocking for slow sources: call them off the loop."""
        ...


# ---------------------------------------------------------------- built-in sources


class RaplSource:
    """Intel/AMD RAPL through powercap: the package zones (``intel-rapl:N``; their sub-zones
    ``intel-rapl:N:M`` are parts of them and would count twice), summed, each unwrapped."""

    name = "rapl"
    kind: Kind = "counter"
    cheap = True

    def __init__(self, root: Path = Path("/sys/class/powercap")) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}
        self._total_uj = 0

    def zones(self) -> list[Path]:
        return [z for z in children(self.root) if z.name.startswith("intel-rapl:") and z.name.count(":") == 1]

    def read(self) -> float | None:
        readings = []
        for zone in self.zones():
            raw = number(read_text(zone / "energy_uj"))
            if raw is None:
                return None  # one zone unreadable: a partial sum would look like a saving
            wrap = number(read_text(zone / "max_energy_range_uj"))
            readings.append((zone.name, int(raw), int(wrap) if wrap else None))
        if not readings:
            return None
        with self._lock:  # the sampling loop and a task's end may read at once
            for zone_name, raw, wrap in readings:
                last = self._last.get(zone_name)
                if last is not None:
                    step = raw - last
                    if step < 0:  # the counter wrapped (every few minutes to hours under load)
                        step += (wrap + 1) if wrap else 0
                    self._total_uj += max(step, 0)
                self._last[zone_name] = raw
            return self._total_uj / 1e6


class BatterySource:
    """The battery in sysfs, while it discharges: it then feeds everything the device draws."""

    name = "battery"
    kind: Kind = "power"
    cheap = True

    def __init__(self, root: Path = Path("/sys/class/power_supply")) -> None:
        self.root = root

    def batteries(self) -> list[Path]:
        return [s for s in children(self.root) if read_text(s / "type") == "Battery"]

    def read(self) -> float | None:
        total = None
        for supply in self.batteries():
            watts = battery_watts(
                status=read_text(supply / "status"),
                power_uw=number(read_text(supply / "power_now")),
                current_ua=number(read_text(supply / "current_now")),
                voltage_uv=number(read_text(supply / "voltage_now")),
            )
            if watts is None:
                return None
            total = (total or 0.0) + watts
        return total


def battery_watts(
    *, status: str | None, power_uw: float | None, current_ua: float | None, voltage_uv: float | None
) -> float | None:
    """Watts drawn from one sysfs battery, or None unless it is known to be discharging."""
    if (status or "").strip().lower() != "discharging":
        return None
    if power_uw is not None and power_uw != 0:
        return abs(power_uw) / 1e6
    if current_ua is not None and voltage_uv is not None and current_ua != 0 and voltage_uv > 0:
        return abs(current_ua) * voltage_uv / 1e12  # some kernels sign the current, some do not
    return None


class TermuxSource:
    """``termux-battery-status`` on a phone: needs the termux-api package and the Termux:API
    app; without the app it hangs, so it always runs under a timeout."""

    name = "termux"
    kind: Kind = "power"
    cheap = False

    def __init__(self, command: str = "termux-battery-status", timeout_s: float = 8.0) -> None:
        self.command = command
        self.timeout_s = timeout_s

    def read(self) -> float | None:
        raw = termux_battery_status(self.command, self.timeout_s)
        return None if raw is None else termux_watts(raw)


#: more than this from a phone battery is a unit mix-up, not a reading
PHONE_MAX_W = 40.0


def termux_watts(raw: dict[str, Any]) -> float | None:
    """Watts from ``termux-battery-status``'s JSON, while discharging; None otherwise.

    Lenient about units, which differ between Android vendors and Termux:API versions:
    ``current`` is microamperes on most phones and milliamperes on some (Samsung), signed either
    way; ``voltage`` is millivolts from older Termux:API and volts from newer."""
    status = str(raw.get("status", "")).upper()
    plugged = str(raw.get("plugged", "")).upper()
    if status not in ("DISCHARGING", "NOT_CHARGING") and not (plugged == "UNPLUGGED" and status != "CHARGING"):
        return None
    if plugged.startswith("PLUGGED"):
        return None
    current, voltage = number(raw.get("current")), number(raw.get("voltage"))
    if current is None or voltage is None or current == 0 or voltage <= 0:
        return None
    amps = abs(current) / (1e6 if abs(current) >= 10_000 else 1e3)
    volts = voltage / 1e6 if voltage >= 100_000 else voltage / 1e3 if voltage >= 100 else voltage
    watts = amps * volts
    return watts if 0 < watts <= PHONE_MAX_W else None


class SimulatedSource:
    """A steady draw of ``watts``: what the tests measure tasks with."""

    name = "sim"
    kind: Kind = "power"
    cheap = True

    def __init__(self, watts: float) -> None:
        self.watts = watts

    def read(self) -> float | None:
        return self.watts


# ---------------------------------------------------------------- choosing a source


def load_source(spec: str) -> EnergySource | None:
    """``auto``, ``rapl``, ``battery``, ``termux``, ``sim:WATTS``, ``none``, or a plugin's
    ``name[:arg]``. None: no estimate."""
    name, _, arg = spec.partition(":")
    if name == "auto":
        return detect()
    if name == "none":
        return None
    if name == "rapl":
        return RaplSource()
    if name == "battery":
        return BatterySource()
    if name == "termux":
        return TermuxSource()
    if name == "sim":
        return SimulatedSource(_watts(arg, "--energy sim:WATTS"))
    plugins = {ep.name: ep for ep in entry_points(group="nova_swarm.energy")}
    if name not in plugins:
        known = ", ".join(["auto", "rapl", "battery", "termux", "sim:WATTS", "none", *sorted(plugins)])
        raise ConfigError(f"unknown energy source {spec!r}; choose one of {known}")
    factory: Callable[[str], EnergySource] = plugins[name].load()
    return factory(arg)


def _watts(text: str, where: str) -> float:
    watts = number(text)
    if watts is None or watts <= 0:
        raise ConfigError(f"{where} wants a positive number of watts, not {text!r}")
    return watts


def detect(environ: dict[str, str] | None = None) -> EnergySource | None:
    """The simulated source when ``NOVA_SWARM_ENERGY_SIM`` is set, else the first that reads:
    Termux:API on a phone, RAPL, a discharging battery; else None."""
    env = os.environ if environ is None else environ
    if sim := env.get(SIM_ENV):
        return SimulatedSource(_watts(sim, SIM_ENV))
    if is_termux() and shutil.which("termux-battery-status"):
        return TermuxSource()
    rapl = RaplSource()
    if rapl.read() is not None:
        return rapl
    battery = BatterySource()
    if battery.batteries():
        return battery  # on a charger now, perhaps not later
    return None


# ---------------------------------------------------------------- the meter


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float
    #: a running total of joules (its origin does not matter); None: the source could not be read
    joules: float | None
    #: watts at ``t`` (power sources), or the counter's rate since the previous sample
    watts: float | None


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a task began."""

    t: float


class EnergyMeter:
    """Samples of one source as a running total of joules. Thread-safe: the sampling loop's
    worker thread and a task's worker thread both feed it."""

    def __init__(self, source: EnergySource, *, clock: Callable[[], float] = time.monotonic, keep: int = 4096) -> None:
        self.source = source
        self.clock = clock
        self._samples: deque[_Sample] = deque(maxlen=keep)
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.source.name

    def sample(self) -> None:
        """Read the source once (blocking while it does)."""
        try:
            value = self.source.read()
        except Exception:  # a plugin's bug must not take the node down; unknown is honest
            value = None
        t = self.clock()
        with self._lock:
            last = self._samples[-1] if self._samples else None
            if value is None:
                self._samples.append(_Sample(t, None, None))
            elif self.source.kind == "power":
                joules = 0.0
                if last is not None and last.joules is not None and last.watts is not None:
                    joules = last.joules + (last.watts + value) / 2 * (t - last.t)
                self._samples.append(_Sample(t, joules, value))
            else:  # a counter: the source keeps it monotonic; the rate is since the last good read
                rate = None
                if last is not None and last.joules is not None and t > last.t:
                    rate = max(value - last.joules, 0.0) / (t - last.t)
                self._samples.append(_Sample(t, value, rate))

    def begin(self) -> Mark:
        """A task starts: a cheap source is read now."""
        if self.source.cheap:
            self.sample()
        return Mark(self.clock())

    def end(self, mark: Mark, *, sharing: int = 1) -> float | None:
        """A task ends: the joules the device used since ``mark``, or None when unknown, split
        evenly among the ``sharing`` tasks running at the end (with one slot, all of it: the
        figure is the whole device's draw while the task ran)."""
        if self.source.cheap:
            self.sample()
        joules = self.between(mark.t, self.clock())
        return None if joules is None else joules / max(sharing, 1)

    def between(self, t0: float, t1: float) -> float | None:
        with self._lock:
            samples = list(self._samples)
        if not samples or t1 < t0:
            return None
        # A sample the source could not read inside the interval: part of it is unknown.
        if any(s.joules is None and t0 <= s.t <= t1 for s in samples):
            return None
        a, b = _at(samples, t0), _at(samples, t1)
        if a is None or b is None:
            return None
        return max(b - a, 0.0)


def _at(samples: list[_Sample], t: float) -> float | None:
    """Joules at ``t``: interpolated between the samples around it, or the nearest sample's
    rate carried to it. None when the nearest samples were unreadable."""
    before = next((s for s in reversed(samples) if s.t <= t), None)
    after = next((s for s in samples if s.t >= t), None)
    if before is not None and after is not None and before.joules is not None and after.joules is not None:
        if after.t == before.t:
            return before.joules
        return before.joules + (after.joules - before.joules) * (t - before.t) / (after.t - before.t)
    near = before if before is not None and before.joules is not None else after
    if near is None or near.joules is None:
        return None
    if near.watts is None:
        return near.joules if near.t == t else None
    return near.joules + near.watts * (t - near.t)


#: seconds between samples while a task runs, for a cheap source and for a slow one: each
#: ``termux-battery-status`` is a process (Android 12+ kills apps with too many) and a wake-up
SAMPLE_S, SLOW_SAMPLE_S = 1.0, 5.0


async def sample_while_busy(meter: EnergyMeter, busy: asyncio.Event, *, interval_s: float | None = None) -> None:
    """The node's sampling loop: reads the source while tasks run, and once more as they end,
    so a slow source has samples inside every task and an idle phone is not woken for nothing."""
    if interval_s is None:
        interval_s = SAMPLE_S if meter.source.cheap else SLOW_SAMPLE_S
    while True:
        await busy.wait()
        while busy.is_set():
            await asyncio.to_thread(meter.sample)
            await asyncio.sleep(interval_s)
        await asyncio.to_thread(meter.sample)
