"""Anthropic's Messages API on the gateway: the translation on its own, then the official
``anthropic`` package against a real gateway, amqtt broker, hub and llama-cpp node (SmolLM2)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import pytest

from nova_swarm.broker.contract.messages import Answer, FunctionCall, StreamChunk, ToolCall, ToolCallDelta, Usage
from nova_swarm.hub import anthropic_api
from nova_swarm.hub.api_errors import ApiError

from .test_openai_gateway import MODEL, Swarm, ahttp, engine, swarm  # noqa: F401  (fixtures)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def answer(text: str = "", *, finish: str = "stop", calls: list[ToolCall] | None = None) -> Answer:
    return Answer(
        id="r1",
        text=text,
        node_id="alpha",
        model=MODEL,
        finish_reason=finish,
        usage=Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10),
        timings=None,
        latency_ms=5.0,
        strategy="race",
        attempts=1,
        tool_calls=calls,
    )


# ---------------------------------------------------------------- translation


def test_request_translation() -> None:
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And so?"},
                ],
            },
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 1,
        "stop_sequences": ["END"],
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "metadata": {"user_id": "u1"},
    }
    call = anthropic_api.messages_request(body, known_models={MODEL})
    req = call.request
    assert [(m.role, m.content) for m in req.chat()] == [
        ("system", "Be brief."),
        ("user", "Weather in Paris?"),
        ("assistant", "Let me look."),
        ("tool", "sunny"),
        ("user", "And so?"),
    ]
    calls = req.chat()[2].tool_calls
    assert calls is not None and calls[0].id == "toolu_1"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert req.chat()[3].tool_call_id == "toolu_1"
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop) == (64, 0.5, 0.9, 1, ["END"])
    assert req.tools is not None and req.tools[0].function.parameters == WEATHER["input_schema"]
    assert req.tool_choice is not None and req.tool_choice.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.ignored == ("metadata",)
    assert req.model == MODEL and req.stream is False

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    structured = anthropic_api.messages_request(
        {
            **body,
            "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
            "speed": "fast",
        }
    )
    assert structured.request.wants_json() == schema
    assert set(structured.ignored) == {"output_config.effort", "speed"}

    choices = {"auto": "auto", "any": "required", "none": "none"}
    for kind, expected in choices.items():
        body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
        got = anthropic_api.messages_request({**body, "tools": [WEATHER], "tool_choice": {"type": kind}})
        assert got.request.tool_choice == expected


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"max_tokens": None}, "'max_tokens' is required"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role must be user or assistant"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image block"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "extended thinking"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
        ({"tool_choice": {"type": "any"}}, "'tool_choice' needs 'tools'"),
        ({"top_k": -1}, "top_k"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"frobnicate": 1}, "unknown field 'frobnicate'"),
    ],
)
def test_bad_requests(change: dict[str, object], words: str) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}], **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(ApiError) as caught:
        anthropic_api.messages_request(body)
    assert caught.value.status == 400 and words in caught.value.message
    assert anthropic_api.error_body(caught.value)["error"]["type"] == "invalid_request_error"


def test_response_shapes() -> None:
    message = anthropic.types.Message.model_validate(anthropic_api.message(answer("Hello", finish="length")))
    assert message.stop_reason == "max_tokens" and message.content[0].text == "Hello"  # type: ignore[union-attr]
    assert message.usage.input_tokens == 7 and message.usage.output_tokens == 3 and message.id == "msg_r1"
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}'))
    message = anthropic.types.Message.model_validate(anthropic_api.message(answer(calls=[call])))
    assert message.stop_reason == "tool_use" and [b.type for b in message.content] == ["tool_use"]
    assert message.content[0].input == {"city": "Oslo"}  # type: ignore[union-attr]
    kinds = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error", 500: "api_error"}
    for status, kind in kinds.items():
        assert anthropic_api.error_body(ApiError(status, "m", code="c")) == {
            "type": "error",
            "error": {"type": kind, "message": "m"},
        }


def parse(events: list[bytes]) -> list[dict[str, object]]:
    out = []
    for raw in events:
        name, data = raw.decode().strip().split("\n")
        parsed = json.loads(data.removeprefix("data: "))
        assert name == f"event: {parsed['type']}"
        out.append(parsed)
    return out


def test_stream_events() -> None:
    writer = anthropic_api.MessageEvents("r1", model=MODEL)
    events = writer.opening()
    events += writer.piece(StreamChunk(id="r1", seq=0, node_id="alpha", text="Hel"))
    events += writer.piece(StreamChunk(id="r1", seq=1, node_id="alpha", text="lo"))
    events += writer.closing(answer("Hello world"))  # the stream missed " world"
    got = parse(events)
    assert [e["type"] for e in got] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    texts = [e["delta"]["text"] for e in got if e["type"] == "content_block_delta"]  # type: ignore[index]
    assert "".join(texts) == "Hello world"
    assert got[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 7, "output_tokens": 3},
    }

    writer = anthropic_api.MessageEvents("r2", model=MODEL)
    delta = ToolCallDelta.model_validate(
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}}
    )
    more = ToolCallDelta.model_validate({"index": 0, "function": {"arguments": 'ty":"Oslo"}'}})
    events = writer.piece(StreamChunk(id="r2", seq=0, node_id="alpha", tool_calls=[delta]))
    events += writer.piece(StreamChunk(id="r2", seq=1, node_id="alpha", tool_calls=[more]))
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}'))
    got = parse(events + writer.closing(answer(calls=[call])))
    assert got[0]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    pieces = [e["delta"]["partial_json"] for e in got if e["type"] == "content_block_delta"]  # type: ignore[index]
    partial = "".join(pieces)
    assert json.loads(partial) == {"city": "Oslo"}
    assert got[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}

    writer = anthropic_api.MessageEvents("r3", model=MODEL)
    writer.piece(StreamChunk(id="r3", seq=0, node_id="alpha", text="Hel"))
    with pytest.raises(ApiError, match="started over"):
        writer.piece(StreamChunk(id="r3", seq=1, node_id="beta", text="Hi", restart=True))


# ---------------------------------------------------------------- the anthropic package, end to end


@pytest.fixture
async def claude(swarm: Swarm) -> AsyncIterator[anthropic.AsyncAnthropic]:  # noqa: F811
    client = anthropic.AsyncAnthropic(base_url=swarm.base, api_key=swarm.token, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.llama
async def test_message(swarm: Swarm, claude: anthropic.AsyncAnthropic) -> None:  # noqa: F811
    message = await claude.messages.create(
        model=MODEL,
        max_tokens=24,
        system="You answer briefly.",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        extra_body={"temperature": 0},  # the SDK has no such argument any more; older ones and other clients send it
    )
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_") and message.content[0].type == "text"
    assert message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    # a wrong key: Anthropic's error shape, which the SDK raises as its own class
    wrong = anthropic.AsyncAnthropic(base_url=swarm.base, api_key="x" * 32, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await wrong.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    await wrong.close()
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="image"):
        await claude.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}
            ],
        )
    # a client's own model name reaches a swarm that serves one model (the lone-model fallback)
    other = await claude.messages.create(
        model="claude-haiku-4-5", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
    )
    assert other.model == MODEL
    # the SDK sends x-api-key; a bearer token works as well
    status, _, body = await ahttp(
        f"{swarm.base}/v1/messages",
        method="POST",
        token=swarm.token,
        body=json.dumps({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).encode(),
    )
    assert status == 200 and json.loads(body)["type"] == "message"


@pytest.mark.llama
async def test_streamed_message(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model=MODEL,
        max_tokens=96,
        messages=[{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}],
        extra_body={"temperature": 0.7},
    ) as stream:
        kinds = []
        texts = []
        async for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds
    assert len(texts) >= 5, texts
    assert final.content[0].text == "".join(texts)  # type: ignore[union-attr]
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


@pytest.mark.llama
async def test_tool_call(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather"
    assert isinstance(uses[0].input, dict) and isinstance(uses[0].input["city"], str)

    # the result goes back as a tool_result block, and the model answers in text
    reply = await claude.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": message.content},  # type: ignore[typeddict-item]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny, 21C"}]},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")

    # streamed, the call arrives as input_json_delta events the SDK assembles
    async with claude.messages.stream(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        final = await stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed
    assert isinstance(streamed[0].input["city"], str)  # type: ignore[index]
