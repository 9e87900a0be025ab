"""PNG plots of a run (matplotlib, headless): one per section and a summary of them all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .section import SectionResult

COLOURS = {"amqtt": "#1f77b4", "mosquitto": "#2ca02c", "celery": "#d62728", "direct": "#7f7f7f"}


def _overhead(ax: Any, s: SectionResult) -> None:
    labels, direct, swarm, colours = [], [], [], []
    for broker, d in s.data.items():
        for kind in ("warm", "cold"):
            if kind in d:
                labels.append(f"{broker}\n{kind}")
                direct.append(d[kind]["direct_ms"]["p50"])
                swarm.append(d[kind]["swarm_ms"]["p50"])
                colours.append(COLOURS.get(broker, "#333"))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], direct, 0.4, label="direct llama-cpp", color=COLOURS["direct"])
    ax.bar([i + 0.2 for i in x], swarm, 0.4, label="through the swarm", color=colours)
    for i, (a, b) in enumerate(zip(direct, swarm, strict=True)):
        ax.annotate(f"{b - a:+.1f} ms", (i + 0.2, b), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("p50 latency, ms")
    ax.set_title("1. Overhead (p50, full answer)")
    ax.legend(fontsize=8)


def _dispatch(ax: Any, s: SectionResult) -> None:
    for system, d in s.data.items():
        pts = sorted(d["points"], key=lambda p: p["concurrency"])
        label = system if system == "celery" else f"swarm / {system}"
        ax.plot([p["concurrency"] for p in pts], [p["throughput"] for p in pts], "o-", label=label,
                color=COLOURS.get(system))  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("tasks/s")
    ax.set_title("2. Dispatch capacity: swarm vs Celery + Redis")
    ax.legend(fontsize=8)


def _scaling(ax: Any, s: SectionResult) -> None:
    for broker, d in s.data.items():
        fake = d.get("fake")
        if not fake:
            continue
        pts = fake["points"]
        ax.plot([p["nodes"] for p in pts], [p["efficiency"] or 0 for p in pts], "o-", label=broker,
                color=COLOURS.get(broker))  # fmt: skip
    ax.axhline(0.95, color=COLOURS["mosquitto"], ls=":", lw=1, label="target, mosquitto")
    ax.axhline(0.9, color=COLOURS["amqtt"], ls=":", lw=1, label="target, amqtt")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("nodes (100 ms per task)")
    ax.set_ylabel("efficiency")
    ax.set_title("3. Scaling efficiency")
    ax.legend(fontsize=8)


def _race(ax: Any, s: SectionResult) -> None:
    width = 0.8 / max(1, len(s.data))
    for i, (broker, d) in enumerate(s.data.items()):
        pts = [p for p in d["points"] if "latency_ms" in p]
        for j, q in enumerate(("p50", "p95", "p99")):
            xs = [p["fanout"] + (i - (len(s.data) - 1) / 2) * width for p in pts]
            ax.scatter(xs, [p["latency_ms"][q] for p in pts], marker="o^s"[j], color=COLOURS.get(broker),
                       label=f"{broker} {q}")  # fmt: skip
    ax.set_xticks([1, 2, 3])
    ax.set_xlabel("race fanout")
    ax.set_ylabel("latency, ms")
    ax.set_title("4. Race: log-normal nodes, tail vs fanout")
    ax.legend(fontsize=7, ncol=2)


def _recovery(ax: Any, s: SectionResult) -> None:
    from .recovery import PEERS_S

    names, values, colours = [], [], []
    for broker, d in s.data.items():
        names.append(f"nova-swarm\n{broker}")
        values.append(d["restart_s"]["p50"])
        colours.append(COLOURS.get(broker, "#333"))
    for peer, secs in PEERS_S.items():
        names.append(peer)
        values.append(secs)
        colours.append("#bbbbbb")
    ax.barh(names, values, color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("seconds until a killed node's task restarts (log)")
    ax.set_title("5. Recovery after SIGKILL (p50)")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.2g} s", (v, i), va="center", fontsize=8)


def _linkdown(ax: Any, s: SectionResult) -> None:
    from .linkdown import TARGET_MAX_S, TARGET_P50_S

    brokers = list(s.data)
    phases = (("restart_s", "restart"), ("answer_s", "answer"), ("rejoin_s", "rejoin"))
    width = 0.8 / len(brokers)
    for b, broker in enumerate(brokers):
        d = s.data[broker]
        xs = [i + b * width for i in range(len(phases))]
        p50 = [d[key]["p50"] for key, _ in phases]
        worst = [d[key]["max"] - d[key]["p50"] for key, _ in phases]
        ax.bar(xs, p50, width, yerr=[[0] * len(phases), worst], capsize=3, label=f"{broker} (p50, bar to max)",
               color=COLOURS.get(broker, "#333"))  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(phases))], [name for _, name in phases])
    # the targets are for the restart only: draw them over its bars, not across the plot
    left, right = -width / 2, (len(brokers) - 0.5) * width
    ax.hlines(TARGET_P50_S, left, right, color="k", ls=":", lw=1, label=f"restart target p50 {TARGET_P50_S:g} s")
    ax.hlines(TARGET_MAX_S, left, right, color="grey", ls="--", lw=1, label=f"restart target max {TARGET_MAX_S:g} s")
    ax.set_ylabel("seconds (rejoin: from the link coming back)")
    ax.set_title("5b. Recovery after the link goes down")
    ax.legend(fontsize=8)


def _memory(ax: Any, s: SectionResult) -> None:
    names, values = [], []
    for broker, d in s.data.get("brokers", {}).items():
        names += [f"hub\n{broker}", f"broker\n{broker}"]
        values += [d["loaded"]["hub_mb"] or 0, d["loaded"]["broker_mb"] or 0]
    node = s.data.get("node")
    if node and node.get("overhead_mb") is not None:
        names.append("node\noverhead")
        values.append(node["overhead_mb"])
    ax.bar(names, values, color="#9467bd")
    ax.axhline(150, color="k", ls=":", lw=1, label="hub target 150 MB")
    ax.axhline(60, color="grey", ls="--", lw=1, label="node target 60 MB")
    ax.set_ylabel("RSS, MB")
    ax.set_title("6. Memory with 1,000 simulated nodes")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)


def _ensemble(ax: Any, s: SectionResult) -> None:
    labels, chosen, either = [], [], []
    for broker, d in s.data.items():
        for label, c in d["ensembles"].items():
            answered = max(1, c["asked"] - c["failed"])
            labels.append(label if len(s.data) == 1 else f"{label}\n{broker}")
            chosen.append(100 * c["right"] / answered)
            either.append(100 * c["either"] / answered)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], chosen, width=0.4, label="reranked answer right", color="#1f77b4")
    ax.bar([x + 0.2 for x in xs], either, width=0.4, label="either candidate right", color="#aec7e8")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("% of prompts")
    ax.set_ylim(0, 100)
    ax.set_title("7. Ensembles of two answers: one model or two")
    ax.legend(fontsize=8)


DRAW: dict[str, Callable[[Any, SectionResult], None]] = {
    "overhead": _overhead,
    "dispatch": _dispatch,
    "scaling": _scaling,
    "race": _race,
    "recovery": _recovery,
    "linkdown": _linkdown,
    "memory": _memory,
    "ensemble": _ensemble,
}


def draw(sections: list[SectionResult], out_dir: Path, stem: str, caption: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    drawable = [s for s in sections if s.key in DRAW and s.data]
    for s in drawable:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        try:
            DRAW[s.key](ax, s)
        except (KeyError, TypeError, ValueError) as exc:  # a part that did not run: say so on the plot
            ax.clear()
            ax.text(0.5, 0.5, f"{s.title}\nnot plotted: {exc}", ha="center", va="center")
        fig.tight_layout()
        path = out_dir / f"{stem}-{s.key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if drawable:
        columns = (len(drawable) + 1) // 2
        fig, axes = plt.subplots(2, columns, figsize=(6 * columns, 10), squeeze=False)
        for ax, s in zip(axes.flat, drawable, strict=False):
            try:
                DRAW[s.key](ax, s)
            except (KeyError, TypeError, ValueError) as exc:
                ax.clear()
                ax.text(0.5, 0.5, f"not plotted: {exc}", ha="center", va="center")
        for ax in list(axes.flat)[len(drawable) :]:
            ax.axis("off")
        fig.suptitle(caption, fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}-summary.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
