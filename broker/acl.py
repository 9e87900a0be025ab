"""Who may publish and subscribe where: one rule table for both brokers.

The embedded broker checks it in ``plugins.py``; Mosquitto mode renders it to an ACL file with
:func:`mosquitto_acl`. Patterns use ``{sid}`` for the swarm id, ``{user}`` for the login (a node's
username is its node id, so a node can only speak for itself) and ``{client}`` for the MQTT
client id (a client's private reply topic is named after it).

Home Assistant's topics (``homeassistant.py``) sit outside ``swarm/`` and are shared by every
swarm on the broker: a node may publish its own discovery config, the hub may clear any (when it
revokes a node), and the client login, which Home Assistant uses, reads them all and announces
Home Assistant's own status.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .errors import ConfigError
from .home import Role
from .homeassistant import DEFAULT_PREFIX as _HA
from .topics import DEFAULT_REPLY, check_node_id, is_concrete, matches


class Access(StrEnum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class Rule:
    role: Role
    access: Access
    pattern: str


_NODE_OWN = "swarm/{sid}/node/{user}"

RULES: tuple[Rule, ...] = (
    # The hub runs the swarm: it reads and writes everything under the swarm's root.
    Rule(Role.HUB, Access.READ, "swarm/{sid}/#"),
    Rule(Role.HUB, Access.WRITE, "swarm/{sid}/#"),
    # ... and clears a revoked node's Home Assistant device.
    Rule(Role.HUB, Access.WRITE, f"{_HA}/#"),
    # A node speaks only under its own id, and hears only its own work plus the swarm's pins.
    *(
        Rule(Role.NODE, Access.WRITE, f"{_NODE_OWN}/{leaf}")
        for leaf in ("announce", "status", "heartbeat", "result", "stream")
    ),
    *(Rule(Role.NODE, Access.READ, f"{_NODE_OWN}/{leaf}") for leaf in ("task", "cancel")),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/hub/status"),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/model"),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/bundle"),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/bundle/chunk/+"),
    # Home Assistant: a node describes only itself, and hears when Home Assistant restarts.
    Rule(Role.NODE, Access.WRITE, f"{_HA}/device/{{user}}/config"),
    Rule(Role.NODE, Access.READ, f"{_HA}/status"),
    # A client asks, reads its own answers (and the shared default reply topic), and may watch
    # the fleet (for `swarm-hub nodes` and dashboards).
    Rule(Role.CLIENT, Access.WRITE, "swarm/{sid}/prompt"),
    Rule(Role.CLIENT, Access.WRITE, "swarm/{sid}/cancel"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/reply/{client}"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/reply/{client}/#"),
    Rule(Role.CLIENT, Access.READ, f"swarm/{{sid}}/reply/{DEFAULT_REPLY}"),
    Rule(Role.CLIENT, Access.READ, f"swarm/{{sid}}/reply/{DEFAULT_REPLY}/stream/+"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/hub/#"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/metrics/#"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/model"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/bundle"),
    *(Rule(Role.CLIENT, Access.READ, f"swarm/{{sid}}/node/+/{leaf}") for leaf in ("announce", "status", "heartbeat")),
    # Home Assistant logs in as the client: it reads discovery and announces itself.
    Rule(Role.CLIENT, Access.READ, f"{_HA}/#"),
    Rule(Role.CLIENT, Access.WRITE, f"{_HA}/status"),
)


def role_of(username: str | None) -> Role | None:
    """``hub`` and ``client`` are those roles; any other valid id is an enrolled node's login."""
    if not username:
        return None
    if username in (Role.HUB, Role.CLIENT):
        return Role(username)
    try:
        check_node_id(username)
    except ConfigError:
        return None
    return Role.NODE


def covers(rule: str, topic_filter: str) -> bool:
    """True when every topic that ``topic_filter`` can match is also matched by ``rule``."""
    r_levels = rule.split("/")
    f_levels = topic_filter.split("/")
    for i, r in enumerate(r_levels):
        if r == "#":
            return True
        if i >= len(f_levels):
            return False
        f = f_levels[i]
        if f == "#":
            return False
        if r == "+":
            continue
        if f == "+" or f != r:
            return False
    return len(r_levels) == len(f_levels)


def allowed(*, role: Role | None, username: str, client_id: str, access: Access, topic: str, swarm: str) -> bool:
    """May ``username`` (of ``role``) connected as ``client_id`` read (subscribe/receive) or write ``topic``?

    ``topic`` is a filter when reading (wildcards allowed) and must be concrete when writing.
    """
    if role is None:
        return False
    if access is Access.WRITE and not is_concrete(topic):
        return False
    for rule in RULES:
        if rule.role is not role or rule.access is not access:
            continue
        pattern = _render(rule.pattern, swarm=swarm, username=username, client_id=client_id)
        if pattern is None:
            continue
        if access is Access.WRITE and matches(pattern, topic):
            return True
        if access is Access.READ and covers(pattern, topic):
            return True
    return False


def _plain_level(value: str) -> bool:
    return bool(value) and not any(c in value for c in "/+#\0")


def _render(pattern: str, *, swarm: str, username: str, client_id: str) -> str | None:
    # A name that is not a single plain topic level can never own topics.
    if "{user}" in pattern and not _plain_level(username):
        return None
    if "{client}" in pattern and not _plain_level(client_id):
        return None
    return pattern.replace("{sid}", swarm).replace("{user}", username).replace("{client}", client_id)


def mosquitto_acl(swarm: str) -> str:
    """The same rules as a Mosquitto ``acl_file``.

    Every enrolled node is a user of its own, covered by the ``%u`` patterns. Mosquitto applies
    ``pattern`` lines to every user, so the ``client`` user gets explicit denies for node topics
    it must never touch (a user's own lines win over patterns); the hub and the client are never
    node ids (``RESERVED_NODE_IDS``), so the patterns give them nothing else of use.
    """
    lines = ["# Generated by nova-swarm from broker/acl.py: edit that, not this file.", ""]
    for role in (Role.HUB, Role.CLIENT):
        lines.append(f"user {role.value}")
        if role is Role.CLIENT:
            for leaf in ("task", "cancel", "result"):
                lines.append(f"topic deny swarm/{swarm}/node/+/{leaf}")
            # The node pattern below would let the client publish a device called "client".
            lines.append(f"topic deny {_HA}/device/{role.value}/config")
        for rule in RULES:
            if rule.role is role and "{client}" not in rule.pattern:
                lines.append(f"topic {rule.access.value} {rule.pattern.replace('{sid}', swarm)}")
        lines.append("")
    # Every node rule is a pattern (nodes have no user block of their own), and so is each
    # client rule naming the client id. Patterns reach every user: harmless for the hub, which
    # may do all of it anyway, and for clients, thanks to the denies above.
    for rule in RULES:
        if rule.role is Role.NODE or "{client}" in rule.pattern:
            pattern = rule.pattern.replace("{sid}", swarm).replace("{user}", "%u").replace("{client}", "%c")
            lines.append(f"pattern {rule.access.value} {pattern}")
    return "\n".join(lines) + "\n"
