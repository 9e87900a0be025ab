"""Ed25519 manifests: what verifies, what does not, and the hub key's journey to a node."""

from __future__ import annotations

import copy
import json

import pytest

from nova_swarm.broker.contract.errors import ConfigError, SignatureError
from nova_swarm.broker.contract.signing import PublicKey, SigningKey, canonical
from nova_swarm.broker.home import SwarmHome, parse_join_token
from nova_swarm.hub.cli import main as swarm_hub

SIGNED = {"kind": "bundle", "version": "0.2.0", "chunks": ["ab" * 32], "created": 1.5, "name": "é"}


def test_a_signed_manifest_verifies_and_comes_back_unchanged() -> None:
    key = SigningKey.generate()
    envelope = key.sign(SIGNED)
    # It survives the wire: JSON out and back in, key order shuffled by whoever relays it.
    relayed = json.loads(json.dumps(envelope, sort_keys=False))
    assert key.public.verify(relayed) == SIGNED
    assert envelope["key_id"] == key.public.key_id


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e["signed"].__setitem__("version", "0.3.0"),
        lambda e: e["signed"]["chunks"].append("cd" * 32),
        lambda e: e.__setitem__("signature", e["signature"][:-4] + "AAA="),
    ],
    ids=["field", "list", "signature"],
)
def test_any_change_breaks_the_signature(tamper: object) -> None:
    key = SigningKey.generate()
    envelope = copy.deepcopy(key.sign(SIGNED))
    tamper(envelope)  # type: ignore[operator]
    with pytest.raises(SignatureError, match="does not verify with the hub key"):
        key.public.verify(envelope)


def test_another_key_is_named_as_such() -> None:
    hub, intruder = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(SignatureError, match=f"signed by key '{intruder.public.key_id}', not the hub key"):
        hub.public.verify(intruder.sign(SIGNED))


@pytest.mark.parametrize("envelope", [SIGNED, {"signed": SIGNED}, {"signed": SIGNED, "signature": ""}, [], "x", None])
def test_unsigned_is_refused(envelope: object) -> None:
    with pytest.raises(SignatureError, match="unsigned manifest"):
        SigningKey.generate().public.verify(envelope)


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA"])
def test_a_bad_public_key_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="hub key"):
        PublicKey.parse(text)


def test_setup_makes_a_private_key_and_enrolment_hands_out_its_public_half(tmp_path: object, capsys: object) -> None:
    home = SwarmHome(tmp_path / "config")  # type: ignore[operator]
    home.ensure()
    assert home.signing_key_file.stat().st_mode & 0o777 == 0o600
    key = home.signing_key()
    assert home.ensure() and home.signing_key().public == key.public  # made once, kept
    assert swarm_hub(["enroll", "pixel7", "--config-dir", str(home.path)]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    token = next(word for word in out.split() if word.startswith("nova1."))
    joined = parse_join_token(token)
    assert joined.hub_key == key.public.text
    # On the phone: the key comes from the token, and is what the node trusts.
    phone = SwarmHome(tmp_path / "phone")  # type: ignore[operator]
    phone.save_joined(joined)
    assert phone.hub_public_key() == key.public
    assert b"PRIVATE" not in token.encode() and "PRIVATE" not in out
