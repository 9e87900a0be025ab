"""The request journal: what the hub has accepted, and what it replied, in SQLite.

A row goes through three states::

    accepted  (request kept)  ──>  settled (reply kept, not yet published)  ──>  sent

* A prompt is written as ``accepted`` before it is dispatched, so a hub that crashes resumes it.
* A reply is written as ``settled`` before it is published, so a crash between the two re-sends
  the *same* reply instead of computing a different one; after publishing it is marked ``sent``.
* A finished row keeps the reply (not the prompt) for ``keep_s``, so a client that retries an id
  gets the same reply again: replies are idempotent by request id, within the scope of the
  login that sent it (the ``request_id`` column holds that scoped key).

Writes are group-committed by :class:`JournalWriter`: many prompts arriving together cost one
transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog

from nova_swarm.broker.contract.messages import PromptRequest
from nova_swarm.broker.private import private_database

log = structlog.get_logger("nova_swarm.hub")

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    request_id  TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    request     TEXT,
    reply_topic TEXT NOT NULL,
    correlation BLOB,
    accepted_at REAL NOT NULL,
    deadline_at REAL NOT NULL,
    reply       BLOB,
    settled_at  REAL,
    sent        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS journal_settled ON journal (settled_at);
"""


def canonical(request: PromptRequest) -> str:
    """What makes two prompts "the same request": everything but where the reply goes (which
    the journal keeps in its own column). Journalled as is, and hashed for :func:`digest`."""
    return request.model_dump_json(exclude={"reply_to"}, exclude_none=True)


def digest(request: PromptRequest | str) -> str:
    body = request if isinstance(request, str) else canonical(request)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    """An accepted prompt, as journalled."""

    #: the request's key: its id within the scope of the login that sent it
    #: (``intake.scoped_key``: ``alice/req-42``, or the bare id for the shared scope, which is
    #: how every row written before scopes existed reads, with no migration)
    request_id: str
    digest: str
    request: str
    reply_topic: str
    correlation: bytes | None
    accepted_at: float
    deadline_at: float


@dataclass(frozen=True, slots=True)
class Unsent:
    """A reply that was settled but maybe never published (the hub stopped in between)."""

    request_id: str
    reply_topic: str
    correlation: bytes | None
    reply: bytes


#: how often the write-ahead log is folded back into the database (``Journal.checkpoint``)
CHECKPOINT_EVERY_S = 1.0


