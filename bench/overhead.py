"""1. Overhead: one direct llama-cpp-python call against the same request through the swarm.

Direct: ``Llama.create_chat_completion`` in the benchmark's process. Swarm: ``SwarmClient.ask``
in the benchmark's process → broker → hub (``swarm-hub serve``) → a real ``swarm-node run``
process with its own copy of the same model → broker → hub → broker → client. Same model,
prompt, seed, ``max_tokens``, temperature 0 and top_p (the node's 0.95 default), and one thread
each. Samples alternate direct/swarm so drift on a noisy machine hits both alike.

Prompt cache: llama-cpp-python reuses the evaluated prefix of the previous prompt. *Warm*
repeats one prompt (each side's model has just seen it); *cold* starts every prompt with a fresh
nonce, the same one on both sides, so both re-evaluate the same number of tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nova_swarm.broker.contract.messages import GenParams, PromptRequest
from nova_swarm.hub.client import SwarmClient

from .config import BenchConfig
from .section import SectionResult, Table, fmt
from .stack import Stack
from .stats import Summary, ratio
from .targets import Target

WARM_PROMPT = "Name three colours."
#: SwarmClient methods a streaming API might be called; the first present one is tried for TTFT
STREAM_METHODS = ("streaming",)
TTFT_MISSING = "not measured: streaming not available"


def bundled_model() -> str:
    from nova_swarm.node.models import bundled_model as find

    return str(find())


@asynccontextmanager
async def llama_node(stack: Stack, node_id: str, cfg: BenchConfig) -> AsyncIterator[int]:
    """A real ``swarm-node run`` on the bundled model; yields its pid once the hub sees it."""
    before = stack.watch.hub.nodes_online if stack.watch.hub else 0
    argv = stack.node_argv(
        node_id, "--model", bundled_model(), "--threads", str(cfg.llama_threads),
        "--heartbeat", str(cfg.node_heartbeat_s),
    )  # fmt: skip
    proc = stack.procs.spawn(f"node-{node_id}", argv)
    try:
        await stack.watch.nodes_online(before + 1, timeout=120)
        yield proc.pid
    finally:
        await stack.procs.stop(proc, grace=20)


def request(prompt: str, cfg: BenchConfig) -> PromptRequest:
    return PromptRequest(
        prompt=prompt, params=GenParams(max_tokens=cfg.max_tokens, temperature=0.0, seed=cfg.seed), timeout_s=120
    )


class Direct:
    """The bare library call, timed inside its worker thread (no event-loop hop counted)."""

    def __init__(self, cfg: BenchConfig) -> None:
        from llama_cpp import Llama

        self.cfg = cfg
        t = cfg.llama_threads
        self.llm = Llama(model_path=bundled_model(), n_ctx=2048, n_threads=t, n_threads_batch=t, verbose=False)

    def _complete(self, prompt: str, *, stream: bool) -> Any:
        """The same sampling settings the swarm's nodes use for the benchmark's requests."""
        return self.llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=self.cfg.max_tokens,
            temperature=0.0,
            top_p=0.95,
            seed=self.cfg.seed,
            stream=stream,
        )

    def call(self, prompt: str) -> tuple[float, str]:
        started = time.perf_counter()
        out = self._complete(prompt, stream=False)
        return (time.perf_counter() - started) * 1000, str(out["choices"][0]["message"]["content"] or "")

    def first_token(self, prompt: str) -> float:
        started = time.perf_counter()
        stream = self._complete(prompt, stream=True)
        first = None
        for chunk in stream:
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
        return ((first or time.perf_counter()) - started) * 1000


def stream_method(client: SwarmClient) -> str | None:
    return next((name for name in STREAM_METHODS if callable(getattr(client, name, None))), None)


async def _swarm_call(client: SwarmClient, prompt: str, cfg: BenchConfig) -> tuple[float, str, float | None]:
    """Latency, text, and the node's own generation time (its engine call, as it reports it)."""
    started = time.perf_counter()
    answer = await client.ask(request(prompt, cfg), timeout=120)
    generate = answer.timings.generate_ms if answer.timings is not None else None
    return (time.perf_counter() - started) * 1000, answer.text, generate


