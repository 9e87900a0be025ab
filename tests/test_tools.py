"""Tool calling without a model: what ``tools.plan`` asks the engine for, and how a ``Decoder``
reads what comes back, for every ``tool_choice``."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from nova_swarm.broker.contract.messages import (
    ChatMessage,
    FunctionCall,
    FunctionDef,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from nova_swarm.node import tools
from nova_swarm.node.tools import Decoder, Outcome, Plan, as_text_turns, merge_deltas, plan

WEATHER = Tool(
    function=FunctionDef(
        name="get_weather",
        description="The weather in a city now.",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
)
TIME = Tool(
    function=FunctionDef(
        name="get_time",
        parameters={"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    )
)
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def ids() -> Any:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def run(p: Plan, pieces: list[str], *, finish_reason: str = "stop") -> tuple[str, list[ToolCallDelta], Outcome]:
    """Feed ``pieces``, finish, and return what streamed (tail included) and the outcome."""
    decoder = p.decoder(call_id=ids())
    text: list[str] = []
    deltas: list[ToolCallDelta] = []
    for piece in pieces:
        t, d = decoder.feed(piece)
        text.append(t)
        deltas += d
    outcome = decoder.finish("".join(pieces), finish_reason=finish_reason)
    text.append(outcome.tail_text)
    deltas += outcome.tail_calls
    return "".join(text), deltas, outcome


def joined(deltas: list[ToolCallDelta]) -> dict[int, dict[str, Any]]:
    """What a client rebuilds from streamed deltas, OpenAI's way."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
        if d.id is not None:
            assert call["id"] is None, "a call's id came twice"
            call["id"] = d.id
        if d.function.name is not None:
            call["name"] = d.function.name
        call["arguments"] += d.function.arguments
    return calls


# ---------------------------------------------------------------- plan


def test_no_tools_is_free_text_and_messages_pass_through() -> None:
    p = plan(ASK, tools=None, tool_choice=None, response_schema=None)
    assert (p.mode, p.schema, p.messages) == ("text", None, ASK)
    streamed, deltas, out = run(p, ["Sunny", " and", " warm"])
    assert streamed == out.content == "Sunny and warm"
    assert (deltas, out.tool_calls, out.finish_reason) == ([], [], "stop")


def test_none_ignores_the_tools() -> None:
    p = plan(ASK, tools=[WEATHER], tool_choice="none", response_schema=None)
    assert p.mode == "text" and p.schema is None
    assert "get_weather" not in json.dumps(p.messages)
    streamed, _, out = run(p, ['{"name": "get_weather", "arguments": {"city": "Paris"}}'])
    assert out.tool_calls == [] and out.content == streamed


def test_response_schema_constrains_and_streams_as_text() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    p = plan(ASK, tools=None, tool_choice=None, response_schema=schema)
    assert p.schema == schema and p.mode == "text"
    decoder = p.decoder()
    assert decoder.feed('{"n"') == ('{"n"', [])
    assert decoder.finish('{"n": 1}').tail_text == ": 1}"


def test_named_choice_schema_is_the_parameters_and_arguments_stream() -> None:
    choice = NamedToolChoice(function=NamedFunction(name="get_time"))
    p = plan(ASK, tools=[WEATHER, TIME], tool_choice=choice, response_schema=None)
    assert p.mode == "named" and p.schema == TIME.function.parameters
    system = p.messages[0]
    assert system["role"] == "system" and "get_time" in system["content"]
    decoder = p.decoder(call_id=lambda: "call_x")
    text, first = decoder.feed('{"zone": ')
    assert text == ""
    assert first[0] == ToolCallDelta(index=0, id="call_x", type="function", function={"name": "get_time"})
    assert [d.function.arguments for d in first] == ["", '{"zone": ']
    assert decoder.feed("") == ("", [])
    _, more = decoder.feed('"UTC"}')
    assert [(d.id, d.function.name, d.function.arguments) for d in more] == [(None, None, '"UTC"}')]
    out = decoder.finish('{"zone": "UTC"}', finish_reason="stop")
    assert out.tool_calls == [
        ToolCall(id="call_x", function=FunctionCall(name="get_time", arguments='{"zone": "UTC"}'))
    ]
    assert (out.content, out.finish_reason, out.tail_calls, out.problem) == ("", "tool_calls", [], None)


def test_required_with_one_tool_is_that_tool_named() -> None:
    p = plan(ASK, tools=[WEATHER], tool_choice="required", response_schema=None)
    assert (p.mode, p.functions, p.schema) == ("named", ("get_weather",), WEATHER.function.parameters)


