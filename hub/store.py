"""SQLite persistence for the registry and win rates, so both survive a hub restart.

Writes are batched: the hub marks what changed and flushes every couple of seconds from a
worker thread, never one write per message on the hot path (BROKERS.md).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from nova_swarm.broker.contract.messages import Announce, Heartbeat, NodeState
from nova_swarm.broker.private import private_database

from .registry import NodeRecord

NodeRow = tuple[str, str | None, str, str | None, float | None, str | None]

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id   TEXT PRIMARY KEY,
    announce  TEXT,
    state     TEXT NOT NULL,
    reason    TEXT,
    last_seen REAL,
    heartbeat TEXT
);
CREATE TABLE IF NOT EXISTS win_rates (
    node_id TEXT NOT NULL,
    tag     TEXT NOT NULL,
    wins    REAL NOT NULL,
    trials  REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (node_id, tag)
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(private_database(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def load_nodes(self) -> list[NodeRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT node_id, announce, state, reason, last_seen, heartbeat FROM nodes"
            ).fetchall()
        records = []
        for node_id, announce, state, reason, last_seen, heartbeat in rows:
            records.append(
                NodeRecord(
                    node_id=node_id,
                    announce=Announce.model_validate_json(announce) if announce else None,
                    state=NodeState(state),
                    reason=reason,
                    last_seen=last_seen,
                    heartbeat=Heartbeat.model_validate_json(heartbeat) if heartbeat else None,
                )
            )
        return records

    def load_win_rates(self) -> list[tuple[str, str, float, float, float]]:
        with self._lock:
            return self._db.execute("SELECT node_id, tag, wins, trials, updated FROM win_rates").fetchall()

    @staticmethod
    def node_row(r: NodeRecord) -> NodeRow:
        """Serialise on the event loop, so the write thread never sees a record mid-update."""
        return (
            r.node_id,
            r.announce.model_dump_json() if r.announce else None,
            r.state.value,
            r.reason,
            r.last_seen,
            r.heartbeat.model_dump_json() if r.heartbeat else None,
        )

    def save(self, node_rows: list[NodeRow], win_rates: list[tuple[str, str, float, float, float]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?)", node_rows)
                self._db.executemany("INSERT OR REPLACE INTO win_rates VALUES (?, ?, ?, ?, ?)", win_rates)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
