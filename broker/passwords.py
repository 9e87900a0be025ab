"""Password hashes in Mosquitto's ``$7$`` format (PBKDF2-SHA512), read by both brokers.

One format means one generated password file serves the embedded amqtt broker and Mosquitto
mode alike. The passwords themselves are 192-bit random tokens, so Mosquitto's default of 101
PBKDF2 rounds costs microseconds and never stalls a broker's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from pathlib import Path

from nova_swarm.broker.private import write_private

ITERATIONS = 101
SALT_BYTES = 12


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, kind, rounds, salt_b64, digest_b64 = encoded.split("$")
        if kind != "7":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        iterations = int(rounds)
    except ValueError:
        return False
    actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(actual, expected)


def read_password_file(path: Path) -> dict[str, str]:
    """``user:$7$...`` lines -> {user: encoded hash}. Blank lines and ``#`` comments are skipped."""
    return _hashes(path.read_text())


def _hashes(text: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if sep:
            entries[user] = encoded
    return entries


#: The first line of a password file names its client logins, so the embedded broker tells a
#: client's login from a node's (both are plain names) from the one file it watches. Both brokers
#: skip ``#`` lines.
_CLIENTS_HEADER = "# clients:"


def write_password_file(path: Path, logins: dict[str, str], *, clients: frozenset[str] = frozenset()) -> None:
    """Write hashes for ``{user: password}``, readable by the owner only; ``clients`` names
    the logins that are client logins (the rest are nodes, the hub and the shared client)."""
    header = f"{_CLIENTS_HEADER} {' '.join(sorted(clients))}\n"
    text = header + "".join(f"{user}:{hash_password(pw)}\n" for user, pw in sorted(logins.items()))
    write_private(path, text)


def read_client_logins(path: Path) -> frozenset[str]:
    """The client logins a password file names (none for a file without the header)."""
    return _client_logins(path.read_text())


def _client_logins(text: str) -> frozenset[str]:
    for line in text.splitlines():
        if line.startswith(_CLIENTS_HEADER):
            return frozenset(line[len(_CLIENTS_HEADER) :].split())
    return frozenset()


class FileWatch:
    """Yields each time a file is replaced or modified (polling: inotify is not on every phone).

    The file's state is taken when the watch is created, so a change made between creating it
    and first iterating it is still seen: create the watch before reading the file.
    """

    def __init__(self, path: Path, *, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self._last = self._stamp()

    def _stamp(self) -> tuple[int, int, float] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime)

    async def __aiter__(self) -> AsyncIterator[None]:
        while True:
            await asyncio.sleep(self.interval)
            now = self._stamp()
            if now != self._last:
                self._last = now
                yield


class LoginCheck:
    """Checks logins against a password file, re-reading it when it changes.

    A verified password is remembered by its digest, so re-checking every connected client after
    a change (to drop revoked ones) costs almost nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, float] | None = None
        self._hashes: dict[str, str] = {}
        self._verified: dict[str, bytes] = {}
        #: the client logins the file names (``read_client_logins``)
        self.clients: frozenset[str] = frozenset()
        self.reload()

    def reload(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime)
        if stamp != self._stamp:
            # One read for both: a file replaced in between would pair hashes and client
            # logins of two versions.
            text = self.path.read_text()
            self._hashes = _hashes(text)
            self.clients = _client_logins(text)
            self._verified.clear()
            self._stamp = stamp

    def __call__(self, username: str | None, password: str | None) -> bool:
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
