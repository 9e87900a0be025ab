"""Command-line values checked when they are parsed, and a parser whose errors are one line.

A bad flag (``--max-tokens -5``, ``--fanout 0``, an empty prompt, a port of 70000) is refused by
argparse itself: one line on stderr, exit status 2, before anything connects or starts. Without
these, the value reached a pydantic model or a socket call deep inside and came back as a
traceback. Each function here is an argparse ``type=``: it takes the text, returns the value, and
raises ``ArgumentTypeError`` with what was wanted.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from nova_swarm.broker.home import SwarmHome


def home_from(args: argparse.Namespace) -> SwarmHome:
    """The swarm home ``--config-dir`` names, or the default one: every command takes the flag."""
    return SwarmHome(args.config_dir) if args.config_dir else SwarmHome.default()


class Parser(argparse.ArgumentParser):
    """argparse's own parser, except that an error is one line: argparse prints the whole usage
    block first, which for ``swarm-hub up`` is a dozen lines hiding the one that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        wanted = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{wanted} is wanted, not {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a finite number is wanted, not {text!r}")
    return value


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """Whole numbers from ``low`` to ``high`` (no upper bound when None)."""

    def check(text: str) -> int:
        value = int(_number(text, int))
        if value < low or (high is not None and value > high):
            wanted = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {value}")
        return value

    check.__name__ = "whole number"  # argparse names the type in some messages
    return check


def float_range(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """Numbers from ``low`` (excluded when ``low_open``) to ``high``."""

    def check(text: str) -> float:
        value = float(_number(text, float))
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            floor = f"more than {low:g}" if low_open else f"at least {low:g}"
            wanted = f"{floor} and at most {high:g}" if high is not None else floor
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value

    check.__name__ = "number"
    return check


#: a TCP port to listen on or connect to
port = int_range(1, 65535)
#: a count of one or more (threads, slots, limits)
positive_int = int_range(1)
#: a count that may be zero (retries, queue places)
count = int_range(0)
#: seconds, or any amount, that must be more than zero (timeouts, intervals)
positive_float = float_range(0.0, low_open=True)
#: an amount that may be zero (rates, prices, "0 turns it off")
non_negative_float = float_range(0.0)
#: a percentage
percent = float_range(0.0, 100.0)


def text(value: str) -> str:
    """A value that must say something: an empty prompt is a mistake, not a question."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value} is not a file")
    return path


def existing_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a directory" if path.exists() else f"{value} does not exist")
    return path


def describe(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand its help line as its description, so ``swarm-hub ask --help`` says
    what ``ask`` does, not only which flags it takes."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = helps[name]
                describe(sub)


def file_to_write(value: str) -> Path:
    """A file we create or replace: its folder must exist, and it must not be a folder itself."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a directory")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} does not exist")
    return path
