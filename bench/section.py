"""What a section hands to the report: its figures (JSON), its table, its targets and notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .targets import Target


@dataclass(frozen=True, slots=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str = ""


@dataclass(frozen=True, slots=True)
class SectionResult:
    key: str
    title: str
    data: dict[str, Any]
    tables: tuple[Table, ...] = ()
    targets: tuple[Target, ...] = ()
    #: what ran where, settings, caveats: printed under the section's tables
    notes: tuple[str, ...] = ()
    #: per broker (or "celery"), why a part of the section did not run
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "data": self.data,
            "targets": [t.to_json() for t in self.targets],
            "notes": list(self.notes),
            "errors": dict(self.errors),
        }


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"
