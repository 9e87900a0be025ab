"""The request journal on its own: what survives a crash, and what is pruned."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nova_swarm.broker.contract.messages import PromptRequest
from nova_swarm.hub.journal import Entry, Journal, JournalWriter, digest


def entry(rid: str, at: float = 100.0) -> Entry:
    req = PromptRequest(id=rid, prompt=f"question {rid}")
    return Entry(rid, digest(req), req.model_dump_json(), f"swarm/main/reply/{rid}", None, at, at + 60)


def test_rows_move_from_accepted_to_settled_to_sent(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "hub.sqlite")
    journal.write([entry("a"), entry("b"), entry("c")], [], [])
    journal.write([], [("a", b"reply-a", 101.0), ("b", b"reply-b", 102.0)], ["a"])
    journal.close()

    reopened = Journal(tmp_path / "hub.sqlite")  # as a restarted hub sees it
    assert [e.request_id for e in reopened.unfinished()] == ["c"]
    assert PromptRequest.model_validate_json(reopened.unfinished()[0].request).prompt == "question c"
    assert [(u.request_id, u.reply) for u in reopened.unsent()] == [("b", b"reply-b")]
    assert reopened.reply("a") == b"reply-a"
    assert [rid for rid, _ in reopened.recent(since=0.0, limit=10)] == ["a", "b"]
    # Only sent rows older than the cut are pruned; an unsent reply is kept until it goes out.
    assert reopened.prune(before=1000.0) == 1
    assert reopened.reply("a") is None and reopened.reply("b") == b"reply-b"


def test_digest_ignores_where_the_reply_goes() -> None:
    a = PromptRequest(id="x", prompt="hi", reply_to="swarm/main/reply/one")
    b = PromptRequest(id="x", prompt="hi", reply_to="swarm/main/reply/two")
    c = PromptRequest(id="x", prompt="hello")
    assert digest(a) == digest(b) != digest(c)


async def test_writer_group_commits_and_remembers_a_bounded_window(tmp_path: Path) -> None:
    import asyncio

    writer = JournalWriter(Journal(tmp_path / "hub.sqlite"), keep_s=60, remember=3)
    runner = asyncio.create_task(writer.run())
    try:
        await asyncio.gather(*(writer.accept(entry(f"r{i}")) for i in range(10)))
        for i in range(10):
            await writer.settle(f"r{i}", f"d{i}", b"ok", 200.0 + i)
        await writer.flushed()
        assert list(writer.settled_ids) == ["r7", "r8", "r9"]
        assert await writer.stored_reply("r0") == b"ok"
        assert writer.journal.unfinished() == []
    finally:
        runner.cancel()


def test_commits_never_fold_the_log_back_a_checkpoint_does(tmp_path: Path) -> None:
    """Commits run on the hub's event loop, so none may take the slow step of copying the
    write-ahead log into the database (SQLite does it at 1,000 pages unless told not to)."""
    journal = Journal(tmp_path / "hub.sqlite")
    for i in range(1500):
        journal.write([entry(f"r{i}")], [], [])
    wal = tmp_path / "hub.sqlite-wal"
    assert wal.stat().st_size > 2000 * 4096  # about 1,010 pages if commits checkpointed (5,172 here)
    journal.checkpoint()
    with sqlite3.connect(tmp_path / "hub.sqlite") as db:
        busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == copied  # everything was already in the database
    assert len(journal.unfinished()) == 1500
    journal.close()
