"""How deep JSON nests, measured without recursion.

Python's ``json`` and ``jsonschema`` recurse once (or, for schemas, many times) per level, so a
payload or schema nested a thousand levels deep raises ``RecursionError`` wherever it is read.
The hub bounds nesting at intake instead, and to refuse a payload too deep to parse it still
needs the request's ``id`` and ``reply_to``: :func:`top_level` reads those without recursing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

#: a JSON string (skipped whole, so brackets inside it do not count), or a run of brackets
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]+|[\]}]+')


def nesting_depth(value: object, *, limit: int) -> int:
    """How many levels of objects and arrays ``value`` nests (a scalar is 0, ``{}`` is 1).

    Counting stops past ``limit``: the answer is then some number above it.
    """
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def top_level(text: str) -> tuple[str, int] | None:
    """JSON ``text`` with every object and array inside the outermost one replaced by ``null``,
    and how many levels ``text`` nests; None when its brackets do not balance.

    Enough to read the top-level members of a document too deep for ``json.loads``. The inner
    values are not checked, only counted: use the result to address a refusal, never as the
    request. One pass over the text, a regex match per string or run of brackets.
    """
    pieces: list[str] = []
    depth = deepest = 0
    copied = 0  # text[copied:] is still to be copied
    for match in _TOKEN.finditer(text):
        run = match.group()
        if run[0] == '"':
            continue
        if run[0] in "[{":
            if depth < 2 <= depth + len(run):  # this run opens a value inside the outermost one
                pieces.append(text[copied : match.start() + 1 - depth])
            depth += len(run)
            deepest = max(deepest, depth)
        else:
            if depth - len(run) < 2 <= depth:  # ... and this one closes it
                pieces.append("null")
                copied = match.start() + depth - 1
            depth -= len(run)
            if depth < 0:
                return None
    if depth != 0:
        return None
    pieces.append(text[copied:])
    return "".join(pieces), deepest


def loads_top_level(text: str) -> tuple[object, int]:
    """:func:`top_level`, parsed: (the outermost value with inner ones as None, nesting depth).

    Raises ValueError, as ``json.loads`` does, when ``text`` is not JSON.
    """
    shallow = top_level(text)
    if shallow is None:
        raise ValueError("its brackets do not balance")
    return json.loads(shallow[0]), shallow[1]
