"""Signed node bundles on this device: checking them, and the store they are swapped in from.

A bundle is a zip of the node's own code (``nova_swarm/broker`` and ``nova_swarm/node``) that
``swarm-hub bundle publish`` signs and retains on the broker. The store keeps a few versions
side by side and flips between them atomically::

    <state dir>/bundles/
        versions/0.2.0/nova_swarm/...    unpacked, never modified after the rename into place
        versions/0.2.0.manifest.json     the signed manifest it came with
        current  -> versions/0.2.0       the code the supervisor starts (a symlink, flipped by rename)
        previous -> versions/0.1.0       where a failed trial rolls back to (absent: the installed code)
        trial.json                       set while a new version has not yet come up healthy
        failed.json                      versions that failed their trial: never tried again
        health                           written by the node once it is online (the trial's proof)

The supervisor (``supervisor.py``) owns restarts and rollback; the node (``agent.py``) owns
fetching, checking and installing. Both go through this one class.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.version import InvalidVersion, Version

from nova_swarm.broker.contract.errors import ProtocolError, UpdateRefused
from nova_swarm.broker.contract.messages import BUNDLE_PACKAGES, BundleManifest, ModelPin, decode, parse_version
from nova_swarm.broker.contract.signing import PublicKey
from nova_swarm.broker.private import private_dir, write_private

#: A zip bomb guard: the node's code is well under a megabyte.
MAX_UNPACKED_BYTES = 64 * 2**20
#: the exit status with which a node asks its supervisor to restart it into the current bundle
RESTART_EXIT = 75


def verify_manifest(payload: bytes, key: PublicKey | None, model: type[BundleManifest] | type[ModelPin]) -> Any:
    """Parse a retained manifest and check its signature; ``UpdateRefused`` says why not."""
    try:
        envelope = json.loads(payload)
    except ValueError as exc:
        raise UpdateRefused(f"manifest is not JSON: {exc}") from exc
    if key is None:
        raise UpdateRefused("this node has no hub key to check signatures with (join with a new token, or --hub-key)")
    signed = key.verify(envelope)
    try:
        return decode(model, json.dumps(signed))
    except ProtocolError as exc:
        raise UpdateRefused(str(exc)) from exc


def claimed(payload: bytes, field: str) -> str:
    """What an unverified manifest says it is (``version``, ``name``), for reporting a refusal."""
    try:
        signed = json.loads(payload).get("signed", {})
        value = signed.get(field) if isinstance(signed, dict) else None
    except (ValueError, AttributeError):
        return "?"
    return value[:64] if isinstance(value, str) and value.isprintable() else "?"


def check_bundle(manifest: BundleManifest, *, swarm: str, running: str, failed: dict[str, str]) -> None:
    """Whether this node may move to ``manifest``'s version; raises ``UpdateRefused`` if not."""
    if manifest.swarm != swarm:
        raise UpdateRefused(f"bundle is for swarm {manifest.swarm!r}, this node is in {swarm!r}")
    try:
        wanted = Version(manifest.version)
    except InvalidVersion as exc:
        raise UpdateRefused(f"bundle version {manifest.version!r} is not a version") from exc
    if manifest.version in failed:
        raise UpdateRefused(f"bundle {manifest.version} was rolled back here before: {failed[manifest.version]}")
    if wanted < parse_version(running):
        raise UpdateRefused(f"bundle {manifest.version} is older than the running {running}")
    need = tuple(int(p) for p in manifest.min_python.split("."))
    if sys.version_info[:2] < need:
        have = ".".join(map(str, sys.version_info[:2]))
        raise UpdateRefused(f"bundle {manifest.version} needs Python {manifest.min_python}+, this node has {have}")


def assemble(manifest: BundleManifest, chunks: dict[int, bytes]) -> bytes:
    """The archive from its chunks, checked against the manifest's sizes and hashes."""
    archive = b"".join(chunks[i] for i in range(len(manifest.chunks)))
    if len(archive) != manifest.size_bytes:
        raise UpdateRefused(
            f"bundle {manifest.version} is {len(archive)} bytes, the manifest says {manifest.size_bytes}"
        )
    actual = hashlib.sha256(archive).hexdigest()
    if actual != manifest.sha256:
        raise UpdateRefused(f"bundle {manifest.version} sha256 is {actual}, the manifest says {manifest.sha256}")
    return archive


