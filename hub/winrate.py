"""Exponentially decayed win rates per (node, tag).

Every outcome decays old evidence by half every ``half_life_s``, so a node that got better (or
worse) is noticed within a few half-lives. The posterior is Beta(1 + wins, 1 + losses): a node
with no history sits at 0.5 and still gets picked, which is how new nodes get their chance.
The tag ``*`` tracks every request, tagged or not. Models are tallied too, under
``model_key(name)``: a key no node id can be (node ids have no colon).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ALL = "*"
#: how many leading nodes per tag ``leaders`` keeps, and how often (s) it works them out again
LEADERS, LEADERS_EVERY_S = 8, 1.0
#: what a model's tallies are kept under, beside the nodes'
MODEL_PREFIX = "model:"


def model_key(model: str) -> str:
    return MODEL_PREFIX + model


@dataclass(slots=True)
class Tally:
    wins: float
    trials: float
    updated: float

    def decayed(self, now: float, half_life_s: float) -> tuple[float, float]:
        factor = 0.5 ** (max(0.0, now - self.updated) / half_life_s)
        return self.wins * factor, self.trials * factor


class WinRates:
    def __init__(self, *, half_life_s: float = 86_400.0, rows: Iterable[tuple[str, str, float, float, float]] = ()):
        self.half_life_s = half_life_s
        self._tallies: dict[tuple[str, str], Tally] = {}
        #: tag -> the node ids with a tally for it (so ``leaders`` need not walk every tally)
        self._by_tag: dict[str, set[str]] = {}
        for node_id, tag, wins, trials, updated in rows:
            self._tallies[(node_id, tag)] = Tally(wins, trials, updated)
            self._by_tag.setdefault(tag, set()).add(node_id)
        self._dirty: set[tuple[str, str]] = set()
        #: tag -> (when worked out, its leading node ids): ``leaders``
        self._leaders: dict[str, tuple[float, list[str]]] = {}

    def record(self, node_id: str, tags: Iterable[str], *, won: bool, now: float) -> None:
        for tag in {ALL, *tags}:
            key = (node_id, tag)
            tally = self._tallies.get(key)
            wins, trials = tally.decayed(now, self.half_life_s) if tally else (0.0, 0.0)
            self._tallies[key] = Tally(wins + (1.0 if won else 0.0), trials + 1.0, now)
            self._by_tag.setdefault(tag, set()).add(node_id)
            self._dirty.add(key)

    def posterior(self, node_id: str, tags: Iterable[str], now: float) -> tuple[float, float]:
        """Beta parameters pooled over ``tags`` (or ``*`` when there are none)."""
        wins = trials = 0.0
        for tag in set(tags) or {ALL}:
            tally = self._tallies.get((node_id, tag))
            if tally:
                w, t = tally.decayed(now, self.half_life_s)
                wins += w
                trials += t
        return 1.0 + wins, 1.0 + (trials - wins)

    def rate(self, node_id: str, tag: str, now: float) -> float:
        alpha, beta = self.posterior(node_id, [tag], now)
        return alpha / (alpha + beta)

    def leaders(self, tags: Iterable[str], now: float) -> list[str]:
        """The nodes with the best rates on any of ``tags``, best first per tag: at most
        ``LEADERS`` a tag, worked out again at most every ``LEADERS_EVERY_S`` (placement in a big
        swarm weighs these beside the free nodes it samples)."""
        out: list[str] = []
        for tag in tags:
            cached = self._leaders.get(tag)
            if cached is None or now - cached[0] >= LEADERS_EVERY_S or now < cached[0]:
                rated = [
                    (self.rate(node_id, tag, now), node_id)
                    for node_id in self._by_tag.get(tag, ())
                    if not node_id.startswith(MODEL_PREFIX)
                ]
                rated.sort(reverse=True)
                cached = self._leaders[tag] = (now, [node_id for _, node_id in rated[:LEADERS]])
            out += [node_id for node_id in cached[1] if node_id not in out]
        return out

    def keys(self) -> list[tuple[str, str]]:
        """Every (node_id, tag) with a tally."""
        return sorted(self._tallies)

    def take_dirty(self) -> list[tuple[str, str, float, float, float]]:
        """Changed rows since the last call, for the store to persist."""
        rows = []
        for key in sorted(self._dirty):
            t = self._tallies[key]
            rows.append((key[0], key[1], t.wins, t.trials, t.updated))
        self._dirty.clear()
        return rows
