"""The HTTP gateway as OpenAI clients use it: the official ``openai`` package against a real
gateway, a real amqtt broker, a real hub and a real llama-cpp node on the bundled SmolLM2."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from nova_swarm.broker.contract.messages import Cancel, decode
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub import Hub
from nova_swarm.hub.gateway import Gateway
from nova_swarm.hub.gateway_config import GatewayConfig
from nova_swarm.node.llama import LlamaEngine

from .conftest import RunningBroker, bundled_model_path, hub_config, nodes_available, running_hub, running_node, until

pytestmark = pytest.mark.llama
T = Topics("main")
MODEL = "SmolLM2-135M-Instruct.Q4_1"
LONG = "Write a very long story about a dragon who learns to bake bread, with many details."


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    """One llama context for the module: each test's node serves from it in turn."""
    yield LlamaEngine(model_path=bundled_model_path(), threads=2)


@dataclass
class Swarm:
    hub: Hub
    gateway: Gateway
    client: openai.AsyncOpenAI
    token: str

    @property
    def base(self) -> str:
        return self.gateway.base_url


@asynccontextmanager
async def gateway_for(broker: RunningBroker, home: SwarmHome) -> AsyncIterator[tuple[Gateway, openai.AsyncOpenAI]]:
    config = GatewayConfig(token=home.gateway_token(), port=0)
    async with Gateway(config, broker.url(Role.CLIENT)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=config.token, max_retries=0)
        try:
            yield gateway, client
        finally:
            await client.close()


async def models_listed(client: openai.AsyncOpenAI, expected: set[str], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while {m.id for m in (await client.models.list()).data} != expected:
        assert loop.time() < give_up, f"the gateway never listed {expected}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def swarm(amqtt: RunningBroker, home: SwarmHome, tmp_path: Path, engine: LlamaEngine) -> AsyncIterator[Swarm]:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, engine, "alpha", max_tokens=512):
            await nodes_available(hub, 1)
            async with gateway_for(amqtt, home) as (gateway, client):
                await models_listed(client, {MODEL})
                yield Swarm(hub, gateway, client, home.gateway_token())


def http(
    url: str, *, method: str = "GET", body: bytes | None = None, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def ahttp(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http, url, **kwargs)


# ---------------------------------------------------------------- what works


async def test_chat_completion(swarm: Swarm) -> None:
    completion = await swarm.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=24, temperature=0
    )
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and (choice.message.content or "").strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    extra = completion.model_extra or {}
    assert extra["swarm"]["node_id"] == "alpha" and extra["swarm"]["attempts"] == 1
    assert extra["swarm"]["strategy"] == "race" and extra["swarm"]["latency_ms"] > 0

    # the swarm's own options ride in the body; "auto" (or no model) lets any node answer
    completion = await swarm.client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        max_tokens=8,
        extra_body={"strategy": "race", "fanout": 1, "tags": ["greeting"], "timeout_s": 60},
    )
    assert completion.choices[0].message.content is not None

    status, _, body = await ahttp(f"{swarm.base}/health")
    health = {"status": "ok", "hub": "online", "nodes_online": 1, "max_tokens_limit": 4096}
    assert status == 200 and json.loads(body) == health
    status, _, body = await ahttp(f"{swarm.base}/v1/swarm/nodes", token=swarm.token)
    table = json.loads(body)
    assert status == 200 and [n["node_id"] for n in table["nodes"]] == ["alpha"] and table["ts"] > 0
    model = await swarm.client.models.retrieve(MODEL)
    assert model.owned_by == "nova-swarm" and (model.model_extra or {})["nodes"] == 1
    status, headers, page = await ahttp(f"{swarm.base}/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in page.lower()


async def test_streamed_chat_arrives_incrementally(swarm: Swarm) -> None:
    stream = await swarm.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": LONG}],
        max_tokens=96,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    texts: list[str] = []
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            texts.append(chunk.choices[0].delta.content)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(arrivals) >= 5, texts
    assert arrivals[-1] - arrivals[0] > 0.2, "the chunks came all at once"
    final, usage = chunks[-2], chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length")
    assert (final.model_extra or {})["swarm"]["node_id"] == "alpha"
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


async def test_embeddings(swarm: Swarm) -> None:
    result = await swarm.client.embeddings.create(model=MODEL, input=["the cat sat", "a dog ran"])  # base64
    assert [d.index for d in result.data] == [0, 1]
    size = len(result.data[0].embedding)
    assert size > 0 and len(result.data[1].embedding) == size
    assert result.data[0].embedding != result.data[1].embedding
    floats = await swarm.client.embeddings.create(model=MODEL, input="the cat sat", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, rel=1e-5, abs=1e-6)


async def test_json_schema_response(swarm: Swarm) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    completion = await swarm.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person. Answer with their name and age."}],
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), schema)


