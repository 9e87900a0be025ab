"""Every kind of bad input gets its own stable error code (pure parsing; the live hub is
exercised the same way in test_hub.py)."""

from __future__ import annotations

import pytest

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.link.base import Message
from nova_swarm.hub.intake import Accepted, Limits, Rejected, default_max_tokens, parse_prompt, split_key

T = Topics("main")
LIMITS = Limits(max_payload_bytes=4096, max_prompt_chars=100)


def parse(payload: bytes, topic: str = T.prompt(), **props: object) -> Accepted | Rejected:
    return parse_prompt(Message(topic, payload, 1, False, **props), T, LIMITS)  # type: ignore[arg-type]


def test_plain_text_is_a_prompt_answered_on_the_default_topic() -> None:
    out = parse("What is 2+2? 🙂".encode())
    assert isinstance(out, Accepted)
    assert out.request.prompt == "What is 2+2? 🙂"
    assert out.reply_topic == "swarm/main/reply/default"
    assert len(out.request_id) == 32


def test_json_request_keeps_its_id_and_reply_topic() -> None:
    out = parse(
        b'{"id": "a-1", "prompt": "hi", "reply_to": "swarm/main/reply/me", "strategy": "best_of_n", "fanout": 2}',
        T.prompt("me"),
    )
    assert isinstance(out, Accepted)
    assert (out.request_id, out.reply_topic, out.request.fanout) == ("a-1", "swarm/main/reply/me", 2)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"prompt": "hi"', ErrorCode.BAD_JSON),
        (b"{" * 5000, ErrorCode.PAYLOAD_TOO_LARGE),
        (b"\xff\xfe bad", ErrorCode.BAD_ENCODING),
        (b"   \n ", ErrorCode.EMPTY_PROMPT),
        (b'{"prompt": "   "}', ErrorCode.INVALID_REQUEST),
        (b'{"prompt": "hi", "temperature": 0.5}', ErrorCode.UNKNOWN_FIELD),
        (b'{"prompt": "hi", "fanout": 0}', ErrorCode.INVALID_REQUEST),
        (b'{"prompt": "hi", "fanout": 99}', ErrorCode.FANOUT_TOO_LARGE),
        (b'{"prompt": "hi", "params": {"max_tokens": 100000}}', ErrorCode.MAX_TOKENS_TOO_LARGE),
        (b'{"prompt": "hi", "strategy": "vote"}', ErrorCode.INVALID_REQUEST),
        (b'{"prompt": 42}', ErrorCode.INVALID_REQUEST),
        (b'{"prompt": "' + b"x" * 101 + b'"}', ErrorCode.PROMPT_TOO_LARGE),
        (b"y" * 101, ErrorCode.PROMPT_TOO_LARGE),
        (b'{"prompt": "hi", "reply_to": "swarm/main/node/a/task"}', ErrorCode.BAD_REPLY_TO),
    ],
)
def test_bad_input_gets_a_stable_code(payload: bytes, code: ErrorCode) -> None:
    out = parse(payload)
    assert isinstance(out, Rejected), out
    assert out.error.code is code, out.error
    assert out.error.message


def test_deep_json_is_refused_not_crashed() -> None:
    deep = b'{"prompt": "hi", "params": ' + b'{"a":' * 1500 + b"1" + b"}" * 1500 + b"}"
    out = parse_prompt(Message(T.prompt(), deep, 1, False), T, Limits())
    assert isinstance(out, Rejected)
    assert out.error.code is ErrorCode.INVALID_REQUEST
    assert "1501 levels deep" in out.error.message


def test_a_refusal_goes_to_the_senders_reply_topic_when_readable() -> None:
    out = parse(b'{"id": "x1", "prompt": "hi", "bogus": 1, "reply_to": "swarm/main/reply/me"}', T.prompt("me"))
    assert isinstance(out, Rejected)
    assert (out.request_id, out.reply_topic, out.error.code) == ("x1", "swarm/main/reply/me", ErrorCode.UNKNOWN_FIELD)


