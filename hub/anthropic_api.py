"""Anthropic's Messages API shapes, translated to the swarm's wire messages and back. No I/O.

    body (dict) --messages_request--> MessagesCall(PromptRequest)   --SwarmClient-->   Answer
    Answer --message--> a ``message`` object (dict)
    StreamChunk... + Answer --MessageEvents--> named SSE events: message_start, content_block_start,
        ping, content_block_delta (text_delta / input_json_delta), content_block_stop,
        message_delta (stop_reason, usage), message_stop

What maps and what does not:

- ``system`` (a string or text blocks) becomes the system turn; user and assistant turns take a
  string or ``text``, ``tool_use`` and ``tool_result`` blocks. A user turn's ``tool_result``
  blocks become OpenAI-style ``tool`` turns (the swarm's wire shape), ahead of its text.
  Images, documents and thinking blocks are refused: the swarm's models read text only.
- ``max_tokens`` is required, as Anthropic requires it. ``temperature``, ``top_p``, ``top_k``
  (which older SDKs send, and newer ones only in ``extra_body``) and ``stop_sequences`` are
  sampling parameters; ``tools`` (``input_schema``) and ``tool_choice`` (auto, any, tool, none)
  become the swarm's tools; ``output_config.format`` (a JSON schema) the swarm's response_format.
- ``stop_reason`` is ``tool_use``, ``max_tokens`` or ``end_turn``. Never ``stop_sequence``: a
  node reports that it stopped, not whether a stop sequence or the model's end did it, so
  ``end_turn`` covers both and ``stop_sequence`` is always null.
- In a stream, ``message_start`` carries ``input_tokens: 0``: the prompt is counted on the node
  that answers, and ``message_delta``'s usage carries the real count with ``output_tokens``.

Every refusal is an :class:`ApiError` (the OpenAI module's: a status, a message, the swarm's
code), which :func:`error_body` writes in Anthropic's shape:
``{"type": "error", "error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import Answer, PromptRequest, StreamChunk

from .api_errors import ApiError, bad_request
from .leniency import LLAMA_SAMPLING
from .model_names import ModelNames
from .openai_api import SWARM_FIELDS, requested_model
from .openai_api import _validate as validate  # the one place pydantic's errors become a 400

# ---------------------------------------------------------------- errors

#: HTTP statuses as Anthropic's error types; any other 5xx is ``api_error``
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(exc: ApiError) -> dict[str, Any]:
    """Anthropic's error shape; the SDK raises its exception class for the status with it."""
    return {"type": "error", "error": {"type": error_type(exc.status), "message": exc.message}}


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class MessagesCall:
    request: PromptRequest
    #: fields accepted that changed nothing (``leniency.ignored_header``)
    ignored: tuple[str, ...] = ()


_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "tools",
        "tool_choice",
        *LLAMA_SAMPLING,
        *SWARM_FIELDS,
    }
)

#: Anthropic's fields that change nothing a client could notice here (a swarm has no regions,
#: workspaces, speed tiers or prompt-cache diagnostics)
_IGNORED = frozenset(
    {
        "metadata",
        "service_tier",
        "cache_control",
        "inference_geo",
        "speed",
        "user_profile_id",
        "workspace_id",
        "diagnostics",
    }
)

#: keys a content block may carry that change nothing here (prompt caching, citations off)
_BLOCK_EXTRAS = frozenset({"cache_control", "citations"})


