"""OpenAI's Responses API (``/v1/responses``), translated to the swarm's wire messages and back.
No I/O.

    body (dict) --responses_request--> ResponsesCall(PromptRequest) --SwarmClient--> Answer
    Answer --response--> a ``response`` object (dict)
    StreamChunk... + Answer --ResponseEvents--> named SSE events, numbered by ``sequence_number``:
        response.created, response.in_progress, response.output_item.added,
        response.content_part.added, response.output_text.delta, response.output_text.done,
        response.content_part.done, response.function_call_arguments.delta/.done,
        response.output_item.done, response.completed (or response.incomplete)

The swarm keeps no conversations, so the API's stateful side is refused with a clear 400:
``previous_response_id``, ``conversation``, ``background``, built-in tools (web and file search,
code interpreter...), ``reasoning``, images and files in the input. What is stateless maps onto
the chat path: ``instructions`` is the system turn; ``input`` a string or a list of messages
(``input_text``/``output_text`` parts), ``function_call`` and ``function_call_output`` items;
``max_output_tokens``, ``temperature``, ``top_p``; function ``tools`` and ``tool_choice``;
``text.format`` (``json_schema``, ``json_object``). Refusals are OpenAI's error shape
(``ApiError``); in a stream, an ``error`` event.
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
from .openai_api import SWARM_FIELDS, requested_model, swarm_info
from .openai_api import _validate as validate  # the one place pydantic's errors become a 400


@dataclass(frozen=True, slots=True)
class ResponsesCall:
    request: PromptRequest
    ignored: tuple[str, ...] = ()


_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "tools",
        "tool_choice",
        "text",
        *LLAMA_SAMPLING,
        *SWARM_FIELDS,
    }
)
#: fields that change nothing here (no storage, one answer at a time, no caching to key)
_IGNORED = frozenset(
    {
        "store",
        "metadata",
        "user",
        "parallel_tool_calls",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "truncation",
        "include",
    }
)
#: stateful or hosted features the swarm does not have: refused at any value but "none"
_REFUSED = frozenset(
    {"previous_response_id", "conversation", "background", "reasoning", "prompt", "max_tool_calls", "top_logprobs"}
)


def responses_request(
    body: Any, *, known_models: set[str] | None = None, names: ModelNames | None = None
) -> ResponsesCall:
    """A Responses API request as a PromptRequest (without id: the gateway sets it)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    ignored = []
    for name, value in body.items():
        if name in _FIELDS:
            continue
        if name in _IGNORED:
            ignored.append(name)
        elif name in _REFUSED:
            if value not in (None, False, 0):
                raise bad_request(
                    f"'{name}' is not supported: the swarm keeps no responses, conversations or hosted features",
                    param=name,
                )
        else:
            raise bad_request(f"unknown field {name!r}", param=name, code=ErrorCode.UNKNOWN_FIELD)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string", param="instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    messages += _input(body.get("input"))
    params: dict[str, Any] = {}
    if body.get("max_output_tokens") is not None:
        params["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", *LLAMA_SAMPLING):
        if body.get(name) is not None:
            params[name] = body[name]
    fields: dict[str, Any] = {
        "messages": messages,
        "params": params,
        "model": requested_model(body, known_models, names),
        "stream": body.get("stream") or False,
        **{name: body[name] for name in SWARM_FIELDS if body.get(name) is not None},
    }
    if body.get("tools"):
        fields["tools"] = [_tool(i, t) for i, t in enumerate(_list("tools", body["tools"]))]
    choice = body.get("tool_choice")
    if choice is not None:
        if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
            choice = {"type": "function", "function": {"name": choice["name"]}}
        elif choice not in ("auto", "none", "required"):
            raise bad_request(
                "'tool_choice' must be auto, none, required or {type: function, name}", param="tool_choice"
            )
        if choice != "none" or "tools" in fields:
            fields["tool_choice"] = choice
    text = body.get("text")
    if text is not None:
        fields.update(_text(text))
    return ResponsesCall(validate(fields), ignored=tuple(ignored))


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise bad_request(f"'{where}' must be a list", param=where)
    return value


