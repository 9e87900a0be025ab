"""swarm-hub: run the hub, or a whole swarm, and talk to it.

swarm-hub up                     broker + hub + a local node on the bundled model
swarm-hub serve --broker URL     the hub alone, against any broker
swarm-hub ask "What is 2+2?"     ask the swarm; prints the answer, its node and timings (--stream: as it comes)
swarm-hub embed "text" ...       embedding vectors from the nodes that can make them
swarm-hub nodes | status         what the hub sees
swarm-hub top                    a live view of the hub, its nodes and recent errors (Ctrl-C quits)
swarm-hub creds [--role ROLE]    -h -p -u -P flags for mosquitto_pub / mosquitto_sub
swarm-hub enroll NODE            a node's own login, as a one-line join command
swarm-hub enroll --client NAME   a client login of its own: private replies, ids no one else can take
swarm-hub bundle publish         sign this hub's node code and roll it out to every node
swarm-hub model pin NAME ...     make every node serve one GGUF model (signed, retained)
swarm-hub ledger [verify|export] what each node gave, from signed, hash-chained receipts
swarm-hub gateway --http H:P     the OpenAI-compatible HTTP API and chat page alone (up and serve run it too)
swarm-hub token                  the HTTP gateway's bearer token
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

# Only its flags load with the CLI; a run imports the hub and node parts it measures.
from nova_swarm.broker import argtypes, discovery, logs, net, tls
from nova_swarm.broker.cli import ENGINES, check_port_free, local_until_ready
from nova_swarm.broker.connection import HEARTBEAT_S, Connection, Protocol, wait_for_broker, written_off_after
from nova_swarm.broker.errors import ConfigError, ConnectionLost, ProtocolError, RequestFailed, SwarmError
from nova_swarm.broker.fdlimit import raise_open_file_limit
from nova_swarm.broker.home import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    GATEWAY_LOGIN,
    Joined,
    LocalSwarm,
    Role,
    SwarmHome,
    join_token,
)
from nova_swarm.broker.homeassistant import HomeAssistantTopics
from nova_swarm.broker.messages import (
    MAX_FANOUT,
    Answer,
    GenParams,
    HubStatus,
    JsonSchemaFormat,
    NodeTable,
    PromptRequest,
    ResponseFormat,
    decode,
)
from nova_swarm.broker.signing import PublicKey
from nova_swarm.broker.topics import DEFAULT_SWARM, Topics
from nova_swarm.broker.url import BrokerURL
from nova_swarm.broker.version import __version__

from . import credits, join, ledger, pins
from .client import SwarmClient
from .config import HubConfig
from .credits import CreditRates
from .gateway import (
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    Gateway,
    GatewayConfig,
    check_header_name,
    check_origin,
    parse_listen,
)
from .hub import Hub
from .intake import Limits
from .model_names import ModelNames, parse_alias
from .retrieval import RetrievalConfig
from .top import run_top

CONFIG_DIR_HELP = "default: $NOVA_SWARM_HOME or ~/.config/nova-swarm"
#: a request's deadline: what PromptRequest.timeout_s accepts
REQUEST_TIMEOUT = argtypes.float_range(0.0, 3600.0, low_open=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(
        prog="swarm-hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, broker_role: str | None = "client") -> None:
        p.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
        if broker_role:
            p.add_argument(
                "--broker", help=f"mqtt://user:pass@host:port (default: this machine's swarm, as {broker_role})"
            )
            p.add_argument(
                "--port", type=argtypes.port, help="port of this machine's swarm (default: where `up` listens)"
            )
            p.add_argument("--swarm", help="swarm id (default: this machine's swarm)")
            p.add_argument(
                "--ca-file", type=argtypes.existing_file, help="CA certificate to trust for mqtts:// brokers"
            )

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

    serve = sub.add_parser("serve", help="run the hub against a broker")
    common(serve, broker_role="hub")
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

    ask = sub.add_parser("ask", help="ask the swarm")
    ask.add_argument("prompt", type=argtypes.text, help="what to ask")
    ask.add_argument(
        "--strategy",
        choices=["race", "best_of_n"],
        default="race",
        help="race: the first answer wins; best_of_n: the best-scored of --fanout answers (default: %(default)s)",
    )
    ask.add_argument(
        "--fanout",
        type=argtypes.int_range(1, MAX_FANOUT),
        default=None,
        help=f"nodes to ask (1-{MAX_FANOUT}; default 1, or 2 for best_of_n)",
    )
    ask.add_argument("--tags", default="", help="comma-separated tags for routing")
    ask.add_argument("--model", help="only nodes serving this model")
    ask.add_argument("--max-tokens", type=argtypes.positive_int, help="longest answer, in tokens")
    ask.add_argument("--temperature", type=argtypes.non_negative_float, help="sampling temperature (0: greedy)")
    ask.add_argument("--seed", type=int, help="sampling seed, for a repeatable answer")
    ask.add_argument("--timeout", type=REQUEST_TIMEOUT, default=120.0, help="seconds to wait for the answer")
    ask.add_argument("--json", action="store_true", help="print the hub's whole reply as JSON")
    ask.add_argument("--stream", action="store_true", help="print tokens as the node generates them")
    ask.add_argument(
        "--schema", type=argtypes.existing_file, help="a JSON Schema file: the answer is JSON that matches it"
    )
    ask.add_argument(
        "--no-retrieval", action="store_true", help="no document context, even when the hub adds it by default"
    )
    common(ask)

    embed = sub.add_parser("embed", help="embedding vectors for texts, from nodes that can make them")
    embed.add_argument("texts", nargs="+", type=argtypes.text, help="one or more texts")
    embed.add_argument("--model", help="only nodes serving this model")
    embed.add_argument("--timeout", type=REQUEST_TIMEOUT, default=120.0, help="seconds to wait for the vectors")
    common(embed)

    for name, helptext in (("nodes", "list the nodes the hub knows"), ("status", "the hub's status")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--json", action="store_true", help="print the hub's report as JSON")
        p.add_argument(
            "--wait", type=argtypes.positive_float, default=5.0, help="seconds to wait for the hub's retained report"
        )
        common(p)

    top = sub.add_parser("top", help="a live view of the hub, its nodes and recent errors (Ctrl-C quits)")
    top.add_argument("--frames", type=argtypes.positive_int, help="stop after this many refreshes (two a second)")
    top.add_argument("--duration", type=argtypes.positive_float, help="stop after this many seconds")
    common(top)

    creds = sub.add_parser("creds", help="print -h -p -u -P for mosquitto_pub/mosquitto_sub")
    creds.add_argument(
        "--role", choices=[Role.CLIENT.value, Role.HUB.value], default="client", help="whose login (%(default)s)"
    )
    creds.add_argument("--url", action="store_true", help="print a broker URL instead")
    creds.add_argument("--rotate", action="store_true", help="give the role a new password first")
    creds.add_argument("--port", type=argtypes.port, help="broker port (default: where `up` listens)")
    creds.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)

    enroll = sub.add_parser(
        "enroll", help="give a node its own login (prints the command to run on it), or a client with --client NAME"
    )
    enroll.add_argument("node_id", metavar="NODE", nargs="?", help="the node's id (its MQTT login)")
    enroll.add_argument(
        "--client", metavar="NAME", help="make a client login of its own instead: its replies only it may read"
    )
    enroll.add_argument("--owner", help="who lends this node (for the ledger)")
    enroll.add_argument("--rotate", action="store_true", help="a new password for a node already enrolled")
    trust = enroll.add_mutually_exclusive_group()
    trust.add_argument(
        "--trusted", dest="trusted", action="store_true", default=None, help="may serve private requests"
    )
    trust.add_argument("--untrusted", dest="trusted", action="store_false", help="may not (the default)")
    enroll.add_argument("--host", help="address nodes reach the broker at (default: this machine's)")
    enroll.add_argument(
        "--discover",
        action="store_true",
        help="the node finds the hub by mDNS when it joins, and again whenever the address changes",
    )
    enroll.add_argument("--port", type=argtypes.port, help="broker port nodes connect to (default: where `up` listens)")
    enroll.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)

    revoke = sub.add_parser("revoke", help="cut one node off: its login is removed and its connection dropped")
    revoke.add_argument("node_id", metavar="NODE", nargs="?", help="the node to cut off")
    revoke.add_argument("--client", metavar="NAME", help="remove a client login instead")
    revoke.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
    revoke.add_argument(
        "--port", type=argtypes.port, help="port of this machine's swarm, to remove the node from Home Assistant"
    )

    enrolled = sub.add_parser("enrolled", help="list enrolled nodes")
    enrolled.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)

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
    model = sub.add_parser("model", help="pin the GGUF model every node serves")
    msub = model.add_subparsers(dest="model_command", required=True)
    pin = msub.add_parser("pin", help="publish a signed, retained model pin")
    pin.add_argument("name", help="the model's name (its file name in node caches, without .gguf)")
    pin.add_argument("--sha256", required=True, help="the GGUF file's sha256: nodes refuse anything else")
    pin.add_argument("--url", help="where nodes without the file download it (http or https)")
    pin.add_argument(
        "--size",
        type=argtypes.positive_int,
        help="the file's size in bytes (lets nodes refuse what they cannot hold)",
    )
    pin.add_argument("--tags", default="", help="only nodes with one of these comma-separated tags follow the pin")
    unpin = msub.add_parser("unpin", help="clear the pin: nodes go back to their own model")
    mshow = msub.add_parser("show", help="the model pinned now")
    for p in (publish, bshow, pin, unpin, mshow):
        common(p, broker_role="hub")
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
    _credit_arguments(ledger)
    ledger.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
    gateway = sub.add_parser("gateway", help="the OpenAI-compatible HTTP API and chat page, without a hub")
    common(gateway)
    _http_arguments(gateway, optional=False)
    logs.add_arguments(gateway)
    token = sub.add_parser("token", help="print the HTTP gateway's bearer token (the API key for OpenAI clients)")
    token.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
    key = sub.add_parser("key", help="print the hub's public signing key (for `swarm-node run --hub-key`)")
    key.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
    argtypes.describe(parser)
    return parser


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
    _credit_arguments(p)


def _credit_arguments(p: argparse.ArgumentParser) -> None:
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


def _credit_rates(args: argparse.Namespace) -> CreditRates:
    return CreditRates(
        per_1k_tokens=args.credits_per_1k_tokens,
        size_unit_mb=args.credits_size_unit_mb,
        per_hour_online=args.credits_per_hour,
    )


def _home(args: argparse.Namespace) -> SwarmHome:
    return SwarmHome(args.config_dir) if getattr(args, "config_dir", None) else SwarmHome.default()


def _url(args: argparse.Namespace, home: SwarmHome, role: Role) -> BrokerURL:
    if getattr(args, "broker", None):
        return BrokerURL.parse(args.broker, ca_file=getattr(args, "ca_file", None))
    return home.url(role, port=getattr(args, "port", None))


def _swarm(args: argparse.Namespace, home: SwarmHome) -> str:
    return getattr(args, "swarm", None) or home.local().swarm


def _hub_config(
    args: argparse.Namespace, home: SwarmHome, swarm: str, db: Path | None = None, protocol: Protocol = "auto"
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
        credit_rates=_credit_rates(args),
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


# ---------------------------------------------------------------- up / serve


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
    home = _home(args)
    swarm = _swarm(args, home)
    config = _hub_config(args, home, swarm, args.db, protocol=args.mqtt_version)
    hub = Hub(config, _url(args, home, Role.HUB), ca_file=args.ca_file)
    # The gateway logs in as a client; with --broker it uses the hub's login (which may do all a client does).
    gateway = _gateway(args, home, swarm, _gateway_url(args, home), ca_file=args.ca_file)
    if gateway is not None:
        print(f"chat page and OpenAI API: {gateway.chat_url}", file=sys.stderr)
    # Announced only for this machine's own broker: with --broker the hub may be far from it.
    announcer = None if args.broker else _announcer(args, home, home.local(), gateway)
    await _run_hub(hub, gateway, announcer)
    return 0


async def cmd_gateway(args: argparse.Namespace) -> int:
    home = _home(args)
    gateway = _gateway(args, home, _swarm(args, home), _gateway_url(args, home), ca_file=args.ca_file)
    assert gateway is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.stop)
    print(f"chat page and OpenAI API: {gateway.chat_url}  (base_url {gateway.base_url}/v1)", file=sys.stderr)
    await gateway.run()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    print(_home(args).gateway_token())
    return 0


async def cmd_up(args: argparse.Namespace) -> int:
    home = _home(args)
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
    env = {**os.environ, "NOVA_SWARM_HOME": str(home.path)}
    log_flags = ["--log-level", args.log_level] + (["--log-json"] if args.log_json else [])
    log_flags += ["--no-log-file"] if args.no_log_file else []  # each child keeps its own file otherwise
    children: list[subprocess.Popen[bytes]] = []
    # Children get their own session, so a Ctrl-C reaches only us and we stop them in order:
    # the hub drains first (it needs the node), then the node, then the broker.
    broker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nova_swarm.broker",
            "--engine",
            local.engine,
            "--host",
            local.host,
            "--port",
            str(local.port),
            "--swarm",
            local.swarm,
            *(["--tls"] if local.tls else []),
            *(["--bridge", str(args.bridge.resolve())] if args.bridge else []),
            *log_flags,
        ],
        env=env,
        start_new_session=True,
    )
    children.append(broker)
    try:
        await wait_for_broker(home.url(Role.HUB), exited=broker.poll)
        # We know the broker we started: Mosquitto speaks MQTT 5, amqtt only 3.1.1.
        protocol: Protocol = "5" if local.engine == "mosquitto" else "3.1.1"
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
            node_cmd = [sys.executable, "-m", "nova_swarm.node", "run", "--port", str(local.port)]
            node_cmd += ["--heartbeat", str(args.heartbeat_interval), *log_flags]
            node_cmd += ["--home-assistant"] if args.home_assistant else []
            for flag, value in (("--model", args.model), ("--node-id", args.node_id), ("--threads", args.threads)):
                if value is not None:
                    node_cmd += [flag, str(value)]
            since = time.time()
            node = subprocess.Popen(node_cmd, env=env, start_new_session=True)
            children.append(node)
            status = await _node_started(node, hub, hub_task, args.node_id, since)
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
            await _stop_child(child)
    return 0


async def _node_started(
    node: subprocess.Popen[bytes], hub: Hub, hub_task: asyncio.Task[None], node_id: str | None, since: float
) -> int | None:
    """Wait until the local node is heard at the hub (or the hub stops); the node's exit status
    when it exits first. Without --node-id the node picks its own id, so any node heard since it
    was started counts: on a fresh `up` that is it."""
    while not hub_task.done():
        status = node.poll()
        if status is not None:
            return status
        for record in hub.registry.nodes.values():
            if (node_id is None or record.node_id == node_id) and (record.last_seen or 0.0) >= since:
                return None
        await asyncio.sleep(0.1)
    return None


async def _stop_child(child: subprocess.Popen[bytes], grace: float = 40.0) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + grace
        while child.poll() is None and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
        if child.poll() is None:
            child.kill()
            child.wait()


# ---------------------------------------------------------------- ask / nodes / status


async def cmd_ask(args: argparse.Namespace) -> int:
    home = _home(args)
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    fanout = args.fanout or (2 if args.strategy == "best_of_n" else 1)
    try:
        request = PromptRequest(
            prompt=args.prompt,
            strategy=args.strategy,
            fanout=fanout,
            tags=tags,
            model=args.model,
            timeout_s=args.timeout,
            params=GenParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed),
            stream=args.stream,
            response_format=_schema_format(args.schema) if args.schema else None,
            retrieval=False if args.no_retrieval else None,
        )
    except ValidationError as exc:
        raise ConfigError(_refused(exc)) from exc
    async with SwarmClient(_url(args, home, Role.CLIENT), swarm=_swarm(args, home), ca_file=args.ca_file) as client:
        try:
            if args.stream:
                answer = await _ask_streaming(client, request, args.timeout + 5, echo=not args.json)
            else:
                answer = await client.ask(request, timeout=args.timeout + 5)
        except RequestFailed as exc:
            if args.json:
                print(json.dumps({"ok": False, "error": {"code": exc.code.value, "message": exc.message}}))
            else:
                print(f"error ({exc.code.value}): {exc.message}", file=sys.stderr)
            return 1
    if args.json:
        print(answer.model_dump_json(indent=2))
        return 0
    if not args.stream:
        print(answer.text)
    t = answer.timings
    usage = answer.usage
    details = [f"node {answer.node_id}", answer.model]
    if usage:
        details.append(f"{usage.completion_tokens} tokens")
    if t and t.tokens_per_s:
        details.append(f"{t.tokens_per_s:.1f} tok/s")
    if t and t.ttft_ms is not None:
        details.append(f"first token {t.ttft_ms:.0f} ms")
    details.append(f"{answer.latency_ms:.0f} ms total")
    details.append(f"{answer.attempts} attempt{'s' if answer.attempts != 1 else ''}")
    print("-- " + " · ".join(details), file=sys.stderr)
    for i, cand in enumerate(answer.candidates, 1):
        print(f"   #{i} score {cand.score:+.3f} from {cand.node_id}: {cand.text[:100]!r}", file=sys.stderr)
    return 0


def _refused(exc: ValidationError) -> str:
    """What the wire contract refused in a request built from flags the parser let through (a tag
    with a space, say), as one line naming the field."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "request"
    return f"cannot send that request: {where}: {first['msg']}"


