"""Credits: what each node (and each owner) has given the swarm, computed from the ledger.

    credits = Σ over answered tasks  (prompt + completion tokens) / 1000 × per_1k_tokens × size multiplier
            + hours online and not paused × per_hour_online

    size multiplier = max(1, model file size / size_unit_mb)   (bigger models cost the phone more)

A task earns credits whether or not its answer won: the node did the work. Failed tasks earn
nothing. Tiers go by credits: bronze from 0, silver from 100, gold from 1,000, platinum from
10,000. The rates live in ``CreditRates`` and are printed by ``swarm-hub ledger --rates``.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .ledger import Receipt

TIERS: tuple[tuple[float, str], ...] = ((10_000.0, "platinum"), (1_000.0, "gold"), (100.0, "silver"), (0.0, "bronze"))


@dataclass(frozen=True, slots=True)
class CreditRates:
    per_1k_tokens: float = 1.0
    size_unit_mb: float = 250.0
    per_hour_online: float = 0.5

    def multiplier(self, size_bytes: int | None) -> float:
        if not size_bytes:
            return 1.0
        return max(1.0, size_bytes / 2**20 / self.size_unit_mb)

    def for_task(self, tokens: int, size_bytes: int | None) -> float:
        return tokens / 1000 * self.per_1k_tokens * self.multiplier(size_bytes)


def tier(credits: float) -> str:
    return next(name for floor, name in TIERS if credits >= floor)


@dataclass(slots=True)
class Contribution:
    """One node's, or one owner's, account."""

    name: str
    tasks: int = 0
    failed: int = 0
    tokens: int = 0
    wins: int = 0
    uptime_s: float = 0.0
    task_credits: float = 0.0
    nodes: set[str] = field(default_factory=set)

    def credits(self, rates: CreditRates) -> float:
        return round(self.task_credits + self.uptime_s / 3600 * rates.per_hour_online, 3)

    def tier(self, rates: CreditRates) -> str:
        return tier(self.credits(rates))

    def add(self, other: Contribution) -> None:
        self.tasks += other.tasks
        self.failed += other.failed
        self.tokens += other.tokens
        self.wins += other.wins
        self.uptime_s += other.uptime_s
        self.task_credits += other.task_credits
        self.nodes |= other.nodes | {other.name}


def record(accounts: dict[str, Contribution], body: Mapping[str, Any], rates: CreditRates) -> None:
    """Add one receipt's body to its node's account."""
    node = accounts.setdefault(str(body["node_id"]), Contribution(str(body["node_id"])))
    if not body["ok"]:
        node.failed += 1
        return
    tokens = int(body["prompt_tokens"]) + int(body["completion_tokens"])
    node.tasks += 1
    node.tokens += tokens
    node.wins += int(bool(body["won"]))
    size = body.get("model_size_bytes")
    node.task_credits += rates.for_task(tokens, size if isinstance(size, int) else None)


def by_node(
    receipts: Iterable[Receipt], rates: CreditRates, *, uptime_s: Mapping[str, float] | None = None
) -> dict[str, Contribution]:
    out: dict[str, Contribution] = {}
    for r in receipts:
        record(out, r.body, rates)
    for node_id, seconds in (uptime_s or {}).items():
        out.setdefault(node_id, Contribution(node_id)).uptime_s += seconds
    return out


def by_owner(nodes: Mapping[str, Contribution], owners: Mapping[str, str | None]) -> dict[str, Contribution]:
    """Nodes enrolled under an owner's name, added up (nodes with no owner are left out)."""
    out: dict[str, Contribution] = {}
    for node_id, account in nodes.items():
        owner = owners.get(node_id)
        if owner:
            out.setdefault(owner, Contribution(owner)).add(account)
    return out
