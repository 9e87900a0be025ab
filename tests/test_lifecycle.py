"""The request state machine, driven directly: no sockets, no clock but the ``now`` we pass."""

from __future__ import annotations

import pytest

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import ErrorInfo, TaskResult
from nova_swarm.hub.lifecycle import (
    ATTEMPT_EVENTS,
    ATTEMPT_TRANSITIONS,
    REQUEST_EVENTS,
    REQUEST_TRANSITIONS,
    Attempt,
    AttemptEvent,
    AttemptState,
    Cancel,
    Dispatch,
    Fail,
    RequestEvent,
    RequestMachine,
    RequestState,
    Succeed,
    TransitionError,
)


def ok(task: str, node: str, text: str = "answer") -> TaskResult:
    return TaskResult(task_id=task, request_id="r", node_id=node, ok=True, text=text)


def err(task: str, node: str, code: ErrorCode = ErrorCode.ENGINE_ERROR) -> TaskResult:
    return TaskResult(task_id=task, request_id="r", node_id=node, ok=False, error=ErrorInfo(code=code, message="x"))


def machine(strategy: str = "race", fanout: int = 2, retries: int = 2, deadline: float = 100.0) -> RequestMachine:
    return RequestMachine(request_id="r", strategy=strategy, fanout=fanout, deadline=deadline, retries=retries)  # type: ignore[arg-type]


def test_race_first_answer_wins_and_losers_are_cancelled() -> None:
    m = machine()
    assert m.begin(0) == [Dispatch(2, frozenset())]
    m.assigned(task_id="t1", node_id="a", deadline=50)
    m.assigned(task_id="t2", node_id="b", deadline=50)
    actions = m.on_result(ok("t2", "b"), 1)
    assert actions[0] == Cancel("t1", "a", "another node answered first")
    assert isinstance(actions[1], Succeed) and actions[1].answers[0].node_id == "b"
    assert actions[1].losers == ("a",)
    assert m.state is RequestState.DONE
    assert m.on_result(ok("t1", "a"), 2) == []  # a late answer is ignored cleanly


def test_best_of_n_waits_for_all_answers() -> None:
    m = machine("best_of_n", fanout=3)
    m.begin(0)
    for t, n in (("t1", "a"), ("t2", "b"), ("t3", "c")):
        m.assigned(task_id=t, node_id=n, deadline=50)
    assert m.on_result(ok("t1", "a"), 1) == []
    assert m.on_result(ok("t3", "c"), 2) == []
    actions = m.on_result(ok("t2", "b"), 3)
    assert len(actions) == 1 and isinstance(actions[0], Succeed)
    assert [a.node_id for a in actions[0].answers] == ["a", "c", "b"]


def test_failed_attempt_is_redispatched_to_a_node_not_yet_tried() -> None:
    m = machine(fanout=1)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    assert m.on_result(err("t1", "a"), 1) == [Dispatch(1, frozenset({"a"}))]
    m.assigned(task_id="t2", node_id="b", deadline=50)
    actions = m.on_result(ok("t2", "b"), 2)
    assert isinstance(actions[0], Succeed) and actions[0].losers == ("a",)


def test_lost_node_is_redispatched() -> None:
    m = machine(fanout=1)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    assert m.on_node_lost("b", "went offline", 1) == []  # not our node
    assert m.on_node_lost("a", "went offline", 1) == [Dispatch(1, frozenset({"a"}))]
    assert m.attempts["t1"].state is AttemptState.LOST
    assert m.on_result(ok("t1", "a"), 2) == []  # the written-off node answers late: ignored


def test_attempt_deadline_cancels_and_redispatches() -> None:
    m = machine(fanout=1)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=5)
    assert m.next_wakeup() == 5
    assert m.on_tick(4) == []
    actions = m.on_tick(5)
    assert actions == [Cancel("t1", "a", "attempt deadline passed"), Dispatch(1, frozenset({"a"}))]


def test_request_deadline_fails_with_deadline_exceeded() -> None:
    m = machine(fanout=1, deadline=10)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    assert m.next_wakeup() == 10  # attempt deadlines never outlive the request's
    actions = m.on_tick(10)
    assert actions[0] == Cancel("t1", "a", "request deadline passed")
    assert isinstance(actions[1], Fail) and actions[1].error.code is ErrorCode.DEADLINE_EXCEEDED


def test_best_of_n_returns_what_it_has_at_the_deadline() -> None:
    m = machine("best_of_n", fanout=2, deadline=10)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    m.assigned(task_id="t2", node_id="b", deadline=50)
    m.on_result(ok("t1", "a"), 1)
    actions = m.on_tick(10)
    assert isinstance(actions[-1], Succeed) and len(actions[-1].answers) == 1


def test_retry_budget_runs_out_into_the_last_real_error() -> None:
    m = machine(fanout=1, retries=1)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    assert isinstance(m.on_result(err("t1", "a"), 1)[0], Dispatch)
    m.assigned(task_id="t2", node_id="b", deadline=50)
    actions = m.on_result(err("t2", "b", ErrorCode.NODE_BUSY), 2)
    assert isinstance(actions[0], Fail) and actions[0].error.code is ErrorCode.NODE_BUSY
    assert actions[0].losers == ("a", "b")


