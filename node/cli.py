"""``swarm-node``: run a node on this machine (a phone under Termux, or a laptop)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import structlog

from nova_swarm.broker import logs
from nova_swarm.broker.errors import ConfigError
from nova_swarm.broker.home import SwarmHome, parse_join_token
from nova_swarm.broker.topics import check_node_id
from nova_swarm.broker.url import BrokerURL

from . import sensors
from .config import NodeConfig, default_node_id
from .engine import load_engine
from .guard import GuardConfig
from .models import CATALOGUE, ModelCache, bundled_model, progress_bar, pull

log = structlog.get_logger("nova_swarm.node")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join a swarm and answer its tasks")
    run.add_argument("--broker", help="mqtt://user:pass@host:port (default: this machine's swarm, from the config dir)")
    run.add_argument("--port", type=int, help="port of this machine's swarm, when --broker is not given")
    run.add_argument("--ca-file", type=Path, help="CA certificate to trust for mqtts:// brokers")
    run.add_argument("--model", help="a GGUF file, or the name of a pulled model (default: the bundled SmolLM2-135M)")
    run.add_argument("--cache-dir", type=Path, help="where pulled models live (default: ~/.cache/nova-swarm/models)")
    run.add_argument("--engine", default="llama", help="inference engine (default: llama)")
    run.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra engine setting, VALUE read as JSON when it parses (e.g. delay_s=0.2 for the fake engine)",
    )
    run.add_argument("--node-id", default=None, help="default: this host's name")
    run.add_argument("--swarm", default=None, help="swarm id (default: the local swarm's, else 'main')")
    run.add_argument("--tags", default="", help="comma-separated tags this node is good at")
    run.add_argument(
        "--device", choices=["phone", "laptop", "desktop", "server"], help="default: phone under Termux, else laptop"
    )
    run.add_argument("--threads", type=int, default=None, help="inference threads (default: up to 4)")
    run.add_argument("--ctx", type=int, default=2048, help="context size in tokens")
    run.add_argument("--slots", type=int, default=1)
    run.add_argument("--queue-max", type=int, default=4)
    run.add_argument("--max-tokens", type=int, default=512, help="hard cap on tokens per answer")
    run.add_argument("--max-temperature", type=float, default=2.0)
    run.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    run.add_argument("--drain", type=float, default=30.0, help="seconds running tasks may finish on shutdown")
    run.add_argument("--config-dir", type=Path)
    guard = run.add_argument_group("battery and thermal guard")
    d = GuardConfig()
    guard.add_argument(
        "--sensors", default="auto", help="auto, termux, sysfs, psutil, or sim:FILE (a JSON file, for tests and demos)"
    )
    guard.add_argument("--max-temp", type=float, default=d.max_temp_c, help="pause at this temperature, °C")
    guard.add_argument("--min-battery", type=float, default=d.min_battery_pct, help="pause at this %% unless charging")
    guard.add_argument("--charging-only", action="store_true", help="only work while the device is charging")
    guard.add_argument("--no-guard", action="store_true", help="never pause (a desktop whose sensors mean nothing)")
    guard.add_argument("--sense-interval", type=float, default=5.0, help="seconds between sensor readings")
    logs.add_arguments(run)

    models = sub.add_parser("models", help="pull GGUF models into the offline cache, and list them")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull_p = msub.add_parser("pull", help="download (resumably) and verify a model")
    pull_p.add_argument(
        "source", metavar="NAME|URL", help=f"a catalogue name ({', '.join(sorted(CATALOGUE))}) or a URL"
    )
    pull_p.add_argument("--sha256", help="the file's sha256 (required for a URL)")
    pull_p.add_argument("--name", help="name in the cache (default: from the catalogue or the URL's file name)")
    pull_p.add_argument("--cache-dir", type=Path)
    list_p = msub.add_parser("list", help="models in the cache, and the catalogue")
    list_p.add_argument("--cache-dir", type=Path)
    list_p.add_argument("--json", action="store_true")
    for p in (pull_p, list_p):
        logs.add_arguments(p)

    join = sub.add_parser("join", help="save how to reach a swarm, from `swarm-hub enroll`'s token")
    join.add_argument("token", help="the nova1.... token printed by `swarm-hub enroll NODE`")
    join.add_argument("--config-dir", type=Path)
    logs.add_arguments(join)
    return parser


def resolve_model(spec: str | None, cache: ModelCache) -> Path:
    """A path as given, else a pulled model by name, else the bundled one."""
    if spec is None:
        return bundled_model()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or path.exists() or "/" in spec:
        return path
    cached = cache.find(spec)
    if cached is None:
        hint = f"swarm-node models pull {spec}" if spec in CATALOGUE else "swarm-node models list"
        raise ConfigError(f"no model {spec!r} in {cache.root} (see `{hint}`)")
    return cached.path


def cmd_models(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    if args.models_command == "pull":
        model = pull(args.source, cache=cache, sha256=args.sha256, name=args.name, progress=progress_bar(sys.stderr))
        print(file=sys.stderr)
        print(f"{model.name}: verified sha256 {model.sha256}, {model.size_bytes / 2**20:.1f} MB at {model.path}")
        return 0
    cached = cache.list()
    if args.json:
        rows = [{"name": m.name, "path": str(m.path), "sha256": m.sha256, "size_bytes": m.size_bytes} for m in cached]
        print(json.dumps({"cache": str(cache.root), "models": rows}, indent=2))
        return 0
    print(f"cached in {cache.root}:" if cached else f"nothing cached in {cache.root} yet")
    for m in cached:
        print(f"  {m.name:<40} {m.size_bytes / 2**20:8.1f} MB  sha256 {m.sha256[:16]}...")
    have = {m.sha256 for m in cached}
    missing = [e for e in CATALOGUE.values() if e.sha256 not in have]
    if missing:
        print("in the catalogue (swarm-node models pull NAME):")
        for e in missing:
            print(f"  {e.name:<40} {e.size_bytes / 2**20:8.1f} MB  {e.about}")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    home = SwarmHome(args.config_dir) if args.config_dir else SwarmHome.default()
    joined = parse_join_token(args.token)
    home.save_joined(joined)
    url = BrokerURL.parse(joined.url)
    pinned = ", CA pinned" if joined.ca_pem else ""
    print(f"joined swarm {joined.swarm!r} at {url.redacted()} as node {joined.node_id!r}{pinned}; now: swarm-node run")
    return 0


def config_from(args: argparse.Namespace, home: SwarmHome) -> tuple[NodeConfig, BrokerURL]:
    """Where to connect: ``--broker``, else what ``swarm-node join`` saved, else this machine's
    own swarm (a node next to the hub enrols itself: it can read the hub's config dir anyway)."""
    joined = home.joined()
    if args.broker:
        url = BrokerURL.parse(args.broker, ca_file=args.ca_file)
        swarm = args.swarm or "main"
        node_id = args.node_id or url.username or default_node_id()
    elif joined is not None:
        saved, url = joined
        swarm = args.swarm or saved.swarm
        node_id = args.node_id or saved.node_id
    else:
        node_id = args.node_id or default_node_id()
        url = home.node_url(check_node_id(node_id), port=args.port)
        swarm = args.swarm or home.local().swarm
    if url.username is not None and url.username != node_id:
        raise ConfigError(
            f"node id {node_id!r} differs from its login {url.username!r}: a node's username is its id"
            f" (enroll it with `swarm-hub enroll {node_id}`)"
        )
    config = NodeConfig(
        node_id=node_id,
        swarm=swarm,
        device=args.device or ("phone" if sensors.is_termux() else "laptop"),
        tags=tuple(t.strip() for t in args.tags.split(",") if t.strip()),
        slots=args.slots,
        queue_max=args.queue_max,
        max_tokens=args.max_tokens,
        max_temperature=args.max_temperature,
        default_max_tokens=min(256, args.max_tokens),
        heartbeat_s=args.heartbeat,
        drain_s=args.drain,
        sense_s=args.sense_interval,
        guard=GuardConfig(
            max_temp_c=args.max_temp,
            min_battery_pct=args.min_battery,
            charging_only=args.charging_only,
            enabled=not args.no_guard,
        ),
    )
    return config, url


def engine_options(pairs: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--engine-option wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


async def run_node(args: argparse.Namespace) -> None:
    from .agent import Node

    home = SwarmHome(args.config_dir) if args.config_dir else SwarmHome.default()
    config, url = config_from(args, home)
    options: dict[str, object] = {}
    if args.engine == "llama":
        options = {
            "model_path": resolve_model(args.model, ModelCache(args.cache_dir)),
            "ctx": args.ctx,
            "threads": args.threads,
        }
    options.update(engine_options(args.engine_option))
    engine = await asyncio.to_thread(load_engine, args.engine, **options)
    source = sensors.load_source(args.sensors)
    log.info("sensors", source=source.name)
    node = Node(config, engine, url, ca_file=args.ca_file, sensor=source)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop)
    try:
        await node.run()
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(level=args.log_level, json=args.log_json)
    try:
        if args.command == "join":
            return cmd_join(args)
        if args.command == "models":
            return cmd_models(args)
        asyncio.run(run_node(args))
    except ConfigError as exc:
        print(f"swarm-node: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
