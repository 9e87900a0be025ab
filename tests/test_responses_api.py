"""OpenAI's Responses API (``/v1/responses``): the translation on its own, then the ``openai``
package's ``responses.create`` and ``responses.stream`` against a real gateway, amqtt broker,
hub and llama-cpp node (SmolLM2)."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.responses import Response

from nova_swarm.broker.contract.messages import Answer, FunctionCall, StreamChunk, ToolCall, ToolCallDelta, Usage
from nova_swarm.hub import responses_api
from nova_swarm.hub.api_errors import ApiError

from .test_openai_gateway import MODEL, Swarm, engine, swarm  # noqa: F401  (fixtures)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
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
        usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        timings=None,
        latency_ms=5.0,
        strategy="race",
        attempts=1,
        tool_calls=calls,
    )


def test_request_translation() -> None:
    call = responses_api.responses_request(
        {
            "model": MODEL,
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "snow"},
            ],
            "max_output_tokens": 32,
            "temperature": 0.3,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "text"}},
            "store": False,
            "previous_response_id": None,
        }
    )
    chat = call.request.chat()
    assert [(m.role, m.content) for m in chat] == [
        ("system", "Be brief."),
        ("user", "Weather in Oslo?"),
        ("assistant", ""),
        ("tool", "snow"),
    ]
    assert chat[2].tool_calls is not None and chat[2].tool_calls[0].id == "c1" and chat[3].tool_call_id == "c1"
    assert call.request.params.max_tokens == 32 and call.request.params.temperature == 0.3
    assert call.request.tools is not None and call.request.tools[0].function.name == "get_weather"
    assert call.ignored == ("store",)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    structured = responses_api.responses_request(
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": schema}}}
    )
    assert structured.request.wants_json() == schema


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"previous_response_id": "resp_1"}, "keeps no responses"),
        ({"tools": [{"type": "web_search"}]}, "function tools only"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "text only"),
        ({"input": []}, "'input'"),
        ({"reasoning": {"effort": "high"}}, "'reasoning'"),
        ({"frobnicate": 1}, "unknown field"),
    ],
)
def test_bad_requests(change: dict[str, object], words: str) -> None:
    with pytest.raises(ApiError) as caught:
        responses_api.responses_request({"model": MODEL, "input": "hi", **change})
    assert caught.value.status == 400 and words in caught.value.message


def parse(events: list[bytes]) -> list[dict[str, object]]:
    out = []
    for raw in events:
        name, data = raw.decode().strip().split("\n")
        parsed = json.loads(data.removeprefix("data: "))
        assert name == f"event: {parsed['type']}"
        out.append(parsed)
    return out


def test_responses_and_events() -> None:
    done = Response.model_validate(responses_api.response(answer("Hi"), created=1))
    assert done.output_text == "Hi" and done.status == "completed" and done.usage is not None
    cut = Response.model_validate(responses_api.response(answer("Hi", finish="length"), created=1))
    assert cut.status == "incomplete" and cut.incomplete_details is not None

    writer = responses_api.ResponseEvents("r1", model=MODEL, created=1)
    events = writer.opening() + writer.piece(StreamChunk(id="r1", seq=0, node_id="alpha", text="Hel"))
    got = parse(events + writer.closing(answer("Hello")))
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert Response.model_validate(got[-1]["response"]).output_text == "Hello"

    writer = responses_api.ResponseEvents("r2", model=MODEL, created=1)
    first = ToolCallDelta.model_validate(
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}}
    )
    rest = ToolCallDelta.model_validate({"index": 0, "function": {"arguments": 'ty":"Oslo"}'}})
    events = writer.piece(StreamChunk(id="r2", seq=0, node_id="alpha", tool_calls=[first]))
    events += writer.piece(StreamChunk(id="r2", seq=1, node_id="alpha", tool_calls=[rest]))
    call = ToolCall(id="c1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}'))
    got = parse(events + writer.closing(answer(calls=[call])))
    final = Response.model_validate(got[-1]["response"])
    assert final.output[0].type == "function_call" and json.loads(final.output[0].arguments) == {"city": "Oslo"}


# ---------------------------------------------------------------- the openai package, end to end


@pytest.mark.llama
async def test_responses_with_the_openai_client(swarm: Swarm) -> None:  # noqa: F811
    done = await swarm.client.responses.create(
        model=MODEL, instructions="Answer briefly.", input="What is 2+2?", max_output_tokens=24
    )
    assert done.id.startswith("resp_") and done.output_text.strip() and done.status in ("completed", "incomplete")
    assert done.usage is not None and done.usage.output_tokens > 0

    async with swarm.client.responses.stream(
        model=MODEL, input="Write a very long story about a dragon who learns to bake bread.", max_output_tokens=96
    ) as stream:
        events = [e async for e in stream]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # cut at max_output_tokens, OpenAI ends with response.incomplete (the SDK's get_final_response
    # wants response.completed then, as against OpenAI itself), else response.completed
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert len(deltas) >= 5 and last.response.output_text == "".join(deltas)
    assert (last.type == "response.incomplete") == (last.response.status == "incomplete")

    called = await swarm.client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)

    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        await swarm.client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
