"""The ``Engine`` protocol: what a node needs from an inference backend.

Engines are blocking by design: llama-cpp-python calls block, so the node runs ``generate`` in a
worker thread (ctypes releases the GIL) and heartbeats and cancels keep flowing meanwhile.
Engines register themselves under the ``nova_swarm.engines`` entry point, built-ins included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from nova_swarm.broker.errors import ConfigError


@dataclass(frozen=True, slots=True)
class EngineInfo:
    name: str
    sha256: str
    size_bytes: int
    ctx: int
    threads: int


@dataclass(frozen=True, slots=True)
class Sampling:
    """Already clamped to the node's limits."""

    max_tokens: int
    temperature: float
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: seconds from the call to the first generated token, when the engine can tell
    ttft_s: float | None
    generate_s: float
    #: True when ``should_stop`` ended the generation early
    stopped: bool = False


class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    def generate(
        self, messages: Sequence[dict[str, str]], sampling: Sampling, should_stop: Callable[[], bool]
    ) -> Generation:
        """Blocking. Must check ``should_stop`` between tokens and return early when it is true."""
        ...

    def close(self) -> None: ...


def load_engine(name: str, **options: Any) -> Engine:
    """Build the engine registered under ``name`` in the ``nova_swarm.engines`` entry point."""
    found = {ep.name: ep for ep in entry_points(group="nova_swarm.engines")}
    if name not in found:
        raise ConfigError(f"unknown engine {name!r}; installed: {', '.join(sorted(found)) or 'none'}")
    factory = found[name].load()
    try:
        engine: Engine = factory(**options)
    except TypeError as exc:  # an option the engine does not take
        raise ConfigError(f"engine {name!r} cannot be built with {sorted(options)}: {exc}") from exc
    return engine