async def _ask_streaming(client: SwarmClient, request: PromptRequest, timeout: float, *, echo: bool) -> Answer:
    """Print the answer as it comes; a restart (the streaming node was lost) starts a new line."""
    shown = ""
    async with client.streaming(request, timeout=timeout) as stream:
        async for chunk in stream:
            if chunk.restart:
                shown = ""
                if echo:
                    print("\n[the node streaming this answer was lost; another starts over]", file=sys.stderr)
            shown += chunk.text
            if echo:
                print(chunk.text, end="", flush=True)
        answer = await stream.answer()
    if echo:
        # A retry of a settled request id gets its reply again but no stream: show what is missing.
        print(answer.text.removeprefix(shown) if answer.text.startswith(shown) else f"\n{answer.text}")
    return answer


def _schema_format(path: Path) -> ResponseFormat:
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--schema {path}: not a readable JSON file ({exc})") from exc
    if not isinstance(schema, dict):
        raise ConfigError(f"--schema {path}: a JSON Schema is a JSON object")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="answer", schema=schema))


async def cmd_embed(args: argparse.Namespace) -> int:
    home = _home(args)
    try:
        request = PromptRequest(kind="embed", input=list(args.texts), model=args.model, timeout_s=args.timeout)
    except ValidationError as exc:
        raise ConfigError(_refused(exc)) from exc
    async with SwarmClient(_url(args, home, Role.CLIENT), swarm=_swarm(args, home), ca_file=args.ca_file) as client:
        try:
            answer = await client.ask(request, timeout=args.timeout + 5)
        except RequestFailed as exc:
            print(f"error ({exc.code.value}): {exc.message}", file=sys.stderr)
            return 1
    # One JSON line per text: easy to pipe into anything.
    for text, vector in zip(args.texts, answer.embeddings or [], strict=True):
        print(json.dumps({"text": text, "embedding": vector}))
    print(f"-- node {answer.node_id} · {answer.model} · {len(answer.embeddings or [[]])} vectors", file=sys.stderr)
    return 0


