"""The Celery side of the dispatch comparison: one no-op task, Redis as broker and result backend.

The worker imports this module by name (``celery -A nova_swarm.bench.celery_app worker``)
and finds Redis in ``NOVA_BENCH_REDIS``; the benchmark's own process calls ``configure``.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("nova_bench")


def configure(url: str) -> Celery:
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_connection_retry_on_startup=True,
        # Celery's defaults otherwise: prefork pool, prefetch multiplier 4, JSON serialiser.
        task_ignore_result=False,
        result_expires=600,
        worker_hijack_root_logger=False,
    )
    return app


if url := os.environ.get("NOVA_BENCH_REDIS"):
    configure(url)


@app.task(name="noop")
def noop() -> None:
    return None
