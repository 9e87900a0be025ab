"""Celery 5 with Redis, started and stopped by the benchmark: the dispatch baseline.

Debian's ``redis-server`` on a free loopback port, in a temp dir, with no persistence; a Celery
worker with the default prefork pool (one child per core); and the benchmark's process as the
client, ``noop.delay().get()`` from ``concurrency`` threads.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from nova_swarm.broker.link.net import free_port, wait_listening

from .load import LoadResult, run_threads
from .procs import PYTHON, Procs


def redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")


def missing() -> str | None:
    """Why the baseline cannot run here, or None."""
    if redis_binary() is None:
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import celery  # noqa: F401
        import packaging  # noqa: F401  (kombu 5.7's Redis transport imports it)
        import redis  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install 'nova-swarm[bench]')"
    return None


async def run(
    workdir: Path, concurrencies: Sequence[int], *, seconds: float, warmup_s: float, pool: str = "prefork"
) -> list[LoadResult]:
    binary = redis_binary()
    assert binary is not None
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    procs = Procs(workdir / "logs", {**os.environ, "NOVA_BENCH_REDIS": url})
    try:
        redis_proc = procs.spawn(
            "redis",
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
        )  # fmt: skip
        await wait_listening("127.0.0.1", port, exited=redis_proc.poll)
        cores = os.cpu_count() or 1
        procs.spawn(
            "celery-worker",
            [PYTHON, "-m", "celery", "-A", "nova_swarm.bench.celery_app", "worker", "--loglevel", "warning",
             "--pool", pool, "--concurrency", str(cores), "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
        )  # fmt: skip
        return await asyncio.to_thread(_drive, url, concurrencies, seconds, warmup_s)
    finally:
        await procs.close()


def _drive(url: str, concurrencies: Sequence[int], seconds: float, warmup_s: float) -> list[LoadResult]:
    from . import celery_app

    celery_app.configure(url)
    # The worker is ready when it has answered one task.
    celery_app.noop.delay().get(timeout=60)

    def call(_: int) -> None:
        celery_app.noop.delay().get(timeout=30)

    return [run_threads(call, concurrency=c, seconds=seconds, warmup_s=warmup_s) for c in concurrencies]