async def _retained(args: argparse.Namespace, topic_of: str) -> bytes | None:
    home = _home(args)
    topics = Topics(_swarm(args, home))
    topic = topics.hub_nodes() if topic_of == "nodes" else topics.hub_status()
    async with Connection(_url(args, home, Role.CLIENT), ca_file=args.ca_file) as conn:
        await conn.subscribe(topic)
        try:
            async with asyncio.timeout(args.wait):
                async for message in conn.messages():
                    if message.topic == topic and message.payload:
                        return message.payload
        except TimeoutError:
            return None
    return None


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _joules(value: float | None) -> str:
    """Three significant digits: a laptop spends joules on a token, a phone hundredths."""
    return "-" if value is None else f"{value:.3g}"


async def cmd_nodes(args: argparse.Namespace) -> int:
    payload = await _retained(args, "nodes")
    if payload is None:
        print("no report from a hub: is `swarm-hub up` or `serve` running?", file=sys.stderr)
        return 1
    table = decode(NodeTable, payload)
    if args.json:
        print(table.model_dump_json(indent=2))
        return 0
    header = ("NODE", "STATE", "MODEL", "VERSION", "TOK/S", "J/TOK", "BATTERY", "TEMP", "BUSY", "LAST SEEN")
    rows = [
        (
            n.node_id,
            n.state.value,
            n.model or "-",
            n.agent_version or "-",
            _fmt(n.tokens_per_s, ".1f"),
            _joules(n.joules_per_token),
            "-" if n.battery_pct is None else f"{n.battery_pct:.0f}%" + ("+" if n.charging else ""),
            _fmt(n.temp_c, ".1f", "C"),
            str(n.busy),
            _ago(n.last_seen),
        )
        for n in table.nodes
    ]
    _print_table(header, rows)
    lagging = [n for n in table.nodes if n.lag]
    if lagging:
        print("\nnot on the pinned bundle or model:")
        for n in lagging:
            print(f"  {n.node_id}: {n.lag}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    payload = await _retained(args, "status")
    if payload is None:
        print("no status from a hub: is `swarm-hub up` or `serve` running?", file=sys.stderr)
        return 1
    status = decode(HubStatus, payload)
    if args.json:
        print(status.model_dump_json(indent=2))
        return 0 if status.state == "online" else 1
    print(f"hub {status.hub_id}: {status.state} (version {status.version or '?'}), up since {_ago(status.started_at)}")
    print(f"nodes: {status.nodes_online} online, {status.nodes_paused} paused, {status.nodes_offline} offline")
    print(
        f"requests: {status.inflight} in flight, {status.answered} answered, {status.failed} failed,"
        f" {status.cancelled} cancelled by their client"
    )
    return 0 if status.state == "online" else 1


async def cmd_top(args: argparse.Namespace) -> int:
    home = _home(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C is how you leave `top`: stop drawing and exit 0, leaving the last frame on screen.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reports = await run_top(
        _url(args, home, Role.CLIENT),
        _swarm(args, home),
        ca_file=args.ca_file,
        frames=args.frames,
        duration=args.duration,
        stop=stop,
    )
    if reports.empty and not sys.stdout.isatty():
        # A snapshot for a script: say plainly that there was nothing to show.
        print("no report from a hub: is `swarm-hub up` or `serve` running?", file=sys.stderr)
        return 1
    return 0


def cmd_creds(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.rotate:
        home.rotate(Role(args.role))
        print(f"new {args.role} password saved; brokers drop connections using the old one", file=sys.stderr)
    url = home.url(Role(args.role), port=args.port)
    if args.url:
        print(url)
    else:
        tls = f" --cafile {url.ca_file}" if url.ca_file else ""
        print(f"-h {url.host} -p {url.port} -u {url.username} -P {url.password}{tls}")
    return 0


def _lan_host() -> str:
    """This machine's address as other devices would use it: its best LAN interface address
    (never loopback), else its mDNS name, which discovery announces and the certificate names."""
    addresses = net.lan_addresses()
    return addresses[0] if addresses else net.mdns_name()


def _one_name(args: argparse.Namespace, command: str) -> None:
    if (args.node_id is None) == (args.client is None):
        raise ConfigError(f"`swarm-hub {command}` takes a node id or --client NAME (one of them)")


def _enroll_client(args: argparse.Namespace, home: SwarmHome) -> int:
    login = home.enroll_client(args.client, rotate=args.rotate)
    local = home.local()
    url = home.client_url(login.username, port=args.port, host=args.host)
    t = Topics(local.swarm)
    print(f"client login {login.username!r} ready. Connect with:\n", file=sys.stderr)
    print(str(url))
    print(
        f"\nIts requests go on {t.prompt(login.username)} and its replies on {t.reply(login.username)}"
        " (and below), which only this login may read. The URL holds the password: pass it on as one."
        f"\n`swarm-hub revoke --client {login.username}` removes it.",
        file=sys.stderr,
    )
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    _one_name(args, "enroll")
    home = _home(args)
    if args.client is not None:
        return _enroll_client(args, home)
    local = home.local()
    enrolment = home.enroll(args.node_id, owner=args.owner, rotate=args.rotate, trusted=args.trusted)
    listen_only_here = local.host in ("127.0.0.1", "localhost", "::1")
    host = args.host or (local.host if local.host not in ("0.0.0.0", "", "::") and not listen_only_here else None)
    host = host or _lan_host()
    url = BrokerURL(host, args.port or local.port, enrolment.node_id, enrolment.password, tls=local.tls)
    ca_pem = home.ca_file.read_text() if local.tls and home.ca_file.exists() else None
    hub_key = home.signing_key().public.text
    token = join_token(
        Joined(
            url=str(url),
            swarm=local.swarm,
            node_id=enrolment.node_id,
            ca_pem=ca_pem,
            hub_key=hub_key,
            discover=args.discover,
        )
    )
    endpoint = join.load_endpoint(home)
    notes = ["\nThe line holds the node's password: pass it on as you would a password."]
    if endpoint is None:
        # No gateway has run from this config dir, so nothing serves the installer yet.
        print(f"node {enrolment.node_id!r} enrolled. On a device with nova-swarm installed, run:\n", file=sys.stderr)
        print(f"swarm-node join {token} && swarm-node run")
        notes.append(
            "For the one-line install instead, start the hub with its HTTP gateway (`swarm-hub up`, without"
            " --no-http) and run this enroll again."
        )
    else:
        if args.host:
            gateway_host = args.host
        elif endpoint.host in ("0.0.0.0", "", "::"):
            gateway_host = host
        else:
            gateway_host = endpoint.host
        shown = f"[{gateway_host}]" if ":" in gateway_host else gateway_host
        base = f"{endpoint.scheme}://{shown}:{endpoint.port}"
        print(f"node {enrolment.node_id!r} enrolled. On that device (Termux or Linux) run:\n", file=sys.stderr)
        print(join.join_line(base, join.download_key(enrolment), token, pin=endpoint.pin))
        if endpoint.pin is None:
            notes.append(
                "Without --tls the token crosses the LAN in clear: anyone on the Wi-Fi can read it."
                " `swarm-hub up --host 0.0.0.0 --tls` serves the line over HTTPS, checked by a pinned key."
            )
        if endpoint.host in ("127.0.0.1", "localhost", "::1") and not args.host:
            notes.append(
                f"The HTTP gateway listens on {endpoint.host} only: restart with `swarm-hub up --host 0.0.0.0`"
                " (or --http 0.0.0.0:8080) so other devices can fetch the installer."
            )
        notes.append("Running the line again on the device upgrades it in place to this hub's version.")
    if listen_only_here and not args.host:
        notes.append(
            f"The broker listens on {local.host} only: restart with `swarm-hub up --host 0.0.0.0` (and --tls)"
            " so other devices can reach it."
        )
    notes.append(f"`swarm-hub revoke {enrolment.node_id}` cuts this node off without touching the rest.")
    print("\n".join(notes), file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    _one_name(args, "revoke")
    home = _home(args)
    if args.client is not None:
        if not home.revoke_client(args.client):
            print(f"swarm-hub: no client login {args.client!r}", file=sys.stderr)
            return 1
        print(f"client login {args.client!r} revoked: the broker drops its connections within a second")
        return 0
    if not home.revoke(args.node_id):
        print(f"swarm-hub: no node {args.node_id!r} is enrolled (see `swarm-hub enrolled`)", file=sys.stderr)
        return 1
    print(f"node {args.node_id!r} revoked: the broker drops its connection within a second and refuses it")
    _forget_in_home_assistant(args, home)
    return 0


def _forget_in_home_assistant(args: argparse.Namespace, home: SwarmHome) -> None:
    """Best effort: an empty retained discovery config removes the node's device from Home Assistant
    (harmless when the node never had one). Revocation itself is local and has already happened."""
    topic = HomeAssistantTopics().device_config(args.node_id)

    async def clear() -> None:
        async with Connection(_url(args, home, Role.HUB), timeout=5.0) as conn:
            await conn.publish(topic, b"", qos=1, retain=True)

    try:
        asyncio.run(clear())
    except SwarmError as exc:
        print(
            f"note: could not reach the broker ({exc}), so Home Assistant still shows {args.node_id!r}."
            f" Once the broker is up, remove it with:\n  mosquitto_pub $(swarm-hub creds --role hub) -r -n -t {topic}",
            file=sys.stderr,
        )
        return
    print(f"removed from Home Assistant too (cleared the retained {topic})")


def cmd_enrolled(args: argparse.Namespace) -> int:
    for e in sorted(_home(args).enrolments().values(), key=lambda e: e.node_id):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.enrolled_at))
        print(f"{e.node_id:<24} {e.owner or '-':<16} {'trusted' if e.trusted else '-':<8} enrolled {when}")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    home = _home(args)
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
    rates = _credit_rates(args)
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
    _print_table(header, rows)
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


def cmd_key(args: argparse.Namespace) -> int:
    print(_home(args).signing_key().public.text)
    return 0


async def cmd_bundle(args: argparse.Namespace) -> int:
    home = _home(args)
    topics = Topics(_swarm(args, home))
    async with Connection(_url(args, home, Role.HUB), ca_file=args.ca_file) as conn:
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
    home = _home(args)
    topics = Topics(_swarm(args, home))
    async with Connection(_url(args, home, Role.HUB), ca_file=args.ca_file) as conn:
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
        tags = [t.strip() for t in args.tags.split(",") if t.strip()]
        try:
            pin = pins.model_pin(topics.swarm, args.name, args.sha256, url=args.url, size_bytes=args.size, tags=tags)
        except ProtocolError as exc:
            raise ConfigError(f"cannot pin that: {exc}") from exc
        await pins.publish_model_pin(conn, topics, home.signing_key(), pin)
    who = f"nodes tagged {', '.join(tags)}" if tags else "every node"
    print(f"pinned {pin.name} (sha256 {pin.sha256[:16]}...) for {who}; `swarm-hub nodes` shows who follows")
    return 0


SYNC_COMMANDS = {
    "creds": cmd_creds,
    "enroll": cmd_enroll,
    "revoke": cmd_revoke,
    "enrolled": cmd_enrolled,
    "key": cmd_key,
    "token": cmd_token,
    "ledger": cmd_ledger,
}


COMMANDS = {
    "up": cmd_up,
    "serve": cmd_serve,
    "gateway": cmd_gateway,
    "ask": cmd_ask,
    "embed": cmd_embed,
    "nodes": cmd_nodes,
    "status": cmd_status,
    "top": cmd_top,
    "bundle": cmd_bundle,
    "model": cmd_model,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        # Only the long-running commands (up, serve, gateway) take log flags and write a log
        # file; one-shot commands log to stderr.
        default = _home(args).log_file("gateway" if args.command == "gateway" else "hub")
        logs.configure(level=args.log_level, json=args.log_json, file=logs.file_for(args, default))
        raise_open_file_limit()  # a long-running swarm holds a socket per connection
    else:
        logs.configure(level="warning")
    try:
        if args.command in SYNC_COMMANDS:
            return SYNC_COMMANDS[args.command](args)
        return asyncio.run(COMMANDS[args.command](args))
    except ConnectionLost as exc:
        print(f"swarm-hub: {exc}", file=sys.stderr)
        return 3
    except SwarmError as exc:
        print(f"swarm-hub: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
