"""The llama-cpp-python engine: one model, in-process, chat completion.

The one place where llama-cpp's exceptions become ``EngineError``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from nova_swarm.broker.errors import ConfigError, EngineError

from .engine import EngineInfo, Generation, Sampling
from .models import model_name, sha256_file


class LlamaEngine:
    def __init__(
        self, *, model_path: str | Path, ctx: int = 2048, threads: int | None = None, name: str | None = None
    ) -> None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist")
        try:
            from llama_cpp import Llama, LogitsProcessorList
        except ImportError as exc:
            raise ConfigError("the llama engine needs llama-cpp-python: pip install 'nova-swarm[node]'") from exc
        self._processors = LogitsProcessorList
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        try:
            self._llm = Llama(
                model_path=str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False
            )
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"llama-cpp could not load {path}: {exc}") from exc
        self._info = EngineInfo(
            name=name or model_name(path),
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size,
            ctx=ctx,
            threads=threads,
        )
        # One Llama context is not safe to use from two threads at once.
        self._lock = threading.Lock()
        self._closed = False

    @property
    def info(self) -> EngineInfo:
        return self._info

    def generate(
        self, messages: Sequence[dict[str, str]], sampling: Sampling, should_stop: Callable[[], bool]
    ) -> Generation:
        # llama-cpp's chat API takes no stopping criteria, so we stream and stop between chunks,
        # and count tokens with a pass-through logits processor: it runs once per sampled token
        # and sees the whole context, which gives exact usage and time to first token.
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
            started = time.monotonic()
            try:
                stream = self._llm.create_chat_completion(
                    messages=list(messages),  # type: ignore[arg-type]
                    max_tokens=sampling.max_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p if sampling.top_p is not None else 0.95,
                    seed=sampling.seed,
                    stop=list(sampling.stop),
                    logits_processor=self._processors([count_tokens]),
                    stream=True,
                )
                for chunk in cast(Iterator[dict[str, Any]], stream):
                    choice = chunk["choices"][0]
                    pieces.append(choice["delta"].get("content") or "")
                    if choice.get("finish_reason"):
                        finish_reason = str(choice["finish_reason"])
                    if should_stop():
                        stopped = True
                        cast(Generator[Any, None, None], stream).close()
                        break
            except (RuntimeError, ValueError) as exc:
                raise EngineError(f"llama-cpp failed: {exc}") from exc
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

    def close(self) -> None:
        with self._lock:  # never under a running generation
            if not self._closed:
                self._closed = True
                self._llm.close()
