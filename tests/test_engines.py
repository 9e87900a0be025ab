"""The engines themselves: the real llama-cpp engine on the bundled SmolLM2, and the fake one
held to the same contract (streaming, stopping, embeddings) where it makes one."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from nova_swarm.broker.contract.errors import EngineError
from nova_swarm.broker.contract.messages import FunctionDef, NamedFunction, NamedToolChoice, Tool, ToolCallDelta
from nova_swarm.node import tools
from nova_swarm.node.engine import COMPLETE, EMBED, JSON_SCHEMA, STREAM, TOOLS, Engine, Sampling
from nova_swarm.node.fake import FakeEngine
from nova_swarm.node.llama import LlamaEngine, unsupported

from .conftest import bundled_model_path

POEM = [{"role": "user", "content": "Write a long poem about the sea and its ships."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def never() -> bool:
    return False


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaEngine]:
    engine = LlamaEngine(model_path=bundled_model_path(), ctx=1024, threads=2)
    yield engine
    engine.close()


@pytest.fixture(params=["llama", "fake"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The same contract test over the real engine and the fake."""
    if request.param == "llama":
        request.applymarker(pytest.mark.llama)
        real: Engine = request.getfixturevalue("llama")
        return real
    return FakeEngine(reply=" ".join(f"word{i}" for i in range(40)))


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in vector))


def cos(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- both engines


def test_streamed_pieces_join_to_the_text(engine: Engine) -> None:
    pieces: list[str] = []
    gen = engine.generate(POEM, Sampling(max_tokens=24, temperature=0.0), never, on_text=pieces.append)
    assert len(pieces) > 5 and all(pieces)
    assert "".join(pieces) == gen.text
    assert gen.completion_tokens >= len(pieces) - 1 and not gen.stopped


def test_should_stop_ends_a_stream_between_tokens(engine: Engine) -> None:
    pieces: list[str] = []
    gen = engine.generate(
        POEM, Sampling(max_tokens=200, temperature=0.0), lambda: len(pieces) >= 3, on_text=pieces.append
    )
    assert gen.stopped and len(pieces) == 3 and gen.text == "".join(pieces)


def test_embed_gives_unit_vectors_and_equal_texts_equal_vectors(engine: Engine) -> None:
    out = engine.embed(["a red apple", "a blue car", "a red apple"])
    assert len(out.vectors) == 3 and len({len(v) for v in out.vectors}) == 1
    assert all(abs(norm(v) - 1.0) < 1e-5 for v in out.vectors)
    # llama.cpp's sums are not bit-for-bit repeatable within a batch: equal up to float noise
    assert cos(out.vectors[0], out.vectors[2]) > 1 - 1e-6
    assert cos(out.vectors[0], out.vectors[1]) < 0.99
    assert out.prompt_tokens >= 6 and out.embed_s >= 0


def test_the_fake_ignores_the_schema_and_reports_its_capabilities() -> None:
    fake = FakeEngine(reply="not json at all", dimension=5, capabilities=frozenset({STREAM}))
    gen = fake.generate(POEM, Sampling(max_tokens=10, temperature=0.0), never, schema=PERSON)
    assert gen.text == "not json at all"
    assert fake.info.capabilities == {STREAM}
    with pytest.raises(EngineError):
        fake.embed(["x"])
    assert len(FakeEngine(dimension=5).embed(["x"]).vectors[0]) == 5
    assert FakeEngine().info.capabilities == {STREAM, EMBED, JSON_SCHEMA, TOOLS, COMPLETE}


# ---------------------------------------------------------------- llama-cpp


@pytest.mark.llama
def test_llama_capabilities(llama: LlamaEngine) -> None:
    assert llama.info.capabilities == {STREAM, EMBED, JSON_SCHEMA, TOOLS, COMPLETE}


@pytest.mark.llama
def test_a_json_schema_constrains_the_output(llama: LlamaEngine) -> None:
    ask = [{"role": "user", "content": "Describe a made-up person."}]
    for seed in (1, 2, 3):
        pieces: list[str] = []
        gen = llama.generate(
            ask, Sampling(max_tokens=80, temperature=0.8, seed=seed), never, schema=PERSON, on_text=pieces.append
        )
        assert gen.finish_reason == "stop", gen.text
        jsonschema.validate(json.loads(gen.text), PERSON)
        assert "".join(pieces) == gen.text
    # Unconstrained, the same model does not answer with that JSON.
    free = llama.generate(ask, Sampling(max_tokens=40, temperature=0.0), never)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(free.text), PERSON)


@pytest.mark.llama
def test_properties_come_in_the_schema_s_order(llama: LlamaEngine) -> None:
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}}}
    schema["required"] = ["zeta", "alpha"]
    ask = [{"role": "user", "content": "Give two small numbers."}]
    gen = llama.generate(ask, Sampling(max_tokens=60, temperature=0.0), never, schema=schema)
    assert list(json.loads(gen.text)) == ["zeta", "alpha"]


@pytest.mark.llama
@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "object", "not": {"required": ["a"]}}, "'not'"),
        ({"type": "object", "properties": {"a": {"if": {"type": "string"}}}}, "schema.properties.a uses 'if'"),
        ({"$ref": "https://example.com/s.json"}, "only local references"),
        ({"type": "no-such-type"}, "no-such-type"),
        ({"type": ["object", "null"], "properties": {"a": {"type": "string"}}}, "use anyOf"),
    ],
)
def test_a_schema_the_grammar_cannot_follow_is_an_engine_error(
    llama: LlamaEngine, schema: dict[str, Any], named: str
) -> None:
    with pytest.raises(EngineError, match="schema") as caught:
        llama.generate(POEM, Sampling(max_tokens=5, temperature=0.0), never, schema=schema)
    assert named in str(caught.value)


