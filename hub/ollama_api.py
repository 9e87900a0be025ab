"""Ollama's HTTP shapes, translated to the swarm's wire messages and back. No I/O.

    body (dict) --chat_request/generate_request--> OllamaCall(PromptRequest) --SwarmClient--> Answer
    Answer --chat_response/generate_response--> the one JSON object of a request without ``stream``
    StreamChunk... + Answer --Lines--> the NDJSON lines of a stream (``ndjson``), the last ``done: true``
    body --embed_request--> OllamaCall(kind=embed) ... Answer --embed_response/embeddings_response-->

Ollama streams unless the request says ``"stream": false``. Its clients (the ``ollama``
package, Open WebUI, Continue) name models ``name:tag``; :func:`resolve_model` maps such a name
onto the swarm's model ids. Its ``options`` become ``GenParams`` through ``leniency.ollama_options``
(shared with the other APIs), and what a request gave that changes nothing here is listed in
the ``X-Swarm-Ignored-Fields`` header (``leniency.ignored_header``).

Every refusal is an :class:`ApiError` (the OpenAI module's: a status and a message), which the
gateway writes in Ollama's shape with :func:`error_body`: ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from nova_swarm.broker.contract.errors import RequestFailed
from nova_swarm.broker.contract.messages import Answer, NodeTable, PromptRequest, StreamChunk, ToolCall
from nova_swarm.broker.contract.version import __version__

from . import model_names
from .api_errors import ApiError, bad_request
from .leniency import OptionError, ollama_options
from .model_names import ModelEntry, ModelNames
from .openai_api import SWARM_FIELDS
from .openai_api import _validate as validate  # the one place pydantic's errors become a 400

#: the Ollama API release whose shapes this module follows (clients check it for features)
OLLAMA_VERSION = "0.9.0"
#: Ollama gives models loaded for good (``keep_alive: -1``) an expiry this far away; every
#: swarm model stays loaded on its nodes, so ``/api/ps`` says the same
FOREVER = "2318-01-01T00:00:00Z"

#: capabilities as ``/api/show`` names them
_CAPABILITIES = {model_names.CHAT: "completion", "embed": "embedding", "tools": "tools"}


def error_body(exc: ApiError) -> dict[str, Any]:
    """Ollama's error shape: one message (its clients raise ``ResponseError`` with it)."""
    return {"error": exc.message}


def not_found(name: str, detail: str = "") -> ApiError:
    # Ollama's own words, which some clients look for before offering a pull
    return ApiError(404, f"model {name!r} not found{detail}", code="model_not_found", param="model")


# ---------------------------------------------------------------- models


def _split(name: str) -> tuple[str, str | None]:
    """``name:tag`` as (name, tag); a namespace (``library/x``) stays in the name."""
    base, sep, tag = name.rpartition(":")
    if not sep or "/" in tag or not base:
        return name, None
    return base, tag


def resolve_model(requested: Any, served: set[str] | None, names: ModelNames | None = None) -> str | None:
    """The swarm's model for an Ollama model name; 404 when it has none by that name.

    In order: the name as the swarm's own resolution takes it (case, aliases: ``model_names``),
    without falling back; the name without its ``:latest`` tag (``/api/tags`` lists every model
    with it, as Ollama does); the one model whose id starts with the name and contains the tag
    (``smollm2:135m`` is ``SmolLM2-135M-Instruct.Q4_1``); and last the swarm's fallback to its
    lone model (``model_names.resolve``), when the owner has left it on."""
    if requested is None:
        return None
    if not isinstance(requested, str):
        raise bad_request("'model' must be a string", param="model")
    names = names or ModelNames()
    strict = ModelNames(aliases=names.aliases, fallback=False)
    base, tag = _split(requested.strip())
    latest = tag is not None and tag.casefold() == "latest"
    if served is None:
        # the node table not seen yet: the hub judges the name, which never carries Ollama's default tag
        return model_names.resolve(base if latest else requested, served, names)
    candidates = [requested, base] if latest else [requested]
    for candidate in candidates:
        try:
            return model_names.resolve(candidate, served, strict)
        except RequestFailed:
            continue
    if served:
        family = [m for m in served if _family_match(m, base, tag)]
        if len(family) == 1:
            return family[0]
    try:
        return model_names.resolve(requested, served, names)
    except RequestFailed as exc:
        raise not_found(requested, f": {exc.message}") from exc


