"""The contribution ledger: one hash-chained receipt per finished task, signed in batches, in SQLite.

    ledger = Ledger.open(path, key)           # the hub appends as tasks finish
    ledger.append(ReceiptBody(...))
    report = verify(path, key.public)         # `swarm-hub ledger verify`: names the first bad record

A receipt holds what a node did, never what it was asked or answered: ids, the model and its
sha256, token counts, wall time, hashes of the prompt and of the result, the strategy and whether
it won. Each one carries the previous receipt's hash (the first, a row of zeros) and its own hash
over the canonical JSON of its body and that link. Each write of a batch adds a *checkpoint*: the
number and hash of its last receipt, signed with the hub's Ed25519 key; the newest is also kept as
the ledger's head, so cutting receipts off the end is caught too. Altering, reordering or
deleting any receipt breaks a hash or a link, and ``verify`` names that receipt; a chain rebuilt
without the key no longer matches a signed checkpoint, and ``verify`` names the receipts the
checkpoint covers.

One signature a batch rather than one a receipt: signing took about 70 µs, a quarter of the
hub's whole budget for a request. Receipts written before checkpoints (their own signature in
the receipt) still verify.

Appends happen on the event loop (hashing takes microseconds) and are written by one worker
thread in batches, like the journal, so the loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from nova_swarm.broker.contract.errors import ConfigError, SignatureError
from nova_swarm.broker.contract.signing import PublicKey, SigningKey, canonical
from nova_swarm.broker.private import private_database

log = structlog.get_logger("nova_swarm.hub.ledger")

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    seq        INTEGER PRIMARY KEY,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    signature  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uptime (
    node_id    TEXT PRIMARY KEY,
    seconds    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq        INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL,
    signature  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    seq        INTEGER NOT NULL,
    hash       TEXT NOT NULL,
    signature  TEXT NOT NULL
);
"""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class ReceiptBody:
    """What one finished task was. Hashes stand in for the prompt and the result: never text."""

    ts: float
    request_id: str
    node_id: str
    model: str | None
    model_sha256: str | None
    model_size_bytes: int | None
    prompt_tokens: int
    completion_tokens: int
    wall_ms: float
    #: joules the node reported spending, when it reports it
    energy_j: float | None
    prompt_sha256: str
    result_sha256: str | None
    strategy: str
    won: bool
    ok: bool
    error_code: str | None
    private: bool = False
    #: for best_of_n: where the reranker put this answer (1 is best), and among how many
    rank: int | None = None
    ranked: int | None = None


def receipt_hash(seq: int, body: dict[str, Any], prev_hash: str) -> str:
    return hashlib.sha256(canonical({"seq": seq, "body": body, "prev": prev_hash})).hexdigest()


@dataclass(frozen=True, slots=True)
class Receipt:
    seq: int
    body: dict[str, Any]
    prev_hash: str
    hash: str
    #: empty: the checkpoint of its batch signs it (a receipt from before checkpoints has its own)
    signature: str

    def to_json(self) -> str:
        return canonical(asdict(self)).decode()


def _sign(key: SigningKey, digest_hex: str) -> str:
    return str(key.sign({"hash": digest_hex})["signature"])


def _signed_by(public: PublicKey, digest_hex: str, signature: str) -> bool:
    try:
        public.verify({"signed": {"hash": digest_hex}, "signature": signature, "key_id": public.key_id})
    except SignatureError:
        return False
    return True


