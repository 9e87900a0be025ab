"""amqtt plugins and the hardened broker class: the embedded broker's security boundary.

Loaded by dotted path from ``embedded.py``'s explicit plugin set; nothing else is loaded (no
anonymous auth, no ``$SYS``, no packet logger). See the team notes (BROKERS.md) for the defects these
work around.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from .acl import Access, allowed, role_of
from .passwords import read_password_file, verify_password


class PasswordAuth(BaseAuthPlugin):
    """Checks logins against the ``$7$`` password file shared with Mosquitto mode.

    amqtt's own file auth runs argon2 on the event loop (~124 ms per CONNECT). Our hashes are
    101 PBKDF2 rounds over 192-bit random passwords, ~50 us each, and a verified login is cached
    by a digest of the password, so the broker's loop never stalls on a burst of connects.
    The file is re-read when it changes, so a rotated password takes effect without a restart.
    """

    @dataclass
    class Config:
        password_file: str

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._path = Path(self.config.password_file)
        self._mtime: float | None = None
        self._hashes: dict[str, str] = {}
        self._verified: dict[str, bytes] = {}
        self._reload()

    def _reload(self) -> None:
        mtime = os.stat(self._path).st_mtime
        if mtime != self._mtime:
            self._hashes = read_password_file(self._path)
            self._verified.clear()
            self._mtime = mtime

    async def authenticate(self, *, session: Session) -> bool | None:
        self._reload()
        username, password = session.username, session.password
        if not username or password is None:
            return False
        encoded = self._hashes.get(username)
        if encoded is None:
            return False
        digest = hashlib.sha256(password.encode()).digest()
        if self._verified.get(username) == digest:
            return True
        if verify_password(password, encoded):
            self._verified[username] = digest
            return True
        return False


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
        return allowed(
            role=role_of(session.username),
            client_id=session.client_id or "",
            access=access,
            topic=topic,
            swarm=self.config.swarm,
        )


class HardenedBroker(Broker):
    """amqtt's broker with the retained-message leak closed.

    On every CONNECT, amqtt 0.12.1 replays retained messages for *every* filter any client ever
    subscribed to, to the new client, past its ACL (BROKERS.md, defect 1). We only let a replay
    through when this session actually holds that subscription, which it only got past the ACL.
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, _ = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)
