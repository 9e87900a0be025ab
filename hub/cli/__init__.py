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
swarm-hub model pin NAME ...     make every node serve one GGUF model (signed, retained; `model add` pins more)
swarm-hub route set TAG MODEL    experts by tag: requests tagged TAG go to MODEL (signed, retained)
swarm-hub ledger [verify|export] what each node gave, from signed, hash-chained receipts
swarm-hub gateway --http H:P     the OpenAI-compatible HTTP API and chat page alone (up and serve run it too)
swarm-hub token                  the HTTP gateway's bearer token
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from nova_swarm.broker import argtypes, logs
from nova_swarm.broker.contract.errors import ConnectionLost, SwarmError
from nova_swarm.broker.fdlimit import raise_open_file_limit

from . import admin, ask, release, serve
from .common import swarm_home

# One module per audience: serve (running the swarm), ask (using it), admin (who may connect),
# release (what the nodes run, and what they gave).
SYNC_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    **admin.SYNC_COMMANDS,
    **serve.SYNC_COMMANDS,
    **release.SYNC_COMMANDS,
}
COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    **serve.COMMANDS,
    **ask.COMMANDS,
    **release.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argtypes.Parser(
        prog="swarm-hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order `swarm-hub --help` lists them.
    for add in (
        serve.add_up,
        serve.add_serve,
        ask.add_ask,
        ask.add_embed,
        ask.add_reports,
        ask.add_top,
        admin.add_creds,
        admin.add_enroll,
        admin.add_revoke,
        admin.add_enrolled,
        release.add_bundle,
        release.add_model,
        release.add_route,
        release.add_ledger,
        serve.add_gateway,
        serve.add_token,
        admin.add_key,
    ):
        add(sub)
    argtypes.describe(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        # Only the long-running commands (up, serve, gateway) take log flags and write a log
        # file; one-shot commands log to stderr.
        default = swarm_home(args).log_file("gateway" if args.command == "gateway" else "hub")
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
