"""The ``Engine`` protocol: what a node needs from an inference backend.

Engines are blocking by design: llama-cpp-python calls block, so the node runs ``generate`` in a
worker thread (ctypes releases the GIL) and heartbeats and cancels keep flowing meanwhile.
Engines register themselves under the ``nova_swarm.engines`` entry point, built-ins included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from nova_swarm.broker.contract.errors import ConfigError

#: what an engine can do beyond plain chat; the node announces these (``messages.Capability``)
STREAM, EMBED, JSON_SCHEMA, TOOLS, COMPLETE = "stream", "embed", "json_schema", "tools", "complete"


@dataclass(frozen=True, slots=True)
class EngineInfo:
    name: str
    sha256: str
    size_bytes: int
    ctx: int
    threads: int
    capabilities: frozenset[str] = frozenset({STREAM})


@dataclass(frozen=True, slots=True)
class Sampling:
    """Already clamped to the node's limits."""

    max_tokens: int
    temperature: float
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: llama.cpp's sampling knobs; None: the engine's default (engines that lack one ignore it)
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    typical_p: float | None = None


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


@dataclass(frozen=True, slots=True)
class Embedding:
    #: one vector per input text, each of unit length
    vectors: list[list[float]]
    prompt_tokens: int
    embed_s: float


#: a chat message as chat templates take it: OpenAI's shape (role, content, maybe tool_calls)
Message = Mapping[str, Any]


class Engine(Protocol):
    @property
    def info(self) -> EngineInfo: ...

    def generate(
        self,
        messages: Sequence[Message],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        *,
        schema: Mapping[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Blocking. Must check ``should_stop`` between tokens and return early when it is true.

        ``schema``: the output must be JSON matching this JSON Schema (engines with
        ``json_schema`` in their capabilities constrain sampling to it). ``on_text`` is called
        from the generating thread with each new piece of text, in order; the pieces join up to
        ``Generation.text``."""
        ...

    def complete(
        self,
        prompt: str,
        sampling: Sampling,
        should_stop: Callable[[], bool],
        *,
        schema: Mapping[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Blocking: the model's continuation of ``prompt`` as it is, with no chat template
        (``Generation.text`` is what follows the prompt, not the prompt). Otherwise as
        ``generate``. Only engines with ``complete`` in their capabilities; others raise
        EngineError."""
        ...

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Blocking. Only engines with ``embed`` in their capabilities; others raise EngineError."""
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
