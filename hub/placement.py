"""Where a request's attempts go, and on what terms, with no I/O (no MQTT, no asyncio).

The request machine asks for nodes (``lifecycle.Dispatch``); ``Placement.place`` answers with
one of three decisions, and the hub carries it out:

* ``Assign``: send the request to these nodes (and, when fewer were free than wanted, a
  ``Shortfall`` for the rest, so the machine goes on with the nodes it has);
* ``Wait``: every eligible node is full, or nodes are still coming back (after a reconnect, or
  paused by their guard): wait for capacity or the deadline;
* ``Shortfall``: no node can take it, and why, for the machine to fail the request with
  (unless an earlier attempt's own failure says more).

The rules:

* A node must serve the request's model and have the capabilities it needs (``needs``).
* A private request goes only to the nodes its owner trusts (the set is read by the hub).
* Probation: a new node never works a request alone while a proven node could join it.
* Each attempt gets ``max_tokens`` (the request's, or what the node can write before the
  deadline), a timeout from the node's speed, and a quiet window when it promised progress.
"""

from __future__ import annotations

from dataclasses import dataclass

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import ErrorInfo, PromptRequest

from .config import HubConfig
from .intake import default_max_tokens
from .registry import SCAN_ALL, NodeRecord, Registry, can_serve
from .scheduler import Scheduler
from .trust import Trust


