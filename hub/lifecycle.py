"""A request's life, as a state machine with no I/O (no MQTT, no asyncio).

The hub feeds it events (a node was assigned, a result came back, a node was lost, time passed)
and carries out the actions it returns (dispatch, cancel, succeed, fail). Tests drive it
directly, with no sockets and no clock but the ``now`` they pass in.

Request states and their transitions::

    PENDING ──> RUNNING ──> DONE
       │           ├──────> FAILED
       └───────────┴──────> (FAILED, on no eligible node or a spent deadline)

Attempt states: ASSIGNED, then exactly one of DONE, FAILED, LOST, TIMED_OUT, CANCELLED; or
ASSIGNED, QUIET (the node went silent), then one of those. Every move is written out at the
bottom of this file as a table keyed by (state, event): ``REQUEST_EVENTS``, ``ATTEMPT_EVENTS``.

``want`` is how many good answers finish the request: 1 for ``race`` (first wins, the rest are
cancelled) and ``fanout`` for ``best_of_n`` (all are ranked). A failed, lost or timed-out
attempt is replaced on a node not yet tried, while the attempt budget and the deadline allow.

A streamed ``race`` is won by the first node to stream a token: it becomes the *leader*, whose
tokens go to the client, and the other racers are cancelled at once. If the leader fails, the
next attempt to stream leads (the hub tells the client to start over).

A node that promised to show progress (its announce's ``progress_s``) and then goes *quiet*
(no progress, chunk or result for the attempt's ``quiet_s``) is written off for that attempt:
the attempt is QUIET, no longer counted as running, and the request goes to another node. A
frozen or unplugged phone keeps its socket open, so neither the broker nor the heartbeat timeout
would notice it for many seconds; the silence of one busy attempt says it in two. A QUIET
attempt is not cancelled: should its node come back (a Wi-Fi gap, a broker restart it had to
reconnect through) and answer while the request is still open, that answer counts. Once the
request has its reply, quiet attempts are cancelled with the rest and their late results are
ignored, so the request still gets exactly one reply. While the hub itself cannot hear (its
broker link is down) nobody's silence counts (``excuse_silence``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import ErrorInfo, Strategy, TaskResult


class RequestState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class AttemptState(StrEnum):
    ASSIGNED = "assigned"
    DONE = "done"
    FAILED = "failed"
    LOST = "lost"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    QUIET = "quiet"


class RequestEvent(StrEnum):
    """What moves a request (the tables at the bottom say where to)."""

    ASSIGNED = "assigned"  # a node took an attempt
    ANSWERED = "answered"  # enough good answers came
    GAVE_UP = "gave_up"  # no answer can come: deadline, no node, every attempt failed, a cancel


class AttemptEvent(StrEnum):
    """What moves an attempt."""

    ANSWERED = "answered"
    FAILED = "failed"  # the node answered with an error
    NODE_LOST = "node_lost"
    WENT_QUIET = "went_quiet"  # no sign of progress for its quiet window
    DEADLINE = "deadline"
    CANCELLED = "cancelled"


#: attempts whose answer still counts
_OPEN = (AttemptState.ASSIGNED, AttemptState.QUIET)


class TransitionError(RuntimeError):
    """A bug: the hub asked for a transition the tables above do not allow."""


# ---------------------------------------------------------------- actions for the hub


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send the request to ``count`` more nodes, none of them in ``exclude``."""

    count: int
    exclude: frozenset[str]


@dataclass(frozen=True, slots=True)
class Cancel:
    task_id: str
    node_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Quiet:
    """The node of attempt ``task_id`` went silent: it may be frozen or gone, so give it no new
    work until it is heard from again."""

    task_id: str
    node_id: str


@dataclass(frozen=True, slots=True)
class Succeed:
    """The good answers, in arrival order, and the nodes whose attempts lost."""

    answers: tuple[TaskResult, ...]
    losers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Fail:
    error: ErrorInfo
    losers: tuple[str, ...]


Action = Dispatch | Cancel | Quiet | Succeed | Fail


