"""Accounting, driven directly: settled attempts become receipts, trust, credits, win rates and
energy, each exactly once, with no broker and no hub."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import Announce, ErrorInfo, ModelInfo, TaskResult, Timings, Usage
from nova_swarm.broker.contract.signing import SigningKey
from nova_swarm.hub import credits
from nova_swarm.hub.accounting import (
    Asked,
    AttemptSettled,
    Observer,
    Observers,
    Settlement,
    WindowObserver,
    WinRateObserver,
    for_hub,
)
from nova_swarm.hub.ledger import Ledger, receipts, sha256_text
from nova_swarm.hub.metrics import Window
from nova_swarm.hub.registry import Registry
from nova_swarm.hub.trust import Trust
from nova_swarm.hub.winrate import WinRates

TS = 1_795_450_000.0
SHA = "5a" * 32
RACE = Asked(digest="d1" * 32, strategy="race", tags=("math",), private=False)
BEST_OF = Asked(digest="d2" * 32, strategy="best_of_n", tags=("math",), private=True)


def announce(node_id: str) -> Announce:
    model = ModelInfo(name="m", sha256=SHA, size_bytes=300 * 2**20, ctx=512)
    return Announce(
        node_id=node_id, model=model, threads=1, tokens_per_s=10.0, ram_total_mb=None, device="laptop",
        agent_version="0", slots=1, queue_max=1, max_tokens=64, max_temperature=1.0, ts=0.0,
    )  # fmt: skip


def result(
    task_id: str,
    node_id: str,
    *,
    ok: bool = True,
    text: str = "forty-two",
    model: str | None = "m",
    energy_j: float | None = None,
    code: ErrorCode = ErrorCode.ENGINE_ERROR,
) -> TaskResult:
    return TaskResult(
        task_id=task_id,
        request_id="req-1",
        node_id=node_id,
        ok=ok,
        text=text if ok else "",
        model=model,
        usage=Usage(prompt_tokens=30, completion_tokens=70, total_tokens=100),
        timings=Timings(queue_ms=1.5, generate_ms=98.25),
        error=None if ok else ErrorInfo(code=code, message="boom"),
        energy_j=energy_j,
    )


class Recorder(Observer):
    """Overrides the attempt hook only: the request hooks it inherits do nothing."""

    def __init__(self) -> None:
        self.events: list[AttemptSettled] = []

    def attempt_settled(self, event: AttemptSettled) -> None:
        self.events.append(event)


@dataclass
class Books:
    """The hub's accounting, without the hub: its observers and what they keep."""

    ledger: Ledger | None
    registry: Registry = field(default_factory=Registry)
    trust: Trust = field(default_factory=Trust)
    accounts: dict[str, credits.Contribution] = field(default_factory=dict)
    winrates: WinRates = field(default_factory=WinRates)
    window: Window = field(default_factory=Window)
    recorder: Recorder = field(default_factory=Recorder)

    def __post_init__(self) -> None:
        for node_id in ("a", "b", "c"):
            self.registry.record(node_id).announce = announce(node_id)

    @property
    def observers(self) -> Observers:
        """The hub's own set (``accounting.for_hub``), and a recorder after them."""
        hubs = for_hub(
            self.registry,
            self.trust,
            self.winrates,
            self.window,
            ledger=self.ledger,
            accounts=self.accounts,
            rates=credits.CreditRates(),
        )
        return Observers([*hubs.observers, self.recorder])

    def tell(self, events: list[AttemptSettled]) -> None:
        self.observers.tell(events)

    def bodies(self) -> list[dict[str, object]]:
        assert self.ledger is not None
        self.ledger.flush()
        return [r.body for r in receipts(self.ledger.path)]

    def record(self, node_id: str) -> tuple[float, float]:
        """(1 + wins, 1 + losses) of ``node_id`` for the tag ``math``."""
        return self.winrates.posterior(node_id, ["math"], TS)


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    ledger = Ledger(tmp_path / "ledger.sqlite", SigningKey.generate())
    yield Books(ledger)
    ledger.close()


