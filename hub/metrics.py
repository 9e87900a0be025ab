"""Metrics for dashboards: the hub turns what it already knows into flat, numbers-only JSON.

    swarm/{sid}/metrics/hub                 HubMetrics: the fleet, request rate, latency, errors
    swarm/{sid}/metrics/node/{node_id}      NodeMetrics: one node's readings and counters
    swarm/{sid}/metrics/{metric}            fan-in: {"pixel7": 4.2, "s20": 3.1}, one key per node
    swarm/{sid}/metrics/errors              {"node_busy": 0, "deadline_exceeded": 2, ...}: every code
    swarm/{sid}/metrics/win_rate/{tag}      {"pixel7": 0.71, "model:gemma-3-270m-q4_k_m": 0.6, ...}:
                                            decayed win rate per routing tag, of nodes and models

Grafana's MQTT data source merges every topic a wildcard matches into one frame and plots one
field per top-level key, so each panel subscribes to one concrete topic, and a fan-in topic gives
one series per node with no transformation. Nothing here touches the network (``Hub`` publishes);
``Window`` is a plain sliding window, tested directly.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import UNKNOWN, HubMetrics, HubStatus, NodeMetrics, NodeState
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.contract.version import __version__

from .config import HubConfig
from .credits import Contribution, CreditRates
from .registry import NodeRecord, Registry
from .winrate import ALL, MODEL_PREFIX, WinRates

#: the fan-in topic name for the decayed win rate over every request (the ``*`` tally)
ALL_TAGS = "all"


@dataclass
class Window:
    """Settled requests of the last ``span_s`` seconds: how many, how fast, and which errors."""

    span_s: float = 60.0
    _answers: deque[tuple[float, float]] = field(default_factory=deque)
    _errors: deque[tuple[float, ErrorCode]] = field(default_factory=deque)
    answered_total: int = 0
    failed_total: int = 0
    #: requests their client stopped: the client's choice, not a failure of the swarm
    cancelled_total: int = 0

    def answered(self, now: float, latency_ms: float) -> None:
        self.answered_total += 1
        self._answers.append((now, latency_ms))

    def failed(self, now: float, code: ErrorCode) -> None:
        if code is ErrorCode.CANCELLED:
            # Only a client's Stop settles a request as cancelled at the hub (a node's own
            # cancellations are attempts, retried elsewhere): its own outcome, not an error.
            self.cancelled_total += 1
            return
        self.failed_total += 1
        self._errors.append((now, code))

    def _trim(self, now: float) -> None:
        for events in (self._answers, self._errors):
            while events and events[0][0] < now - self.span_s:
                events.popleft()

    def errors_by_code(self, now: float) -> dict[str, int]:
        """Every error code, always present (0 when it did not happen): a fixed key set."""
        self._trim(now)
        counts = {code.value: 0 for code in ErrorCode}
        for _, code in self._errors:
            counts[code.value] += 1
        return counts

    def latency_percentile(self, now: float, q: float) -> float:
        """The ``q`` quantile (nearest rank) of the window's latencies; UNKNOWN without answers."""
        self._trim(now)
        ordered = sorted(latency for _, latency in self._answers)
        if not ordered:
            return UNKNOWN
        rank = max(1, math.ceil(q * len(ordered)))
        return round(ordered[rank - 1], 2)

    def hub_metrics(self, now: float, registry: Registry, *, inflight: int, queued: int) -> HubMetrics:
        self._trim(now)
        counts = registry.counts(now)
        answered, errors = len(self._answers), len(self._errors)
        return HubMetrics(
            nodes_online=counts["online"],
            nodes_paused=counts["paused"],
            nodes_offline=counts["offline"],
            inflight=inflight,
            queue_depth=queued,
            requests_per_s=round((answered + errors) / self.span_s, 3),
            answered_per_s=round(answered / self.span_s, 3),
            errors_per_min=round(errors * 60 / self.span_s),
            latency_p50_ms=self.latency_percentile(now, 0.50),
            latency_p95_ms=self.latency_percentile(now, 0.95),
            answered_total=self.answered_total,
            failed_total=self.failed_total,
        )

    def hub_status(
        self, config: HubConfig, registry: Registry, *, now: float, inflight: int, queued: int, started_at: float
    ) -> HubStatus:
        """The hub's retained status: its nodes, its requests, its totals since it started."""
        counts = registry.counts(now)
        return HubStatus(
            hub_id=config.hub_id,
            state="online",
            ts=now,
            version=__version__,
            nodes_online=counts["online"],
            nodes_paused=counts["paused"],
            nodes_offline=counts["offline"],
            inflight=inflight,
            queued=queued,
            answered=self.answered_total,
            failed=self.failed_total,
            cancelled=self.cancelled_total,
            started_at=started_at,
            max_tokens=config.limits.max_tokens,
        )


def _known(value: float | None) -> float:
    return UNKNOWN if value is None else round(float(value), 2)


def _flag(value: bool | None) -> int:
    return UNKNOWN if value is None else int(value)


