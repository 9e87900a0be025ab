"""What the subcommands share: config-dir and broker options, and finding this machine's swarm."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from nova_swarm.broker import argtypes
from nova_swarm.broker.home import (
    Role,
    SwarmHome,
)
from nova_swarm.broker.link.url import BrokerURL

from ..credits import CreditRates

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argtypes.Parser]

CONFIG_DIR_HELP = "default: $NOVA_SWARM_HOME or ~/.config/nova-swarm"
#: a request's deadline: what PromptRequest.timeout_s accepts
REQUEST_TIMEOUT = argtypes.float_range(0.0, 3600.0, low_open=True)


def broker_options(p: argparse.ArgumentParser, *, broker_role: str | None = "client") -> None:
    p.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
    if broker_role:
        p.add_argument("--broker", help=f"mqtt://user:pass@host:port (default: this machine's swarm, as {broker_role})")
        p.add_argument("--port", type=argtypes.port, help="port of this machine's swarm (default: where `up` listens)")
        p.add_argument("--swarm", help="swarm id (default: this machine's swarm)")
        p.add_argument("--ca-file", type=argtypes.existing_file, help="CA certificate to trust for mqtts:// brokers")


def credit_arguments(p: argparse.ArgumentParser) -> None:
    d = CreditRates()
    rate = argtypes.non_negative_float
    p.add_argument("--credits-per-1k-tokens", type=rate, default=d.per_1k_tokens, help="credits per 1000 tokens")
    p.add_argument(
        "--credits-size-unit-mb",
        type=argtypes.positive_float,
        default=d.size_unit_mb,
        help="model MB per x1 of the size multiplier",
    )
    p.add_argument("--credits-per-hour", type=rate, default=d.per_hour_online, help="credits per hour online")


def credit_rates(args: argparse.Namespace) -> CreditRates:
    return CreditRates(
        per_1k_tokens=args.credits_per_1k_tokens,
        size_unit_mb=args.credits_size_unit_mb,
        per_hour_online=args.credits_per_hour,
    )


def swarm_home(args: argparse.Namespace) -> SwarmHome:
    return SwarmHome(args.config_dir) if getattr(args, "config_dir", None) else SwarmHome.default()


def broker_url(args: argparse.Namespace, home: SwarmHome, role: Role) -> BrokerURL:
    if getattr(args, "broker", None):
        return BrokerURL.parse(args.broker, ca_file=getattr(args, "ca_file", None))
    return home.url(role, port=getattr(args, "port", None))


def swarm_id(args: argparse.Namespace, home: SwarmHome) -> str:
    return getattr(args, "swarm", None) or home.local().swarm


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
