"""The issue's targets as data, and checking a measured figure against one.

A target is never a pass/fail test of the benchmark run: it is a line in the report, met, missed,
or not measured (a section that failed, or a figure that does not exist yet, such as streaming).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

Op = Literal["<=", ">=", "<", ">"]
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}


@dataclass(frozen=True, slots=True)
class Target:
    section: str
    name: str
    op: Op
    threshold: float
    unit: str
    measured: float | None
    #: what the figure is, for the report ("p50 overhead on Mosquitto, warm")
    note: str = ""

    @property
    def met(self) -> bool | None:
        """True or False; None when nothing was measured."""
        if self.measured is None:
            return None
        return _OPS[self.op](self.measured, self.threshold)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]

    def describe(self) -> str:
        figure = "-" if self.measured is None else f"{self.measured:.4g}{self.unit}"
        return f"{self.name}: {figure} (target {self.op} {self.threshold:g}{self.unit}) {self.verdict}"

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "op": self.op,
            "threshold": self.threshold,
            "unit": self.unit,
            "measured": None if self.measured is None else round(self.measured, 4),
            "met": self.met,
            "note": self.note,
        }


def missed(targets: Iterable[Target]) -> list[Target]:
    return [t for t in targets if t.met is False]


def all_below(values: Iterable[float | None], limits: Iterable[float | None]) -> bool | None:
    """Whether every value is strictly below its limit (the swarm's p50 against Celery's at each
    concurrency); None if any pair was not measured."""
    pairs = list(zip(values, limits, strict=True))
    if not pairs or any(v is None or lim is None for v, lim in pairs):
        return None
    return all(v < lim for v, lim in pairs if v is not None and lim is not None)
