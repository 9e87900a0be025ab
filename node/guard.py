"""The guard: when a phone is too hot or too flat to work, the node pauses. No I/O here.

    guard = Guard(GuardConfig())
    change = guard.update(reading)    # Pause("...") / Resume("...") / None

Pausing trips at ``max_temp_c`` (42 °C), or at ``min_battery_pct`` (30 %) while not charging,
or, in charging-only mode, whenever the device is not known to be charging. Resuming needs a
margin, so a phone sitting at the threshold does not flap: ``resume_cooler_c`` (5 °C) below the
temperature limit, and ``resume_battery_pct`` (10 %) above the battery limit or charging.

An unknown reading never trips the guard (a laptop without a battery sensor keeps working),
except in charging-only mode, where "not known to be charging" means "not charging": the owner
asked for work only while plugged in.
"""

from __future__ import annotations

from dataclasses import dataclass

from nova_swarm.broker.contract.errors import ConfigError

from .sensors import Reading


@dataclass(frozen=True, slots=True)
class GuardConfig:
    max_temp_c: float = 42.0
    min_battery_pct: float = 30.0
    resume_cooler_c: float = 5.0
    resume_battery_pct: float = 10.0
    charging_only: bool = False
    #: off: never pause (for a desktop where the readings mean nothing)
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.resume_cooler_c < 0 or self.resume_battery_pct < 0:
            raise ConfigError("the guard's resume margins must be 0 or more")
        if not 0 <= self.min_battery_pct < 100:
            raise ConfigError("the battery limit must be a percentage below 100")


@dataclass(frozen=True, slots=True)
class Pause:
    reason: str


@dataclass(frozen=True, slots=True)
class Resume:
    reason: str


class Guard:
    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.paused = False
        self.reason: str | None = None
        self.pauses = 0
        self.resumes = 0

    def update(self, reading: Reading) -> Pause | Resume | None:
        """Feed a reading; returns the change of state it causes, if any."""
        if not self.config.enabled:
            return None
        reasons = self._reasons(reading)
        if reasons and not self.paused:
            self.paused, self.reason = True, "; ".join(reasons)
            self.pauses += 1
            return Pause(self.reason)
        if self.paused and not reasons:
            self.paused, self.reason = False, None
            self.resumes += 1
            return Resume(_describe(reading))
        if self.paused:
            self.reason = "; ".join(reasons)  # still paused, perhaps now for another reason
        return None

    def _reasons(self, r: Reading) -> list[str]:
        c = self.config
        # Paused, a reason only clears past its margin: that is the hysteresis.
        temp_limit = c.max_temp_c - (c.resume_cooler_c if self.paused else 0.0)
        battery_limit = c.min_battery_pct + (c.resume_battery_pct if self.paused else 0.0)
        reasons = []
        hot = r.temp_c is not None and (r.temp_c > temp_limit if self.paused else r.temp_c >= temp_limit)
        if hot:
            reasons.append(f"too hot: {r.temp_c:.1f} °C (limit {c.max_temp_c:g} °C)")
        low = r.battery_pct is not None and (
            r.battery_pct <= battery_limit if not self.paused else r.battery_pct < battery_limit
        )
        if low and r.charging is not True:
            reasons.append(f"battery low: {r.battery_pct:.0f} % and not charging (limit {c.min_battery_pct:g} %)")
        if c.charging_only and r.charging is not True:
            reasons.append(
                "charging-only mode and not charging"
                if r.charging is False
                else "charging-only mode and charging state unknown"
            )
        return reasons


def _describe(r: Reading) -> str:
    parts = []
    if r.temp_c is not None:
        parts.append(f"{r.temp_c:.1f} °C")
    if r.battery_pct is not None:
        parts.append(f"battery {r.battery_pct:.0f} %")
    if r.charging:
        parts.append("charging")
    return ", ".join(parts) or "readings back in range"
