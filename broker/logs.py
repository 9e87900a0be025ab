"""Structured logs: readable on a terminal, JSON in size-rotated files (and on stderr with ``--log-json``).

    logs.configure(level="info", file=home.log_file("hub"))

Every process writes its own file under the config directory (``logs/hub.log``,
``logs/node-pixel7.log``, ...): rotation is not safe with two writers on one file. Handlers bind
``request_id``/``node_id`` with ``structlog.contextvars`` so every line about a task carries them.
Prompt and answer text is never logged at info level or above; and since a debug log may hold
it, log files are 0600 in a 0700 directory whatever the umask (``private.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import structlog

from nova_swarm.broker.logfilter import RateLimit
from nova_swarm.broker.private import PrivateRotatingFileHandler, private_dir

#: a file is rotated past this size, and this many old ones are kept (logs/hub.log.1 ... .3)
MAX_BYTES = 5 * 2**20
BACKUPS = 3

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(
    *,
    level: str = "info",
    json: bool = False,
    file: Path | None = None,
    max_bytes: int = MAX_BYTES,
    backups: int = BACKUPS,
) -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    on_terminal = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_formatter(on_terminal, keep_logger=json))
    handlers: list[logging.Handler] = [console]
    if file is not None:
        try:
            private_dir(file.parent, tighten=False)
            rotating = PrivateRotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        except OSError as exc:  # a read-only config dir must not stop the swarm
            print(f"nova-swarm: not logging to {file}: {exc}", file=sys.stderr)
        else:
            rotating.setFormatter(_formatter(structlog.processors.JSONRenderer()))
            handlers.append(rotating)
    # One limiter shared by every handler: a peer's flood of one kind of line can neither stall
    # the loop on console output nor rotate away the file's history.
    limiter = RateLimit()
    for handler in handlers:
        handler.addFilter(limiter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)
    # Third-party libraries (amqtt, transitions, paho) log through stdlib logging; their INFO
    # chatter is per-connection noise, so they only reach us from WARNING up.
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger("nova_swarm").setLevel(numeric)


def _drop_logger(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    event.pop("logger", None)  # a terminal line is for a person; the files keep it
    return event


def _formatter(renderer: structlog.typing.Processor, *, keep_logger: bool = True) -> logging.Formatter:
    meta = structlog.stdlib.ProcessorFormatter.remove_processors_meta
    return structlog.stdlib.ProcessorFormatter(
        processors=[meta, renderer] if keep_logger else [meta, _drop_logger, renderer],
        # Lines from stdlib loggers (amqtt, aiomqtt) get the same fields as ours.
        foreign_pre_chain=_SHARED,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log (default: %(default)s)",
    )
    parser.add_argument("--log-json", action="store_true", help="one JSON object per line on stderr too")
    parser.add_argument(
        "--log-file", type=Path, help="JSON log file, rotated by size (default: logs/ in the config dir)"
    )
    parser.add_argument("--no-log-file", action="store_true", help="log to stderr only")


def file_for(args: argparse.Namespace, default: Path | None) -> Path | None:
    """The file ``--log-file`` names, else ``default``; None with ``--no-log-file``."""
    if getattr(args, "no_log_file", False):
        return None
    return getattr(args, "log_file", None) or default
