"""OpenAI's HTTP shapes, translated to the swarm's wire messages and back. No I/O.

    body (dict) --chat_request--> ChatCall(PromptRequest)   --SwarmClient-->   Answer
    Answer --chat_completion--> ChatCompletion (dict)
    StreamChunk... + Answer --ChatChunks--> chat.completion.chunk dicts (SSE: ``sse``/``DONE``)

Every refusal is an :class:`ApiError` (``api_errors.py``). ``gateway.py`` does the HTTP; this
module is tested on its own against the ``openai`` package's response types.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from nova_swarm.broker.contract.errors import ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import (
    Answer,
    HubStatus,
    NodeState,
    NodeTable,
    PromptRequest,
    StreamChunk,
    ToolCall,
    Usage,
    describe,
)

from . import model_names, token_ids
from .api_errors import ApiError, bad_request, model_not_found
from .leniency import LLAMA_NO_OPS, LLAMA_SAMPLING
from .model_names import ModelNames

OWNED_BY = "nova-swarm"


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ChatCall:
    request: PromptRequest
    #: ``stream_options.include_usage``: a last chunk with the usage and no choices
    include_usage: bool = False
    #: fields accepted that changed nothing (``leniency.ignored_header``)
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EmbedCall:
    request: PromptRequest
    encoding_format: Literal["float", "base64"] = "float"
    ignored: tuple[str, ...] = ()


#: OpenAI's (and llama-server's) fields we accept and ignore: they change nothing a client
#: could notice here. Responses list the ones a request gave in ``X-Swarm-Ignored-Fields``.
_IGNORED = frozenset(
    {
        *LLAMA_NO_OPS,
        "user",
        "metadata",
        "store",
        "parallel_tool_calls",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "reasoning_effort",
        "verbosity",
    }
)

#: OpenAI fields we accept only at the value that asks for nothing we lack.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
    "moderation": (None,),
}

#: The swarm's own options, sent as extra body fields (``extra_body`` in the openai package).
SWARM_FIELDS = ("strategy", "fanout", "tags", "timeout_s", "private", "retrieval")

_CHAT_FIELDS = frozenset(
    {
        "messages",
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        *LLAMA_SAMPLING,
        "stop",
        "stream",
        "stream_options",
        "response_format",
        "tools",
        "tool_choice",
        *SWARM_FIELDS,
    }
)
_EMBED_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "tags", "timeout_s", "private"})

#: keys an OpenAI client echoes back in an assistant message it got from us; empty, they say nothing
_ECHOED_MESSAGE_KEYS = frozenset({"refusal", "annotations", "audio", "function_call"})


def requested_model(body: dict[str, Any], known_models: set[str] | None, names: ModelNames | None = None) -> str | None:
    """The model to route to (None: any node), or 404 when the swarm has nothing by that name.

    ``known_models`` is every model in the hub's node table; None when the table has not been
    seen yet, and then the hub decides (it answers ``unknown_model``). Case, aliases and the
    fallback: ``model_names.resolve``."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    try:
        return model_names.resolve(model, known_models, names)
    except RequestFailed as exc:
        raise model_not_found(exc.message) from exc