async def test_tool_call(swarm: Swarm) -> None:
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    completion = await swarm.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_tokens=80,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), parameters)


async def test_a_streamed_tool_call_comes_in_pieces_that_join_up(swarm: Swarm) -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    stream = await swarm.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        max_tokens=80,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}],
        tool_choice="required",
        stream=True,
    )
    deltas = []
    finish = None
    async for chunk in stream:
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert len(deltas) >= 2, "the arguments stream as the node writes them"
    first, *rest = deltas
    assert first.id and first.type == "function" and first.function and first.function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in rest)
    arguments = "".join((d.function.arguments or "") for d in deltas if d.function)
    jsonschema.validate(json.loads(arguments), parameters)


# ---------------------------------------------------------------- what fails, and how


async def test_auth_is_required(swarm: Swarm) -> None:
    status, headers, body = await ahttp(f"{swarm.base}/v1/models")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    wrong = openai.AsyncOpenAI(base_url=f"{swarm.base}/v1", api_key="sk-swarm-wrong-token-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        await wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    await wrong.close()


async def test_unknown_model_and_bad_bodies(swarm: Swarm) -> None:
    # one model in the swarm: an unknown name is answered by it (test_leniency.py has the rest)
    fallback = await swarm.client.chat.completions.create(
        model="gpt-5", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert fallback.model == MODEL
    with pytest.raises(openai.NotFoundError):
        await swarm.client.models.retrieve("gpt-5")
    with pytest.raises(openai.BadRequestError) as bad:
        await swarm.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert bad.value.code == "invalid_request" and "n=2" in bad.value.message
    status, _, body = await ahttp(
        f"{swarm.base}/v1/chat/completions", method="POST", body=b"{not json", token=swarm.token
    )
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_json"
    status, _, body = await ahttp(
        f"{swarm.base}/v1/chat/completions", method="POST", body=b"x" * (2 << 20), token=swarm.token
    )
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    with pytest.raises(openai.BadRequestError) as tokens:
        await swarm.client.embeddings.create(model=MODEL, input=[[1, 2, 10**7]])
    assert "not a cl100k_base token id" in tokens.value.message


async def test_a_deadline_gives_504(swarm: Swarm) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as late:
        await swarm.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": LONG}],
            max_tokens=400,
            extra_body={"timeout_s": 0.5},
        )
    assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"
    assert time.monotonic() - started < 10


async def test_a_client_gone_mid_stream_cancels_the_node(swarm: Swarm, amqtt: RunningBroker) -> None:
    async with Connection(amqtt.url(Role.HUB), client_id="test-cancel-watcher") as watcher:
        await watcher.subscribe(T.node_cancel("alpha"))
        stream = await swarm.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=400, stream=True
        )
        seen = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
                if seen == 3:
                    break
        await stream.close()  # the client goes away after three pieces
        gone = time.monotonic()
        async with asyncio.timeout(10):
            async for message in watcher.messages():
                cancel = decode(Cancel, message.payload)
                break
    assert cancel.task_id and time.monotonic() - gone < 10
    # the node is free again long before 400 tokens could have been generated
    await until(lambda: not any(n.inflight for n in swarm.hub.registry.nodes.values()), timeout=10, what="node free")


async def test_no_eligible_node_is_503_with_retry_after(
    amqtt: RunningBroker, home: SwarmHome, tmp_path: Path, engine: LlamaEngine
) -> None:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with gateway_for(amqtt, home) as (gateway, client):
            async with running_node(amqtt, engine, "alpha"):
                await nodes_available(hub, 1)
                await models_listed(client, {MODEL})
            # the only node serving the model went offline: the model is known, nothing serves it
            await models_listed(client, set())
            with pytest.raises(openai.InternalServerError) as unavailable:
                await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            response = unavailable.value.response
            assert response.status_code == 503 and unavailable.value.code == "no_eligible_nodes"
            assert int(response.headers["retry-after"]) >= 1
            status, _, body = await ahttp(f"{gateway.base_url}/health")
            assert status == 200 and json.loads(body)["nodes_online"] == 0
