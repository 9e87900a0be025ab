"""OpenAI's legacy text completions (``/v1/completions``): the translation on its own, then the
``openai`` package's ``completions.create`` against a real gateway, amqtt broker, hub and
llama-cpp node (SmolLM2)."""

from __future__ import annotations

import json

import openai
import pytest

from nova_swarm.broker.messages import Answer, StreamChunk, Usage
from nova_swarm.hub import completions_api
from nova_swarm.hub.openai_api import ApiError

from .test_openai_gateway import MODEL, Swarm, ahttp, engine, swarm  # noqa: F401  (fixtures)


def answer(text: str, finish: str = "stop") -> Answer:
    return Answer(
        id="r1",
        text=text,
        node_id="alpha",
        model=MODEL,
        finish_reason=finish,
        usage=Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6),
        timings=None,
        latency_ms=5.0,
        strategy="race",
        attempts=1,
    )


def test_request_translation() -> None:
    call = completions_api.completion_request(
        {
            "model": MODEL,
            "prompt": ["def add(a, b):"],
            "max_tokens": 16,
            "temperature": 0.2,
            "top_p": 0.5,
            "stop": "\n\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "echo": False,
            "suffix": "",
            "n": 1,
            "user": "someone",
        },
        known_models={MODEL},
    )
    req = call.request
    assert [(m.role, m.content) for m in req.chat()] == [("user", "def add(a, b):")]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop) == (16, 0.2, 0.5, ["\n\n"])
    assert req.stream and call.include_usage and call.ignored == ("user",)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prompt": [1, 2, 3]}, "token ids is not supported"),
        ({"prompt": [[1, 2]]}, "token ids is not supported"),
        ({"prompt": ["a", "b"]}, "one request each"),
        ({"prompt": "  "}, "'prompt' is empty"),
        ({"prompt": None}, "'prompt' must be a string"),
        ({"suffix": "return x"}, "'suffix'"),
        ({"echo": True}, "'echo'"),
        ({"n": 2}, "n=2"),
        ({"best_of": 3}, "'best_of'"),
        ({"logprobs": 5}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_requests(change: dict[str, object], words: str) -> None:
    body = {"model": MODEL, "prompt": "x", **change}
    with pytest.raises(ApiError) as caught:
        completions_api.completion_request({k: v for k, v in body.items() if v is not None})
    assert caught.value.status == 400 and words in caught.value.message


def test_response_shapes() -> None:
    done = openai.types.Completion.model_validate(completions_api.completion(answer("3", "length"), created=1))
    assert done.object == "text_completion" and done.choices[0].text == "3"
    assert done.choices[0].finish_reason == "length" and done.usage is not None and done.usage.total_tokens == 6

    writer = completions_api.CompletionChunks("r1", model=MODEL, created=1, include_usage=True)
    chunks = writer.opening() + writer.piece(StreamChunk(id="r1", seq=0, node_id="alpha", text="Hel"))
    chunks += writer.closing(answer("Hello"))  # the stream missed "lo"
    # OpenAI's own chunks carry finish_reason null until the last, which its SDK reads unvalidated
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, "stop"]
    assert openai.types.Completion.model_validate(chunks[-2]).choices[0].finish_reason == "stop"
    tail = openai.types.Completion.model_validate(chunks[-1])
    assert tail.choices == [] and tail.usage is not None and tail.usage.completion_tokens == 2
    with pytest.raises(ApiError, match="started over"):
        writer.piece(StreamChunk(id="r1", seq=1, node_id="beta", text="x", restart=True))


# ---------------------------------------------------------------- the openai package, end to end


@pytest.mark.llama
async def test_completion(swarm: Swarm) -> None:  # noqa: F811
    done = await swarm.client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16)
    assert done.id.startswith("cmpl-") and done.object == "text_completion" and done.model == MODEL
    assert done.choices[0].text.strip() and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens > 0

    with pytest.raises(openai.BadRequestError, match="suffix"):
        await swarm.client.completions.create(model=MODEL, prompt="def f(x):", suffix="    return y", max_tokens=8)
    status, _, body = await ahttp(
        f"{swarm.base}/v1/completions",
        method="POST",
        token=swarm.token,
        body=json.dumps({"model": MODEL, "prompt": [15496, 11]}).encode(),
    )
    assert status == 400 and "token ids" in json.loads(body)["error"]["message"]


@pytest.mark.llama
async def test_streamed_completion(swarm: Swarm) -> None:  # noqa: F811
    stream = await swarm.client.completions.create(
        model=MODEL,
        prompt="Write a very long story about a dragon who learns to bake bread.",
        max_tokens=96,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = []
    finishes = []
    usage = None
    async for chunk in stream:
        assert chunk.object == "text_completion"
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len([t for t in texts if t]) >= 5, texts
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    assert usage is not None and usage.completion_tokens > 0
