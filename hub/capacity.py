"""Which attempts count against which node's capacity, and which request each task belongs to,
with no I/O.

An attempt *holds* a place on its node (``NodeRecord.inflight``, which the scheduler reads)
from ``assign`` until ``release``; releasing twice, or a task never assigned, changes nothing,
so a node's count can never drift below what it really runs. Apart from that, the hub must
find a task's request when a node's result, piece or progress arrives: its *route*. A route
normally goes with the place, but an attempt written off as quiet keeps its route after its
place is freed (its late answer still counts), until ``forget`` when its request is over.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .registry import NodeRecord

_R = TypeVar("_R", bound=Hashable)


@dataclass(slots=True)
class Capacity(Generic[_R]):
    """Places held on nodes by the attempts of requests of type ``_R``."""

    #: task id -> the request it belongs to (held, or quiet and still listened to)
    _routes: dict[str, _R] = field(default_factory=dict)
    #: task id -> the node whose capacity it holds
    _held: dict[str, NodeRecord] = field(default_factory=dict)
    #: per request, the task ids that hold a place
    _by_request: dict[_R, set[str]] = field(default_factory=dict)

    def assign(self, request: _R, task_id: str, node: NodeRecord) -> None:
        """Task ``task_id`` of ``request`` now runs on ``node``, taking one of its places."""
        if task_id in self._held:
            raise ValueError(f"task {task_id} is already assigned")
        node.inflight += 1
        self._held[task_id] = node
        self._routes[task_id] = request
        self._by_request.setdefault(request, set()).add(task_id)

    def release(self, task_id: str, *, keep_route: bool = False) -> NodeRecord | None:
        """Task ``task_id`` no longer counts against its node; that node, if it did until now.
        ``keep_route``: its answer would still count (a quiet attempt), so keep finding it."""
        node = self._held.pop(task_id, None)
        if node is None:
            return None
        if node.inflight > 0:  # the count is the registry's field, and Registry.load zeroes it
            node.inflight -= 1
        request = self._routes[task_id] if keep_route else self._routes.pop(task_id)
        held = self._by_request[request]
        held.discard(task_id)
        if not held:
            del self._by_request[request]
        return node

    def forget(self, task_id: str) -> None:
        """Stop finding ``task_id``'s request (its request is over); frees its place too."""
        self.release(task_id)
        self._routes.pop(task_id, None)

    def route(self, task_id: str) -> _R | None:
        """The request task ``task_id`` belongs to, if it is still listened to."""
        return self._routes.get(task_id)

    def held(self, request: _R) -> list[str]:
        """The task ids of ``request`` that still hold a place, in no particular order."""
        return list(self._by_request.get(request, ()))

    def holds(self, task_id: str) -> bool:
        return task_id in self._held
