"""Closed-loop load: ``concurrency`` workers, each sending its next request when the last returns.

Used the same way for the swarm (``SwarmClient.ask``) and for Celery (``.delay().get()``), so the
two are driven alike: only completions inside the measuring window count, after a warm-up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nova_swarm.broker.contract.errors import RequestFailed

from .stats import Summary


@dataclass(frozen=True, slots=True)
class LoadResult:
    concurrency: int
    seconds: float
    latencies_ms: tuple[float, ...]
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "completed": self.completed,
            "throughput": round(self.throughput, 2),
            "errors": dict(self.errors),
        }
        if self.latencies_ms:
            out["latency_ms"] = Summary.of(self.latencies_ms).to_json()
        return out


class _Window:
    """Which completions count: those that finish between ``open`` and ``close``."""

    def __init__(self) -> None:
        self.opened: float | None = None
        self.closed: float | None = None
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    def record(self, started: float, ended: float, error: str | None) -> None:
        if self.opened is None or ended < self.opened or (self.closed is not None and ended > self.closed):
            return
        with self.lock:
            if error is None:
                self.latencies.append((ended - started) * 1000)
            else:
                self.errors[error] += 1


async def run_async(
    call: Callable[[int], Awaitable[None]], *, concurrency: int, seconds: float, warmup_s: float
) -> LoadResult:
    """``call(i)`` raises RequestFailed (or TimeoutError) for a failed request."""
    window = _Window()
    stopping = asyncio.Event()
    counter = iter(range(10**12))

    async def worker() -> None:
        while not stopping.is_set():
            started = time.perf_counter()
            error = None
            try:
                await call(next(counter))
            except RequestFailed as exc:
                error = str(exc.code)
            except TimeoutError:
                error = "timeout"
            window.record(started, time.perf_counter(), error)

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
        await asyncio.sleep(warmup_s)
        window.opened = time.perf_counter()
        await asyncio.sleep(seconds)
        window.closed = time.perf_counter()
        stopping.set()
    return LoadResult(concurrency, window.closed - window.opened, tuple(window.latencies), dict(window.errors))


def run_threads(call: Callable[[int], None], *, concurrency: int, seconds: float, warmup_s: float) -> LoadResult:
    """The same with threads, for blocking clients (Celery's ``.get()``)."""
    window = _Window()
    stopping = threading.Event()
    lock = threading.Lock()
    counter = iter(range(10**12))

    def worker() -> None:
        while not stopping.is_set():
            with lock:
                i = next(counter)
            started = time.perf_counter()
            error = None
            try:
                call(i)
            except Exception as exc:  # the client library's own errors: counted, never fatal
                error = type(exc).__name__
            window.record(started, time.perf_counter(), error)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    window.opened = time.perf_counter()
    time.sleep(seconds)
    window.closed = time.perf_counter()
    stopping.set()
    for t in threads:
        t.join(30)
    return LoadResult(concurrency, window.closed - window.opened, tuple(window.latencies), dict(window.errors))
