"""The llama-cpp-python engine: one model, in-process, chat completion, raw text completion
and embeddings.

The one place where llama-cpp's exceptions become ``EngineError``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import structlog

from nova_swarm.broker.contract.errors import ConfigError, EngineError

from .engine import COMPLETE, EMBED, JSON_SCHEMA, STREAM, TOOLS, Embedding, EngineInfo, Generation, Message, Sampling
from .memory import read_metadata
from .models import model_name, sha256_file
from .tools import as_text_turns

log = structlog.get_logger("nova_swarm.node")

#: grammars kept, by canonical schema text: a node mostly sees the same few schemas again
GRAMMAR_CACHE_SIZE = 32

#: JSON Schema keywords llama-cpp's grammar converter silently ignores and that decide the
#: shape of a valid answer: a grammar without them would make answers that look right and are
#: not, so such a schema is refused up front. Ignored keywords that only narrow a value
#: (minimum, maximum, multipleOf, uniqueItems, unknown formats) are let through: a model
#: usually honours them from the description, and the hub validates every answer anyway.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "contains",
        "minProperties",
        "maxProperties",
    }
)


#: one character inside a JSON string, in GBNF: anything but a quote, a backslash or a control
#: character, or an escape
JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


#: chat formats of llama-cpp-python for architectures whose GGUF may come without a chat template
#: (a base model's): without one, llama-cpp falls back to Llama 2's format, which such a model
#: answers with an immediate end of turn
_CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}


def fallback_chat_format(path: Path) -> str | None:
    """The chat format for a GGUF that carries no chat template of its own, by its architecture
    (None: it has a template, or llama-cpp's default is all there is)."""
    try:
        meta = read_metadata(path)
    except ConfigError:
        return None  # llama-cpp then says what is wrong with the file
    if meta.get("tokenizer.chat_template"):
        return None
    arch = meta.get("general.architecture")
    chosen = _CHAT_FORMATS.get(arch) if isinstance(arch, str) else None
    log.warning("the model has no chat template", model=path.name, chat_format=chosen or "llama-cpp's default")
    return chosen


class LlamaEngine:
    def __init__(
        self,
        *,
        model_path: str | Path,
        ctx: int = 2048,
        threads: int | None = None,
        name: str | None = None,
        embeddings: bool = True,
        sha256: str | None = None,
    ) -> None:
        """``sha256``: the file's hash, when the caller has it already (hashing takes a phone
        seconds); else it is computed here."""
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist")
        try:
            from llama_cpp import Llama, LogitsProcessorList
        except ImportError as exc:
            raise ConfigError("the llama engine needs llama-cpp-python: pip install 'nova-swarm[node]'") from exc
        self._processors = LogitsProcessorList
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._path, self._ctx, self._threads = path, ctx, threads
        chat_format = fallback_chat_format(path)
        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                chat_format=chat_format,
            )
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"llama-cpp could not load {path}: {exc}") from exc
        capabilities = {STREAM, JSON_SCHEMA, TOOLS, COMPLETE} | ({EMBED} if embeddings else set())
        self._info = EngineInfo(
            name=name or model_name(path),
            sha256=sha256 or sha256_file(path),
            size_bytes=path.stat().st_size,
            ctx=ctx,
            threads=threads,
            capabilities=frozenset(capabilities),
        )
        # One Llama context is not safe to use from two threads at once.
        self._lock = threading.Lock()
        self._closed = False
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        # The embedding context: made on first use (a phone may never need it), with its own
        # lock so that embedding does not wait for a generation. It cannot share the chat
        # context: llama.cpp fixes embedding mode and pooling when a context is made, and a
        # pooled pass needs the whole text in one batch. Its size is counted by memory.py.
        self._embedder: Any = None
        self._embed_lock = threading.Lock()

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def embedding_loaded(self) -> bool:
        """Whether the embedding context is in memory: only once an embed request came."""
        return self._embedder is not None

    # ------------------------------------------------------------ chat

    def generate(
        self,
        messages: Sequence[Message],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        *,
        schema: Mapping[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        def start(**common: Any) -> Any:
            # Templates know system/user/assistant; tool calls and results become text.
            return self._llm.create_chat_completion(messages=as_text_turns(messages), **common)  # type: ignore[arg-type]

        def text_of(choice: Mapping[str, Any]) -> str:
            return str(choice["delta"].get("content") or "")

        return self._run(start, text_of, sampling, should_stop, schema=schema, on_text=on_text)

    # ------------------------------------------------------------ raw text completion

    def complete(
        self,
        prompt: str,
        sampling: Sampling,
        should_stop: Callable[[], bool],
        *,
        schema: Mapping[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """The continuation of ``prompt`` as it is: no chat template, as llama-server's
        ``/completion`` (special tokens written in the text, such as ``<|im_start|>``, are read
        as those tokens, as llama-server reads them)."""

        def start(**common: Any) -> Any:
            return self._llm.create_completion(prompt=prompt, **common)

        def text_of(choice: Mapping[str, Any]) -> str:
            return str(choice.get("text") or "")

        return self._run(start, text_of, sampling, should_stop, schema=schema, on_text=on_text)

    def _run(
        self,
        start: Callable[..., Any],
        text_of: Callable[[Mapping[str, Any]], str],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        *,
        schema: Mapping[str, Any] | None,
        on_text: Callable[[str], None] | None,
    ) -> Generation:
        """One streamed generation, chat or raw: ``start`` opens llama-cpp's stream with the
        sampling arguments, ``text_of`` takes the new text out of one chunk's choice."""
        # llama-cpp's streaming APIs take no stopping criteria here, so we stream and stop
        # between chunks, and count tokens with a pass-through logits processor: it runs once
        # per sampled token and sees the whole context, which gives exact usage and time to
        # first token.
        prompt_tokens: list[int] = []
        token_times: list[float] = []

        def count_tokens(input_ids: Any, scores: Any) -> Any:
            if not token_times:
                prompt_tokens.append(len(input_ids))
            token_times.append(time.monotonic())
            return scores

        pieces: list[str] = []
        finish_reason = "stop"
        stopped = False
        with self._lock:
            if self._closed:
                raise EngineError("the engine is closed")
            grammar = self._grammar(schema) if schema is not None else None
            started = time.monotonic()
            stream: Any = None
            try:
                stream = start(
                    max_tokens=sampling.max_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p if sampling.top_p is not None else 0.95,
                    seed=sampling.seed,
                    stop=list(sampling.stop),
                    # llama-cpp-python's own defaults where the request gives none
                    **{
                        name: value
                        for name, value in (
                            ("top_k", sampling.top_k),
                            ("min_p", sampling.min_p),
                            ("repeat_penalty", sampling.repeat_penalty),
                            ("typical_p", sampling.typical_p),
                        )
                        if value is not None
                    },
                    logits_processor=self._processors([count_tokens]),
                    grammar=grammar,
                    stream=True,
                )
                for chunk in cast(Iterator[dict[str, Any]], stream):
                    choice = chunk["choices"][0]
                    piece = text_of(choice)
                    if piece:
                        pieces.append(piece)
                        if on_text is not None:
                            on_text(piece)
                    if choice.get("finish_reason"):
                        finish_reason = str(choice["finish_reason"])
                    if should_stop():
                        stopped = True
                        break
            except (RuntimeError, ValueError) as exc:
                raise EngineError(f"llama-cpp failed: {exc}") from exc
            finally:
                # Also when on_text raised: a half-run generator must not outlive the lock.
                if stream is not None:
                    cast(Generator[Any, None, None], stream).close()
            elapsed = time.monotonic() - started
        return Generation(
            text="".join(pieces),
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens[0] if prompt_tokens else 0,
            completion_tokens=len(token_times),
            ttft_s=(token_times[0] - started) if token_times else None,
            generate_s=elapsed,
            stopped=stopped,
        )

    def _grammar(self, schema: Mapping[str, Any]) -> Any:
        """The grammar for a JSON schema, from the cache or built (under ``self._lock``)."""
        # Canonical up to whitespace, not key order: the order of properties in the schema is
        # the order the grammar writes them in.
        try:
            key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise EngineError(f"the JSON schema is not JSON: {exc}") from exc
        if key in self._grammars:
            self._grammars.move_to_end(key)
            return self._grammars[key]
        from llama_cpp import LlamaGrammar, llama_cpp
        from llama_cpp.llama_grammar import PRIMITIVE_RULES, json_schema_to_gbnf

        problem = unsupported(schema)
        if problem is not None:
            raise EngineError(f"cannot follow this JSON schema: {problem}")
        try:
            gbnf = json_schema_to_gbnf(key)
        # The converter reports with assert, KeyError, AttributeError... on what it cannot read.
        except Exception as exc:
            raise EngineError(f"cannot turn the JSON schema into a grammar: {type(exc).__name__}: {exc}") from exc
        # llama-cpp-python's copy of the converter lets raw control characters (a newline) into
        # strings, which makes invalid JSON; llama.cpp's own converter has since excluded them.
        loose = f" ::= {PRIMITIVE_RULES['char'].content}"
        gbnf = "\n".join(
            line.removesuffix(loose) + f" ::= {JSON_CHAR}" if line.endswith(loose) else line
            for line in gbnf.splitlines()
        )
        # llama.cpp parses the grammar only when sampling starts, and a grammar it cannot parse
        # would then be a null pointer in the sampler chain: parse it once here.
        sampler = llama_cpp.llama_sampler_init_grammar(self._llm._model.vocab, gbnf.encode(), b"root")
        if not sampler:
            raise EngineError("cannot follow this JSON schema: llama.cpp refused the grammar made from it")
        llama_cpp.llama_sampler_free(sampler)
        grammar = LlamaGrammar.from_string(gbnf, verbose=False)
        self._grammars[key] = grammar
        if len(self._grammars) > GRAMMAR_CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar

    # ------------------------------------------------------------ embeddings

    def embed(self, texts: Sequence[str]) -> Embedding:
        """One unit vector per text: the mean of the model's last hidden states over the text.

        A text longer than the context is refused, not truncated: a vector of the first part
        would silently stand for the whole text (a search would never find the rest), and the
        caller can split the text where it makes sense. OpenAI refuses too."""
        if EMBED not in self._info.capabilities:
            raise EngineError("this engine was started without embeddings")
        with self._embed_lock:
            if self._closed:
                raise EngineError("the engine is closed")
            llm = self._embedding_context()
            started = time.monotonic()
            try:
                counts = [len(llm.tokenize(text.encode())) for text in texts]
                for i, count in enumerate(counts):
                    if count > self._ctx:
                        raise EngineError(f"text {i} has {count} tokens, more than the context of {self._ctx}")
                raw = llm.embed(list(texts), normalize=False, truncate=False) if texts else []
            except (RuntimeError, ValueError) as exc:
                raise EngineError(f"llama-cpp failed to embed: {exc}") from exc
            elapsed = time.monotonic() - started
        return Embedding(vectors=[_unit(v) for v in raw], prompt_tokens=sum(counts), embed_s=elapsed)

    def _embedding_context(self) -> Any:
        if self._embedder is None:
            from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

            try:
                # The batch holds the whole context: with pooling, a text is decoded in one go.
                self._embedder = Llama(
                    model_path=str(self._path),
                    embedding=True,
                    pooling_type=LLAMA_POOLING_TYPE_MEAN,
                    n_ctx=self._ctx,
                    n_batch=self._ctx,
                    n_ubatch=self._ctx,
                    n_threads=self._threads,
                    n_threads_batch=self._threads,
                    verbose=False,
                )
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"llama-cpp could not load {self._path} for embeddings: {exc}") from exc
        return self._embedder

    def close(self) -> None:
        with self._lock:  # never under a running generation
            if not self._closed:
                self._closed = True
                self._llm.close()
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise EngineError("llama-cpp returned an embedding that cannot be normalised")
    return [x / norm for x in vector]


def unsupported(schema: Any, where: str = "schema") -> str | None:
    """What in a JSON schema the grammar cannot enforce (see ``UNSUPPORTED_KEYWORDS``), or None.

    Also refuses ``$ref`` outside the schema: the converter would try to fetch it over the
    network (its guard is an ``assert``, gone under ``python -O``)."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            if (problem := unsupported(item, f"{where}[{i}]")) is not None:
                return problem
        return None
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in UNSUPPORTED_KEYWORDS:
            return f"{where} uses {key!r}, which the grammar cannot enforce"
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
            return f"{where} has $ref {value!r}; only local references (#/...) are supported"
        if key == "type" and isinstance(value, list) and {"properties", "items"} & set(schema):
            return f"{where} lists several types together with properties or items; use anyOf"
        # The values under these are names or data, not schemas: a property called "not" is fine.
        if key in ("properties", "$defs", "definitions"):
            if isinstance(value, dict):
                for name, sub in value.items():
                    if (problem := unsupported(sub, f"{where}.{key}.{name}")) is not None:
                        return problem
        elif key not in ("enum", "const", "default", "examples", "required"):
            if (problem := unsupported(value, f"{where}.{key}")) is not None:
                return problem
    return None
