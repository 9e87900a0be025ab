from __future__ import annotations

import pytest

from nova_swarm.broker.contract.errors import ErrorCode, ProtocolError
from nova_swarm.broker.contract.messages import (
    Answer,
    ErrorInfo,
    ErrorReply,
    PromptRequest,
    TaskResult,
    decode,
    decode_reply,
)


def test_prompt_needs_exactly_one_of_prompt_or_messages() -> None:
    with pytest.raises(ProtocolError, match="exactly one"):
        decode(PromptRequest, b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}')
    with pytest.raises(ProtocolError, match="exactly one"):
        decode(PromptRequest, b"{}")
    req = decode(
        PromptRequest, b'{"messages": [{"role": "user", "content": "b"}], "tags": ["x"], "params": {"tags": ["y"]}}'
    )
    assert req.chat()[0].content == "b"
    assert req.all_tags() == ("x", "y")


def test_unknown_fields_are_refused_not_ignored() -> None:
    with pytest.raises(ProtocolError, match="promt"):
        decode(PromptRequest, b'{"promt": "typo"}')


def test_task_result_error_iff_not_ok() -> None:
    with pytest.raises(ProtocolError):
        decode(TaskResult, b'{"task_id": "t", "request_id": "r", "node_id": "n", "ok": false}')
    ok = TaskResult(task_id="t", request_id="r", node_id="n", ok=True, text="hi")
    assert decode(TaskResult, ok.encode()) == ok


def test_replies_decode_to_the_right_type() -> None:
    err = ErrorReply(id="r", error=ErrorInfo(code=ErrorCode.BAD_JSON, message="x"))
    assert decode_reply(err.encode()) == err
    ans = Answer(
        id="r",
        text="4",
        node_id="n",
        model="m",
        finish_reason="stop",
        usage=None,
        timings=None,
        latency_ms=1.0,
        strategy="race",
        attempts=1,
    )
    assert decode_reply(ans.encode()) == ans