def unpack(archive: bytes, dest: Path) -> None:
    """Extract a bundle, refusing anything that could land outside ``dest`` or is not our code."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(archive))
    except zipfile.BadZipFile as exc:
        raise UpdateRefused(f"bundle is not a zip archive: {exc}") from exc
    with zf:
        total = 0
        for info in zf.infolist():
            path = PurePosixPath(info.filename)
            if (
                path.is_absolute()
                or ".." in path.parts
                or len(path.parts) < 3
                or path.parts[0] != "nova_swarm"
                or path.parts[1] not in BUNDLE_PACKAGES
                or info.is_dir()
                or (info.external_attr >> 16) & 0o170000 == 0o120000  # a symlink
            ):
                raise UpdateRefused(f"bundle holds an unexpected entry {info.filename!r}")
            total += info.file_size
            if total > MAX_UNPACKED_BYTES:
                raise UpdateRefused(f"bundle unpacks to more than {MAX_UNPACKED_BYTES // 2**20} MB")
        for package in BUNDLE_PACKAGES:
            if f"nova_swarm/{package}/__init__.py" not in zf.namelist():
                raise UpdateRefused(f"bundle has no nova_swarm/{package} package")
        for info in zf.infolist():
            target = dest.joinpath(*PurePosixPath(info.filename).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))


@dataclass(frozen=True, slots=True)
class Installed:
    version: str
    #: goes first on the node's PYTHONPATH
    path: Path


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = root / "versions"

    @property
    def health_file(self) -> Path:
        return self.root / "health"

    # ---------------------------------------------------------------- reading

    def _link(self, name: str) -> Installed | None:
        link = self.root / name
        try:
            target = os.readlink(link)
        except OSError:
            return None
        path = (self.root / target).resolve()
        if not (path / "nova_swarm").is_dir():
            return None
        return Installed(path.name, path)

    def current(self) -> Installed | None:
        return self._link("current")

    def previous(self) -> Installed | None:
        return self._link("previous")

    def failed(self) -> dict[str, str]:
        """Versions that failed their trial, with the reason."""
        raw = self._read("failed.json")
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def trial(self) -> str | None:
        raw = self._read("trial.json")
        return str(raw["version"]) if isinstance(raw, dict) and "version" in raw else None

    def _read(self, name: str) -> Any:
        try:
            return json.loads((self.root / name).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            # Written atomically, so only a hand edit gets here: treat it as absent, loudly.
            print(f"swarm-node: ignoring damaged {self.root / name}", file=sys.stderr)
            return None

    # ---------------------------------------------------------------- changing

    def install(self, manifest: BundleManifest, envelope: bytes, archive: bytes) -> Installed:
        """Unpack next to the other versions; the rename makes it appear whole or not at all."""
        private_dir(self.versions)  # unpacked code: no one else may change what the node runs
        final = self.versions / manifest.version
        if not (final / "nova_swarm").is_dir():
            staging = self.versions / f".{manifest.version}.staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                unpack(archive, staging)
                shutil.rmtree(final, ignore_errors=True)  # a half-made dir from a crash
                os.rename(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        write_private(self.versions / f"{manifest.version}.manifest.json", envelope.decode())
        return Installed(manifest.version, final)

    def start_trial(self, version: str) -> None:
        """Make ``version`` current; the old current becomes where a failure rolls back to."""
        old = self.current()
        if old is not None and old.version != version:
            self._flip("previous", old.version)
        elif old is None:
            (self.root / "previous").unlink(missing_ok=True)  # back to the installed code
        self._write("trial.json", {"version": version, "since": time.time()})
        self._flip("current", version)

    def confirm(self) -> None:
        """The trial's version came up healthy: keep it, and drop versions nobody points at."""
        (self.root / "trial.json").unlink(missing_ok=True)
        keep = {i.version for i in (self.current(), self.previous()) if i is not None}
        for entry in self.versions.glob("*"):
            version = entry.name.removesuffix(".manifest.json")
            if version not in keep and not entry.name.startswith("."):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def roll_back(self, reason: str) -> str | None:
        """The trial failed: remember why, and point ``current`` back at the previous version."""
        version = self.trial()
        if version is None:
            return None
        failed = self.failed()
        failed[version] = reason
        self._write("failed.json", failed)
        previous = self.previous()
        if previous is not None:
            self._flip("current", previous.version)
        else:
            (self.root / "current").unlink(missing_ok=True)
        (self.root / "previous").unlink(missing_ok=True)
        (self.root / "trial.json").unlink(missing_ok=True)
        return version

    def _flip(self, name: str, version: str) -> None:
        # A symlink made under a temporary name and renamed over the old one: readers see the
        # old target or the new, never a missing link.
        tmp = self.root / f".{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(Path("versions") / version, tmp)
        os.replace(tmp, self.root / name)

    def _write(self, name: str, value: Any) -> None:
        write_private(self.root / name, json.dumps(value, indent=2, sort_keys=True))
