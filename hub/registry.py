"""The hub's view of its nodes, built from announce, status and heartbeat messages.

Liveness never trusts the broker: amqtt does not enforce keepalive, so a frozen node's Last
Will may never fire (BROKERS.md, defect 3). A node is available only while it is ``online`` and
has been heard from live (not through a retained message) within ``heartbeat_timeout_s``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from packaging.version import InvalidVersion, Version

from nova_swarm.broker.contract.messages import (
    Announce,
    Heartbeat,
    NodeRow,
    NodeState,
    NodeTable,
    PinReport,
    ServedModel,
    Status,
    decode,
)
from nova_swarm.broker.contract.topics import NodeTopic

TIMEOUT_REASON = "heartbeat timeout"

#: a guess at a model's load time before the node has measured one: a fixed cost, plus reading
#: its file from flash (a slow phone's; a laptop does better, and then reports what it took)
LOAD_BASE_S = 0.5
LOAD_BYTES_PER_S = 100 * 2**20


#: the recent answers a node's joules per token is taken over
ENERGY_WINDOW = 32

#: up to this many nodes, placement weighs every free one; above it, only those free the longest
#: (``Registry.free``), so that choosing a node costs the same with 100 nodes as with 10,000
SCAN_ALL = 64
#: how many free nodes placement weighs in a swarm bigger than ``SCAN_ALL``
FREE_SAMPLE = 16


@dataclass(slots=True)
class EnergyTally:
    """A node's recent answers that carried energy: joules per generated token over them.

    Answers without energy (an older node, no readable source, on the charger) and embeddings
    (no generated tokens) are left out rather than counted as free."""

    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=ENERGY_WINDOW))

    def add(self, energy_j: float | None, completion_tokens: int) -> None:
        if energy_j is not None and completion_tokens > 0:
            self.recent.append((energy_j, completion_tokens))

    def per_token(self) -> float | None:
        tokens = sum(t for _, t in self.recent)
        return round(sum(j for j, _ in self.recent) / tokens, 6) if tokens else None


@dataclass(slots=True)
class NodeRecord:
    node_id: str
    announce: Announce | None = None
    state: NodeState = NodeState.OFFLINE
    reason: str | None = None
    last_seen: float | None = None
    heartbeat: Heartbeat | None = None
    #: tasks the hub has assigned and not yet seen settled
    inflight: int = 0
    #: what the node last said about the pinned bundle and model
    bundle_report: PinReport | None = None
    model_report: PinReport | None = None
    energy: EnergyTally = field(default_factory=EnergyTally)
    #: an attempt of its went quiet (no progress: frozen, or off Wi-Fi with its socket half-open);
    #: it gets no new work until its next heartbeat says it is back
    quiet: bool = False

    @property
    def capacity(self) -> int:
        return (self.announce.slots + self.announce.queue_max) if self.announce else 0

    @property
    def slots(self) -> int:
        return self.announce.slots if self.announce else 1

    def serves(self, model: str) -> bool:
        """Whether the node has ``model`` and it fits the node's RAM."""
        an = self.announce
        return an is not None and any(m.name == model and m.fits is not False for m in an.served())

    def warm(self, model: str | None) -> bool:
        """Whether ``model`` (None: whatever the node runs) is in the node's memory now. A
        one-model node's model always is."""
        an = self.announce
        if an is None or model is None:
            return True
        return any(m.name == model and m.loaded is not False for m in an.served())

    def load_s(self, model: str | None) -> float:
        """Seconds the node is expected to spend loading ``model`` before a task on it starts:
        0 when it is warm; else its last measured load, or a guess from the file's size."""
        an = self.announce
        if an is None or self.warm(model):
            return 0.0
        info = next((m for m in an.served() if m.name == model), None)
        if info is None:
            return 0.0
        if info.load_s is not None:
            return info.load_s
        return LOAD_BASE_S + info.size_bytes / LOAD_BYTES_PER_S

    def available(self, now: float, timeout_s: float) -> bool:
        return (
            self.state is NodeState.ONLINE
            and not self.quiet
            and self.announce is not None
            and self.last_seen is not None
            and now - self.last_seen <= timeout_s
        )


