"""The hospital's side of enrollment: keys made here, only public halves sent.

First contact: the coordinator's CA is read from the TLS handshake and accepted only if its
fingerprint is the one the coordinator gave out (by phone, e-mail, ...); from then on every
connection verifies the server against that CA.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmri.common.checkpoint import atomic_write, write_private
from fedmri.common.fingerprint import fingerprint, members_request_payload, normalize
from fedmri.common.identity import load_identity
from fedmri.proto import enrollment_pb2 as pb
from fedmri.proto import enrollment_pb2_grpc as pb_grpc

TIMEOUT_S = 30.0


class EnrollmentError(RuntimeError):
    """Enrollment or a member-list request failed; the message says why and what to do."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EnrollmentError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_ca(address: str, expected: str, timeout_s: float = 10.0) -> bytes:
    """The CA certificate (PEM) the server at `address` presents in its chain, if its
    fingerprint is `expected`; else EnrollmentError (a wrong server or a typo)."""
    host, port = split_address(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust comes from the fingerprint check below
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            chain_of = getattr(tls, "get_unverified_chain", None) or \
                tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
            ders = [cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                    for cert in chain_of() or []]
    except OSError as err:
        raise EnrollmentError(f"cannot reach the coordinator at {address}: {err}") from err
    want = normalize(expected)
    for der in ders:
        if fingerprint(der) == want:
            return ssl.DER_cert_to_PEM_cert(der).encode()
    offered = ", ".join(fingerprint(d) for d in ders) or "none"
    raise EnrollmentError(
        f"the server at {address} presents no CA with fingerprint {want} (it offers {offered})."
        " Check the fingerprint with the coordinator by phone; a mismatch can mean the "
        "connection is intercepted. Nothing was sent.")


def make_node_key(private_path: Path, public_path: Path) -> bytes:
    """A SuperNode authentication key (EC P-384, OpenSSH format, 0600); its public half."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    atomic_write(public_path, lambda fh: fh.write(public + b"\n"), mode=0o644)
    return public


@dataclass(frozen=True)
class Enrolled:
    federation: str
    fleet_port: int
    node_id: int
    members: dict[str, bytes]


def _channel(address: str, ca_pem: bytes) -> grpc.Channel:
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_pem))


def _refusal(err: grpc.RpcError, address: str) -> EnrollmentError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return EnrollmentError(f"the enrollment service at {address} is unavailable: {details}")
    return EnrollmentError(f"the coordinator at {address} refused: {details}")


def enroll(address: str, ca_pem: bytes, token: str, hospital: str, node_public: bytes,
           identity_public: bytes) -> Enrolled:
    request = pb.EnrollRequest(token=token, hospital=hospital, node_public_key=node_public,
                               identity_public_key=identity_public)
    with _channel(address, ca_pem) as channel:
        try:
            reply = pb_grpc.EnrollmentStub(channel).Enroll(request, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            raise _refusal(err, address) from None
    return Enrolled(reply.federation, reply.fleet_port, reply.node_id,
                    {m.hospital: bytes(m.identity_public_key) for m in reply.members})


def fetch_members(address: str, ca_pem: bytes, hospital: str, identity_key: Path
                  ) -> dict[str, bytes]:
    """The member list the coordinator announces, asked for with a signed request."""
    key = load_identity(identity_key)
    now = int(time.time())
    request = pb.MembersRequest(hospital=hospital, unix_time=now,
                                signature=key.sign(members_request_payload(hospital, now)))
    with _channel(address, ca_pem) as channel:
        try:
            reply = pb_grpc.EnrollmentStub(channel).Members(request, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            raise _refusal(err, address) from None
    return {m.hospital: bytes(m.identity_public_key) for m in reply.members}