def test_a_failed_result_gets_one_receipt_however_often_it_comes(books: Books) -> None:
    settlement = Settlement(RACE)
    failed = result("t1", "a", ok=False, energy_j=5.0)
    books.tell(settlement.result_failed(failed, ts=TS))
    books.tell(settlement.result_failed(failed, ts=TS + 1))  # QoS 1 delivered it again
    [body] = books.bodies()
    assert body["request_id"] == "req-1" and body["node_id"] == "a" and body["ok"] is False and body["won"] is False
    assert body["error_code"] == "engine_error" and body["result_sha256"] is None
    assert body["prompt_sha256"] == RACE.digest and body["ts"] == TS
    # Its node's loss waits for the request to end; a failed result carries no energy.
    assert books.record("a") == (1.0, 1.0)
    assert books.registry.nodes["a"].energy.per_token() is None


def test_an_answered_race_receipts_its_answers_and_moves_every_win_rate_once(books: Books) -> None:
    settlement = Settlement(RACE)
    books.tell(settlement.result_failed(result("t1", "c", ok=False), ts=TS))
    win, late = result("t2", "a", text="first"), result("t3", "b", text="second")
    books.tell(settlement.request_answered([win, late], ("c",), ts=TS))
    bodies = books.bodies()
    assert [(b["node_id"], b["ok"], b["won"]) for b in bodies] == [
        ("c", False, False),
        ("a", True, True),
        ("b", True, False),
    ]
    assert all(b["rank"] is None and b["ranked"] is None and b["private"] is False for b in bodies)
    assert bodies[1]["result_sha256"] == sha256_text("first") and bodies[1]["wall_ms"] == 99.75
    assert books.record("a") == (2.0, 1.0)
    assert books.record("b") == (1.0, 2.0)
    assert books.record("c") == (1.0, 2.0)  # its failed attempt counts once, as a loss
    # The event for "c" at the end is a win-rate one only: its result was accounted already.
    last = books.recorder.events[-1]
    assert (last.node_id, last.result, last.won, last.decided) == ("c", None, False, True)


def test_best_of_n_ranks_every_answer_and_keeps_the_private_flag(books: Books) -> None:
    settlement = Settlement(BEST_OF)
    ranked = [result("t1", "b"), result("t2", "a"), result("t3", "c")]
    books.tell(settlement.request_answered(ranked, (), ts=TS))
    bodies = books.bodies()
    assert [(b["node_id"], b["won"], b["rank"], b["ranked"]) for b in bodies] == [
        ("b", True, 1, 3),
        ("a", False, 2, 3),
        ("c", False, 3, 3),
    ]
    assert all(b["private"] is True and b["strategy"] == "best_of_n" for b in bodies)
    # Last of a ranking of several is bad work: its trust falls while the others' rise.
    assert books.trust.score("b") == books.trust.score("a") > 0.5 > books.trust.score("c")


def test_a_node_with_a_winning_and_a_losing_answer_only_wins(books: Books) -> None:
    settlement = Settlement(BEST_OF)
    answers = [result("t1", "a"), result("t2", "b"), result("t3", "a"), result("t4", "b")]
    books.tell(settlement.request_answered(answers, (), ts=TS))
    assert len(books.bodies()) == 4  # every answer has its receipt
    assert books.record("a") == (2.0, 1.0)
    assert books.record("b") == (1.0, 2.0)


def test_an_answer_whose_task_was_receipted_as_failed_moves_only_its_win_rate(books: Books) -> None:
    settlement = Settlement(RACE)
    books.tell(settlement.result_failed(result("t1", "a", ok=False), ts=TS))
    books.tell(settlement.request_answered([result("t1", "a", energy_j=7.0)], (), ts=TS))
    assert len(books.bodies()) == 1
    assert books.record("a") == (2.0, 1.0)
    assert books.registry.nodes["a"].energy.per_token() is None


def test_a_failed_request_is_a_loss_for_each_of_its_nodes_and_no_receipt(books: Books) -> None:
    settlement = Settlement(RACE)
    books.tell(settlement.request_failed(("a", "b"), ts=TS))
    assert books.bodies() == []
    assert books.record("a") == books.record("b") == (1.0, 2.0)
    assert books.record("c") == (1.0, 1.0)


def test_a_node_lost_holding_work_loses_trust_once_per_request_and_its_loss_waits(books: Books) -> None:
    settlement = Settlement(RACE)
    before = books.trust.score("a")
    books.tell(settlement.node_lost("a", ts=TS))
    lost = books.trust.score("a")
    assert lost < before  # it dropped work it had taken
    assert books.bodies() == []  # no result, so no receipt
    assert books.record("a") == (1.0, 1.0)  # its loss counts when the request ends
    books.tell(settlement.request_answered([result("t2", "b")], ("a",), ts=TS))
    assert books.record("a") == (1.0, 2.0)
    assert books.trust.score("a") == lost


