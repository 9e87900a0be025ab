"""Will a model fit in this device's RAM? What a GGUF needs, and what the node may use.

    budget = parse_budget("phone-2gb")            # or "700M", "2G", None (no cap)
    policy = RamPolicy(budget_bytes=budget, ctx=2048, embeddings=True)
    needs = policy.check(path)                     # ConfigError when it does not fit

A model needs its weights, its chat context (the KV cache plus llama.cpp's compute and output
buffers) and, when it serves embeddings, a second context that loads on the first embed request
(``llama.py``). The KV cache comes from the GGUF's own metadata (layers, KV heads, head sizes),
read straight from the file header without loading the model. The buffers are estimated from the
vocabulary and the batch sizes llama-cpp-python uses; the constants below were measured against
llama-cpp-python 0.3 on SmolLM2-135M and Gemma 3 270M and err on the high side. The check
refuses rather than lets Android's low-memory killer end the whole node mid-task.

What the node may use is the smaller of what the OS calls available (``MemAvailable``) and the
budget the owner set with ``--ram-budget`` / ``NOVA_SWARM_RAM_BUDGET``: a size, or a device
profile such as ``phone-2gb`` that stands for what a 2 GB phone leaves free once Android and its
apps have their share. The budget is also how a test simulates a small phone on a big machine.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from nova_swarm.broker.contract.errors import ConfigError

#: the environment variable that sets the budget when ``--ram-budget`` is not given
BUDGET_ENV = "NOVA_SWARM_RAM_BUDGET"

MB = 2**20

#: what a phone of each size leaves free for us, with Android, its services and a browser up
PROFILES = {
    "phone-2gb": 700 * MB,
    "phone-3gb": 1200 * MB,
    "phone-4gb": 1800 * MB,
    "phone-6gb": 3000 * MB,
}

#: llama-cpp-python's default batch for chat; the embedding context's batch is the whole context
CHAT_BATCH = 512
#: bytes per KV cache element (llama.cpp keeps the cache in f16 by default)
KV_BYTES = 2
#: sequences an embedding context holds outputs for (llama-cpp-python asks for 256)
EMBED_SEQS = 256
#: the compute buffer's share that is not logits, in model widths per batch token (measured: 2-9)
WIDTHS_PER_TOKEN = 10
#: llama.cpp's fixed overhead per context (graph metadata, scratch)
CONTEXT_OVERHEAD = 8 * MB


# ---------------------------------------------------------------- sizes and budgets

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``700M``, ``2G``, ``1.5GB``, ``512MiB`` or a number of bytes; powers of 1024 throughout."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"{text!r} is not a size (like 700M or 2G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def parse_budget(text: str | None) -> int | None:
    """A size or a profile name (``phone-2gb``); None or empty: no budget."""
    if not text:
        return None
    name = text.strip().lower()
    if name in PROFILES:
        return PROFILES[name]
    if name.startswith("phone-") or not name[:1].isdigit():
        raise ConfigError(f"unknown RAM profile {text!r}; choose a size (700M, 2G) or one of {', '.join(PROFILES)}")
    size = parse_size(name)
    if size < MB:
        raise ConfigError(f"a RAM budget of {text!r} is too small to hold any model")
    return size


def budget_from(flag: str | None) -> int | None:
    """``--ram-budget``, else ``NOVA_SWARM_RAM_BUDGET``, else None."""
    return parse_budget(flag if flag is not None else os.environ.get(BUDGET_ENV))


def os_available() -> int | None:
    """What the OS would give us without swapping (psutil's ``available``), when it can tell."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, RuntimeError, AttributeError):  # Android can refuse /proc reads
        return None


def mb(size: int) -> str:
    return f"{size / MB:.0f} MB"


# ---------------------------------------------------------------- GGUF metadata


class GGUFError(ConfigError):
    pass


#: GGUF value types with a fixed size: their struct format
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: Path) -> Mapping[str, Any]:
    """The key/value metadata of a GGUF file, from its header alone (no tensors are read).

    Arrays come back as their length only: the tokenizer's 262 144 tokens are not worth a list.
    Read once per file as it is on disk: walking a big vocabulary takes a phone the better part
    of a second, and sizing a model, then loading it (every swap), both want the header."""
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise GGUFError(f"model file {path} does not exist") from exc
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc}") from exc
    return _metadata(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _metadata(path: Path, _size: int, _mtime_ns: int) -> Mapping[str, Any]:
    """``read_metadata`` for one version of a file (its size and mtime are the cache's key)."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
            if magic != b"GGUF":
                raise GGUFError(f"{path.name} is not a GGUF file")
            (version,) = _unpack(fh, "I")
            if version < 2:
                raise GGUFError(f"{path.name} is GGUF version {version}; llama.cpp reads only 2 and later")
            _tensors, count = _unpack(fh, "QQ")
            out: dict[str, Any] = {}
            for _ in range(count):
                key = _string(fh)
                (kind,) = _unpack(fh, "I")
                out[key] = _value(fh, kind)
            return MappingProxyType(out)  # shared by every caller: read-only
    except FileNotFoundError as exc:
        raise GGUFError(f"model file {path} does not exist") from exc
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc}") from exc
    except (struct.error, UnicodeDecodeError, MemoryError) as exc:
        raise GGUFError(f"{path.name} has a damaged GGUF header: {exc}") from exc


def _unpack(fh: IO[bytes], fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize("<" + fmt)
    data = fh.read(size)
    if len(data) != size:
        raise struct.error("file ends inside the header")
    return struct.unpack("<" + fmt, data)


def _string(fh: IO[bytes]) -> str:
    (length,) = _unpack(fh, "Q")
    if length > 1 << 24:
        raise struct.error(f"a string of {length} bytes")
    data = fh.read(length)
    if len(data) != length:
        raise struct.error("file ends inside a string")
    return data.decode("utf-8", "replace")


def _value(fh: IO[bytes], kind: int) -> Any:
    if kind in _FIXED:
        return _unpack(fh, _FIXED[kind])[0]
    if kind == _STRING:
        return _string(fh)
    if kind == _ARRAY:
        item, length = _unpack(fh, "IQ")
        if item in _FIXED:
            fh.seek(struct.calcsize("<" + _FIXED[item]) * length, os.SEEK_CUR)
        else:
            for _ in range(length):
                _value(fh, item)
        return length
    raise struct.error(f"unknown value type {kind}")


@dataclass(frozen=True, slots=True)
class Shape:
    """What sizes a model's contexts: from the GGUF metadata."""

    layers: int
    #: bytes of K and V per token per layer, all KV heads together
    kv_width: int
    vocab: int
    embedding: int

    @classmethod
    def of(cls, path: Path) -> Shape:
        meta = read_metadata(path)
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{path.name} does not name its architecture (general.architecture)")

        def number(key: str, default: int | None = None) -> int:
            value = meta.get(f"{arch}.{key}", default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                if default is not None:
                    return default
                raise GGUFError(f"{path.name} lacks {arch}.{key}, needed to size its context")
            return value

        layers = number("block_count")
        embedding = number("embedding_length")
        heads = number("attention.head_count")
        kv_heads = number("attention.head_count_kv", heads)
        key_length = number("attention.key_length", embedding // heads)
        value_length = number("attention.value_length", key_length)
        vocab = meta.get("tokenizer.ggml.tokens")
        vocab = number("vocab_size", vocab if isinstance(vocab, int) and vocab > 0 else 32000)
        return cls(layers=layers, kv_width=kv_heads * (key_length + value_length), vocab=vocab, embedding=embedding)


# ---------------------------------------------------------------- needs and the check


@dataclass(frozen=True, slots=True)
class Needs:
    """Bytes a model takes once loaded."""

    name: str
    weights: int
    context: int
    #: 0 when the engine serves no embeddings
    embeddings: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.context + self.embeddings

    def describe(self) -> str:
        parts = [f"weights {mb(self.weights)}", f"context {mb(self.context)}"]
        if self.embeddings:
            parts.append(f"embeddings {mb(self.embeddings)}")
        return f"~{mb(self.total)} ({' + '.join(parts)})"


def context_bytes(shape: Shape, ctx: int, *, batch: int, embeddings: bool = False) -> int:
    """What llama.cpp allocates for one context: the KV cache for ``ctx`` tokens, the compute
    buffer and the output buffer, as its own log reports them ("KV buffer size", "compute buffer
    size", "output buffer size").

    The compute buffer is dominated by the logits of a whole batch (batch x vocabulary floats,
    even in an embedding context), plus a few model widths per token; the output buffer holds
    one row of logits for chat, or logits and a vector for each of 256 sequences for embeddings.
    These are reservations: a short prompt touches less of them, a long one all of them, so the
    check counts them whole."""
    kv = ctx * shape.layers * shape.kv_width * KV_BYTES
    compute = batch * (shape.vocab + WIDTHS_PER_TOKEN * shape.embedding) * 4
    output = (shape.vocab + shape.embedding) * 4 * EMBED_SEQS if embeddings else shape.vocab * 4
    return kv + compute + output + CONTEXT_OVERHEAD


def estimate(path: Path, *, ctx: int, embeddings: bool, name: str | None = None) -> Needs:
    shape = Shape.of(path)
    chat_batch = min(CHAT_BATCH, ctx)
    return Needs(
        name=name or path.name.removesuffix(".gguf"),
        weights=path.stat().st_size,
        context=context_bytes(shape, ctx, batch=chat_batch),
        # The embedding context shares nothing with the chat one but the file's pages (mmap); its
        # batch is the whole context, so a text is pooled in one pass (see llama.py).
        embeddings=context_bytes(shape, ctx, batch=ctx, embeddings=True) if embeddings else 0,
    )


@dataclass(frozen=True, slots=True)
class RamPolicy:
    """How a node decides that a model fits: its budget and the contexts it would load."""

    #: the most the node may use for its model (``--ram-budget``); None: what the OS has free
    budget_bytes: int | None = None
    ctx: int = 2048
    #: the engine serves embeddings, so their context loads on the first embed request
    embeddings: bool = True
    #: where "available" comes from; a test or a phone-specific reader can stand in
    available: Callable[[], int | None] = os_available

    def room(self, *, freed: int = 0) -> int | None:
        """Bytes the node may use: ``freed`` is what the model it serves now gives back when
        it is closed before the next one loads."""
        free = self.available()
        free = None if free is None else free + freed
        if self.budget_bytes is None:
            return free
        return self.budget_bytes if free is None else min(free, self.budget_bytes)

    def needs(self, path: Path, name: str | None = None) -> Needs:
        return estimate(path, ctx=self.ctx, embeddings=self.embeddings, name=name)

    def check(self, path: Path, *, name: str | None = None, freed: int = 0) -> Needs:
        """What ``path`` needs, or ConfigError saying it does not fit and by how much."""
        needs = self.needs(path, name)
        self.check_needs(needs, freed=freed)
        return needs

    def check_needs(self, needs: Needs, *, freed: int = 0) -> None:
        """ConfigError unless ``needs`` fits, as ``check`` says it."""
        without = needs.total - needs.embeddings
        self._refuse_unless(needs.total, needs.name, needs.describe(), freed=freed, without=without)

    def check_size(self, size: int, name: str, *, freed: int = 0) -> None:
        """Before a download: the weights alone (the context is sized once the file is here)."""
        self._refuse_unless(size, name, f"~{mb(size)} for its weights alone", freed=freed, without=None)

    def _refuse_unless(self, total: int, name: str, described: str, *, freed: int, without: int | None) -> None:
        room = self.room(freed=freed)
        if room is None or total <= room:
            return
        where = f"the RAM budget of {mb(self.budget_bytes)}" if room == self.budget_bytes else "free RAM"
        message = f"{name} needs {described} but only {mb(room)} is available ({where})"
        if without is not None and without != total and without <= room:
            message += f"; without embeddings it needs ~{mb(without)}: --engine-option embeddings=false"
        raise ConfigError(message)