def _family_match(model: str, base: str, tag: str | None) -> bool:
    folded, base = model.casefold(), base.casefold()
    if not folded.startswith(base) or folded == base or folded[len(base)] not in "-_.:":
        return False
    return tag is None or tag.casefold() == "latest" or tag.casefold() in folded[len(base) :]


def listed_name(model: str) -> str:
    """A swarm model as Ollama names it: with a tag, ``:latest`` unless its id has one."""
    return model if _split(model)[1] is not None else f"{model}:latest"


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama's ``created_at`` and ``modified_at``."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _details(entry: ModelEntry) -> dict[str, Any]:
    # The swarm knows a model by its id and its nodes' announces; what Ollama reads from the
    # GGUF (family, parameter size) it does not know, and says so with empty values.
    quant = entry.name.rpartition(".")[2] if "." in entry.name else ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": quant if quant.upper().startswith(("Q", "F", "IQ", "BF")) else "",
    }


def _card(entry: ModelEntry, modified_at: str) -> dict[str, Any]:
    name = listed_name(entry.name)
    # size and digest are the GGUF's, which the node table does not carry: 0 and "" say unknown
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at,
        "size": 0,
        "digest": "",
        "details": _details(entry),
    }


def tags(fleet: NodeTable | None, *, started: float, max_tokens_limit: int | None = None) -> dict[str, Any]:
    """``/api/tags``: the models served by nodes online or paused."""
    entries = model_names.catalogue(fleet, max_tokens_limit=max_tokens_limit)
    return {"models": [_card(entry, timestamp(started)) for entry in entries]}


def running(fleet: NodeTable | None, *, max_tokens_limit: int | None = None) -> dict[str, Any]:
    """``/api/ps``: the models some node has in memory now (a node that serves several loads
    them as requests need them; a one-model node keeps its model loaded)."""
    out = []
    for entry in model_names.catalogue(fleet, max_tokens_limit=max_tokens_limit):
        if not entry.loaded_on:
            continue
        card = _card(entry, "")
        del card["modified_at"]
        out.append({**card, "expires_at": FOREVER, "size_vram": 0, "context_length": entry.ctx})
    return {"models": out}


def _find(fleet: NodeTable | None, name: str, names: ModelNames | None, limit: int | None) -> ModelEntry:
    strict = ModelNames(aliases=names.aliases, fallback=False) if names else ModelNames(fallback=False)
    wanted = resolve_model(name, model_names.served_models(fleet), strict)
    for entry in model_names.catalogue(fleet, max_tokens_limit=limit):
        if entry.name == wanted:
            return entry
    raise not_found(name, ": no node online serves it")


def show(
    body: Any, fleet: NodeTable | None, *, started: float, names: ModelNames | None = None, limit: int | None = None
) -> dict[str, Any]:
    """``/api/show``: one model, found as requests find it but never by the fallback (asking
    about a model is asking whether it exists). Its context length is under
    ``<architecture>.context_length`` in ``model_info``, where Ollama's clients look for it."""
    body = _object(body)
    name = body.get("model", body.get("name"))
    if not isinstance(name, str) or not name.strip():
        raise bad_request("'model' must name a model", param="model")
    entry = _find(fleet, name, names, limit)
    info: dict[str, Any] = {"general.architecture": "swarm", "general.basename": entry.name}
    if entry.ctx is not None:
        info["swarm.context_length"] = entry.ctx
    parameters = f"num_predict {entry.max_tokens}" if entry.max_tokens is not None else ""
    return {
        "modelfile": f"# served by nova-swarm ({entry.nodes} node(s))\nFROM {entry.name}\n",
        "parameters": parameters,
        "template": "",
        "details": _details(entry),
        "model_info": info,
        "capabilities": [_CAPABILITIES[c] for c in entry.capabilities if c in _CAPABILITIES],
        "modified_at": timestamp(started),
    }


def version() -> dict[str, Any]:
    return {"version": OLLAMA_VERSION, "nova_swarm": __version__}


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class OllamaCall:
    #: None: nothing to ask the swarm (Ollama's "load the model" request: no prompt, no messages)
    request: PromptRequest | None
    #: the name the client used, echoed in ``model`` until an answer says which model it was
    model: str
    stream: bool
    #: fields accepted that changed nothing (``leniency.ignored_header``)
    ignored: tuple[str, ...] = ()