def test_time_online_earns_uptime_credit_only_with_a_ledger(books: Books) -> None:
    bare = Books(None)
    for target in (books, bare):
        target.observers.node_up("a", 2.5)
        target.observers.node_up("a", 1.5)
    assert books.accounts["a"].uptime_s == 4.0
    assert bare.accounts == {}


def test_receipts_move_trust_and_credits(books: Books) -> None:
    settlement = Settlement(RACE)
    books.tell(settlement.result_failed(result("t1", "c", ok=False, code=ErrorCode.DEADLINE_EXCEEDED), ts=TS))
    books.tell(settlement.request_answered([result("t2", "a"), result("t3", "b")], ("c",), ts=TS))
    a, b, c = (books.accounts[n] for n in "abc")
    assert (a.tasks, a.wins, a.tokens, a.failed) == (1, 1, 100, 0)
    assert (b.tasks, b.wins, b.tokens, b.failed) == (1, 0, 100, 0)
    assert (c.tasks, c.failed) == (0, 1)
    # 100 tokens of a 300 MB model: 0.1 credits at the default rate, times its size multiplier.
    assert a.task_credits == pytest.approx(0.1 * 300 / 250)
    assert books.trust.score("a") > 0.5 and books.trust.score("b") > 0.5 > books.trust.score("c")


def test_without_a_ledger_trust_moves_all_the_same_and_no_credits_are_kept(books: Books) -> None:
    bare = Books(None)
    for target in (books, bare):
        settlement = Settlement(BEST_OF)
        target.tell(settlement.result_failed(result("t1", "c", ok=False), ts=TS))
        target.tell(settlement.request_answered([result("t2", "a"), result("t3", "b")], ("c",), ts=TS))
    assert [bare.trust.score(n) for n in "abc"] == [books.trust.score(n) for n in "abc"]
    assert bare.trust.score("a") > 0.5 > bare.trust.score("b")
    assert bare.accounts == {} and books.accounts != {}


def test_the_model_hash_is_the_announced_one_only_when_the_result_names_that_model(books: Books) -> None:
    settlement = Settlement(RACE)
    answers = [result("t1", "a", model=None), result("t2", "b", model="m"), result("t3", "c", model="other")]
    books.registry.record("d")  # heard of, never announced
    books.tell(settlement.request_answered([*answers, result("t4", "d", model=None)], (), ts=TS))
    got = [(b["node_id"], b["model"], b["model_sha256"], b["model_size_bytes"]) for b in books.bodies()]
    assert got == [
        ("a", "m", SHA, 300 * 2**20),
        ("b", "m", SHA, 300 * 2**20),
        ("c", "other", None, None),
        ("d", None, None, None),
    ]


def test_energy_is_added_for_ok_results_only_and_once(books: Books) -> None:
    settlement = Settlement(RACE)
    books.tell(settlement.result_failed(result("t1", "b", ok=False, energy_j=50.0), ts=TS))
    answer = result("t2", "a", energy_j=14.0)
    books.tell(settlement.request_answered([answer, result("t3", "c", energy_j=None)], ("b",), ts=TS))
    books.tell(Settlement(RACE).request_answered([result("t4", "a", energy_j=7.0)], (), ts=TS))
    assert books.registry.nodes["a"].energy.per_token() == pytest.approx(21.0 / 140)
    assert books.registry.nodes["b"].energy.per_token() is None  # failed: its joules bought nothing
    assert books.registry.nodes["c"].energy.per_token() is None  # no reading is not "free"


def test_the_window_hears_of_requests_answered_failed_and_cancelled() -> None:
    window = Window()
    observers: list[Observer] = [WindowObserver(window), Recorder(), WinRateObserver(WinRates())]
    for observer in observers:  # observers without request hooks take them and do nothing
        observer.request_answered(10.0, 120.0)
        observer.request_answered(11.0, 80.0)
        observer.request_failed(12.0, ErrorCode.NO_ELIGIBLE_NODES)
        observer.request_failed(13.0, ErrorCode.CANCELLED)
    assert (window.answered_total, window.failed_total, window.cancelled_total) == (2, 1, 1)
    assert window.latency_percentile(14.0, 1.0) == 120.0
    assert window.errors_by_code(14.0)["no_eligible_nodes"] == 1
