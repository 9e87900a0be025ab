"""Asking the swarm and watching it: ask, embed, nodes, status, top."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from nova_swarm.broker import argtypes
from nova_swarm.broker.contract.errors import ConfigError, RequestFailed
from nova_swarm.broker.contract.messages import (
    MAX_FANOUT,
    Answer,
    GenParams,
    HubStatus,
    JsonSchemaFormat,
    NodeTable,
    PromptRequest,
    ResponseFormat,
    Strategy,
    decode,
)
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import (
    Role,
)
from nova_swarm.broker.link.connection import Connection

from ..client import SwarmClient
from ..top import run_top
from .common import (
    REQUEST_TIMEOUT,
    broker_options,
    broker_url,
    print_table,
    swarm_home,
    swarm_id,
)

if TYPE_CHECKING:
    from .common import Subparsers


def add_ask(sub: Subparsers) -> None:
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
    across = ask.add_mutually_exclusive_group()
    across.add_argument(
        "--models",
        help="best_of_n across models: comma-separated names, one attempt each in turn (implies best_of_n)",
    )
    across.add_argument(
        "--diverse",
        action="store_true",
        help="best_of_n across models: spread the attempts over the models online nodes serve (implies best_of_n)",
    )
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
    broker_options(ask)


def add_embed(sub: Subparsers) -> None:
    embed = sub.add_parser("embed", help="embedding vectors for texts, from nodes that can make them")
    embed.add_argument("texts", nargs="+", type=argtypes.text, help="one or more texts")
    embed.add_argument("--model", help="only nodes serving this model")
    embed.add_argument("--timeout", type=REQUEST_TIMEOUT, default=120.0, help="seconds to wait for the vectors")
    broker_options(embed)


def add_reports(sub: Subparsers) -> None:
    for name, helptext in (("nodes", "list the nodes the hub knows"), ("status", "the hub's status")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--json", action="store_true", help="print the hub's report as JSON")
        p.add_argument(
            "--wait", type=argtypes.positive_float, default=5.0, help="seconds to wait for the hub's retained report"
        )
        broker_options(p)


def add_top(sub: Subparsers) -> None:
    top = sub.add_parser("top", help="a live view of the hub, its nodes and recent errors (Ctrl-C quits)")
    top.add_argument("--frames", type=argtypes.positive_int, help="stop after this many refreshes (two a second)")
    top.add_argument("--duration", type=argtypes.positive_float, help="stop after this many seconds")
    broker_options(top)


async def cmd_ask(args: argparse.Namespace) -> int:
    home = swarm_home(args)
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    strategy: Strategy = "best_of_n" if models or args.diverse else args.strategy
    fanout = args.fanout or (max(2, len(models or [])) if strategy == "best_of_n" else 1)
    try:
        request = PromptRequest(
            prompt=args.prompt,
            strategy=strategy,
            fanout=fanout,
            models=models,
            diverse=args.diverse,
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
    async with SwarmClient(
        broker_url(args, home, Role.CLIENT), swarm=swarm_id(args, home), ca_file=args.ca_file
    ) as client:
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
    home = swarm_home(args)
    try:
        request = PromptRequest(kind="embed", input=list(args.texts), model=args.model, timeout_s=args.timeout)
    except ValidationError as exc:
        raise ConfigError(_refused(exc)) from exc
    async with SwarmClient(
        broker_url(args, home, Role.CLIENT), swarm=swarm_id(args, home), ca_file=args.ca_file
    ) as client:
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
    home = swarm_home(args)
    topics = Topics(swarm_id(args, home))
    topic = topics.hub_nodes() if topic_of == "nodes" else topics.hub_status()
    async with Connection(broker_url(args, home, Role.CLIENT), ca_file=args.ca_file) as conn:
        await conn.subscribe(topic)
        try:
            async with asyncio.timeout(args.wait):
                async for message in conn.messages():
                    if message.topic == topic and message.payload:
                        return message.payload
        except TimeoutError:
            return None
    return None


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
    print_table(header, rows)
    several = [n for n in table.nodes if len(n.models) > 1]
    if several:
        print("\nmodels (* in memory now):")
        for n in several:
            listed = ", ".join(
                m.name + ("*" if m.loaded else "") + ("" if m.fits else " (too big for its RAM)")
                + (f" (loads in {m.load_s:.1f} s)" if m.load_s is not None else "")
                for m in n.models
            )  # fmt: skip
            print(f"  {n.node_id}: {listed}; {n.swaps} swap{'' if n.swaps == 1 else 's'}")
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
    home = swarm_home(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C is how you leave `top`: stop drawing and exit 0, leaving the last frame on screen.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reports = await run_top(
        broker_url(args, home, Role.CLIENT),
        swarm_id(args, home),
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


COMMANDS = {"ask": cmd_ask, "embed": cmd_embed, "nodes": cmd_nodes, "status": cmd_status, "top": cmd_top}
