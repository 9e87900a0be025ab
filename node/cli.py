"""swarm-node: run a node on this machine (a phone under Termux, or a laptop)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from nova_swarm.broker import argtypes, logs
from nova_swarm.broker.argtypes import home_from
from nova_swarm.broker.contract.errors import ConfigError, DiscoveryError
from nova_swarm.broker.contract.homeassistant import DEFAULT_PREFIX
from nova_swarm.broker.contract.signing import PublicKey
from nova_swarm.broker.contract.topics import check_node_id
from nova_swarm.broker.home import Joined, SwarmHome, parse_join_token
from nova_swarm.broker.link import discovery
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.broker.private import write_private

from . import energy, sensors
from .bundles import RESTART_EXIT, BundleStore
from .config import NodeConfig, default_node_id
from .engine import Engine, load_engine
from .guard import GuardConfig
from .homeassistant import HomeAssistantConfig
from .memory import RamPolicy, budget_from
from .model_set import ModelSet, ModelSpec, model_spec
from .models import CATALOGUE, ModelCache, bundled_model, progress_bar, pull
from .supervisor import CHILD_ENV, HEALTH_ENV, Supervisor, SupervisorConfig
from .updater import UpdateSetup

log = structlog.get_logger("nova_swarm.node")


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog="swarm-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join a swarm and answer its tasks")
    run.add_argument("--broker", help="mqtt://user:pass@host:port (default: this machine's swarm, from the config dir)")
    run.add_argument("--port", type=argtypes.port, help="port of this machine's swarm, when --broker is not given")
    run.add_argument("--ca-file", type=argtypes.existing_file, help="CA certificate to trust for mqtts:// brokers")
    run.add_argument(
        "--model",
        action="append",
        help="a GGUF file, or the name of a pulled model (default: the bundled SmolLM2-135M); give it again to"
        " serve several models, loaded as requests need them within the RAM budget (the first loads at start)",
    )
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
    run.add_argument("--threads", type=argtypes.positive_int, default=None, help="inference threads (default: up to 4)")
    run.add_argument("--ctx", type=argtypes.positive_int, default=2048, help="context size in tokens")
    run.add_argument(
        "--ram-budget",
        metavar="SIZE|PROFILE",
        help="the most RAM the models may take together (700M, 2G, or a profile: phone-2gb, phone-3gb, phone-4gb,"
        " phone-6gb); a model that needs more is refused, and with several models the least recently used one"
        " is unloaded to make room (default: $NOVA_SWARM_RAM_BUDGET, else what is free)",
    )
    run.add_argument("--slots", type=argtypes.positive_int, default=1, help="tasks generated at once (%(default)s)")
    run.add_argument(
        "--queue-max",
        type=argtypes.count,
        default=4,
        help="tasks waiting beyond --slots; more are refused as busy (%(default)s)",
    )
    run.add_argument(
        "--max-tokens",
        type=argtypes.positive_int,
        default=4096,
        help="hard cap on tokens per answer (the model's context ends one sooner; default: 4096)",
    )
    run.add_argument(
        "--max-temperature",
        type=argtypes.non_negative_float,
        default=2.0,
        help="highest sampling temperature accepted (%(default)s)",
    )
    run.add_argument("--heartbeat", type=argtypes.positive_float, default=10.0, help="seconds between heartbeats")
    run.add_argument(
        "--drain",
        type=argtypes.non_negative_float,
        default=30.0,
        help="seconds running tasks may finish on shutdown",
    )
    run.add_argument("--config-dir", type=Path, help="default: $NOVA_SWARM_HOME or ~/.config/nova-swarm")
    updates = run.add_argument_group("signed updates (model pins and node bundles from the hub)")
    updates.add_argument(
        "--hub-key", help="the hub's public key (default: from `swarm-node join`, or this machine's hub)"
    )
    updates.add_argument(
        "--state-dir", type=Path, help="where bundles are kept (default: ~/.local/state/nova-swarm/NODE_ID)"
    )
    updates.add_argument(
        "--update-timeout",
        type=argtypes.positive_float,
        default=120.0,
        help="seconds a new bundle has to come online before rollback",
    )
    updates.add_argument(
        "--no-updates",
        action="store_true",
        help="run in this process and never install bundles (model pins still apply)",
    )
    guard = run.add_argument_group("battery and thermal guard")
    d = GuardConfig()
    guard.add_argument(
        "--sensors", default="auto", help="auto, termux, sysfs, psutil, or sim:FILE (a JSON file, for tests and demos)"
    )
    guard.add_argument(
        "--max-temp",
        type=argtypes.float_range(-50.0, 150.0),  # any real device; catches a typo like 420
        default=d.max_temp_c,
        help="pause at this temperature, °C",
    )
    guard.add_argument(
        "--min-battery", type=argtypes.percent, default=d.min_battery_pct, help="pause at this %% unless charging"
    )
    guard.add_argument("--charging-only", action="store_true", help="only work while the device is charging")
    guard.add_argument("--no-guard", action="store_true", help="never pause (a desktop whose sensors mean nothing)")
    guard.add_argument(
        "--sense-interval", type=argtypes.positive_float, default=5.0, help="seconds between sensor readings"
    )
    guard.add_argument(
        "--energy",
        default="auto",
        help="where each task's joules come from: auto, rapl, battery, termux, sim:WATTS (for tests and demos;"
        " also $NOVA_SWARM_ENERGY_SIM), or none",
    )
    ha = run.add_argument_group("Home Assistant")
    ha.add_argument(
        "--home-assistant", action="store_true", help="show this node as a device in Home Assistant (MQTT discovery)"
    )
    ha.add_argument("--ha-prefix", default=DEFAULT_PREFIX, help="Home Assistant's discovery prefix (%(default)s)")
    logs.add_arguments(run)

    models = sub.add_parser("models", help="pull GGUF models into the offline cache, and list them")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull_p = msub.add_parser("pull", help="download (resumably) and verify a model")
    pull_p.add_argument(
        "source", metavar="NAME|URL", help=f"a catalogue name ({', '.join(sorted(CATALOGUE))}) or a URL"
    )
    pull_p.add_argument("--sha256", help="the file's sha256 (required for a URL)")
    pull_p.add_argument("--name", help="name in the cache (default: from the catalogue or the URL's file name)")
    cache_help = "where pulled models live (default: ~/.cache/nova-swarm/models)"
    pull_p.add_argument("--cache-dir", type=Path, help=cache_help)
    list_p = msub.add_parser("list", help="models in the cache, and the catalogue")
    list_p.add_argument("--cache-dir", type=Path, help=cache_help)
    list_p.add_argument("--json", action="store_true", help="print the list as JSON")
    for p in (pull_p, list_p):
        logs.add_arguments(p)

    join = sub.add_parser("join", help="save how to reach a swarm, from `swarm-hub enroll`'s token")
    join.add_argument("token", help="the nova1.... token printed by `swarm-hub enroll NODE`")
    join.add_argument(
        "--discover",
        action="store_true",
        help="find the hub on the LAN by mDNS instead of the token's address (tokens from `enroll --discover`"
        " always do); `swarm-node run` looks again whenever the saved address stops answering",
    )
    join.add_argument(
        "--discover-timeout",
        type=argtypes.positive_float,
        default=discovery.DEFAULT_TIMEOUT_S,
        help="seconds to look for the hub (default: %(default)s)",
    )
    join.add_argument("--config-dir", type=Path, help="default: $NOVA_SWARM_HOME or ~/.config/nova-swarm")
    logs.add_arguments(join)
    argtypes.describe(parser)
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
    home = home_from(args)
    joined = parse_join_token(args.token)
    found = ""
    if args.discover or joined.discover:
        # Only a join that asks for it sends mDNS queries: a token's address needs no LAN traffic.
        joined = asyncio.run(discovery.locate(joined, timeout=args.discover_timeout))
        found = " (found by mDNS)"
    home.save_joined(joined)
    url = BrokerURL.parse(joined.url)
    pinned = (", CA pinned" if joined.ca_pem else "") + (", hub signing key pinned" if joined.hub_key else "")
    print(
        f"joined swarm {joined.swarm!r} at {url.redacted()}{found} as node {joined.node_id!r}{pinned};"
        " now: swarm-node run"
    )
    return 0


def node_id_from(args: argparse.Namespace, joined: tuple[Joined, BrokerURL] | None) -> str:
    """``--node-id``, else the login of ``--broker``, else what ``swarm-node join`` saved (when no
    ``--broker`` is given), else this machine's name."""
    if args.node_id:
        return str(args.node_id)
    if args.broker:
        return BrokerURL.parse(args.broker).username or default_node_id()
    return joined[0].node_id if joined is not None else default_node_id()


