"""What the gateway's APIs accept beyond their own fields, shared by the OpenAI, Ollama and
Anthropic shapes. No I/O.

Peers are lenient, and clients count on it: SillyTavern, Open WebUI and Continue send
llama.cpp's sampling fields to any OpenAI-style server, and Ollama's ``options`` carry the same
knobs under other names. So:

- llama.cpp's sampling fields are *honoured*: they travel in ``GenParams`` to the node, and
  llama-cpp-python samples with them (:data:`LLAMA_SAMPLING`);
- fields that change nothing a client could notice here are *accepted and ignored*, and every
  response names them in the :data:`IGNORED_HEADER` header, so nobody has to guess;
- fields that would silently change the meaning of a request (``n: 3``, ``logprobs: true``,
  Mirostat) are still refused, each API in its own error shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: the response header listing the request's fields that were accepted but changed nothing
IGNORED_HEADER = "X-Swarm-Ignored-Fields"

#: llama.cpp's sampling fields, under the names ``GenParams`` (and llama-server) give them
LLAMA_SAMPLING = ("top_k", "min_p", "repeat_penalty", "typical_p")

#: llama-server's extras that change no answer here. ``cache_prompt``: llama-cpp-python keeps
#: its own prompt cache whatever the request says; ``id_slot``/``slot_id``: the hub picks the node.
LLAMA_NO_OPS = frozenset({"cache_prompt", "id_slot", "slot_id"})


def ignored_header(names: Iterable[str]) -> dict[str, str]:
    """The response headers that list ``names`` (none when nothing was ignored)."""
    listed = sorted(set(names))
    return {IGNORED_HEADER: ", ".join(listed)} if listed else {}


class OptionError(ValueError):
    """An Ollama option this swarm cannot honour at the value given; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True, slots=True)
class Options:
    """Ollama's ``options``, as ``GenParams`` fields plus the names that changed nothing."""

    #: GenParams fields (``max_tokens``, ``temperature``, ``top_k``...)
    params: dict[str, Any]
    #: option names accepted and ignored, for :func:`ignored_header` (as ``options.<name>``)
    ignored: tuple[str, ...]


#: Ollama's option names for GenParams fields
_OLLAMA_PARAMS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "seed": "seed",
    "stop": "stop",
}

#: options about how a server runs the model (memory, threads, GPUs, its context size): each
#: node runs its model its own way, and none of these changes what the model says
_OLLAMA_RUNTIME = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_keep",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "rope_frequency_base",
        "rope_frequency_scale",
    }
)

#: sampler options honoured only at the value that switches them off
_OLLAMA_OFF: dict[str, tuple[Any, ...]] = {
    "mirostat": (0,),
    "tfs_z": (1, 1.0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "penalize_newline": (True, False),  # gone from llama.cpp's sampler: no value changes anything
    "repeat_last_n": (64,),  # llama-cpp-python's fixed window
}


def ollama_options(options: Mapping[str, Any] | None) -> Options:
    """Ollama's ``options`` object as GenParams fields; OptionError for one we cannot honour."""
    params: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in (options or {}).items():
        if value is None:
            continue
        if name in _OLLAMA_PARAMS:
            if name == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                continue  # -1 (until the model stops) and -2 (fill the context): the default here
            if name == "stop" and isinstance(value, str):
                value = [value]
            params[_OLLAMA_PARAMS[name]] = value
        elif name in _OLLAMA_RUNTIME:
            ignored.append(f"options.{name}")
        elif name in _OLLAMA_OFF:
            if value not in _OLLAMA_OFF[name] or isinstance(value, bool) != isinstance(_OLLAMA_OFF[name][0], bool):
                raise OptionError(name, f"options.{name}={value!r} is not supported by this swarm")
            ignored.append(f"options.{name}")
        else:
            raise OptionError(name, f"unknown option {name!r}")
    return Options(params=params, ignored=tuple(ignored))