def messages_request(
    body: Any, *, known_models: set[str] | None = None, names: ModelNames | None = None
) -> MessagesCall:
    """An Anthropic Messages request as a PromptRequest (without id: the gateway sets it)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    ignored = []
    for name, value in body.items():
        if name in _FIELDS:
            continue
        if name in _IGNORED:
            ignored.append(name)
        elif name == "thinking" and isinstance(value, dict) and value.get("type") == "disabled":
            ignored.append(name)
        elif name == "thinking":
            raise bad_request("extended thinking is not supported by this swarm's models", param="thinking")
        elif name == "output_config":
            continue
        else:
            raise bad_request(f"unknown field {name!r}", param=name, code=ErrorCode.UNKNOWN_FIELD)
    if "model" not in body:
        raise bad_request("'model' is required", param="model")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_request("'max_tokens' is required: a whole number of tokens, at least 1", param="max_tokens")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list of messages", param="messages")
    messages = _system(body.get("system"))
    for index, turn in enumerate(raw):
        messages += _turn(index, turn)
    params: dict[str, Any] = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "top_k", *LLAMA_SAMPLING):
        if body.get(name) is not None:
            params[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_request("'stop_sequences' must be a list of non-empty strings", param="stop_sequences")
        if stops:
            params["stop"] = stops
    fields: dict[str, Any] = {
        "messages": messages,
        "params": params,
        "model": requested_model(body, known_models, names),
        "stream": body.get("stream") or False,
        **{name: body[name] for name in SWARM_FIELDS if body.get(name) is not None},
    }
    fields.update(_output_config(body.get("output_config"), ignored))
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("'tools' must be a list of tools", param="tools")
        if tools:
            fields["tools"] = [_tool(i, t) for i, t in enumerate(tools)]
    if choice is not None:
        converted = _tool_choice(choice)
        if converted == "none" and "tools" in fields:
            fields["tool_choice"] = "none"
        elif converted != "none":
            if "tools" not in fields:
                raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
            fields["tool_choice"] = converted
    return MessagesCall(validate(fields), ignored=tuple(ignored))


def _output_config(raw: Any, ignored: list[str]) -> dict[str, Any]:
    """``output_config``: a JSON schema ``format`` becomes the swarm's response_format (a grammar
    on the node); ``effort`` changes nothing here."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - {"format", "effort"}:
        raise bad_request("'output_config' takes 'format' and 'effort' only", param="output_config")
    if raw.get("effort") is not None:
        ignored.append("output_config.effort")
    fmt = raw.get("format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad_request(
            '\'output_config.format\' must be {"type": "json_schema", "schema": {...}}', param="output_config"
        )
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}}


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    if isinstance(system, list):
        text = "\n".join(_text_block("system", i, b) for i, b in enumerate(system))
        return [{"role": "system", "content": text}] if text else []
    raise bad_request("'system' must be a string or a list of text blocks", param="system")


def _text_block(where: str, index: int, block: Any) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise bad_request(f"{where}[{index}] must be a text block", param=where)
    _no_extras(f"{where}[{index}]", block, {"type", "text"})
    text: str = block["text"]
    return text


def _no_extras(where: str, block: dict[str, Any], allowed: set[str]) -> None:
    for key, value in block.items():
        if key in allowed or (key in _BLOCK_EXTRAS and key != "citations") or (key == "citations" and not value):
            continue
        raise bad_request(f"unknown field {key!r} in {where}", param=where, code=ErrorCode.UNKNOWN_FIELD)


