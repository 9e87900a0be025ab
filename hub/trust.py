"""How far the hub trusts each node, from what its work has looked like. No I/O.

A node's trust moves towards 1 with every clean answer and towards 0 with every bad outcome,
by ``step`` of the distance each time (an exponential moving average, so old history fades):

- bad: an answer that came too late (``deadline_exceeded``), a crash or engine failure mid-task
  (``engine_error``, ``node_lost``), and an answer that lost every ranking of a ``best_of_n``;
- clean: any other answer;
- neutral: refusals that cost nothing (``node_busy``, ``node_paused``, ``node_stopping``).

New nodes start at ``start`` and on **probation** until they have finished ``probation_tasks``
answers: the hub never lets a probation node be the only one on a request while a node past
probation is free to join it. Trust is rebuilt from the ledger when the hub starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nova_swarm.broker.contract.errors import ErrorCode

BAD_CODES = frozenset({ErrorCode.DEADLINE_EXCEEDED.value, ErrorCode.ENGINE_ERROR.value, ErrorCode.NODE_LOST.value})


@dataclass(frozen=True, slots=True)
class TrustConfig:
    start: float = 0.5
    step: float = 0.1
    probation_tasks: int = 5


@dataclass
class Trust:
    config: TrustConfig = field(default_factory=TrustConfig)
    _scores: dict[str, float] = field(default_factory=dict)
    _answered: dict[str, int] = field(default_factory=dict)

    def score(self, node_id: str) -> float:
        return self._scores.get(node_id, self.config.start)

    def on_probation(self, node_id: str) -> bool:
        return self._answered.get(node_id, 0) < self.config.probation_tasks

    def _move(self, node_id: str, target: float) -> None:
        current = self.score(node_id)
        self._scores[node_id] = current + self.config.step * (target - current)

    def answered(self, node_id: str, *, lost_every_ranking: bool = False) -> None:
        self._answered[node_id] = self._answered.get(node_id, 0) + 1
        self._move(node_id, 0.0 if lost_every_ranking else 1.0)

    def failed(self, node_id: str, code: str) -> None:
        if code in BAD_CODES:
            self._move(node_id, 0.0)

    def record(self, body: Mapping[str, Any]) -> None:
        """One finished task, as its receipt body has it (live, and when replaying the ledger)."""
        node = str(body["node_id"])
        if body.get("ok"):
            rank, ranked = body.get("rank"), body.get("ranked")
            last = isinstance(rank, int) and isinstance(ranked, int) and ranked >= 2 and rank == ranked
            self.answered(node, lost_every_ranking=last)
        elif isinstance(body.get("error_code"), str):
            self.failed(node, str(body["error_code"]))

    def replay(self, bodies: Iterable[Mapping[str, Any]]) -> int:
        """Rebuild from ledger receipt bodies, oldest first; returns how many were read."""
        count = 0
        for body in bodies:
            self.record(body)
            count += 1
        return count