def test_named_call_that_is_not_json_is_still_reported_with_the_engine_reason() -> None:
    p = plan(ASK, tools=[WEATHER], tool_choice="required", response_schema=None)
    streamed, deltas, out = run(p, ['{"city": "Par'], finish_reason="length")
    assert joined(deltas)[0]["arguments"] == out.tool_calls[0].function.arguments == '{"city": "Par'
    assert out.finish_reason == "length" and out.problem is not None and "not JSON" in out.problem


def test_named_call_finished_without_feeding_gives_the_whole_call_as_tail() -> None:
    p = plan(ASK, tools=[WEATHER], tool_choice="required", response_schema=None)
    out = p.decoder(call_id=lambda: "call_1").finish('{"city": "Oslo"}')
    assert joined(out.tail_calls) == {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def test_required_with_several_tools_chooses_by_schema_and_sends_at_the_end() -> None:
    p = plan(ASK, tools=[WEATHER, TIME], tool_choice="required", response_schema=None)
    assert p.mode == "required"
    assert p.schema is not None
    branches = p.schema["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert branches[1]["properties"]["arguments"] == TIME.function.parameters
    answer = '{"name": "get_time", "arguments": {"zone": "CET"}}'
    decoder = p.decoder(call_id=lambda: "call_7")
    assert decoder.feed(answer[:10]) == ("", []) and decoder.feed(answer[10:]) == ("", [])
    out = decoder.finish(answer)
    assert out.tool_calls == [
        ToolCall(id="call_7", function=FunctionCall(name="get_time", arguments='{"zone": "CET"}'))
    ]
    assert joined(out.tail_calls) == {0: {"id": "call_7", "name": "get_time", "arguments": '{"zone": "CET"}'}}
    assert out.finish_reason == "tool_calls" and out.content == ""


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ('{"name": "get_date", "arguments": {}}', "unknown function 'get_date'"),
        ('{"name": "get_time", "arguments": [1]}', "not a JSON object"),
        ('{"name": "get_time", "arguments": {}, "why": 1}', "unexpected keys"),
        ('{"name": "get_time", "arg', "not JSON"),
        ('"get_time"', "a call is a JSON object"),
    ],
)
def test_required_answer_that_is_no_valid_call_becomes_content(answer: str, problem: str) -> None:
    p = plan(ASK, tools=[WEATHER, TIME], tool_choice="required", response_schema=None)
    streamed, deltas, out = run(p, [answer], finish_reason="stop")
    assert out.tool_calls == [] and deltas == []
    assert out.content == streamed == answer and out.finish_reason == "stop"
    assert out.problem is not None and problem in out.problem


def test_auto_describes_the_tools_and_the_call_format_in_the_first_system_turn() -> None:
    messages = [{"role": "system", "content": "Be brief."}, *ASK]
    p = plan(messages, tools=[WEATHER, TIME], tool_choice="auto", response_schema=None)
    assert p.mode == "auto" and p.schema is None and p.functions == ("get_weather", "get_time")
    assert [m["role"] for m in p.messages] == ["system", "user"]
    system = p.messages[0]["content"]
    assert system.startswith("Be brief.\n\n") and "<tool_call>" in system
    assert json.dumps(WEATHER.function.parameters) in system and "The weather in a city now." in system
    assert plan(ASK, tools=[WEATHER], tool_choice=None, response_schema=None).mode == "auto"


def test_auto_streams_plain_text_at_once() -> None:
    decoder = plan(ASK, tools=[WEATHER], tool_choice="auto", response_schema=None).decoder()
    assert decoder.feed("  ") == ("", [])  # whitespace: a call could still follow
    assert decoder.feed("It") == ("  It", [])
    assert decoder.feed(" rains {a lot}") == (" rains {a lot}", [])
    out = decoder.finish("  It rains {a lot}")
    assert (out.content, out.tool_calls, out.tail_text, out.finish_reason) == ("  It rains {a lot}", [], "", None)


def test_auto_holds_the_start_of_a_tag_until_it_cannot_be_one() -> None:
    decoder = plan(ASK, tools=[WEATHER], tool_choice="auto", response_schema=None).decoder()
    assert decoder.feed("<tool") == ("", [])
    assert decoder.feed("s> are") == ("<tools> are", [])