def _turn(index: int, raw: Any) -> list[dict[str, Any]]:
    """One Anthropic turn as the swarm's turns: tool results become ``tool`` turns of their own."""
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object", param=where)
    role = raw.get("role")
    if role not in ("user", "assistant"):
        raise bad_request(f"{where}.role must be user or assistant (the system prompt is 'system')", param=where)
    extra = set(raw) - {"role", "content"}
    if extra:
        raise bad_request(f"unknown field {sorted(extra)[0]!r} in {where}", param=where, code=ErrorCode.UNKNOWN_FIELD)
    content = raw.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content blocks", param=f"{where}.content")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        here = f"{where}.content[{i}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_block(f"{where}.content", i, block))
        elif kind == "tool_use" and role == "assistant":
            _no_extras(here, block, {"type", "id", "name", "input"})
            if not isinstance(block.get("input"), dict) or not isinstance(block.get("id"), str):
                raise bad_request(f"{here} needs an 'id' and an 'input' object", param=here)
            function = {"name": block.get("name"), "arguments": json.dumps(block["input"])}
            calls.append({"id": block["id"], "type": "function", "function": function})
        elif kind == "tool_result" and role == "user":
            _no_extras(here, block, {"type", "tool_use_id", "content", "is_error"})
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{here} needs the 'tool_use_id' it answers", param=here)
            result = _result_text(here, block.get("content"))
            if block.get("is_error"):
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        elif kind in ("tool_use", "tool_result"):
            who = "an assistant" if kind == "tool_use" else "a user"
            raise bad_request(f"{here}: a {kind} block belongs in {who} turn", param=here)
        else:
            raise bad_request(
                f"{here} is a {kind or 'malformed'!s} block; this swarm's models read text and tool blocks only",
                param=here,
            )
    turns = list(results)
    text = "\n".join(texts)
    if role == "assistant":
        turns.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
    elif text or not results:
        turns.append({"role": "user", "content": text})
    return turns


def _result_text(where: str, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_block(f"{where}.content", i, b) for i, b in enumerate(content))
    raise bad_request(f"{where}.content must be a string or a list of text blocks", param=where)