def chat_request(body: Any, *, known_models: set[str] | None = None, names: ModelNames | None = None) -> ChatCall:
    """An OpenAI chat completion request as a PromptRequest (without id: the gateway sets it)."""
    body = _object(body)
    ignored = _check_fields(body, _CHAT_FIELDS)
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise bad_request("'messages' must be a non-empty list of messages", param="messages")
    messages = [_message(i, m) for i, m in enumerate(raw_messages)]
    params: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", *LLAMA_SAMPLING):
        if body.get(name) is not None:
            params[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", param="stream_options")
        include_usage = options.get("include_usage") is True
    fields: dict[str, Any] = {
        "messages": messages,
        "params": params,
        "model": requested_model(body, known_models, names),
        "stream": body.get("stream") or False,
        **{name: body[name] for name in ("response_format", "tools", "tool_choice") if body.get(name) is not None},
        **_swarm_options(body),
    }
    return ChatCall(_validate(fields), include_usage=include_usage, ignored=ignored)


def embed_request(body: Any, *, known_models: set[str] | None = None, names: ModelNames | None = None) -> EmbedCall:
    body = _object(body)
    ignored = _check_fields(body, _EMBED_FIELDS)
    texts = _embed_texts(body.get("input"))
    encoding: Literal["float", "base64"]
    match body.get("encoding_format"):
        case None | "float":
            encoding = "float"
        case "base64":
            encoding = "base64"
        case _:
            raise bad_request("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("'dimensions' is not supported: the vectors have the model's own size", param="dimensions")
    fields = {"kind": "embed", "input": texts, "model": requested_model(body, known_models, names)}
    fields.update({k: body[k] for k in ("tags", "timeout_s", "private") if body.get(k) is not None})
    return EmbedCall(_validate(fields), encoding_format=encoding, ignored=ignored)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _embed_texts(raw: Any) -> list[Any]:
    """``input`` as texts: a string, a list of strings, or OpenAI's token arrays (one list of
    ints, or a list of them). Token ids are OpenAI's (cl100k_base: what LangChain's
    ``OpenAIEmbeddings`` and others count with), not the node model's, so they are turned back
    into text here (``token_ids``), and the node embeds that text with its own tokenizer."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise bad_request("'input' must be a string, a non-empty list of strings, or token arrays", param="input")
    try:
        if all(_is_int(t) for t in raw):
            return [token_ids.cl100k_text(raw, where="input")]
        if all(isinstance(t, list) and t and all(_is_int(i) for i in t) for t in raw):
            return [token_ids.cl100k_text(t, where=f"input[{i}]") for i, t in enumerate(raw)]
    except RequestFailed as exc:
        raise bad_request(exc.message, param="input") from exc
    if all(isinstance(t, str) for t in raw):
        return raw
    raise bad_request("'input' must be all strings or all token arrays (lists of integers), not a mix", param="input")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> tuple[str, ...]:
    """The names of the fields given that are accepted and ignored; 400 for any refused."""
    ignored = []
    for name, value in body.items():
        if name in allowed:
            continue
        if name in _IGNORED:
            ignored.append(name)
            continue
        if name in _HARMLESS:
            if value not in _HARMLESS[name]:
                raise bad_request(f"{name}={json.dumps(value)[:60]} is not supported by this swarm", param=name)
            continue
        raise bad_request(f"unknown field {name!r}", param=name, code=ErrorCode.UNKNOWN_FIELD)
    return tuple(ignored)


def _swarm_options(body: dict[str, Any]) -> dict[str, Any]:
    return {name: body[name] for name in SWARM_FIELDS if body.get(name) is not None}


def _message(index: int, raw: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object", param=where)
    role = raw.get("role")
    if role == "developer":
        role = "system"  # OpenAI's newer name for the system prompt
    if role not in ("system", "user", "assistant", "tool"):
        raise bad_request(f"{where}.role must be system, developer, user, assistant or tool", param=f"{where}.role")
    message: dict[str, Any] = {"role": role, "content": _content(where, raw.get("content"))}
    for key, value in raw.items():
        if key in ("role", "content"):
            continue
        if key in ("name", "tool_call_id"):
            if value is not None:
                message[key] = value
        elif key == "tool_calls":
            if value:  # an empty list or null: no calls
                message[key] = [_tool_call(f"{where}.tool_calls[{i}]", c) for i, c in enumerate(_list(where, value))]
        elif key in _ECHOED_MESSAGE_KEYS and not value:
            continue
        else:
            raise bad_request(f"unknown field {key!r} in {where}", param=f"{where}.{key}", code=ErrorCode.UNKNOWN_FIELD)
    return message


def _content(where: str, content: Any) -> str:
    if content is None:
        return ""  # an assistant turn that only called tools
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise bad_request(
                f"{where}.content[{i}] is a {kind or 'malformed'!s} part; this swarm's models read text only",
                param=f"{where}.content",
            )
    return "\n".join(texts)


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise bad_request(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    return value


def _tool_call(where: str, raw: Any) -> Any:
    if isinstance(raw, dict) and isinstance(raw.get("function"), dict):
        arguments = raw["function"].get("arguments")
        if isinstance(arguments, dict):  # lenient: some clients send the object, not its JSON text
            raw = {**raw, "function": {**raw["function"], "arguments": json.dumps(arguments)}}
    return raw


def _validate(fields: dict[str, Any]) -> PromptRequest:
    try:
        return PromptRequest.model_validate(fields)
    except ValidationError as exc:
        unknown = [".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            raise bad_request(
                f"unknown field(s): {', '.join(unknown)}", param=unknown[0], code=ErrorCode.UNKNOWN_FIELD
            ) from exc
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise bad_request(describe(exc), param=".".join(str(p) for p in first) or None) from exc


# ---------------------------------------------------------------- responses


def swarm_info(answer: Answer) -> dict[str, Any]:
    """What the swarm adds to OpenAI's response: who answered, how fast, how."""
    return {
        "node_id": answer.node_id,
        "tokens_per_s": answer.timings.tokens_per_s if answer.timings else None,
        "latency_ms": answer.latency_ms,
        "strategy": answer.strategy,
        "attempts": answer.attempts,
    }


def finish_reason(answer: Answer) -> str:
    """OpenAI's finish reasons are a closed set; the node's may say more (``cancelled``...)."""
    if answer.tool_calls:
        return "tool_calls"
    if answer.finish_reason in ("length", "content_filter"):
        return answer.finish_reason
    return "stop"


def usage(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [call.model_dump() for call in calls]


def chat_completion(answer: Answer, *, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.tool_calls:
        message["content"] = None
        message["tool_calls"] = _tool_calls(answer.tool_calls)
    return {
        "id": f"chatcmpl-{answer.id}",
        "object": "chat.completion",
        "created": created,
        "model": answer.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(answer), "logprobs": None}],
        "usage": usage(answer.usage),
        "system_fingerprint": None,
        "swarm": swarm_info(answer),
    }


class ChatChunks:
    """The chunks of one streamed chat completion, in OpenAI's order:

    an opening delta (``role``), content or ``tool_calls`` deltas, whatever the full answer has
    that the stream missed, a closing chunk (empty delta, ``finish_reason``, ``swarm``), and a
    usage chunk when asked for. ``relay.py`` frames each with :func:`sse` and ends with DONE.
    """

    def __init__(self, request_id: str, *, model: str, created: int, include_usage: bool = False) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.text = ""
        self.streamed_tools = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def piece(self, chunk: StreamChunk) -> list[dict[str, Any]]:
        """The chunks for one StreamChunk; ApiError for a restart that OpenAI's format cannot say."""
        if chunk.restart:
            if self.text or self.streamed_tools:
                raise ApiError(
                    502,
                    "the node streaming this answer was lost after part of it was sent, and another node "
                    "started over, which a stream in OpenAI's format cannot express: ask again, or without stream",
                    code=ErrorCode.NODE_LOST.value,
                )
        out = []
        if chunk.text:
            self.text += chunk.text
            out.append(self._chunk({"content": chunk.text}))
        if chunk.tool_calls:
            self.streamed_tools = True
            out.append(self._chunk({"tool_calls": [d.model_dump(exclude_none=True) for d in chunk.tool_calls]}))
        return out

    def closing(self, answer: Answer) -> list[dict[str, Any]]:
        """The rest, from the full answer: the reply topic has all of it even if stream messages were lost."""
        self.model = answer.model
        out = []
        if answer.tool_calls and not self.streamed_tools:
            deltas = [{"index": i, **call.model_dump()} for i, call in enumerate(answer.tool_calls)]
            out.append(self._chunk({"tool_calls": deltas}))
        elif not answer.tool_calls and answer.text.startswith(self.text) and len(answer.text) > len(self.text):
            out.append(self._chunk({"content": answer.text[len(self.text) :]}))
            self.text = answer.text
        closing = self._chunk({}, finish_reason(answer))
        closing["swarm"] = swarm_info(answer)
        out.append(closing)
        if self.include_usage:
            last = self._chunk({})
            last["choices"] = []
            last["usage"] = usage(answer.usage)
            out.append(last)
        return out


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event, as OpenAI frames them."""
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def embeddings(answer: Answer, *, encoding_format: Literal["float", "base64"] = "float") -> dict[str, Any]:
    vectors = answer.embeddings or []
    data = [
        {"object": "embedding", "index": i, "embedding": _b64(v) if encoding_format == "base64" else v}
        for i, v in enumerate(vectors)
    ]
    prompt_tokens = answer.usage.prompt_tokens if answer.usage else 0
    return {
        "object": "list",
        "data": data,
        "model": answer.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "swarm": swarm_info(answer),
    }


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector as little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# ---------------------------------------------------------------- models, health, nodes

#: every model a node ever announced (the hub's test for ``unknown_model``); None: not seen yet
known_models = model_names.served_models


def model_card(entry: model_names.ModelEntry, *, created: int) -> dict[str, Any]:
    return {
        "id": entry.name,
        "object": "model",
        "created": created,
        "owned_by": OWNED_BY,
        "nodes": entry.nodes,
        # which nodes serve it, and which have it in memory now (the others load it first)
        "node_ids": list(entry.node_ids),
        "loaded_on": list(entry.loaded_on),
        # llama-server and LM Studio name these fields so; clients size prompts by them
        "context_length": entry.ctx,
        "max_tokens": entry.max_tokens,
        "capabilities": list(entry.capabilities),
    }


def models(fleet: NodeTable | None, *, created: int, max_tokens_limit: int | None = None) -> dict[str, Any]:
    """``/v1/models``: the models of nodes online or paused, with how many nodes serve each, its
    context length, the longest answer a request gets, and what it can do."""
    entries = model_names.catalogue(fleet, max_tokens_limit=max_tokens_limit)
    return {"object": "list", "data": [model_card(entry, created=created) for entry in entries]}


def model(
    fleet: NodeTable | None,
    name: str,
    *,
    created: int,
    names: ModelNames | None = None,
    max_tokens_limit: int | None = None,
) -> dict[str, Any]:
    """One model's card, found as requests find it (case, aliases), but never by the fallback:
    asking about a model is asking whether it exists."""
    strict = ModelNames(aliases=names.aliases, fallback=False) if names else ModelNames(fallback=False)
    try:
        wanted = model_names.resolve(name, known_models(fleet), strict)
    except RequestFailed:
        wanted = name
    for card in models(fleet, created=created, max_tokens_limit=max_tokens_limit)["data"]:
        if card["id"] == wanted:
            return card
    raise model_not_found(f"the model {name!r} is not served by any node online")


def health(hub: HubStatus | None, fleet: NodeTable | None) -> dict[str, Any]:
    if hub is not None:
        online = hub.nodes_online
    else:
        online = sum(1 for row in fleet.nodes if row.state is NodeState.ONLINE) if fleet else 0
    return {
        "status": "ok",
        "hub": hub.state if hub is not None else "unknown",
        "nodes_online": online,
        # the longest answer a request gets, and what one without max_tokens runs up to
        "max_tokens_limit": hub.max_tokens if hub is not None else None,
    }


def nodes(fleet: NodeTable | None) -> dict[str, Any]:
    """``/v1/swarm/nodes``: the hub's node table as it is on the wire."""
    if fleet is None:
        return {"ts": None, "nodes": []}
    result: dict[str, Any] = fleet.model_dump(mode="json")
    return result
