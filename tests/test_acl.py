"""The ACL rule table, checked directly; the brokers apply it in test_broker.py and test_security.py."""

from __future__ import annotations

import pytest

from nova_swarm.broker.home import Role
from nova_swarm.broker.server.acl import Access, allowed, covers, mosquitto_acl, role_of

R, W = Access.READ, Access.WRITE


@pytest.mark.parametrize(
    ("user", "client_id", "access", "topic", "ok"),
    [
        ("client", "c1", W, "swarm/main/prompt", True),
        ("client", "c1", W, "swarm/main/prompt/client", True),
        ("client", "c1", R, "swarm/main/reply/client", True),
        ("client", "c1", R, "swarm/main/reply/client/#", True),
        ("client", "c1", R, "swarm/main/reply/default", True),
        ("client", "c1", R, "swarm/main/reply/default/stream/+", True),
        # Replies are private to a login: the client id grants nothing, so no other login's
        # replies, and no wildcard over all of them.
        ("client", "c1", R, "swarm/main/reply/c1", False),
        ("client", "alice", R, "swarm/main/reply/alice", False),
        ("client", "c1", R, "swarm/main/reply/c2", False),
        ("client", "c1", W, "swarm/main/prompt/alice", False),
        ("client", "c1", W, "swarm/main/cancel/alice", False),
        ("alice", "x", W, "swarm/main/prompt/alice", True),
        ("alice", "x", W, "swarm/main/cancel/alice", True),
        ("alice", "x", W, "swarm/main/prompt", True),
        ("alice", "x", R, "swarm/main/reply/alice/#", True),
        ("alice", "x", R, "swarm/main/reply/default", True),
        ("alice", "x", R, "swarm/main/reply/client", False),
        ("alice", "x", R, "swarm/main/reply/bob", False),
        ("alice", "x", W, "swarm/main/prompt/bob", False),
        # A client login is not a node, whatever its name.
        ("alice", "x", W, "swarm/main/node/alice/announce", False),
        ("alice", "x", R, "swarm/main/node/alice/task", False),
        ("client", "c1", R, "swarm/main/reply/#", False),
        ("client", "c1", R, "swarm/main/reply/+", False),
        ("client", "c1", R, "swarm/main/node/+/status", True),
        ("client", "c1", R, "swarm/main/node/+/task", False),
        ("client", "c1", R, "swarm/main/#", False),
        ("client", "c1", W, "swarm/main/node/c1/announce", False),
        ("client", "client", W, "swarm/main/node/client/announce", False),
        ("client", "c1", W, "swarm/main/reply/x", False),
        # A node's identity is its login, whatever client id it claims.
        ("n1", "n1", W, "swarm/main/node/n1/result", True),
        ("n1", "n1", W, "swarm/main/node/n1/status", True),
        ("n1", "n2", W, "swarm/main/node/n1/status", True),
        ("n1", "n2", W, "swarm/main/node/n2/status", False),
        ("n1", "n1", W, "swarm/main/node/n2/status", False),
        ("n1", "n1", W, "swarm/main/hub/status", False),
        ("n1", "n1", W, "swarm/main/prompt", False),
        ("n1", "n1", W, "swarm/main/prompt/n1", False),
        ("n1", "alice", R, "swarm/main/reply/alice", False),
        ("n1", "n1", R, "swarm/main/reply/n1", False),
        ("n1", "n1", R, "swarm/main/node/n1/task", True),
        ("n1", "n1", R, "swarm/main/node/n2/task", False),
        ("n1", "n2", R, "swarm/main/node/n2/task", False),
        ("n1", "n1", R, "swarm/main/node/+/task", False),
        ("n1", "n1", R, "swarm/main/hub/status", True),
        ("a/b", "a/b", W, "swarm/main/node/a/b/status", False),
        ("hub", "hub", W, "swarm/main/node/n1/task", True),
        ("hub", "hub", R, "swarm/main/#", True),
        ("hub", "hub", W, "swarm/other/prompt", False),
        ("hub", "hub", W, "swarm/main/+/x", False),
        ("", "x", R, "swarm/main/reply/default", False),
        # Home Assistant: a node describes itself only; the hub clears any; HA logs in as the client.
        ("n1", "n1", W, "homeassistant/device/n1/config", True),
        ("n1", "n2", W, "homeassistant/device/n1/config", True),
        ("n1", "n1", W, "homeassistant/device/n2/config", False),
        ("n1", "n1", W, "homeassistant/sensor/n1/config", False),
        ("n1", "n1", W, "homeassistant/status", False),
        ("n1", "n1", R, "homeassistant/status", True),
        ("n1", "n1", R, "homeassistant/#", False),
        ("n1", "n1", R, "homeassistant/device/+/config", False),
        ("hub", "hub", W, "homeassistant/device/n1/config", True),
        ("hub", "hub", W, "homeassistant/+/n1/config", False),
        ("client", "c1", R, "homeassistant/#", True),
        ("client", "c1", R, "homeassistant/device/+/config", True),
        ("client", "c1", W, "homeassistant/status", True),
        ("client", "c1", W, "homeassistant/device/n1/config", False),
        ("client", "client", W, "homeassistant/device/client/config", False),
    ],
)
def test_rules(user: str, client_id: str, access: Access, topic: str, ok: bool) -> None:
    # client_id is there to show it changes nothing: rights follow the login only.
    role = role_of(user, frozenset({"alice", "bob"}))
    assert allowed(role=role, username=user, access=access, topic=topic, swarm="main") is ok