async def _swarm_first_token(client: SwarmClient, method: str, prompt: str, cfg: BenchConfig) -> float:
    """``SwarmClient.streaming``: an async context manager whose stream yields chunks, then the answer."""
    started = time.perf_counter()
    first = None
    async with getattr(client, method)(request(prompt, cfg), timeout=120) as stream:
        async for chunk in stream:
            if first is None and str(getattr(chunk, "text", None) or ""):
                first = time.perf_counter()
        await stream.answer()
    return ((first or time.perf_counter()) - started) * 1000


def _prompts(kind: str, count: int) -> list[str]:
    if kind == "warm":
        return [WARM_PROMPT] * count
    return [f"{uuid.uuid4().hex[:8]}: {WARM_PROMPT}" for _ in range(count)]


async def measure(stack: Stack, cfg: BenchConfig, direct: Direct) -> dict[str, Any]:
    """Run with one llama node online; the figures for one broker."""
    out: dict[str, Any] = {}
    async with SwarmClient(stack.client_url()) as client:
        for _ in range(2):  # warm-up, unmeasured: both models see the warm prompt
            await asyncio.to_thread(direct.call, WARM_PROMPT)
            await _swarm_call(client, WARM_PROMPT, cfg)
        for kind, count in (("warm", cfg.overhead_warm), ("cold", cfg.overhead_cold)):
            direct_ms: list[float] = []
            swarm_ms: list[float] = []
            node_ms: list[float] = []
            same = True
            for i, prompt in enumerate(_prompts(kind, count)):
                # Alternate which goes first, so neither always follows the other's noise.
                order = ("direct", "swarm") if i % 2 == 0 else ("swarm", "direct")
                texts: dict[str, str] = {}
                for side in order:
                    if side == "direct":
                        ms, texts[side] = await asyncio.to_thread(direct.call, prompt)
                        direct_ms.append(ms)
                    else:
                        ms, texts[side], generate = await _swarm_call(client, prompt, cfg)
                        swarm_ms.append(ms)
                        if generate is not None:
                            node_ms.append(generate)
                same = same and texts["direct"].strip() == texts["swarm"].strip()
            out[kind] = {
                "direct_ms": Summary.of(direct_ms).to_json(),
                "swarm_ms": Summary.of(swarm_ms).to_json(),
                # where the overhead goes: the node's engine call (llama-cpp streamed with a
                # token-counting logits processor) against the bare call, and the rest (messaging)
                "node_generate_ms": Summary.of(node_ms).to_json() if node_ms else None,
                "same_text": same,
                "samples_direct_ms": [round(x, 2) for x in direct_ms],
                "samples_swarm_ms": [round(x, 2) for x in swarm_ms],
            }
        out["ttft"] = await _ttft(client, direct, cfg)
    return out


async def _ttft(client: SwarmClient, direct: Direct, cfg: BenchConfig) -> dict[str, Any]:
    """Time to first token, the same way, once ``SwarmClient`` can stream."""
    method = stream_method(client)
    if method is None:
        return {"status": TTFT_MISSING}
    result: dict[str, Any] = {"status": "measured", "method": f"SwarmClient.{method}"}
    try:
        for kind, count in (("warm", cfg.ttft_warm), ("cold", cfg.ttft_cold)):
            d: list[float] = []
            s: list[float] = []
            await asyncio.to_thread(direct.first_token, WARM_PROMPT)
            await _swarm_first_token(client, method, WARM_PROMPT, cfg)
            for i, prompt in enumerate(_prompts(kind, count)):
                if i % 2 == 0:
                    d.append(await asyncio.to_thread(direct.first_token, prompt))
                    s.append(await _swarm_first_token(client, method, prompt, cfg))
                else:
                    s.append(await _swarm_first_token(client, method, prompt, cfg))
                    d.append(await asyncio.to_thread(direct.first_token, prompt))
            result[kind] = {"direct_ms": Summary.of(d).to_json(), "swarm_ms": Summary.of(s).to_json()}
    except Exception as exc:  # a streaming API whose shape this benchmark does not know
        return {"status": f"not measured: SwarmClient.{method} failed: {type(exc).__name__}: {exc}"}
    return result


# ---------------------------------------------------------------- report

