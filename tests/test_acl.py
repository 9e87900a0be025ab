"""The ACL rule table, checked directly; the brokers apply it in test_broker.py."""

from __future__ import annotations

import pytest

from nova_swarm.broker.acl import Access, allowed, covers, mosquitto_acl
from nova_swarm.broker.home import Role

R, W = Access.READ, Access.WRITE


@pytest.mark.parametrize(
    ("role", "client_id", "access", "topic", "ok"),
    [
        (Role.CLIENT, "c1", W, "swarm/main/prompt", True),
        (Role.CLIENT, "c1", R, "swarm/main/reply/#", True),
        (Role.CLIENT, "c1", R, "swarm/main/reply/c1", True),
        (Role.CLIENT, "c1", R, "swarm/main/node/+/status", True),
        (Role.CLIENT, "c1", R, "swarm/main/node/+/task", False),
        (Role.CLIENT, "c1", R, "swarm/main/#", False),
        (Role.CLIENT, "c1", W, "swarm/main/node/c1/announce", False),
        (Role.CLIENT, "c1", W, "swarm/main/reply/x", False),
        (Role.NODE, "n1", W, "swarm/main/node/n1/result", True),
        (Role.NODE, "n1", W, "swarm/main/node/n1/status", True),
        (Role.NODE, "n1", W, "swarm/main/node/n2/status", False),
        (Role.NODE, "n1", W, "swarm/main/hub/status", False),
        (Role.NODE, "n1", W, "swarm/main/prompt", False),
        (Role.NODE, "n1", R, "swarm/main/node/n1/task", True),
        (Role.NODE, "n1", R, "swarm/main/node/n2/task", False),
        (Role.NODE, "n1", R, "swarm/main/node/+/task", False),
        (Role.NODE, "a/b", W, "swarm/main/node/a/b/status", False),
        (Role.HUB, "hub", W, "swarm/main/node/n1/task", True),
        (Role.HUB, "hub", R, "swarm/main/#", True),
        (Role.HUB, "hub", W, "swarm/other/prompt", False),
        (Role.HUB, "hub", W, "swarm/main/+/x", False),
        (None, "x", R, "swarm/main/reply/#", False),
    ],
)
def test_rules(role: Role | None, client_id: str, access: Access, topic: str, ok: bool) -> None:
    assert allowed(role=role, client_id=client_id, access=access, topic=topic, swarm="main") is ok


def test_covers() -> None:
    assert covers("a/#", "a/b/+")
    assert covers("a/+/c", "a/+/c")
    assert not covers("a/+/c", "a/#")
    assert not covers("a/b", "a/+")


def test_mosquitto_acl_renders_every_rule() -> None:
    text = mosquitto_acl("main")
    assert "user client\ntopic deny swarm/main/node/+/task" in text
    assert "topic write swarm/main/prompt" in text
    assert "pattern write swarm/main/node/%c/result" in text
    assert "pattern read swarm/main/node/%c/task" in text
    assert "user hub\ntopic read swarm/main/#\ntopic write swarm/main/#" in text
