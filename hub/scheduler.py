"""Which nodes get a request.

Each eligible node draws a score from its win-rate posterior for the request's tags (Thompson
sampling): nodes that win a tag are drawn high and get most of its traffic, while every node
keeps a chance in proportion to how uncertain we are about it, which is the exploration that
lets new nodes prove themselves. Busy nodes are marked down, so load spreads when rates tie.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .registry import NodeRecord
from .winrate import WinRates

#: how much a fully busy node's score drops; one full slot of load costs this much
LOAD_WEIGHT = 0.5


@dataclass
class Scheduler:
    winrates: WinRates
    rng: random.Random

    def pick(
        self, candidates: Sequence[NodeRecord], count: int, *, tags: Sequence[str], now: float
    ) -> list[NodeRecord]:
        """Up to ``count`` nodes with free capacity, best first."""
        free = [n for n in candidates if n.inflight < n.capacity]
        scored = []
        for node in free:
            alpha, beta = self.winrates.posterior(node.node_id, tags, now)
            load = min(1.0, node.inflight / node.slots)
            scored.append((self.rng.betavariate(alpha, beta) - LOAD_WEIGHT * load, node.node_id, node))
        scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
        return [node for _, _, node in scored[:count]]
