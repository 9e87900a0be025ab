"""``swarm-hub top``: a read-only live view of the swarm, redrawn in place (a snapshot when piped).

It only listens to what the hub already publishes for anyone with a client login:

    hub/status        HubStatus (retained)   the header: hub, uptime, node counts, request totals
    hub/nodes         NodeTable (retained)   the node table
    metrics/hub       HubMetrics             request rate and latency over the last minute
    metrics/errors    {"code": count, ...}   errors by code over the last minute

:func:`apply` folds one message into :class:`Reports` and :func:`render` draws them; both are
pure, so tests draw frames without a broker. :func:`run_top` is the I/O around them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from nova_swarm.broker.contract.errors import ConfigError, ConnectionLost, ProtocolError
from nova_swarm.broker.contract.messages import HubMetrics, HubStatus, NodeRow, NodeState, NodeTable, decode
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.link.base import Message
from nova_swarm.broker.link.connection import Connection
from nova_swarm.broker.link.reconnect import Backoff
from nova_swarm.broker.link.url import BrokerURL

log = structlog.get_logger("nova_swarm.top")

#: seconds between frames: about two a second
REFRESH_S = 0.5
#: a report older than this is marked with its age. The hub re-sends its status at least every
#: 10 s by default and metrics every 5 s, so this means the hub (or our connection) is gone.
STALE_S = 30.0
#: error codes are snake_case (broker/contract/errors.py); a newer hub's unknown codes still fit
_ERROR_CODE = re.compile(r"^[a-z0-9_]{1,64}$")
_STATE_STYLE = {NodeState.ONLINE: "green", NodeState.PAUSED: "yellow", NodeState.OFFLINE: "red"}
#: a snapshot (output not a terminal) waits this long for the hub's retained reports...
SNAPSHOT_WAIT_S = 10.0
#: ...and this long, from the start, for the first metrics (the hub sends them every 5 s by default)
SNAPSHOT_METRICS_S = 6.0
#: columns of a snapshot: rich assumes 80 off a terminal and would cut the node table
SNAPSHOT_WIDTH = 200


@dataclass(frozen=True, slots=True)
class Reports:
    """The latest of each report, and when the non-retained ones arrived (wall-clock seconds)."""

    status: HubStatus | None = None
    nodes: NodeTable | None = None
    metrics: HubMetrics | None = None
    metrics_at: float | None = None
    errors: dict[str, float] | None = None
    errors_at: float | None = None
    #: why we are not receiving right now (the connection dropped and we are reconnecting)
    problem: str | None = None

    @property
    def empty(self) -> bool:
        return self.status is None and self.nodes is None


# ---------------------------------------------------------------- parsing


def parse_errors(payload: bytes) -> dict[str, float]:
    """The ``errors`` fan-in: a flat JSON object, one non-negative count per error code."""
    try:
        counts = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"invalid errors metric: {exc}") from exc
    if not isinstance(counts, dict):
        raise ProtocolError("invalid errors metric: not a JSON object")
    for code, count in counts.items():
        if not _ERROR_CODE.match(code):
            raise ProtocolError(f"invalid errors metric: {code[:80]!r} is not an error code")
        # bool is an int in Python, and NaN would pass a plain >= 0 check
        if isinstance(count, bool) or not isinstance(count, int | float) or not math.isfinite(count) or count < 0:
            raise ProtocolError(f"invalid errors metric: {code}: {count!r} is not a count")
    return {code: float(count) for code, count in counts.items()}


def apply(reports: Reports, topics: Topics, message: Message, *, now: float) -> Reports:
    """``reports`` with ``message`` folded in. A malformed payload changes nothing: one bad
    publisher must not blank or crash the view."""
    try:
        return _apply(reports, topics, message, now)
    except ProtocolError as exc:
        log.debug("ignored a malformed report", topic=message.topic, error=str(exc))
        return reports


def _apply(reports: Reports, topics: Topics, message: Message, now: float) -> Reports:
    topic, payload = message.topic, message.payload
    if not payload:
        return reports  # a retained message being cleared
    if topic == topics.hub_status():
        return dataclasses.replace(reports, status=decode(HubStatus, payload))
    if topic == topics.hub_nodes():
        return dataclasses.replace(reports, nodes=decode(NodeTable, payload))
    if topic == topics.metrics_hub():
        return dataclasses.replace(reports, metrics=decode(HubMetrics, payload), metrics_at=now)
    if topic == topics.metrics_fan_in("errors"):
        return dataclasses.replace(reports, errors=parse_errors(payload), errors_at=now)
    return reports


# ---------------------------------------------------------------- rendering (pure)


def render(reports: Reports, *, now: float) -> RenderableType:
    """One frame of the view."""
    problem = (
        Text(f"connection lost ({_clean(reports.problem)}); reconnecting...", style="red") if reports.problem else None
    )
    if reports.empty:
        waiting = Text("waiting for the hub...")
        return Group(waiting, problem) if problem else waiting
    parts: list[RenderableType] = [_header(reports, now), _node_table(reports.nodes), _errors(reports, now)]
    if problem:
        parts.append(problem)
    return Group(*parts)


def _clean(text: object) -> str:
    """Node ids are checked on the wire, but model names, versions and reasons are free text:
    an escape sequence in one must not reach the terminal."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in str(text))