def _input(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad_request("'input' must be a string or a non-empty list of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise bad_request(f"{where}.role must be user, assistant, system or developer", param=where)
            out.append({"role": role, "content": _parts(where, item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if out and out[-1]["role"] == "assistant" and not out[-1]["content"] and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _parts(where, output)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        else:
            raise bad_request(
                f"{where} is a {kind or 'malformed'!s} item; the swarm takes messages and "
                "function calls and their outputs",
                param=where,
            )
    return out


def _parts(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise bad_request(
                f"{where}.content[{i}] is a {kind or 'malformed'!s} part; the swarm's models read text only",
                param=where,
            )
    return "\n".join(texts)


def _tool(index: int, raw: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(raw, dict) or raw.get("type") != "function":
        kind = raw.get("type") if isinstance(raw, dict) else None
        raise bad_request(f"{where} is a {kind or 'malformed'!s} tool; the swarm runs function tools only", param=where)
    extra = set(raw) - {"type", "name", "description", "parameters", "strict"}
    if extra:
        raise bad_request(f"unknown field {sorted(extra)[0]!r} in {where}", param=where, code=ErrorCode.UNKNOWN_FIELD)
    function = {k: raw[k] for k in ("name", "description", "parameters", "strict") if raw.get(k) is not None}
    return {"type": "function", "function": function}


def _text(raw: Any) -> dict[str, Any]:
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or set(raw) - {"format", "verbosity"}:
        raise bad_request("'text' takes 'format' (and 'verbosity', which changes nothing here)", param="text")
    if fmt is None or fmt == {"type": "text"}:
        return {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        spec = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    raise bad_request("'text.format' must be text, json_object or json_schema (with 'schema')", param="text")


# ---------------------------------------------------------------- responses


def _usage(answer: Answer) -> dict[str, Any]:
    got = answer.usage
    prompt, completion = (got.prompt_tokens, got.completion_tokens) if got else (0, 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _shell(request_id: str, *, model: str, created: int, status: str) -> dict[str, Any]:
    return {
        "id": f"resp_{request_id}",
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": [],
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": False,
        "temperature": None,
        "top_p": None,
        "tool_choice": "auto",
        "tools": [],
        "usage": None,
    }


def _message_item(request_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"type": "message", "id": f"msg_{request_id}", "role": "assistant", "status": status, "content": [part]}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{call_id}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response(answer: Answer, *, created: int) -> dict[str, Any]:
    """The ``response`` object of a request without ``stream`` (and of ``response.completed``)."""
    incomplete = answer.finish_reason == "length" and not answer.tool_calls
    status = "incomplete" if incomplete else "completed"
    body = _shell(answer.id, model=answer.model, created=created, status=status)
    if answer.text or not answer.tool_calls:
        body["output"].append(_message_item(answer.id, answer.text, status))
    for call in answer.tool_calls or ():
        body["output"].append(_call_item(call.id, call.function.name, call.function.arguments, "completed"))
    body["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
    body["usage"] = _usage(answer)
    body["swarm"] = swarm_info(answer)
    return body


def event(data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {data['type']}\ndata: {payload}\n\n".encode()


class ResponseEvents:
    """The events of one streamed response, in OpenAI's order, each with its ``sequence_number``.

    Text goes to one message item (opened on its first text); each tool call is a function_call
    item of its own. ``closing`` adds what the stream missed, finishes the open item and ends with
    ``response.completed`` (``response.incomplete`` when the length ran out) holding it all."""

    def __init__(self, request_id: str, *, model: str, created: int) -> None:
        self.request_id = request_id
        self.model = model
        self.created = created
        self.text = ""
        self._seq = 0
        #: the output items so far, and the index of the one still open (None: none is)
        self._items: list[dict[str, Any]] = []
        self._open: int | None = None
        self._calls: dict[int, int] = {}  # a streamed call's index -> its output index

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event(data)

    def opening(self) -> list[bytes]:
        shell = _shell(self.request_id, model=self.model, created=self.created, status="in_progress")
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        out = self._finish()
        self._items.append(item)
        self._open = len(self._items) - 1
        out.append(self._event("response.output_item.added", output_index=self._open, item=item))
        if item["type"] == "message":
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=self._open,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            )
        return out

    def _finish(self) -> list[bytes]:
        if self._open is None:
            return []
        index, item = self._open, self._items[self._open]
        self._open = None
        item["status"] = "completed"
        out = []
        if item["type"] == "message":
            text = item["content"][0]["text"]
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self._event("response.output_text.done", text=text, logprobs=[], **ids))
            out.append(self._event("response.content_part.done", part=item["content"][0], **ids))
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def _text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open is None or self._items[self._open]["type"] != "message":
            out += self._add(_message_item(self.request_id, "", "in_progress"))
        assert self._open is not None
        item = self._items[self._open]
        item["content"][0]["text"] += text
        self.text += text
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=self._open,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return out

    def _arguments(self, index: int, arguments: str) -> bytes:
        item = self._items[index]
        item["arguments"] += arguments
        return self._event(
            "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=arguments
        )

    def piece(self, chunk: StreamChunk) -> list[bytes]:
        if chunk.restart and (self.text or self._calls):
            raise ApiError(
                502,
                "the node streaming this answer was lost after part of it was sent, and another node "
                "started over, which a stream cannot take back: ask again, or without stream",
                code=ErrorCode.NODE_LOST.value,
            )
        out = self._text(chunk.text) if chunk.text else []
        for delta in chunk.tool_calls or ():
            if delta.index not in self._calls:
                call_id = delta.id or f"call_{self.request_id}_{delta.index}"
                out += self._add(_call_item(call_id, delta.function.name or "", "", "in_progress"))
                assert self._open is not None
                self._calls[delta.index] = self._open
            if delta.function.arguments:
                out.append(self._arguments(self._calls[delta.index], delta.function.arguments))
        return out

    def closing(self, answer: Answer) -> list[bytes]:
        out: list[bytes] = []
        if answer.tool_calls and not self._calls:
            for call in answer.tool_calls:
                out += self._add(_call_item(call.id, call.function.name, "", "in_progress"))
                assert self._open is not None
                out.append(self._arguments(self._open, call.function.arguments))
        elif not answer.tool_calls and answer.text.startswith(self.text) and len(answer.text) > len(self.text):
            out += self._text(answer.text[len(self.text) :])
        out += self._finish()
        final = response(answer, created=self.created)
        final["id"] = f"resp_{self.request_id}"
        final["output"] = self._items or final["output"]
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=final))
        return out

    def failure(self, exc: ApiError) -> list[bytes]:
        return [self._event("error", code=exc.code, message=exc.message, param=exc.param)]
