"""Who may connect: creds, enroll, revoke, enrolled, and the hub's public key."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nova_swarm.broker import argtypes
from nova_swarm.broker.contract.errors import ConfigError, SwarmError
from nova_swarm.broker.contract.homeassistant import HomeAssistantTopics
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import (
    Joined,
    Role,
    SwarmHome,
    join_token,
)
from nova_swarm.broker.link import net
from nova_swarm.broker.link.connection import Connection
from nova_swarm.broker.link.url import BrokerURL

from .. import join
from .common import (
    CONFIG_DIR_HELP,
    broker_url,
    swarm_home,
)

if TYPE_CHECKING:
    from .common import Subparsers


def add_creds(sub: Subparsers) -> None:
    creds = sub.add_parser("creds", help="print -h -p -u -P for mosquitto_pub/mosquitto_sub")
    creds.add_argument(
        "--role", choices=[Role.CLIENT.value, Role.HUB.value], default="client", help="whose login (%(default)s)"
    )
    creds.add_argument("--url", action="store_true", help="print a broker URL instead")
    creds.add_argument("--rotate", action="store_true", help="give the role a new password first")
    creds.add_argument("--port", type=argtypes.port, help="broker port (default: where `up` listens)")
    creds.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)


def add_enroll(sub: Subparsers) -> None:
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


def add_revoke(sub: Subparsers) -> None:
    revoke = sub.add_parser("revoke", help="cut one node off: its login is removed and its connection dropped")
    revoke.add_argument("node_id", metavar="NODE", nargs="?", help="the node to cut off")
    revoke.add_argument("--client", metavar="NAME", help="remove a client login instead")
    revoke.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)
    revoke.add_argument(
        "--port", type=argtypes.port, help="port of this machine's swarm, to remove the node from Home Assistant"
    )


def add_enrolled(sub: Subparsers) -> None:
    enrolled = sub.add_parser("enrolled", help="list enrolled nodes")
    enrolled.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)


def add_key(sub: Subparsers) -> None:
    key = sub.add_parser("key", help="print the hub's public signing key (for `swarm-node run --hub-key`)")
    key.add_argument("--config-dir", type=Path, help=CONFIG_DIR_HELP)


def cmd_creds(args: argparse.Namespace) -> int:
    home = swarm_home(args)
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
    home = swarm_home(args)
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
    home = swarm_home(args)
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
        async with Connection(broker_url(args, home, Role.HUB), timeout=5.0) as conn:
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
    for e in sorted(swarm_home(args).enrolments().values(), key=lambda e: e.node_id):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.enrolled_at))
        print(f"{e.node_id:<24} {e.owner or '-':<16} {'trusted' if e.trusted else '-':<8} enrolled {when}")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    print(swarm_home(args).signing_key().public.text)
    return 0


SYNC_COMMANDS = {
    "creds": cmd_creds,
    "enroll": cmd_enroll,
    "revoke": cmd_revoke,
    "enrolled": cmd_enrolled,
    "key": cmd_key,
}