def test_a_refusal_carries_the_id_the_client_sent_and_none_when_it_sent_none() -> None:
    # Refused after parsing (its schema, its length): an id made up by the hub names nothing the
    # client knows. Found by test_fuzz.
    schema = b'"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}'
    for body, expected in (
        (b'{"prompt": "hi", ' + schema + b"}", None),
        (b'{"id": "s1", "prompt": "hi", ' + schema + b"}", "s1"),
    ):
        out = parse(body)
        assert isinstance(out, Rejected) and out.error.code is ErrorCode.INVALID_REQUEST
        assert out.request_id == expected
    long = parse(("x" * 101).encode())  # plain text over the prompt limit
    assert isinstance(long, Rejected) and long.error.code is ErrorCode.PROMPT_TOO_LARGE and long.request_id is None


def test_mqtt5_response_topic_and_correlation_are_honoured_and_checked() -> None:
    out = parse(b"hi", T.prompt("r5"), response_topic="swarm/main/reply/r5", correlation_data=b"c1")
    assert isinstance(out, Accepted) and (out.reply_topic, out.correlation) == ("swarm/main/reply/r5", b"c1")
    bad = parse(b"hi", response_topic="swarm/main/hub/status", correlation_data=b"c2")
    assert isinstance(bad, Rejected) and bad.error.code is ErrorCode.BAD_REPLY_TO
    assert (bad.reply_topic, bad.correlation) == ("swarm/main/reply/default", b"c2")


def test_the_sending_login_is_the_scope_and_bounds_the_reply_topic() -> None:
    mine = parse(b'{"id": "q", "prompt": "hi", "reply_to": "swarm/main/reply/alice/deep"}', T.prompt("alice"))
    assert isinstance(mine, Accepted) and (mine.scope, mine.key) == ("alice", "alice/q")
    assert parse(b"hi", T.prompt("alice")).reply_topic == "swarm/main/reply/alice"  # type: ignore[union-attr]
    # Another login's reply topic, or the shared one from a login's own scope: refused, and
    # the refusal goes to the sender's own reply topic, never to the one it named.
    for topic, reply_to, own in [
        (T.prompt("mallory"), "swarm/main/reply/alice", "swarm/main/reply/mallory"),
        (T.prompt(), "swarm/main/reply/alice", "swarm/main/reply/default"),
        (T.prompt("mallory"), "swarm/main/reply/alicex", "swarm/main/reply/mallory"),
    ]:
        out = parse(b'{"id": "q", "prompt": "hi", "reply_to": "%s"}' % reply_to.encode(), topic)
        assert isinstance(out, Rejected) and out.error.code is ErrorCode.BAD_REPLY_TO
        assert (out.reply_topic, out.request_id) == (own, "q")
    out = parse(b"hi", T.prompt("mallory"), response_topic="swarm/main/reply/alice")
    assert isinstance(out, Rejected) and out.reply_topic == "swarm/main/reply/mallory"
    # The shared scope keys ids as they always were, so an old journal reads as its own.
    shared = parse(b'{"id": "q", "prompt": "hi"}')
    assert isinstance(shared, Accepted) and shared.key == "q"
    assert split_key("alice/q") == ("alice", "q") and split_key("q") == ("default", "q")


def test_default_length_fits_the_deadline() -> None:
    # no max_tokens: the hub's cap, unless the node's speed says the answer would outrun the
    # deadline and be lost; then as much as fits, in 80% of the time left
    assert default_max_tokens(4096, None, 120.0) == 4096
    assert default_max_tokens(4096, 0.0, 120.0) == 4096
    assert default_max_tokens(4096, 100.0, 120.0) == 4096
    assert default_max_tokens(4096, 5.0, 120.0) == 480
    assert default_max_tokens(300, 5.0, 120.0) == 300
    assert default_max_tokens(4096, 5.0, 0.0) == 1
