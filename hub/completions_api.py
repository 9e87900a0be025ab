"""OpenAI's legacy text completions (``/v1/completions``), translated to the swarm's wire
messages and back. No I/O.

    body (dict) --completion_request--> CompletionCall(PromptRequest) --SwarmClient--> Answer
    Answer --completion--> a ``text_completion`` object (dict)
    StreamChunk... + Answer --CompletionChunks--> ``text_completion`` chunks (SSE, then DONE)

The prompt travels as a ``kind: "complete"`` request: a node runs its model on the text as it
is, with no chat template, and the answer is what the model writes next, as llama-server and
OpenAI's legacy API give it, so autocompletion plugins that send a code prefix get its
continuation. Only nodes that announce the ``complete`` capability get such requests; with none
online the request fails with ``unsupported`` (503), as embeddings do. ``echo: true`` puts the
prompt in front of the continuation (in a stream, as the first chunk). What the legacy API asks
for and this cannot give is refused clearly rather than faked: ``suffix`` (fill-in-the-middle),
``n``/``best_of`` above 1, ``logprobs``, and prompts given as token arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import Answer, PromptRequest, StreamChunk

from .api_errors import ApiError, bad_request
from .leniency import LLAMA_SAMPLING
from .model_names import ModelNames
from .openai_api import SWARM_FIELDS, finish_reason, requested_model, swarm_info, usage
from .openai_api import _check_fields as check_fields  # OpenAI's accepted-and-ignored and harmless fields
from .openai_api import _validate as validate  # the one place pydantic's errors become a 400


@dataclass(frozen=True, slots=True)
class CompletionCall:
    request: PromptRequest
    include_usage: bool = False
    ignored: tuple[str, ...] = ()
    #: ``echo: true``: the prompt, which goes in front of the answer's text ("" without echo)
    echo: str = ""


_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "echo",
        "suffix",
        "best_of",
        *LLAMA_SAMPLING,
        *SWARM_FIELDS,
    }
)


def completion_request(
    body: Any, *, known_models: set[str] | None = None, names: ModelNames | None = None
) -> CompletionCall:
    """A legacy completion request as a PromptRequest (without id: the gateway sets it)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    ignored = check_fields(body, _FIELDS)
    prompt = _prompt(body.get("prompt"))
    if body.get("suffix"):
        raise bad_request(
            "'suffix' (fill-in-the-middle) is not supported: the swarm's nodes continue a text, they do not fill a gap",
            param="suffix",
        )
    echo = body.get("echo")
    if echo not in (None, True, False):
        raise bad_request("'echo' must be true or false", param="echo")
    if body.get("best_of") not in (None, 1):
        raise bad_request("'best_of' above 1 is not supported (one answer per request)", param="best_of")
    params: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "seed", *LLAMA_SAMPLING):
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
        "kind": "complete",
        "prompt": prompt,
        "params": params,
        "model": requested_model(body, known_models, names),
        "stream": body.get("stream") or False,
        **{name: body[name] for name in SWARM_FIELDS if body.get(name) is not None},
    }
    return CompletionCall(validate(fields), include_usage=include_usage, ignored=ignored, echo=prompt if echo else "")


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if isinstance(raw, str):
        if not raw.strip():
            raise bad_request("'prompt' is empty", param="prompt", code=ErrorCode.EMPTY_PROMPT)
        return raw
    if isinstance(raw, list) and raw and all(isinstance(t, int) or isinstance(t, list) for t in raw):
        raise bad_request(
            "'prompt' as token ids is not supported: send the text (token ids are the model's, unknown here)",
            param="prompt",
        )
    if isinstance(raw, list) and len(raw) > 1:
        raise bad_request("'prompt' must be one text: a batch of prompts is one request each here", param="prompt")
    raise bad_request("'prompt' must be a string (or a list of one string)", param="prompt")


def completion(answer: Answer, *, created: int, echo: str = "") -> dict[str, Any]:
    """The whole ``text_completion``; ``echo`` (the prompt, when asked for) goes before the text."""
    return {
        "id": f"cmpl-{answer.id}",
        "object": "text_completion",
        "created": created,
        "model": answer.model,
        "choices": [{"index": 0, "text": echo + answer.text, "finish_reason": _finish(answer), "logprobs": None}],
        "usage": usage(answer.usage),
        "system_fingerprint": None,
        "swarm": swarm_info(answer),
    }


def _finish(answer: Answer) -> str:
    reason = finish_reason(answer)
    return "stop" if reason == "tool_calls" else reason  # no tools here; never "tool_calls"


class CompletionChunks:
    """The chunks of one streamed completion: ``text_completion`` objects with the next text,
    the last with ``finish_reason``, then a usage chunk when asked for. With ``echo`` (the
    prompt), the first chunk is the prompt. ``relay.py`` frames each with ``openai_api.sse``
    and ends with DONE."""

    def __init__(
        self, request_id: str, *, model: str, created: int, include_usage: bool = False, echo: str = ""
    ) -> None:
        self.id = f"cmpl-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.echo = echo
        #: what the node has streamed so far (the echoed prompt is not part of it)
        self.text = ""

    def _chunk(self, text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "system_fingerprint": None,
        }

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk(self.echo)] if self.echo else []

    def piece(self, chunk: StreamChunk) -> list[dict[str, Any]]:
        if chunk.restart and self.text:
            raise ApiError(
                502,
                "the node streaming this answer was lost after part of it was sent, and another node "
                "started over, which a stream cannot take back: ask again, or without stream",
                code=ErrorCode.NODE_LOST.value,
            )
        if not chunk.text:
            return []
        self.text += chunk.text
        return [self._chunk(chunk.text)]

    def closing(self, answer: Answer) -> list[dict[str, Any]]:
        self.model = answer.model
        rest = answer.text[len(self.text) :] if answer.text.startswith(self.text) else ""
        last = self._chunk(rest, _finish(answer))
        last["swarm"] = swarm_info(answer)
        out = [last]
        if self.include_usage:
            tail = self._chunk("")
            tail["choices"] = []
            tail["usage"] = usage(answer.usage)
            out.append(tail)
        return out
