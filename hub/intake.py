"""Turning a message on the prompt topic into a request, or into a clear refusal.

Accepted payloads: plain UTF-8 text (the whole payload is the prompt), or a JSON object with
``id``, ``prompt`` or ``messages``, ``params``, ``strategy``, ``fanout``, ``tags``, ``reply_to``,
``model`` and ``timeout_s``. Every refusal carries a stable ``ErrorCode`` and goes to a reply
topic: the request's own if we could read it, else its sender's default one.

Every request belongs to a **scope**: the login that sent it, known from the topic it came on
(``prompt/{login}``, which only that login may write), or the shared scope for the bare
``prompt`` topic. Its reply may only go to the scope's own reply topics, and its id is keyed
within the scope, so one login can neither read, redirect nor squat on another's requests.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode
from nova_swarm.broker.contract.messages import MAX_FANOUT, ErrorInfo, PromptRequest, describe
from nova_swarm.broker.contract.topics import SHARED_SCOPE, Topics
from nova_swarm.broker.link.base import Message

from .nesting import loads_top_level
from .schemas import MAX_SCHEMA_DEPTH, request_problem

log = structlog.get_logger("nova_swarm.hub")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one prompt may ask for, and how much the hub takes on. Each cap has its own error code."""

    max_payload_bytes: int = 256 * 1024
    max_prompt_chars: int = 32_000
    #: a request asking for more tokens is refused (nodes clamp further to what they can do)
    max_tokens: int = 4096
    max_fanout: int = MAX_FANOUT
    #: per scope (the login that sent the prompt); a login may burst this many at once
    requests_per_minute: int = 600
    #: requests the hub works on at once; past it, new prompts get ``hub_busy``
    max_inflight: int = 1024
    #: of those, how many may wait for a free node; past it, new prompts get ``hub_busy``
    max_queued: int = 256

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ConfigError(f"limit {name} must be at least 1")


#: of the time left before a request's deadline, the share a default-length answer may fill;
#: the rest is for reading the prompt and the trip back
_GENERATING_SHARE = 0.8


def default_max_tokens(cap: int, tokens_per_s: float | None, remaining_s: float) -> int:
    """``max_tokens`` for a chat request that gives none: the hub's ``cap``, or fewer when a
    node's measured speed says it could not write that many before the deadline. A node that
    runs past its deadline sends nothing back, so an answer cut to fit (``finish_reason:
    length``) beats a long one lost. A node of unknown speed gets the cap."""
    if not tokens_per_s or tokens_per_s <= 0:
        return cap
    return max(1, min(cap, int(tokens_per_s * max(remaining_s, 0.0) * _GENERATING_SHARE)))


@dataclass(frozen=True, slots=True)
class Accepted:
    request: PromptRequest
    request_id: str
    reply_topic: str
    correlation: bytes | None
    #: the login that sent it (``SHARED_SCOPE`` for the bare prompt topic)
    scope: str = SHARED_SCOPE

    @property
    def key(self) -> str:
        """What the hub and its journal know this request by: its id within its scope."""
        return scoped_key(self.scope, self.request_id)


@dataclass(frozen=True, slots=True)
class Rejected:
    request_id: str | None
    reply_topic: str
    correlation: bytes | None
    error: ErrorInfo


def scoped_key(scope: str, request_id: str) -> str:
    """``alice/req-42``; a request of the shared scope is keyed by its bare id, as every request
    was before scopes existed, so a journal written then reads as the shared scope's.

    Unambiguous: neither a scope (a login name) nor a request id can hold a ``/``."""
    return request_id if scope == SHARED_SCOPE else f"{scope}/{request_id}"


def split_key(key: str) -> tuple[str, str]:
    """``scoped_key`` undone: (scope, request id)."""
    scope, sep, request_id = key.partition("/")
    return (scope, request_id) if sep else (SHARED_SCOPE, key)


def new_request_id() -> str:
    return uuid.uuid4().hex


def parse_prompt(message: Message, topics: Topics, limits: Limits) -> Accepted | Rejected:
    """Read a prompt that came on ``message.topic``: ``prompt/{login}`` (that login's scope) or
    the bare ``prompt`` (the shared scope)."""
    scope = topics.prompt_scope(message.topic) or SHARED_SCOPE
    default_reply = topics.reply(scope)
    correlation = message.correlation_data

    def reject(code: ErrorCode, text: str, *, request_id: str | None = None, reply: str = default_reply) -> Rejected:
        return Rejected(request_id, reply, correlation, ErrorInfo(code=code, message=text))

    reply_topic = default_reply
    if message.response_topic is not None:
        if not topics.in_scope(message.response_topic, scope):
            return reject(ErrorCode.BAD_REPLY_TO, f"response topic must be under {default_reply} (this sender's own)")
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
        too_deep: int | None = None
        try:
            try:
                raw = json.loads(text)
            except RecursionError:
                # Too deep for Python's parser: read its top level only, to refuse it where it belongs.
                raw, too_deep = loads_top_level(text)
        except ValueError as exc:
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
            if not topics.in_scope(raw_reply, scope):
                return reject(
                    ErrorCode.BAD_REPLY_TO,
                    f"reply_to {raw_reply[:80]!r} must be {default_reply} or a topic under it"
                    f" (this sender's own: send on {topics.prompt()}/LOGIN to use your login's)",
                    request_id=raw_id,
                    reply=reply_topic,
                )
            reply_topic = raw_reply
        if too_deep is not None:
            return reject(
                ErrorCode.INVALID_REQUEST,
                f"the payload nests {too_deep} levels deep, more than the hub reads;"
                f" a request's schemas may nest {MAX_SCHEMA_DEPTH} levels at most",
                request_id=raw_id,
                reply=reply_topic,
            )
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

    # A refusal carries the id the client sent (None when it sent none): one made up here would
    # name nothing the client knows. An accepted request without one gets a fresh id.
    given = request.id
    chars = request.prompt_chars()
    if chars > limits.max_prompt_chars:
        return reject(
            ErrorCode.PROMPT_TOO_LARGE,
            f"prompt is {chars} characters; the limit is {limits.max_prompt_chars}",
            request_id=given,
            reply=reply_topic,
        )
    if request.params.max_tokens is not None and request.params.max_tokens > limits.max_tokens:
        return reject(
            ErrorCode.MAX_TOKENS_TOO_LARGE,
            f"max_tokens is {request.params.max_tokens}; the limit is {limits.max_tokens}",
            request_id=given,
            reply=reply_topic,
        )
    if request.fanout > limits.max_fanout:
        return reject(
            ErrorCode.FANOUT_TOO_LARGE,
            f"fanout is {request.fanout}; the limit is {limits.max_fanout}",
            request_id=given,
            reply=reply_topic,
        )
    try:
        schema_problem = request_problem(request)
    except Exception:  # jsonschema meeting a schema nobody foresaw: refuse it, to its sender, once
        log.exception("checking a request's schemas failed", request_id=given)
        problem = "the hub could not check this request's schemas"
        return reject(ErrorCode.INTERNAL_ERROR, problem, request_id=given, reply=reply_topic)
    if schema_problem is not None:
        return reject(ErrorCode.INVALID_REQUEST, schema_problem, request_id=given, reply=reply_topic)
    return Accepted(request, given or new_request_id(), reply_topic, correlation, scope)


#: Only a \uD800-\uDFFF escape can smuggle an unpaired surrogate into parsed JSON: the full
#: check (re-encoding everything) runs only for payloads that have one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError, ValueError):
        return False
    return True
