"""Accounting: what follows from each settled attempt, told to observers. No I/O.

    settlement = Settlement(Asked.of(request, digest))      # one per request
    observers = Observers([LedgerObserver(...), WinRateObserver(...), ...])
    observers.tell(settlement.result_failed(result, ts=now))  # or request_answered, ...

An attempt settles twice over: its *result* is accounted for (a receipt, trust, credits, energy),
and, once the request is decided, its node's *win or loss* (the win rates). A failed result is
accounted for as it comes in, so trust moves before the request retries elsewhere; an answer
waits for the request to be decided, because its receipt says whether it won and where it
ranked. ``Settlement`` turns those moments into ``AttemptSettled`` events and keeps the two rules
that span them: a task's result is accounted for once however often it is delivered (QoS 1), and
a node's win or loss counts once per request.

Observers are shaped like dramatiq's middleware: every hook of ``Observer`` does nothing, and
each observer overrides the hooks it needs. Besides the attempt hook there are two for the
request as a whole (answered, failed), which feed the metrics window, and one for a node's time
online, which earns it uptime credit. ``Observers`` tells them all, in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import ModelInfo, PromptRequest, TaskResult

from . import credits
from .ledger import Ledger, ReceiptBody, sha256_text
from .metrics import Window
from .registry import Registry
from .trust import Trust
from .winrate import WinRates, model_key


@dataclass(frozen=True, slots=True)
class Asked:
    """What accounting needs of a request: never its text."""

    #: the request's hash (``journal.digest``): its receipts' prompt hash
    digest: str
    strategy: str
    tags: tuple[str, ...]
    private: bool

    @classmethod
    def of(cls, request: PromptRequest, digest: str) -> Asked:
        return cls(digest=digest, strategy=request.strategy, tags=request.all_tags(), private=request.private)


@dataclass(frozen=True, slots=True)
class AttemptSettled:
    """One attempt of a request, settled."""

    asked: Asked
    node_id: str
    #: the node's result, the first time its task settles; None when there is no result to account
    #: for (the node lost without answering, or this result was accounted for before)
    result: TaskResult | None
    won: bool
    #: the request is decided and this is the node's one entry in it: its win rate moves
    decided: bool
    #: when it settled (wall clock)
    ts: float
    #: for best_of_n: where the reranker put this answer (1 is best), and among how many
    rank: int | None = None
    ranked: int | None = None
    #: the node was lost (gone offline or silent) holding this attempt: it dropped work it took
    lost: bool = False
    #: the model that gave this answer, when it gave one: its win rate moves too
    model: str | None = None


@dataclass
class Settlement:
    """One request's attempts as they settle, as events for the observers."""

    asked: Asked
    #: tasks whose result was accounted for: a result delivered twice counts once
    _accounted: set[str] = field(default_factory=set)

    def _first(self, result: TaskResult) -> TaskResult | None:
        if result.task_id in self._accounted:
            return None
        self._accounted.add(result.task_id)
        return result

    def result_failed(self, result: TaskResult, *, ts: float) -> list[AttemptSettled]:
        """A failed result, accounted for at once as not winning. Its node's loss counts when the
        request ends (among its losers): a hub that stops first records no loss."""
        first = self._first(result)
        if first is None:
            return []
        return [AttemptSettled(self.asked, result.node_id, first, won=False, decided=False, ts=ts)]

    def request_answered(
        self, answers: Sequence[TaskResult], losers: Iterable[str], *, ts: float
    ) -> list[AttemptSettled]:
        """The request is answered. ``answers`` best first (the first won; best_of_n ranks them
        all), ``losers`` the nodes whose attempts gave no answer. The winner's node wins once;
        every other node loses once."""
        winner = answers[0]
        ranked = len(answers) if self.asked.strategy == "best_of_n" else None
        counted: set[str] = set()
        events: list[AttemptSettled] = []
        for i, answer in enumerate(answers, 1):
            decided = answer.node_id not in counted  # the winner comes first: its node never loses
            counted.add(answer.node_id)
            result = self._first(answer)
            if result is None and not decided:
                continue
            events.append(
                AttemptSettled(
                    self.asked,
                    answer.node_id,
                    result,
                    won=answer is winner,
                    decided=decided,
                    ts=ts,
                    rank=i if ranked else None,
                    ranked=ranked,
                    model=answer.model,
                )
            )
        for node_id in sorted(set(losers) - counted):
            events.append(AttemptSettled(self.asked, node_id, None, won=False, decided=True, ts=ts))
        return events

    def request_failed(self, losers: Iterable[str], *, ts: float) -> list[AttemptSettled]:
        """The request failed: each of ``losers`` (the nodes that worked on it) lost."""
        return [AttemptSettled(self.asked, node_id, None, won=False, decided=True, ts=ts) for node_id in losers]

    def node_lost(self, node_id: str, *, ts: float) -> list[AttemptSettled]:
        """``node_id`` was lost while it held work of this request: it counts against its trust
        at once, once per request. Its loss in the win rates waits for the request's end."""
        return [AttemptSettled(self.asked, node_id, None, won=False, decided=False, ts=ts, lost=True)]


