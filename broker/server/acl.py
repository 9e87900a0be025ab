"""Who may publish and subscribe where: one rule table for both brokers.

The embedded broker checks it in ``plugins.py``; Mosquitto mode renders it to an ACL file with
:func:`mosquitto_acl`. Patterns use ``{sid}`` for the swarm id and ``{user}`` for the login: a
node's username is its node id, so a node can only speak for itself, and a client login's name
is its scope, so only it may write ``prompt/{user}`` and read ``reply/{user}``. No right ever
follows the MQTT client id, which any login may choose (``identity.py``).

Logins: ``hub``; the shared ``client`` login (held by everyone given it: its ``reply/client`` is
shared by them all); named client logins (``swarm-hub enroll --client NAME``, and the gateway's
own); and one login per node. Client names and node ids share one namespace.

Home Assistant's topics (``homeassistant.py``) sit outside ``swarm/`` and are shared by every
swarm on the broker: a node may publish its own discovery config, the hub may clear any (when it
revokes a node), and the client login, which Home Assistant uses, reads them all and announces
Home Assistant's own status.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.homeassistant import DEFAULT_PREFIX as _HA
from nova_swarm.broker.contract.topics import SHARED_SCOPE, check_node_id, is_concrete, matches
from nova_swarm.broker.home import Role


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
        for leaf in ("announce", "status", "heartbeat", "result", "stream", "progress")
    ),
    *(Rule(Role.NODE, Access.READ, f"{_NODE_OWN}/{leaf}") for leaf in ("task", "cancel")),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/hub/status"),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/model"),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/bundle"),
    Rule(Role.NODE, Access.READ, "swarm/{sid}/bundle/chunk/+"),
    # Home Assistant: a node describes only itself, and hears when Home Assistant restarts.
    Rule(Role.NODE, Access.WRITE, f"{_HA}/device/{{user}}/config"),
    Rule(Role.NODE, Access.READ, f"{_HA}/status"),
    # A client asks in its own scope (the hub learns the scope from the topic) or in the shared
    # one, reads its own login's answers and the shared ones, and may watch the fleet (for
    # `swarm-hub nodes` and dashboards).
    Rule(Role.CLIENT, Access.WRITE, "swarm/{sid}/prompt"),
    Rule(Role.CLIENT, Access.WRITE, "swarm/{sid}/cancel"),
    Rule(Role.CLIENT, Access.WRITE, "swarm/{sid}/prompt/{user}"),
    Rule(Role.CLIENT, Access.WRITE, "swarm/{sid}/cancel/{user}"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/reply/{user}"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/reply/{user}/#"),
    Rule(Role.CLIENT, Access.READ, f"swarm/{{sid}}/reply/{SHARED_SCOPE}"),
    Rule(Role.CLIENT, Access.READ, f"swarm/{{sid}}/reply/{SHARED_SCOPE}/#"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/hub/#"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/metrics/#"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/model"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/bundle"),
    Rule(Role.CLIENT, Access.READ, "swarm/{sid}/routes"),
    *(Rule(Role.CLIENT, Access.READ, f"swarm/{{sid}}/node/+/{leaf}") for leaf in ("announce", "status", "heartbeat")),
    # Home Assistant logs in as the client: it reads discovery and announces itself.
    Rule(Role.CLIENT, Access.READ, f"{_HA}/#"),
    Rule(Role.CLIENT, Access.WRITE, f"{_HA}/status"),
)


def role_of(username: str | None, clients: frozenset[str] = frozenset()) -> Role | None:
    """``hub`` and ``client`` are those roles, a name in ``clients`` (the client logins the
    password file lists) is a client; any other valid id is an enrolled node's login."""
    if not username:
        return None
    if username in (Role.HUB, Role.CLIENT):
        return Role(username)
    if username in clients:
        return Role.CLIENT
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


def allowed(*, role: Role | None, username: str, access: Access, topic: str, swarm: str) -> bool:
    """May ``username`` (of ``role``) read (subscribe/receive) or write ``topic``?

    ``topic`` is a filter when reading (wildcards allowed) and must be concrete when writing.
    """
    if role is None:
        return False
    if access is Access.WRITE and not is_concrete(topic):
        return False
    for rule in RULES:
        if rule.role is not role or rule.access is not access:
            continue
        pattern = _render(rule.pattern, swarm=swarm, username=username)
        if pattern is None:
            continue
        if access is Access.WRITE and matches(pattern, topic):
            return True
        if access is Access.READ and covers(pattern, topic):
            return True
    return False


def _plain_level(value: str) -> bool:
    return bool(value) and not any(c in value for c in "/+#\0")


def _render(pattern: str, *, swarm: str, username: str) -> str | None:
    # A name that is not a single plain topic level can never own topics.
    if "{user}" in pattern and not _plain_level(username):
        return None
    return pattern.replace("{sid}", swarm).replace("{user}", username)


def mosquitto_acl(swarm: str, clients: frozenset[str] | tuple[str, ...] = ()) -> str:
    """The same rules as a Mosquitto ``acl_file``, for the hub, the shared client login, the
    named client logins ``clients`` and every enrolled node.

    Mosquitto cannot tell a node's login from a client's, and applies ``pattern`` lines to every
    user. So only node rules are patterns (``%u``: nodes are enrolled without touching this
    file), and the hub and each client login get a block of their own: a user's own lines are
    checked before patterns, so a client's denies keep the node patterns from giving it a node
    of its name (whose tasks it would then read), and the client rules, not being patterns,
    give a node nothing. Rewritten whenever the client logins change.
    """
    lines = ["# Generated by nova-swarm from broker/server/acl.py: edit that, not this file.", ""]
    users = [Role.HUB.value, Role.CLIENT.value, *sorted(set(clients) - {Role.HUB.value, Role.CLIENT.value})]
    for user in users:
        role = Role.HUB if user == Role.HUB.value else Role.CLIENT
        lines.append(f"user {user}")
        if role is Role.CLIENT:
            for leaf in ("task", "cancel", "result"):
                lines.append(f"topic deny swarm/{swarm}/node/+/{leaf}")
            # The node patterns below would let this login act as a node called by its name.
            lines.append(f"topic deny swarm/{swarm}/node/{user}/#")
            lines.append(f"topic deny {_HA}/device/{user}/config")
        for rule in RULES:
            if rule.role is role:
                pattern = rule.pattern.replace("{sid}", swarm).replace("{user}", user)
                lines.append(f"topic {rule.access.value} {pattern}")
        lines.append("")
    # Patterns reach every user: harmless for the hub, which may do all of it anyway, and for
    # client logins, thanks to the denies above.
    for rule in RULES:
        if rule.role is Role.NODE:
            pattern = rule.pattern.replace("{sid}", swarm).replace("{user}", "%u")
            lines.append(f"pattern {rule.access.value} {pattern}")
    return "\n".join(lines) + "\n"
