"""A scripted engine for scheduling tests: chosen replies and delays, no model.

Never a stand-in for the thing a test is about: tests of inference use ``LlamaEngine``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nova_swarm.broker.contract.errors import EngineError

from .engine import COMPLETE, EMBED, JSON_SCHEMA, STREAM, TOOLS, Embedding, EngineInfo, Generation, Message, Sampling

TextRule = Callable[[str], str]
DelayRule = Callable[[str], float]

ALL_CAPABILITIES = frozenset({STREAM, EMBED, JSON_SCHEMA, TOOLS, COMPLETE})


class FakeEngine:
    def __init__(
        self,
        *,
        name: str = "fake",
        reply: str | TextRule = "ok",
        delay_s: float | DelayRule = 0.0,
        fail_with: str | None = None,
        dimension: int = 8,
        capabilities: frozenset[str] = ALL_CAPABILITIES,
        echo: bool = False,
    ) -> None:
        # ``echo``: the reply is the last message, then a markdown report of what reached the
        # engine (every message and the sampling) in a fenced JSON block, so that a test through
        # real processes can see what the node was given.
        self._echo = echo
        self._reply = reply if callable(reply) else (lambda _prompt, text=reply: text)
        self._delay = delay_s if callable(delay_s) else (lambda _prompt, d=delay_s: d)
        self._fail_with = fail_with
        self._dimension = dimension
        self._info = EngineInfo(
            name=name,
            sha256=hashlib.sha256(name.encode()).hexdigest(),
            size_bytes=0,
            ctx=2048,
            threads=1,
            capabilities=frozenset(capabilities),
        )
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def info(self) -> EngineInfo:
        return self._info

    def generate(
        self,
        messages: Sequence[Message],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        *,
        schema: Mapping[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """The scripted reply for the last message's content, cut to ``max_tokens`` words.

        ``schema`` is ignored on purpose: a test scripts an answer that breaks it to see what the
        hub does. With ``on_text``, each word streams as a piece (with the whitespace before it,
        so that line breaks, and markdown with them, come through)."""
        prompt = str(messages[-1].get("content") or "") if messages else ""
        return self._scripted(
            prompt,
            lambda: (self._echoed(messages, sampling) if self._echo else self._reply(prompt)).strip(),
            sampling,
            should_stop,
            on_text,
            prompt_tokens=sum(len(str(m.get("content") or "").split()) for m in messages),
        )

    def complete(
        self,
        prompt: str,
        sampling: Sampling,
        should_stop: Callable[[], bool],
        *,
        schema: Mapping[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """The scripted reply for the prompt as its continuation, leading whitespace kept (a
        continuation often starts with a space or a line break). With ``echo``, a fixed
        continuation that names what reached the engine: ``" ... (fake continuation of N
        characters, max_tokens M, temperature T)"``. Only with ``complete`` among the
        capabilities, as an engine that cannot would refuse."""
        if COMPLETE not in self._info.capabilities:
            raise EngineError("this engine cannot continue a raw text")

        def text() -> str:
            if self._echo:
                return (
                    f" ... (fake continuation of {len(prompt)} characters, max_tokens {sampling.max_tokens},"
                    f" temperature {sampling.temperature})"
                )
            return self._reply(prompt)

        return self._scripted(prompt, text, sampling, should_stop, on_text, prompt_tokens=len(prompt.split()))

    def _scripted(
        self,
        prompt: str,
        text: Callable[[], str],
        sampling: Sampling,
        should_stop: Callable[[], bool],
        on_text: Callable[[str], None] | None,
        *,
        prompt_tokens: int,
    ) -> Generation:
        """Wait the scripted delay (stopping early when asked), then give ``text()`` a word a
        token, cut to ``max_tokens``."""
        with self._lock:
            self.calls += 1
        started = time.monotonic()
        give_up = started + self._delay(prompt)
        stopped = False
        while time.monotonic() < give_up:
            if should_stop():
                stopped = True
                break
            time.sleep(min(0.01, max(0.0, give_up - time.monotonic())))
        if self._fail_with is not None:
            raise RuntimeError(self._fail_with)
        pieces = [] if stopped else re.findall(r"\s*\S+", text())[: sampling.max_tokens]
        sent: list[str] = []
        for piece in pieces:
            if on_text is not None:
                if should_stop():
                    stopped = True
                    break
                on_text(piece)
            sent.append(piece)
        return Generation(
            text="".join(sent),
            finish_reason="stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(sent),
            ttft_s=None,
            generate_s=time.monotonic() - started,
            stopped=stopped,
        )

    @staticmethod
    def _echoed(messages: Sequence[Message], sampling: Sampling) -> str:
        received = {
            "messages": [{"role": m.get("role"), "content": m.get("content")} for m in messages],
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
        }
        # The last message first, as it came (a chat page renders it as the answer's markdown).
        last = str(messages[-1].get("content") or "") if messages else ""
        return last + "\n\nThe node received:\n\n```json\n" + json.dumps(received, indent=1) + "\n```\n"

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Deterministic unit vectors from a hash of each text: equal texts, equal vectors."""
        if EMBED not in self._info.capabilities:
            raise EngineError("this engine was started without embeddings")
        started = time.monotonic()
        vectors = [self._vector(text) for text in texts]
        return Embedding(
            vectors=vectors, prompt_tokens=sum(len(t.split()) for t in texts), embed_s=time.monotonic() - started
        )

    def _vector(self, text: str) -> list[float]:
        raw: list[float] = []
        counter = 0
        while len(raw) < self._dimension:
            block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
            # 4 bytes a component, centred on zero
            raw += [int.from_bytes(block[i : i + 4], "big") / 2**31 - 1.0 for i in range(0, len(block), 4)]
            counter += 1
        raw = raw[: self._dimension]
        norm = math.sqrt(math.fsum(x * x for x in raw)) or 1.0
        return [x / norm for x in raw]

    def close(self) -> None:
        pass
