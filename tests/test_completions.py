"""OpenAI's legacy text completions (``/v1/completions``): the translation on its own, then the
``openai`` package's ``completions.create`` against a real gateway, amqtt broker, hub and
llama-cpp node (SmolLM2), whose text must be llama-cpp's own raw continuation of the prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from nova_swarm.broker.contract.messages import Answer, StreamChunk, Usage
from nova_swarm.hub import completions_api
from nova_swarm.hub.api_errors import ApiError

from .conftest import bundled_model_path
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
    # the text as it is, to be continued: no chat turn
    assert (req.kind, req.prompt, req.messages) == ("complete", "def add(a, b):", None)
    assert call.echo == ""
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
        ({"echo": "yes"}, "'echo'"),
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


def test_echo_puts_the_prompt_before_the_continuation() -> None:
    call = completions_api.completion_request({"model": MODEL, "prompt": "def f(x):", "echo": True})
    assert call.echo == "def f(x):" and call.request.prompt == "def f(x):"
    whole = completions_api.completion(answer("\n    return x"), created=1, echo=call.echo)
    assert whole["choices"][0]["text"] == "def f(x):\n    return x"

    writer = completions_api.CompletionChunks("r1", model=MODEL, created=1, echo=call.echo)
    chunks = writer.opening() + writer.piece(StreamChunk(id="r1", seq=0, node_id="alpha", text="\n    "))
    chunks += writer.closing(answer("\n    return x"))
    assert [c["choices"][0]["text"] for c in chunks] == ["def f(x):", "\n    ", "return x"]
    # without echo nothing comes before the continuation
    assert completions_api.CompletionChunks("r1", model=MODEL, created=1).opening() == []


# ---------------------------------------------------------------- the openai package, end to end

CODE = "def fibonacci(n):"


@pytest.fixture(scope="module")
def reference() -> Iterator[Any]:
    """llama-cpp itself, in the test process, on the same model: what a raw continuation is."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(bundled_model_path()), n_ctx=2048, n_threads=2, verbose=False)
    yield llm
    llm.close()


def greedy(reference: Any, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """Text, finish reason and completion tokens of llama-cpp's greedy continuation."""
    done = reference.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=0.0)
    choice = done["choices"][0]
    return str(choice["text"]), str(choice["finish_reason"]), int(done["usage"]["completion_tokens"])


@pytest.mark.llama
async def test_a_completion_continues_the_prompt_as_llama_cpp_does(swarm: Swarm, reference: Any) -> None:  # noqa: F811
    expected, finish, tokens = greedy(reference, CODE, 24)
    assert expected.strip()  # the model has something to say, or the comparison proves nothing

    done = await swarm.client.completions.create(model=MODEL, prompt=CODE, temperature=0, max_tokens=24)
    text = done.choices[0].text
    assert text == expected, (text, expected)
    assert done.choices[0].finish_reason == finish
    assert done.usage is not None and done.usage.completion_tokens == tokens
    # a chat reply would not go on with the function's body, nor talk about it
    assert not text.lstrip().lower().startswith(("sure", "here", "certainly", "the ", "to "))

    stream = await swarm.client.completions.create(model=MODEL, prompt=CODE, temperature=0, max_tokens=24, stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1

    echoed = await swarm.client.completions.create(model=MODEL, prompt=CODE, temperature=0, max_tokens=24, echo=True)
    assert echoed.choices[0].text == CODE + expected
    stream = await swarm.client.completions.create(
        model=MODEL, prompt=CODE, temperature=0, max_tokens=24, echo=True, stream=True
    )
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert pieces[0] == CODE and "".join(pieces) == CODE + expected


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
        # a text to continue (the prompt is not a chat turn): a story's first words
        prompt="Once upon a time, in a small village at the foot of a mountain, there lived a dragon who",
        max_tokens=96,
        temperature=0.7,
        seed=7,
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
