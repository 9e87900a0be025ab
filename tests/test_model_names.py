"""Model names as clients give them (``hub/model_names.py``), the catalogue ``/v1/models`` is made
from, and the ignored-fields header (``hub/leniency.py``): pure functions, called directly."""

from __future__ import annotations

import pytest

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import NodeRow, NodeState, NodeTable
from nova_swarm.hub import cli
from nova_swarm.hub.leniency import IGNORED_HEADER, ignored_header
from nova_swarm.hub.model_names import ModelNames, catalogue, parse_alias, resolve, served_models

SMOL = "SmolLM2-135M-Instruct.Q4_1"
ONE = {SMOL}
TWO = {SMOL, "Qwen2.5-0.5B"}
NAMES = ModelNames.parse(["gpt-4o-mini=SmolLM2-135M-Instruct.Q4_1", "Ghost=Nothing"])


def test_case_aliases_and_any() -> None:
    for asked in (None, "", " ", "auto", "AUTO"):
        assert resolve(asked, TWO, NAMES) is None
    assert resolve(SMOL, TWO, NAMES) == SMOL
    assert resolve("smollm2-135m-instruct.q4_1", TWO, NAMES) == SMOL
    assert resolve("GPT-4O-MINI", TWO, NAMES) == SMOL
    assert resolve("qwen2.5-0.5b", TWO, NAMES) == "Qwen2.5-0.5B"


def test_the_fallback_only_where_nothing_else_was_meant() -> None:
    assert resolve("gpt-3.5-turbo", ONE, NAMES) == SMOL
    with pytest.raises(RequestFailed) as two:
        resolve("gpt-3.5-turbo", TWO, NAMES)
    assert two.value.code is ErrorCode.UNKNOWN_MODEL and "Qwen2.5-0.5B" in two.value.message
    strict = ModelNames(aliases=NAMES.aliases, fallback=False)
    with pytest.raises(RequestFailed) as off:
        resolve("gpt-3.5-turbo", ONE, strict)
    assert "--no-model-fallback" in off.value.message
    assert resolve("gpt-4o-mini", ONE, strict) == SMOL
    # an alias to a model nobody serves says so, fallback or not
    with pytest.raises(RequestFailed) as ghost:
        resolve("ghost", ONE, NAMES)
    assert "'Nothing'" in ghost.value.message


def test_before_the_node_table_the_hub_decides() -> None:
    assert resolve("Whatever", None, NAMES) == "Whatever"
    assert resolve("gpt-4o-mini", None, NAMES) == SMOL
    assert served_models(None) is None


def test_aliases_are_checked() -> None:
    assert parse_alias(" a = b ") == ("a", "b")
    for bad in ("a", "=b", "a=", "a" * 129 + "=b"):
        with pytest.raises(ConfigError):
            parse_alias(bad)
    with pytest.raises(ConfigError):
        ModelNames.parse(["x=a", "X=b"])
    with pytest.raises(ConfigError):
        ModelNames.parse(["auto=a"])
    assert ModelNames.parse(["x=a", "X=a"]).aliases == {"x": "a"}


def row(node_id: str, model: str, state: NodeState, **announced: object) -> NodeRow:
    return NodeRow(
        node_id=node_id,
        state=state,
        model=model,
        tokens_per_s=None,
        battery_pct=None,
        charging=None,
        temp_c=None,
        busy=0,
        last_seen=None,
        agent_version=None,
        tags=[],
        **announced,  # type: ignore[arg-type]
    )


def test_the_catalogue_comes_from_the_announces() -> None:
    fleet = NodeTable(
        ts=1.0,
        nodes=[
            row("a", SMOL, NodeState.ONLINE, ctx=2048, max_tokens=512, capabilities=["stream", "embed"]),
            row("b", SMOL, NodeState.PAUSED, ctx=4096, max_tokens=8192, capabilities=["stream", "tools"]),
            row("c", SMOL, NodeState.OFFLINE, ctx=1024, max_tokens=16, capabilities=["json_schema"]),
            row("d", "Old", NodeState.ONLINE),  # a node from before these fields
        ],
    )
    old, smol = catalogue(fleet, max_tokens_limit=4096)
    assert (smol.name, smol.nodes, smol.ctx, smol.max_tokens) == (SMOL, 2, 2048, 4096)
    assert smol.capabilities == ("chat", "embed", "stream", "tools")  # offline nodes do not count
    assert (old.name, old.ctx, old.max_tokens, old.capabilities) == ("Old", None, 4096, ("chat",))
    assert catalogue(fleet)[1].max_tokens == 8192
    assert served_models(fleet) == {SMOL, "Old"}


def test_the_ignored_fields_header() -> None:
    assert ignored_header([]) == {}
    assert ignored_header(["user", "cache_prompt", "user"]) == {IGNORED_HEADER: "cache_prompt, user"}


def test_gateway_flags() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["gateway", "--model-alias", "gpt-4o-mini=x", "--model-alias", "b=y"]
        + ["--cors-origin", "*", "--no-model-fallback"]
    )
    assert args.model_alias == [("gpt-4o-mini", "x"), ("b", "y")] and args.cors_origin == ["*"]
    assert args.no_model_fallback
    for bad in (["--model-alias", "nope"], ["--cors-origin", "example.com"]):
        with pytest.raises(SystemExit) as caught:
            parser.parse_args(["gateway", *bad])
        assert caught.value.code == 2