def config_from(args: argparse.Namespace, home: SwarmHome) -> tuple[NodeConfig, BrokerURL]:
    """Where to connect: ``--broker``, else what ``swarm-node join`` saved, else this machine's
    own swarm (a node next to the hub enrols itself: it can read the hub's config dir anyway)."""
    joined = home.joined()
    node_id = node_id_from(args, joined)
    if args.broker:
        url = BrokerURL.parse(args.broker, ca_file=args.ca_file)
        swarm = args.swarm or "main"
    elif joined is not None:
        saved, url = joined
        swarm = args.swarm or saved.swarm
    else:
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
        heartbeat_s=args.heartbeat,
        drain_s=args.drain,
        sense_s=args.sense_interval,
        guard=GuardConfig(
            max_temp_c=args.max_temp,
            min_battery_pct=args.min_battery,
            charging_only=args.charging_only,
            enabled=not args.no_guard,
        ),
        home_assistant=HomeAssistantConfig(enabled=args.home_assistant, prefix=args.ha_prefix),
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


def default_state_dir(node_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nova-swarm" / node_id


def hub_key(args: argparse.Namespace, home: SwarmHome) -> PublicKey | None:
    if args.hub_key:
        path = Path(args.hub_key).expanduser()
        return PublicKey.parse(path.read_text() if path.is_file() else args.hub_key)
    return home.hub_public_key()


def _mb(size: int | None) -> int | None:
    return None if size is None else round(size / 2**20)


def _mark_healthy(path: Path) -> Callable[[], None]:
    def mark() -> None:
        write_private(path, f"{os.getpid()} {time.time()}\n")

    return mark


async def _follow_hub(args: argparse.Namespace, home: SwarmHome, url: BrokerURL) -> BrokerURL:
    """A node that joined by discovery looks for its hub again when the saved address no longer
    answers (DHCP gave the hub's machine another one), and saves what it finds. Without an answer
    it keeps the saved address: the reconnect loop then waits for the hub there."""
    saved = home.joined()
    if args.broker or saved is None or not saved[0].discover or await discovery.answers(url.host, url.port):
        return url
    try:
        moved = await discovery.locate(saved[0])
    except DiscoveryError as exc:
        log.warning("hub not found on the LAN; keeping the saved address", url=url.redacted(), error=str(exc))
        return url
    home.save_joined(moved)
    found = home.joined()
    assert found is not None  # just saved
    log.info("hub found at a new address", was=url.redacted(), url=found[1].redacted())
    return found[1]


async def run_node(args: argparse.Namespace) -> bool:
    """Run until stopped; True when the node installed a bundle and wants a restart into it."""
    from .agent import Node

    home = home_from(args)
    config, url = config_from(args, home)
    structlog.contextvars.bind_contextvars(node_id=config.node_id)
    url = await _follow_hub(args, home, url)
    cache = ModelCache(args.cache_dir)
    options: dict[str, object] = {}
    model_path: Path | None = None
    paths: list[Path] = []
    if args.engine == "llama":
        paths = [resolve_model(spec, cache) for spec in args.model or [None]]
        model_path = paths[0]
        options = {"model_path": model_path, "ctx": args.ctx, "threads": args.threads}
    elif args.model and len(args.model) > 1:
        raise ConfigError(f"--model more than once needs the llama engine, not {args.engine!r}")
    extra = engine_options(args.engine_option)
    options.update(extra)
    ram = RamPolicy(
        budget_bytes=budget_from(args.ram_budget),
        ctx=args.ctx,
        embeddings=options.get("embeddings", True) is not False,
    )
    served: Engine | ModelSet

    def load_spec(spec: ModelSpec) -> Engine:
        # The spec carries the file's hash: hashing it again at every load would cost a swap seconds.
        return load_engine(args.engine, **{**options, "model_path": spec.path, "sha256": spec.info.sha256})

    if model_path is not None:
        specs = await asyncio.to_thread(lambda: [model_spec(path, ram) for path in paths])
        served = ModelSet(specs, load=load_spec, policy=ram)
        # Before loading: a model too big for the phone is a clear refusal, not the low-memory killer.
        await served.start()
        log.info("serving", models=[s.name for s in specs], loaded=served.loaded(), room_mb=_mb(ram.room()))
    else:
        served = await asyncio.to_thread(load_engine, args.engine, **options)
    source = sensors.load_source(args.sensors)
    log.info("sensors", source=source.name)
    power = energy.load_source(args.energy)
    log.info("energy", source=power.name if power is not None else "none")
    supervised = os.environ.get(CHILD_ENV) == "1"
    health = os.environ.get(HEALTH_ENV)

    updates = UpdateSetup(
        hub_key=hub_key(args, home),
        bundles=BundleStore((args.state_dir or default_state_dir(config.node_id)) / "bundles") if supervised else None,
        models=cache,
        load_model=load_spec if model_path is not None else None,
        model_path=model_path,
        model_paths=tuple(paths),
        ram=ram,
        on_online=_mark_healthy(Path(health)) if supervised and health else None,
    )
    node = Node(
        config,
        served,
        url,
        ca_file=args.ca_file,
        sensor=source,
        updates=updates,
        energy=energy.EnergyMeter(power) if power is not None else None,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop)
    try:
        await node.run()
    finally:
        node.models.close()  # a model switch has closed the engines it replaced
    return node.restart_requested


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """``swarm-node run`` without --no-updates: run the node under the bundle supervisor."""
    home = home_from(args)
    config, _ = config_from(args, home)  # fail here, once, on bad flags
    budget_from(args.ram_budget)
    store = BundleStore((args.state_dir or default_state_dir(config.node_id)) / "bundles")
    return Supervisor(store, argv, SupervisorConfig(health_timeout_s=args.update_timeout)).run()


def _log_file(args: argparse.Namespace) -> Path | None:
    """``logs/node-<id>.log`` for the node, ``node-<id>.supervisor.log`` for its supervisor."""
    if args.command != "run":
        return None
    home = home_from(args)
    node_id = node_id_from(args, home.joined())
    supervising = not args.no_updates and os.environ.get(CHILD_ENV) != "1"
    return home.log_file(f"node-{node_id}" + (".supervisor" if supervising else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        logs.configure(level=args.log_level, json=args.log_json, file=logs.file_for(args, _log_file(args)))
        if args.command == "join":
            return cmd_join(args)
        if args.command == "models":
            return cmd_models(args)
        if not args.no_updates and os.environ.get(CHILD_ENV) != "1":
            return supervise(args, argv)
        if asyncio.run(run_node(args)):
            return RESTART_EXIT
    except ConfigError as exc:
        print(f"swarm-node: {exc}", file=sys.stderr)
        return 2
    except DiscoveryError as exc:
        print(f"swarm-node: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
