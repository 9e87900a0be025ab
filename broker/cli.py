"""``swarm-broker``: run the swarm's broker (embedded amqtt, or Mosquitto) in this process."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from . import limits as defaults
from . import logs, tls
from .errors import ConfigError
from .fdlimit import raise_open_file_limit
from .home import DEFAULT_HOST, DEFAULT_PORT, LocalSwarm, SwarmHome
from .limits import BrokerLimits
from .topics import DEFAULT_SWARM, check_id

ENGINES = ("amqtt", "mosquitto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-broker", description=__doc__)
    add_broker_arguments(parser)
    add_limit_arguments(parser)
    parser.add_argument(
        "--tls-recheck",
        type=float,
        default=tls.RECHECK_S,
        help="with --tls: seconds between checks that the certificate names every address we are reached by",
    )
    logs.add_arguments(parser)
    return parser


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-packet",
        type=int,
        default=defaults.MAX_PACKET_BYTES,
        help="largest MQTT packet accepted, bytes (refused from its header, before it is read)",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=defaults.MAX_QUEUED_MESSAGES,
        help="messages held for a subscriber that does not keep up; more are dropped and counted",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.CONNECT_TIMEOUT_S,
        help="seconds a new connection may take to send CONNECT (amqtt; Mosquitto has its own)",
    )


def limits_from(args: argparse.Namespace) -> BrokerLimits:
    return BrokerLimits(
        max_packet_bytes=args.max_packet, max_queued_messages=args.max_queued, connect_timeout_s=args.connect_timeout
    )


def add_broker_arguments(parser: argparse.ArgumentParser, *, engine_flag: str = "--engine") -> None:
    parser.add_argument(engine_flag, dest="engine", choices=ENGINES, default="amqtt", help="which broker to run")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--swarm", default=DEFAULT_SWARM, help="swarm id, the first topic level after swarm/")
    parser.add_argument("--config-dir", type=Path, help="default: $NOVA_SWARM_HOME or ~/.config/nova-swarm")
    parser.add_argument(
        "--tls", action="store_true", help="mqtts:// only, with the swarm's own CA (made in the config dir's tls/)"
    )
    parser.add_argument(
        "--bridge",
        type=Path,
        help="a Mosquitto bridge config to include (deploy/mosquitto/bridge.conf; Mosquitto only)",
    )


def home_from(args: argparse.Namespace) -> SwarmHome:
    return SwarmHome(args.config_dir) if args.config_dir else SwarmHome.default()


async def run_broker(
    home: SwarmHome,
    local: LocalSwarm,
    *,
    on_ready: object = None,
    bridge: Path | None = None,
    limits: BrokerLimits | None = None,
    tls_recheck_s: float = tls.RECHECK_S,
) -> None:
    """Generate credentials if needed, record where we listen, and serve until cancelled."""
    limits = limits or BrokerLimits()
    check_id(local.swarm, what="swarm id")
    if bridge is not None and local.engine != "mosquitto":
        raise ConfigError("--bridge needs the Mosquitto engine: amqtt cannot bridge to another broker")
    home.ensure()
    home.save_local(local)
    ready = on_ready if callable(on_ready) else None
    tls_files = tls.ensure(home.tls_dir, tls.broker_names(local.host)) if local.tls else None
    if local.engine == "mosquitto":
        from .mosquitto import MosquittoConfig
        from .mosquitto import serve as serve_mosquitto

        await serve_mosquitto(
            MosquittoConfig(
                local.host,
                local.port,
                local.swarm,
                home.password_file,
                home.mosquitto_dir,
                tls=tls_files,
                bridge=bridge,
                limits=limits,
                tls_recheck_s=tls_recheck_s,
            ),
            on_ready=ready,
        )
    else:
        from .embedded import EmbeddedBrokerConfig
        from .embedded import serve as serve_amqtt

        await serve_amqtt(
            EmbeddedBrokerConfig(
                local.host,
                local.port,
                local.swarm,
                home.password_file,
                tls=tls_files,
                limits=limits,
                tls_recheck_s=tls_recheck_s,
            ),
            on_ready=ready,
        )


async def _serve_until_signalled(
    home: SwarmHome, local: LocalSwarm, bridge: Path | None, limits: BrokerLimits, tls_recheck_s: float
) -> None:
    """SIGTERM and SIGINT stop the broker cleanly; in Mosquitto mode that also stops mosquitto,
    which would otherwise outlive us."""
    task = asyncio.create_task(run_broker(home, local, bridge=bridge, limits=limits, tls_recheck_s=tls_recheck_s))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(
        level=args.log_level, json=args.log_json, file=logs.file_for(args, home_from(args).log_file("broker"))
    )
    raise_open_file_limit()  # every connection is a file; Mosquitto inherits the limit too
    local = LocalSwarm(swarm=args.swarm, host=args.host, port=args.port, engine=args.engine, tls=args.tls)
    try:
        asyncio.run(_serve_until_signalled(home_from(args), local, args.bridge, limits_from(args), args.tls_recheck))
    except ConfigError as exc:
        print(f"swarm-broker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
