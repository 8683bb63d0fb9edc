"""A private certificate authority and the coordinator's server certificate.

`fedmri server init` makes a CA that lives as long as the federation (its key stays with the
coordinator, 0600) and a server certificate for the hosts hospitals connect to; `simulate`
makes a fresh pair per run. The server certificate file carries the CA after the leaf, so a
hospital's first contact can read the CA from the handshake and check it against the
fingerprint it was given (fedmri.common.fingerprint).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmri.common.checkpoint import atomic_write, write_private
from fedmri.common.fingerprint import fingerprint

PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path  # the leaf, then the CA
    server_key: Path
    ca_key: Path | None = None  # kept only by a long-lived CA (`fedmri server init`)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "fedmri"),
                      x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ca_fingerprint(ca_pem: bytes) -> str:
    """The fingerprint of a CA certificate (of its DER bytes), as hospitals compare it."""
    return fingerprint(x509.load_pem_x509_certificate(ca_pem).public_bytes(
        serialization.Encoding.DER))


def make_tls_files(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                   days: int = 30, ca_name: str = "fedmri run CA",
                   keep_ca_key: bool = False) -> TlsFiles:
    """A CA and a server certificate valid for `hosts` (IP addresses or DNS names)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name(ca_name)).issuer_name(_name(ca_name))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                            False, False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                     folder / "ca.key" if keep_ca_key else None)
    if files.ca_key is not None:
        write_private(files.ca_key, _private_pem(ca_key))
    write_private(files.server_key, _private_pem(key))
    ca_pem = ca_cert.public_bytes(PEM)
    atomic_write(files.ca_cert, lambda fh: fh.write(ca_pem), mode=0o644)
    chain = cert.public_bytes(PEM) + ca_pem
    atomic_write(files.server_cert, lambda fh: fh.write(chain), mode=0o644)
    return files


def not_valid_after(cert_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