class Journal:
    """The SQLite side. Thread-safe, and every method blocks: ``write`` is quick enough for the
    event loop (``JournalWriter``), the rest go through ``to_thread``."""

    def __init__(self, path: Path) -> None:
        # Made 0600 before SQLite opens it, so its WAL (which holds prompts) is private too.
        self._db = sqlite3.connect(private_database(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (the case we guard); only an OS crash
        # can lose the last transactions, and the client's retry with the same id covers that.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Never fold the log back into the database in a commit: that is the one slow step, and
        # commits run on the event loop. ``checkpoint`` does it, in a thread, on its own connection.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._path = path
        self._checkpointer: sqlite3.Connection | None = None

    def write(
        self,
        accepted: list[Entry],
        settled: list[tuple[str, bytes, float]],
        sent: list[str],
    ) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO journal (request_id, digest, request, reply_topic, correlation,"
                    " accepted_at, deadline_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (e.request_id, e.digest, e.request, e.reply_topic, e.correlation, e.accepted_at, e.deadline_at)
                        for e in accepted
                    ],
                )
                # The prompt text is dropped once answered: only the reply is needed from now on.
                self._db.executemany(
                    "UPDATE journal SET reply = ?, settled_at = ?, request = NULL WHERE request_id = ?",
                    [(reply, when, rid) for rid, reply, when in settled],
                )
                self._db.executemany("UPDATE journal SET sent = 1 WHERE request_id = ?", [(rid,) for rid in sent])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def unfinished(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, digest, request, reply_topic, correlation, accepted_at, deadline_at"
                " FROM journal WHERE reply IS NULL ORDER BY accepted_at"
            ).fetchall()
        return [Entry(*row) for row in rows]

    def unsent(self) -> list[Unsent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, reply_topic, correlation, reply FROM journal"
                " WHERE reply IS NOT NULL AND sent = 0 ORDER BY settled_at"
            ).fetchall()
        return [Unsent(*row) for row in rows]

    def recent(self, since: float, limit: int) -> list[tuple[str, str]]:
        """(request id, digest) of the newest settled rows, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, digest FROM journal WHERE settled_at >= ? ORDER BY settled_at DESC LIMIT ?",
                (since, limit),
            ).fetchall()
        return rows[::-1]

    def reply(self, request_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM journal WHERE request_id = ?", (request_id,)).fetchone()
        return row[0] if row else None

    def prune(self, before: float) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM journal WHERE settled_at < ? AND sent = 1", (before,))
            return cur.rowcount

    def checkpoint(self) -> None:
        """Fold the write-ahead log back into the database, as far as readers allow, without
        holding up writers (a passive checkpoint)."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        with self._lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
            self._db.close()


class JournalWriter:
    """Group commit on the event loop: the writes asked for during one turn of the loop go in
    one transaction at the start of the next.

    On the loop rather than in a worker thread: a small commit in WAL mode takes about 20 µs,
    and the hop to a thread and back cost about 60 µs more, twice on every request's way
    (accepted, then settled). The step that can take milliseconds, folding the log back into the
    database, is ``run``'s, in a thread."""

    def __init__(self, journal: Journal, *, keep_s: float, remember: int) -> None:
        self.journal = journal
        self.keep_s = keep_s
        self._accepted: list[tuple[Entry, asyncio.Future[None]]] = []
        self._settled: list[tuple[str, bytes, float, asyncio.Future[None]]] = []
        self._sent: list[str] = []
        self._scheduled = False
        self._idle = asyncio.Event()
        self._idle.set()
        #: request id -> digest of recently settled requests, newest last (bounded)
        self.settled_ids: OrderedDict[str, str] = OrderedDict()
        self._remember = remember

    async def load(self) -> tuple[list[Entry], list[Unsent]]:
        """Remember the requests settled within ``keep_s`` (a retry of one gets its reply again),
        and return what a previous run left: the requests it had not finished, and the replies
        it had not sent."""
        journal = self.journal
        for request_id, request_digest in await asyncio.to_thread(
            journal.recent, time.time() - self.keep_s, self._remember
        ):
            self._remember_settled(request_id, request_digest)
        return await asyncio.to_thread(journal.unfinished), await asyncio.to_thread(journal.unsent)

    async def accept(self, entry: Entry) -> None:
        """Returns once ``entry`` is committed."""
        future = asyncio.get_running_loop().create_future()
        self._accepted.append((entry, future))
        self._kick()
        await future

    async def settle(self, request_id: str, request_digest: str, reply: bytes, when: float) -> None:
        """Returns once the reply is committed; publish it after that."""
        future = asyncio.get_running_loop().create_future()
        self._settled.append((request_id, reply, when, future))
        self._remember_settled(request_id, request_digest)
        self._kick()
        await future

    def sent(self, request_id: str) -> None:
        """The reply is out. Not awaited: if this is lost, the reply is merely sent again."""
        self._sent.append(request_id)
        self._kick()

    async def stored_reply(self, request_id: str) -> bytes | None:
        return await asyncio.to_thread(self.journal.reply, request_id)

    async def flushed(self) -> None:
        await self._idle.wait()

    def _kick(self) -> None:
        self._idle.clear()
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    def _remember_settled(self, request_id: str, request_digest: str) -> None:
        self.settled_ids[request_id] = request_digest
        self.settled_ids.move_to_end(request_id)
        while len(self.settled_ids) > self._remember:
            self.settled_ids.popitem(last=False)

    def _write(self) -> None:
        self._scheduled = False
        accepted, self._accepted = self._accepted, []
        settled, self._settled = self._settled, []
        sent, self._sent = self._sent, []
        futures = [f for _, f in accepted] + [s[3] for s in settled]
        try:
            self.journal.write(
                [entry for entry, _ in accepted], [(rid, reply, when) for rid, reply, when, _ in settled], sent
            )
        except Exception as exc:
            # A write we cannot make must not look like success: the waiters hear about it.
            log.error("journal write failed", error=str(exc))
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        else:
            for future in futures:
                if not future.done():
                    future.set_result(None)
        self._idle.set()

    async def run(self) -> None:
        """Fold the write-ahead log back into the database every ``CHECKPOINT_EVERY_S``."""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            await asyncio.to_thread(self.journal.checkpoint)

    async def prune(self, now: float) -> None:
        removed = await asyncio.to_thread(self.journal.prune, now - self.keep_s)
        if removed:
            log.debug("pruned journal", rows=removed)