@dataclass(frozen=True, slots=True)
class Pins:
    """What the swarm's retained manifests ask every node to run."""

    bundle: str | None = None
    model_name: str | None = None
    model_sha256: str | None = None
    model_tags: tuple[str, ...] = ()
    #: the pin's further models: (name, sha256, tags) each
    more: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def models_for(self, tags: Iterable[str]) -> list[tuple[str, str]]:
        """(name, sha256) of every pinned model a node carrying ``tags`` follows."""
        mine = set(tags)
        first = (self.model_name, self.model_sha256, self.model_tags)
        return [
            (name, sha)
            for name, sha, only in [first, *self.more]
            if name is not None and sha is not None and (not only or mine & set(only))
        ]

    def seen(self, signed: dict[str, object], *, bundle: bool) -> Pins:
        """These pins once a retained pin (``pins.unverified_signed``; {} when cleared) is seen:
        the bundle pin when ``bundle``, else the model pin. Fields of the wrong type read as unset."""
        if bundle:
            version = signed.get("version")
            return replace(self, bundle=version if isinstance(version, str) else None)
        name, sha, tags = _entry(signed)
        more = signed.get("more")
        extra = [_entry(m) for m in more if isinstance(m, dict)] if isinstance(more, list) else []
        return replace(
            self,
            model_name=name,
            model_sha256=sha,
            model_tags=tags,
            more=tuple((n, s, t) for n, s, t in extra if n is not None and s is not None),
        )


def _entry(signed: dict[str, object]) -> tuple[str | None, str | None, tuple[str, ...]]:
    name, sha, tags = signed.get("name"), signed.get("sha256"), signed.get("tags")
    return (
        name if isinstance(name, str) else None,
        sha if isinstance(sha, str) else None,
        tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else (),
    )


@dataclass(frozen=True, slots=True)
class Heard:
    """What a node's announce, status or heartbeat means for the hub."""

    #: the node lost the work it held, for this reason
    lost: str | None = None
    #: it may take work now: waiting requests should try again
    available: bool = False
    #: the node table changed: the hub's status has news
    changed: bool = False


def _mb(size: int | None) -> str:
    return "an unknown amount" if size is None else f"{size / 2**20:.0f} MB"


def _older(running: str, pinned: str) -> bool:
    try:
        return Version(running) < Version(pinned)
    except InvalidVersion:
        return running != pinned


def _why(report: PinReport | None, wanted: str, rec: NodeRecord) -> str:
    if report is not None and report.wanted == wanted and report.outcome != "applied":
        return f"{report.outcome}" + (f": {report.reason}" if report.reason else "")
    if rec.state is NodeState.OFFLINE:
        return "offline"
    return "has not answered the pin yet"


def lag(rec: NodeRecord, pins: Pins) -> str | None:
    """Why ``rec`` does not run what is pinned, in words, or None when it does."""
    an = rec.announce
    if an is None:
        return None
    reasons = []
    if pins.bundle is not None and _older(an.agent_version, pins.bundle):
        reasons.append(
            f"runs {an.agent_version}, bundle {pins.bundle} is pinned ({_why(rec.bundle_report, pins.bundle, rec)})"
        )
    wanted = pins.models_for(an.tags)
    served = {m.sha256 for m in an.served()}
    missing = [name for name, sha in wanted if sha not in served]
    if missing:
        # What the node reports it is after: one model's name, or a set's names joined (updater.py).
        why = _why(rec.model_report, " + ".join(name for name, _ in wanted), rec)
        reasons.append(f"serves {', '.join(m.name for m in an.served())}, {', '.join(missing)} is pinned ({why})")
    return "; ".join(reasons) or None


def can_serve(rec: NodeRecord, model: str | None, needs: frozenset[str]) -> bool:
    """Whether ``rec`` serves ``model`` (any, when None) and can do ``needs``."""
    return (model is None or rec.serves(model)) and (
        not needs or (rec.announce is not None and needs <= set(rec.announce.capabilities))
    )


