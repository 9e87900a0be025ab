"""Property-based fuzzing of everything that reads bytes off the wire.

Two layers:

- pure parsers, no I/O: ``hub.intake.parse_prompt``, and ``decode`` for every wire model in
  ``broker/contract/messages.py`` plus ``decode_reply``, fed random bytes, invalid UTF-8, payloads past the
  limits, deeply nested JSON, random JSON and valid messages with one field broken;
- the live swarm: garbage on the prompt topic must get exactly one error reply each and leave
  the hub serving; garbage on a node's task and cancel topics must leave the node answering.
  These run on Mosquitto: amqtt 0.12.1 drops a message now and then when a subscription comes or
  goes while it fans one out (``Broker._run_broadcast`` iterates a dict it awaits inside), and
  every example here starts and stops a hub, a node and clients.

Profiles: ``ci`` (the default) keeps the whole file under a minute; ``NOVA_SWARM_FUZZ=long``
selects ``fuzz``, with many more examples. Neither keeps an example database and Hypothesis's
caches go to the temp directory, so the working tree stays clean; a failure prints the seed
(``--hypothesis-seed``) and a ``@reproduce_failure`` blob.

What the fuzzing found is pinned at the end of each layer with its minimal input, on both brokers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from nova_swarm.broker.contract import messages
from nova_swarm.broker.contract.errors import ErrorCode, ProtocolError
from nova_swarm.broker.contract.messages import (
    MAX_FANOUT,
    Answer,
    ErrorReply,
    JsonSchemaFormat,
    PromptRequest,
    Task,
    TaskResult,
    Wire,
    decode,
    decode_reply,
)
from nova_swarm.broker.contract.topics import Topics, is_concrete
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.base import Message
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub import Hub, Limits, SwarmClient
from nova_swarm.hub.intake import Accepted, Rejected, parse_prompt
from nova_swarm.node import FakeEngine

from .conftest import RunningBroker, hub_config, nodes_available, running_hub, running_node, until

# ---------------------------------------------------------------- profiles

LONG = os.environ.get("NOVA_SWARM_FUZZ") == "long"
# No example database (database=None below), and Hypothesis's caches (its Unicode tables and the
# constants it reads from our sources) go to the temp directory instead of ./.hypothesis.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "nova-swarm-hypothesis"))

settings.register_profile(
    "ci",
    max_examples=150,
    # Parsing one payload, even 256 KiB of it, takes milliseconds: a second means a hang.
    deadline=timedelta(seconds=1),
    derandomize=False,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fuzz", parent=settings.get_profile("ci"), max_examples=5_000)
settings.load_profile("fuzz" if LONG else "ci")

#: Live tests start a hub or a node per example, so they get far fewer examples. They do not
#: shrink in CI: a failing example waits out its reply timeout, and shrinking runs hundreds.
live_settings = settings(
    max_examples=300 if LONG else 10,
    deadline=None,  # network round trips; each example bounds its own waits instead
    phases=list(Phase) if LONG else [Phase.explicit, Phase.reuse, Phase.generate],
    # The broker is shared by all examples on purpose (starting one costs half a second); every
    # example starts its own hub or node on it, so examples do not depend on each other.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

T = Topics("main")
SMALL = Limits(max_payload_bytes=4096, max_prompt_chars=200)
LIMITS = st.sampled_from([Limits(), SMALL])
WIRE_MODELS: list[type[Wire]] = sorted(
    (m for m in vars(messages).values() if isinstance(m, type) and issubclass(m, Wire) and m is not Wire),
    key=lambda m: m.__name__,
)
REPLY_WAIT_S = 5.0

# ---------------------------------------------------------------- building blocks

#: Unicode's non-characters: valid UTF-8, but Mosquitto drops a client that puts one in a topic.
NONCHARACTERS = ["\ufffe", "\uffff", "\ufdd0", "\ufdef", "\U0001fffe", "\U0010ffff"]
#: Text as clients send it, or hostile: lone surrogates (json.loads turns a "\\ud800" escape into
#: one) and non-characters. Built from a list: st.text() never yields a surrogate, whatever its alphabet.
wild_text = st.text(max_size=20) | st.lists(
    st.characters() | st.characters(categories=["Cs"]) | st.sampled_from(NONCHARACTERS), max_size=20
).map("".join)


@dataclass(frozen=True)
class Blob:
    """A big payload kept as (piece, count) pairs, so a failing example prints on one line."""

    parts: tuple[tuple[bytes, int], ...]

    def __bytes__(self) -> bytes:
        return b"".join(piece * count for piece, count in self.parts)

    def __repr__(self) -> str:
        return "Blob(" + " + ".join(repr(p) if n == 1 else f"{p!r} * {n}" for p, n in self.parts) + ")"


def raw(payload: bytes | str | Blob) -> bytes | str:
    return bytes(payload) if isinstance(payload, Blob) else payload


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Any JSON value, NaN and Infinity included (Python's json writes and reads them)."""
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | text,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4),
        max_leaves=12,
    )


def dumps(value: Any, *, ascii_only: bool) -> bytes:
    """JSON as a client might send it. Without ASCII escapes a lone surrogate makes the bytes
    invalid UTF-8, which is a case of its own."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def has_surrogate(value: Any) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in json.dumps(value, ensure_ascii=False))


def sized(piece: st.SearchStrategy[bytes], low: int, high: int) -> st.SearchStrategy[Blob]:
    """``low`` to ``high`` bytes by repetition: hypothesis draws a few bytes and a count, not megabytes."""

    def build(unit: bytes, size: int) -> Blob:
        whole, rest = divmod(size, len(unit))
        return Blob(((unit, whole), (unit[:rest], 1)))

    return st.builds(build, piece.filter(bool), st.integers(low, high))


def nested(prefix: bytes = b"") -> st.SearchStrategy[Blob]:
    """JSON nested deeper than any parser recurses (or not), closed or left open."""
    depths = st.sampled_from([100_000, 50_000, 1_000]) | st.integers(1, 120_000)
    shapes = st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"prompt":[', b"]")])
    return st.builds(
        lambda n, shape, closed: Blob(((prefix, 1), (shape[0], n), (shape[1], n if closed else 0))),
        depths,
        shapes,
        st.booleans(),
    )


#: Valid UTF-8 around one broken sequence (valid text on both sides, so nothing completes it).
invalid_utf8 = st.builds(
    lambda head, bad, tail: head.encode() + bad + tail.encode(),
    st.text(max_size=10),
    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80"]),
    st.text(max_size=10),
)
blank = st.text(" \t\r\n\x0b\x0c\u00a0\u2003\u3000", max_size=40).map(str.encode)

# ---------------------------------------------------------------- prompt payloads


@dataclass(frozen=True)
class JsonPrompt:
    """A JSON request object; ``render`` can route its reply to a topic of the test's choosing."""

    body: dict[str, Any]
    ascii_only: bool = True
    #: the field a mutation broke, if any (it keeps its broken value)
    broken: str | None = None

    def render(self, reply_to: str | None = None) -> bytes:
        body = dict(self.body)
        if reply_to is not None and self.broken != "reply_to":
            body["reply_to"] = reply_to
        return dumps(body, ascii_only=self.ascii_only)

    def unreadable(self) -> bool:
        """Will the hub meet a lone surrogate? Written raw, any surrogate is invalid UTF-8; escaped,
        only an unpaired one ("\\ud800\\udc00" is one character to a JSON parser)."""
        if self.ascii_only:
            return has_surrogate(json.loads(self.render()))
        return has_surrogate(self.body)