def test_roles_come_from_the_login() -> None:
    assert role_of("hub") is Role.HUB and role_of("client") is Role.CLIENT
    assert role_of("pixel7") is Role.NODE
    assert role_of("alice", frozenset({"alice"})) is Role.CLIENT
    assert role_of("node") is None  # reserved: the old shared node login means nothing now
    assert role_of("Bad Name") is None and role_of(None) is None


def test_covers() -> None:
    assert covers("a/#", "a/b/+")
    assert covers("a/+/c", "a/+/c")
    assert not covers("a/+/c", "a/#")
    assert not covers("a/b", "a/+")


def test_mosquitto_acl_renders_every_rule() -> None:
    text = mosquitto_acl("main")
    assert "user client\ntopic deny swarm/main/node/+/task" in text
    assert "topic write swarm/main/prompt" in text
    assert "topic read swarm/main/reply/default" in text
    assert "pattern write swarm/main/node/%u/result" in text
    assert "pattern read swarm/main/node/%u/task" in text
    assert "user hub\ntopic read swarm/main/#\ntopic write swarm/main/#" in text
    # Nothing follows the client id any more: a node connecting as "alice" reads nothing of hers.
    assert "%c" not in text
    assert "pattern read swarm/main/reply/" not in text and "pattern write swarm/main/prompt" not in text


def test_mosquitto_acl_gives_each_client_login_its_own_block() -> None:
    text = mosquitto_acl("main", frozenset({"alice"}))
    alice = next(block for block in text.split("\n\n") if block.startswith("user alice"))
    lines = alice.splitlines()
    assert {"topic write swarm/main/prompt/alice", "topic read swarm/main/reply/alice/#"} <= set(lines)
    # The node patterns reach alice too: her own denies (checked first) keep her from being a node.
    assert lines.index("topic deny swarm/main/node/alice/#") < lines.index("topic write swarm/main/prompt/alice")
    assert "reply/client" not in alice and "reply/bob" not in alice


def test_mosquitto_acl_renders_the_home_assistant_rules() -> None:
    text = mosquitto_acl("main")
    assert "pattern write homeassistant/device/%u/config\n" in text
    assert "pattern read homeassistant/status\n" in text
    hub, client = (block for block in text.split("\n\n") if block.startswith(("user hub", "user client")))
    assert "topic write homeassistant/#" in hub.splitlines()
    assert {"topic read homeassistant/#", "topic write homeassistant/status"} <= set(client.splitlines())
    # Mosquitto applies patterns to every user: without this deny, the client login could pose
    # as a node called "client" in Home Assistant. Denies come before the client's allows.
    lines = client.splitlines()
    assert lines.index("topic deny homeassistant/device/client/config") < lines.index("topic read homeassistant/#")
