"""Running the swarm: up (broker, hub and a local node), serve (the hub alone), gateway, token."""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nova_swarm.broker import argtypes, logs
from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.topics import DEFAULT_SWARM
from nova_swarm.broker.home import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    GATEWAY_LOGIN,
    LocalSwarm,
    Role,
    SwarmHome,
)
from nova_swarm.broker.link import discovery
from nova_swarm.broker.link.base import MqttVersion
from nova_swarm.broker.link.connection import HEARTBEAT_S, wait_for_broker, written_off_after
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.broker.server import tls
from nova_swarm.broker.server.cli import ENGINES, check_port_free, local_until_ready

from .. import join
from ..config import HubConfig
from ..gateway import Gateway
from ..gateway_config import (
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    GatewayConfig,
    check_header_name,
    check_origin,
    parse_listen,
)
from ..hub import Hub
from ..intake import Limits
from ..model_names import ModelNames, parse_alias
from ..retrieval import RetrievalConfig
from .common import (
    CONFIG_DIR_HELP,
    REQUEST_TIMEOUT,
    broker_options,
    broker_url,
    credit_arguments,
    credit_rates,
    swarm_home,
    swarm_id,
)
from .supervisor import child_env, child_log_flags, node_started, start_broker, start_node, stop_child

if TYPE_CHECKING:
    from .common import Subparsers


def add_up(sub: Subparsers) -> None:
    up = sub.add_parser("up", help="run broker, hub and a local node on this machine")
    up.add_argument("--broker-engine", choices=ENGINES, default="amqtt", help="which broker to run (%(default)s)")
    up.add_argument("--host", default=DEFAULT_HOST, help="broker listen address (default: loopback only)")
    up.add_argument("--port", type=argtypes.port, default=DEFAULT_PORT, help="broker port (%(default)s)")
    up.add_argument("--swarm", default=DEFAULT_SWARM, help="swarm id, the first topic level (%(default)s)")
    up.add_argument(
        "--model", type=argtypes.existing_file, help="GGUF for the local node (default: bundled SmolLM2-135M)"
    )
    up.add_argument("--node-id", help="the local node's id (default: this host's name)")
    up.add_argument("--threads", type=argtypes.positive_int, help="the local node's inference threads")
    up.add_argument("--no-node", action="store_true", help="start no local node")
    up.add_argument(
        "--home-assistant", action="store_true", help="the local node shows up in Home Assistant (MQTT discovery)"
    )
    up.add_argument("--tls", action="store_true", help="mqtts:// only, with a local CA made on first use")
    up.add_argument(
        "--bridge",
        type=argtypes.existing_file,
        help="a Mosquitto bridge config to a central broker (with --broker-engine mosquitto)",
    )
    up.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
    _hub_arguments(up)
    _http_arguments(up)
    logs.add_arguments(up)


def add_serve(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help="run the hub against a broker")
    broker_options(serve, broker_role="hub")
    _hub_arguments(serve)
    _http_arguments(serve)
    serve.add_argument("--db", type=argtypes.file_to_write, help="SQLite file (default: hub.sqlite in the config dir)")
    serve.add_argument(
        "--mqtt-version",
        choices=["auto", "3.1.1", "5"],
        default="auto",
        help="auto speaks MQTT 5 where the broker does (for response-topic/correlation-data)",
    )
    logs.add_arguments(serve)


def add_gateway(sub: Subparsers) -> None:
    gateway = sub.add_parser("gateway", help="the OpenAI-compatible HTTP API and chat page, without a hub")
    broker_options(gateway)
    _http_arguments(gateway, optional=False)
    logs.add_arguments(gateway)


def add_token(sub: Subparsers) -> None:
    token = sub.add_parser("token", help="print the HTTP gateway's bearer token (the API key for OpenAI clients)")
    token.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)


