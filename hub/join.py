"""The one-line join: the hub serves a node's installer and code over the LAN.

``swarm-hub enroll NODE`` prints one line for the new device::

    curl -fsS --pinnedpubkey 'sha256//<pin>' -k -H 'Authorization: Bearer <key>' \\
        https://10.0.0.1:8080/join/install.sh | sh -s -- <join token>

nova-swarm is not on a package index, so the gateway serves everything of ours the device needs:

    GET /join/install.sh                       the bootstrap (deploy/join.sh), with this hub's address,
                                               the pin and the key filled in; it picks the next one
    GET /join/termux.sh, /join/linux.sh        deploy/termux/install.sh and deploy/linux/install.sh
    GET /join/termux-uninstall.sh, ...         their uninstallers, which the installers keep on the device
    GET /join/nova_swarm-<v>-py3-none-any.whl  a wheel of the node's code (``nova_swarm.broker`` and
                                               ``nova_swarm.node``) of the very version this hub runs

Every one of them needs the node's *download key* as a bearer. The key is derived from the node's
enrolment (an HMAC of its broker password), so it stops working when the node is revoked or its
password rotated, and it gives away nothing the join token does not already hold. Third-party
dependencies still come from the device's usual package indexes: the wheel's ``Requires-Dist``
is the node's dependency list, read from this hub's installed metadata.

With TLS on, the gateway serves HTTPS with the broker's certificate. The device has no CA yet, so
curl checks the certificate's public key against the pin printed in the line.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import re
import threading
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata, resources
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.home import Enrolment, SwarmHome
from nova_swarm.broker.private import write_private

from .pins import node_files, source_root

DIST_NAME = "nova-swarm"
#: the console script and engine entry points a node needs (the rest belong to the hub)
NODE_ENTRY_POINTS = {
    "console_scripts": {"swarm-node": "nova_swarm.node.cli:main"},
    "nova_swarm.engines": {"llama": "nova_swarm.node.llama:LlamaEngine", "fake": "nova_swarm.node.fake:FakeEngine"},
}
#: the installers served, by route name: the files under hub/installers/ (links into deploy/)
INSTALLERS = {
    "install.sh": "join.sh",
    "termux.sh": "termux.sh",
    "linux.sh": "linux.sh",
    "termux-uninstall.sh": "termux-uninstall.sh",
    "linux-uninstall.sh": "linux-uninstall.sh",
}
#: a fixed timestamp for every wheel entry: the same code gives the same wheel
_EPOCH = (2020, 1, 1, 0, 0, 0)
_KEY_LABEL = b"nova-swarm join download"
_KEY_SHAPE = re.compile(r"([a-z0-9_-]{1,64})\.([0-9a-f]{32})")


class JoinRefused(Exception):
    """A download without a valid key: ``status`` is 401 (none given) or 403 (wrong or revoked)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- download keys


def download_key(enrolment: Enrolment) -> str:
    """``<node id>.<mac>``: what the node's installer sends as its bearer."""
    mac = hmac.new(enrolment.password.encode(), _KEY_LABEL + b"\0" + enrolment.node_id.encode(), hashlib.sha256)
    return f"{enrolment.node_id}.{mac.hexdigest()[:32]}"


def check_key(enrolments: Callable[[], Mapping[str, Enrolment]], authorization: str) -> str:
    """The node id a ``Authorization: Bearer <key>`` header belongs to; ``JoinRefused`` if none.

    ``enrolments`` is called only for a key of the right shape: anyone on the LAN can ask, and
    a request without one should not cost the gateway's loop a read of the enrolment file.
    """
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise JoinRefused(401, "no download key: use the exact line `swarm-hub enroll NODE` printed")
    shape = _KEY_SHAPE.fullmatch(key)
    enrolment = enrolments().get(shape.group(1)) if shape else None
    if enrolment is None or not hmac.compare_digest(download_key(enrolment), key):
        raise JoinRefused(403, "this download key is not valid (node revoked or re-enrolled?): run enroll again")
    return enrolment.node_id


# ---------------------------------------------------------------- the wheel


def wheel_name(version: str) -> str:
    return f"nova_swarm-{version}-py3-none-any.whl"


def node_requirements() -> list[str]:
    """The node's third-party dependencies (the base ones and the ``node`` extra's), from the
    metadata of the nova-swarm installed here, so they follow pyproject.toml."""
    try:
        declared = metadata.requires(DIST_NAME) or []
    except metadata.PackageNotFoundError as exc:
        raise ConfigError("nova-swarm is not installed here (pip install -e .), so there is no wheel to serve") from exc
    found = []
    for text in declared:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise ConfigError(f"nova-swarm's metadata has a bad requirement {text!r}: {exc}") from exc
        if req.name == DIST_NAME:
            continue
        if req.marker is not None:
            if not req.marker.evaluate({"extra": "node"}) or req.marker.evaluate({"extra": ""}):
                continue  # another extra's, or a platform marker this hub cannot judge for the device
            req.marker = None
        found.append(str(req))
    return found


