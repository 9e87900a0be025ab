"""Retrieval: real files in a temporary folder, indexed and searched with TF-IDF and embeddings."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import ChatMessage
from nova_swarm.hub.retrieval import (
    EMBED_BATCH,
    RetrievalConfig,
    Retriever,
    Snippet,
    TfIdf,
    chunk_text,
    html_text,
    query_of,
    tokenize,
    with_context,
)

DOCS = {
    "garden.md": "Tomatoes need full sun and deep watering twice a week. Prune the suckers for bigger fruit.",
    "cooking/bread.txt": "Knead the dough for ten minutes, then let it rise until doubled. Bake the bread at 220 C.",
    "cooking/soup.md": "A good soup starts with onions sweated in butter. Add stock and simmer for an hour.",
    "network/mqtt.rst": "The broker keeps retained messages per topic. A client subscribes with a QoS level.",
    "bikes.txt": "Oil the bike chain monthly and check the tyre pressure before every long ride.",
}


def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    for name, body in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(body, bytes):
            path.write_bytes(body)
        else:
            path.write_text(body, encoding="utf-8")
    return folder


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return write(tmp_path / "docs", dict(DOCS))


class HashEmbedder:
    """Bag-of-words hashed into a fixed number of dimensions, deterministic across runs.

    It only stands in for the swarm's embeddings to test the ranking plumbing (batching,
    cosine ranking, falling back); the real path, a node's model answering ``kind: "embed"``
    requests, is tested end to end elsewhere. ``fail`` makes every call raise ``RequestFailed``
    as the hub's client does when no node can embed.
    """

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []
        self.fail = False

    def vector(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for word in re.findall(r"\w+", text.lower()):
            vec[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % self.dim] += 1.0
        return vec

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        if self.fail:
            raise RequestFailed(ErrorCode.NO_ELIGIBLE_NODES, "no online node offers embeddings")
        return [self.vector(t) for t in texts]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ---------------------------------------------------------------- config


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        RetrievalConfig(folder=tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        RetrievalConfig(folder=tmp_path / "file.txt")
    for field in ("top_k", "chunk_chars", "max_files", "max_file_bytes"):
        with pytest.raises(ConfigError, match=f"{field} must be a whole number of at least 1, not 0"):
            RetrievalConfig(folder=tmp_path, **{field: 0})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not -3"):
        RetrievalConfig(folder=tmp_path, top_k=-3)
    with pytest.raises(ConfigError, match="non-empty"):
        RetrievalConfig(folder=tmp_path, suffixes=())
    with pytest.raises(ConfigError, match="'md'"):
        RetrievalConfig(folder=tmp_path, suffixes=(".txt", "md"))
    config = RetrievalConfig(folder=str(tmp_path), suffixes=(".TXT",))  # type: ignore[arg-type]
    assert config.folder == tmp_path and config.suffixes == (".txt",)


# ---------------------------------------------------------------- tokenising and chunking


def test_tokenize_is_unicode_aware_and_drops_stopwords_and_short_tokens() -> None:
    assert tokenize("The Café in Zürich is a 24h place, x y_z") == ["café", "zürich", "24h", "place"]
    assert tokenize("Пример текста на русском") == ["пример", "текста", "на", "русском"]


def test_chunks_stay_within_chunk_chars_on_boundaries_and_overlap() -> None:
    paragraphs = [f"Paragraph {p} " + " ".join(f"w{p}x{i}" for i in range(12)) for p in range(30)]
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text, 200)
    assert len(chunks) > 5
    assert all(0 < len(c) <= 200 for c in chunks)
    # paragraphs this size are never cut: each is whole in some snippet
    assert all(any(p in c for c in chunks) for p in paragraphs)
    # each snippet but the first starts with words from the end of the one before
    for before, after in zip(chunks, chunks[1:], strict=False):
        first_word = after.split()[0]
        assert first_word in before.split()[-8:], (before, after)


def test_chunks_cut_long_lines_between_words_and_long_words_into_slices() -> None:
    words = [f"word{i:03d}" for i in range(200)]
    chunks = chunk_text(" ".join(words), 100)
    assert all(len(c) <= 100 for c in chunks)
    assert {w for c in chunks for w in c.split()} == set(words)  # no word cut or lost
    huge = "z" * 250
    sliced = chunk_text(huge, 100)
    assert all(len(c) <= 100 for c in sliced) and "".join(sliced).count("z") >= 250
    assert chunk_text("short\n\n\n   \n", 1) == ["s", "h", "o", "r", "t"]
    assert chunk_text("", 100) == []


def test_html_loses_markup_scripts_and_styles() -> None:
    page = "<html><head><title>T</title><style>p{}</style></head><body><h1>Solar &amp; wind</h1>"
    page += "<script>var x = 1;</script><p>Panels on the <b>roof</b>.</p></body></html>"
    assert html_text(page) == "Solar & wind\n\nPanels on the roof."


async def test_snippets_keep_their_source_and_the_size_limit(tmp_path: Path) -> None:
    long = "\n\n".join(f"Section {i}: the quick brown fox number {i} jumps over the lazy dog." for i in range(40))
    folder = write(tmp_path / "d", {"deep/nested/long.md": long, "short.txt": "A single short note."})
    retriever = await Retriever.build(RetrievalConfig(folder=folder, chunk_chars=150), None)
    hits = await retriever.search("fox number 17")
    assert hits[0].source == "deep/nested/long.md" and "number 17 " in hits[0].text
    assert len(hits[0].text) <= 150
    assert retriever.size > 10
    assert [s.source for s in await retriever.search("single short note")][0] == "short.txt"


# ---------------------------------------------------------------- reading the folder


async def test_binary_undecodable_large_hidden_and_foreign_files_are_skipped_with_a_reason(tmp_path: Path) -> None:
    folder = write(
        tmp_path / "d",
        {
            "good.md": "Sourdough starter needs feeding daily.",
            "binary.txt": b"PK\x03\x04\x00\x00sourdough" + bytes(range(256)),
            "latin1.md": "Sourdough café crème".encode("latin-1"),
            "huge.txt": "sourdough " * 200,
            "picture.png": "sourdough",
            ".git/notes.txt": "sourdough",
            ".hidden.md": "sourdough",
        },
    )
    with capture_logs() as logs:
        retriever = await Retriever.build(RetrievalConfig(folder=folder, max_file_bytes=1000), None)
    skipped = {e["source"]: e["reason"] for e in logs if e["event"] == "retrieval skipped file"}
    assert skipped == {"binary.txt": "binary", "latin1.md": "not UTF-8 text", "huge.txt": "too large"}
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "retrieval skipped file")
    assert [s.source for s in await retriever.search("sourdough")] == ["good.md"]
    assert retriever.size == 1


async def test_max_files_caps_the_index_and_says_so(tmp_path: Path) -> None:
    folder = write(tmp_path / "d", {f"n{i}.txt": f"note number {i} about kites" for i in range(5)})
    with capture_logs() as logs:
        retriever = await Retriever.build(RetrievalConfig(folder=folder, max_files=3, top_k=10), None)
    assert sorted(s.source for s in await retriever.search("kites")) == ["n0.txt", "n1.txt", "n2.txt"]
    assert any(
        e["event"].startswith("retrieval folder has more files") and e["first_skipped"] == "n3.txt" for e in logs
    )


async def test_an_empty_folder_gives_an_empty_index(tmp_path: Path) -> None:
    retriever = await Retriever.build(RetrievalConfig(folder=tmp_path), HashEmbedder())
    assert retriever.size == 0 and await retriever.search("anything") == []


# ---------------------------------------------------------------- TF-IDF


async def test_tfidf_finds_the_right_snippet_among_several_documents(docs: Path) -> None:
    retriever = await Retriever.build(RetrievalConfig(folder=docs, top_k=2), None)
    assert retriever.mode == "tfidf" and retriever.size == len(DOCS)
    cases = {
        "How often should I water tomatoes?": "garden.md",
        "what temperature to bake bread": "cooking/bread.txt",
        "Does the broker keep retained messages?": "network/mqtt.rst",
        "tyre pressure for a ride": "bikes.txt",
        "SOUP with onions": "cooking/soup.md",
    }
    for query, source in cases.items():
        hits = await retriever.search(query)
        assert hits and hits[0].source == source, (query, hits)
        assert len(hits) <= 2 and all(h.score > 0 for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert 0 < hits[0].score <= 1.0 + 1e-9


async def test_tfidf_returns_nothing_rather_than_unrelated_snippets(docs: Path) -> None:
    retriever = await Retriever.build(RetrievalConfig(folder=docs, top_k=5), None)
    assert await retriever.search("the of and is it") == []  # stopwords only
    assert await retriever.search("quantum chromodynamics") == []
    assert await retriever.search("   ") == []
    assert [h.source for h in await retriever.search("bread")] == ["cooking/bread.txt"]


def test_tfidf_term_frequency_is_sublinear_and_scores_are_cosines() -> None:
    index = TfIdf(["solar solar solar solar wind", "tidal", "tidal"])
    tf = 1 + math.log(4)  # "solar" four times; "wind" once weighs 1, and both share one idf
    assert index.scores("solar") == {0: pytest.approx(tf / math.sqrt(tf * tf + 1))}
    assert index.scores("tidal tidal") == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert index.scores("unknown words") == {}


async def test_tfidf_weighs_rare_words_above_common_ones(tmp_path: Path) -> None:
    # without idf the two kinds of note would tie on "battery thermal"
    common = {f"c{i}.txt": "battery status" for i in range(6)}
    folder = write(tmp_path / "d", {**common, "rare.txt": "thermal runaway"})
    retriever = await Retriever.build(RetrievalConfig(folder=folder, top_k=3), None)
    hits = await retriever.search("battery thermal")
    assert hits[0].source == "rare.txt" and hits[0].score > hits[1].score


# ---------------------------------------------------------------- embeddings


async def test_embeddings_rank_by_cosine_and_embed_in_batches(tmp_path: Path) -> None:
    files = {f"filler/{i:02d}.txt": f"filler note {i} about nothing in particular" for i in range(40)}
    folder = write(tmp_path / "d", {**files, **DOCS})
    embed = HashEmbedder()
    retriever = await Retriever.build(RetrievalConfig(folder=folder, top_k=3), embed)
    assert retriever.mode == "embeddings" and retriever.size == 45
    assert [len(batch) for batch in embed.calls] == [EMBED_BATCH, 45 - EMBED_BATCH]

    query = "deep watering for tomatoes in full sun"
    hits = await retriever.search(query)
    assert embed.calls[-1] == [query]  # the query went through the same embedder
    assert hits[0].source == "garden.md"
    # the scores are the embedder's cosines, not TF-IDF's
    assert hits[0].score == pytest.approx(cosine(embed.vector(query), embed.vector(DOCS["garden.md"])))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.score > 0 for h in hits)


async def test_embeddings_return_only_snippets_scoring_above_zero(docs: Path) -> None:
    retriever = await Retriever.build(RetrievalConfig(folder=docs, top_k=10), HashEmbedder())
    # the hashed vectors have no negative parts: the snippets sharing no word score exactly 0
    assert [h.source for h in await retriever.search("dough")] == ["cooking/bread.txt"]


async def test_embeddings_that_fail_at_build_fall_back_to_tfidf(docs: Path) -> None:
    embed = HashEmbedder()
    embed.fail = True
    with capture_logs() as logs:
        retriever = await Retriever.build(RetrievalConfig(folder=docs), embed)
    assert retriever.mode == "tfidf"
    [warning] = [e for e in logs if e["event"].startswith("retrieval cannot embed its snippets")]
    assert "no online node offers embeddings" in warning["error"] and warning["log_level"] == "warning"
    calls = len(embed.calls)
    assert (await retriever.search("bake bread"))[0].source == "cooking/bread.txt"
    assert len(embed.calls) == calls  # a fallen-back index does not keep asking the swarm


async def test_embeddings_that_fail_at_query_time_use_tfidf_for_that_query(docs: Path) -> None:
    embed = HashEmbedder()
    retriever = await Retriever.build(RetrievalConfig(folder=docs), embed)
    tfidf = await Retriever.build(RetrievalConfig(folder=docs), None)
    query = "retained messages on a topic"
    by_embeddings = await retriever.search(query)

    embed.fail = True
    with capture_logs() as logs:
        fallback = await retriever.search(query)
    assert fallback == await tfidf.search(query) and fallback[0].source == "network/mqtt.rst"
    assert fallback != by_embeddings  # same winner, other scores: it really was ranked another way
    assert any(e["event"].startswith("retrieval cannot embed the query") for e in logs)
    assert retriever.mode == "embeddings"

    embed.fail = False  # the next query uses the embeddings again
    assert await retriever.search(query) == by_embeddings


async def test_an_embedder_answering_in_the_wrong_shape_counts_as_failing(docs: Path) -> None:
    async def short(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0]] * (len(texts) - 1)

    async def ragged(texts: list[str]) -> list[list[float]]:
        return [[1.0] * (2 + i % 2) for i in range(len(texts))]

    for embed in (short, ragged):
        with capture_logs() as logs:
            retriever = await Retriever.build(RetrievalConfig(folder=docs), embed)
        assert retriever.mode == "tfidf"
        assert any(e["event"].startswith("retrieval cannot embed its snippets") for e in logs)


async def test_a_query_vector_of_another_size_falls_back_to_tfidf(docs: Path) -> None:
    embed = HashEmbedder()
    retriever = await Retriever.build(RetrievalConfig(folder=docs), embed)
    embed.dim = 16  # as if the only embedding node now ran another model
    with capture_logs() as logs:
        hits = await retriever.search("oil the bike chain")
    assert hits[0].source == "bikes.txt"
    assert any(e["event"].startswith("retrieval cannot embed the query") for e in logs)


# ---------------------------------------------------------------- prompts


def msg(role: str, content: str) -> ChatMessage:
    return ChatMessage(role=role, content=content)  # type: ignore[arg-type]


SNIPPETS = [Snippet("a/one.md", "First snippet text.", 0.9), Snippet("two.txt", "Second snippet text.", 0.5)]


def test_with_context_adds_one_system_message_after_the_leading_system_messages() -> None:
    messages = [msg("system", "Be brief."), msg("user", "hi"), msg("assistant", "hello"), msg("user", "question")]
    out = with_context(messages, SNIPPETS)
    assert [m.role for m in out] == ["system", "system", "user", "assistant", "user"]
    assert out[0] == messages[0] and out[2:] == messages[1:]
    context = out[1].content
    assert "[1] source: a/one.md\nFirst snippet text." in context
    assert "[2] source: two.txt\nSecond snippet text." in context
    assert context.index("a/one.md") < context.index("two.txt")  # best first, as given
    assert "relevant" in context
    assert len(messages) == 4  # the caller's list is not touched


def test_with_context_without_a_system_message_puts_it_first_and_with_only_system_last() -> None:
    out = with_context([msg("user", "q")], SNIPPETS)
    assert [m.role for m in out] == ["system", "user"]
    out = with_context([msg("system", "a"), msg("system", "b")], SNIPPETS[:1])
    assert [m.content for m in out[:2]] == ["a", "b"] and "a/one.md" in out[2].content


def test_with_context_leaves_messages_unchanged_without_snippets() -> None:
    messages = [msg("system", "s"), msg("user", "q")]
    out = with_context(messages, [])
    assert out == messages and out is not messages


def test_query_of_is_the_last_user_message() -> None:
    messages = [msg("system", "s"), msg("user", "first"), msg("assistant", "a"), msg("user", "  second \n")]
    assert query_of(messages) == "second"
    assert query_of([*messages, msg("assistant", "answer")]) == "second"
    assert query_of([msg("system", "only")]) == ""
    assert query_of([]) == ""
