"""Which nodes get a request.

Each eligible node draws a score from its win-rate posterior for the request's tags (Thompson
sampling): nodes that win a tag are drawn high and get most of its traffic, while every node
keeps a chance in proportion to how uncertain we are about it, which is the exploration that
lets new nodes prove themselves. Busy nodes are marked down, so load spreads when rates tie,
and so are warm phones and phones running on battery: with a choice, cool and charging ones
work (a node too hot or too flat has already paused itself and is not a candidate at all).
Distrusted nodes are marked down too (``trust.py``: late, crashing or always-outranked work).

    score = Beta(wins + 1, losses + 1) draw − 0.5 × load − heat and battery penalty (≤ 0.5)
            − 0.4 × (1 − trust) − cold

``load`` is the node's tasks in flight (running and queued) per slot. ``cold`` marks down a node
that serves the requested model but would have to load it first (it serves several, and another
is in memory): 0.2, plus 0.1 a second of its expected load, up to 0.6. A warm node is preferred,
but an idle cold one still beats a warm one with a full queue.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .registry import NodeRecord
from .trust import Trust
from .winrate import WinRates

#: what one slot's worth of tasks in flight (running or queued) costs a node's score
LOAD_WEIGHT = 0.5
#: how much heat costs, rising from nothing at COOL_C to all of it at the guard's default limit
HEAT_WEIGHT = 0.3
COOL_C, HOT_C = 30.0, 42.0
#: how much running on battery costs, more the emptier it is
BATTERY_WEIGHT = 0.2
#: how much distrust costs: a node at trust 0 loses this much, one at trust 1 nothing
TRUST_WEIGHT = 0.4
#: what having to load the model first costs: a base, a share per expected second, a cap
COLD_BASE, COLD_PER_S, COLD_MAX = 0.2, 0.1, 0.6


def cold_penalty(node: NodeRecord, model: str | None) -> float:
    """0 when ``model`` is in the node's memory; more the longer its load is expected to take."""
    if node.warm(model):
        return 0.0
    return min(COLD_MAX, COLD_BASE + COLD_PER_S * node.load_s(model))


def comfort_penalty(node: NodeRecord) -> float:
    """0 for a cool, charging (or mains-powered) node; up to HEAT_WEIGHT + BATTERY_WEIGHT."""
    hb = node.heartbeat
    if hb is None:
        return 0.0
    penalty = 0.0
    if hb.temp_c is not None:
        penalty += HEAT_WEIGHT * min(1.0, max(0.0, (hb.temp_c - COOL_C) / (HOT_C - COOL_C)))
    if hb.charging is False:
        empty = 0.5 if hb.battery_pct is None else 1.0 - min(100.0, max(0.0, hb.battery_pct)) / 100.0
        penalty += BATTERY_WEIGHT * (0.5 + 0.5 * empty)
    return penalty


@dataclass
class Scheduler:
    winrates: WinRates
    rng: random.Random
    trust: Trust = field(default_factory=Trust)

    def pick(
        self,
        candidates: Sequence[NodeRecord],
        count: int,
        *,
        tags: Sequence[str],
        now: float,
        model: str | None = None,
    ) -> list[NodeRecord]:
        """Up to ``count`` nodes with free capacity, best first, for a request for ``model``."""
        free = [n for n in candidates if n.inflight < n.capacity]
        scored = []
        for node in free:
            alpha, beta = self.winrates.posterior(node.node_id, tags, now)
            # Work waiting in a node's queue counts too: a node with two tasks queued behind a
            # full slot must look busier than one with its slot just taken, or queues pile up
            # on a few nodes while others idle.
            load = node.inflight / node.slots
            score = self.rng.betavariate(alpha, beta) - LOAD_WEIGHT * load - comfort_penalty(node)
            score -= TRUST_WEIGHT * (1.0 - self.trust.score(node.node_id)) + cold_penalty(node, model)
            scored.append((score, node.node_id, node))
        scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
        return [node for _, _, node in scored[:count]]
