"""Ed25519 signatures over the hub's retained manifests (model pins and node bundles).

The hub's signing key is made once, at setup, and never leaves its config directory; nodes get
the public key at install time (in the join token, or from the config directory on the hub's own
machine). A manifest travels as::

    {"signed": {...the manifest...}, "key_id": "3f2a...", "signature": "<base64>"}

The signature covers the canonical JSON of ``signed`` (sorted keys, no spaces, UTF-8), so a node
verifies exactly the bytes the hub meant, however the broker or a bridge re-encodes nothing.
Only this module touches ``cryptography``; its errors become ``SignatureError`` here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nova_swarm.broker.contract.errors import ConfigError, SignatureError
from nova_swarm.broker.private import write_private


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class PublicKey:
    raw: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """The 32-byte key as base64, the form `swarm-hub key` prints and join tokens carry."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"a hub key is 44 characters of base64: {exc}") from exc
        if len(raw) != 32:
            raise ConfigError(f"a hub key is 32 bytes, this one is {len(raw)}")
        return cls(raw)

    @property
    def text(self) -> str:
        return base64.b64encode(self.raw).decode()

    @property
    def key_id(self) -> str:
        """Short and stable: tells a node (and a person reading its status) which key signed."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, envelope: Any) -> dict[str, Any]:
        """The ``signed`` body, once its signature checks out; ``SignatureError`` says why not."""
        if not isinstance(envelope, dict) or "signed" not in envelope:
            raise SignatureError("unsigned manifest")
        signed, signature, key_id = envelope.get("signed"), envelope.get("signature"), envelope.get("key_id")
        if not isinstance(signed, dict) or not isinstance(signature, str) or not signature:
            raise SignatureError("unsigned manifest")
        try:
            sig = base64.b64decode(signature, validate=True)
            Ed25519PublicKey.from_public_bytes(self.raw).verify(sig, canonical(signed))
        except (binascii.Error, ValueError, InvalidSignature) as exc:
            if key_id != self.key_id:
                raise SignatureError(
                    f"signed by key {str(key_id)[:16]!r}, not the hub key {self.key_id} this node trusts"
                ) from exc
            raise SignatureError(f"signature does not verify with the hub key {self.key_id} (tampered?)") from exc
        return signed


@dataclass(frozen=True, slots=True)
class SigningKey:
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the hub's signing key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(path, pem.decode())

    @property
    def public(self) -> PublicKey:
        return PublicKey(
            self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    def sign(self, signed: dict[str, Any]) -> dict[str, Any]:
        signature = self.private.sign(canonical(signed))
        return {"signed": signed, "key_id": self.public.key_id, "signature": base64.b64encode(signature).decode()}