#: accepted and ignored wherever they appear: Ollama's model residency, and the swarm keeps
#: every model loaded; ``truncate``: inputs longer than the context are cut by the node anyway
_NO_OPS = frozenset({"keep_alive", "truncate"})
#: fields that would change an answer in a way this swarm cannot: refused when set
_UNSUPPORTED_GENERATE = ("suffix", "template", "context", "images")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)  # Ollama streams unless told not to
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    return stream


def _fields(body: dict[str, Any], known: frozenset[str]) -> list[str]:
    """The top-level fields that change nothing: Ollama itself ignores unknown fields, and its
    clients send some of their own, so they are accepted, and named in the response header."""
    return [name for name in body if name in _NO_OPS or (name not in known and name not in SWARM_FIELDS)]


def _options(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    options = body.get("options")
    if options is not None and not isinstance(options, Mapping):
        raise bad_request("'options' must be an object", param="options")
    try:
        parsed = ollama_options(options)
    except OptionError as exc:
        raise bad_request(str(exc), param=f"options.{exc.option}") from exc
    return parsed.params, list(parsed.ignored)


def _format(value: Any) -> dict[str, Any] | None:
    """Ollama's ``format``: ``"json"`` (any JSON) or a JSON schema, as a ``response_format``."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}
    raise bad_request("'format' must be \"json\" or a JSON schema (an object)", param="format")


def _think(body: dict[str, Any]) -> None:
    if body.get("think") not in (None, False):
        raise bad_request("this swarm's models do not think aloud: 'think' must be false or absent", param="think")


def _common(
    body: dict[str, Any], params: dict[str, Any], served: set[str] | None, names: ModelNames | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": resolve_model(body.get("model"), served, names), "params": params}
    response_format = _format(body.get("format"))
    if response_format is not None:
        fields["response_format"] = response_format
    fields.update({name: body[name] for name in SWARM_FIELDS if body.get(name) is not None})
    return fields


def _name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' must name a model (GET /api/tags lists them)", param="model")
    return model


_CHAT = frozenset({"model", "messages", "tools", "format", "options", "stream", "think"})
_GENERATE = frozenset(
    {"model", "prompt", "system", "format", "options", "stream", "think", "raw", *_UNSUPPORTED_GENERATE}
)
_EMBED = frozenset({"model", "input", "options", "dimensions"})
_EMBEDDINGS = frozenset({"model", "prompt", "options"})


def chat_request(body: Any, *, served: set[str] | None = None, names: ModelNames | None = None) -> OllamaCall:
    """``/api/chat`` as a PromptRequest (without id: the gateway sets it)."""
    body = _object(body)
    model = _name(body)
    _think(body)
    params, ignored_options = _options(body)
    ignored = _fields(body, _CHAT) + ignored_options
    raw = body.get("messages")
    if raw is None or raw == []:
        # Ollama loads the model and answers at once; here every model is loaded already
        resolve_model(model, served, names)
        return OllamaCall(None, model=model, stream=_stream(body), ignored=tuple(ignored))
    if not isinstance(raw, list):
        raise bad_request("'messages' must be a list of messages", param="messages")
    fields = _common(body, params, served, names)
    fields["messages"] = _messages(raw)
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise bad_request("'tools' must be a list of tools", param="tools")
        fields["tools"] = tools
    stream = _stream(body)
    fields["stream"] = stream
    return OllamaCall(validate(fields), model=model, stream=stream, ignored=tuple(ignored))


def generate_request(body: Any, *, served: set[str] | None = None, names: ModelNames | None = None) -> OllamaCall:
    """``/api/generate``: the prompt (and ``system``) through the model's chat template, or with
    ``raw: true`` the prompt as it is, continued by the model (``kind: "complete"``; Ollama then
    applies no template and no ``system``, which is therefore named as ignored)."""
    body = _object(body)
    model = _name(body)
    _think(body)
    for name in _UNSUPPORTED_GENERATE:
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this swarm", param=name)
    raw = body.get("raw")
    if raw not in (None, True, False):
        raise bad_request("'raw' must be true or false", param="raw")
    params, ignored_options = _options(body)
    ignored = _fields(body, _GENERATE) + ignored_options
    if raw and body.get("system"):
        ignored.append("system")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string", param="prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise bad_request("'system' must be a string", param="system")
    if not prompt:
        resolve_model(model, served, names)
        return OllamaCall(None, model=model, stream=_stream(body), ignored=tuple(ignored))
    fields = _common(body, params, served, names)
    if raw:
        fields.update(kind="complete", prompt=prompt)
    else:
        messages = [{"role": "system", "content": system}] if system else []
        fields["messages"] = [*messages, {"role": "user", "content": prompt}]
    stream = _stream(body)
    fields["stream"] = stream
    return OllamaCall(validate(fields), model=model, stream=stream, ignored=tuple(ignored))


def embed_request(
    body: Any, *, served: set[str] | None = None, names: ModelNames | None = None, legacy: bool = False
) -> OllamaCall:
    """``/api/embed`` (``input``: a text or a list of them) or, ``legacy``, ``/api/embeddings``
    (``prompt``: one text)."""
    body = _object(body)
    model = _name(body)
    if legacy:
        ignored = _fields(body, _EMBEDDINGS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_request("'prompt' must be a non-empty string", param="prompt")
        texts = [prompt]
    else:
        ignored = _fields(body, _EMBED)
        if body.get("dimensions") is not None:
            raise bad_request("'dimensions' is not supported: vectors have the model's own size", param="dimensions")
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad_request("'input' must be a string or a non-empty list of strings", param="input")
    # sampling options mean nothing to an embedding: checked, and listed as ignored
    _options(body)  # checked like any other request's
    ignored += [f"options.{name}" for name in body.get("options") or {}]
    fields = {
        "kind": "embed",
        "input": texts,
        "model": resolve_model(model, served, names),
        **{k: body[k] for k in ("tags", "timeout_s", "private") if body.get(k) is not None},
    }
    return OllamaCall(validate(fields), model=model, stream=False, ignored=tuple(ignored))


def _messages(raw: list[Any]) -> list[dict[str, Any]]:
    """Ollama's messages as the swarm's (OpenAI's shape). Ollama's tool calls have no ids and
    its tool results name the tool (``tool_name``) rather than the call: ids are made up here
    for the calls of each assistant turn, and each result takes the id of the first call still
    unanswered to a tool of its name (or the first still unanswered, if it names none)."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (call id, tool name) not answered yet
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"{where}.role must be system, user, assistant or tool", param=f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string", param=f"{where}.content")
        if message.get("images"):
            raise bad_request(f"{where} has images; this swarm's models read text only", param=f"{where}.images")
        turn: dict[str, Any] = {"role": role, "content": content or ""}
        calls = message.get("tool_calls")
        if calls and role == "assistant":
            if not isinstance(calls, list):
                raise bad_request(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            turn["tool_calls"] = [_tool_call(f"{where}.tool_calls[{i}]", index, i, c) for i, c in enumerate(calls)]
            pending = [(c["id"], c["function"]["name"]) for c in turn["tool_calls"]]
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            match = next((p for p in pending if p[1] == name), pending[0] if pending else None)
            if match is not None:
                pending.remove(match)
            turn["tool_call_id"] = match[0] if match else f"call_{index}"
            if isinstance(name, str) and name:
                turn["name"] = name
        out.append(turn)
    return out


def _tool_call(where: str, turn: int, index: int, raw: Any) -> dict[str, Any]:
    function = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"{where} must be {{'function': {{'name', 'arguments'}}}}", param=where)
    arguments = function.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    call_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else f"call_{turn}_{index}"
    return {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": text}}


# ---------------------------------------------------------------- responses


def done_reason(answer: Answer) -> str:
    """Ollama's reasons: ``stop`` (the model ended, or a stop sequence), ``length``."""
    return "length" if answer.finish_reason == "length" else "stop"


def _ns(ms: float | None) -> int:
    return max(0, round((ms or 0.0) * 1_000_000))


def stats(answer: Answer) -> dict[str, Any]:
    """Ollama's closing counts and durations (nanoseconds), from the node's usage and timings:
    the prompt's evaluation lasts until the first token; generating the rest is the eval."""
    timings = answer.timings
    prompt_ms = timings.ttft_ms if timings and timings.ttft_ms is not None else 0.0
    eval_ms = max(0.0, timings.generate_ms - prompt_ms) if timings else 0.0
    return {
        "total_duration": _ns(answer.latency_ms),
        "load_duration": 0,  # a node keeps its model loaded
        "prompt_eval_count": answer.usage.prompt_tokens if answer.usage else 0,
        "prompt_eval_duration": _ns(prompt_ms),
        "eval_count": answer.usage.completion_tokens if answer.usage else 0,
        "eval_duration": _ns(eval_ms),
    }


def swarm_info(answer: Answer) -> dict[str, Any]:
    """Who answered, and how (as the OpenAI responses' ``swarm``)."""
    return {"node_id": answer.node_id, "strategy": answer.strategy, "attempts": answer.attempts}


def _ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments  # what the model wrote, for the client to judge
        out.append({"id": call.id, "function": {"name": call.function.name, "arguments": arguments}})
    return out


Kind = Literal["chat", "generate"]


def _message(text: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = _ollama_tool_calls(calls)
    return message


def _line(kind: Kind, model: str, created_at: str, text: str, *, done: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "created_at": created_at}
    if kind == "chat":
        body["message"] = _message(text)
    else:
        body["response"] = text
    body["done"] = done
    return body


def loaded(kind: Kind, model: str, *, created_at: str) -> dict[str, Any]:
    """The answer to a request with nothing to say (Ollama's way to load a model)."""
    return {**_line(kind, model, created_at, "", done=True), "done_reason": "load"}


def response(kind: Kind, answer: Answer, *, created_at: str) -> dict[str, Any]:
    """The whole answer, for a request with ``"stream": false``."""
    body = _line(kind, answer.model, created_at, answer.text, done=True)
    if kind == "chat" and answer.tool_calls:
        body["message"] = _message("", answer.tool_calls)
    return {**body, "done_reason": done_reason(answer), **stats(answer), "swarm": swarm_info(answer)}


class Lines:
    """The NDJSON lines of one streamed answer: one per piece of text, then what the stream
    missed and the tool calls (Ollama sends whole calls, not pieces), then ``done: true`` with
    the counts. ``relay.py`` frames each with :func:`ndjson`."""

    def __init__(self, kind: Kind, *, model: str, created_at: str) -> None:
        self.kind = kind
        self.model = model
        self.created_at = created_at
        self.text = ""

    def piece(self, chunk: StreamChunk) -> list[dict[str, Any]]:
        """The line for one StreamChunk; ApiError for a restart NDJSON cannot take back."""
        if chunk.restart and self.text:
            raise ApiError(
                502,
                "the node streaming this answer was lost after part of it was sent, and another node started over:"
                ' ask again, or with "stream": false',
                code="node_lost",
            )
        if not chunk.text:
            return []  # tool call pieces: the whole calls come with the answer
        self.text += chunk.text
        return [_line(self.kind, self.model, self.created_at, chunk.text, done=False)]

    def closing(self, answer: Answer) -> list[dict[str, Any]]:
        """The rest, from the full answer (the reply topic has all of it even if stream
        messages were lost), and the last line."""
        self.model = answer.model
        out = []
        if self.kind == "chat" and answer.tool_calls:
            line = _line(self.kind, self.model, self.created_at, "", done=False)
            line["message"] = _message("", answer.tool_calls)
            out.append(line)
        elif answer.text.startswith(self.text) and len(answer.text) > len(self.text):
            out.append(_line(self.kind, self.model, self.created_at, answer.text[len(self.text) :], done=False))
            self.text = answer.text
        last = _line(self.kind, self.model, self.created_at, "", done=True)
        out.append({**last, "done_reason": done_reason(answer), **stats(answer), "swarm": swarm_info(answer)})
        return out


def ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def embed_response(answer: Answer, *, model: str) -> dict[str, Any]:
    """``/api/embed``: one vector per input, with Ollama's counts."""
    timings = answer.timings
    return {
        "model": answer.model or model,
        "embeddings": answer.embeddings or [],
        "total_duration": _ns(answer.latency_ms),
        "load_duration": 0,
        "prompt_eval_count": answer.usage.prompt_tokens if answer.usage else 0,
        **({"prompt_eval_duration": _ns(timings.generate_ms)} if timings else {}),
    }


def embeddings_response(answer: Answer) -> dict[str, Any]:
    """``/api/embeddings`` (the older route): the one vector."""
    return {"embedding": (answer.embeddings or [[]])[0]}