@dataclass(slots=True)
class Attempt:
    task_id: str
    node_id: str
    deadline: float
    state: AttemptState = AttemptState.ASSIGNED
    error: ErrorInfo | None = None
    #: written off as LOST when nothing is heard of it for this long (None: the node never
    #: promised progress, and only the attempt's deadline applies)
    quiet_s: float | None = None
    #: when the attempt was last heard of: assigned, a progress message, a chunk
    heard: float = 0.0

    def quiet_at(self) -> float | None:
        """When the attempt counts as quiet, unless it is heard of before then."""
        return None if self.quiet_s is None else self.heard + self.quiet_s

    def on(self, event: AttemptEvent) -> None:
        """Move as ``ATTEMPT_EVENTS`` says ``event`` moves an attempt in this state."""
        to = ATTEMPT_EVENTS[self.state].get(event)
        if to is None:
            raise TransitionError(f"attempt {self.task_id}: {event} in state {self.state}")
        self.state = to

    def move(self, to: AttemptState) -> None:
        """Move straight to ``to``, if some event could."""
        if to not in ATTEMPT_TRANSITIONS[self.state]:
            raise TransitionError(f"attempt {self.task_id}: {self.state} -> {to}")
        self.state = to


@dataclass(slots=True)
class RequestMachine:
    request_id: str
    strategy: Strategy
    fanout: int
    deadline: float
    #: attempts allowed beyond the first ``fanout`` (re-dispatches after failures)
    retries: int = 2
    state: RequestState = RequestState.PENDING
    attempts: dict[str, Attempt] = field(default_factory=dict)
    answers: list[TaskResult] = field(default_factory=list)
    want: int = 0
    last_error: ErrorInfo | None = None
    #: the client reads tokens as they come (``stream``): see the module's docstring
    stream: bool = False
    #: the attempt whose tokens the client is reading (streamed races only)
    leader: str | None = None

    def __post_init__(self) -> None:
        self.want = 1 if self.strategy == "race" else self.fanout

    # ------------------------------------------------------------ queries

    @property
    def finished(self) -> bool:
        return self.state in (RequestState.DONE, RequestState.FAILED)

    def active(self) -> list[Attempt]:
        return [a for a in self.attempts.values() if a.state is AttemptState.ASSIGNED]

    def quiet(self) -> list[Attempt]:
        """Attempts written off as quiet whose answer would still count."""
        return [a for a in self.attempts.values() if a.state is AttemptState.QUIET]

    def tried_nodes(self) -> frozenset[str]:
        return frozenset(a.node_id for a in self.attempts.values())

    def next_wakeup(self) -> float:
        """When ``on_tick`` next has something to do."""
        quiet = [q for a in self.active() if (q := a.quiet_at()) is not None]
        return min([self.deadline, *(a.deadline for a in [*self.active(), *self.quiet()]), *quiet])

    # ------------------------------------------------------------ events

    def begin(self, now: float) -> list[Action]:
        if now >= self.deadline:
            return self._fail(ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message="the request's deadline had passed"))
        return [Dispatch(self.fanout, frozenset())]

    def assigned(
        self, *, task_id: str, node_id: str, deadline: float, quiet_s: float | None = None, now: float = 0.0
    ) -> None:
        """``quiet_s``: how long the node may go without a sign of progress (see the docstring)."""
        if self.finished:
            raise TransitionError(f"request {self.request_id} is {self.state}; cannot assign")
        if self.state is RequestState.PENDING:
            self._on(RequestEvent.ASSIGNED)
        self.attempts[task_id] = Attempt(task_id, node_id, min(deadline, self.deadline), quiet_s=quiet_s, heard=now)

    def on_progress(self, task_id: str, now: float) -> None:
        """The node says it still works on ``task_id`` (a progress message or a chunk)."""
        attempt = self.attempts.get(task_id)
        if attempt is not None and attempt.state is AttemptState.ASSIGNED:
            attempt.heard = max(attempt.heard, now)

    def excuse_silence(self, now: float) -> None:
        """The hub could not hear anyone until ``now`` (its broker link was down): no running
        attempt's silence up to then counts against it."""
        for attempt in self.active():
            attempt.heard = max(attempt.heard, now)

    def shortfall(self, missing: int, error: ErrorInfo, now: float) -> list[Action]:
        """The hub found nodes for only part of a Dispatch (``missing`` short)."""
        if self.finished:
            return []
        if not self.active() and not self.quiet() and not self.answers:
            # A real failure on an earlier attempt says more than "no one else to ask".
            return self._fail(self.last_error or error)
        self.last_error = self.last_error or error
        # Go on with the nodes we have: fewer racers, or fewer candidates to rank.
        self.want = max(1, min(self.want, len(self.answers) + len(self.active()) + len(self.quiet())))
        return self._settle(now, dispatch=False)

    def on_result(self, result: TaskResult, now: float) -> list[Action]:
        attempt = self.attempts.get(result.task_id)
        if self.finished or attempt is None or attempt.state not in _OPEN:
            return []  # a late answer from an attempt we already wrote off: ignore it
        if result.ok:
            attempt.on(AttemptEvent.ANSWERED)
            self.answers.append(result)
        else:
            attempt.on(AttemptEvent.FAILED)
            attempt.error = result.error
            self.last_error = result.error
        return self._settle(now)

    def on_chunk(self, task_id: str, now: float) -> tuple[bool, list[Action]]:
        """A piece of a streamed answer came from attempt ``task_id``: should the client see it?

        In a streamed race, the first attempt to stream leads and the others are cancelled.
        ``best_of_n`` streams nothing until the answers are ranked."""
        self.on_progress(task_id, now)  # a chunk shows progress too
        attempt = self.attempts.get(task_id)
        if not self.stream or self.strategy != "race" or self.finished:
            return False, []
        if attempt is None or attempt.state is not AttemptState.ASSIGNED:
            return False, []
        if self.leader is None:
            self.leader = task_id
            return True, self._cancel_active("another node streamed first", keep=task_id)
        return self.leader == task_id, []

    def on_cancel(self, reason: str, now: float) -> list[Action]:
        """The client gave up on the request: stop every attempt, and fail it as ``cancelled``."""
        if self.finished:
            return []
        cancels = self._cancel_active(reason)
        return cancels + self._fail(ErrorInfo(code=ErrorCode.CANCELLED, message=reason))

    def on_node_lost(self, node_id: str, reason: str, now: float) -> list[Action]:
        if self.finished:
            return []
        lost = False
        for attempt in [*self.active(), *self.quiet()]:
            if attempt.node_id == node_id:
                attempt.on(AttemptEvent.NODE_LOST)
                attempt.error = ErrorInfo(code=ErrorCode.NODE_LOST, message=f"node {node_id} {reason}")
                self.last_error = attempt.error
                lost = True
        return self._settle(now) if lost else []

    def on_tick(self, now: float) -> list[Action]:
        if self.finished:
            return []
        if now >= self.deadline:
            cancels = self._cancel_active("request deadline passed")
            if self.answers:
                return cancels + self._succeed()
            return cancels + self._fail(ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message=self._deadline_message()))
        actions: list[Action] = []
        for attempt in [*self.active(), *self.quiet()]:
            quiet_at = attempt.quiet_at()
            if attempt.state is AttemptState.ASSIGNED and quiet_at is not None and quiet_at <= now < attempt.deadline:
                # The node stopped showing signs of life: another node takes the request, and
                # this one's answer still counts should it come first (see the docstring).
                attempt.on(AttemptEvent.WENT_QUIET)
                attempt.error = ErrorInfo(
                    code=ErrorCode.NODE_LOST,
                    message=f"node {attempt.node_id} went quiet: no progress for {attempt.quiet_s:g} s",
                )
                self.last_error = attempt.error
                actions.append(Quiet(attempt.task_id, attempt.node_id))
                continue
            if now >= attempt.deadline:
                attempt.on(AttemptEvent.DEADLINE)
                attempt.error = ErrorInfo(
                    code=ErrorCode.DEADLINE_EXCEEDED, message=f"node {attempt.node_id} missed its deadline"
                )
                self.last_error = attempt.error
                actions.append(Cancel(attempt.task_id, attempt.node_id, "attempt deadline passed"))
        return actions + self._settle(now) if actions else []

    # ------------------------------------------------------------ internals

    def _settle(self, now: float, *, dispatch: bool = True) -> list[Action]:
        if self.leader is not None and self.attempts[self.leader].state not in (
            AttemptState.ASSIGNED,
            AttemptState.DONE,
        ):
            self.leader = None  # the next attempt to stream leads
        if len(self.answers) >= self.want:
            return self._cancel_active("another node answered first") + self._succeed()
        active = len(self.active())
        waiting = active + len(self.quiet())  # a quiet attempt may still answer
        needed = self.want - len(self.answers) - active
        budget = self.fanout + self.retries - len(self.attempts)
        if dispatch and needed > 0 and budget > 0 and now < self.deadline:
            return [Dispatch(min(needed, budget), self.tried_nodes())]
        if waiting == 0:
            if self.answers:
                return self._succeed()
            return self._fail(
                self.last_error or ErrorInfo(code=ErrorCode.NO_ELIGIBLE_NODES, message="no node answered")
            )
        return []

    def _cancel_active(self, reason: str, *, keep: str | None = None) -> list[Action]:
        """Cancel every attempt still running or quiet, except the one ``keep`` names."""
        cancels: list[Action] = []
        for attempt in [*self.active(), *self.quiet()]:
            if attempt.task_id == keep:
                continue
            attempt.on(AttemptEvent.CANCELLED)
            cancels.append(Cancel(attempt.task_id, attempt.node_id, reason))
        return cancels

    def _losers(self, winners: set[str]) -> tuple[str, ...]:
        return tuple(sorted({a.node_id for a in self.attempts.values()} - winners))

    def _succeed(self) -> list[Action]:
        self._on(RequestEvent.ANSWERED)
        answers = tuple(self.answers)
        return [Succeed(answers, self._losers({r.node_id for r in answers}))]

    def _fail(self, error: ErrorInfo) -> list[Action]:
        self._on(RequestEvent.GAVE_UP)
        return [Fail(error, self._losers(set()))]

    def _deadline_message(self) -> str:
        if not self.attempts:
            return "no node could take the request before its deadline"
        if self.last_error is not None:
            return f"no answer before the deadline; last problem: {self.last_error.message}"
        return "no answer before the deadline"

    def _on(self, event: RequestEvent) -> None:
        to = REQUEST_EVENTS[self.state].get(event)
        if to is None:
            raise TransitionError(f"request {self.request_id}: {event} in state {self.state}")
        self.state = to