def test_no_node_at_all_fails_with_the_shortfall_error() -> None:
    m = machine(fanout=1)
    m.begin(0)
    error = ErrorInfo(code=ErrorCode.NO_ELIGIBLE_NODES, message="no node is online")
    actions = m.shortfall(1, error, 0)
    assert actions == [Fail(error, ())]


def test_shortfall_with_some_nodes_goes_on_with_fewer() -> None:
    m = machine("best_of_n", fanout=3)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    assert m.shortfall(2, ErrorInfo(code=ErrorCode.NO_ELIGIBLE_NODES, message="x"), 0) == []
    actions = m.on_result(ok("t1", "a"), 1)
    assert isinstance(actions[0], Succeed)


def test_transition_tables_forbid_leaving_a_final_state() -> None:
    assert REQUEST_TRANSITIONS[RequestState.DONE] == frozenset()
    open_states = (AttemptState.ASSIGNED, AttemptState.QUIET)  # a quiet attempt may still answer
    assert all(ATTEMPT_TRANSITIONS[s] == frozenset() for s in AttemptState if s not in open_states)
    assert AttemptState.ASSIGNED not in ATTEMPT_TRANSITIONS[AttemptState.QUIET]  # no way back to running
    m = machine(fanout=1)
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    m.on_result(ok("t1", "a"), 1)
    with pytest.raises(TransitionError):
        m.assigned(task_id="t2", node_id="b", deadline=50)
    with pytest.raises(TransitionError):
        m.attempts["t1"].move(AttemptState.FAILED)


def test_every_state_and_event_pair_is_in_the_tables_or_refused() -> None:
    for state in AttemptState:
        for event in AttemptEvent:
            attempt = Attempt("t1", "a", deadline=10.0, state=state)
            target = ATTEMPT_EVENTS[state].get(event)
            if target is None:
                with pytest.raises(TransitionError):
                    attempt.on(event)
            else:
                attempt.on(event)
                assert attempt.state is target
    assert AttemptEvent.WENT_QUIET not in ATTEMPT_EVENTS[AttemptState.QUIET]  # quiet once, not twice
    assert ATTEMPT_EVENTS[AttemptState.QUIET][AttemptEvent.ANSWERED] is AttemptState.DONE  # a late answer counts
    assert REQUEST_EVENTS[RequestState.PENDING].get(RequestEvent.ANSWERED) is None  # no answer without a node
    assert all(not REQUEST_EVENTS[s] for s in (RequestState.DONE, RequestState.FAILED))


def test_a_spent_deadline_fails_at_once() -> None:
    m = machine(deadline=0)
    actions = m.begin(0)
    assert isinstance(actions[0], Fail) and actions[0].error.code is ErrorCode.DEADLINE_EXCEEDED


def streamed(strategy: str = "race", fanout: int = 2) -> RequestMachine:
    m = machine(strategy, fanout)
    m.stream = True
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    m.assigned(task_id="t2", node_id="b", deadline=50)
    return m


def test_a_streamed_race_is_led_by_the_first_to_stream_and_the_others_are_cancelled() -> None:
    m = streamed()
    forward, actions = m.on_chunk("t2", 1)
    assert forward and actions == [Cancel("t1", "a", "another node streamed first")]
    assert m.leader == "t2" and m.attempts["t1"].state is AttemptState.CANCELLED
    assert m.on_chunk("t2", 2) == (True, [])
    assert m.on_chunk("t1", 2) == (False, []), "a cancelled racer's late pieces go nowhere"
    actions = m.on_result(ok("t2", "b"), 3)
    assert isinstance(actions[-1], Succeed) and actions[-1].losers == ("a",)


def test_when_the_stream_leader_fails_the_next_attempt_leads() -> None:
    m = streamed(fanout=1)
    m.on_result(err("t1", "a"), 0.5)  # t1 failed before streaming anything; t2 is still racing
    assert m.on_chunk("t2", 1) == (True, [])
    actions = m.on_node_lost("b", "went offline", 2)
    assert m.leader is None and actions == [Dispatch(1, frozenset({"a", "b"}))]
    m.assigned(task_id="t3", node_id="c", deadline=50)
    assert m.on_chunk("t3", 3) == (True, []) and m.leader == "t3"


def test_best_of_n_and_unstreamed_requests_forward_no_pieces() -> None:
    assert streamed("best_of_n").on_chunk("t1", 1) == (False, [])
    m = machine()
    m.begin(0)
    m.assigned(task_id="t1", node_id="a", deadline=50)
    assert m.on_chunk("t1", 1) == (False, [])


def test_a_client_cancel_stops_every_attempt_and_fails_the_request() -> None:
    m = streamed()
    actions = m.on_cancel("cancelled by the client: bored", 1)
    assert actions[:2] == [
        Cancel("t1", "a", "cancelled by the client: bored"),
        Cancel("t2", "b", "cancelled by the client: bored"),
    ]
    assert isinstance(actions[2], Fail) and actions[2].error.code is ErrorCode.CANCELLED
    assert m.state is RequestState.FAILED and m.on_cancel("again", 2) == []