def node_metrics(rec: NodeRecord, now: float, heartbeat_timeout_s: float) -> NodeMetrics:
    hb, an = rec.heartbeat, rec.announce
    speed = hb.tokens_per_s if hb and hb.tokens_per_s else (an.tokens_per_s if an else None)
    return NodeMetrics(
        online=int(rec.available(now, heartbeat_timeout_s)),
        paused=int(rec.state is NodeState.PAUSED),
        battery_pct=_known(hb.battery_pct if hb else None),
        charging=_flag(hb.charging if hb else None),
        temp_c=_known(hb.temp_c if hb else None),
        tokens_per_s=_known(speed),
        busy=hb.busy if hb else 0,
        queue_depth=hb.queued if hb else 0,
        tasks_done=hb.tasks_done if hb else 0,
        tasks_failed=hb.tasks_failed if hb else 0,
        pauses=hb.pauses if hb else 0,
        joules_per_token=_joules(rec.energy.per_token()),
    )


def _joules(value: float | None) -> float:
    # Finer than _known: a phone spends hundredths of a joule on a token.
    return UNKNOWN if value is None else round(value, 4)


def reported(registry: Registry, now: float, *, forget_after_s: float = 3600.0) -> list[NodeRecord]:
    """The nodes worth a series: heard from within the last hour (an old phone drops out)."""
    return [
        rec
        for rec in sorted(registry.nodes.values(), key=lambda r: r.node_id)
        if rec.last_seen is not None and now - rec.last_seen <= forget_after_s
    ]


def fan_in(per_node: dict[str, NodeMetrics]) -> dict[str, dict[str, float]]:
    """{metric: {node_id: value}} over every NodeMetrics key; unknown readings are left out, so a
    desktop without a battery draws no line rather than one at -1."""
    out: dict[str, dict[str, float]] = {name: {} for name in NodeMetrics.model_fields}
    for node_id, metrics in per_node.items():
        for name, value in metrics.model_dump().items():
            if value != UNKNOWN:
                out[name][node_id] = value
    return out


#: fan-in topics of the ledger's totals (published when the hub keeps a ledger)
LEDGER_TOTALS = ("credits", "tokens_total", "tasks_total", "wins_total")


def ledger_totals(accounts: dict[str, Contribution], rates: CreditRates) -> dict[str, dict[str, float]]:
    """{metric: {node_id: value}} for credits, tokens, answered tasks and wins, since the start."""
    return {
        "credits": {n: a.credits(rates) for n, a in sorted(accounts.items())},
        "tokens_total": {n: a.tokens for n, a in sorted(accounts.items())},
        "tasks_total": {n: a.tasks for n, a in sorted(accounts.items())},
        "wins_total": {n: a.wins for n, a in sorted(accounts.items())},
    }


def win_rates(rates: WinRates, node_ids: Iterable[str], now: float) -> dict[str, dict[str, float]]:
    """{tag: {node_id: decayed win rate}} for every tag the hub has a tally for."""
    ids = set(node_ids)
    out: dict[str, dict[str, float]] = {}
    for node_id, tag in rates.keys():
        if node_id in ids:
            name = ALL_TAGS if tag == ALL else tag
            out.setdefault(name, {})[node_id] = round(rates.rate(node_id, tag, now), 4)
    return out


def readings(
    topics: Topics,
    window: Window,
    registry: Registry,
    winrates: WinRates,
    accounts: dict[str, Contribution],
    rates: CreditRates,
    *,
    heartbeat_timeout_s: float,
    load: tuple[int, int],
    now: float,
    mono: float,
) -> list[tuple[str, bytes]]:
    """Every metrics message the hub publishes on one tick, as (topic, payload). ``load``: the
    requests in flight and those waiting; ``now`` is the wall clock, ``mono`` the event loop's
    (the window's)."""
    hub = window.hub_metrics(mono, registry, inflight=load[0], queued=load[1])
    nodes = {rec.node_id: node_metrics(rec, now, heartbeat_timeout_s) for rec in reported(registry, now)}
    batch: list[tuple[str, bytes]] = [(topics.metrics_hub(), hub.encode())]
    batch += [(topics.metrics_node(node_id), m.encode()) for node_id, m in nodes.items()]
    batch += [(topics.metrics_fan_in(name), json.dumps(v).encode()) for name, v in fan_in(nodes).items()]
    batch.append((topics.metrics_fan_in("errors"), json.dumps(window.errors_by_code(mono)).encode()))
    models = {key for key, _ in winrates.keys() if key.startswith(MODEL_PREFIX)}
    for tag, by_node in win_rates(winrates, [*nodes, *models], now).items():
        batch.append((topics.metrics_win_rate(tag), json.dumps(by_node).encode()))
    if accounts:  # the ledger's totals, one key per node
        for name, values in ledger_totals(accounts, rates).items():
            batch.append((topics.metrics_fan_in(name), json.dumps(values).encode()))
    return batch