# ---------------------------------------------------------------- the transition tables
#
# Every move a request or an attempt can make, keyed by (state, event), in the manner of h11's
# _state.py. A pair missing here is a bug in the hub (TransitionError), never a silent no-op.

REQUEST_EVENTS: dict[RequestState, dict[RequestEvent, RequestState]] = {
    RequestState.PENDING: {RequestEvent.ASSIGNED: RequestState.RUNNING, RequestEvent.GAVE_UP: RequestState.FAILED},
    RequestState.RUNNING: {
        RequestEvent.ASSIGNED: RequestState.RUNNING,  # another attempt: a racer, a retry, a candidate
        RequestEvent.ANSWERED: RequestState.DONE,
        RequestEvent.GAVE_UP: RequestState.FAILED,
    },
    RequestState.DONE: {},
    RequestState.FAILED: {},
}

_ENDINGS = {
    AttemptEvent.ANSWERED: AttemptState.DONE,
    AttemptEvent.FAILED: AttemptState.FAILED,
    AttemptEvent.NODE_LOST: AttemptState.LOST,
    AttemptEvent.DEADLINE: AttemptState.TIMED_OUT,
    AttemptEvent.CANCELLED: AttemptState.CANCELLED,
}
ATTEMPT_EVENTS: dict[AttemptState, dict[AttemptEvent, AttemptState]] = {
    AttemptState.ASSIGNED: {**_ENDINGS, AttemptEvent.WENT_QUIET: AttemptState.QUIET},
    # Quiet is not over: its node may come back and answer, but it cannot go quiet twice.
    AttemptState.QUIET: dict(_ENDINGS),
    **{end: {} for end in _ENDINGS.values()},
}

#: where each state can go at all, whatever the event
REQUEST_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    state: frozenset(to for to in events.values() if to is not state) for state, events in REQUEST_EVENTS.items()
}
ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    state: frozenset(events.values()) for state, events in ATTEMPT_EVENTS.items()
}