def test_property_names_that_are_keywords_are_not_mistaken_for_them() -> None:
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"enum": ["not"]}}}
    assert unsupported(schema) is None
    assert unsupported({"anyOf": [{"type": "string"}, {"contains": {}}]}) == (
        "schema.anyOf[1] uses 'contains', which the grammar cannot enforce"
    )


@pytest.mark.llama
def test_grammars_are_cached_and_the_cache_is_bounded(llama: LlamaEngine) -> None:
    sampling = Sampling(max_tokens=3, temperature=0.0)
    llama.generate(POEM, sampling, never, schema=PERSON)
    first = llama._grammars[json.dumps(PERSON, separators=(",", ":"))]
    llama.generate(POEM, sampling, never, schema=json.loads(json.dumps(PERSON, indent=2)))
    assert llama._grammars[json.dumps(PERSON, separators=(",", ":"))] is first
    for n in range(40):
        llama.generate(POEM, Sampling(max_tokens=1, temperature=0.0), never, schema={"enum": [n]})
    assert len(llama._grammars) == 32 and first not in llama._grammars.values()


@pytest.mark.llama
def test_embedding_a_paraphrase_is_closer_than_an_unrelated_text(llama: LlamaEngine) -> None:
    triples = [
        ("The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply today."),
        ("How do I reset my password?", "What are the steps to change my password?", "Add two cups of flour."),
        ("It is raining heavily in London.", "Heavy rain is falling in London.", "Quantum computers use qubits."),
    ]
    for text, paraphrase, unrelated in triples:
        a, b, c = llama.embed([text, paraphrase, unrelated]).vectors
        assert len(a) == llama._llm.n_embd()
        assert cos(a, b) > max(cos(a, c), cos(b, c)) + 0.05, (text, cos(a, b), cos(a, c), cos(b, c))


@pytest.mark.llama
def test_a_text_longer_than_the_context_is_refused(llama: LlamaEngine) -> None:
    with pytest.raises(EngineError, match="text 1 has .* tokens, more than the context of 1024"):
        llama.embed(["short", "word " * 1500])


@pytest.mark.llama
def test_embedding_while_generating_uses_its_own_context(llama: LlamaEngine) -> None:
    alone = llama.embed(["a quiet harbour"]).vectors[0]
    started = threading.Event()
    out: list[list[float]] = []

    def on_text(_piece: str) -> None:
        if not started.is_set():
            started.set()
            embedder = threading.Thread(target=lambda: out.append(llama.embed(["a quiet harbour"]).vectors[0]))
            embedder.start()
            embedder.join(30)  # would deadlock if embedding waited for the generation's lock

    llama.generate(POEM, Sampling(max_tokens=5, temperature=0.0), never, on_text=on_text)
    assert out == [alone]


@pytest.mark.llama
def test_an_engine_without_embeddings_refuses_them() -> None:
    engine = LlamaEngine(model_path=bundled_model_path(), ctx=256, threads=1, embeddings=False)
    try:
        assert EMBED not in engine.info.capabilities
        with pytest.raises(EngineError, match="without embeddings"):
            engine.embed(["x"])
    finally:
        engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.generate(POEM, Sampling(max_tokens=1, temperature=0.0), never)


@pytest.mark.llama
def test_a_forced_tool_call_gives_valid_arguments_that_streamed(llama: LlamaEngine) -> None:
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    }
    weather = Tool(function=FunctionDef(name="get_forecast", description="Weather forecast", parameters=parameters))
    other = Tool(function=FunctionDef(name="get_time"))
    ask = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days, in celsius?"}]
    choice = NamedToolChoice(function=NamedFunction(name="get_forecast"))
    the_plan = tools.plan(ask, tools=[weather, other], tool_choice=choice, response_schema=None)
    decoder = the_plan.decoder()
    deltas: list[ToolCallDelta] = []
    streamed_text: list[str] = []

    def on_text(piece: str) -> None:
        text, calls = decoder.feed(piece)
        streamed_text.append(text)
        deltas.extend(calls)

    gen = llama.generate(
        the_plan.messages, Sampling(max_tokens=80, temperature=0.0), never, schema=the_plan.schema, on_text=on_text
    )
    outcome = decoder.finish(gen.text, finish_reason=gen.finish_reason)
    deltas += outcome.tail_calls
    assert outcome.finish_reason == "tool_calls" and outcome.problem is None, gen.text
    [call] = outcome.tool_calls
    assert call.function.name == "get_forecast" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), parameters)
    assert "".join(streamed_text) == outcome.content == ""
    assert len(deltas) > 3 and deltas[0].id == call.id and deltas[0].function.name == "get_forecast"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments


@pytest.mark.llama
def test_a_required_choice_among_several_tools_gives_a_known_call(llama: LlamaEngine) -> None:
    tool_list = [
        Tool(
            function=FunctionDef(
                name=name,
                parameters={
                    "type": "object",
                    "properties": {"query": {"type": "string", "maxLength": 30}},
                    "required": ["query"],
                },
            )
        )
        for name in ("search_web", "search_mail")
    ]
    the_plan = tools.plan(POEM, tools=tool_list, tool_choice="required", response_schema=None)
    gen = llama.generate(the_plan.messages, Sampling(max_tokens=60, temperature=0.0), never, schema=the_plan.schema)
    outcome = the_plan.decoder().finish(gen.text, finish_reason=gen.finish_reason)
    assert outcome.problem is None, gen.text
    [call] = outcome.tool_calls
    assert call.function.name in ("search_web", "search_mail")
    jsonschema.validate(json.loads(call.function.arguments), tool_list[0].function.parameters)
