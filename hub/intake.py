"""Turning a message on the prompt topic into a request, or into a clear refusal.

Accepted payloads: plain UTF-8 text (the whole payload is the prompt), or a JSON object with
``id``, ``prompt`` or ``messages``, ``params``, ``strategy``, ``fanout``, ``tags``, ``reply_to``,
``model`` and ``timeout_s``. Every refusal carries a stable ``ErrorCode`` and goes to a reply
topic: the request's own if we could read it, else the default one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pydantic import ValidationError

from nova_swarm.broker.connection import Message
from nova_swarm.broker.errors import ConfigError, ErrorCode
from nova_swarm.broker.messages import MAX_FANOUT, ErrorInfo, PromptRequest, describe
from nova_swarm.broker.topics import Topics

from .schemas import request_problem


@dataclass(frozen=True, slots=True)
class Limits:
    """What one prompt may ask for, and how much the hub takes on. Each cap has its own error code."""

    max_payload_bytes: int = 256 * 1024
    max_prompt_chars: int = 32_000
    #: a request asking for more tokens is refused (nodes clamp further to what they can do)
    max_tokens: int = 4096
    max_fanout: int = MAX_FANOUT
    #: per client (the first level under ``reply/``); a client may burst this many at once
    requests_per_minute: int = 600
    #: requests the hub works on at once; past it, new prompts get ``hub_busy``
    max_inflight: int = 1024
    #: of those, how many may wait for a free node; past it, new prompts get ``hub_busy``
    max_queued: int = 256

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ConfigError(f"limit {name} must be at least 1")


@dataclass(frozen=True, slots=True)
class Accepted:
    request: PromptRequest
    request_id: str
    reply_topic: str
    correlation: bytes | None


@dataclass(frozen=True, slots=True)
class Rejected:
    request_id: str | None
    reply_topic: str
    correlation: bytes | None
    error: ErrorInfo


def new_request_id() -> str:
    return uuid.uuid4().hex


def parse_prompt(message: Message, topics: Topics, limits: Limits) -> Accepted | Rejected:
    default_reply = topics.reply()
    correlation = message.correlation_data

    def reject(code: ErrorCode, text: str, *, request_id: str | None = None, reply: str = default_reply) -> Rejected:
        return Rejected(request_id, reply, correlation, ErrorInfo(code=code, message=text))

    reply_topic = default_reply
    if message.response_topic is not None:
        if not topics.is_reply_topic(message.response_topic):
            return reject(ErrorCode.BAD_REPLY_TO, f"response topic must be under {topics.reply_filter()[:-2]}/")
        reply_topic = message.response_topic

    if len(message.payload) > limits.max_payload_bytes:
        return reject(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"payload is {len(message.payload)} bytes; the limit is {limits.max_payload_bytes}",
            reply=reply_topic,
        )
    try:
        text = message.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject(
            ErrorCode.BAD_ENCODING, f"payload is not UTF-8 ({exc.reason} at byte {exc.start})", reply=reply_topic
        )
    if not text.strip():
        return reject(ErrorCode.EMPTY_PROMPT, "the prompt is empty", reply=reply_topic)

    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return reject(
                ErrorCode.BAD_JSON, f"payload starts with '{{' but is not valid JSON: {exc}", reply=reply_topic
            )
        if _SURROGATE_ESCAPE.search(text) and not _encodable(raw):
            # JSON may escape half of a surrogate pair ("\ud800"): valid JSON, but no text we
            # could ever send on, log or store.
            return reject(ErrorCode.BAD_ENCODING, "payload escapes an unpaired UTF-16 surrogate", reply=reply_topic)
        if not isinstance(raw, dict):
            return reject(ErrorCode.INVALID_REQUEST, "a JSON prompt must be an object", reply=reply_topic)
        # Route even a refusal to the sender's own reply topic when we can read one.
        raw_id = raw.get("id") if isinstance(raw.get("id"), str) and len(raw["id"]) <= 128 else None
        raw_reply = raw.get("reply_to")
        if isinstance(raw_reply, str):
            if not topics.is_reply_topic(raw_reply):
                return reject(
                    ErrorCode.BAD_REPLY_TO,
                    f"reply_to {raw_reply[:80]!r} must be a topic under {topics.reply_filter()[:-2]}/",
                    request_id=raw_id,
                    reply=reply_topic,
                )
            reply_topic = raw_reply
        try:
            request = PromptRequest.model_validate(raw)
        except ValidationError as exc:
            unknown = [".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
            if unknown:
                return reject(
                    ErrorCode.UNKNOWN_FIELD,
                    f"unknown field(s): {', '.join(unknown)}",
                    request_id=raw_id,
                    reply=reply_topic,
                )
            return reject(ErrorCode.INVALID_REQUEST, describe(exc), request_id=raw_id, reply=reply_topic)
    else:
        request = PromptRequest(prompt=text)

    request_id = request.id or new_request_id()
    chars = request.prompt_chars()
    if chars > limits.max_prompt_chars:
        return reject(
            ErrorCode.PROMPT_TOO_LARGE,
            f"prompt is {chars} characters; the limit is {limits.max_prompt_chars}",
            request_id=request_id,
            reply=reply_topic,
        )
    if request.params.max_tokens is not None and request.params.max_tokens > limits.max_tokens:
        return reject(
            ErrorCode.MAX_TOKENS_TOO_LARGE,
            f"max_tokens is {request.params.max_tokens}; the limit is {limits.max_tokens}",
            request_id=request_id,
            reply=reply_topic,
        )
    if request.fanout > limits.max_fanout:
        return reject(
            ErrorCode.FANOUT_TOO_LARGE,
            f"fanout is {request.fanout}; the limit is {limits.max_fanout}",
            request_id=request_id,
            reply=reply_topic,
        )
    schema_problem = request_problem(request)
    if schema_problem is not None:
        return reject(ErrorCode.INVALID_REQUEST, schema_problem, request_id=request_id, reply=reply_topic)
    return Accepted(request, request_id, reply_topic, correlation)


#: Only a \uD800-\uDFFF escape can smuggle an unpaired surrogate into parsed JSON: the full
#: check (re-encoding everything) runs only for payloads that have one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError, ValueError):
        return False
    return True


def client_key(reply_topic: str, topics: Topics) -> str:
    """Who a request counts against for rate limits: the first level under ``reply/``.

    MQTT 3.1.1 does not tell a subscriber who published, so the reply topic stands in for the
    sender. A client that lies about it only sends its answers to someone else.
    """
    rest = reply_topic.removeprefix(topics.reply_filter()[:-1])
    return rest.split("/", 1)[0]
