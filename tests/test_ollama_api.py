"""Ollama's API on the gateway: the translation on its own (``hub/ollama_api.py``), then the
official ``ollama`` Python client against a real gateway, a real amqtt broker, a real hub and a
real llama-cpp node on the bundled SmolLM2."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from nova_swarm.broker.contract.messages import (
    Answer,
    Cancel,
    NodeRow,
    NodeState,
    NodeTable,
    StreamChunk,
    Timings,
    ToolCall,
    Usage,
    decode,
)
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub import Hub
from nova_swarm.hub import ollama_api as api
from nova_swarm.hub.api_errors import ApiError
from nova_swarm.hub.gateway import Gateway
from nova_swarm.hub.gateway_config import GatewayConfig, check_header_name
from nova_swarm.hub.leniency import IGNORED_HEADER
from nova_swarm.hub.model_names import ModelNames
from nova_swarm.node.llama import LlamaEngine

from .conftest import (
    RunningBroker,
    bundled_model_path,
    hub_config,
    nodes_available,
    running_hub,
    running_node,
    stop_process,
    until,
)
from .test_completions import CODE, greedy, reference  # noqa: F401  (a fixture)

MODEL = "SmolLM2-135M-Instruct.Q4_1"
OTHER = "Qwen2.5-0.5B-Instruct.Q8_0"


# ---------------------------------------------------------------- translation (no I/O)


def row(node_id: str, model: str, *, ctx: int | None = 8192, capabilities: tuple[str, ...] = ()) -> NodeRow:
    return NodeRow(
        node_id=node_id,
        state=NodeState.ONLINE,
        model=model,
        tokens_per_s=None,
        battery_pct=None,
        charging=None,
        temp_c=None,
        busy=0,
        last_seen=None,
        agent_version=None,
        tags=[],
        ctx=ctx,
        max_tokens=512,
        capabilities=list(capabilities),  # type: ignore[arg-type]
    )


def answer(text: str = "Hello there.", **overrides: Any) -> Answer:
    fields: dict[str, Any] = {
        "id": "r1",
        "text": text,
        "node_id": "alpha",
        "model": MODEL,
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
        "timings": Timings(queue_ms=1.0, ttft_ms=20.0, generate_ms=50.0, tokens_per_s=60.0),
        "latency_ms": 80.0,
        "strategy": "race",
        "attempts": 1,
    }
    return Answer(**{**fields, **overrides})


def test_model_names_as_ollama_clients_write_them() -> None:
    one = {MODEL}
    assert api.resolve_model(MODEL, one) == MODEL
    assert api.resolve_model(f"{MODEL.lower()}:latest", one) == MODEL
    assert api.resolve_model(None, one) is None
    assert api.resolve_model("smollm2:latest", None) == "smollm2"  # no node table yet: the hub judges
    two = {MODEL, OTHER}
    strict = ModelNames(fallback=False)
    assert api.resolve_model("smollm2", two, strict) == MODEL
    assert api.resolve_model("SmolLM2:135m", two, strict) == MODEL
    assert api.resolve_model("qwen2.5:latest", two, strict) == OTHER
    for unknown in ("smollm2:1.7b", "llama3:latest", "smol"):
        with pytest.raises(ApiError) as refused:
            api.resolve_model(unknown, two, strict)
        assert refused.value.status == 404 and "not found" in api.error_body(refused.value)["error"]
    # the owner's alias, and the fallback to a lone model, come from model_names
    assert api.resolve_model("Llama3:latest", two, ModelNames(aliases={"llama3": OTHER})) == OTHER
    assert api.resolve_model("llama3:8b", one) == MODEL
    with pytest.raises(ApiError):
        api.resolve_model("llama3:8b", one, strict)
    assert api.listed_name(MODEL) == f"{MODEL}:latest" and api.listed_name("smollm2:135m") == "smollm2:135m"


def test_chat_request_maps_options_format_and_stream() -> None:
    call = api.chat_request(
        {
            "model": "smollm2:latest",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "options": {"num_predict": 12, "temperature": 0.2, "top_k": 1, "stop": "\n", "num_ctx": 4096, "seed": 3},
            "keep_alive": "5m",
            "format": "json",
        },
        served={MODEL},
    )
    assert call.stream is True  # Ollama streams unless told otherwise
    request = call.request
    assert request is not None and request.stream and request.model == MODEL
    assert request.params.max_tokens == 12 and request.params.top_k == 1 and request.params.stop == ["\n"]
    assert request.params.temperature == 0.2 and request.params.seed == 3
    assert request.wants_json() == {"type": "object"}
    assert [m.role for m in request.chat()] == ["system", "user"]
    assert set(call.ignored) == {"keep_alive", "options.num_ctx"}

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    call = api.chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "format": schema, "stream": False}
    )
    assert call.stream is False and call.request is not None and call.request.wants_json() == schema
    assert call.request.params.max_tokens is None  # no num_predict: until the model stops (the hub's cap)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"options": {"mirostat": 2}}, "options.mirostat"),
        ({"options": {"bogus": 1}}, "options.bogus"),
        ({"options": "hot"}, "options"),
        ({"think": True}, "think"),
        ({"format": "yaml"}, "format"),
        ({"stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "messages[0].images"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": ""}, "model"),
    ],
)
def test_chat_requests_refused_with_a_reason(extra: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(ApiError) as refused:
        api.chat_request(body, served={MODEL})
    assert refused.value.status == 400 and refused.value.param == param
    assert api.error_body(refused.value) == {"error": refused.value.message}


def test_tool_history_gets_ids_and_calls_come_back_as_objects() -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    call = api.chat_request(
        {
            "model": MODEL,
            "tools": tools,
            "messages": [
                {"role": "user", "content": "Weather in Oslo and Rome?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "weather", "arguments": {"city": "Oslo"}}},
                        {"function": {"name": "weather", "arguments": {"city": "Rome"}}},
                    ],
                },
                {"role": "tool", "content": "rain", "tool_name": "weather"},
                {"role": "tool", "content": "sun", "tool_name": "weather"},
            ],
        }
    )
    assert call.request is not None and call.request.tools and call.request.tools[0].function.name == "weather"
    messages = call.request.chat()
    calls = messages[1].tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert [m.tool_call_id for m in messages[2:]] == [calls[0].id, calls[1].id]

    called = answer("", tool_calls=[ToolCall(id="c1", function={"name": "weather", "arguments": '{"city":"Oslo"}'})])
    body = api.response("chat", called, created_at="t")
    expected = [{"id": "c1", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    assert body["message"]["tool_calls"] == expected


def test_generate_and_embed_requests() -> None:
    call = api.generate_request({"model": MODEL, "prompt": "Why?", "system": "Answer in French.", "stream": False})
    assert call.request is not None and [(m.role, m.content) for m in call.request.chat()] == [
        ("system", "Answer in French."),
        ("user", "Why?"),
    ]
    assert call.request.stream is False
    # no prompt: Ollama's "load the model", answered without asking the swarm
    loading = api.generate_request({"model": MODEL}, served={MODEL})
    assert loading.request is None and api.loaded("generate", MODEL, created_at="t")["done_reason"] == "load"
    for field, value in (("raw", "yes"), ("context", [1, 2]), ("suffix", "end"), ("template", "{{ .Prompt }}")):
        with pytest.raises(ApiError) as refused:
            api.generate_request({"model": MODEL, "prompt": "x", field: value})
        assert refused.value.param == field

    # raw: the prompt as it is, continued by the model; Ollama applies no system prompt then
    raw = api.generate_request(
        {"model": MODEL, "prompt": "def f(x):", "raw": True, "system": "Be brief.", "format": "json", "stream": False}
    )
    assert raw.request is not None and raw.request.kind == "complete" and raw.request.prompt == "def f(x):"
    assert raw.request.messages is None and raw.request.wants_json() == {"type": "object"}
    assert raw.ignored == ("system",) and raw.request.stream is False
    unraw = api.generate_request({"model": MODEL, "prompt": "Why?", "raw": False})
    assert unraw.request is not None and unraw.request.kind == "chat"

    embed = api.embed_request({"model": MODEL, "input": "the cat", "truncate": True, "options": {"temperature": 1}})
    assert embed.request is not None and embed.request.kind == "embed" and embed.request.input == ["the cat"]
    assert set(embed.ignored) == {"truncate", "options.temperature"}
    legacy = api.embed_request({"model": MODEL, "prompt": "the dog"}, legacy=True)
    assert legacy.request is not None and legacy.request.input == ["the dog"]
    with pytest.raises(ApiError):
        api.embed_request({"model": MODEL, "input": [1, 2]})
    vectors = answer("", embeddings=[[0.5, 0.25]], timings=Timings(queue_ms=0, generate_ms=3.0))
    assert api.embed_response(vectors, model=MODEL)["embeddings"] == [[0.5, 0.25]]
    assert api.embeddings_response(vectors) == {"embedding": [0.5, 0.25]}


def test_stream_lines_end_with_the_counts() -> None:
    lines = api.Lines("chat", model="smollm2", created_at="t")
    out = lines.piece(StreamChunk(id="r1", seq=0, node_id="alpha", text="Hello"))
    hello = {"role": "assistant", "content": "Hello"}
    assert out == [{"model": "smollm2", "created_at": "t", "message": hello, "done": False}]
    assert lines.piece(StreamChunk(id="r1", seq=1, node_id="alpha")) == []
    closing = lines.closing(answer("Hello there."))
    assert [line["message"]["content"] for line in closing] == [" there.", ""]  # what the stream missed
    last = closing[-1]
    assert last["done"] is True and last["done_reason"] == "stop" and last["model"] == MODEL
    assert last["eval_count"] == 3 and last["prompt_eval_count"] == 7
    assert last["total_duration"] == 80_000_000 and last["prompt_eval_duration"] == 20_000_000
    assert last["eval_duration"] == 30_000_000
    with pytest.raises(ApiError):
        lines.piece(StreamChunk(id="r1", seq=2, node_id="beta", text="Hi", restart=True))
    generated = api.Lines("generate", model=MODEL, created_at="t").closing(answer("x", finish_reason="length"))
    assert generated[-1]["response"] == "" and generated[-1]["done_reason"] == "length"
    assert api.ndjson({"a": "é"}) == '{"a":"é"}\n'.encode()


def test_tags_show_and_ps() -> None:
    fleet = NodeTable(ts=1.0, nodes=[row("alpha", MODEL, capabilities=("embed", "stream", "tools"))])
    listed = api.tags(fleet, started=0.0)["models"]
    assert [m["name"] for m in listed] == [f"{MODEL}:latest"] and listed[0]["details"]["quantization_level"] == "Q4_1"
    shown = api.show({"model": "smollm2-135m-instruct.q4_1:latest"}, fleet, started=0.0)
    assert shown["model_info"]["swarm.context_length"] == 8192
    assert shown["model_info"]["general.architecture"] == "swarm"
    assert shown["capabilities"] == ["completion", "embedding", "tools"]
    with pytest.raises(ApiError) as missing:
        api.show({"model": "llama3"}, fleet, started=0.0)  # never the fallback: asking is asking whether it exists
    assert missing.value.status == 404
    ps = api.running(fleet)["models"]
    assert ps[0]["context_length"] == 8192 and ps[0]["expires_at"] == api.FOREVER


def test_api_key_header_names() -> None:
    assert check_header_name("X-Api-Key") == "X-Api-Key"
    for bad in ("Authorization", "x key", ""):
        with pytest.raises(Exception, match="header"):
            check_header_name(bad)


def test_the_cli_takes_the_auth_flags(tmp_path: Path) -> None:
    hub_cli = Path(sys.executable).with_name("swarm-hub")
    refused = subprocess.run(
        [hub_cli, "gateway", "--config-dir", tmp_path, "--api-key-header", "Authorization"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--api-key-header" in refused.stderr and "like X-Api-Key" in refused.stderr
    # anonymous use is announced on the terminal before anything is served
    proc = subprocess.Popen(
        [hub_cli, "gateway", "--config-dir", tmp_path, "--http", "127.0.0.1:0", "--allow-anonymous", "--no-log-file"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("swarm-hub: WARNING: --allow-anonymous") and "without a token" in first
    finally:
        stop_process(proc)  # type: ignore[arg-type]
        if proc.stderr is not None:
            proc.stderr.close()


# ---------------------------------------------------------------- the real client, end to end


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    yield LlamaEngine(model_path=bundled_model_path(), threads=2)


@dataclass
class Swarm:
    hub: Hub
    gateway: Gateway
    client: ollama.AsyncClient
    token: str


@asynccontextmanager
async def ollama_gateway(
    broker: RunningBroker, home: SwarmHome, **config: Any
) -> AsyncIterator[tuple[Gateway, ollama.AsyncClient]]:
    settings = GatewayConfig(token=home.gateway_token(), port=0, **config)
    async with Gateway(settings, broker.url(Role.CLIENT)) as gateway:
        client = ollama.AsyncClient(host=gateway.base_url, headers={"Authorization": f"Bearer {settings.token}"})
        yield gateway, client


async def listed(client: ollama.AsyncClient) -> list[str]:
    return [m.model or "" for m in (await client.list()).models]


async def models_listed(client: ollama.AsyncClient, expected: list[str], timeout: float = 20.0) -> None:
    """Until the gateway has seen the hub's node table (it follows it over MQTT)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while await listed(client) != expected:
        assert loop.time() < give_up, f"the gateway never listed {expected}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def swarm(amqtt: RunningBroker, home: SwarmHome, tmp_path: Path, engine: LlamaEngine) -> AsyncIterator[Swarm]:
    async with running_hub(amqtt, hub_config(tmp_path)) as hub:
        async with running_node(amqtt, engine, "alpha", max_tokens=512):
            await nodes_available(hub, 1)
            async with ollama_gateway(amqtt, home, api_key_header="X-Api-Key") as (gateway, client):
                await models_listed(client, [f"{MODEL}:latest"])
                yield Swarm(hub, gateway, client, home.gateway_token())


