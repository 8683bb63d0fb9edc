"""The enrollment service (gRPC over TLS, proto/enrollment.proto).

A hospital sends a one-time token, its name and its public keys; the coordinator checks the
token, registers the SuperNode key with the SuperLink (Flower's own registration) and adds
the identity key to the member list. Every refusal is a gRPC status whose details say why
(PERMISSION_DENIED for tokens, ALREADY_EXISTS for taken names and keys, INVALID_ARGUMENT for
malformed keys) and an audit-log entry; no secret is ever logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedmri.common.fingerprint import members_request_payload
from fedmri.proto import enrollment_pb2 as pb
from fedmri.proto import enrollment_pb2_grpc as pb_grpc
from fedmri.proto.names import check_hospital_name
from fedmri.server.home import CoordinatorSettings
from fedmri.server.registry import EnrollmentRefused, Registry

log = logging.getLogger("fedmri.server")

NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
CLOCK_SKEW_S = 300
REFUSALS_PER_MINUTE = 10  # per peer address; more are refused without an audit entry


def check_node_key(data: bytes) -> bytes:
    """An OpenSSH EC public key on a NIST curve, as Flower's node authentication takes, in
    canonical form (no comment, one encoding): the same key always compares equal."""
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"the SuperNode key is not an OpenSSH public key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise ValueError("the SuperNode key must be an EC key on a NIST curve (P-256/384/521)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


class _RefusalLimit:
    """At most REFUSALS_PER_MINUTE refused requests per peer address are audited and
    answered in full; the rest are turned away at once (no audit-log flooding, no guessing
    at speed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}

    def exceeded(self, peer: str) -> bool:
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(host, deque())
            while recent and now - recent[0] > 60:
                recent.popleft()
            return len(recent) >= REFUSALS_PER_MINUTE

    def count(self, peer: str) -> None:
        with self._lock:
            self._recent.setdefault(peer.rsplit(":", 1)[0], deque()).append(time.monotonic())


class EnrollmentService(pb_grpc.EnrollmentServicer):
    def __init__(self, settings: CoordinatorSettings, registry: Registry,
                 register: Callable[[bytes, str], int],
                 unregister: Callable[[int], None]) -> None:
        self.settings, self.registry = settings, registry
        self.register, self.unregister = register, unregister
        self.limit = _RefusalLimit()

    def _members(self) -> list[pb.Member]:
        return [pb.Member(hospital=h, identity_public_key=k)
                for h, k in sorted(self.registry.members().items())]

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, action: str,
                subject: str, reason: str) -> None:
        self.limit.count(context.peer())
        self.registry.audit(context.peer(), action, subject, "refused", reason)
        context.abort(code, reason)

    def _check_rate(self, context: grpc.ServicerContext) -> None:
        if self.limit.exceeded(context.peer()):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many refused requests from "
                          "this address; wait a minute")

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext
               ) -> pb.EnrollReply:
        peer = context.peer()
        self._check_rate(context)
        try:
            hospital = check_hospital_name(request.hospital)
            node_key = check_node_key(request.node_public_key)
            if len(request.identity_public_key) != 32:
                raise ValueError("the identity key must be a raw 32-byte Ed25519 public key")
        except ValueError as err:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "enroll", request.hospital,
                         str(err))
        try:
            enrolled = self.registry.enroll(
                request.token, hospital, node_key, bytes(request.identity_public_key),
                lambda key: self.register(key, hospital), self.unregister, actor=peer)
        except EnrollmentRefused as err:
            self.limit.count(peer)
            code = (grpc.StatusCode.ALREADY_EXISTS if err.conflict
                    else grpc.StatusCode.PERMISSION_DENIED)
            log.info("event=enroll_refused hospital=%s peer=%s reason=%r", hospital, peer,
                     str(err))
            context.abort(code, str(err))
        except RuntimeError as err:  # the SuperLink did not take the key; token unspent
            self.registry.audit(peer, "enroll", hospital, "failed", str(err))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"registration failed: {err}")
        except Exception as err:  # ours: the details go to the audit log, not to the peer
            log.exception("event=enroll_failed hospital=%s", hospital)
            self.registry.audit(peer, "enroll", hospital, "failed", repr(err))
            context.abort(grpc.StatusCode.INTERNAL, "the coordinator failed to enroll you; "
                          "its operator sees why in `fedmri server audit`")
        log.info("event=enrolled hospital=%s node=%d peer=%s", hospital, enrolled.node_id, peer)
        return pb.EnrollReply(federation=self.settings.name, fleet_port=self.settings.port,
                              node_id=enrolled.node_id, members=self._members())

    def Members(self, request: pb.MembersRequest, context: grpc.ServicerContext
                ) -> pb.MembersReply:
        self._check_rate(context)
        found = self.registry.hospital(request.hospital)
        reason = None
        if found is None or found.revoked is not None:
            reason = f"{request.hospital[:80]!r} is not an enrolled hospital"
        elif abs(time.time() - request.unix_time) > CLOCK_SKEW_S:
            reason = "the request's time is more than 5 minutes off the coordinator's clock"
        else:
            try:
                Ed25519PublicKey.from_public_bytes(found.identity_key).verify(
                    request.signature,
                    members_request_payload(request.hospital, request.unix_time))
            except InvalidSignature:
                reason = "the request is not signed by the hospital's enrolled identity key"
        if reason:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "members",
                         request.hospital, reason)
        return pb.MembersReply(members=self._members())


def serve(service: EnrollmentService, bind: str, port: int, cert_chain: bytes,
          key: bytes) -> grpc.Server:
    """Start the enrollment service over TLS; the caller stops it (`server.stop(grace)`)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 * 1024)])
    pb_grpc.add_EnrollmentServicer_to_server(service, server)
    address = f"{bind}:{port}"
    if server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert_chain)])) == 0:
        raise RuntimeError(f"the enrollment service cannot listen on {address}")
    server.start()
    return server
