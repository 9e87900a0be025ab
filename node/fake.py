"""A scripted engine for scheduling tests: chosen replies and delays, no model.

Never a stand-in for the thing a test is about: tests of inference use ``LlamaEngine``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

from .engine import EngineInfo, Generation, Sampling

TextRule = Callable[[str], str]
DelayRule = Callable[[str], float]


class FakeEngine:
    def __init__(
        self,
        *,
        name: str = "fake",
        reply: str | TextRule = "ok",
        delay_s: float | DelayRule = 0.0,
        fail_with: str | None = None,
    ) -> None:
        self._reply = reply if callable(reply) else (lambda _prompt, text=reply: text)
        self._delay = delay_s if callable(delay_s) else (lambda _prompt, d=delay_s: d)
        self._fail_with = fail_with
        self._info = EngineInfo(
            name=name, sha256=hashlib.sha256(name.encode()).hexdigest(), size_bytes=0, ctx=2048, threads=1
        )
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def info(self) -> EngineInfo:
        return self._info

    def generate(
        self, messages: Sequence[dict[str, str]], sampling: Sampling, should_stop: Callable[[], bool]
    ) -> Generation:
        with self._lock:
            self.calls += 1
        prompt = messages[-1]["content"] if messages else ""
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
        text = "" if stopped else self._reply(prompt)
        words = text.split()[: sampling.max_tokens]
        return Generation(
            text=" ".join(words),
            finish_reason="stop",
            prompt_tokens=sum(len(m["content"].split()) for m in messages),
            completion_tokens=len(words),
            ttft_s=None,
            generate_s=time.monotonic() - started,
            stopped=stopped,
        )

    def close(self) -> None:
        pass
