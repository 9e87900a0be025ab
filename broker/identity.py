"""Client ids bound to logins: who may connect under which MQTT client id.

MQTT drops the older of two connections that share a client id, and amqtt 0.12.1 even drops the
older one's subscriptions while leaving its socket open (BROKERS.md). So whoever can pick the
hub's or a node's client id can silence it. Two defences, one per broker:

* The hub's and each node's client id is derived from its own password (an HMAC), so it is
  stable across restarts (a persistent session can resume) yet no other login can compute it::

      hub-{swarm}-{16 hex}        the hub's main connection
      node-{node_id}-{12 hex}     a node

* The embedded broker (``plugins.PasswordAuth``) also refuses, before anything else happens,
  any login that uses an id in these namespaces that is not its own (:func:`client_id_allowed`),
  and (``hardened.py``) any id that another login holds connected right now, so client logins,
  which pick their own ids, cannot knock each other off either.
  Mosquitto cannot tie ids to users with a password file and an ACL file, so there the
  unguessable suffix is what isolates the hub and the nodes.

Nothing grants rights by client id any more: reply topics belong to logins (``acl.py``).
"""

from __future__ import annotations

import hashlib
import hmac

from nova_swarm.broker.home import Role

HUB_PREFIX = "hub-"
NODE_PREFIX = "node-"
_DOMAIN = b"nova-swarm client id"


def _tag(password: str | None, length: int) -> str:
    return hmac.new((password or "").encode(), _DOMAIN, hashlib.sha256).hexdigest()[:length]


def hub_client_id(swarm: str, password: str | None) -> str:
    """The hub's client id for ``swarm``: only a holder of the hub's password can compute it."""
    return f"{HUB_PREFIX}{swarm}-{_tag(password, 16)}"


def node_client_id(node_id: str, password: str | None) -> str:
    """A node's client id: only a holder of that node's password can compute it."""
    return f"{NODE_PREFIX}{node_id}-{_tag(password, 12)}"


def client_id_allowed(role: Role, *, username: str, password: str | None, client_id: str) -> bool:
    """May this (already verified) login connect under ``client_id``?

    The hub's login may use any id (it may do anything in the swarm anyway). A node must use
    its own derived id. Everyone else stays out of the hub's and the nodes' namespaces.
    """
    if role is Role.HUB:
        return True
    if role is Role.NODE:
        # As bytes: compare_digest raises TypeError on a str with non-ASCII, which a peer chooses.
        return hmac.compare_digest(client_id.encode(), node_client_id(username, password).encode())
    return not client_id.startswith((HUB_PREFIX, NODE_PREFIX))