@dataclass(frozen=True, slots=True)
class Shortfall:
    """``missing`` of the wanted nodes cannot be had, because of ``error``."""

    missing: int
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class Assign:
    """Send the request to ``nodes``; ``short`` says what is missing when fewer were free."""

    nodes: tuple[NodeRecord, ...]
    short: Shortfall | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Nodes that could take the request are full or coming back: wait in line for them."""


Decision = Assign | Wait | Shortfall


@dataclass(frozen=True, slots=True)
class Terms:
    """What one attempt is given: its length, its time, and how long it may show no progress."""

    max_tokens: int | None
    timeout_s: float
    quiet_s: float | None


def needs(req: PromptRequest) -> frozenset[str]:
    """The capabilities (``Announce.capabilities``) a node must have to serve ``req``. Streaming
    is not one: a node that cannot stream answers whole, and the hub streams that in one piece."""
    wanted: set[str] = set()
    if req.kind in ("embed", "complete"):
        wanted.add(req.kind)
    if req.tools and req.tool_choice != "none":
        wanted.add("tools")
    if req.wants_json() is not None:
        wanted.add("json_schema")
    return frozenset(wanted)


@dataclass(frozen=True, slots=True)
class Placement:
    config: HubConfig
    registry: Registry
    scheduler: Scheduler
    trust: Trust

    def place(
        self,
        req: PromptRequest,
        count: int,
        exclude: frozenset[str],
        *,
        trusted: frozenset[str],
        now: float,
        settling: bool,
    ) -> Decision:
        """Up to ``count`` nodes for ``req``, none in ``exclude``. ``trusted``: the nodes a private
        request may go to; ``settling``: the hub just (re)connected and nodes are still
        reappearing, so an empty swarm is not yet a reason to fail."""
        tried = exclude
        if req.private:
            exclude |= frozenset(self.registry.nodes) - trusted
        wanted = needs(req)
        free = self.registry.free(model=req.model, exclude=exclude, now=now, needs=wanted, count=count)
        if len(self.registry.nodes) > SCAN_ALL:
            free += self._free_leaders(req, exclude, wanted, now, free, trusted)
        if not free:
            # Every node that could take it is busy, or nodes are coming back: wait in line. With
            # every node paused for now (too hot, switching models) the request waits for one to
            # come back too, up to its deadline, rather than failing at once.
            if (
                settling
                or self.registry.any_eligible(model=req.model, exclude=exclude, now=now, needs=wanted)
                or self.registry.resting(model=req.model, exclude=exclude, now=now, needs=wanted)
            ):
                return Wait()
            if req.private:
                error = ErrorInfo(
                    code=ErrorCode.NO_ELIGIBLE_NODES,
                    message="no node trusted with private requests is online (swarm-hub enroll NODE --trusted)",
                    retry_after_s=5.0,
                )
            else:
                error = self.why_no_nodes(req.model, tried, now, wanted)
            return Shortfall(count, error)
        picked = self.scheduler.pick(free, count, tags=req.all_tags(), now=now, model=req.model)
        picked = self.with_a_proven_node(picked, free, req, now)
        if len(picked) >= count:
            return Assign(tuple(picked))
        error = ErrorInfo(
            code=ErrorCode.NO_ELIGIBLE_NODES,
            message=f"only {len(picked)} of {count} wanted nodes were free",
            retry_after_s=5.0,
        )
        return Assign(tuple(picked), Shortfall(count - len(picked), error))

    def _free_leaders(
        self,
        req: PromptRequest,
        exclude: frozenset[str],
        wanted: frozenset[str],
        now: float,
        found: list[NodeRecord],
        trusted: frozenset[str],
    ) -> list[NodeRecord]:
        """In a big swarm, where only some free nodes are weighed: the free ones that lead the
        request's tags too, so tag routing still finds its best nodes."""
        tags = req.all_tags()
        if not tags:
            return []
        seen = {rec.node_id for rec in found}
        out = []
        for node_id in self.scheduler.winrates.leaders(tags, now):
            rec = self.registry.nodes.get(node_id)
            if (
                rec is not None
                and node_id not in seen
                and self.could_take(rec, req, exclude, now, wanted=wanted, trusted=trusted)
            ):
                seen.add(node_id)
                out.append(rec)
        return out

    def could_take(
        self,
        node: NodeRecord,
        req: PromptRequest,
        exclude: frozenset[str],
        now: float,
        *,
        wanted: frozenset[str] | None = None,
        trusted: frozenset[str] = frozenset(),
    ) -> bool:
        """Whether ``node`` has a free place for an attempt of ``req`` (of any of its models,
        across models), not being in ``exclude``. ``wanted``: ``needs(req)``, when known;
        ``trusted``: the nodes a private request may go to."""
        if node.node_id in exclude or node.inflight >= node.capacity or (req.private and node.node_id not in trusted):
            return False
        if not node.available(now, self.registry.heartbeat_timeout_s) or node.announce is None:
            return False
        wanted = needs(req) if wanted is None else wanted
        if req.diverse or req.models:
            pool = req.models or [m.name for m in node.announce.served()]
            return any(can_serve(node, m, wanted) for m in pool)
        return can_serve(node, req.model, wanted)

    def terms(self, node: NodeRecord, req: PromptRequest, remaining: float) -> Terms:
        """The terms of an attempt of ``req`` on ``node``, ``remaining`` seconds before the
        request's deadline."""
        max_tokens = req.params.max_tokens
        if max_tokens is None and req.kind != "embed":
            max_tokens = self.default_length(node, remaining)
        timeout = self.attempt_timeout(node, max_tokens, remaining, load_s=node.load_s(req.model))
        return Terms(max_tokens, timeout, self.quiet_window(node))

    def with_a_proven_node(
        self, picked: list[NodeRecord], eligible: list[NodeRecord], req: PromptRequest, now: float
    ) -> list[NodeRecord]:
        """Probation: a new node never works a request alone while a proven node could join it.
        In a race the proven node runs alongside; in best_of_n it takes the last seat. With no
        proven node free (a new swarm), new nodes work alone: they have to start somewhere."""
        if not picked or not all(self.trust.on_probation(n.node_id) for n in picked):
            return picked
        proven = [n for n in eligible if n not in picked and not self.trust.on_probation(n.node_id)]
        extra = self.scheduler.pick(proven, 1, tags=req.all_tags(), now=now, model=req.model)
        if not extra:
            return picked
        if req.strategy == "best_of_n" and len(picked) >= 2:
            return [*picked[:-1], *extra]
        return [*picked, *extra]

    def quiet_window(self, node: NodeRecord) -> float | None:
        """How long an attempt on ``node`` may show no progress: ``quiet_s``, and never less than
        a few of the node's own progress intervals; None for a node that promised none."""
        every = node.announce.progress_s if node.announce is not None else None
        return None if every is None else max(self.config.quiet_s, 3 * every)

    def default_length(self, node: NodeRecord, remaining: float) -> int:
        """``max_tokens`` for a chat request that gives none (``intake.default_max_tokens``), by
        the node's recent speed, else the one it measured at start."""
        heard = node.heartbeat.tokens_per_s if node.heartbeat is not None else None
        speed = heard or (node.announce.tokens_per_s if node.announce is not None else None)
        return default_max_tokens(self.config.limits.max_tokens, speed, remaining)

    def attempt_timeout(
        self, node: NodeRecord, max_tokens: int | None, remaining: float, *, load_s: float = 0.0
    ) -> float:
        """Time for the answer at the node's speed, with slack, plus ``load_s`` when the node
        must load the model first; within the request's ``remaining`` time."""
        announce = node.announce
        tokens = min(max_tokens or self.config.limits.max_tokens, announce.max_tokens if announce else 512)
        speed = max(announce.tokens_per_s if announce else 1.0, 1.0)
        expected = tokens / speed
        wanted = (
            max(self.config.attempt_min_s, self.config.attempt_slack * expected) + self.config.attempt_slack * load_s
        )
        return max(0.05, min(remaining, wanted))

    def why_no_nodes(self, model: str | None, exclude: frozenset[str], now: float, needs: frozenset[str]) -> ErrorInfo:
        online = self.registry.eligible(model=None, exclude=frozenset(), now=now)
        if not online:
            message = "no node is online"
        elif model is not None and not any(n.serves(model) for n in online):
            message = f"no online node serves model {model!r}"
        elif needs and not self.registry.eligible(model=model, exclude=frozenset(), now=now, needs=needs):
            return ErrorInfo(
                code=ErrorCode.UNSUPPORTED,
                message=f"no online node{' serving ' + repr(model) if model else ''} can do {', '.join(sorted(needs))}",
                retry_after_s=5.0,
            )
        elif exclude:
            message = "every eligible node has already been tried for this request"
        else:
            message = "no eligible node"
        return ErrorInfo(code=ErrorCode.NO_ELIGIBLE_NODES, message=message, retry_after_s=5.0)
