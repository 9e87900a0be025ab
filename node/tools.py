"""OpenAI tool calling on top of any engine that can follow a JSON schema. Pure: no I/O.

``plan`` turns a request (messages, tools, tool_choice, response schema) into what the engine
is given: the messages, with the tools described in a system message, and the JSON schema that
constrains the output. ``Plan.decoder()`` makes a ``Decoder`` that reads the engine's output as it
streams and tells what can be sent on now (text for ``content`` and/or tool-call deltas), then,
at the end, what the answer is.

How each ``tool_choice`` is served (OpenAI's meaning, our mechanism):

=====================  =============================================================================
``"none"``, no tools   free text (or ``response_schema``); tools are not shown to the model
``"auto"`` / absent    no grammar; the system message gives the call format; a reply that is nothing
                       but calls of known tools becomes ``tool_calls``, anything else is ``content``
``"required"``, 1 tool same as naming that tool
``"required"``, more   schema: ``anyOf`` over ``{"name": <const>, "arguments": <parameters>}``;
                       the call is parsed and sent at the end
a named function       schema: the function's ``parameters``; the output *is* the arguments JSON,
                       streamed as it comes as argument deltas of call 0
=====================  =============================================================================

Chat templates know system, user and assistant turns; few render ``tool_calls`` or ``tool``
turns, and those that do disagree on the shape. ``as_text_turns`` writes both as plain text in the
same ``<tool_call>`` format the system message teaches, so the history and the instructions agree
whatever the template.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nova_swarm.broker.contract.messages import (
    FunctionCall,
    FunctionDelta,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)

#: how the engine's output is read: free text; a reply that may be calls; the arguments of one
#: named function; one call of several functions, as {"name", "arguments"}
Mode = Literal["text", "auto", "named", "required"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class Plan:
    #: what to give the engine: plain system/user/assistant turns, tools described when in play
    messages: list[dict[str, Any]]
    #: the JSON schema the output must follow (None: free text)
    schema: dict[str, Any] | None
    mode: Mode
    #: the functions the model may call (empty when tools are not in play)
    functions: tuple[str, ...] = ()

    def decoder(self, *, call_id: Callable[[], str] = new_call_id) -> Decoder:
        """A fresh decoder for one generation under this plan (``call_id`` makes call ids)."""
        if self.mode == "named":
            return NamedCallDecoder(self.functions[0], call_id=call_id)
        if self.mode == "required":
            return RequiredCallDecoder(frozenset(self.functions), call_id=call_id)
        if self.mode == "auto":
            return AutoDecoder(frozenset(self.functions), call_id=call_id)
        return Decoder()


def plan(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Tool] | None,
    tool_choice: ToolChoice | None,
    response_schema: Mapping[str, Any] | None,
) -> Plan:
    """What to ask the engine for, given an OpenAI-shaped request.

    Raises ValueError for a request that the wire models refuse anyway (tools together with a
    response schema, a named function that is not among the tools)."""
    turns = as_text_turns(messages)
    if not tools or tool_choice == "none":
        schema = dict(response_schema) if response_schema is not None else None
        return Plan(messages=turns, schema=schema, mode="text")
    if response_schema is not None:
        raise ValueError("give tools or a response schema, not both")
    by_name = {t.function.name: t for t in tools}
    if isinstance(tool_choice, NamedToolChoice) or (tool_choice == "required" and len(by_name) == 1):
        name = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else next(iter(by_name))
        if name not in by_name:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        tool = by_name[name]
        note = (
            f"You must call the function `{name}` now. Reply with only its arguments: a JSON object "
            "matching its parameters, and nothing else."
        )
        return Plan(
            messages=_with_system(turns, _describe([tool]) + "\n\n" + note),
            schema=dict(tool.function.parameters),
            mode="named",
            functions=(name,),
        )
    if tool_choice == "required":
        note = (
            "You must call one of these functions now. Reply with only a JSON object of this form, "
            'and nothing else: {"name": "<function name>", "arguments": {<its arguments>}}'
        )
        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for t in by_name.values()
            ]
        }
        return Plan(
            messages=_with_system(turns, _describe(by_name.values()) + "\n\n" + note),
            schema=schema,
            mode="required",
            functions=tuple(by_name),
        )
    note = (
        "To call a function, reply with only this, and nothing else (one line per call):\n"
        f'{CALL_OPEN}{{"name": "<function name>", "arguments": {{<its arguments>}}}}{CALL_CLOSE}\n'
        "Otherwise answer in plain text. Results of calls come back in a user turn as "
        f"{RESULT_OPEN}...{RESULT_CLOSE}."
    )
    return Plan(
        messages=_with_system(turns, _describe(by_name.values()) + "\n\n" + note),
        schema=None,
        mode="auto",
        functions=tuple(by_name),
    )


def _describe(tools: Any) -> str:
    lines = ["You can call these functions (one JSON description per line):"]
    for t in tools:
        f = t.function
        entry: dict[str, Any] = {"name": f.name}
        if f.description:
            entry["description"] = f.description
        entry["parameters"] = f.parameters
        lines.append(json.dumps(entry, ensure_ascii=False))
    return "\n".join(lines)


def _with_system(turns: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Add ``text`` to the first system turn, or start with one: many templates take a system
    message only first."""
    if turns and turns[0]["role"] == "system":
        first = turns[0]["content"]
        return [{"role": "system", "content": f"{first}\n\n{text}" if first else text}, *turns[1:]]
    return [{"role": "system", "content": text}, *turns]


