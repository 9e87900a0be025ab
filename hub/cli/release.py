"""What the swarm runs and what it gave: signed bundles, model pins, and the ledger."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from nova_swarm.broker import argtypes
from nova_swarm.broker.contract.errors import ConfigError, ProtocolError
from nova_swarm.broker.contract.signing import PublicKey
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.home import (
    Role,
)
from nova_swarm.broker.link.connection import Connection

from .. import credits, ledger, pins
from ..credits import CreditRates
from .common import (
    CONFIG_DIR_HELP,
    broker_options,
    broker_url,
    credit_arguments,
    credit_rates,
    print_table,
    swarm_home,
    swarm_id,
)

if TYPE_CHECKING:
    from .common import Subparsers


def add_bundle(sub: Subparsers) -> None:
    bundle = sub.add_parser("bundle", help="signed over-the-air updates of the nodes' code")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    publish = bsub.add_parser("publish", help="pack, sign and retain the node code; nodes restart into it")
    publish.add_argument("--version", help="the bundle's version (default: this hub's own version)")
    publish.add_argument(
        "--from",
        dest="source",
        type=argtypes.existing_dir,
        help="a source checkout to pack (default: the code this hub runs)",
    )
    bshow = bsub.add_parser("show", help="the bundle published now")
    for p in (publish, bshow):
        broker_options(p, broker_role="hub")


def add_model(sub: Subparsers) -> None:
    model = sub.add_parser("model", help="pin the GGUF models the nodes serve")
    msub = model.add_subparsers(dest="model_command", required=True)
    pin = msub.add_parser("pin", help="publish a signed, retained pin of one model: nodes switch to it")
    add = msub.add_parser("add", help="add a model to the pin: nodes it applies to serve every pinned model")
    for p in (pin, add):
        p.add_argument("name", help="the model's name (its file name in node caches, without .gguf)")
        p.add_argument("--sha256", required=True, help="the GGUF file's sha256: nodes refuse anything else")
        p.add_argument("--url", help="where nodes without the file download it (http or https)")
        p.add_argument(
            "--size",
            type=argtypes.positive_int,
            help="the file's size in bytes (lets nodes refuse what they cannot hold)",
        )
        p.add_argument("--tags", default="", help="only nodes with one of these comma-separated tags follow it")
    remove = msub.add_parser("remove", help="take a model out of the pin")
    remove.add_argument("name", help="the pinned model's name (`swarm-hub model show`)")
    unpin = msub.add_parser("unpin", help="clear the pin: nodes go back to their own models")
    mshow = msub.add_parser("show", help="the models pinned now")
    for p in (pin, add, remove, unpin, mshow):
        broker_options(p, broker_role="hub")


def add_route(sub: Subparsers) -> None:
    route = sub.add_parser("route", help="experts by tag: which model answers a request carrying a tag")
    rsub = route.add_subparsers(dest="route_command", required=True)
    rset = rsub.add_parser("set", help="requests tagged TAG (and naming no model) go to MODEL")
    rset.add_argument("tag", help="a routing tag, as requests carry it (--tags)")
    rset.add_argument("model", help="a model name as nodes announce it (`swarm-hub nodes`)")
    runset = rsub.add_parser("unset", help="TAG no longer chooses a model")
    runset.add_argument("tag", help="the tag whose route goes")
    rshow = rsub.add_parser("show", help="the route table in force")
    for p in (rset, runset, rshow):
        broker_options(p, broker_role="hub")


def add_ledger(sub: Subparsers) -> None:
    ledger = sub.add_parser("ledger", help="what each node and owner gave: tasks, tokens, wins, credits, tier")
    ledger.add_argument(
        "action",
        nargs="?",
        choices=["show", "verify", "export"],
        default="show",
        help="show the accounts, verify the receipts' chain and signatures, or export them (%(default)s)",
    )
    ledger.add_argument("--json", action="store_true", help="show: the accounts as JSON")
    ledger.add_argument("--out", type=argtypes.file_to_write, help="export: write JSON Lines here (default: stdout)")
    ledger.add_argument("--key", help="verify: the hub's public key (default: this machine's hub)")
    credit_arguments(ledger)
    ledger.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)


async def cmd_bundle(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    topics = Topics(swarm_id(args, home))
    async with Connection(broker_url(args, home, Role.HUB), ca_file=args.ca_file) as conn:
        current = await pins.current_manifest(conn, topics.bundle())
        if args.bundle_command == "show":
            if current is None:
                print("no bundle is published; nodes run the code they were installed with")
                return 1
            print(json.dumps(current, indent=2))
            return 0
        key = home.signing_key()
        version = args.version or __version__
        pins.check_newer(version, current)
        packages = pins.tree_from(args.source) if args.source else pins.source_root()
        archive = pins.pack_bundle(packages, version)
        previous = current.get("chunks") if current else None
        manifest = await pins.publish_bundle(
            conn, topics, key, archive, version, previous_chunks=len(previous) if isinstance(previous, list) else 0
        )
    print(
        f"bundle {manifest.version} published: {manifest.size_bytes / 1024:.0f} KiB in {len(manifest.chunks)} chunk(s),"
        f" sha256 {manifest.sha256[:16]}..., signed by key {key.public.key_id}."
        " Nodes restart into it; `swarm-hub nodes` shows who lags and why."
    )
    return 0


async def cmd_model(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    topics = Topics(swarm_id(args, home))
    async with Connection(broker_url(args, home, Role.HUB), ca_file=args.ca_file) as conn:
        if args.model_command == "show":
            current = await pins.current_manifest(conn, topics.model())
            if current is None:
                print("no model is pinned; each node serves its own")
                return 1
            print(json.dumps(current, indent=2))
            return 0
        if args.model_command == "unpin":
            await pins.unpin_model(conn, topics)
            print("model unpinned: nodes go back to their own model")
            return 0
        if args.model_command == "remove":
            current = await pins.current_manifest(conn, topics.model())
            if current is None:
                raise ConfigError("no model is pinned")
            left = pins.without_model(topics.swarm, current, args.name)
            if left is None:
                await pins.unpin_model(conn, topics)
            else:
                await pins.publish_model_pin(conn, topics, home.signing_key(), left)
            print(f"{args.name} is no longer pinned" + ("; nothing is pinned now" if left is None else ""))
            return 0
        tags = [t.strip() for t in args.tags.split(",") if t.strip()]
        entry = {"name": args.name, "sha256": args.sha256, "url": args.url, "size_bytes": args.size, "tags": tags}
        try:
            if args.model_command == "add":
                pin = pins.with_model(topics.swarm, await pins.current_manifest(conn, topics.model()), entry)
            else:
                pin = pins.model_pin(topics.swarm, **entry)
        except ProtocolError as exc:
            raise ConfigError(f"cannot pin that: {exc}") from exc
        await pins.publish_model_pin(conn, topics, home.signing_key(), pin)
    who = f"nodes tagged {', '.join(tags)}" if tags else "every node"
    print(f"pinned {args.name} (sha256 {args.sha256[:16]}...) for {who}; `swarm-hub nodes` shows who follows")
    if len(pin.entries()) > 1:
        print(f"pinned now: {', '.join(e.name for e in pin.entries())}")
    return 0


async def cmd_route(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    topics = Topics(swarm_id(args, home))
    async with Connection(broker_url(args, home, Role.HUB), ca_file=args.ca_file) as conn:
        current = await pins.current_manifest(conn, topics.routes())
        routes = current.get("routes") if current is not None else None
        table = {str(k): str(v) for k, v in routes.items()} if isinstance(routes, dict) else {}
        if args.route_command == "show":
            if not table:
                print("no routes: requests go to any node, or the model they name")
                return 0
            print_table(("TAG", "MODEL"), sorted(table.items()))
            return 0
        if args.route_command == "unset":
            if table.pop(args.tag, None) is None:
                raise ConfigError(f"tag {args.tag!r} has no route (`swarm-hub route show`)")
        else:
            table[args.tag] = args.model
        try:
            serial = current.get("serial") if current is not None else None
            new = pins.route_table(topics.swarm, table, after=serial if isinstance(serial, int) else 0)
        except ProtocolError as exc:
            raise ConfigError(f"cannot route that: {exc}") from exc
        await pins.publish_routes(conn, topics, home.signing_key(), new)
    if args.route_command == "set":
        print(f"requests tagged {args.tag!r} that name no model now go to {args.model}")
    else:
        print(f"tag {args.tag!r} no longer chooses a model")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    path = home.ledger_file
    if args.action == "verify":
        public = PublicKey.parse(args.key) if args.key else home.signing_key().public
        verdict = ledger.verify(path, public)
        if verdict.ok:
            plural = "" if verdict.count == 1 else "s"
            print(f"ledger ok: {verdict.count} receipt{plural}, chained and signed by hub key {public.key_id}")
            return 0
        print(f"ledger BROKEN after {verdict.count} good receipts: {verdict.problem}", file=sys.stderr)
        return 1
    if args.action == "export":
        if args.out:
            with args.out.open("w") as fh:
                count = ledger.export(path, fh)
            print(f"{count} receipts written to {args.out}", file=sys.stderr)
        else:
            ledger.export(path, sys.stdout)
        return 0
    rates = credit_rates(args)
    nodes = credits.by_node(ledger.receipts(path), rates, uptime_s=ledger.uptime(path))
    owners = credits.by_owner(nodes, {e.node_id: e.owner for e in home.enrolments().values()})
    if args.json:
        out = {
            "rates": asdict(rates),
            "nodes": {n: _account(c, rates) for n, c in sorted(nodes.items())},
            "owners": {o: {**_account(c, rates), "nodes": sorted(c.nodes)} for o, c in sorted(owners.items())},
        }
        print(json.dumps(out, indent=2))
        return 0
    header = ("NODE", "TASKS", "FAILED", "TOKENS", "WINS", "HOURS UP", "CREDITS", "TIER")
    by_credits = sorted(nodes.items(), key=lambda kv: -kv[1].credits(rates))
    # The columns after NODE are _account's values, in its order.
    rows = [(n, *map(str, _account(c, rates).values())) for n, c in by_credits]
    for owner, c in sorted(owners.items(), key=lambda kv: -kv[1].credits(rates)):
        rows.append((f"owner {owner}", *map(str, _account(c, rates).values())))
    print_table(header, rows)
    print(
        f"\ncredits: (prompt + completion tokens) / 1000 x {rates.per_1k_tokens:g} x max(1, model MB / "
        f"{rates.size_unit_mb:g}) per answered task, + {rates.per_hour_online:g} per hour online and not paused"
    )
    return 0


def _account(c: credits.Contribution, rates: CreditRates) -> dict[str, object]:
    """One account, in the table's column order."""
    return {
        "tasks": c.tasks,
        "failed": c.failed,
        "tokens": c.tokens,
        "wins": c.wins,
        "uptime_h": round(c.uptime_s / 3600, 2),
        "credits": c.credits(rates),
        "tier": c.tier(rates),
    }


COMMANDS = {"bundle": cmd_bundle, "model": cmd_model, "route": cmd_route}
SYNC_COMMANDS = {"ledger": cmd_ledger}
