"""JSON Schema on the hub: checking a request's schemas at intake, and answers against them.

Nodes constrain generation with a grammar made from the schema, but a grammar is not a
validator (and a node may run an engine without one), so the hub checks every structured answer
and every tool call's arguments before a client sees them. The one place ``jsonschema``'s
errors become ours: a one-line reason a person can act on.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import exceptions as schema_errors
from jsonschema import validators

from nova_swarm.broker.contract.messages import NamedToolChoice, PromptRequest, TaskResult, Tool

from .nesting import nesting_depth

#: how many levels of objects and arrays a request's schema may nest. Checking a schema, and
#: validating answers with it, recurse several Python frames per level: about 200 levels exhaust
#: the stack, and a RecursionError must never be the way a request fails. Real schemas stay
#: under 20 levels.
MAX_SCHEMA_DEPTH = 64


def schema_problem(schema: dict[str, Any], *, name: str = "the schema") -> str | None:
    """Why ``schema`` (called ``name`` in the answer) is not a usable JSON Schema, or None."""
    if nesting_depth(schema, limit=MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        return f"{name} nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep (the limit)"
    try:
        validators.validator_for(schema).check_schema(schema)
    except schema_errors.SchemaError as exc:
        return f"{name} is not a valid JSON Schema: {_where(exc.absolute_path)}{exc.message}"
    return None


def request_problem(request: PromptRequest) -> str | None:
    """Why the request's ``response_format`` or ``tools`` schemas cannot be used, or None."""
    wanted = request.wants_json()
    if wanted is not None:
        problem = schema_problem(wanted, name="response_format.json_schema.schema")
        if problem is not None:
            return problem
    for i, tool in enumerate(request.tools or ()):
        problem = schema_problem(tool.function.parameters, name=f"tools[{i}].function.parameters")
        if problem is not None:
            return problem
    return None


def answer_problem(request: PromptRequest, result: TaskResult) -> str | None:
    """Why a node's answer breaks what the request asked for, or None when it does not.

    - a ``response_format`` of JSON: the text must be JSON (an object for ``json_object``)
      matching the schema;
    - tool calls: each must name one of the request's tools and carry arguments (JSON text)
      that match its parameters; ``required`` or a named ``tool_choice`` must be obeyed.
    """
    wanted = request.wants_json()
    if wanted is not None and not result.tool_calls:
        return _json_problem(result.text, wanted, what="the answer")
    tools = {t.function.name: t for t in request.tools or ()}
    calls = result.tool_calls or []
    choice = request.tool_choice
    if calls and (not tools or choice == "none"):
        return "the node called a tool, but the request allows none"
    if not calls and (choice == "required" or isinstance(choice, NamedToolChoice)):
        return "the request requires a tool call, and the node answered in text"
    for call in calls:
        tool: Tool | None = tools.get(call.function.name)
        if tool is None:
            return f"the node called {call.function.name!r}, which is not one of the request's tools"
        if isinstance(choice, NamedToolChoice) and call.function.name != choice.function.name:
            return f"the request requires a call to {choice.function.name!r}, not {call.function.name!r}"
        problem = _json_problem(
            call.function.arguments, tool.function.parameters, what=f"{call.function.name} arguments"
        )
        if problem is not None:
            return problem
    return None


def _json_problem(text: str, schema: dict[str, Any], *, what: str) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"{what} is not JSON ({exc.msg} at character {exc.pos}): {_clip(text)}"
    except RecursionError:
        return f"{what} nests too deeply to read: {_clip(text)}"
    try:
        error = schema_errors.best_match(validators.validator_for(schema)(schema).iter_errors(value))
    except RecursionError:  # a schema that refers to itself ("$ref": "#") follows a deep value down
        return f"{what} nests too deeply to check against the schema: {_clip(text)}"
    if error is None:
        return None
    return f"{what} does not match the schema: {_where(error.absolute_path)}{error.message}"


def _where(path: Any) -> str:
    parts = list(path)
    return f"at {'/'.join(str(p) for p in parts)}: " if parts else ""


def _clip(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
