"""Structured logs: readable on a terminal, JSON for machines (``--log-json``).

Handlers bind ``request_id``/``node_id`` with ``structlog.contextvars`` so every line about a
task carries them. Prompt text is never logged at info level or above.
"""

from __future__ import annotations

import argparse
import logging
import sys

import structlog


def configure(*, level: str = "info", json: bool = False) -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    # Third-party libraries (amqtt, transitions, paho) log through stdlib logging; their INFO
    # chatter is per-connection noise, so they only reach us from WARNING up.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s"
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
