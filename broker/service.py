"""A long-running part of the swarm (the hub, a node, the gateway) as an async context manager.

    async with Hub(config, url) as hub:   # run() starts in a task group the block owns
        ...
                                           # leaving the block: stop(), then wait for run() to end

The same object also runs in the foreground with ``await service.run()`` until ``stop()``, as
the command-line tools do. Either way every task it starts belongs to a task group: none outlives
the service.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from nova_swarm.broker.contract.errors import ConfigError


class Service(ABC):
    """Subclasses give ``run()`` and ``stop()``; ``started`` may wait for readiness."""

    _owner: asyncio.TaskGroup | None = None

    @abstractmethod
    async def run(self) -> None:
        """Serve until stopped."""

    @abstractmethod
    def stop(self) -> None:
        """Ask ``run()`` to end, soon and cleanly (drained, offline); returns at once."""

    async def started(self, running: asyncio.Task[None]) -> None:  # noqa: B027 - a hook, no-op by default
        """Called in ``__aenter__`` once ``run()`` is started; by default the block begins at once
        (readiness, where it matters, is an event of the service's own)."""

    async def __aenter__(self) -> Self:
        if self._owner is not None:
            raise ConfigError(f"this {type(self).__name__.lower()} is already running")
        owner = self._owner = asyncio.TaskGroup()
        await owner.__aenter__()
        try:
            await self.started(owner.create_task(self.run()))
        except asyncio.CancelledError as exc:
            # run() failed at once and the task group cancelled us: raise its error instead.
            self._owner = None
            await owner.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        owner, self._owner = self._owner, None
        if owner is None:
            return
        self.stop()
        await owner.__aexit__(exc_type, exc, tb)