Garbage = bytes | Blob | JsonPrompt


def render(payload: Garbage, reply_to: str | None = None) -> bytes:
    if isinstance(payload, JsonPrompt):
        return payload.render(reply_to)
    return bytes(payload)


def message(payload: bytes, **props: Any) -> Message:
    return Message(T.prompt(), payload, 1, False, **props)


request_ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)
tags = st.lists(st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True), max_size=3)
prompts = st.text(min_size=1, max_size=60).filter(lambda s: s.strip() != "")
chats = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=30)}),
    min_size=1,
    max_size=3,
)
gen_params = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, 512),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "seed": st.integers(-(2**31), 2**31),
        "stop": st.lists(st.text(max_size=5), max_size=8),
        "tags": tags,
        "top_k": st.integers(0, 200),
        "min_p": st.floats(0, 1),
        "repeat_penalty": st.floats(0, 2),
        "typical_p": st.floats(0, 1, exclude_min=True),
    },
)


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request a hub with the default limits (or SMALL) must accept."""
    body: dict[str, Any] = {"reply_to": "swarm/main/reply/default/fuzz/1"}
    if draw(st.booleans()):
        body["prompt"] = draw(prompts)
    else:
        body["messages"] = draw(chats)
    optional = {
        "id": request_ids,
        "params": gen_params,
        "strategy": st.sampled_from(["race", "best_of_n"]),
        "fanout": st.integers(1, MAX_FANOUT),
        "tags": tags,
        "model": st.text(max_size=20),
        "timeout_s": st.floats(0.1, 3600),
    }
    for name in draw(st.sets(st.sampled_from(sorted(optional)))):
        body[name] = draw(optional[name])
    return body


def not_a_string(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return (
        st.integers()
        | st.floats(allow_nan=False)
        | st.booleans()
        | st.lists(st.integers() | text, max_size=3)
        | st.dictionaries(text, st.integers(), max_size=3)
    )


def not_numeric(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    # pydantic's lax mode reads "12", " 1e3" or "inf" as numbers; a leading letter never is one.
    return text.map(lambda s: "x" + s)


def wrong_values(field: str, text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Values PromptRequest must refuse for ``field``, even in pydantic's lax mode.

    Booleans and numeric strings are left out of the numeric fields: pydantic coerces them
    (``"fanout": true`` is read as 1), which the contract neither promises nor forbids.
    """
    containers = st.lists(st.integers(), max_size=3) | st.dictionaries(text, st.integers(), max_size=3)
    bad_roles = text.filter(lambda r: r not in ("system", "user", "assistant", "tool"))
    return {
        "id": not_a_string(text) | st.text(min_size=1).map(lambda s: s + " "),  # a space is never allowed
        "prompt": not_a_string(text) | st.text(" \t\n\r", max_size=5),
        "messages": st.one_of(
            st.just([]),
            text,
            st.integers(),
            st.lists(st.integers() | text, min_size=1, max_size=3),
            st.lists(st.fixed_dictionaries({"role": bad_roles, "content": text}), min_size=1, max_size=2),
        ),
        # never a dict: a dict with an unknown key is unknown_field, not invalid_request
        "params": st.none() | text | st.integers() | st.booleans() | st.lists(st.integers(), max_size=3),
        "strategy": json_values(text).filter(lambda v: v not in ("race", "best_of_n")),
        "fanout": st.one_of(
            st.none(),
            st.integers(max_value=0),
            not_numeric(text),
            containers,
            st.floats(0.01, MAX_FANOUT).filter(lambda f: not f.is_integer()),
        ),
        "tags": st.one_of(
            st.none(),
            text,
            st.integers(),
            st.dictionaries(text, st.integers(), min_size=1, max_size=2),
            st.lists(st.just("not a tag!"), min_size=1, max_size=2),
        ),
        "reply_to": st.integers() | st.booleans() | containers,
        "model": not_a_string(text) | st.text(min_size=129, max_size=200),
        "timeout_s": st.one_of(
            not_numeric(text),
            containers,
            st.floats(max_value=0),
            st.just(math.nan),
            st.floats(min_value=3600, exclude_min=True),
        ),
        "private": st.one_of(st.integers(), text, containers, st.none()),
        "kind": json_values(text).filter(lambda v: v not in ("chat", "embed", "complete")),
        # a chat request (these all are) takes no input, whatever it holds
        "input": st.one_of(not_a_string(text), st.lists(text, min_size=1, max_size=2)),
        "stream": st.one_of(st.integers(), text, containers, st.none()),
        "retrieval": st.one_of(st.integers(), text, containers),
        "response_format": st.one_of(
            text,
            st.integers(),
            st.just({"type": "xml"}),
            st.just({"type": "json_schema"}),
            st.just({"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}),
        ),
        "tools": st.one_of(st.just([]), text, st.integers(), st.just([{"type": "function"}])),
        # without tools, only "none" is a valid choice
        "tool_choice": st.one_of(st.integers(), text.filter(lambda v: v != "none"), st.just({"type": "function"})),
        # across models is for best_of_n only, and these requests are races or have one model
        "models": st.one_of(not_a_string(text), st.just([]), st.lists(st.just("m"), min_size=2, max_size=2)),
        "diverse": st.one_of(st.integers(min_value=2), text, containers),
    }[field]


@dataclass(frozen=True)
class Mutation:
    kind: str  # "wrong" | "unknown" | "drop" | "both"
    field: str
    expected: ErrorCode


@st.composite
def mutated_requests(draw: st.DrawFn, text: st.SearchStrategy[str]) -> tuple[JsonPrompt, Mutation]:
    """A valid request with exactly one thing broken, and the error code that must come back."""
    body = draw(valid_requests())
    kind = draw(st.sampled_from(["wrong", "unknown", "drop", "both"]))
    if kind == "wrong":
        field = draw(st.sampled_from(sorted(PromptRequest.model_fields)))
        body[field] = draw(wrong_values(field, text))
        mutation = Mutation(kind, field, ErrorCode.INVALID_REQUEST)
    elif kind == "unknown":
        field = draw(text.filter(lambda k: k not in PromptRequest.model_fields))
        body[field] = draw(json_values(text))
        mutation = Mutation(kind, field, ErrorCode.UNKNOWN_FIELD)
    elif kind == "drop":
        field = "prompt" if "prompt" in body else "messages"
        del body[field]
        mutation = Mutation(kind, field, ErrorCode.INVALID_REQUEST)
    else:
        field = "messages" if "prompt" in body else "prompt"
        body[field] = draw(chats) if field == "messages" else draw(prompts)
        mutation = Mutation(kind, field, ErrorCode.INVALID_REQUEST)
    broken = field if kind == "wrong" else None
    return JsonPrompt(body, ascii_only=draw(st.booleans()), broken=broken), mutation


@st.composite
def odd_text_requests(draw: st.DrawFn, text: st.SearchStrategy[str]) -> JsonPrompt:
    """A valid request whose free text (prompt, a message, a stop string, the model) is ``text``."""
    body = draw(valid_requests())
    where = draw(st.sampled_from(["text", "stop", "model"]))
    odd = draw(text) + "."  # never blank
    if where == "text" and "prompt" in body:
        body["prompt"] = odd
    elif where == "text":
        body["messages"] = [*body["messages"][:-1], {"role": "user", "content": odd}]
    elif where == "stop":
        body["params"] = {**body.get("params", {}), "stop": [odd]}
    else:
        body["model"] = odd
    return JsonPrompt(body, ascii_only=draw(st.booleans()))


def garbage_prompts(text: st.SearchStrategy[str]) -> st.SearchStrategy[Garbage]:
    """Everything a client could publish on the prompt topic, valid or not."""
    random_objects = st.builds(
        JsonPrompt,
        st.dictionaries(st.sampled_from(sorted(PromptRequest.model_fields)) | text, json_values(text), max_size=6),
        st.booleans(),
    )
    return st.one_of(
        st.binary(max_size=200),
        invalid_utf8,
        blank,
        text.map(lambda s: s.encode("utf-8", "surrogatepass")),  # a lone surrogate: invalid UTF-8
        sized(st.binary(min_size=1, max_size=8), 4000, 300_000),  # around both limits
        nested(),
        st.builds(lambda junk: b"{" + junk, st.binary(max_size=100)),  # looks like JSON, is not
        json_values(text).map(lambda v: dumps(v, ascii_only=True)),  # JSON, but mostly not an object
        random_objects,
        valid_requests().map(JsonPrompt),
        odd_text_requests(text),
        mutated_requests(text).map(lambda pair: pair[0]),
    )


correlations = st.none() | st.binary(max_size=32)
response_topics = st.none() | st.one_of(  # half of the time none, as on an MQTT 3.1.1 broker
    st.just(T.reply("default", "r5")),
    st.builds(lambda s: "swarm/main/reply/" + s, wild_text),
    wild_text,
)

# ---------------------------------------------------------------- checks


def check_outcome(out: object, msg: Message, limits: Limits) -> None:
    """What every outcome of parse_prompt must satisfy, whatever the input."""
    assert isinstance(out, Accepted | Rejected), out
    if currently_in_test_context():  # statistics for --hypothesis-show-statistics
        event("accepted" if isinstance(out, Accepted) else f"refused: {out.error.code}")
    assert out.correlation == msg.correlation_data
    assert T.is_reply_topic(out.reply_topic), out.reply_topic
    scope = T.prompt_scope(msg.topic) or "default"
    assert T.in_scope(out.reply_topic, scope), (scope, out.reply_topic)  # never another login's topic
    if msg.response_topic is not None and not T.in_scope(msg.response_topic, scope):
        assert isinstance(out, Rejected) and out.error.code is ErrorCode.BAD_REPLY_TO
    if isinstance(out, Rejected):
        assert isinstance(out.error.code, ErrorCode)
        assert isinstance(out.error.message, str) and out.error.message
        assert out.request_id is None or (isinstance(out.request_id, str) and len(out.request_id) <= 128)
    else:
        req = out.request
        assert isinstance(req, PromptRequest)
        assert len(msg.payload) <= limits.max_payload_bytes
        assert out.request_id and (req.id is None or out.request_id == req.id)
        assert req.prompt_chars() <= limits.max_prompt_chars
        assert req.fanout <= limits.max_fanout
        assert req.params.max_tokens is None or req.params.max_tokens <= limits.max_tokens


def _refused_char(c: str) -> bool:
    cp = ord(c)
    return cp <= 0x1F or 0x7F <= cp <= 0x9F or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def mqtt_can_carry(topic: str) -> bool:
    """MQTT 3.1.1 section 1.5.3: a topic is UTF-8 of at most 65,535 bytes without U+0000, and
    SHOULD NOT hold control characters or non-characters. Mosquitto enforces the SHOULD: it
    disconnects a client that publishes one."""
    try:
        encoded = topic.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 0 < len(encoded) <= 65_535 and is_concrete(topic) and not any(_refused_char(c) for c in topic)


# ---------------------------------------------------------------- parse_prompt, pure


@given(
    payload=garbage_prompts(wild_text),
    topic=st.just(T.prompt()) | wild_text,
    qos=st.integers(0, 2),
    retain=st.booleans(),
    response_topic=response_topics,
    correlation=correlations,
    limits=LIMITS,
)
@example(Blob(((b"[", 100_000),)), T.prompt(), 1, False, None, None, Limits())
@example(Blob(((b'{"prompt":', 1), (b"[", 50_000))), T.prompt(), 1, False, None, b"c", Limits())
@example(Blob(((b"\xff", 300_000),)), T.prompt(), 1, False, "swarm/main/reply/x", None, Limits())
def test_parse_prompt_always_returns_a_routable_outcome(
    payload: Garbage,
    topic: str,
    qos: int,
    retain: bool,
    response_topic: str | None,
    correlation: bytes | None,
    limits: Limits,
) -> None:
    msg = Message(topic, render(payload), qos, retain, response_topic, correlation)
    check_outcome(parse_prompt(msg, T, limits), msg, limits)


@given(limits=LIMITS, data=st.data())
def test_each_kind_of_broken_payload_gets_its_stable_code(limits: Limits, data: st.DataObject) -> None:
    top = limits.max_payload_bytes
    cases: list[tuple[str, st.SearchStrategy[Any], ErrorCode]] = [
        ("oversize", sized(st.binary(min_size=1, max_size=8), top + 1, 2 * top), ErrorCode.PAYLOAD_TOO_LARGE),
        ("not utf-8", invalid_utf8, ErrorCode.BAD_ENCODING),
        ("blank", blank, ErrorCode.EMPTY_PROMPT),
        ("broken json", st.builds(lambda s: b" {" + s.encode() + b"\x00", st.text(max_size=50)), ErrorCode.BAD_JSON),
        ("unclosed", st.integers(1, min(50_000, top // 5)).map(lambda n: Blob(((b'{"a":', n),))), ErrorCode.BAD_JSON),
        ("long prompt", st.integers(limits.max_prompt_chars + 1, top).map(lambda n: b"y" * n),
         ErrorCode.PROMPT_TOO_LARGE),
    ]  # fmt: skip
    if top >= 100_000:  # balanced, so only the depth is wrong
        depth = st.integers(2_000, 40_000).map(lambda n: Blob(((b'{"prompt":', 1), (b"[", n), (b"]", n), (b"}", 1))))
        cases.append(("too deep", depth, ErrorCode.INVALID_REQUEST))
    _, strategy, code = data.draw(st.sampled_from(cases), label="case")
    payload = render(data.draw(strategy, label="payload"))
    msg = message(payload, correlation_data=data.draw(correlations, label="correlation"))
    out = parse_prompt(msg, T, limits)
    check_outcome(out, msg, limits)
    assert isinstance(out, Rejected) and out.error.code is code, (payload[:60], out)
    assert out.reply_topic == T.reply()


@given(body=valid_requests(), limits=LIMITS, ascii_only=st.booleans(), correlation=correlations)
def test_every_valid_request_is_accepted_as_sent(
    body: dict[str, Any], limits: Limits, ascii_only: bool, correlation: bytes | None
) -> None:
    msg = message(dumps(body, ascii_only=ascii_only), correlation_data=correlation)
    out = parse_prompt(msg, T, limits)
    check_outcome(out, msg, limits)
    assert isinstance(out, Accepted), out
    assert out.request == PromptRequest.model_validate(body)
    assert out.reply_topic == body["reply_to"]
    assert out.request_id == body.get("id", out.request_id)


@given(pair=mutated_requests(wild_text), limits=LIMITS, response_topic=st.none() | st.just(T.reply("default", "r5")))
@example(  # an escaped surrogate pair is one valid character: only the wrong type is refused
    pair=(
        JsonPrompt(
            {"reply_to": "swarm/main/reply/default/fuzz/1", "prompt": "hi", "fanout": "x\ud800\udc00"}, True, "fanout"
        ),
        Mutation("wrong", "fanout", ErrorCode.INVALID_REQUEST),
    ),
    limits=Limits(),
    response_topic=None,
)
def test_a_valid_request_with_one_field_broken_is_refused_with_its_code(
    pair: tuple[JsonPrompt, Mutation], limits: Limits, response_topic: str | None
) -> None:
    prompt, mutation = pair
    msg = message(prompt.render(), response_topic=response_topic)
    out = parse_prompt(msg, T, limits)
    check_outcome(out, msg, limits)
    assert isinstance(out, Rejected), out
    if prompt.unreadable():
        # Not UTF-8, or no text the hub could send on, log or store: refused before its id or
        # reply_to is read.
        assert (out.error.code, out.reply_topic, out.request_id) == (
            ErrorCode.BAD_ENCODING,
            response_topic or T.reply(),
            None,
        ), out
        return
    assert out.error.code is mutation.expected, (mutation, out.error)
    if mutation.field == "reply_to":  # unreadable: the refusal goes where it would have without it
        assert out.reply_topic == (response_topic or T.reply())
    else:
        assert out.reply_topic == prompt.body["reply_to"]
    raw_id = prompt.body.get("id")
    assert out.request_id == (raw_id if isinstance(raw_id, str) and len(raw_id) <= 128 else None)


# ---------------------------------------------------------------- decode, pure


def _seeds() -> dict[type[Wire], dict[str, Any]]:
    """One valid message per wire model (the examples of topics.md), to mutate."""
    usage = {"prompt_tokens": 31, "completion_tokens": 3, "total_tokens": 34}
    timings = {"queue_ms": 0.2, "ttft_ms": 61.0, "generate_ms": 102.5, "tokens_per_s": 29.3}
    chat = {"role": "user", "content": "Name a fruit."}
    params = {"max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\n\n"], "tags": [],
              "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1, "typical_p": 1.0}  # fmt: skip
    error = {"code": "no_eligible_nodes", "message": "no node is online", "retry_after_s": 5.0}
    model = {"name": "SmolLM2", "sha256": "b" * 64, "size_bytes": 98362432, "ctx": 2048}
    candidate = {
        "node_id": "pixel7",
        "text": "Banana.",
        "score": 0.41,
        "finish_reason": "stop",
        "usage": usage,
        "timings": timings,
    }
    row = {
        "node_id": "pixel7",
        "state": "online",
        "model": "m",
        "tokens_per_s": 40.0,
        "battery_pct": 81.0,
        "charging": True,
        "temp_c": 33.5,
        "busy": 0,
        "last_seen": 1.0,
        "agent_version": "0.1.0",
        "tags": ["x"],
        "ctx": 2048,
        "max_tokens": 512,
        "capabilities": ["stream", "embed"],
    }
    report = {"wanted": "0.2.0", "outcome": "refused", "reason": "older than the running 0.3.0", "ts": 1.0}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": None}}  # fmt: skip
    shape = {"type": "json_schema", "json_schema": {"name": "person", "description": None,
             "schema": {"type": "object"}, "strict": True}}  # fmt: skip
    delta = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    seeds: dict[str, dict[str, Any]] = {
        "ChatMessage": chat,
        "GenParams": params,
        "PromptRequest": {"id": "req-42", "prompt": "Write a haiku.", "params": params, "strategy": "best_of_n",
                          "fanout": 2, "tags": ["poetry"], "reply_to": "swarm/main/reply/alice", "model": "m",
                          "timeout_s": 60},
        "Usage": usage,
        "Timings": timings,
        "ErrorInfo": error,
        "Candidate": candidate,
        "Answer": {"id": "req-42", "ok": True, "text": "Banana.", "node_id": "pixel7", "model": "m",
                   "finish_reason": "stop", "usage": usage, "timings": timings, "latency_ms": 109.8,
                   "strategy": "best_of_n", "attempts": 2, "candidates": [candidate]},
        "ErrorReply": {"id": "req-42", "ok": False, "error": error},
        "Task": {"task_id": "9f2c", "request_id": "req-42", "messages": [chat], "params": params, "timeout_s": 10.0,
                 "model": None},
        "Cancel": {"task_id": "9f2c", "reason": "another node answered first"},
        "TaskResult": {"task_id": "9f2c", "request_id": "req-42", "node_id": "pixel7", "ok": True, "text": "Banana.",
                       "model": "m", "finish_reason": "stop", "usage": usage, "timings": timings, "error": None},
        "ModelInfo": model,
        "Announce": {"node_id": "pixel7", "model": model, "threads": 4, "tokens_per_s": 41.8, "ram_total_mb": 7680.0,
                     "device": "phone", "tags": ["poetry"], "agent_version": "0.1.0", "slots": 1, "queue_max": 4,
                     "max_tokens": 512, "max_temperature": 2.0, "ts": 1795450000.0, "progress_s": 0.5},
        "Status": {"node_id": "pixel7", "state": "online", "reason": None, "ts": 1795450000.0, "bundle": report,
                   "model_pin": None},
        "Heartbeat": {"node_id": "pixel7", "ts": 1.0, "battery_pct": 81.0, "charging": True, "temp_c": 33.5,
                      "ram_free_mb": 2100.0, "load": 0.8, "tokens_per_s": 39.2, "busy": 1, "slots": 1, "queued": 0,
                      "tokens_served": 5120, "tasks_done": 42, "tasks_failed": 0},
        "HubStatus": {"hub_id": "hub", "state": "online", "ts": 1.0, "version": "0.1.0", "nodes_online": 2,
                      "nodes_paused": 0, "nodes_offline": 1, "inflight": 3, "answered": 120, "failed": 2,
                      "started_at": 1.0, "max_tokens": 4096},
        "NodeRow": row,
        "NodeTable": {"ts": 1.0, "nodes": [row]},
        "PinReport": report,
        "BundleManifest": {"kind": "bundle", "swarm": "main", "version": "0.2.0", "sha256": "9c" * 32,
                           "size_bytes": 91342, "min_python": "3.11", "chunk_bytes": 262144, "chunks": ["9c" * 32],
                           "created": 1.5},
        "ModelPin": {"kind": "model", "swarm": "main", "name": "gemma-3-270m-q4_k_m", "sha256": "a5" * 32,
                     "size_bytes": 253113024, "url": "http://127.0.0.1:8000/g.gguf", "tags": ["big"],
                     "serial": 1795450000123456, "created": 1.5},
        "FunctionCall": call["function"],
        "ToolCall": call,
        "FunctionDef": tool["function"],
        "Tool": tool,
        "NamedFunction": {"name": "get_weather"},
        "NamedToolChoice": {"type": "function", "function": {"name": "get_weather"}},
        "JsonSchemaFormat": shape["json_schema"],
        "ResponseFormat": shape,
        "FunctionDelta": delta["function"],
        "ToolCallDelta": delta,
        "NodeChunk": {"task_id": "9f2c", "seq": 0, "text": "The sea", "tool_calls": [delta]},
        "NodeProgress": {"node_id": "pixel7", "tasks": ["9f2c", "a41b"]},
        "StreamChunk": {"id": "req-42", "seq": 0, "done": False, "node_id": "pixel7", "text": "The sea",
                        "tool_calls": None, "restart": False},
        "StreamEnd": {"id": "req-42", "seq": 3, "done": True, "ok": True, "node_id": "pixel7", "model": "m",
                      "finish_reason": "stop", "usage": usage, "timings": timings, "error": None},
        "CancelRequest": {"id": "req-42", "reason": "user pressed stop"},
        "PinnedModel": {"name": "gemma-3-270m-q4_k_m", "sha256": "a5" * 32, "size_bytes": 253113024,
                        "url": "http://127.0.0.1:8000/g.gguf", "tags": ["big"]},
        "ServedModel": {"name": "gemma-3-270m-q4_k_m", "loaded": True, "fits": True, "needs_mb": 1498.6,
                        "load_s": 0.46},
        "RouteTable": {"kind": "routes", "swarm": "main", "routes": {"code": "qwen2.5-coder-0.5b", "chat": "smol"},
                       "serial": 1795450000123456, "created": 1.5},
    }  # fmt: skip
    return {m: seeds[m.__name__] for m in WIRE_MODELS if m.__name__ in seeds}


SEEDS = _seeds()


def test_every_wire_model_has_a_valid_seed_to_mutate() -> None:
    missing = [m.__name__ for m in WIRE_MODELS if m not in SEEDS]
    assert not missing, f"add a valid example of {missing} to _seeds() so the fuzzing covers it"
    for model, seed in SEEDS.items():
        decode(model, json.dumps(seed))


def like(value: Any, text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Any value of the same JSON shape as ``value``: mostly valid messages, with unusual contents."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers()
    if isinstance(value, float):
        return st.floats()
    if isinstance(value, str):
        return text
    if isinstance(value, list):
        return st.lists(like(value[0], text) if value else text, max_size=4)
    if isinstance(value, dict):
        return st.fixed_dictionaries({k: like(v, text) for k, v in value.items()})
    return json_values(text)


def wire_keys(model: type[Wire]) -> set[str]:
    """The keys ``model`` has on the wire: a field's alias where it has one (``schema`` for ``schema_``)."""
    return {field.alias or name for name, field in model.model_fields.items()}


def mutate(
    draw: st.DrawFn, seed: dict[str, Any], model: type[Wire], text: st.SearchStrategy[str]
) -> tuple[dict[str, Any], str]:
    """``seed`` with one field given another value of its shape (tweak) or any JSON (replace), dropped,
    or an unknown field added; or untouched (none)."""
    body = dict(seed)
    kind = draw(st.sampled_from(["tweak", "replace", "drop", "unknown", "none"]))
    if kind in ("tweak", "replace"):
        field = draw(st.sampled_from(sorted(wire_keys(model))))
        if kind == "tweak":
            body[field] = draw(like(seed.get(field), text))
        else:
            body[field] = draw(json_values(text))
    elif kind == "drop":
        del body[draw(st.sampled_from(sorted(body)))]
    elif kind == "unknown":
        body[draw(text.filter(lambda k: k not in model.model_fields and k not in wire_keys(model)))] = draw(
            json_values(text)
        )
    return body, kind


@st.composite
def mutated_seeds(draw: st.DrawFn, text: st.SearchStrategy[str]) -> tuple[type[Wire], bytes | str, str]:
    """A valid message of some wire model with one thing changed (see ``mutate``), as JSON text or bytes."""
    model = draw(st.sampled_from(list(SEEDS)))
    body, kind = mutate(draw, SEEDS[model], model, text)
    dumped = json.dumps(body, ensure_ascii=draw(st.booleans()))
    as_bytes = draw(st.booleans())
    return model, dumped.encode("utf-8", "surrogatepass") if as_bytes else dumped, kind


wire_garbage: st.SearchStrategy[bytes | str | Blob] = st.one_of(
    st.binary(max_size=300),
    wild_text,
    invalid_utf8,
    sized(st.binary(min_size=1, max_size=8), 100_000, 2_000_000),
    nested(),
    nested(b'{"task_id": '),
    json_values(wild_text).map(lambda v: json.dumps(v, ensure_ascii=False)),
)


def decode_or_protocol_error(model: type[Wire], payload: bytes | str) -> Wire | None:
    try:
        out = decode(model, payload)
    except ProtocolError as exc:
        assert str(exc).startswith(f"invalid {model.__name__}: "), exc
        return None
    assert isinstance(out, model)
    return out


@given(model=st.sampled_from(WIRE_MODELS), payload=wire_garbage)
@example(Task, Blob(((b"[", 100_000),)))
@example(Task, Blob(((b'{"a":', 100_000),)))
@example(TaskResult, "\ud800")
def test_decode_raises_nothing_but_protocol_error(model: type[Wire], payload: bytes | str | Blob) -> None:
    decode_or_protocol_error(model, raw(payload))


@given(case=mutated_seeds(wild_text))
# Found by CI: ``description`` dropped; the test took ``schema`` (the alias of ``schema_``) for missing.
@example(case=(JsonSchemaFormat, '{"name": "person", "schema": {"type": "object"}, "strict": true}', "drop"))
def test_decode_of_a_broken_message_is_the_message_or_protocol_error(case: tuple[type[Wire], bytes | str, str]) -> None:
    model, payload, kind = case
    out = decode_or_protocol_error(model, payload)
    event(f"{kind}: {'decoded' if out is not None else 'refused'}")
    if kind == "none":
        assert out is not None
    if kind == "unknown":  # extra="forbid", all the way down
        assert out is None
    if kind == "drop" and out is not None:
        present = set(json.loads(payload))
        dropped = [field for name, field in model.model_fields.items() if (field.alias or name) not in present]
        assert all(not field.is_required() for field in dropped)


@given(case=mutated_seeds(wild_text))
# Found by fuzzing: NaN, Infinity and 1e400 (read as inf) were accepted and written back as null,
# which the next read refused; the hub stores announces and heartbeats that way (hub/store.py).
@example((messages.Announce, json.dumps({**SEEDS[messages.Announce], "ts": math.nan}), "tweak"))
@example((messages.Heartbeat, json.dumps(SEEDS[messages.Heartbeat]).replace('"ts": 1.0', '"ts": 1e400'), "tweak"))
def test_what_decode_accepts_survives_an_encode_and_decode(case: tuple[type[Wire], bytes | str, str]) -> None:
    model, payload, _ = case
    out = decode_or_protocol_error(model, payload)
    event("decoded" if out is not None else "refused")
    if out is not None:
        assert decode(model, out.encode()) == out


@given(payload=wire_garbage | mutated_seeds(wild_text).map(lambda case: case[1]))
def test_decode_reply_is_an_answer_an_error_reply_or_protocol_error(payload: bytes | str | Blob) -> None:
    try:
        reply = decode_reply(raw(payload))
    except ProtocolError:
        return
    assert isinstance(reply, Answer | ErrorReply)
    assert reply.ok is isinstance(reply, Answer)


# ---------------------------------------------------------------- pure: what the fuzzing found

LONG_REPLY_TO = Blob(((b'{"prompt": "hi", "reply_to": "swarm/main/reply/default/', 1), (b"a", 65_536), (b'"}', 1)))
#: Each of these once stopped the hub (or, on Mosquitto, cost it its connection and the reply):
#: the refusal or the request could not be encoded, or its reply topic could not be published.
HUB_KILLERS = [
    pytest.param(b'{"id": "\\ud800", "prompt": 5}', ErrorCode.BAD_ENCODING, id="surrogate-id"),
    pytest.param(b'{"prompt": "hi", "reply_to": "swarm/main/reply/default/\\ud800"}', ErrorCode.BAD_ENCODING,
                 id="surrogate-reply-to"),
    pytest.param(bytes(LONG_REPLY_TO), ErrorCode.BAD_REPLY_TO, id="reply-to-over-64k"),
    pytest.param(b'{"prompt": "hi", "reply_to": "swarm/main/reply/default/a\\u0001"}', ErrorCode.BAD_REPLY_TO,
                 id="control-char-reply-to"),
    pytest.param(b'{"prompt": "\\ud800"}', ErrorCode.BAD_ENCODING, id="surrogate-prompt"),
    pytest.param(b'{"prompt": "hi", "reply_to": "swarm/main/reply/default/a\\ufffe"}', ErrorCode.BAD_REPLY_TO,
                 id="non-character-reply-to"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "code"), HUB_KILLERS)
def test_inputs_that_stopped_the_hub_are_refused_cleanly(payload: bytes, code: ErrorCode) -> None:
    msg = message(payload)
    out = parse_prompt(msg, T, Limits())
    check_outcome(out, msg, Limits())
    assert isinstance(out, Rejected) and out.error.code is code, out
    assert out.reply_topic == T.reply()
    ErrorReply(id=out.request_id, error=out.error).encode()


@given(payload=odd_text_requests(wild_text) | garbage_prompts(wild_text), limits=LIMITS)
@example(payload=b'{"prompt": "\\ud800"}', limits=Limits())
def test_every_outcome_can_be_journalled_and_sent(payload: Garbage, limits: Limits) -> None:
    """Whatever parse_prompt returns, the hub must be able to encode everything it builds from it."""
    out = parse_prompt(message(render(payload)), T, limits)
    if isinstance(out, Rejected):
        ErrorReply(id=out.request_id, error=out.error).encode()
    else:
        req = out.request
        req.model_dump_json(exclude_none=True)  # the journal entry and its digest
        Task(task_id="t", request_id=out.request_id, messages=req.chat(), params=req.params, timeout_s=1.0).encode()


@given(
    suffix=wild_text,
    via=st.sampled_from(["reply_to", "response_topic"]),
    payload=st.just(b"hi") | valid_requests().map(lambda body: dumps(body, ascii_only=True)),
)
@example(suffix="a\ufffe", via="reply_to", payload=b"hi")  # Mosquitto drops a publisher to it
@example(suffix="a\x85", via="response_topic", payload=b"hi")
def test_every_reply_topic_can_be_published(suffix: str, via: str, payload: bytes) -> None:
    """Whatever reply topic a prompt asks for, the one it gets can be published on any broker."""
    topic = "swarm/main/reply/default/" + suffix  # the bare prompt's scope: reply/default and below
    if via == "reply_to":
        body = json.loads(payload) if payload.startswith(b"{") else {"prompt": payload.decode()}
        out = parse_prompt(message(dumps({**body, "reply_to": topic}, ascii_only=True)), T, Limits())
    else:
        out = parse_prompt(message(payload, response_topic=topic), T, Limits())
    event(f"{via}: {'kept' if out.reply_topic == topic else 'refused'}")
    assert mqtt_can_carry(out.reply_topic), ascii(out.reply_topic)


# ---------------------------------------------------------------- live: the hub's prompt topic


class Inbox:
    """Every message on a connection's subscriptions, kept for the test to look at."""

    def __init__(self, conn: Connection) -> None:
        self.messages: list[Message] = []
        self._task = asyncio.create_task(self._read(conn))

    async def _read(self, conn: Connection) -> None:
        async for msg in conn.messages():
            self.messages.append(msg)

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


@dataclass(frozen=True)
class Expected:
    topic: str
    code: ErrorCode | None  # None: accepted, so any error but internal_error (no node is online yet)
    request_id: str | None  # None: not predictable (the payload gave none)


def predict(payload: bytes, limits: Limits) -> Expected:
    first, again = (parse_prompt(message(payload), T, limits) for _ in range(2))
    stable_id = first.request_id if first.request_id == again.request_id else None
    return Expected(first.reply_topic, first.error.code if isinstance(first, Rejected) else None, stable_id)


def unmatched(expected: list[Expected], got: list[tuple[str, ErrorReply]]) -> list[Expected]:
    """The expected replies that ``got`` does not account for (specific codes matched first)."""
    left = list(got)
    missing = []
    for want in sorted(expected, key=lambda e: e.code is None):
        for i, (topic, reply) in enumerate(left):
            if topic != want.topic or (want.request_id is not None and reply.id != want.request_id):
                continue
            if want.code is None:
                fits = reply.error.code is not ErrorCode.INTERNAL_ERROR
            else:
                fits = reply.error.code is want.code
            if fits:
                del left[i]
                break
        else:
            missing.append(want)
    return missing


async def ask_normally(broker: RunningBroker, hub: Hub) -> None:
    """A fake node joins and an ordinary prompt gets its answer: the hub is still serving."""
    async with running_node(broker, FakeEngine(reply="still alive"), "fuzz-node", heartbeat_s=0.2):
        await nodes_available(hub, 1)
        async with SwarmClient(broker.url(Role.CLIENT)) as client:
            answer = await client.ask(PromptRequest(prompt="are you there?"), timeout=REPLY_WAIT_S)
    assert answer.text == "still alive"


@pytest.mark.mosquitto
@live_settings
@given(batch=st.lists(garbage_prompts(wild_text), min_size=1, max_size=6))
async def test_live_hub_answers_every_garbage_prompt_once_and_keeps_serving(
    mosquitto: RunningBroker, tmp_path: Path, batch: list[Garbage]
) -> None:
    config = hub_config(tmp_path / uuid.uuid4().hex, limits=SMALL)
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    own = T.reply("default", name)  # the bare prompt's scope, which every client may read
    payloads: list[bytes] = []
    expected: list[Expected] = []
    accepted_ids: set[str] = set()
    for i, garbage in enumerate(batch):
        payload = render(garbage, reply_to=f"{own}/{i}")
        want = predict(payload, config.limits)
        if want.code is None and want.request_id is not None:
            # The same id again is a retry: while in flight it gets no second reply, by design
            # (test_reliability.py covers that). Keep the first.
            if want.request_id in accepted_ids:
                continue
            accepted_ids.add(want.request_id)
        payloads.append(payload)
        expected.append(want)
        event(f"expect {want.code or 'accepted'}")

    async with running_hub(mosquitto, config) as hub:
        async with Connection(mosquitto.url(Role.CLIENT), client_id=name) as client:
            await client.subscribe(f"{own}/#", T.reply())
            inbox = Inbox(client)
            try:
                for payload in payloads:
                    await client.publish(T.prompt(), payload)

                def replies() -> list[tuple[str, ErrorReply]]:
                    out = []
                    for m in inbox.messages:
                        reply = decode_reply(m.payload)
                        assert isinstance(reply, ErrorReply), (m.topic, reply)
                        out.append((m.topic, reply))
                    return out

                try:
                    await until(lambda: not unmatched(expected, replies()), timeout=REPLY_WAIT_S, what="every reply")
                except AssertionError:
                    raise AssertionError(f"no reply for {unmatched(expected, replies())}; got {replies()}") from None
                await ask_normally(mosquitto, hub)
                # Exactly one each: nothing more turned up while the normal prompt was answered.
                assert len(replies()) == len(payloads), replies()
            finally:
                await inbox.close()
    assert (hub.failed, hub.answered) == (len(payloads), 1)


# ---------------------------------------------------------------- live: a node's task and cancel topics


def _is(model: type[Wire], payload: bytes) -> bool:
    return decode_or_protocol_error(model, payload) is not None


@st.composite
def node_garbage(draw: st.DrawFn) -> tuple[str, bytes | Blob]:
    """(task or cancel, payload): random bytes and JSON, or a real Task or Cancel, maybe with a field broken."""
    kind = draw(st.sampled_from(["task", "cancel"]))
    model = Task if kind == "task" else messages.Cancel
    # A few shared ids, so cancels and repeated tasks meet the tasks they name.
    seed = dict(SEEDS[model], task_id=draw(st.sampled_from(["t1", "t2", "t3", "t-4"])))
    if model is Task:
        seed["timeout_s"] = draw(st.floats(0.001, 30))
    shape = draw(st.sampled_from(["intact", "mutated", "junk"]))
    if shape == "intact":
        return kind, json.dumps(seed).encode()
    if shape == "mutated":
        body, _ = mutate(draw, seed, model, wild_text)
        return kind, json.dumps(body).encode()
    junk = st.one_of(
        st.binary(max_size=200),
        invalid_utf8,
        nested(),
        sized(st.binary(min_size=1, max_size=8), 1, 300_000),
        st.dictionaries(wild_text, json_values(wild_text), max_size=4).map(lambda d: json.dumps(d).encode()),
    )
    return kind, draw(junk)


@pytest.mark.mosquitto
@live_settings
@given(batch=st.lists(node_garbage(), min_size=1, max_size=8))
async def test_live_node_survives_garbage_tasks_and_cancels(
    mosquitto: RunningBroker, batch: list[tuple[str, bytes | Blob]]
) -> None:
    node_id = "fuzzed"
    results_topic = T.node_result(node_id)
    sent = [(kind, bytes(payload)) for kind, payload in batch]
    # The node must answer the payloads that are tasks, and only those.
    deliveries = Counter(decode(Task, p).task_id for kind, p in sent if kind == "task" and _is(Task, p))
    event(f"real tasks: {min(3, sum(deliveries.values()))}{'+' if sum(deliveries.values()) >= 3 else ''}")
    event(f"real cancels: {'some' if any(k == 'cancel' and _is(messages.Cancel, p) for k, p in sent) else 'none'}")
    canary = Task(
        task_id=uuid.uuid4().hex,
        request_id="canary",
        messages=[messages.ChatMessage(role="user", content="hi")],
        params=messages.GenParams(),
        timeout_s=10.0,
    )
    # Only the hub may write a node's task and cancel topics.
    async with Connection(mosquitto.url(Role.HUB), client_id=f"hub-fuzz-{uuid.uuid4().hex[:8]}") as hub:
        await hub.subscribe(results_topic)
        inbox = Inbox(hub)
        try:
            # A little work per task, so a queue forms: cancels find tasks, and a full queue refuses.
            engine = FakeEngine(reply="fine", delay_s=0.05)
            async with running_node(mosquitto, engine, node_id, queue_max=2) as node:
                for kind, payload in sent:
                    await hub.publish(T.node_task(node_id) if kind == "task" else T.node_cancel(node_id), payload)

                def answered() -> set[str]:
                    return {decode(TaskResult, m.payload).task_id for m in inbox.on(results_topic)}

                await until(lambda: set(deliveries) <= answered(), timeout=REPLY_WAIT_S, what=f"{set(deliveries)}")
                # Only now: a task sent behind a full queue would be refused with node_busy.
                await hub.publish(T.node_task(node_id), canary.encode())
                await until(lambda: canary.task_id in answered(), timeout=REPLY_WAIT_S, what="the canary's result")
                assert node.connected.is_set()
        finally:
            await inbox.close()
    results = [decode(TaskResult, m.payload) for m in inbox.on(results_topic)]
    assert {r.task_id for r in results} == set(deliveries) | {canary.task_id}
    assert all(r.node_id == node_id for r in results)
    # Never more results for a task id than deliveries of it (a duplicate in flight is ignored).
    per_task = Counter(r.task_id for r in results)
    assert all(per_task[t] <= n for t, n in deliveries.items()), (per_task, deliveries)
    (last,) = [r for r in results if r.task_id == canary.task_id]
    assert (last.ok, last.text) == (True, "fine")
    for r in results:
        event(f"result: {r.error.code if r.error else 'ok'}")


# ---------------------------------------------------------------- live: what the fuzzing found


async def _prompt_then_another(broker: RunningBroker, tmp_path: Path, payload: bytes) -> list[tuple[str, ErrorReply]]:
    """``payload`` gets one reply, an ordinary prompt after it gets its own, and the hub stays connected."""
    async with running_hub(broker, hub_config(tmp_path)) as hub:
        async with Connection(broker.url(Role.CLIENT), client_id="fuzzer") as client:
            await client.subscribe(T.reply(), T.reply("default", "fuzzer"), f"{T.reply('default', 'fuzzer')}/#")
            inbox = Inbox(client)
            try:
                await client.publish(T.prompt(), payload)
                next_prompt = b'{"prompt": "next", "reply_to": "swarm/main/reply/default/fuzzer/next"}'
                await client.publish(T.prompt(), next_prompt)
                await until(lambda: not hub.connected or len(inbox.messages) >= 2, timeout=REPLY_WAIT_S, what="replies")
                assert hub.connected, "one prompt cost the hub its connection (or its life)"
                assert inbox.on(f"{T.reply('default', 'fuzzer')}/next"), "the next prompt got no reply"
                assert len(inbox.messages) == 2, [ascii(m.topic[:80]) for m in inbox.messages]
            finally:
                await inbox.close()
    out = []
    for m in inbox.messages:
        reply = decode_reply(m.payload)
        assert isinstance(reply, ErrorReply), reply
        out.append((m.topic, reply))
    return out


@pytest.mark.parametrize(("payload", "code"), HUB_KILLERS)
async def test_live_hub_survives_a_prompt_that_once_stopped_it(
    broker: RunningBroker, tmp_path: Path, payload: bytes, code: ErrorCode
) -> None:
    replies = await _prompt_then_another(broker, tmp_path, payload)
    (first,) = [r for topic, r in replies if topic == T.reply()]
    assert first.error.code is code, first
