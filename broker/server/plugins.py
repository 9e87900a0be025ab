"""amqtt plugins, the embedded broker's logins and ACL (the broker class itself is ``hardened.py``).

Loaded by dotted path from ``embedded.py``'s explicit plugin set; nothing else is loaded (no
anonymous auth, no ``$SYS``, no packet logger). See the team notes (BROKERS.md) for the defects these
work around.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from nova_swarm.broker.identity import client_id_allowed
from nova_swarm.broker.passwords import LoginCheck
from nova_swarm.broker.server.acl import Access, allowed, role_of

#: Where PasswordAuth leaves the login and role it verified, for TopicACL: the role of a plain
#: name (a node or a client login) is known only from the password file, which only
#: PasswordAuth reads. The login is kept with it because a CONNECT that resumes a session gets
#: the old session object with the new username: a role verified for another login then counts
#: for nothing (TopicACL denies), never for the new one.
_ROLE = "nova_swarm_login"


class PasswordAuth(BaseAuthPlugin):
    """Checks logins against the ``$7$`` password file shared with Mosquitto mode.

    amqtt's own file auth runs argon2 on the event loop (~124 ms per CONNECT). Our hashes are
    101 PBKDF2 rounds over 192-bit random passwords, ~50 us each, and a verified login is cached,
    so the broker's loop never stalls on a burst of connects. The file is re-read when it changes,
    so an enrolled, rotated or revoked login takes effect without a restart.

    Client ids are bound to logins (``identity.py``): a node must connect with its own derived
    id, and nobody but the hub may use the hub's namespace or a node's. Otherwise one login
    could take over another's connection (MQTT drops the older of two sessions with one client
    id, and amqtt leaves the older one deaf).
    """

    @dataclass
    class Config:
        password_file: str

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.check = LoginCheck(Path(self.config.password_file))

    async def authenticate(self, *, session: Session) -> bool | None:
        self.check.reload()
        role = role_of(session.username, self.check.clients)
        # A session reused for a new CONNECT keeps no role from an earlier login.
        setattr(session, _ROLE, None)
        if role is None or not self.check(session.username, session.password):
            return False
        if not client_id_allowed(
            role, username=session.username or "", password=session.password, client_id=session.client_id or ""
        ):
            return False
        setattr(session, _ROLE, (session.username, role))
        return True


class TopicACL(BaseTopicPlugin):
    """Applies ``acl.RULES``. amqtt treats a ``None`` as deny, so we always answer a bool."""

    @dataclass
    class Config:
        swarm: str

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        access = Access.WRITE if action == Action.PUBLISH else Access.READ
        verified = getattr(session, _ROLE, None)
        role = verified[1] if isinstance(verified, tuple) and verified[0] == session.username else None
        return allowed(
            role=role,
            username=session.username or "",
            access=access,
            topic=topic,
            swarm=self.config.swarm,
        )


__all__ = ["PasswordAuth", "TopicACL"]
