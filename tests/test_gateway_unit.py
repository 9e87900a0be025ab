"""The gateway's translation between OpenAI's shapes and ours, with no I/O: every response is
checked against the official ``openai`` package's own types."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from openai.types import CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import (
    Answer,
    FunctionCall,
    FunctionDelta,
    HubStatus,
    NodeRow,
    NodeState,
    NodeTable,
    StreamChunk,
    Timings,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from nova_swarm.hub import api_errors, openai_api
from nova_swarm.hub.api_errors import ApiError
from nova_swarm.hub.gateway_config import GatewayConfig, browser_host, parse_listen
from nova_swarm.hub.openai_api import ChatChunks

USER = [{"role": "user", "content": "hi"}]


def answer(**overrides: Any) -> Answer:
    fields: dict[str, Any] = {
        "id": "r1",
        "text": "Hello there",
        "node_id": "alpha",
        "model": "SmolLM2",
        "finish_reason": "stop",
        "usage": Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8),
        "timings": Timings(queue_ms=1.0, ttft_ms=20.0, generate_ms=100.0, tokens_per_s=30.0),
        "latency_ms": 150.0,
        "strategy": "race",
        "attempts": 1,
    }
    fields.update(overrides)
    return Answer(**fields)


def refused(body: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        openai_api.chat_request(body, **kwargs)
    return caught.value


# ---------------------------------------------------------------- requests


def test_messages_and_params_become_a_prompt_request() -> None:
    call = openai_api.chat_request(
        {
            "model": "SmolLM2",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "2"},
            ],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "END",
            "n": 1,
            "user": "someone",
            "logprobs": False,
            "presence_penalty": 0,
        },
        known_models={"SmolLM2"},
    )
    req = call.request
    assert [m.role for m in req.messages or []] == ["system", "user", "assistant", "tool"]
    assert req.messages is not None
    assert req.messages[1].content == "Hello\nthere"
    assert req.messages[2].content == "" and req.messages[2].tool_calls is not None
    assert req.messages[2].tool_calls[0].function.name == "add"
    assert req.messages[3].tool_call_id == "call_1"
    assert req.params.max_tokens == 20  # max_completion_tokens wins
    assert (req.params.temperature, req.params.top_p, req.params.seed) == (0.5, 0.9, 3)
    assert req.params.stop == ["END"]
    assert req.model == "SmolLM2"
    assert (req.strategy, req.fanout, req.stream, req.private) == ("race", 1, False, False)
    assert call.include_usage is False


def test_swarm_options_and_structured_output_pass_through() -> None:
    call = openai_api.chat_request(
        {
            "messages": USER,
            "strategy": "best_of_n",
            "fanout": 3,
            "tags": ["math"],
            "timeout_s": 9.5,
            "private": True,
            "retrieval": False,
            "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        }
    )
    req = call.request
    assert (req.strategy, req.fanout, req.tags, req.timeout_s) == ("best_of_n", 3, ["math"], 9.5)
    assert req.private and req.retrieval is False and req.stream and call.include_usage
    assert req.model is None
    assert req.wants_json() == {"type": "object"}

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = openai_api.chat_request(
        {"messages": USER, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "add"}}}
    )
    assert call.request.tools is not None and call.request.tools[0].function.name == "add"
    assert call.request.tool_choice is not None


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ([1, 2], 400, "invalid_request", "JSON object"),
        ({"messages": []}, 400, "invalid_request", "messages"),
        ({"messages": USER, "n": 2}, 400, "invalid_request", "n=2"),
        ({"messages": USER, "logprobs": True}, 400, "invalid_request", "logprobs"),
        ({"messages": USER, "frequency_penalty": 0.5}, 400, "invalid_request", "frequency_penalty"),
        ({"messages": USER, "bogus": 1}, 400, "unknown_field", "bogus"),
        ({"messages": [{"role": "user", "content": "x", "weird": 1}]}, 400, "unknown_field", "weird"),
        ({"messages": [{"role": "function", "content": "x"}]}, 400, "invalid_request", "role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "invalid_request",
            "text only",
        ),
        ({"messages": USER, "temperature": -1}, 400, "invalid_request", "params.temperature"),
        ({"messages": USER, "tool_choice": "required"}, 400, "invalid_request", "tool_choice"),
        ({"messages": USER, "fanout": 0}, 400, "invalid_request", "fanout"),
        ({"messages": USER, "model": "nope"}, 404, "model_not_found", "nope"),
    ],
)
def test_what_cannot_be_honoured_is_refused_clearly(body: Any, status: int, code: str, words: str) -> None:
    # two models: with one, an unknown name falls back to it (model_names.py)
    error = refused(body, known_models={"SmolLM2", "Qwen"})
    assert (error.status, error.code) == (status, code)
    assert words in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_an_unknown_model_is_left_to_the_hub_until_the_fleet_is_known() -> None:
    assert openai_api.chat_request({"messages": USER, "model": "x"}, known_models=None).request.model == "x"
    assert openai_api.chat_request({"messages": USER, "model": "auto"}, known_models=set()).request.model is None


def test_embedding_requests() -> None:
    call = openai_api.embed_request(
        {"input": "one", "model": "SmolLM2", "encoding_format": "base64"}, known_models=None
    )
    assert call.request.kind == "embed" and call.request.input == ["one"] and call.encoding_format == "base64"
    assert openai_api.embed_request({"input": ["a", "b"]}).request.input == ["a", "b"]
    # token arrays are OpenAI's cl100k_base ids (test_leniency.py has them end to end)
    for body, words in (
        ({"input": [1, "x"]}, "not a mix"),
        ({"input": [[1, 2], []]}, "token arrays"),
        ({"input": [[1, 2], [10**6]]}, "not a cl100k_base token id"),
        ({"input": []}, "input"),
        ({"input": "x", "dimensions": 8}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": ["ok", " "]}, "empty"),
    ):
        with pytest.raises(ApiError) as caught:
            openai_api.embed_request(body)
        assert caught.value.status == 400 and words in caught.value.message, body


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.BAD_JSON, 400),
        (ErrorCode.UNKNOWN_FIELD, 400),
        (ErrorCode.EMPTY_PROMPT, 400),
        (ErrorCode.PROMPT_TOO_LARGE, 400),
        (ErrorCode.PAYLOAD_TOO_LARGE, 400),
        (ErrorCode.MAX_TOKENS_TOO_LARGE, 400),
        (ErrorCode.FANOUT_TOO_LARGE, 400),
        (ErrorCode.UNKNOWN_MODEL, 404),
        (ErrorCode.RATE_LIMITED, 429),
        (ErrorCode.NO_ELIGIBLE_NODES, 503),
        (ErrorCode.UNSUPPORTED, 503),
        (ErrorCode.HUB_BUSY, 503),
        (ErrorCode.HUB_STOPPING, 503),
        (ErrorCode.DEADLINE_EXCEEDED, 504),
        (ErrorCode.INVALID_OUTPUT, 502),
        (ErrorCode.ENGINE_ERROR, 500),
        (ErrorCode.INTERNAL_ERROR, 500),
    ],
)
def test_error_codes_map_to_http_statuses(code: ErrorCode, status: int) -> None:
    error = api_errors.error_from(RequestFailed(code, "why", retry_after_s=2.2))
    assert error.status == status
    assert error.code == ("model_not_found" if code is ErrorCode.UNKNOWN_MODEL else code.value)
    assert error.body()["error"]["message"] == "why"
    if status in (429, 503):
        assert error.headers()["Retry-After"] == "3"
    else:
        assert "Retry-After" not in error.headers()


def test_retry_after_defaults_and_auth_header() -> None:
    assert api_errors.error_for(ErrorCode.NO_ELIGIBLE_NODES, "x").headers() == {"Retry-After": "5"}
    error = api_errors.unauthorized("no")
    assert error.status == 401 and error.headers() == {"WWW-Authenticate": "Bearer"}
    assert error.body()["error"]["type"] == "authentication_error"


# ---------------------------------------------------------------- responses


def test_a_chat_completion_is_what_the_openai_package_reads() -> None:
    body = openai_api.chat_completion(answer(), created=1700000000)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.id == "chatcmpl-r1" and parsed.model == "SmolLM2"
    assert parsed.choices[0].message.content == "Hello there"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None and parsed.usage.total_tokens == 8
    assert body["swarm"] == {
        "node_id": "alpha",
        "tokens_per_s": 30.0,
        "latency_ms": 150.0,
        "strategy": "race",
        "attempts": 1,
    }
    length = ChatCompletion.model_validate(openai_api.chat_completion(answer(finish_reason="length"), created=1))
    assert length.choices[0].finish_reason == "length"
    odd = ChatCompletion.model_validate(openai_api.chat_completion(answer(finish_reason="cancelled"), created=1))
    assert odd.choices[0].finish_reason == "stop"


def test_tool_calls_come_back_in_openai_shape() -> None:
    call = ToolCall(id="call_9", function=FunctionCall(name="add", arguments='{"a": 1, "b": 2}'))
    body = openai_api.chat_completion(answer(text="", tool_calls=[call]), created=1)
    parsed = ChatCompletion.model_validate(body)
    message = parsed.choices[0].message
    assert message.content is None and parsed.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    tool = message.tool_calls[0]
    assert tool.id == "call_9" and tool.type == "function"
    assert tool.function.name == "add" and json.loads(tool.function.arguments) == {"a": 1, "b": 2}


def test_stream_chunks_in_order() -> None:
    chunks = ChatChunks("r1", model="SmolLM2", created=1, include_usage=True)
    events = [*chunks.opening()]
    events += chunks.piece(StreamChunk(id="r1", seq=0, node_id="alpha", text="Hel"))
    events += chunks.piece(StreamChunk(id="r1", seq=1, node_id="alpha", text="lo"))
    events += chunks.closing(answer(text="Hello there"))  # " there" never came as a chunk
    parsed = [ChatCompletionChunk.model_validate(e) for e in events]
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content == ""
    text = "".join(p.choices[0].delta.content or "" for p in parsed if p.choices)
    assert text == "Hello there"
    final, usage = parsed[-2], parsed[-1]
    assert final.choices[0].finish_reason == "stop" and events[-2]["swarm"]["node_id"] == "alpha"
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 3
    assert {p.id for p in parsed} == {"chatcmpl-r1"}
    assert all(p.choices[0].finish_reason is None for p in parsed[:-2])


def test_streamed_tool_calls() -> None:
    chunks = ChatChunks("r2", model="m", created=1)
    events = [*chunks.opening()]
    first = ToolCallDelta(index=0, id="call_1", type="function", function=FunctionDelta(name="add", arguments=""))
    more = ToolCallDelta(index=0, function=FunctionDelta(arguments='{"a": 1}'))
    events += chunks.piece(StreamChunk(id="r2", seq=0, node_id="alpha", tool_calls=[first]))
    events += chunks.piece(StreamChunk(id="r2", seq=1, node_id="alpha", tool_calls=[more]))
    call = ToolCall(id="call_1", function=FunctionCall(name="add", arguments='{"a": 1}'))
    events += chunks.closing(answer(text="", tool_calls=[call]))
    parsed = [ChatCompletionChunk.model_validate(e) for e in events]
    deltas = [tc for p in parsed for tc in (p.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == "call_1" and deltas[0].function is not None and deltas[0].function.name == "add"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == '{"a": 1}'
    assert parsed[-1].choices[0].finish_reason == "tool_calls"
    assert len(deltas) == 2  # the answer's calls are not repeated


def test_tool_calls_not_streamed_come_from_the_answer() -> None:
    chunks = ChatChunks("r3", model="m", created=1)
    call = ToolCall(id="call_1", function=FunctionCall(name="add", arguments="{}"))
    events = [*chunks.opening(), *chunks.closing(answer(text="", tool_calls=[call]))]
    parsed = [ChatCompletionChunk.model_validate(e) for e in events]
    delta = parsed[1].choices[0].delta.tool_calls
    assert delta is not None and delta[0].index == 0 and delta[0].id == "call_1"


def test_a_restart_is_fine_before_content_and_an_error_after() -> None:
    chunks = ChatChunks("r4", model="m", created=1)
    assert chunks.piece(StreamChunk(id="r4", seq=0, node_id="alpha", text="", restart=True)) == []
    chunks.piece(StreamChunk(id="r4", seq=1, node_id="beta", text="Hi"))
    with pytest.raises(ApiError) as caught:
        chunks.piece(StreamChunk(id="r4", seq=2, node_id="gamma", text="Hi", restart=True))
    assert caught.value.code == "node_lost" and "ask again" in caught.value.message


def test_sse_framing() -> None:
    assert openai_api.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert openai_api.DONE == b"data: [DONE]\n\n"


def test_embeddings_as_float_and_base64() -> None:
    vectors = [[0.5, -1.25, 3.0], [0.0, 1.0, 2.0]]
    reply = answer(text="", embeddings=vectors, usage=Usage(prompt_tokens=4, completion_tokens=0, total_tokens=4))
    floats = CreateEmbeddingResponse.model_validate(openai_api.embeddings(reply))
    assert [d.embedding for d in floats.data] == vectors and floats.usage.prompt_tokens == 4
    encoded = openai_api.embeddings(reply, encoding_format="base64")
    raw = base64.b64decode(encoded["data"][1]["embedding"])
    assert list(struct.unpack("<3f", raw)) == vectors[1]


# ---------------------------------------------------------------- models, health, nodes


def row(node_id: str, model: str | None, state: NodeState) -> NodeRow:
    return NodeRow(
        node_id=node_id,
        state=state,
        model=model,
        tokens_per_s=None,
        battery_pct=None,
        charging=None,
        temp_c=None,
        busy=0,
        last_seen=None,
        agent_version=None,
        tags=[],
    )


FLEET = NodeTable(
    ts=1.0,
    nodes=[
        row("a", "SmolLM2", NodeState.ONLINE),
        row("b", "SmolLM2", NodeState.PAUSED),
        row("c", "Gemma", NodeState.OFFLINE),
        row("d", "Qwen", NodeState.ONLINE),
    ],
)


def test_models_lists_what_serves_now() -> None:
    listed = openai_api.models(FLEET, created=7)
    cards = [Model.model_validate(c) for c in listed["data"]]
    assert [(c.id, c.owned_by, c.created) for c in cards] == [("Qwen", "nova-swarm", 7), ("SmolLM2", "nova-swarm", 7)]
    assert [c["nodes"] for c in listed["data"]] == [1, 2]
    assert openai_api.model(FLEET, "SmolLM2", created=7)["nodes"] == 2
    with pytest.raises(ApiError) as caught:
        openai_api.model(FLEET, "Gemma", created=7)  # known, but nothing serves it
    assert caught.value.status == 404
    assert openai_api.models(None, created=7) == {"object": "list", "data": []}
    assert openai_api.known_models(FLEET) == {"SmolLM2", "Gemma", "Qwen"}
    assert openai_api.known_models(None) is None


def test_health_and_nodes() -> None:
    hub = HubStatus(hub_id="hub", state="online", nodes_online=3, max_tokens=4096)
    unknown = {"status": "ok", "hub": "unknown", "max_tokens_limit": None}
    assert openai_api.health(hub, FLEET) == {
        "status": "ok",
        "hub": "online",
        "nodes_online": 3,
        "max_tokens_limit": 4096,
    }
    assert openai_api.health(None, FLEET) == {**unknown, "nodes_online": 2}
    assert openai_api.health(None, None) == {**unknown, "nodes_online": 0}
    assert openai_api.nodes(None) == {"ts": None, "nodes": []}
    nodes = openai_api.nodes(FLEET)
    assert nodes["ts"] == 1.0 and nodes["nodes"][2] == json.loads(FLEET.nodes[2].model_dump_json())


# ---------------------------------------------------------------- gateway settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        (":9000", ("127.0.0.1", 9000)),
        ("9000", ("127.0.0.1", 9000)),
        ("localhost:8081", ("localhost", 8081)),
        ("[::1]:8080", ("::1", 8080)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:", "1.2.3.4:99999", "a:b:c", "::1:8080"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(text)


def test_gateway_config_checks_itself() -> None:
    assert GatewayConfig(token="x" * 16).host == "127.0.0.1"
    with pytest.raises(ConfigError):
        GatewayConfig(token="short")
    with pytest.raises(ConfigError):
        GatewayConfig(token="x" * 16, port=70000)
    assert browser_host("0.0.0.0") == "127.0.0.1" and browser_host("::1") == "[::1]"