@pytest.mark.llama
async def test_the_ollama_client_lists_chats_streams_generates_and_embeds(swarm: Swarm) -> None:
    client = swarm.client
    reply = await client.chat(
        model=f"{MODEL}:latest",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        options={"temperature": 0, "num_predict": 24},
    )
    assert reply.message.role == "assistant" and (reply.message.content or "").strip()
    assert reply.done and reply.done_reason in ("stop", "length") and reply.model == MODEL
    assert (reply.eval_count or 0) > 0 and (reply.prompt_eval_count or 0) > 0
    assert (reply.total_duration or 0) > 0 and (reply.eval_duration or 0) > 0

    parts = []
    final = None
    async for part in await client.chat(
        model="smollm2",  # the family name alone
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        options={"num_predict": 60},
        stream=True,
    ):
        if part.done:
            final = part
        else:
            parts.append(part.message.content or "")
    assert len([p for p in parts if p]) > 2, "the answer came in one piece, not streamed"
    assert final is not None and final.done_reason in ("stop", "length") and (final.eval_count or 0) > 0
    assert "".join(parts).strip()

    generated = await client.generate(
        model=MODEL, prompt="Name a colour.", system="Answer in one word.", options={"num_predict": 8}
    )
    assert generated.done and generated.response.strip() and (generated.eval_count or 0) > 0
    streamed = await client.generate(model=MODEL, prompt="Count to five.", stream=True, options={"num_predict": 30})
    pieces = [p.response async for p in streamed]
    assert len([p for p in pieces if p]) > 1

    embedded = await client.embed(model=MODEL, input=["the cat sat", "a dog ran"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == len(embedded.embeddings[1]) > 0
    assert embedded.embeddings[0] != embedded.embeddings[1]
    legacy = await client.embeddings(model=MODEL, prompt="the cat sat")
    assert list(legacy.embedding) == pytest.approx(list(embedded.embeddings[0]), rel=1e-4, abs=1e-5)

    shown = await client.show(MODEL)
    assert "completion" in (shown.capabilities or []) and (shown.modelinfo or {})["swarm.context_length"] > 0
    running = await client.ps()
    assert [m.model for m in running.models] == [f"{MODEL}:latest"]
    async with httpx.AsyncClient(base_url=swarm.gateway.base_url) as raw:
        version = (await raw.get("/api/version")).json()
    assert version["version"] == api.OLLAMA_VERSION


@pytest.mark.llama
async def test_options_reach_the_node_and_no_ops_are_named(swarm: Swarm) -> None:
    messages = [{"role": "user", "content": "Tell me about the moon."}]
    greedy = await swarm.client.chat(model=MODEL, messages=messages, options={"temperature": 0, "num_predict": 20})
    # top_k 1 leaves only the likeliest token at any temperature: the greedy answer, whatever the seed
    for seed in (1, 2):
        sampled = await swarm.client.chat(
            model=MODEL, messages=messages, options={"temperature": 1.5, "top_k": 1, "seed": seed, "num_predict": 20}
        )
        assert sampled.message.content == greedy.message.content
    short = await swarm.client.chat(model=MODEL, messages=messages, options={"num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"

    headers = {"Authorization": f"Bearer {swarm.token}"}
    options = {"num_ctx": 2048, "num_predict": 4}
    body = {"model": MODEL, "prompt": "hi", "stream": False, "keep_alive": -1, "options": options}
    async with httpx.AsyncClient(base_url=swarm.gateway.base_url, headers=headers, timeout=60) as raw:
        response = await raw.post("/api/generate", json=body)
        assert response.status_code == 200 and response.headers[IGNORED_HEADER] == "keep_alive, options.num_ctx"
        refused = await raw.post("/api/generate", json={**body, "options": {"mirostat": 2}})
        assert refused.status_code == 400 and "mirostat" in refused.json()["error"]
        # streamed by default: NDJSON lines, the last one done
        streamed = await raw.post("/api/generate", json={"model": MODEL, "prompt": "hi", "options": {"num_predict": 8}})
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        assert streamed.headers["content-type"].startswith("application/x-ndjson")
        assert lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
        # what Ollama has and a swarm does not: said in Ollama's shape
        pulled = await raw.post("/api/pull", json={"model": "llama3"})
        assert pulled.status_code == 404 and "swarm-hub pin" in pulled.json()["error"]
        wrong_method = await raw.get("/api/chat")
        assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error"}

    # format: a JSON schema becomes a grammar on the node
    person = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    shaped = await swarm.client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        format=person,
        options={"num_predict": 60},
    )
    assert isinstance(json.loads(shaped.message.content or "")["name"], str)


@pytest.mark.llama
async def test_a_raw_generate_continues_the_prompt_as_llama_cpp_does(swarm: Swarm, reference: Any) -> None:  # noqa: F811
    expected, finish, tokens = greedy(reference, CODE, 24)
    options = {"temperature": 0, "num_predict": 24}
    done = await swarm.client.generate(model=MODEL, prompt=CODE, raw=True, options=options)
    assert done.response == expected, (done.response, expected)
    assert done.done_reason == finish and done.eval_count == tokens
    streamed = await swarm.client.generate(model=MODEL, prompt=CODE, raw=True, options=options, stream=True)
    pieces = [part.response async for part in streamed]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
    # without raw the same prompt is a chat turn, answered through the template
    chatted = await swarm.client.generate(model=MODEL, prompt=CODE, options=options)
    assert chatted.response != expected
    # a JSON schema constrains a raw continuation too (a grammar on the node)
    person = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    shaped = await swarm.client.generate(
        model=MODEL, prompt="A person, as JSON: ", raw=True, format=person, options={"num_predict": 60}
    )
    assert isinstance(json.loads(shaped.response)["name"], str)


@pytest.mark.llama
async def test_auth_errors_and_the_api_key_header(swarm: Swarm, amqtt: RunningBroker, home: SwarmHome) -> None:
    base = swarm.gateway.base_url
    with pytest.raises(ollama.ResponseError) as anonymous:
        await ollama.AsyncClient(host=base).list()
    assert anonymous.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as wrong:
        await ollama.AsyncClient(host=base, headers={"Authorization": "Bearer not-the-token-at-all"}).list()
    assert wrong.value.status_code == 401 and "incorrect" in wrong.value.error
    keyed = ollama.AsyncClient(host=base, headers={"X-Api-Key": swarm.token})
    assert await listed(keyed) == [f"{MODEL}:latest"]
    with pytest.raises(ollama.ResponseError) as bad:
        await swarm.client.chat(model=MODEL, messages=[{"role": "user", "content": "x"}], options={"mirostat": 2})
    assert bad.value.status_code == 400 and "mirostat" in bad.value.error

    # a gateway that refuses unknown names says so in Ollama's shape; one open to anonymous use serves anyone
    async with ollama_gateway(amqtt, home, models=ModelNames(fallback=False), allow_anonymous=True) as (gateway, _):
        open_client = ollama.AsyncClient(host=gateway.base_url)
        await models_listed(open_client, [f"{MODEL}:latest"])
        with pytest.raises(ollama.ResponseError) as missing:
            await open_client.chat(model="llama3:8b", messages=[{"role": "user", "content": "x"}])
        assert missing.value.status_code == 404 and "not found" in missing.value.error
        with pytest.raises(ollama.ResponseError) as wrong:
            await ollama.AsyncClient(host=gateway.base_url, headers={"Authorization": "Bearer nope-nope-nope"}).list()
        assert wrong.value.status_code == 401  # anonymous use is no reason to accept a wrong token


@pytest.mark.llama
async def test_a_client_gone_mid_stream_cancels_the_node(swarm: Swarm, amqtt: RunningBroker) -> None:
    story = "Write a very long story about a dragon who learns to bake bread, with many details."
    async with Connection(amqtt.url(Role.HUB), client_id="test-ollama-cancel-watcher") as watcher:
        await watcher.subscribe(Topics("main").node_cancel("alpha"))
        seen = 0
        async for part in await swarm.client.generate(
            model=MODEL, prompt=story, stream=True, options={"num_predict": 400}
        ):
            seen += bool(part.response)
            if seen == 3:
                break  # the client goes away after three pieces: the generator closes the response
        async with asyncio.timeout(10):
            async for message in watcher.messages():
                cancel = decode(Cancel, message.payload)
                break
    assert cancel.task_id
    await until(lambda: not any(n.inflight for n in swarm.hub.registry.nodes.values()), timeout=10, what="node free")
