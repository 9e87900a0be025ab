"""The hub's side of pins: pack and sign node bundles, sign model pins, retain both on the broker.

    archive = pack_bundle(source_root(), "0.2.0")
    await publish_bundle(conn, topics, key, archive, "0.2.0")
    await publish_model_pin(conn, topics, key, model_pin("main", "gemma-3-270m", sha256, url=...))

A bundle is chunked into retained messages on ``bundle/chunk/{i}`` and published before its
manifest, so a node that sees the manifest finds every chunk already there. Chunks left from a
longer earlier bundle are cleared. The manifest goes out last and retained on ``bundle``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from packaging.version import Version

from nova_swarm.broker.contract.errors import ConfigError, ProtocolError
from nova_swarm.broker.contract.messages import (
    BUNDLE_LEAVES_OUT,
    BUNDLE_PACKAGES,
    BundleManifest,
    ModelPin,
    RouteTable,
    decode,
    parse_version,
)
from nova_swarm.broker.contract.signing import PublicKey, SigningKey
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.link.base import Link
from nova_swarm.broker.link.connection import Connection

#: well under every broker's packet limit (EMQX defaults to 1 MB)
CHUNK_BYTES = 256 * 1024
#: a fixed timestamp for every archive entry: the same code and version give the same sha256
_EPOCH = (2020, 1, 1, 0, 0, 0)
_VERSION_FILE = "nova_swarm/broker/contract/version.py"


def source_root() -> dict[str, Path]:
    """The node code installed next to this hub, by package: what `bundle publish` ships by default.

    Found, not imported: the hub never imports the node."""
    found = {}
    for package in BUNDLE_PACKAGES:
        spec = importlib.util.find_spec(f"nova_swarm.{package}")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"nova_swarm.{package} is not installed here: pass --from a source checkout")
        found[package] = Path(next(iter(spec.submodule_search_locations)))
    return found


def tree_from(directory: Path) -> dict[str, Path]:
    """``--from DIR``: a source checkout (with ``broker/`` and ``node/``) or an unpacked bundle."""
    for base in (directory, directory / "nova_swarm"):
        found = {p: base / p for p in BUNDLE_PACKAGES}
        if all((path / "__init__.py").is_file() for path in found.values()):
            return found
    raise ConfigError(f"{directory} has no broker/ and node/ packages to bundle")


def node_files(packages: dict[str, Path]) -> dict[str, bytes]:
    """The node's source files by archive name (``nova_swarm/node/agent.py``), in a stable order:
    what a bundle and the join wheel both carry. No caches, and no broker server code."""
    files: dict[str, bytes] = {}
    for name, root in sorted(packages.items()):
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_dir() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo"):
                continue
            if any(f"{name}/{rel.as_posix()}".startswith(f"{leave}/") for leave in BUNDLE_LEAVES_OUT):
                continue
            files[f"nova_swarm/{name}/{rel.as_posix()}"] = path.read_bytes()
    return files


def pack_bundle(packages: dict[str, Path], version: str) -> bytes:
    """A deterministic zip of the node's code, with ``__version__`` stamped to ``version`` so the
    running node announces exactly the bundle it came from."""
    parse_version(version)
    entries = node_files(packages)
    entries[_VERSION_FILE] = (
        f'"""The version of this node bundle, stamped by `swarm-hub bundle publish`."""\n\n__version__ = {version!r}\n'
    ).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in sorted(entries.items()):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return out.getvalue()


def bundle_manifest(swarm: str, archive: bytes, version: str, *, chunk_bytes: int = CHUNK_BYTES) -> BundleManifest:
    chunks = [archive[i : i + chunk_bytes] for i in range(0, len(archive), chunk_bytes)]
    return BundleManifest(
        swarm=swarm,
        version=version,
        sha256=hashlib.sha256(archive).hexdigest(),
        size_bytes=len(archive),
        min_python=f"{sys.version_info.major}.{sys.version_info.minor}",
        chunk_bytes=chunk_bytes,
        chunks=[hashlib.sha256(c).hexdigest() for c in chunks],
        created=time.time(),
    )


def model_pin(
    swarm: str,
    name: str,
    sha256: str,
    *,
    url: str | None = None,
    size_bytes: int | None = None,
    tags: list[str] | None = None,
    more: list[dict[str, Any]] | None = None,
) -> ModelPin:
    """A pin of one model (``more``: further entries, as ``PinnedModel`` fields)."""
    payload = {
        "swarm": swarm,
        "name": name,
        "sha256": sha256.lower(),
        "url": url,
        "size_bytes": size_bytes,
        "tags": tags or [],
        # Microseconds since the epoch: grows with every pin, so nodes can refuse a replayed one.
        "serial": time.time_ns() // 1000,
        "created": time.time(),
        "more": more or [],
    }
    return decode(ModelPin, json.dumps(payload))


def with_model(swarm: str, current: dict[str, Any] | None, entry: dict[str, Any]) -> ModelPin:
    """The pin ``current`` (a signed body, or None) with ``entry`` added, or put in place of the
    entry of the same name (``ProtocolError`` for a bad one)."""
    if current is None:
        return model_pin(swarm, **entry)
    entries = [e for e in _entries(current) if e.get("name") != entry["name"]] + [entry]
    return model_pin(swarm, **entries[0], more=entries[1:])


def without_model(swarm: str, current: dict[str, Any], name: str) -> ModelPin | None:
    """The pin ``current`` with model ``name`` taken out (None: nothing left pinned); ConfigError
    when it is not pinned."""
    entries = _entries(current)
    left = [e for e in entries if e.get("name") != name]
    if len(left) == len(entries):
        raise ConfigError(f"{name} is not pinned (`swarm-hub model show`)")
    return model_pin(swarm, **left[0], more=left[1:]) if left else None


def _entries(signed: dict[str, Any]) -> list[dict[str, Any]]:
    fields = ("name", "sha256", "url", "size_bytes", "tags")
    more = signed.get("more")
    rest = [m for m in more if isinstance(m, dict)] if isinstance(more, list) else []
    return [{k: e.get(k) for k in fields} for e in [signed, *rest]]


def route_table(swarm: str, routes: dict[str, str], *, after: int = 0) -> RouteTable:
    """A new route table (``ProtocolError`` for a bad tag or model name). Its serial is past
    ``after`` (the table it replaces), even from a machine whose clock is behind."""
    serial = max(time.time_ns() // 1000, after + 1)
    payload = {"swarm": swarm, "routes": routes, "serial": serial, "created": time.time()}
    return decode(RouteTable, json.dumps(payload))


def unverified_signed(payload: bytes) -> dict[str, Any] | None:
    """The ``signed`` body of a retained manifest, unchecked: for display, never to act on."""
    try:
        envelope = json.loads(payload) if payload else None
    except ValueError:
        return None
    signed = envelope.get("signed") if isinstance(envelope, dict) else None
    return signed if isinstance(signed, dict) else None


async def current_manifest(conn: Connection, topic: str, wait_s: float = 2.0) -> dict[str, object] | None:
    """The ``signed`` body retained on ``topic`` now, if any (unverified: for display and checks)."""
    await conn.subscribe(topic, qos=1)
    try:
        async with asyncio.timeout(wait_s):
            async for message in conn.messages():
                if message.topic == topic:
                    return unverified_signed(message.payload)
    except TimeoutError:
        return None
    finally:
        await conn.unsubscribe(topic)
    return None


async def publish_bundle(
    conn: Connection,
    topics: Topics,
    key: SigningKey,
    archive: bytes,
    version: str,
    *,
    previous_chunks: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
) -> BundleManifest:
    manifest = bundle_manifest(topics.swarm, archive, version, chunk_bytes=chunk_bytes)
    for i in range(len(manifest.chunks)):
        chunk = archive[i * chunk_bytes : (i + 1) * chunk_bytes]
        await conn.publish(topics.bundle_chunk(i), chunk, qos=1, retain=True)
    for i in range(len(manifest.chunks), previous_chunks):
        await conn.publish(topics.bundle_chunk(i), b"", qos=1, retain=True)  # clears a leftover
    envelope = key.sign(manifest.model_dump(mode="json"))
    await conn.publish(topics.bundle(), json.dumps(envelope).encode(), qos=1, retain=True)
    return manifest


async def publish_model_pin(conn: Link, topics: Topics, key: SigningKey, pin: ModelPin) -> None:
    envelope = key.sign(pin.signed_body())
    await conn.publish(topics.model(), json.dumps(envelope).encode(), qos=1, retain=True)


def verified_routes(
    payload: bytes, key: PublicKey | None, swarm: str, *, follows: RouteTable | None = None
) -> RouteTable | None:
    """The retained route table, once its signature checks out with ``key`` (the hub's own)
    and it is no older than the one ``follows``: None when cleared; ``ProtocolError`` or
    ``SignatureError`` when it is not to be followed."""
    if not payload:
        return None
    if key is None:
        raise ProtocolError("this hub has no signing key to check it with")
    try:
        signed = key.verify(json.loads(payload))
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    table = decode(RouteTable, json.dumps(signed))
    if table.swarm != swarm:
        raise ProtocolError(f"it is for swarm {table.swarm!r}")
    if follows is not None and table.serial < follows.serial:
        raise ProtocolError(f"it is older (serial {table.serial}) than the one followed ({follows.serial})")
    return table


async def publish_routes(conn: Link, topics: Topics, key: SigningKey, table: RouteTable) -> None:
    envelope = key.sign(table.model_dump(mode="json"))
    await conn.publish(topics.routes(), json.dumps(envelope).encode(), qos=1, retain=True)


async def unpin_model(conn: Connection, topics: Topics) -> None:
    await conn.publish(topics.model(), b"", qos=1, retain=True)


def check_newer(version: str, pinned: dict[str, object] | None) -> None:
    """The hub's own rollback guard: nodes refuse an older bundle anyway; say so before publishing."""
    if pinned is None or not isinstance(pinned.get("version"), str):
        return
    current = str(pinned["version"])
    if Version(version) <= Version(current):
        raise ConfigError(f"bundle {current} is already published: pass a higher --version than that")
