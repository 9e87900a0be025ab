"""swarm-broker: run the swarm's broker (embedded amqtt, or Mosquitto) in this process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from nova_swarm.broker import argtypes, logs
from nova_swarm.broker.contract import limits as defaults
from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.limits import BrokerLimits
from nova_swarm.broker.contract.topics import DEFAULT_SWARM, check_id
from nova_swarm.broker.fdlimit import raise_open_file_limit
from nova_swarm.broker.home import DEFAULT_HOST, DEFAULT_PORT, LocalSwarm, SwarmHome
from nova_swarm.broker.private import write_private
from nova_swarm.broker.server import tls

ENGINES = ("amqtt", "mosquitto")
PORT_TAKEN_HINT = " (is another broker, such as Debian's mosquitto service, on that port? pick another with --port)"


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(prog="swarm-broker", description=__doc__)
    add_broker_arguments(parser)
    add_limit_arguments(parser)
    parser.add_argument(
        "--tls-recheck",
        type=argtypes.positive_float,
        default=tls.RECHECK_S,
        help="with --tls: seconds between checks that the certificate names every address we are reached by",
    )
    logs.add_arguments(parser)
    return parser


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-packet",
        type=argtypes.positive_int,
        default=defaults.MAX_PACKET_BYTES,
        help="largest MQTT packet accepted, bytes (refused from its header, before it is read)",
    )
    parser.add_argument(
        "--max-queued",
        type=argtypes.positive_int,
        default=defaults.MAX_QUEUED_MESSAGES,
        help="messages held for a subscriber that does not keep up; more are dropped and counted",
    )
    parser.add_argument(
        "--connect-timeout",
        type=argtypes.positive_float,
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
    parser.add_argument("--port", type=argtypes.port, default=DEFAULT_PORT, help="port to listen on (%(default)s)")
    parser.add_argument("--swarm", default=DEFAULT_SWARM, help="swarm id, the first topic level after swarm/")
    parser.add_argument("--config-dir", type=Path, help="default: $NOVA_SWARM_HOME or ~/.config/nova-swarm")
    parser.add_argument(
        "--tls", action="store_true", help="mqtts:// only, with the swarm's own CA (made in the config dir's tls/)"
    )
    parser.add_argument(
        "--bridge",
        type=argtypes.existing_file,
        help="a Mosquitto bridge config to include (deploy/mosquitto/bridge.conf; Mosquitto only)",
    )


async def run_broker(
    home: SwarmHome,
    local: LocalSwarm,
    *,
    on_ready: object = None,
    bridge: Path | None = None,
    limits: BrokerLimits | None = None,
    tls_recheck_s: float = tls.RECHECK_S,
) -> None:
    """Generate credentials if needed, record where we listen (kept only if we do), and serve until cancelled."""
    limits = limits or BrokerLimits()
    check_id(local.swarm, what="swarm id")
    if bridge is not None and local.engine != "mosquitto":
        raise ConfigError("--bridge needs the Mosquitto engine: amqtt cannot bridge to another broker")
    home.ensure()
    # Mosquitto counts as listening once its port accepts connections, which a port held by
    # anything else already does: look first.
    check_port_free(local.host, local.port)
    with local_until_ready(home, local) as listening:

        def ready() -> None:
            listening()
            if callable(on_ready):
                on_ready()

        await _serve(home, local, ready, bridge=bridge, limits=limits, tls_recheck_s=tls_recheck_s)


async def _serve(
    home: SwarmHome,
    local: LocalSwarm,
    ready: Callable[[], None],
    *,
    bridge: Path | None,
    limits: BrokerLimits,
    tls_recheck_s: float,
) -> None:
    tls_files = tls.ensure(home.tls_dir, tls.broker_names(local.host)) if local.tls else None
    if local.engine == "mosquitto":
        from nova_swarm.broker.server.mosquitto import MosquittoConfig
        from nova_swarm.broker.server.mosquitto import serve as serve_mosquitto

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
        from nova_swarm.broker.server.embedded import EmbeddedBrokerConfig
        from nova_swarm.broker.server.embedded import serve as serve_amqtt

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


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on before anything starts: a broker finds out only
    once it runs, after a child process, its logs and local.json have been set up for it."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # a name that does not resolve: the broker reports it in its own words
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine does not speak (IPv6 turned off)
        with probe:
            # As the brokers bind: a port still in TIME_WAIT from a stopped swarm is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    taken = f"cannot listen on {host}:{port}: address already in use{PORT_TAKEN_HINT}"
                    raise ConfigError(taken) from exc
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(f"cannot listen on {host}: this machine has no such address") from exc
                # Anything else (say, a port below 1024 without the right): the broker says so.


@contextlib.contextmanager
def local_until_ready(home: SwarmHome, local: LocalSwarm) -> Iterator[Callable[[], None]]:
    """Record ``local`` as this machine's swarm now (what starts beside the broker reads it), and
    put back what was there when the start fails before the caller marks it ready: a broker that
    could not listen (its port taken) must not send later commands to whatever holds that port."""
    path = home.local_file
    previous = path.read_text() if path.exists() else None
    home.save_local(local)
    started = False

    def mark() -> None:
        nonlocal started
        started = True

    try:
        yield mark
    except BaseException:
        if not started:
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                write_private(path, previous)
        raise


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
        level=args.log_level, json=args.log_json, file=logs.file_for(args, argtypes.home_from(args).log_file("broker"))
    )
    raise_open_file_limit()  # every connection is a file; Mosquitto inherits the limit too
    local = LocalSwarm(swarm=args.swarm, host=args.host, port=args.port, engine=args.engine, tls=args.tls)
    try:
        asyncio.run(
            _serve_until_signalled(argtypes.home_from(args), local, args.bridge, limits_from(args), args.tls_recheck)
        )
    except ConfigError as exc:
        print(f"swarm-broker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
