"""The swarm's own certificate authority, for ``mqtts://`` on a LAN with no public CA.

``swarm-hub up --tls`` (or ``swarm-broker --tls``) makes, once, in the config dir's ``tls/``::

    ca.pem          the swarm's CA certificate: nodes and clients pin it (it goes into join tokens)
    ca-key.pem      its private key (0600); only needed to issue a new broker certificate
    server.pem      the broker's certificate, for the names and addresses it is reached by
    server-key.pem  its private key (0600)

The broker certificate is reissued, by the same CA, when it does not cover a name the broker
is now reached by, so pinned CAs stay valid. That is checked each time the broker (or
``swarm-hub up``) starts, and every ``RECHECK_S`` while it runs (``watch``): a laptop that
joins another network, or gets a new DHCP lease, serves a certificate for its new address to
new connections without a restart, and the phones already connected stay connected. The
reissued certificate keeps the broker's key, so the key pin in join lines already handed out
stays valid.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.link import net
from nova_swarm.broker.private import write_private

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

CA_DAYS = 3650
SERVER_DAYS = 825
#: how often a running broker re-reads its addresses. Cheap (a few ioctls); a phone that joins
#: by a new address within this long after the laptop moved sees the old certificate and retries.
RECHECK_S = 30.0

log = structlog.get_logger("nova_swarm.broker")


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def broker_names(listen_host: str) -> list[str]:
    """Every name and address a broker listening on ``listen_host`` is reached by, here or on the LAN.

    Loopback, the host name and its mDNS name (``<hostname>.local``, what discovery announces)
    always; then the listen address itself, or for a wildcard listener every LAN interface
    address, so a phone that joins by IP verifies the certificate too.
    """
    host = socket.gethostname()
    names = ["localhost", "127.0.0.1", "::1", host, net.mdns_name(), f"{host}.local"]
    if listen_host in ("", "0.0.0.0"):
        names += net.lan_ipv4_addresses()
    elif listen_host == "::":  # a dual-stack listener: reached over both
        names += net.lan_addresses()
    else:
        names.append(listen_host)
    return list(dict.fromkeys(names))


def _kept_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """The broker's existing EC key, or None when there is none (or it is unreadable)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def ensure(tls_dir: Path, names: list[str]) -> TLSFiles:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:
        raise ConfigError("TLS needs the `cryptography` package: pip install 'nova-swarm[hub]'") from exc

    files = TLSFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server-key.pem")
    ca_key_file = tls_dir / "ca-key.pem"
    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> str:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    if files.ca.exists() and ca_key_file.exists():
        ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{ca_key_file} is not the swarm CA's EC key")
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nova-swarm CA {socket.gethostname()}")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_private(ca_key_file, pem_key(ca_key))
        write_private(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM).decode())

    wanted: list[x509.GeneralName] = []
    for name in names:
        try:
            wanted.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            wanted.append(x509.DNSName(name))
    if files.cert.exists() and files.key.exists():
        current = x509.load_pem_x509_certificate(files.cert.read_bytes())
        try:
            covered = set(current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            covered = set()
        fresh = current.not_valid_after_utc > now + datetime.timedelta(days=30)
        if fresh and set(wanted) <= covered and current.issuer == ca_cert.subject:
            return files

    # A new certificate keeps the broker's key: the join one-liner pins that key's hash, and
    # lines already handed out keep working when the certificate is reissued for a new address.
    key = _kept_key(files.key) or ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.key, pem_key(key))
    write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM).decode())
    return files


async def watch(
    files: TLSFiles, listen_host: str, reload: Callable[[TLSFiles], None], *, every_s: float = RECHECK_S
) -> None:
    """Until cancelled, every ``every_s`` seconds: reissue the certificate when it no longer
    covers the names and addresses the broker is reached by, then ``reload`` it into the
    listener. New connections get the new certificate; connections already up keep theirs."""
    tls_dir = files.cert.parent

    def reissued() -> tuple[TLSFiles, list[str]] | None:
        before = files.cert.read_bytes() if files.cert.exists() else b""
        names = broker_names(listen_host)
        fresh = ensure(tls_dir, names)
        return (fresh, names) if fresh.cert.read_bytes() != before else None

    while True:
        await asyncio.sleep(every_s)
        try:
            outcome = await asyncio.to_thread(reissued)
        except (OSError, ConfigError) as exc:  # a full disk must not stop a running broker
            log.warning("cannot reissue the broker certificate; serving the old one", error=str(exc))
            continue
        if outcome is not None:
            fresh, names = outcome
            reload(fresh)
            log.info("broker certificate reissued for new addresses", names=names)
