"""Raw text completion (``kind: "complete"``): the wire rules on their own (no I/O), then how the
hub routes such requests and a node runs them, with scripted engines on a real broker. The
continuation itself, by llama-cpp on SmolLM2, is tested in test_completions.py and
test_ollama_api.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nova_swarm.broker.contract.errors import EngineError, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import Announce, GenParams, PromptRequest, Task
from nova_swarm.broker.contract.topics import NodeTopic
from nova_swarm.broker.home import Role
from nova_swarm.hub import SwarmClient
from nova_swarm.node import FakeEngine
from nova_swarm.node.engine import COMPLETE, STREAM, Sampling

from .conftest import RunningBroker, hub_config, nodes_available, running_hub, running_node, within
from .test_stream_scheduling import watch

# ---------------------------------------------------------------- the wire, no I/O


def test_a_complete_request_gives_a_prompt_and_nothing_chat_only() -> None:
    req = PromptRequest(kind="complete", prompt="def f(x):\n    ", params=GenParams(max_tokens=8))
    assert req.kind == "complete" and req.prompt == "def f(x):\n    "
    # an indent or a line break alone is a fair text to continue
    assert PromptRequest(kind="complete", prompt="\n").prompt == "\n"
    json_out = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}
    # a grammar applies to raw text as well as to a chat: JSON answers are allowed
    assert PromptRequest.model_validate({"kind": "complete", "prompt": "{", "response_format": json_out}).wants_json()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({}, "gives 'prompt'"),
        ({"prompt": ""}, "gives 'prompt'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "not 'messages'"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}, "not 'messages'"),
        ({"prompt": "x", "input": ["y"]}, "'input' is for embed"),
        (
            {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
            "cannot call tools",
        ),
        ({"prompt": "x", "tool_choice": "none"}, "cannot call tools"),
        ({"prompt": "x", "retrieval": True}, "retrieval adds context to a chat"),
    ],
)
def test_complete_requests_refused_with_a_reason(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        PromptRequest.model_validate({"kind": "complete", **fields})


def test_a_task_carries_the_prompt_exactly_when_it_is_a_complete_task() -> None:
    base = {"task_id": "t1", "request_id": "r1", "messages": [], "params": {}, "timeout_s": 5.0}
    task = Task.model_validate({**base, "kind": "complete", "prompt": "Once upon"})
    assert task.prompt == "Once upon" and task.messages == []
    with pytest.raises(ValidationError, match="exactly when kind is 'complete'"):
        Task.model_validate({**base, "kind": "complete"})
    with pytest.raises(ValidationError, match="exactly when kind is 'complete'"):
        Task.model_validate({**base, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"})
    # a chat task as older nodes read it: no prompt field on the wire
    chat = Task.model_validate({**base, "messages": [{"role": "user", "content": "hi"}]})
    assert "prompt" not in json.loads(chat.model_dump_json(exclude_defaults=True))


def test_complete_is_a_capability_older_nodes_do_not_announce() -> None:
    fields = {
        "node_id": "n1",
        "model": {"name": "m", "sha256": "0" * 64, "size_bytes": 1, "ctx": 2048},
        "threads": 1,
        "tokens_per_s": 1.0,
        "ram_total_mb": None,
        "device": "laptop",
        "agent_version": "0.1.0",
        "slots": 1,
        "queue_max": 1,
        "max_tokens": 64,
        "max_temperature": 2.0,
        "ts": 1.0,
    }
    assert Announce.model_validate(fields).capabilities == []
    assert Announce.model_validate({**fields, "capabilities": ["complete"]}).capabilities == ["complete"]


def test_the_fake_continues_a_text_only_with_the_capability() -> None:
    sampling = Sampling(max_tokens=64, temperature=0.0)
    pieces: list[str] = []
    gen = FakeEngine(echo=True).complete("abc", sampling, lambda: False, on_text=pieces.append)
    # the continuation keeps its leading space, and the streamed pieces join up to it
    assert gen.text == " ... (fake continuation of 3 characters, max_tokens 64, temperature 0.0)"
    assert "".join(pieces) == gen.text and not gen.stopped
    assert FakeEngine(reply=lambda p: f"[{p}]").complete("x y", sampling, lambda: False).text == "[x y]"
    with pytest.raises(EngineError, match="cannot continue a raw text"):
        FakeEngine(capabilities=frozenset({STREAM})).complete("abc", sampling, lambda: False)


# ---------------------------------------------------------------- hub and node, real broker


async def test_a_complete_request_goes_only_to_nodes_that_can_continue_a_text(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    # A node of an older version announces no ``complete``: it is never sent such a task.
    older = FakeEngine(reply="hi", capabilities=frozenset({STREAM}))
    async with running_hub(amqtt, hub_config(tmp_path)) as hub, running_node(amqtt, older, "older"):
        await nodes_available(hub, 1)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            with pytest.raises(RequestFailed) as refused:
                await client.ask(PromptRequest(kind="complete", prompt="def f(x):"), timeout=30)
            assert refused.value.code is ErrorCode.UNSUPPORTED
            assert "no online node can do complete" in refused.value.message
            assert older.calls == 0

            able = FakeEngine(name="fake", echo=True, capabilities=frozenset({STREAM, COMPLETE}))
            async with running_node(amqtt, able, "able"), watch(amqtt, "able", NodeTopic.TASK, Task) as tasks:
                await nodes_available(hub, 2)
                request = PromptRequest(kind="complete", prompt="def f(x):", params=GenParams(temperature=0.0))
                answer = await client.ask(request, timeout=30)
                task = await within(tasks.get(), 10)
    assert answer.node_id == "able" and older.calls == 0
    assert task.kind == "complete" and task.prompt == "def f(x):" and task.messages == []
    # no max_tokens asked: the hub filled in its default length, as for a chat
    assert task.params.max_tokens is not None
    assert answer.text.startswith(" ... (fake continuation of 9 characters, max_tokens ")
    assert answer.usage is not None and answer.usage.completion_tokens > 0 and answer.timings is not None


async def test_a_streamed_completion_adds_up_to_the_answer(amqtt: RunningBroker, tmp_path: Path) -> None:
    engine = FakeEngine(echo=True, capabilities=frozenset({STREAM, COMPLETE}))
    async with running_hub(amqtt, hub_config(tmp_path)) as hub, running_node(amqtt, engine, "n1"):
        await nodes_available(hub, 1)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            request = PromptRequest(kind="complete", prompt="Once upon a time", stream=True)
            async with client.streaming(request, timeout=30) as stream:
                texts = [chunk.text async for chunk in stream]
                answer = await stream.answer()
    assert "".join(texts) == answer.text and answer.text.startswith(" ... (fake continuation of 16 characters")
    assert len([t for t in texts if t]) >= 1
