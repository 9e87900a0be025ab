"""``swarm-hub bench``: the benchmark suite (overhead, dispatch vs Celery, scaling, race tail,
recovery, memory), one module per section, plus the processes and load they need.

Heavy imports (llama-cpp, Celery, matplotlib) happen only inside a run, so ``swarm-hub`` itself
stays fast to start.
"""

from .cli import add_arguments, run

__all__ = ["add_arguments", "run"]