# ---------------------------------------------------------------- history as plain turns


def as_text_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as turns any chat template renders: only ``role`` and ``content``, roles
    system, user and assistant.

    An assistant turn's ``tool_calls`` are appended to its content as
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` lines (the format ``plan`` teaches);
    ``tool`` turns become ``<tool_response name=...>...</tool_response>`` in a user turn, and
    consecutive ones (and a user turn right after them) share one user turn, because some
    templates insist that user and assistant alternate. Plain turns pass through unchanged, so
    this is safe to apply twice."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    merging = False  # the last turn in ``out`` is a user turn made of tool results
    for m in messages:
        role, content = str(m.get("role", "user")), str(m.get("content") or "")
        if role == "tool":
            call_id = str(m.get("tool_call_id") or "")
            name = names.get(call_id) or str(m.get("name") or "") or "unknown"
            result = f'{RESULT_OPEN[:-1]} name="{name}">\n{content}\n{RESULT_CLOSE}'
            if merging:
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result})
                merging = True
            continue
        if role == "user" and merging:
            out[-1]["content"] += "\n\n" + content
            merging = False
            continue
        merging = False
        calls = m.get("tool_calls") or ()
        if role == "assistant" and calls:
            lines = [content] if content else []
            for call in calls:
                call = call.model_dump() if isinstance(call, ToolCall) else call
                fn = call.get("function") or {}
                names[str(call.get("id") or "")] = str(fn.get("name") or "")
                rendered = {"name": fn.get("name"), "arguments": _loads_or_text(fn.get("arguments") or "{}")}
                lines.append(CALL_OPEN + json.dumps(rendered, ensure_ascii=False) + CALL_CLOSE)
            content = "\n".join(lines)
        out.append({"role": role, "content": content})
    return out


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------- decoding


Piece = tuple[str, list[ToolCallDelta]]


@dataclass(frozen=True, slots=True)
class Outcome:
    #: the answer's text ("" when the model called tools)
    content: str
    tool_calls: list[ToolCall]
    #: "tool_calls" when complete calls were made; else the engine's reason as given to
    #: ``finish`` (None when it was not given: keep the engine's)
    finish_reason: str | None
    #: what was held back and must still be streamed, text and call deltas (a caller that did
    #: not stream ignores them)
    tail_text: str = ""
    tail_calls: list[ToolCallDelta] = field(default_factory=list)
    #: why the output is not what was asked for (arguments that are not JSON, an unknown
    #: function...), or None; the hub checks answers anyway, this is for logs
    problem: str | None = None


def merge_deltas(deltas: Sequence[ToolCallDelta]) -> list[ToolCallDelta]:
    """Consecutive deltas of the same call as one (what piled up while a chunk was being sent):
    the first one's id, type and name, and the arguments joined."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        if merged and merged[-1].index == delta.index and delta.id is None and delta.function.name is None:
            last = merged[-1]
            function = FunctionDelta(
                name=last.function.name, arguments=last.function.arguments + delta.function.arguments
            )
            merged[-1] = ToolCallDelta(index=last.index, id=last.id, type=last.type, function=function)
        else:
            merged.append(delta)
    return merged


class Decoder:
    """Free text: every piece streams as content as it comes. The base of the others."""

    def __init__(self) -> None:
        #: how many characters of text have been released as content
        self._released = 0

    def feed(self, piece: str) -> Piece:
        """The next piece of the engine's output; returns what can be streamed now."""
        self._released += len(piece)
        return piece, []

    def finish(self, text: str, *, finish_reason: str | None = None) -> Outcome:
        """The whole output (``Generation.text``) and the engine's finish reason. Works without
        any ``feed`` too: then the tail is everything."""
        return Outcome(text, [], finish_reason, tail_text=text[self._released :])


class NamedCallDecoder(Decoder):
    """The output is the arguments of one named function: streamed as deltas of call 0."""

    def __init__(self, name: str, *, call_id: Callable[[], str]) -> None:
        super().__init__()
        self._name = name
        self._id = call_id()
        self._started = False
        self._sent = 0  # characters of arguments already sent

    def _header(self) -> ToolCallDelta:
        self._started = True
        return ToolCallDelta(index=0, id=self._id, type="function", function=FunctionDelta(name=self._name))

    def _more(self, text: str) -> list[ToolCallDelta]:
        deltas = [] if self._started else [self._header()]
        if text:
            deltas.append(ToolCallDelta(index=0, function=FunctionDelta(arguments=text)))
            self._sent += len(text)
        return deltas

    def feed(self, piece: str) -> Piece:
        return "", (self._more(piece) if piece else [])

    def finish(self, text: str, *, finish_reason: str | None = None) -> Outcome:
        # The arguments are the raw output, exactly what streamed: a client that joins the deltas
        # gets the same string. When it is not JSON (cut short, or an engine that ignores
        # schemas) the call is still reported, as OpenAI does, and ``problem`` says so.
        call = ToolCall(id=self._id, function=FunctionCall(name=self._name, arguments=text))
        problem = None
        try:
            json.loads(text)
        except ValueError as exc:
            problem = f"the arguments of {self._name} are not JSON: {exc}"
        tail = self._more(text[self._sent :])
        reason = "tool_calls" if problem is None else finish_reason
        return Outcome("", [call], reason, tail_calls=tail, problem=problem)


def _call_deltas(index: int, call: ToolCall) -> list[ToolCallDelta]:
    return [
        ToolCallDelta(index=index, id=call.id, type="function", function=FunctionDelta(name=call.function.name)),
        ToolCallDelta(index=index, function=FunctionDelta(arguments=call.function.arguments)),
    ]


def _arguments(value: Any) -> str | None:
    """A call's arguments as JSON text: an object as ``json.dumps`` writes it, or a string that
    is already a JSON object, as it is. None when they are neither."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return value if isinstance(parsed, dict) else None
    return None


class _CallsDecoder(Decoder):
    """Holds text back, then turns it into calls of known functions at the end."""

    def __init__(self, functions: frozenset[str], *, call_id: Callable[[], str]) -> None:
        super().__init__()
        self._functions = functions
        self._call_id = call_id

    def _call(self, obj: Any) -> ToolCall | str:
        """One call from a parsed ``{"name": ..., "arguments": {...}}``, or why not."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return 'a call is a JSON object {"name": ..., "arguments": {...}}'
        name = obj["name"]
        if name not in self._functions:
            return f"unknown function {name!r}"
        extra = set(obj) - {"name", "arguments"}
        if extra:
            return f"unexpected keys in a call: {sorted(extra)}"
        arguments = _arguments(obj.get("arguments", {}))
        if arguments is None:
            return f"the arguments of {name} are not a JSON object"
        return ToolCall(id=self._call_id(), function=FunctionCall(name=name, arguments=arguments))

    def _outcome(self, text: str, parsed: list[Any] | str, finish_reason: str | None) -> Outcome:
        if not isinstance(parsed, str):
            calls = [self._call(obj) for obj in parsed]
            problems = [c for c in calls if isinstance(c, str)]
            if not problems:
                made = [c for c in calls if isinstance(c, ToolCall)]
                deltas = [d for i, c in enumerate(made) for d in _call_deltas(i, c)]
                return Outcome("", made, "tool_calls", tail_calls=deltas)
            parsed = problems[0]
        return Outcome(text, [], finish_reason, tail_text=text[self._released :], problem=parsed)


class RequiredCallDecoder(_CallsDecoder):
    """One ``{"name", "arguments"}`` object (the schema's anyOf), sent whole at the end."""

    def feed(self, piece: str) -> Piece:
        return "", []

    def finish(self, text: str, *, finish_reason: str | None = None) -> Outcome:
        try:
            parsed: list[Any] | str = [json.loads(text)]
        except ValueError as exc:
            parsed = f"the call is not JSON: {exc}"
        return self._outcome(text, parsed, finish_reason)


_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)


def parse_calls(text: str) -> list[Any] | str:
    """The call objects in a reply that is nothing but calls, or why it is not.

    Accepted: one JSON object, or ``<tool_call>...</tool_call>`` blocks
    separated only by whitespace (the last one may lack its closing tag: small models often end
    there). Any other text around them makes the reply plain text."""
    stripped = text.strip()
    if stripped.startswith(CALL_OPEN):
        objects = []
        end = 0
        for match in _BLOCK.finditer(stripped):
            if stripped[end : match.start()].strip():
                return "text between tool calls"
            try:
                objects.append(json.loads(match.group(1)))
            except ValueError as exc:
                return f"a tool call is not JSON: {exc}"
            end = match.end()
        if stripped[end:].strip():
            return "text after the tool calls"
        return objects
    try:
        parsed = json.loads(stripped)
    except ValueError as exc:
        return f"not JSON: {exc}"
    return [parsed]


@dataclass(slots=True)
class _Hold:
    #: "open": could still be a call; "held": looks like one, held to the end; "text": streaming
    state: Literal["open", "held", "text"] = "open"
    buffer: list[str] = field(default_factory=list)


class AutoDecoder(_CallsDecoder):
    """The model may answer in text or call tools. Text streams as it comes, except while the
    reply could still be a call (it starts, after whitespace, with ``{`` or ``<tool_call>``):
    that is held back to the end, then becomes calls, or content if it is not a valid call of a
    known function. A call must be the whole reply: calls after some text stay text."""

    def __init__(self, functions: frozenset[str], *, call_id: Callable[[], str]) -> None:
        super().__init__(functions, call_id=call_id)
        self._hold = _Hold()

    def feed(self, piece: str) -> Piece:
        hold = self._hold
        if hold.state == "text":
            self._released += len(piece)
            return piece, []
        if hold.state == "held":  # kept whole by the engine: ``finish`` gets all of it
            return "", []
        hold.buffer.append(piece)
        start = "".join(hold.buffer).lstrip()
        if start.startswith(("{", CALL_OPEN)):
            hold.state = "held"
            hold.buffer.clear()
            return "", []
        if CALL_OPEN.startswith(start):  # nothing but whitespace yet, or the start of the tag
            return "", []
        hold.state = "text"
        released = "".join(hold.buffer)
        hold.buffer.clear()
        self._released += len(released)
        return released, []

    def finish(self, text: str, *, finish_reason: str | None = None) -> Outcome:
        if self._hold.state == "text":
            return Outcome(text, [], finish_reason, tail_text=text[self._released :])
        return self._outcome(text, parse_calls(text), finish_reason)