def build_wheel(version: str, *, requires: list[str], packages: dict[str, Path] | None = None) -> bytes:
    """A wheel of the node's code: ``nova_swarm.broker`` (less its server) and ``nova_swarm.node`` with the
    ``swarm-node`` script, ``Requires-Dist`` set to ``requires``. Deterministic: the same files
    give the same bytes."""
    if version.endswith("+unknown"):
        raise ConfigError("this hub runs from a source tree that was never installed: pip install -e . first")
    files = node_files(packages or source_root())
    dist_info = f"nova_swarm-{version}.dist-info"
    meta = [
        "Metadata-Version: 2.1",
        f"Name: {DIST_NAME}",
        f"Version: {version}",
        "Summary: nova-swarm's node, as served by a hub for `swarm-hub enroll`",
        "Requires-Python: >=3.11",
        *(f"Requires-Dist: {r}" for r in requires),
    ]
    files[f"{dist_info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: nova-swarm hub\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(points.items())) + "\n"
        for group, points in NODE_ENTRY_POINTS.items()
    )
    files[f"{dist_info}/entry_points.txt"] = entry_points.encode()
    files[f"{dist_info}/top_level.txt"] = b"nova_swarm\n"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in sorted(files.items()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([name, f"sha256={digest}", len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        # dist-info last, as the wheel spec recommends
        for name in sorted(files, key=lambda n: (n.startswith(dist_info), n)):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, files[name])
    return out.getvalue()


def installer(name: str) -> str:
    """One of the served scripts (``install.sh``, ``termux.sh``, ``linux-uninstall.sh``...), unrendered."""
    return (resources.files("nova_swarm.hub") / "installers" / INSTALLERS[name]).read_text()


def render_bootstrap(template: str, *, hub_url: str, pin: str | None, key: str, wheel: str) -> str:
    """The bootstrap with this hub's address, pin, key and wheel name filled in (each a plain
    token, checked here, so nothing in them can break out of the script's quoting)."""
    values = {"@HUB_URL@": hub_url, "@PIN@": pin or "", "@KEY@": key, "@WHEEL@": wheel}
    for value in values.values():
        if not re.fullmatch(r"[A-Za-z0-9_.:/\[\]+=-]*", value):
            raise ValueError(f"refusing to put {value!r} into the installer")
    for placeholder, value in values.items():
        template = template.replace(placeholder, value)
    return template


# ---------------------------------------------------------------- TLS pin


def public_key_pin(cert_pem: bytes) -> str:
    """curl's ``--pinnedpubkey`` form: ``sha256//`` + base64 of the SHA-256 of the certificate's
    SubjectPublicKeyInfo."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


# ---------------------------------------------------------------- where the gateway listens


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where this home's gateway listens, written when it starts, read by ``enroll``."""

    host: str
    port: int
    #: the public-key pin of the certificate it serves; None: plain HTTP
    pin: str | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.pin is None else "https"


def endpoint_file(home: SwarmHome) -> Path:
    return home.path / "gateway.json"


def save_endpoint(home: SwarmHome, endpoint: Endpoint) -> None:
    write_private(endpoint_file(home), json.dumps(asdict(endpoint)))


def load_endpoint(home: SwarmHome) -> Endpoint | None:
    try:
        raw = json.loads(endpoint_file(home).read_text())
        return Endpoint(host=raw["host"], port=int(raw["port"]), pin=raw.get("pin"))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{endpoint_file(home)} is not valid: {exc}; restart `swarm-hub up`") from exc


def join_line(base_url: str, key: str, token: str, *, pin: str | None) -> str:
    """The line to paste on the device."""
    tls = f"--pinnedpubkey '{pin}' -k " if pin else ""
    return f"curl -fsS {tls}-H 'Authorization: Bearer {key}' {base_url}/join/install.sh | sh -s -- {token}"


# ---------------------------------------------------------------- the service


class JoinService:
    """What the gateway's ``/join/`` routes serve, for one hub home."""

    def __init__(self, home: SwarmHome, *, pin: str | None = None, version: str = __version__) -> None:
        self.home = home
        self.pin = pin
        self.version = version
        self._wheel: bytes | None = None
        self._lock = threading.Lock()

    #: the installers it serves by name (``install.sh`` is rendered for the asking node)
    installers = tuple(INSTALLERS)

    @property
    def wheel_name(self) -> str:
        return wheel_name(self.version)

    def installer(self, name: str) -> str:
        return installer(name)

    def authorize(self, authorization: str) -> str:
        return check_key(self.home.enrolments, authorization)

    def wheel(self) -> bytes:
        """Built on first use (in a worker thread: it reads a few hundred files), then kept."""
        with self._lock:
            if self._wheel is None:
                self._wheel = build_wheel(self.version, requires=node_requirements())
            return self._wheel

    def bootstrap(self, hub_url: str, key: str) -> str:
        return render_bootstrap(installer("install.sh"), hub_url=hub_url, pin=self.pin, key=key, wheel=self.wheel_name)