def _hub_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-discovery",
        action="store_true",
        help="do not announce the swarm on the LAN by mDNS (it is announced only when the broker listens beyond"
        " loopback)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=argtypes.positive_float,
        default=written_off_after(HEARTBEAT_S),
        help="seconds of silence before a node is offline (default: %(default)s, as the broker's keepalive)",
    )
    p.add_argument(
        "--quiet-timeout",
        type=argtypes.positive_float,
        default=2.0,
        help="seconds without progress before a busy node's task goes to another node (default: %(default)s)",
    )
    p.add_argument("--request-timeout", type=REQUEST_TIMEOUT, default=120.0, help="default deadline of a request")
    p.add_argument("--retries", type=argtypes.count, default=2, help="re-dispatches per request after failures")
    p.add_argument("--reranker", default="rules", help="best_of_n scorer (entry point nova_swarm.rerankers)")
    p.add_argument(
        "--heartbeat-interval", type=argtypes.positive_float, default=10.0, help="the local node's heartbeat (up only)"
    )
    d = Limits()
    positive = argtypes.positive_int
    p.add_argument("--max-inflight", type=positive, default=d.max_inflight, help="requests worked on at once")
    p.add_argument("--max-queued", type=positive, default=d.max_queued, help="requests waiting for a free node")
    p.add_argument("--rate-limit", type=positive, default=d.requests_per_minute, help="requests per client per minute")
    p.add_argument("--max-tokens", type=positive, default=d.max_tokens, help="largest max_tokens a request may ask")
    p.add_argument("--max-payload", type=positive, default=d.max_payload_bytes, help="largest prompt message, bytes")
    p.add_argument(
        "--metrics-interval",
        type=argtypes.non_negative_float,
        default=5.0,
        help="seconds between metrics for dashboards (0: none)",
    )
    p.add_argument(
        "--retrieval",
        type=argtypes.existing_dir,
        metavar="DIR",
        help="add the best-matching snippets of the text files in DIR to every chat prompt (off by default)",
    )
    p.add_argument(
        "--retrieval-top-k",
        type=argtypes.positive_int,
        default=3,
        help="snippets added per prompt (with --retrieval)",
    )
    credit_arguments(p)


def _hub_config(
    args: argparse.Namespace, home: SwarmHome, swarm: str, db: Path | None = None, protocol: MqttVersion = "auto"
) -> HubConfig:
    return HubConfig(
        protocol=protocol,
        db_path=db or home.db_file,
        swarm=swarm,
        heartbeat_timeout_s=args.heartbeat_timeout,
        quiet_s=args.quiet_timeout,
        default_timeout_s=args.request_timeout,
        retries=args.retries,
        reranker=args.reranker,
        metrics_interval_s=args.metrics_interval,
        ledger_path=home.ledger_file,
        nodes_file=home.nodes_file,
        credit_rates=credit_rates(args),
        signing_key_file=home.signing_key_file,
        retrieval=RetrievalConfig(args.retrieval, top_k=args.retrieval_top_k) if args.retrieval else None,
        limits=Limits(
            max_inflight=args.max_inflight,
            max_queued=args.max_queued,
            requests_per_minute=args.rate_limit,
            max_tokens=args.max_tokens,
            max_payload_bytes=args.max_payload,
        ),
    )


def _http_arguments(p: argparse.ArgumentParser, *, optional: bool = True) -> None:
    http = p.add_mutually_exclusive_group()
    http.add_argument(
        "--http",
        metavar="HOST:PORT",
        type=_listen_text,
        help=f"where the OpenAI-compatible API and chat page listen (default: {DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT})",
    )
    if optional:
        http.add_argument("--no-http", action="store_true", help="no HTTP gateway")
    p.add_argument(
        "--model-alias",
        metavar="ALIAS=MODEL",
        action="append",
        type=_config_value(parse_alias),
        help="let clients name MODEL as ALIAS, e.g. gpt-4o-mini=SmolLM2-135M-Instruct.Q4_1 (repeatable)",
    )
    p.add_argument(
        "--no-model-fallback",
        action="store_true",
        help="refuse unknown model names even when the swarm serves only one model (default: use that model)",
    )
    p.add_argument(
        "--cors-origin",
        metavar="ORIGIN",
        action="append",
        type=_config_value(check_origin),
        help="let web pages from ORIGIN (http://host:port, or *) call the API from a browser"
        " (repeatable; default: none)",
    )
    p.add_argument(
        "--api-key-header",
        metavar="NAME",
        type=_header_name,
        help="also take the token, bare, in this header (like X-Api-Key), for clients that cannot set Authorization",
    )
    p.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve API requests that carry no token at all: only on a LAN you trust (default: the token is required)",
    )
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics (Prometheus) without the token, for a scraper on a network you trust "
        "(default: scrapers send the token, as `authorization` in their scrape config)",
    )


