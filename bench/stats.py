"""Summary statistics for latency samples: pure functions, no I/O, tested directly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default).

    Small samples are the norm here (20 recovery trials), so no rank rounding: p99 of 20 samples
    lies between the two largest, rather than being silently the maximum or the second largest.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0-100, not {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Summary:
    """One set of latencies (ms) or durations (s), in whatever unit they were given."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            raise ValueError("no samples to summarise")
        return cls(
            n=len(samples),
            p50=percentile(samples, 50),
            p95=percentile(samples, 95),
            p99=percentile(samples, 99),
            max=max(samples),
            mean=sum(samples) / len(samples),
        )

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when the denominator is zero (nothing measured)."""
    if denominator == 0:
        return None
    return numerator / denominator


def efficiency(throughput: float, nodes: int, single_node_throughput: float) -> float | None:
    """How close N nodes come to N times one node: 1.0 is perfect linear scaling."""
    return ratio(throughput, nodes * single_node_throughput)


def tail_cut(baseline_ms: float, raced_ms: float) -> float | None:
    """The fraction of a tail latency that racing removed (0.6: the p99 is 60 % lower)."""
    if baseline_ms <= 0:
        return None
    return 1.0 - raced_ms / baseline_ms
