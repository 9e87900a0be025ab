"""Printing the sections as text tables, and writing the JSON and a Markdown copy for the README."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .section import SectionResult, Table
from .targets import Target, missed


def render_table(table: Table) -> list[str]:
    widths = [len(h) for h in table.header]
    for row in table.rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
    lines = []
    if table.title:
        lines.append(f"  {table.title}")
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(table.header, widths, strict=False)))
    lines.append("  " + "  ".join("-" * w for w in widths))
    for row in table.rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
    if not table.rows:
        lines.append("  (no figures)")
    return lines


def print_section(section: SectionResult, out: TextIO) -> None:
    print(f"\n== {section.title} ==", file=out)
    for table in section.tables:
        print("\n".join(render_table(table)), file=out)
    for who, error in section.errors.items():
        print(f"  ERROR ({who}): {error}", file=out)
    for note in section.notes:
        print(f"  * {note}", file=out)
    for target in section.targets:
        print(f"  target  {target.describe()}", file=out)
    out.flush()


def print_summary(targets: Sequence[Target], out: TextIO) -> None:
    print("\n== Targets ==", file=out)
    for t in targets:
        print(f"  [{t.verdict:>12}] {t.describe()}", file=out)
    met = sum(1 for t in targets if t.met)
    unmeasured = sum(1 for t in targets if t.met is None)
    line = f"  {met} of {len(targets)} targets met, {len(missed(targets))} missed"
    print(line + (f", {unmeasured} not measured." if unmeasured else "."), file=out)


def write_json(path: Path, meta: dict[str, Any], sections: Sequence[SectionResult]) -> None:
    targets = [t for s in sections for t in s.targets]
    doc = {
        "meta": meta,
        "sections": {s.key: s.to_json() for s in sections},
        "targets": [t.to_json() for t in targets],
        "missed": [t.to_json() for t in missed(targets)],
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def markdown(meta: dict[str, Any], sections: Sequence[SectionResult]) -> str:
    """The README's Benchmarks table: every section's tables and every target, plainly."""
    lines = [f"Command: `{meta['command']}` · {meta['date']} · {meta['machine']}", ""]
    for s in sections:
        lines.append(f"**{s.title}**")
        lines.append("")
        for table in s.tables:
            if table.title:
                lines.append(f"*{table.title}*")
                lines.append("")
            lines.append("| " + " | ".join(table.header) + " |")
            lines.append("|" + "---|" * len(table.header))
            for row in table.rows:
                lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
            lines.append("")
        for who, error in s.errors.items():
            lines.append(f"- error ({who}): {error}")
        if s.errors:
            lines.append("")
    targets = [t for s in sections for t in s.targets]
    lines.append("**Targets**")
    lines.append("")
    lines.append("| target | measured | goal | verdict |")
    lines.append("|---|---|---|---|")
    for t in targets:
        figure = "-" if t.measured is None else f"{t.measured:.4g}{t.unit}"
        note = f" ({t.note})" if t.note else ""
        lines.append(f"| {t.name}{note} | {figure} | {t.op} {t.threshold:g}{t.unit} | {t.verdict} |")
    return "\n".join(lines) + "\n"