def _config_value(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a checker that raises ConfigError: its message is the one-line refusal."""

    def parse(text: str) -> object:
        try:
            return check(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _listen_text(text: str) -> str:
    """--http as given, once parse_listen accepts it (its error is the one-line refusal)."""
    try:
        parse_listen(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--http {text!r}: ")) from exc
    return text


def _header_name(text: str) -> str:
    """--api-key-header, once check_header_name accepts it (its error is the one-line refusal)."""
    try:
        return check_header_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _gateway_url(args: argparse.Namespace, home: SwarmHome) -> BrokerURL:
    """The gateway's own client login (made at setup), so what it asks is its own scope; a
    --broker URL is used as given."""
    if getattr(args, "broker", None):
        return BrokerURL.parse(args.broker, ca_file=getattr(args, "ca_file", None))
    if GATEWAY_LOGIN not in home.client_logins():
        home.ensure()  # a config dir made before the gateway had a login of its own
    return home.client_url(GATEWAY_LOGIN, port=getattr(args, "port", None))


def _gateway(
    args: argparse.Namespace,
    home: SwarmHome,
    swarm: str,
    url: BrokerURL,
    ca_file: Path | None = None,
    *,
    default_host: str = DEFAULT_HTTP_HOST,
    tls_files: tls.TLSFiles | None = None,
) -> Gateway | None:
    """The HTTP gateway the flags ask for, its port already taken (so a port in use fails early).

    Without --http it listens where the broker does (``up --host``), so the devices that reach the
    broker reach the join downloads too; with ``tls_files``, over HTTPS with the broker's certificate."""
    if getattr(args, "no_http", False):
        return None
    listen = f"[{default_host}]" if ":" in default_host else default_host
    host, port = parse_listen(args.http or f"{listen}:{DEFAULT_HTTP_PORT}")
    if not home.gateway_token_file.exists():
        home.ensure()  # a config dir made before the gateway existed
    pin = join.public_key_pin(tls_files.cert.read_bytes()) if tls_files else None
    gateway = Gateway(
        GatewayConfig(
            token=home.gateway_token(),
            host=host,
            port=port,
            swarm=swarm,
            tls_cert=tls_files.cert if tls_files else None,
            tls_key=tls_files.key if tls_files else None,
            models=ModelNames(aliases=dict(args.model_alias or ()), fallback=not args.no_model_fallback),
            cors_origins=tuple(args.cors_origin or ()),
            api_key_header=args.api_key_header,
            allow_anonymous=args.allow_anonymous,
            metrics_public=args.metrics_public,
        ),
        url,
        ca_file=ca_file,
        join=join.JoinService(home, pin=pin),
    )
    try:
        gateway.bind()
    except ConfigError as exc:
        if args.http is not None or args.command == "gateway":
            raise
        # Only the default port is taken (another hub's gateway, another server): the hub matters more.
        print(f"swarm-hub: {exc}; running without it (choose a port with --http HOST:PORT)", file=sys.stderr)
        return None
    if gateway.config.allow_anonymous:
        print(
            f"swarm-hub: WARNING: --allow-anonymous: anyone who can reach {host}:{gateway.port} may use the"
            " swarm's API without a token",
            file=sys.stderr,
        )
    # For `enroll`: where the join downloads are, and the key of the certificate served there.
    join.save_endpoint(home, join.Endpoint(host=host, port=gateway.port, pin=pin))
    return gateway


def _announcer(
    args: argparse.Namespace, home: SwarmHome, local: LocalSwarm, gateway: Gateway | None
) -> discovery.Announcer | None:
    """What announces the broker ``local`` describes on the LAN, or None: discovery is off, or
    the broker listens on loopback only (nothing else could reach it)."""
    if args.no_discovery or not discovery.beyond_loopback(local.host):
        return None
    # The gateway's port only helps those it listens for beyond loopback.
    reachable_gateway = gateway is not None and discovery.beyond_loopback(gateway.config.host)
    announcement = discovery.Announcement(
        swarm=local.swarm,
        port=local.port,
        tls=local.tls,
        engine=local.engine,
        key_id=home.signing_key().public.key_id,
        addresses=(),  # read by the announcer, and again whenever they may have changed
        gateway_port=gateway.port if reachable_gateway and gateway is not None else None,
    )
    return discovery.Announcer(announcement, listen_host=local.host)


async def _run_hub(hub: Hub, gateway: Gateway | None = None, announcer: discovery.Announcer | None = None) -> None:
    """The hub, with the HTTP gateway and the swarm's mDNS announcement beside it in one task
    group, until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    helpers = [h for h in (gateway, announcer) if h is not None]

    def stop() -> None:
        hub.stop()
        for helper in helpers:
            helper.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    if not helpers:
        await hub.run()
        return
    try:
        async with asyncio.TaskGroup() as tg:
            for helper in helpers:
                tg.create_task(helper.run())
            await hub.run()
            for helper in helpers:
                helper.stop()  # the announcer says goodbye on the LAN
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None  # what main() reports, not a group
        raise


async def cmd_serve(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    swarm = swarm_id(args, home)
    config = _hub_config(args, home, swarm, args.db, protocol=args.mqtt_version)
    hub = Hub(config, broker_url(args, home, Role.HUB), ca_file=args.ca_file)
    # The gateway logs in as a client; with --broker it uses the hub's login (which may do all a client does).
    gateway = _gateway(args, home, swarm, _gateway_url(args, home), ca_file=args.ca_file)
    if gateway is not None:
        print(f"chat page and OpenAI API: {gateway.chat_url}", file=sys.stderr)
    # Announced only for this machine's own broker: with --broker the hub may be far from it.
    announcer = None if args.broker else _announcer(args, home, home.local(), gateway)
    await _run_hub(hub, gateway, announcer)
    return 0


async def cmd_gateway(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    gateway = _gateway(args, home, swarm_id(args, home), _gateway_url(args, home), ca_file=args.ca_file)
    assert gateway is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.stop)
    print(f"chat page and OpenAI API: {gateway.chat_url}  (base_url {gateway.base_url}/v1)", file=sys.stderr)
    await gateway.run()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    print(swarm_home(args).gateway_token())
    return 0


async def cmd_up(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    home.ensure()
    local = LocalSwarm(swarm=args.swarm, host=args.host, port=args.port, engine=args.broker_engine, tls=args.tls)
    if args.bridge is not None and local.engine != "mosquitto":
        raise ConfigError("--bridge needs --broker-engine mosquitto: amqtt cannot bridge to another broker")
    check_port_free(local.host, local.port)
    # local.json is what every later command reads to find this swarm: an `up` that fails (the
    # port taken after all, the local node unable to start) puts back what was there.
    with local_until_ready(home, local) as started:
        return await _up(args, home, local, started)


async def _up(args: argparse.Namespace, home: SwarmHome, local: LocalSwarm, started: Callable[[], None]) -> int:
    tls_files: tls.TLSFiles | None = None
    if local.tls:
        # Made here, before the broker starts, so we can reach it the moment it listens.
        tls_files = tls.ensure(home.tls_dir, tls.broker_names(local.host))
    env = child_env(home)
    log_flags = child_log_flags(args)
    children: list[subprocess.Popen[bytes]] = []
    broker = start_broker(local, bridge=args.bridge, env=env, log_flags=log_flags)
    children.append(broker)
    try:
        await wait_for_broker(home.url(Role.HUB), exited=broker.poll)
        # We know the broker we started: Mosquitto speaks MQTT 5, amqtt only 3.1.1.
        protocol: MqttVersion = "5" if local.engine == "mosquitto" else "3.1.1"
        hub = Hub(_hub_config(args, home, local.swarm, protocol=protocol), home.url(Role.HUB))
        gateway = _gateway(
            args,
            home,
            local.swarm,
            _gateway_url(args, home),
            default_host=local.host,
            tls_files=tls_files,
        )
        announcer = _announcer(args, home, local, gateway)
        hub_task = asyncio.create_task(_run_hub(hub, gateway, announcer))
        await asyncio.wait([hub_task, asyncio.create_task(hub.ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not args.no_node and not hub_task.done():
            since = time.time()
            node = start_node(args, local, env=env, log_flags=log_flags)
            children.append(node)
            status = await node_started(node, hub, hub_task, args.node_id, since)
            if status is not None:
                # A swarm with no node answers nothing: stop, rather than serve a chat page that cannot.
                hub.stop()
                for helper in (gateway, announcer):
                    if helper is not None:
                        helper.stop()
                await hub_task
                raise ConfigError(
                    f"the local node could not start (it exited with status {status}; its reason is above),"
                    " so the swarm is stopped. Fix the node's settings, or run `up --no-node`."
                )
        started()
        scheme = "mqtts" if local.tls else "mqtt"
        if not hub_task.done():  # not stopped (Ctrl-C) while the node was starting
            print(
                f"swarm up: broker {local.engine} on {scheme}://{local.host}:{local.port}, swarm {local.swarm!r}. "
                f"Try: swarm-hub ask 'What is 2+2?'   (Ctrl-C stops everything)",
                file=sys.stderr,
            )
            if gateway is not None:
                print(f"chat page: {gateway.chat_url}   OpenAI API: {gateway.base_url}/v1", file=sys.stderr)
        await hub_task
    finally:
        for child in reversed(children):
            await stop_child(child)
    return 0


COMMANDS = {"up": cmd_up, "serve": cmd_serve, "gateway": cmd_gateway}
SYNC_COMMANDS = {"token": cmd_token}