@dataclass
class Registry:
    heartbeat_timeout_s: float = 35.0
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    pins: Pins = field(default_factory=Pins)
    _dirty: set[str] = field(default_factory=set)
    #: nodes that may have a free place, those free the longest first: every node is put here
    #: when it is heard from or a place of its frees up (``vacated``), and dropped when it is
    #: found full or unavailable, so a full swarm's index holds only what just freed up
    _maybe_free: dict[str, NodeRecord] = field(default_factory=dict)

    def record(self, node_id: str) -> NodeRecord:
        rec = self.nodes.get(node_id)
        if rec is None:
            rec = self.nodes[node_id] = NodeRecord(node_id)
        self._dirty.add(node_id)
        self._maybe_free.setdefault(node_id, rec)
        return rec

    def load(self, records: Iterable[NodeRecord]) -> None:
        """Restore from the store. Nothing restored counts as live until the node speaks again."""
        for rec in records:
            rec.inflight = 0
            self.nodes[rec.node_id] = rec
            self._maybe_free[rec.node_id] = rec

    def vacated(self, rec: NodeRecord) -> None:
        """A place on ``rec`` freed up."""
        self._maybe_free.setdefault(rec.node_id, rec)

    def hear(self, node_id: str, kind: NodeTopic, payload: bytes, *, retain: bool, now: float) -> Heard:
        """Take in a message a node sent on its ``kind`` topic (announce, status or heartbeat).
        A message naming another node than its topic's is ignored. Raises ``ProtocolError`` when
        the payload is malformed."""
        if kind is NodeTopic.HEARTBEAT:
            heartbeat = decode(Heartbeat, payload)
            back = heartbeat.node_id == node_id and self.on_heartbeat(heartbeat, now=now)
            return Heard(available=back, changed=back)
        if kind is NodeTopic.ANNOUNCE:
            announce = decode(Announce, payload)
            if announce.node_id != node_id:
                return Heard()
            gone = self.on_announce(announce, live=not retain, now=now)
            return Heard(lost="re-announced" if gone else None, available=True, changed=True)
        if kind is NodeTopic.STATUS and payload:  # an empty one is a cleared retained status
            status = decode(Status, payload)
            if status.node_id != node_id:
                return Heard()
            unavailable = self.on_status(status, live=not retain, now=now)
            # A paused node takes no new work but finishes what it runs: only a node that went
            # offline loses its attempts.
            offline = unavailable and status.state is NodeState.OFFLINE
            return Heard(
                lost=f"went offline ({status.reason or 'no reason given'})" if offline else None,
                available=status.state is NodeState.ONLINE,
                changed=True,
            )
        return Heard()

    # Each on_* returns True when the node just stopped being available (its tasks must move).

    def on_announce(self, announce: Announce, *, live: bool, now: float) -> bool:
        was = self._available(announce.node_id, now)
        rec = self.record(announce.node_id)
        rec.announce = announce
        if live:
            rec.last_seen = now
        return was and not rec.available(now, self.heartbeat_timeout_s)

    def on_status(self, status: Status, *, live: bool, now: float) -> bool:
        was = self._available(status.node_id, now)
        rec = self.record(status.node_id)
        rec.state = status.state
        rec.reason = status.reason
        if status.state is not NodeState.OFFLINE:  # the Last Will knows nothing of pins
            rec.bundle_report, rec.model_report = status.bundle, status.model_pin
        if live:
            rec.last_seen = now
        return was and not rec.available(now, self.heartbeat_timeout_s)

    def on_heartbeat(self, heartbeat: Heartbeat, *, now: float) -> bool:
        """Returns True when the node just became available (new, or back from silence)."""
        was = self._available(heartbeat.node_id, now)
        rec = self.record(heartbeat.node_id)
        rec.heartbeat = heartbeat
        rec.last_seen = now
        rec.quiet = False
        if rec.state is NodeState.OFFLINE and rec.reason == TIMEOUT_REASON:
            # It was only silent (SIGSTOP, a Wi-Fi gap), not gone: take it back, as it says it is.
            rec.state = NodeState.PAUSED if heartbeat.paused else NodeState.ONLINE
            rec.reason = "paused by its guard" if heartbeat.paused else None
        return not was and rec.available(now, self.heartbeat_timeout_s)

    def expire(self, now: float) -> list[str]:
        """Mark online nodes that went silent as offline; return their ids."""
        gone = []
        for rec in self.nodes.values():
            if (
                rec.state is not NodeState.OFFLINE  # a paused node still heartbeats
                and rec.last_seen is not None
                and now - rec.last_seen > self.heartbeat_timeout_s
            ):
                rec.state = NodeState.OFFLINE
                rec.reason = TIMEOUT_REASON
                self._dirty.add(rec.node_id)
                gone.append(rec.node_id)
        return gone

    def eligible(
        self, *, model: str | None, exclude: frozenset[str], now: float, needs: frozenset[str] = frozenset()
    ) -> list[NodeRecord]:
        """Online nodes that may take work: serving ``model`` (any when None) and able to do
        ``needs`` (announced capabilities such as ``embed``)."""
        return self._matching(model, exclude, needs, lambda rec: rec.available(now, self.heartbeat_timeout_s))

    def free(
        self, *, model: str | None, exclude: frozenset[str], now: float, needs: frozenset[str], count: int
    ) -> list[NodeRecord]:
        """Available nodes with a free place that can take a request for ``model`` needing
        ``needs``, none in ``exclude``: every one, in a swarm of up to ``SCAN_ALL`` nodes; in a
        bigger one, ``count`` or ``FREE_SAMPLE`` of them (the more), those free the longest, so
        the work does not grow with the swarm (a model few nodes serve may cost a longer look)."""
        timeout = self.heartbeat_timeout_s
        if len(self.nodes) <= SCAN_ALL:
            return [
                rec
                for rec in self.nodes.values()
                if rec.inflight < rec.capacity
                and rec.node_id not in exclude
                and rec.available(now, timeout)
                and can_serve(rec, model, needs)
            ]
        found: list[NodeRecord] = []
        stale: list[str] = []
        want = max(count, FREE_SAMPLE)
        for node_id, rec in self._maybe_free.items():
            if rec.inflight >= rec.capacity or not rec.available(now, timeout):
                stale.append(node_id)
            elif node_id not in exclude and can_serve(rec, model, needs):
                found.append(rec)
                if len(found) >= want:
                    break
        for node_id in stale:
            del self._maybe_free[node_id]
        return found

    def any_eligible(
        self, *, model: str | None, exclude: frozenset[str], now: float, needs: frozenset[str] = frozenset()
    ) -> bool:
        """Whether any node could take the request, free or not: stops at the first."""
        timeout = self.heartbeat_timeout_s
        return any(
            rec.node_id not in exclude and rec.available(now, timeout) and can_serve(rec, model, needs)
            for rec in self.nodes.values()
        )

    def resting(
        self, *, model: str | None, exclude: frozenset[str], now: float, needs: frozenset[str] = frozenset()
    ) -> list[NodeRecord]:
        """Nodes that are paused but alive (their guard, or a model switch), or went quiet but are
        not yet written off: work can wait for them."""

        def paused_and_alive(rec: NodeRecord) -> bool:
            heard = rec.last_seen is not None and now - rec.last_seen <= self.heartbeat_timeout_s
            # A node that went quiet may be back in a moment (a Wi-Fi gap): work waits for it
            # too, until its heartbeats have been missing for the whole timeout.
            return (rec.state is NodeState.PAUSED or (rec.quiet and rec.state is NodeState.ONLINE)) and heard

        return self._matching(model, exclude, needs, paused_and_alive)

    def _matching(
        self,
        model: str | None,
        exclude: frozenset[str],
        needs: frozenset[str],
        state_ok: Callable[[NodeRecord], bool],
    ) -> list[NodeRecord]:
        return [
            rec
            for rec in self.nodes.values()
            if rec.node_id not in exclude and state_ok(rec) and can_serve(rec, model, needs)
        ]

    def servable(self, now: float) -> list[str]:
        """The models online nodes can serve now (that fit them), by name."""
        online = self.eligible(model=None, exclude=frozenset(), now=now)
        return sorted({m.name for rec in online if rec.announce for m in rec.announce.served() if m.fits is not False})

    def known_models(self) -> set[str]:
        """Every model any node has announced, whether it fits that node or not."""
        return {m.name for rec in self.nodes.values() if rec.announce is not None for m in rec.announce.served()}

    def too_large(self, model: str) -> str | None:
        """Why no node can ever take ``model``, when every node that has it said it does not
        fit its RAM: the model, what it needs, and what those nodes can give. None otherwise."""
        if any(rec.serves(model) for rec in self.nodes.values()):
            return None  # the usual case, on every request that names a model: stops at the first
        having = [
            (rec, m)
            for rec in self.nodes.values()
            if rec.announce is not None
            for m in rec.announce.served()
            if m.name == model
        ]
        if not having:
            return None
        having.sort(key=lambda rm: rm[0].node_id)
        needs = max(m.needs_bytes or 0 for _, m in having)
        rooms = ", ".join(
            f"{rec.node_id} has a budget of {_mb(rec.announce.ram_budget_bytes)}"
            if rec.announce is not None and rec.announce.ram_budget_bytes is not None
            else f"{rec.node_id} has too little free RAM"
            for rec, _ in having
        )
        return f"model {model!r} needs ~{_mb(needs)} of RAM, more than any node that has it can give ({rooms})"

    def counts(self, now: float) -> dict[str, int]:
        counts = {"online": 0, "paused": 0, "offline": 0}
        for rec in self.nodes.values():
            if rec.available(now, self.heartbeat_timeout_s):
                counts["online"] += 1
            elif rec.state is NodeState.PAUSED:
                counts["paused"] += 1
            else:
                counts["offline"] += 1
        return counts

    def table(self, now: float) -> NodeTable:
        rows = []
        for rec in sorted(self.nodes.values(), key=lambda r: r.node_id):
            hb, an = rec.heartbeat, rec.announce
            state = rec.state
            if state is NodeState.ONLINE and not rec.available(now, self.heartbeat_timeout_s):
                state = NodeState.OFFLINE
            rows.append(
                NodeRow(
                    node_id=rec.node_id,
                    state=state,
                    model=an.model.name if an else None,
                    tokens_per_s=(hb.tokens_per_s if hb and hb.tokens_per_s else (an.tokens_per_s if an else None)),
                    battery_pct=hb.battery_pct if hb else None,
                    charging=hb.charging if hb else None,
                    temp_c=hb.temp_c if hb else None,
                    busy=rec.inflight,
                    last_seen=rec.last_seen,
                    agent_version=an.agent_version if an else None,
                    tags=list(an.tags) if an else [],
                    lag=lag(rec, self.pins),
                    joules_per_token=rec.energy.per_token(),
                    ctx=an.model.ctx if an else None,
                    max_tokens=an.max_tokens if an else None,
                    capabilities=list(an.capabilities) if an else [],
                    models=[
                        ServedModel(
                            name=m.name,
                            loaded=m.loaded is not False,
                            fits=m.fits is not False,
                            needs_mb=round(m.needs_bytes / 2**20, 1) if m.needs_bytes is not None else None,
                            load_s=m.load_s,
                        )
                        for m in (an.served() if an else [])
                    ],
                    swaps=hb.swaps if hb else 0,
                )
            )
        return NodeTable(ts=now, nodes=rows)

    def take_dirty(self) -> list[NodeRecord]:
        out = [self.nodes[n] for n in sorted(self._dirty) if n in self.nodes]
        self._dirty.clear()
        return out

    def _available(self, node_id: str, now: float) -> bool:
        rec = self.nodes.get(node_id)
        return rec is not None and rec.available(now, self.heartbeat_timeout_s)
