"""The ``swarm-hub bench`` subcommand's flags, and turning them into a ``BenchConfig``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .config import BROKERS, SECTIONS, BenchConfig

DEFAULT_OUT = Path("bench/results")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer samples, N and trials (under 90 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where JSON, Markdown and PNGs go")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({','.join(SECTIONS)})")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated: amqtt, mosquitto")


def config_from(args: argparse.Namespace) -> BenchConfig:
    sections = tuple(s for s in SECTIONS if s in args.only.split(","))
    brokers = tuple(b for b in BROKERS if b in args.brokers.split(","))
    if not sections or not brokers:
        raise SystemExit(f"swarm-hub bench: choose sections from {SECTIONS} and brokers from {BROKERS}")
    base = BenchConfig.quick_profile(args.out) if args.quick else BenchConfig.full(args.out)
    from dataclasses import replace

    return replace(base, sections=sections, brokers=brokers)


def run(args: argparse.Namespace) -> int:
    from .runner import main

    command = "swarm-hub " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return main(config_from(args), command)