def _duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86_400}d {s % 86_400 // 3600:02d}h"


def _age(at: float | None, now: float) -> str:
    """`` (45s old)`` for a stale report, else nothing."""
    if at is None or now - at < STALE_S:
        return ""
    return f" ({_duration(now - at)} old)"


def _header(reports: Reports, now: float) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    s = reports.status
    if s is None:
        grid.add_row("hub", Text("no status yet", style="dim"))
    else:
        up = "-" if s.state != "online" or s.started_at is None else _duration(now - s.started_at)
        grid.add_row(
            "hub",
            Text.assemble(
                _clean(s.hub_id),
                "  ",
                (s.state, "green" if s.state == "online" else "bold red"),
                f"  version {_clean(s.version or '?')}  up {up}{_age(s.ts, now)}",
            ),
        )
        grid.add_row("nodes", Text(f"{s.nodes_online} online  {s.nodes_paused} paused  {s.nodes_offline} offline"))
        grid.add_row(
            "requests",
            Text(
                f"{s.inflight} in flight  {s.queued} queued  {s.answered} answered  {s.failed} failed"
                f"  {s.cancelled} cancelled"
            ),
        )
    grid.add_row("last minute", _rates(reports.metrics, reports.metrics_at, now))
    return grid


def _rates(m: HubMetrics | None, at: float | None, now: float) -> Text:
    if m is None:
        return Text("waiting for metrics...", style="dim")

    def ms(value: float) -> str:
        return "-" if value < 0 else f"{value:.0f} ms"  # -1: no answers in the last minute

    return Text(
        f"{m.requests_per_s:.2f} req/s  latency p50 {ms(m.latency_p50_ms)}  p95 {ms(m.latency_p95_ms)}"
        f"  {m.errors_per_min} error{'' if m.errors_per_min == 1 else 's'}{_age(at, now)}"
    )


def _models(n: NodeRow) -> str:
    """What a node has in memory: its model, or for a node that serves several, those loaded now
    and how many more it can load."""
    if len(n.models) <= 1:
        return n.model or "-"
    loaded = [m.name for m in n.models if m.loaded]
    rest = len(n.models) - len(loaded)
    return (", ".join(loaded) or "none loaded") + (f" (+{rest} not loaded)" if rest else "")


def _node_table(table: NodeTable | None) -> RenderableType:
    if table is None:
        return Text("no node table yet", style="dim")
    if not table.nodes:
        return Text("no nodes yet: start one with `swarm-node run`", style="dim")
    out = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("NODE", "STATE", "MODEL", "BATTERY", "TEMP", "TOK/S"):
        out.add_column(name, no_wrap=True, justify="right" if name in ("BATTERY", "TEMP", "TOK/S") else "left")
    out.add_column("BUSY", justify="right", no_wrap=True)
    out.add_column("VERSION", no_wrap=True)
    out.add_column("LAG", overflow="fold")
    for n in table.nodes:
        battery = "-" if n.battery_pct is None else f"{n.battery_pct:.0f}%" + ("+" if n.charging else "")
        out.add_row(
            # Text, not str: a str cell is rich markup, and these come off the wire
            Text(n.node_id),
            Text(n.state.value, style=_STATE_STYLE.get(n.state, "")),
            Text(_clean(_models(n))),
            Text(battery),
            Text("-" if n.temp_c is None else f"{n.temp_c:.1f}C"),
            Text("-" if n.tokens_per_s is None else f"{n.tokens_per_s:.1f}"),
            Text(str(n.busy), style="bold" if n.busy else ""),
            Text(_clean(n.agent_version or "-")),
            Text(_clean(n.lag) if n.lag else "-", style="yellow" if n.lag else ""),
            style="dim" if n.state is NodeState.OFFLINE else None,
        )
    return out


def _errors(reports: Reports, now: float) -> Text:
    line = Text("errors, last minute: ", style="bold")
    if reports.errors is None:
        return line.append("waiting for metrics...", style="dim")
    counts = sorted(((c, n) for c, n in reports.errors.items() if n > 0), key=lambda cn: (-cn[1], cn[0]))
    if not counts:
        return line.append("none" + _age(reports.errors_at, now))
    return line.append(
        "  ".join(f"{code} {count:g}" for code, count in counts) + _age(reports.errors_at, now), style="red"
    )


# ---------------------------------------------------------------- the live view (I/O)


@dataclass(slots=True)
class _Board:
    """The latest reports: the receiving task replaces them, the drawing loop reads them."""

    topics: Topics
    reports: Reports = field(default_factory=Reports)
    connected_once: bool = False


def _filters(topics: Topics) -> tuple[str, ...]:
    return (topics.hub_status(), topics.hub_nodes(), topics.metrics_hub(), topics.metrics_fan_in("errors"))


async def _follow(url: BrokerURL, ca_file: Path | None, board: _Board) -> None:
    """Receive reports until cancelled, reconnecting after a drop. The first connection's
    failure is raised instead: a wrong login or address should end `top` with its reason."""
    backoff = Backoff()
    attempt = 0
    while True:
        try:
            async with Connection(url, ca_file=ca_file) as conn:
                await conn.subscribe(*_filters(board.topics))
                board.connected_once, attempt = True, 0
                board.reports = dataclasses.replace(board.reports, problem=None)
                async for message in conn.messages():
                    board.reports = apply(board.reports, board.topics, message, now=time.time())
        except ConnectionLost as exc:
            if not board.connected_once:
                raise
            board.reports = dataclasses.replace(board.reports, problem=str(exc))
        await asyncio.sleep(backoff.delay(attempt))
        attempt += 1


async def _draw(live: Live, board: _Board, frames: int | None, duration: float | None, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    end = None if duration is None else loop.time() + duration
    drawn = 0
    while True:
        live.update(render(board.reports, now=time.time()), refresh=True)
        drawn += 1
        if frames is not None and drawn >= frames:
            return
        wait = REFRESH_S if end is None else min(REFRESH_S, end - loop.time())
        if wait <= 0:
            return
        try:
            async with asyncio.timeout(wait):  # not wait_for: see connection.raise_if_cancelled
                await stop.wait()
            return
        except TimeoutError:
            pass


async def _snapshot(board: _Board, stop: asyncio.Event) -> None:
    """Wait until there is something worth printing once: the hub's retained status and node
    table, and its metrics if they come soon; or until the waits run out (no hub answers)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not stop.is_set():
        r, waited = board.reports, loop.time() - start
        retained = r.status is not None and r.nodes is not None
        if (retained and r.metrics is not None and r.errors is not None) or waited >= SNAPSHOT_WAIT_S:
            return
        if retained and waited >= SNAPSHOT_METRICS_S:
            return
        await asyncio.sleep(0.05)


def _console(console: Console | None) -> Console:
    """The caller's console, else stdout's; off a terminal as wide as $COLUMNS or SNAPSHOT_WIDTH."""
    if console is not None:
        return console
    console = Console()
    if console.is_terminal:
        return console
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else SNAPSHOT_WIDTH)


async def run_top(
    url: BrokerURL,
    swarm: str,
    *,
    ca_file: Path | None = None,
    frames: int | None = None,
    duration: float | None = None,
    console: Console | None = None,
    stop: asyncio.Event | None = None,
) -> Reports:
    """Show the live view until ``stop`` is set, or after ``frames`` refreshes or ``duration``
    seconds, whichever comes first. On a terminal it redraws in place; into a file or pipe it
    writes one frame: with ``frames`` or ``duration`` the last one, else a snapshot as soon as
    the hub's reports are in. Returns the reports last drawn."""
    if frames is not None and frames < 1:
        raise ConfigError(f"--frames must be 1 or more, not {frames}")
    if duration is not None and duration <= 0:
        raise ConfigError(f"--duration must be more than 0, not {duration}")
    board = _Board(Topics(swarm))
    console = _console(console)
    stop = stop or asyncio.Event()
    if not console.is_terminal and frames is None and duration is None:
        await _following(url, ca_file, board, _snapshot(board, stop))
        console.print(render(board.reports, now=time.time()))
        return board.reports
    # Our own refreshes, on the event loop: Live's refresh thread would race the receiving task.
    live = Live(render(board.reports, now=time.time()), console=console, auto_refresh=False)
    try:
        with live:
            await _following(url, ca_file, board, _draw(live, board, frames, duration, stop))
    finally:
        if not live.console.is_terminal:
            live.console.line()  # rich ends the last frame with a newline on terminals only
    return board.reports


async def _following(url: BrokerURL, ca_file: Path | None, board: _Board, view: Coroutine[None, None, None]) -> None:
    """Run ``view`` while a task beside it keeps ``board`` up to date."""
    try:
        async with asyncio.TaskGroup() as tg:
            following = tg.create_task(_follow(url, ca_file, board))
            await view
            following.cancel()
    except BaseExceptionGroup as group:
        # The TaskGroup wraps the first connection's failure; callers expect ours, unwrapped.
        lost, rest = group.split(ConnectionLost)
        if lost is None or rest is not None:
            raise
        raise lost.exceptions[0] from None