#: the issue's p50 overhead targets, per broker (ms)
OVERHEAD_TARGET_MS = {"amqtt": 5.0, "mosquitto": 2.0}
RATIO_TARGET = 1.05


def section(by_broker: dict[str, dict[str, Any]], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    rows: list[tuple[str, ...]] = []
    ttft_rows: list[tuple[str, ...]] = []
    targets: list[Target] = []
    for broker, data in by_broker.items():
        for kind in ("warm", "cold"):
            d, s = data[kind]["direct_ms"], data[kind]["swarm_ms"]
            over50, over99 = s["p50"] - d["p50"], s["p99"] - d["p99"]
            r50 = ratio(s["p50"], d["p50"])
            data[kind]["overhead_p50_ms"] = round(over50, 3)
            data[kind]["overhead_p99_ms"] = round(over99, 3)
            data[kind]["ratio_p50"] = None if r50 is None else round(r50, 4)
            gen = data[kind].get("node_generate_ms")
            engine50 = gen["p50"] - d["p50"] if gen else None
            path50 = s["p50"] - gen["p50"] if gen else None
            rows.append(
                (broker, kind, fmt(d["p50"]), fmt(s["p50"]), fmt(over50, "+.1f"), fmt(r50, ".3f"),
                 fmt(d["p99"]), fmt(s["p99"]), fmt(over99, "+.1f"), fmt(engine50, "+.1f"), fmt(path50, ".1f"),
                 "yes" if data[kind]["same_text"] else "NO")
            )  # fmt: skip
            for kind_note in (kind,):
                targets.append(
                    Target("overhead", f"p50 overhead, {broker}, {kind_note}", "<=", OVERHEAD_TARGET_MS[broker],
                           " ms", over50)
                )  # fmt: skip
                targets.append(Target("overhead", f"p50 latency ratio, {broker}, {kind_note}", "<=", RATIO_TARGET, "",
                                      r50))  # fmt: skip
        ttft = data.get("ttft", {"status": TTFT_MISSING})
        if ttft.get("status") == "measured":
            for kind in ("warm", "cold"):
                d, s = ttft[kind]["direct_ms"], ttft[kind]["swarm_ms"]
                ttft_rows.append(
                    (broker, kind, fmt(d["p50"]), fmt(s["p50"]), fmt(s["p50"] - d["p50"], "+.1f"),
                     fmt(ratio(s["p50"], d["p50"]), ".3f"), fmt(d["p99"]), fmt(s["p99"]))
                )  # fmt: skip
        else:
            ttft_rows.append((broker, "-", "-", "-", "-", "-", "-", str(ttft.get("status"))))
    tables = (
        Table(
            ("broker", "cache", "direct p50", "swarm p50", "overhead p50", "ratio p50", "direct p99", "swarm p99",
             "overhead p99", "of which node engine p50", "outside the engine p50", "same text"),
            tuple(rows),
            "full answer latency, ms",
        ),
        Table(
            ("broker", "cache", "direct p50", "swarm p50", "overhead p50", "ratio p50", "direct p99", "swarm p99"),
            tuple(ttft_rows),
            "time to first token (TTFT), ms",
        ),
    )  # fmt: skip
    notes = (
        f"SmolLM2-135M Q4_1, max_tokens {cfg.max_tokens}, temperature 0, seed {cfg.seed}, top_p 0.95, "
        f"{cfg.llama_threads} llama thread per side; {cfg.overhead_warm} warm and {cfg.overhead_cold} cold samples "
        f"per side, alternating (TTFT: {cfg.ttft_warm} and {cfg.ttft_cold}, through SwarmClient.streaming).",
        "direct: llama-cpp-python in the benchmark process. swarm: SwarmClient in the benchmark process, broker, "
        "`swarm-hub serve` and `swarm-node run` each in their own process.",
        "node engine = the node's reported generate time minus the direct call (the engine streams and counts "
        "tokens in Python); outside the engine = swarm latency minus the node's generate time (messaging, hub, "
        "node agent).",
    )
    return SectionResult("overhead", "1. Overhead: direct llama-cpp call vs the swarm path", dict(by_broker),
                         tables, tuple(targets), notes, errors)  # fmt: skip