def _tool(index: int, raw: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object", param=where)
    if raw.get("type") not in (None, "custom"):
        kind = raw.get("type")
        raise bad_request(f"{where} is Anthropic's server tool {kind!r}, which this swarm lacks", param=where)
    _no_extras(where, raw, {"type", "name", "description", "input_schema"})
    schema = raw.get("input_schema")
    if not isinstance(schema, dict):
        raise bad_request(f"{where}.input_schema must be a JSON Schema object", param=where)
    function: dict[str, Any] = {"name": raw.get("name"), "parameters": schema}
    if raw.get("description") is not None:
        function["description"] = raw["description"]
    return {"type": "function", "function": function}


def _tool_choice(raw: Any) -> Any:
    kind = raw.get("type") if isinstance(raw, dict) else None
    allowed = {"type", "disable_parallel_tool_use"} | ({"name"} if kind == "tool" else set())
    if kind is None or set(raw) - allowed:
        raise bad_request(
            "'tool_choice' must be {\"type\": auto|any|tool|none} (tool with 'name')", param="tool_choice"
        )
    match kind:
        case "auto":
            return "auto"
        case "any":
            return "required"
        case "none":
            return "none"
        case "tool":
            return {"type": "function", "function": {"name": raw.get("name")}}
    raise bad_request(f"tool_choice type {kind!r} is not auto, any, tool or none", param="tool_choice")


# ---------------------------------------------------------------- responses


def message_id(request_id: str) -> str:
    return f"msg_{request_id}"


def stop_reason(answer: Answer) -> str:
    if answer.tool_calls:
        return "tool_use"
    if answer.finish_reason == "length":
        return "max_tokens"
    return "end_turn"


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError as exc:
        raise ApiError(
            502,
            f"the model's tool call arguments are not JSON: {arguments[:80]!r}",
            code=ErrorCode.INVALID_OUTPUT.value,
        ) from exc


def usage(answer: Answer) -> dict[str, int]:
    if answer.usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {"input_tokens": answer.usage.prompt_tokens, "output_tokens": answer.usage.completion_tokens}


def message(answer: Answer) -> dict[str, Any]:
    """The ``message`` object of a request without ``stream``."""
    content: list[dict[str, Any]] = []
    if answer.text or not answer.tool_calls:
        content.append({"type": "text", "text": answer.text})
    for call in answer.tool_calls or ():
        content.append(
            {"type": "tool_use", "id": call.id, "name": call.function.name, "input": _input(call.function.arguments)}
        )
    return {
        "id": message_id(answer.id),
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": content,
        "stop_reason": stop_reason(answer),
        "stop_sequence": None,
        "usage": usage(answer),
    }


def event(data: dict[str, Any]) -> bytes:
    """One named server-sent event, as Anthropic frames them (the name is the data's ``type``)."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {data['type']}\ndata: {payload}\n\n".encode()


class MessageEvents:
    """The events of one streamed message, in Anthropic's order.

    ``opening``: message_start and a ping. ``piece``: text goes to a text block (opened on its
    first text), each tool call to a tool_use block of its own whose input streams as
    ``input_json_delta``; a new block closes the one before. ``closing``: whatever the full
    answer has that the stream missed, the last block's stop, message_delta, message_stop.
    """

    def __init__(self, request_id: str, *, model: str) -> None:
        self.id = message_id(request_id)
        self.model = model
        self.text = ""
        #: the index of the block open now, and what it is (``text`` or a tool call's index)
        self._open: tuple[int, str | int] | None = None
        self._blocks = 0
        self._tools = False

    def opening(self) -> list[bytes]:
        start: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [event({"type": "message_start", "message": start}), event({"type": "ping"})]

    def _start(self, what: str | int, block: dict[str, Any]) -> list[bytes]:
        out = self._stop()
        self._open = (self._blocks, what)
        self._blocks += 1
        out.append(event({"type": "content_block_start", "index": self._open[0], "content_block": block}))
        return out

    def _stop(self) -> list[bytes]:
        if self._open is None:
            return []
        index = self._open[0]
        self._open = None
        return [event({"type": "content_block_stop", "index": index})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        assert self._open is not None
        return event({"type": "content_block_delta", "index": self._open[0], "delta": delta})

    def _text(self, text: str) -> list[bytes]:
        in_text = self._open is not None and self._open[1] == "text"
        out = [] if in_text else self._start("text", {"type": "text", "text": ""})
        self.text += text
        out.append(self._delta({"type": "text_delta", "text": text}))
        return out

    def piece(self, chunk: StreamChunk) -> list[bytes]:
        """The events for one StreamChunk; ApiError for a restart that Anthropic's format cannot say."""
        if chunk.restart and (self.text or self._tools):
            raise ApiError(
                502,
                "the node streaming this answer was lost after part of it was sent, and another node "
                "started over, which a stream cannot take back: ask again, or without stream",
                code=ErrorCode.NODE_LOST.value,
            )
        out = self._text(chunk.text) if chunk.text else []
        for delta in chunk.tool_calls or ():
            self._tools = True
            if self._open is None or self._open[1] != delta.index:
                block = {"type": "tool_use", "id": delta.id or "", "name": delta.function.name or "", "input": {}}
                out += self._start(delta.index, block)
            if delta.function.arguments:
                out.append(self._delta({"type": "input_json_delta", "partial_json": delta.function.arguments}))
        return out

    def closing(self, answer: Answer) -> list[bytes]:
        """The rest, from the full answer: the reply topic has all of it even if stream messages were lost."""
        out: list[bytes] = []
        if answer.tool_calls and not self._tools:
            for i, call in enumerate(answer.tool_calls):
                _input(call.function.arguments)  # a 502 error event rather than input a client cannot parse
                out += self._start(i, {"type": "tool_use", "id": call.id, "name": call.function.name, "input": {}})
                out.append(self._delta({"type": "input_json_delta", "partial_json": call.function.arguments}))
        elif not answer.tool_calls and answer.text.startswith(self.text) and len(answer.text) > len(self.text):
            out += self._text(answer.text[len(self.text) :])
        out += self._stop()
        counts = usage(answer)
        out.append(
            event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason(answer), "stop_sequence": None},
                    "usage": counts,
                }
            )
        )
        out.append(event({"type": "message_stop"}))
        return out

    @staticmethod
    def failure(exc: ApiError) -> list[bytes]:
        """A failure after the stream began: Anthropic's ``error`` event."""
        return [event(error_body(exc))]