@pytest.mark.parametrize(
    "pieces",
    [
        ['{"name": "get_weather", ', '"arguments": {"city": "Paris"}}'],
        ["\n<tool_", 'call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'],
        ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'],  # unclosed last tag
        ['{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'],  # arguments as a JSON string
    ],
)
def test_auto_turns_a_held_call_into_tool_calls(pieces: list[str]) -> None:
    p = plan(ASK, tools=[WEATHER], tool_choice="auto", response_schema=None)
    streamed, deltas, out = run(p, pieces)
    assert streamed == "" and out.content == ""
    assert [c.function.name for c in out.tool_calls] == ["get_weather"]
    assert json.loads(out.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert joined(deltas) == {
        0: {"id": "call_0", "name": "get_weather", "arguments": out.tool_calls[0].function.arguments}
    }
    assert out.finish_reason == "tool_calls"


def test_auto_several_calls_get_their_own_index_and_id() -> None:
    p = plan(ASK, tools=[WEATHER, TIME], tool_choice="auto", response_schema=None)
    answer = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    )
    _, deltas, out = run(p, [answer])
    assert [(c.id, c.function.name) for c in out.tool_calls] == [("call_0", "get_weather"), ("call_1", "get_time")]
    assert {i: c["name"] for i, c in joined(deltas).items()} == {0: "get_weather", 1: "get_time"}


@pytest.mark.parametrize(
    "answer",
    [
        '{"name": "get_stock", "arguments": {"ticker": "X"}}',  # unknown function
        '{"name": "get_weather", "arguments": {"city": "Paris"}} Hope that helps!',  # text after the call
        '<tool_call>{"name": "get_weather"</tool_call>',  # not JSON
        '{"temperature": 21}',  # JSON, but not a call
        "<tool_call>bad</tool_call> and <tool_call>{}</tool_call>",
        "   ",
    ],
)
def test_auto_held_text_that_is_no_valid_call_is_released_as_content(answer: str) -> None:
    p = plan(ASK, tools=[WEATHER], tool_choice="auto", response_schema=None)
    mid = len(answer) // 2
    streamed, deltas, out = run(p, [answer[:mid], answer[mid:]], finish_reason="length")
    assert out.tool_calls == [] and deltas == []
    assert streamed == out.content == answer
    assert out.finish_reason == "length" and out.problem is not None


def test_tools_and_a_response_schema_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        plan(ASK, tools=[WEATHER], tool_choice="auto", response_schema={"type": "object"})
    with pytest.raises(ValueError, match="not among the tools"):
        plan(ASK, tools=[WEATHER], tool_choice=NamedToolChoice(function=NamedFunction(name="x")), response_schema=None)


# ---------------------------------------------------------------- history and deltas


def test_history_of_calls_and_results_becomes_alternating_plain_turns() -> None:
    call = ToolCall(id="call_a", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    call2 = ToolCall(id="call_b", function=FunctionCall(name="get_time", arguments='{"zone": "CET"}'))
    history = [
        ChatMessage(role="user", content="Weather and time in Paris?"),
        ChatMessage(role="assistant", tool_calls=[call, call2]),
        ChatMessage(role="tool", tool_call_id="call_a", content="18 C, cloudy"),
        ChatMessage(role="tool", tool_call_id="call_b", content="14:05"),
        ChatMessage(role="user", content="Thanks. Umbrella?"),
    ]
    turns = as_text_turns([m.engine_dict() for m in history])
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert all(set(t) == {"role", "content"} for t in turns)
    calls = turns[1]["content"].splitlines()
    assert calls[0] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    results = turns[2]["content"]
    assert '<tool_response name="get_weather">\n18 C, cloudy\n</tool_response>' in results
    assert '<tool_response name="get_time">\n14:05\n</tool_response>' in results
    assert results.endswith("\n\nThanks. Umbrella?")
    assert as_text_turns(turns) == turns  # already plain: unchanged
    # the history written the way the system message teaches parses back as the same calls
    assert tools.parse_calls(turns[1]["content"]) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_time", "arguments": {"zone": "CET"}},
    ]


def test_merge_deltas_joins_consecutive_pieces_of_one_call() -> None:
    deltas = [
        ToolCallDelta(index=0, id="c0", type="function", function={"name": "f"}),
        ToolCallDelta(index=0, function={"arguments": '{"a"'}),
        ToolCallDelta(index=0, function={"arguments": ": 1}"}),
        ToolCallDelta(index=1, id="c1", type="function", function={"name": "g"}),
        ToolCallDelta(index=1, function={"arguments": "{}"}),
    ]
    merged = merge_deltas(deltas)
    assert merged == [
        ToolCallDelta(index=0, id="c0", type="function", function={"name": "f", "arguments": '{"a": 1}'}),
        ToolCallDelta(index=1, id="c1", type="function", function={"name": "g", "arguments": "{}"}),
    ]
    assert joined(merged) == joined(deltas)


def test_base_decoder_is_the_text_decoder() -> None:
    assert type(plan(ASK, tools=None, tool_choice=None, response_schema=None).decoder()) is Decoder
