"""Bundles without a broker: packing, checking, unpacking, and the store's atomic swap and rollback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import UpdateRefused
from nova_swarm.broker.contract.messages import BundleManifest
from nova_swarm.broker.contract.signing import SigningKey
from nova_swarm.hub import pins
from nova_swarm.node.bundles import BundleStore, assemble, check_bundle, unpack, verify_manifest


@pytest.fixture(scope="module")
def archive() -> bytes:
    return pins.pack_bundle(pins.source_root(), "0.2.0")


def manifest_for(archive: bytes, version: str = "0.2.0", **changes: object) -> BundleManifest:
    m = pins.bundle_manifest("main", archive, version, chunk_bytes=4096)
    return m.model_copy(update=changes)


def test_packing_is_deterministic_and_stamps_the_version(archive: bytes, tmp_path: Path) -> None:
    assert pins.pack_bundle(pins.source_root(), "0.2.0") == archive
    assert pins.pack_bundle(pins.source_root(), "0.2.1") != archive
    unpack(archive, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py")}
    assert "nova_swarm/node/agent.py" in names and "nova_swarm/broker/contract/messages.py" in names
    assert not any("hub/" in n or "__pycache__" in n for n in names)
    # The unpacked bundle is importable on its own path and reports its own version.
    probe = (
        "import nova_swarm.broker.contract.version as v, nova_swarm.node.agent as a; print(v.__version__, a.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True
    )
    version, where = out.stdout.split()
    assert version == "0.2.0" and where.startswith(str(tmp_path)), out.stderr


def test_chunks_reassemble_only_when_every_byte_matches(archive: bytes) -> None:
    m = manifest_for(archive)
    chunks = {i: archive[i * 4096 : (i + 1) * 4096] for i in range(len(m.chunks))}
    assert len(m.chunks) > 1 and assemble(m, chunks) == archive
    chunks[0] = b"x" + chunks[0][1:]
    with pytest.raises(UpdateRefused, match="sha256 is"):
        assemble(m, chunks)


def test_versions_and_pythons_and_swarms_are_checked(archive: bytes) -> None:
    ok = manifest_for(archive)
    check_bundle(ok, swarm="main", running="0.1.0", failed={})
    with pytest.raises(UpdateRefused, match="older than the running 0.3.0"):
        check_bundle(ok, swarm="main", running="0.3.0", failed={})
    with pytest.raises(UpdateRefused, match="rolled back here before: exited with status 1"):
        check_bundle(ok, swarm="main", running="0.1.0", failed={"0.2.0": "exited with status 1"})
    with pytest.raises(UpdateRefused, match="needs Python 3.99"):
        check_bundle(manifest_for(archive, min_python="3.99"), swarm="main", running="0.1.0", failed={})
    with pytest.raises(UpdateRefused, match="for swarm 'lab'"):
        check_bundle(manifest_for(archive, swarm="lab"), swarm="main", running="0.1.0", failed={})


def test_a_signed_manifest_needs_the_key_and_the_schema(archive: bytes) -> None:
    key = SigningKey.generate()
    payload = json.dumps(key.sign(manifest_for(archive).model_dump(mode="json"))).encode()
    assert verify_manifest(payload, key.public, BundleManifest).version == "0.2.0"
    with pytest.raises(UpdateRefused, match="no hub key"):
        verify_manifest(payload, None, BundleManifest)
    with pytest.raises(UpdateRefused, match="not JSON"):
        verify_manifest(b"\xff", key.public, BundleManifest)
    broken = json.dumps(key.sign({"kind": "bundle", "version": "../../x"})).encode()
    with pytest.raises(UpdateRefused, match="invalid BundleManifest"):
        verify_manifest(broken, key.public, BundleManifest)


def zip_of(entries: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return out.getvalue()


BASE = {"nova_swarm/broker/__init__.py": b"", "nova_swarm/node/__init__.py": b""}


@pytest.mark.parametrize(
    ("entries", "symlink", "reason"),
    [
        ({**BASE, "nova_swarm/node/../../../evil.py": b""}, None, "unexpected entry"),
        ({**BASE, "/etc/cron.d/x": b""}, None, "unexpected entry"),
        ({**BASE, "nova_swarm/hub/hub.py": b""}, None, "unexpected entry"),
        ({**BASE, "sitecustomize.py": b""}, None, "unexpected entry"),
        (BASE, "nova_swarm/node/link.py", "unexpected entry"),
        ({"nova_swarm/node/__init__.py": b""}, None, "no nova_swarm/broker package"),
    ],
    ids=["dotdot", "absolute", "other-package", "top-level", "symlink", "incomplete"],
)
def test_unpack_refuses_anything_but_our_code(
    entries: dict[str, bytes], symlink: str | None, reason: str, tmp_path: Path
) -> None:
    with pytest.raises(UpdateRefused, match=reason):
        unpack(zip_of(entries, symlink=symlink), tmp_path / "out")
    assert not (tmp_path / "evil.py").exists()
    with pytest.raises(UpdateRefused, match="not a zip"):
        unpack(b"PK\x03\x04 garbage", tmp_path / "out")


def test_the_store_swaps_atomically_and_rolls_back(archive: bytes, tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles")
    assert store.current() is None and store.trial() is None
    v2 = manifest_for(archive, "0.2.0")
    store.install(v2, b"{}", archive)
    assert store.current() is None  # installed is not running
    store.start_trial("0.2.0")
    assert store.current() and store.current().version == "0.2.0"  # type: ignore[union-attr]
    assert store.previous() is None and store.trial() == "0.2.0"
    store.confirm()
    assert store.trial() is None

    archive3 = pins.pack_bundle(pins.source_root(), "0.3.0")
    store.install(manifest_for(archive3, "0.3.0"), b"{}", archive3)
    store.start_trial("0.3.0")
    assert store.current().version == "0.3.0" and store.previous().version == "0.2.0"  # type: ignore[union-attr]
    assert store.roll_back("exited with status 1 before coming online") == "0.3.0"
    assert store.current().version == "0.2.0" and store.trial() is None  # type: ignore[union-attr]
    assert store.failed() == {"0.3.0": "exited with status 1 before coming online"}
    assert os.path.islink(store.root / "current") and not list(store.root.glob(".current*"))

    # Confirming prunes what neither link points at; a failed first trial goes back to the installed code.
    store.confirm()
    assert sorted(p.name for p in store.versions.iterdir()) == ["0.2.0", "0.2.0.manifest.json"]
    fresh = BundleStore(tmp_path / "fresh")
    fresh.install(v2, b"{}", archive)
    fresh.start_trial("0.2.0")
    fresh.roll_back("did not come online within 5 s")
    assert fresh.current() is None and "0.2.0" in fresh.failed()
