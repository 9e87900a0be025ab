"""Deeply nested schemas and payloads are refused at intake with a clear error that reaches the
sender, never a RecursionError (issue: a schema 100 levels deep answered ``internal_error`` with
``id: null`` on the default reply topic).

Pure parsing first, then the live hub on a real broker, where any failure before a request runs
still gets it exactly one reply, with its id, on its sender's topic."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import ErrorReply, PromptRequest, TaskResult, decode_reply
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.base import Message
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub.intake import Accepted, Limits, Rejected, parse_prompt
from nova_swarm.hub.journal import canonical
from nova_swarm.hub.nesting import nesting_depth, top_level
from nova_swarm.hub.requests import Requests
from nova_swarm.hub.schemas import MAX_SCHEMA_DEPTH, answer_problem, schema_problem

from .conftest import RunningBroker, hub_config, running_hub, within

T = Topics("main")


def items_schema(levels: int) -> dict[str, Any]:
    """An array of arrays of ... of strings: ``levels`` objects deep."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


def properties_schema(levels: int) -> dict[str, Any]:
    """An object whose property is an object ...: two JSON levels per schema level."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def request(schema: dict[str, Any], request_id: str, reply_to: str) -> bytes:
    """Built by hand: a schema this deep is past what ``json.dumps`` itself can recurse."""
    body = json.dumps({"id": request_id, "prompt": "hi", "reply_to": reply_to})[:-1]
    fmt = '"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": '
    inner = _dumps_iteratively(schema)
    return f"{body}, {fmt}{inner}}}}}}}".encode()


def _dumps_iteratively(schema: dict[str, Any]) -> str:
    """``items_schema``/``properties_schema`` as JSON text, without recursing."""
    opening: list[str] = []
    node: Any = schema
    closing = 0
    while isinstance(node, dict) and node.get("type") in ("array", "object"):
        if node["type"] == "array":
            opening.append('{"type": "array", "items": ')
            node = node["items"]
            closing += 1
        else:
            opening.append('{"type": "object", "properties": {"a": ')
            node = node["properties"]["a"]
            closing += 2
    return "".join(opening) + json.dumps(node) + "}" * closing


def parse(payload: bytes) -> Accepted | Rejected:
    return parse_prompt(Message(T.prompt(), payload, 1, False), T, Limits())


# ---------------------------------------------------------------- measuring depth


def test_nesting_depth_counts_objects_and_arrays() -> None:
    assert nesting_depth("x", limit=10) == 0
    assert nesting_depth({}, limit=10) == 1
    assert nesting_depth({"a": [1, {"b": []}]}, limit=10) == 4
    assert nesting_depth(items_schema(64), limit=MAX_SCHEMA_DEPTH) == 64
    # It stops counting past the limit, so a huge value costs no more than the limit.
    assert nesting_depth(items_schema(5000), limit=64) == 65


def test_top_level_blanks_inner_values_and_counts_depth() -> None:
    text = '{"id": "a", "x": [1, {"b": "]]"}], "s": "[{", "y": {}}'
    shallow, depth = top_level(text) or ("", 0)
    assert json.loads(shallow) == {"id": "a", "x": None, "s": "[{", "y": None}
    assert depth == 3
    deep = '{"id": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + ', "reply_to": "r"}'
    shallow, depth = top_level(deep) or ("", 0)
    assert (json.loads(shallow), depth) == ({"id": "a", "x": None, "reply_to": "r"}, 100_001)
    assert top_level('{"a": [}') is None  # brackets that do not balance
    assert top_level('{"a": "x"}]') is None


# ---------------------------------------------------------------- the schema check


def test_a_schema_at_the_limit_is_usable_and_one_past_it_is_refused_naming_the_limit() -> None:
    assert schema_problem(items_schema(MAX_SCHEMA_DEPTH)) is None
    problem = schema_problem(items_schema(MAX_SCHEMA_DEPTH + 1), name="response_format.json_schema.schema")
    assert problem is not None
    assert "response_format.json_schema.schema" in problem and f"{MAX_SCHEMA_DEPTH} levels" in problem


def test_a_request_at_the_limit_is_accepted_and_journalled() -> None:
    out = parse(request(items_schema(MAX_SCHEMA_DEPTH), "ok-1", T.reply()))
    assert isinstance(out, Accepted), out
    canonical(out.request)  # what the hub journals: serialises at this depth too


@pytest.mark.parametrize("levels", [100, 300, 1000])
def test_a_deep_schema_is_refused_to_its_sender_with_its_id(levels: int) -> None:
    reply_to = T.reply()
    for schema in (items_schema(levels), properties_schema(levels)):
        out = parse(request(schema, f"deep-{levels}", reply_to))
        assert isinstance(out, Rejected), out
        assert out.error.code is ErrorCode.INVALID_REQUEST
        assert (out.request_id, out.reply_topic) == (f"deep-{levels}", reply_to)
        assert str(MAX_SCHEMA_DEPTH) in out.error.message


def test_a_deep_tool_schema_is_refused_too() -> None:
    body = {
        "id": "tool-1",
        "prompt": "hi",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": items_schema(200)}}],
    }
    out = parse(json.dumps(body).encode())
    assert isinstance(out, Rejected) and out.request_id == "tool-1"
    assert out.error.code is ErrorCode.INVALID_REQUEST and "tools[0].function.parameters" in out.error.message


def test_a_deep_answer_is_a_problem_not_a_crash() -> None:
    # A schema that refers to itself validates as deep as the answer goes.
    schema = {"type": "array", "items": {"$ref": "#"}}
    req = PromptRequest.model_validate(
        {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}
    )
    for depth in (500, 100_000):
        text = "[" * depth + "]" * depth
        result = TaskResult(task_id="t", request_id="r", node_id="n", ok=True, text=text)
        problem = answer_problem(req, result)
        assert problem is not None and "too deeply" in problem


# ---------------------------------------------------------------- the live hub


async def test_a_schema_1000_levels_deep_gets_one_clear_reply_on_the_senders_topic(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    request_id = f"deep-{uuid.uuid4().hex[:8]}"
    reply_to = T.reply()
    replies: list[ErrorReply] = []
    async with running_hub(amqtt, hub_config(tmp_path)):
        async with Connection(amqtt.url(Role.CLIENT), client_id=f"deep-{uuid.uuid4().hex[:6]}") as conn:
            await conn.subscribe(reply_to, qos=1)
            await conn.publish(T.prompt(), request(items_schema(1000), request_id, reply_to), qos=1)

            async def collect() -> None:
                async for message in conn.messages():
                    reply = decode_reply(message.payload)
                    if isinstance(reply, ErrorReply):
                        assert reply.id is not None, f"an error reply without an id, on {message.topic}: {reply}"
                    if reply.id == request_id:
                        assert message.topic == reply_to
                        replies.append(reply)  # type: ignore[arg-type]

            # The first reply, then a while longer: a second one would break "exactly one".
            reading = asyncio.ensure_future(collect())
            try:
                await within(_until(lambda: bool(replies)), 30)
                await asyncio.sleep(2.0)
            finally:
                reading.cancel()
    assert len(replies) == 1, replies
    error = replies[0].error
    assert error.code is ErrorCode.INVALID_REQUEST and str(MAX_SCHEMA_DEPTH) in error.message


async def test_a_hub_failure_before_a_request_runs_answers_its_sender_once_with_its_id(
    amqtt: RunningBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug between intake and running the request (injected: the retry check raises) is
    answered as the request's one reply, where its sender listens, not anonymously elsewhere."""

    async def broken(*_: object) -> bool:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Requests, "_answer_retry", broken)
    request_id = f"bug-{uuid.uuid4().hex[:8]}"
    reply_to = T.reply()
    replies: list[ErrorReply] = []
    async with running_hub(amqtt, hub_config(tmp_path)):
        async with Connection(amqtt.url(Role.CLIENT), client_id=f"bug-{uuid.uuid4().hex[:6]}") as conn:
            await conn.subscribe(reply_to, qos=1)
            payload = json.dumps({"id": request_id, "prompt": "hi", "reply_to": reply_to}).encode()
            await conn.publish(T.prompt(), payload, qos=1)

            async def collect() -> None:
                async for message in conn.messages():
                    reply = decode_reply(message.payload)
                    assert isinstance(reply, ErrorReply) and reply.id is not None, reply
                    if reply.id == request_id:
                        replies.append(reply)

            reading = asyncio.ensure_future(collect())
            try:
                await within(_until(lambda: bool(replies)), 30)
                await asyncio.sleep(2.0)
            finally:
                reading.cancel()
    assert len(replies) == 1, replies
    assert replies[0].error.code is ErrorCode.INTERNAL_ERROR


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.05)
