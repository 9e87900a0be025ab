"""``swarm-bench``: the benchmark suite (overhead, dispatch vs Celery, scaling, race tail,
recovery, link down, memory), one module per section, plus the processes and load they need.

Heavy imports (llama-cpp, Celery, matplotlib) happen only inside a run, so ``swarm-bench --help``
stays fast.
"""
