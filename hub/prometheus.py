"""Prometheus figures for the gateway's ``/metrics``: the hub's MQTT metrics, kept as they come.

    board = MetricsBoard(Topics("main"))
    board.feed(topic, payload)                   # every message on swarm/{sid}/metrics/#
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SwarmCollector(lambda: SwarmView(linked=True, hub=status, fleet=table, board=board)))
    text = generate_latest(registry)             # the Prometheus text format

The gateway is a client of the swarm, perhaps on another machine (``swarm-hub gateway``), so it
reads what the hub already publishes for dashboards (``hub/metrics.py``, topics.md's metrics
section) rather than keeping books of its own: ``MetricsBoard`` holds the latest message of each
metrics topic, and ``SwarmCollector`` turns the board, the hub's retained status and its node
table into metric families at scrape time. Neither does any I/O.

A message that is missing from the hub's last complete round is gone: a node the hub stopped
reporting (not heard from in an hour) drops out at the next round instead of lingering. Rounds
start with ``metrics/hub``, which the hub publishes first. While the gateway's broker link is down
or the hub is not online, only the ``*_up`` gauges are exposed: old readings would pass for live.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import StringConstraints, TypeAdapter, ValidationError

from nova_swarm.broker.contract.errors import ProtocolError
from nova_swarm.broker.contract.messages import UNKNOWN, HubMetrics, HubStatus, NodeMetrics, NodeTable, decode, describe
from nova_swarm.broker.contract.topics import Topics

from .metrics import LEDGER_TOTALS
from .winrate import MODEL_PREFIX

#: the prefix of every family this module exposes
PREFIX = "nova_swarm"

_Key = Annotated[str, StringConstraints(min_length=1, max_length=64)]
#: a fan-in or win-rate payload: {"pixel7": 4.2, ...}, or {"node_busy": 2, ...} for errors
_FAN_IN: TypeAdapter[dict[str, float]] = TypeAdapter(dict[_Key, float])


def _fan_in(payload: bytes) -> dict[str, float]:
    try:
        return _FAN_IN.validate_json(payload)
    except ValidationError as exc:
        raise ProtocolError(f"invalid fan-in metrics: {describe(exc)}") from exc


@dataclass
class MetricsBoard:
    """The latest message of each metrics topic, each with the round it came in."""

    topics: Topics
    #: rounds seen so far: each ``metrics/hub`` message starts one
    round: int = 0
    hub: HubMetrics | None = None
    #: when the latest ``metrics/hub`` came (``time.monotonic``)
    hub_at: float | None = None
    nodes: dict[str, tuple[int, NodeMetrics]] = field(default_factory=dict)
    errors: tuple[int, dict[str, float]] | None = None
    win_rates: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)
    ledger: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)

    def feed(self, topic: str, payload: bytes, *, now: float | None = None) -> None:
        """Keep one message; ProtocolError for a payload that is not what its topic carries.
        Fan-in topics of node readings are skipped: ``metrics/node/{id}`` has the same figures."""
        what = self.topics.parse_metrics(topic)
        if what is None:
            return
        kind, name = what
        if kind == "hub":
            self.round += 1
            self.hub = decode(HubMetrics, payload)
            self.hub_at = time.monotonic() if now is None else now
        elif kind == "node":
            self.nodes[name] = (self.round, decode(NodeMetrics, payload))
        elif kind == "win_rate":
            self.win_rates[name] = (self.round, _fan_in(payload))
        elif name == "errors":
            self.errors = (self.round, _fan_in(payload))
        elif name in LEDGER_TOTALS:
            self.ledger[name] = (self.round, _fan_in(payload))

    def fresh(self, seen: int) -> bool:
        """In the round under way or the last complete one (the hub's messages of a round come
        one by one, so a scrape may fall between them)."""
        return seen >= self.round - 1

    def current_nodes(self) -> dict[str, NodeMetrics]:
        return {node: m for node, (seen, m) in sorted(self.nodes.items()) if self.fresh(seen)}

    def current(self, table: dict[str, tuple[int, dict[str, float]]]) -> dict[str, dict[str, float]]:
        return {name: values for name, (seen, values) in sorted(table.items()) if self.fresh(seen)}

    def current_errors(self) -> dict[str, float]:
        if self.errors is None or not self.fresh(self.errors[0]):
            return {}
        return self.errors[1]


@dataclass(frozen=True, slots=True)
class SwarmView:
    """What the collector reads at scrape time."""

    #: the gateway's link to the broker is up
    linked: bool
    hub: HubStatus | None
    fleet: NodeTable | None
    board: MetricsBoard


# (NodeMetrics key, family name without the prefix, kind, help)
_NODE_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("online", "node_online", "gauge", "1 while the node is online and heard from in time"),
    ("paused", "node_paused", "gauge", "1 while the node is paused (by its guard or its owner)"),
    ("battery_pct", "node_battery_percent", "gauge", "battery charge (absent without a battery)"),
    ("charging", "node_charging", "gauge", "1 while charging (absent when unknown)"),
    ("temp_c", "node_temperature_celsius", "gauge", "device temperature (absent when unknown)"),
    ("tokens_per_s", "node_tokens_per_second", "gauge", "generation speed"),
    ("busy", "node_busy", "gauge", "tasks the node is working on"),
    ("queue_depth", "node_queue_depth", "gauge", "tasks waiting on the node"),
    ("tasks_done", "node_tasks_done", "counter", "tasks the node finished since it started"),
    ("tasks_failed", "node_tasks_failed", "counter", "tasks that failed on the node since it started"),
    ("pauses", "node_pauses", "counter", "times the node paused since it started"),
    ("joules_per_token", "node_joules_per_token", "gauge", "energy per generated token (absent when unknown)"),
)

# (ledger fan-in, family name without the prefix, kind, help)
_LEDGER_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("credits", "node_credits", "gauge", "credits the node earned, from the hub's ledger"),
    ("tokens_total", "node_ledger_tokens", "counter", "tokens the node generated, from the hub's ledger"),
    ("tasks_total", "node_ledger_tasks", "counter", "answered tasks of the node, from the hub's ledger"),
    ("wins_total", "node_wins", "counter", "requests the node's answer won, from the hub's ledger"),
)


def _family(kind: str, name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily | CounterMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels)
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels)


class SwarmCollector(Collector):
    """Metric families built from a fresh ``SwarmView`` at every scrape."""

    def __init__(self, view: Callable[[], SwarmView]) -> None:
        self._view = view

    def describe(self) -> Iterable[Metric]:
        # Nothing to check at registration: the families depend on what the swarm has published.
        return []

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        up = GaugeMetricFamily(f"{PREFIX}_broker_up", "1 while the gateway is connected to the swarm's broker")
        up.add_metric([], int(view.linked))
        yield up
        online = view.linked and view.hub is not None and view.hub.state == "online"
        hub_up = GaugeMetricFamily(f"{PREFIX}_hub_up", "1 while the hub says it is online (its retained status)")
        hub_up.add_metric([], int(online))
        yield hub_up
        if not online:
            return
        assert view.hub is not None
        yield from self._status(view.hub)
        board = view.board
        if board.hub is not None and board.hub_at is not None:
            age = GaugeMetricFamily(f"{PREFIX}_metrics_age_seconds", "seconds since the hub last published its metrics")
            age.add_metric([], round(max(0.0, time.monotonic() - board.hub_at), 3))
            yield age
            yield from self._hub(board.hub)
        models = {row.node_id: row.model or "" for row in view.fleet.nodes} if view.fleet else {}
        yield from self._nodes(board.current_nodes(), models)
        yield from self._fan_ins(board)

    @staticmethod
    def _status(hub: HubStatus) -> Iterator[Metric]:
        info = InfoMetricFamily(f"{PREFIX}_hub", "the hub answering for the swarm", labels=["hub_id", "version"])
        info.add_metric([hub.hub_id, hub.version or ""], {})
        yield info
        # From the hub's status rather than metrics/hub: it comes within half a second of a
        # change and also counts the requests their client stopped.
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "requests the hub settled since it started, by outcome", labels=["outcome"]
        )
        requests.add_metric(["answered"], hub.answered)
        requests.add_metric(["failed"], hub.failed)
        requests.add_metric(["cancelled"], hub.cancelled)
        yield requests
        if hub.max_tokens is not None:
            cap = GaugeMetricFamily(f"{PREFIX}_max_tokens_limit", "the hub's cap on tokens per answer")
            cap.add_metric([], hub.max_tokens)
            yield cap

    @staticmethod
    def _hub(m: HubMetrics) -> Iterator[Metric]:
        nodes = GaugeMetricFamily(f"{PREFIX}_nodes", "nodes the hub knows, by state", labels=["state"])
        for state, count in (("online", m.nodes_online), ("paused", m.nodes_paused), ("offline", m.nodes_offline)):
            nodes.add_metric([state], count)
        yield nodes
        for name, value, documentation in (
            ("inflight_requests", m.inflight, "requests in flight at the hub"),
            ("queued_requests", m.queue_depth, "requests in flight that wait for a free node"),
            ("requests_per_second", m.requests_per_s, "settled requests per second over the last minute"),
            ("answered_per_second", m.answered_per_s, "answered requests per second over the last minute"),
            ("errors_per_minute", m.errors_per_min, "failed requests over the last minute"),
        ):
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", documentation)
            gauge.add_metric([], value)
            yield gauge
        latency = GaugeMetricFamily(
            f"{PREFIX}_latency_seconds",
            "answer latency over the last minute's answers (absent when there were none)",
            labels=["quantile"],
        )
        for quantile, ms in (("0.5", m.latency_p50_ms), ("0.95", m.latency_p95_ms)):
            if ms != UNKNOWN:
                latency.add_metric([quantile], ms / 1000)
        yield latency

    @staticmethod
    def _nodes(nodes: dict[str, NodeMetrics], models: dict[str, str]) -> Iterator[Metric]:
        for key, name, kind, documentation in _NODE_FAMILIES:
            family = _family(kind, name, documentation, ["node", "model"])
            for node_id, m in nodes.items():
                value = getattr(m, key)
                # -1 is "cannot take this reading": no sample, so no line drawn at -1
                if value != UNKNOWN:
                    family.add_metric([node_id, models.get(node_id, "")], value)
            yield family

    @staticmethod
    def _fan_ins(board: MetricsBoard) -> Iterator[Metric]:
        errors = GaugeMetricFamily(
            f"{PREFIX}_errors_last_minute", "failed requests over the last minute, by error code", labels=["code"]
        )
        for code, count in sorted(board.current_errors().items()):
            errors.add_metric([code], count)
        yield errors
        rates = GaugeMetricFamily(
            f"{PREFIX}_node_win_rate",
            "decayed win rate per node and routing tag (all: over every request)",
            labels=["node", "tag"],
        )
        models = GaugeMetricFamily(
            f"{PREFIX}_model_win_rate",
            "decayed win rate per model and routing tag, from best_of_n rankings (all: over every request)",
            labels=["model", "tag"],
        )
        for tag, values in board.current(board.win_rates).items():
            for key, rate in sorted(values.items()):
                # The hub publishes the models' rates beside the nodes', as model:NAME (winrate.py).
                if key.startswith(MODEL_PREFIX):
                    models.add_metric([key.removeprefix(MODEL_PREFIX), tag], rate)
                else:
                    rates.add_metric([key, tag], rate)
        yield rates
        yield models
        ledger = board.current(board.ledger)
        for key, name, kind, documentation in _LEDGER_FAMILIES:
            family = _family(kind, name, documentation, ["node"])
            for node_id, value in sorted(ledger.get(key, {}).items()):
                family.add_metric([node_id], value)
            yield family


__all__ = ["MetricsBoard", "SwarmCollector", "SwarmView"]
