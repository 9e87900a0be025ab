"""A log filter a peer cannot turn against us: repeated lines are rate-limited, and a foreign
library's traceback about a peer's error becomes one line.

The embedded broker logs on its own event loop. amqtt printed a traceback for every CONNECT a
peer reset, and rendering it on the console blocked every client for ~190 ms; a packet with an
impossible length was read as a stream of packets, 431,697 warnings in 40 s, and the rotating log
wiped its own history. With this filter on every handler, each kind of line gets ``burst`` lines a
``window``; the rest are counted, and the next line let through says how many were suppressed.
Only warnings and errors are limited: info lines record the swarm's work, not a peer's abuse.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: lines of one kind let through per window
BURST = 20
WINDOW_S = 60.0
_DECIDED = "_nova_swarm_rate_decision"


class RateLimit(logging.Filter):
    """Our structured lines are keyed by logger and event name; a foreign library's (amqtt and
    asyncio format peer addresses into each message) by logger and level, so a flood of distinct
    messages still counts as one kind."""

    def __init__(self, *, burst: int = BURST, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        # key -> [window start, lines let through, lines suppressed]; keys are finitely many
        self._windows: dict[tuple[str, object], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        decided = getattr(record, _DECIDED, None)
        if decided is not None:  # the same record, seen by a second handler
            return bool(decided)
        ours = record.name.startswith("nova_swarm")
        if not ours and record.exc_info:
            _flatten(record)
        if record.levelno < logging.WARNING or record.levelno >= logging.CRITICAL:
            # Info lines are the swarm's history (one per request, bounded by the hub's own
            # rate limits); a peer's abuse shows up as warnings.
            keep = True
        else:
            keep = self._admit(record, _key(record, ours))
        setattr(record, _DECIDED, keep)
        return keep

    def _admit(self, record: logging.LogRecord, key: tuple[str, object]) -> bool:
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            suppressed = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            if suppressed:
                _mention(record, suppressed)
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False


def _key(record: logging.LogRecord, ours: bool) -> tuple[str, object]:
    if ours and isinstance(record.msg, dict):
        return record.name, str(record.msg.get("event"))
    return record.name, record.levelno


def _flatten(record: logging.LogRecord) -> None:
    """A foreign traceback (amqtt's, about a peer) becomes its last line."""
    exc = record.exc_info[1] if record.exc_info else None
    message = record.getMessage()
    record.msg = f"{message} ({type(exc).__name__}: {exc})" if exc is not None else message
    record.args = None
    record.exc_info = None
    record.exc_text = None


def _mention(record: logging.LogRecord, suppressed: int) -> None:
    if isinstance(record.msg, dict):
        record.msg = {**record.msg, "suppressed_before": suppressed}
    else:
        record.msg = f"{record.getMessage()} ({suppressed} similar lines suppressed before this one)"
        record.args = None
