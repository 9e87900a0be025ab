"""What one benchmark run does: a frozen settings object, with a full and a quick profile."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

SECTIONS = ("overhead", "dispatch", "scaling", "race", "recovery", "linkdown", "memory", "ensemble")
BROKERS = ("amqtt", "mosquitto")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    out_dir: Path
    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    brokers: tuple[str, ...] = BROKERS
    #: the hub's --heartbeat-timeout in the benchmark swarm (recovery on amqtt waits on it when no
    #: Last Will fires); nodes heartbeat well inside it
    heartbeat_timeout_s: float = 5.0
    node_heartbeat_s: float = 1.0

    # 1. overhead: one real llama node against direct calls, same model and sampling
    overhead_warm: int = 30
    overhead_cold: int = 16
    #: time to first token, through SwarmClient.streaming where it exists
    ttft_warm: int = 16
    ttft_cold: int = 10
    max_tokens: int = 16
    seed: int = 1
    #: one thread per llama instance: with 2 cores, the other one is left to the broker and hub
    llama_threads: int = 1
    #: where the parts with real llama nodes run (overhead, node memory, real-node scaling)
    llama_brokers: tuple[str, ...] = BROKERS

    # 2. dispatch capacity against Celery
    concurrencies: tuple[int, ...] = (1, 4, 16, 64, 256)
    dispatch_seconds: float = 3.0
    dispatch_warmup_s: float = 0.5
    #: instant fake nodes, each with room for many queued tasks so the hub never waits for one
    dispatch_nodes: int = 4
    dispatch_queue_max: int = 128

    # 3. scaling
    scaling_ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    service_s: float = 0.1
    scaling_seconds: float = 2.5
    #: in-flight requests per node: every place a node has (1 slot + a queue of 4) plus one waiting
    #: at the hub, so a node never idles for want of work however the hub spreads the requests
    saturation_per_node: int = 6
    #: the scaling warm-up is this plus the time for every in-flight request to go round once
    scaling_warmup_s: float = 1.0
    real_scaling_seconds: float = 8.0
    real_warmup_s: float = 1.0

    # 4. race tail latency
    race_fanouts: tuple[int, ...] = (1, 2, 3)
    race_requests: int = 150
    race_nodes: int = 8
    race_concurrency: int = 2
    #: log-normal service time: median 50 ms, sigma 1.0 (p99 about 0.5 s)
    race_median_s: float = 0.05
    race_sigma: float = 1.0
    race_min_seconds: float = 1.0

    # 5. recovery
    recovery_trials: int = 20
    recovery_task_s: float = 0.8
    # 5b. recovery after the link goes down (phones on a virtual LAN; needs root)
    linkdown_trials: int = 10
    #: long enough that a healthy phone must show progress while it works
    linkdown_task_s: float = 3.0

    # 6. memory
    memory_nodes: int = 1000
    memory_heartbeat_s: float = 10.0
    #: how long the simulated nodes keep heartbeating once all are online, while RSS is sampled
    memory_window_s: float = 12.0
    #: how long the fresh hub and broker settle before their idle memory is read
    memory_idle_s: float = 1.0

    # 7. ensembles across models (real SmolLM2-135M and Gemma 3 270M nodes)
    ensemble_prompts: int = 120

    @classmethod
    def full(cls, out_dir: Path) -> BenchConfig:
        return cls(out_dir=out_dir)

    @classmethod
    def quick_profile(cls, out_dir: Path) -> BenchConfig:
        """Fewer samples, fewer N, fewer trials; every section still runs (under 90 s)."""
        return replace(
            cls(out_dir=out_dir, quick=True),
            overhead_warm=4,
            overhead_cold=3,
            ttft_warm=3,
            ttft_cold=2,
            # each llama node takes seconds to load: the quick run uses them on one broker only
            llama_brokers=("mosquitto",),
            concurrencies=(1, 16, 256),
            dispatch_seconds=0.6,
            dispatch_warmup_s=0.2,
            scaling_ns=(1, 8),
            scaling_seconds=0.8,
            scaling_warmup_s=0.3,
            real_scaling_seconds=1.0,
            real_warmup_s=0.5,
            race_requests=8,
            race_min_seconds=0.5,
            recovery_trials=2,
            recovery_task_s=0.6,
            linkdown_trials=2,
            memory_nodes=500,
            ensemble_prompts=4,
            memory_window_s=0.5,
            memory_idle_s=0.3,
        )
