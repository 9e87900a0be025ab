"""``swarm-bench``: its flags, and turning them into a ``BenchConfig``.

The benchmark has its own entry point because it drives the hub and nodes together: as a
``swarm-hub`` subcommand it made the hub's CLI import the node's code.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from .config import BROKERS, SECTIONS, BenchConfig

DEFAULT_OUT = Path("bench/results")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swarm-bench",
        description="benchmarks: overhead, dispatch vs Celery, scaling, race, recovery, link down, memory",
    )
    p.add_argument("--quick", action="store_true", help="fewer samples, N and trials (under 90 s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where JSON, Markdown and PNGs go")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({','.join(SECTIONS)})")
    p.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated: amqtt, mosquitto")
    return p


def config_from(args: argparse.Namespace, p: argparse.ArgumentParser) -> BenchConfig:
    sections = tuple(s for s in SECTIONS if s in args.only.split(","))
    brokers = tuple(b for b in BROKERS if b in args.brokers.split(","))
    unknown = sorted(set(args.only.split(",")) - set(SECTIONS)) + sorted(set(args.brokers.split(",")) - set(BROKERS))
    if unknown or not sections or not brokers:
        p.error(f"choose sections from {','.join(SECTIONS)} and brokers from {','.join(BROKERS)}")
    base = BenchConfig.quick_profile(args.out) if args.quick else BenchConfig.full(args.out)
    return replace(base, sections=sections, brokers=brokers)


def main(argv: list[str] | None = None) -> int:
    from .runner import main as run

    p = parser()
    args = p.parse_args(argv)
    config = config_from(args, p)
    words = sys.argv[1:] if argv is None else argv
    return run(config, " ".join(["swarm-bench", *(shlex.quote(a) for a in words)]))


if __name__ == "__main__":
    sys.exit(main())