class Ledger:
    """Appends receipts. One hub owns a ledger file at a time."""

    def __init__(self, path: Path, key: SigningKey) -> None:
        self.path = path
        self.key = key
        self._db = sqlite3.connect(private_database(path), check_same_thread=False, isolation_level=None)
        self._db.executescript(SCHEMA)
        self._db.execute("PRAGMA journal_mode=WAL")
        row = self._db.execute("SELECT seq, hash FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
        self.seq, self.last_hash = (int(row[0]), str(row[1])) if row else (0, GENESIS)
        self._pending: list[Receipt] = []
        self._lock = threading.Lock()
        #: one writer at a time: a flush cancelled on the loop may still run in its thread
        self._write_lock = threading.Lock()
        self._uptime: dict[str, float] = {}

    def credit_uptime(self, node_id: str, seconds: float) -> None:
        """Time a node spent online and not paused (for the uptime credit; not a receipt)."""
        with self._lock:
            self._uptime[node_id] = self._uptime.get(node_id, 0.0) + seconds

    def append(self, body: ReceiptBody) -> Receipt:
        """Chain a receipt now (the order is the loop's); it is written, and signed with its
        batch, on ``flush``."""
        fields = asdict(body)
        seq = self.seq + 1
        digest_hex = receipt_hash(seq, fields, self.last_hash)
        receipt = Receipt(seq, fields, self.last_hash, digest_hex, "")
        self.seq, self.last_hash = seq, digest_hex
        with self._lock:
            self._pending.append(receipt)
        return receipt

    def flush(self) -> int:
        """Write what was appended, and the new head, in one transaction (from a worker thread)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                uptime, self._uptime = self._uptime, {}
            if uptime:
                with self._db:
                    self._db.executemany(
                        "INSERT INTO uptime (node_id, seconds) VALUES (?, ?) "
                        "ON CONFLICT (node_id) DO UPDATE SET seconds = seconds + excluded.seconds",
                        sorted(uptime.items()),
                    )
            if batch:
                self._write(batch)
        return len(batch)

    def _write(self, batch: list[Receipt]) -> None:
        head = batch[-1]
        signature = _sign(self.key, f"{head.seq}:{head.hash}")
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO receipts (seq, body, prev_hash, hash, signature) VALUES (?, ?, ?, ?, ?)",
                [(r.seq, canonical(r.body).decode(), r.prev_hash, r.hash, r.signature) for r in batch],
            )
            self._db.execute(
                "INSERT INTO checkpoints (seq, hash, signature) VALUES (?, ?, ?)", (head.seq, head.hash, signature)
            )
            self._db.execute(
                "INSERT INTO head (id, seq, hash, signature) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
                "signature = excluded.signature",
                (head.seq, head.hash, signature),
            )

    async def run(self, interval_s: float = 0.5) -> None:
        """Flush every ``interval_s`` until cancelled; then flush once more."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                await asyncio.to_thread(self.flush)
        finally:
            self.flush()

    def close(self) -> None:
        self.flush()
        self._db.close()


# ---------------------------------------------------------------- reading and checking


def _connect_read(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise ConfigError(f"no ledger at {path}: the hub writes it once it has answered a request")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.executescript("")  # fail early on a file that is not SQLite
    return db


def receipts(path: Path) -> Iterator[Receipt]:
    db = _connect_read(path)
    try:
        for seq, body, prev_hash, hash_, signature in db.execute(
            "SELECT seq, body, prev_hash, hash, signature FROM receipts ORDER BY seq"
        ):
            yield Receipt(int(seq), json.loads(body), str(prev_hash), str(hash_), str(signature))
    finally:
        db.close()


def uptime(path: Path) -> dict[str, float]:
    """Seconds each node has spent online and not paused, as the hub counted them."""
    db = _connect_read(path)
    try:
        return {str(n): float(s) for n, s in db.execute("SELECT node_id, seconds FROM uptime")}
    finally:
        db.close()


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    count: int
    #: the first receipt that does not check out (its number), or None
    bad_seq: int | None = None
    problem: str | None = None


def _checkpoints(path: Path) -> dict[int, tuple[str, str]]:
    db = _connect_read(path)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'checkpoints'").fetchone():
            return {}  # a ledger from before checkpoints: its receipts carry their signatures
        return {int(q): (str(h), str(s)) for q, h, s in db.execute("SELECT seq, hash, signature FROM checkpoints")}
    finally:
        db.close()


def verify(path: Path, public: PublicKey) -> Verdict:
    """Walk the chain from the start: every link and hash, each signed checkpoint (or, in an
    older ledger, each receipt's own signature), then the signed head."""
    checkpoints = _checkpoints(path)
    expected_prev, expected_seq, count = GENESIS, 1, 0
    #: the first receipt no valid checkpoint has covered yet
    unsigned_from = 1
    last: Receipt | None = None
    for r in receipts(path):
        what = f"receipt #{r.seq} (request {r.body.get('request_id')!r}, node {r.body.get('node_id')!r})"
        if r.seq != expected_seq:
            return Verdict(False, count, expected_seq, f"receipt #{expected_seq} is missing (deleted?)")
        if r.prev_hash != expected_prev:
            return Verdict(False, count, r.seq, f"{what} does not follow the one before it (one was removed?)")
        if receipt_hash(r.seq, r.body, r.prev_hash) != r.hash:
            return Verdict(False, count, r.seq, f"{what} was altered: its contents do not match its hash")
        if r.signature:
            if not _signed_by(public, r.hash, r.signature):
                return Verdict(False, count, r.seq, f"{what} is not signed by the hub key {public.key_id}")
            unsigned_from = r.seq + 1
        if (checkpoint := checkpoints.get(r.seq)) is not None:
            span = f"receipts #{unsigned_from} to #{r.seq}"
            hash_, signature = checkpoint
            if not _signed_by(public, f"{r.seq}:{hash_}", signature):
                done = unsigned_from - 1
                return Verdict(False, done, unsigned_from, f"{span} are not signed by the hub key {public.key_id}")
            if hash_ != r.hash:
                done = unsigned_from - 1
                return Verdict(False, done, unsigned_from, f"{span} were rewritten: the hub signed another chain")
            unsigned_from = r.seq + 1
        expected_prev, expected_seq, count, last = r.hash, r.seq + 1, count + 1, r
    db = _connect_read(path)
    try:
        head = db.execute("SELECT seq, hash, signature FROM head WHERE id = 1").fetchone()
    finally:
        db.close()
    if head is None:
        if last is None:
            return Verdict(True, 0)
        return Verdict(False, count, None, "the ledger's signed head is missing")
    seq, hash_, signature = int(head[0]), str(head[1]), str(head[2])
    if not _signed_by(public, f"{seq}:{hash_}", signature):
        return Verdict(False, count, None, f"the ledger's head is not signed by the hub key {public.key_id}")
    if last is None or seq != last.seq or hash_ != last.hash:
        return Verdict(False, count, (last.seq + 1) if last else 1, f"receipts after #{count} are missing (cut off)")
    if unsigned_from <= last.seq:
        return Verdict(
            False,
            unsigned_from - 1,
            unsigned_from,
            f"receipts #{unsigned_from} to #{last.seq} have no signed checkpoint",
        )
    return Verdict(True, count)


def export(path: Path, out: IO[str]) -> int:
    """Every receipt as JSON Lines (seq, body, prev_hash, hash, and signature: empty where its
    batch's checkpoint signs it); returns how many."""
    count = 0
    for r in receipts(path):
        out.write(r.to_json() + "\n")
        count += 1
    return count