def receipt_body(event: AttemptSettled, result: TaskResult, announced: ModelInfo | None) -> ReceiptBody:
    """The receipt of a settled result. The model's hash and size are those the node announced,
    and only when the result names that model (or none): a node that switched models mid-task
    must not pass one model's work off as another's."""
    same_model = announced is not None and result.model in (None, announced.name)
    usage, timings = result.usage, result.timings
    return ReceiptBody(
        ts=event.ts,
        request_id=result.request_id,
        node_id=result.node_id,
        model=result.model or (announced.name if announced else None),
        model_sha256=announced.sha256 if announced and same_model else None,
        model_size_bytes=announced.size_bytes if announced and same_model else None,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        wall_ms=round(timings.queue_ms + timings.generate_ms, 2) if timings else 0.0,
        energy_j=result.energy_j,
        prompt_sha256=event.asked.digest,
        result_sha256=sha256_text(result.text) if result.ok and result.text is not None else None,
        strategy=event.asked.strategy,
        won=event.won,
        ok=result.ok,
        error_code=result.error.code.value if result.error else None,
        rank=event.rank,
        ranked=event.ranked,
        private=event.asked.private,
    )


class Observer:
    """Hears what the hub settles. Every hook here does nothing: override the ones you need."""

    def attempt_settled(self, event: AttemptSettled) -> None:
        """An attempt settled (``Settlement`` says when)."""

    def request_answered(self, at: float, latency_ms: float) -> None:
        """A request was answered; ``at`` is on the event loop's clock."""

    def request_failed(self, at: float, code: ErrorCode) -> None:
        """A request was refused or failed, or its client cancelled it (``code`` says which)."""

    def node_up(self, node_id: str, seconds: float) -> None:
        """``node_id`` was online and taking work for ``seconds`` more."""


class Observers(Observer):
    """Several observers as one: each hook tells every observer, in order."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.observers = list(observers)

    def tell(self, events: Iterable[AttemptSettled]) -> None:
        for event in events:
            self.attempt_settled(event)

    def attempt_settled(self, event: AttemptSettled) -> None:
        for observer in self.observers:
            observer.attempt_settled(event)

    def request_answered(self, at: float, latency_ms: float) -> None:
        for observer in self.observers:
            observer.request_answered(at, latency_ms)

    def request_failed(self, at: float, code: ErrorCode) -> None:
        for observer in self.observers:
            observer.request_failed(at, code)

    def node_up(self, node_id: str, seconds: float) -> None:
        for observer in self.observers:
            observer.node_up(node_id, seconds)


class LedgerObserver(Observer):
    """Each settled result gets a receipt in the ledger, which moves its node's trust and
    credits. A hub without a ledger (no signing key) keeps trust alone, from the same body.
    A node lost holding work loses trust; time online earns uptime credit (with a ledger)."""

    def __init__(
        self,
        *,
        registry: Registry,
        trust: Trust,
        ledger: Ledger | None = None,
        accounts: dict[str, credits.Contribution] | None = None,
        rates: credits.CreditRates | None = None,
    ) -> None:
        self.registry = registry
        self.trust = trust
        self.ledger = ledger
        #: shared with the hub, which publishes them as metrics
        self.accounts = accounts if accounts is not None else {}
        self.rates = rates or credits.CreditRates()

    def attempt_settled(self, event: AttemptSettled) -> None:
        result = event.result
        if result is None:
            if event.lost:
                self.trust.failed(event.node_id, ErrorCode.NODE_LOST.value)
            return
        rec = self.registry.nodes.get(result.node_id)
        served = rec.announce.served() if rec is not None and rec.announce is not None else []
        # The model that answered, among those the node serves (the one it used last otherwise).
        announced = next((m for m in served if m.name == result.model), served[0] if served else None)
        body = receipt_body(event, result, announced)
        if self.ledger is None:
            self.trust.record(asdict(body))
            return
        receipt = self.ledger.append(body)
        self.trust.record(receipt.body)
        credits.record(self.accounts, receipt.body, self.rates)

    def node_up(self, node_id: str, seconds: float) -> None:
        if self.ledger is None:
            return
        self.ledger.credit_uptime(node_id, seconds)
        self.accounts.setdefault(node_id, credits.Contribution(node_id)).uptime_s += seconds


class WinRateObserver(Observer):
    """A decided request moves the win rate of each node that worked on it, for its tags, and
    of each model that answered it (``winrate.model_key``): the swarm learns which model answers
    which kind of prompt best, as well as which node."""

    def __init__(self, winrates: WinRates) -> None:
        self.winrates = winrates

    def attempt_settled(self, event: AttemptSettled) -> None:
        if not event.decided:
            return
        self.winrates.record(event.node_id, event.asked.tags, won=event.won, now=event.ts)
        if event.model:
            self.winrates.record(model_key(event.model), event.asked.tags, won=event.won, now=event.ts)


class EnergyObserver(Observer):
    """Answers that carried energy add to their node's joules per token. Failed results do not:
    their tokens were not delivered."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def attempt_settled(self, event: AttemptSettled) -> None:
        result = event.result
        if result is None or not result.ok:
            return
        rec = self.registry.nodes.get(result.node_id)
        if rec is not None:
            rec.energy.add(result.energy_j, result.usage.completion_tokens if result.usage else 0)


class WindowObserver(Observer):
    """Settled requests go in the metrics window (the last minute, and totals since start)."""

    def __init__(self, window: Window) -> None:
        self.window = window

    def request_answered(self, at: float, latency_ms: float) -> None:
        self.window.answered(at, latency_ms)

    def request_failed(self, at: float, code: ErrorCode) -> None:
        self.window.failed(at, code)


def for_hub(
    registry: Registry,
    trust: Trust,
    winrates: WinRates,
    window: Window,
    *,
    ledger: Ledger | None,
    accounts: dict[str, credits.Contribution],
    rates: credits.CreditRates,
) -> Observers:
    """The hub's observers: receipts, trust and credits; win rates; energy; the metrics window."""
    return Observers(
        [
            LedgerObserver(registry=registry, trust=trust, ledger=ledger, accounts=accounts, rates=rates),
            WinRateObserver(winrates),
            EnergyObserver(registry),
            WindowObserver(window),
        ]
    )
