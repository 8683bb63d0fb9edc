"""Key agreement, share encryption and identity signatures for secure aggregation.

- X25519 ephemeral keys, fresh each round: one pair (c) to encrypt Shamir shares to a
  neighbour, one pair (s) whose agreement with a neighbour seeds the pairwise mask. The raw
  Diffie-Hellman output goes through HKDF-SHA256 with a label that names the purpose, run,
  round and the two hospitals, so keys from different purposes or rounds are independent.
- AES-256-GCM for shares, with associated data binding (run, round, stage, sender, receiver):
  a share replayed from another round, or rerouted to another hospital, fails authentication.
- Ed25519 long-term identity keys, pinned by every party, sign each hospital's ephemeral
  public keys for (run, round), so the server cannot substitute its own keys (no MITM), and
  the survivor set a hospital was shown (the consistency check), so the server cannot tell
  different hospitals different stories about who survived.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .codec import canonical
from .errors import MalformedMessageError, SecAggError, ShareAuthenticationError, SignatureError

KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 12
SHARE_KEY_LABEL = "fedmri/secagg/share-key/v1"
PAIR_SEED_LABEL = "fedmri/secagg/pair-seed/v1"
ADVERTISE_LABEL = "fedmri/secagg/advertise/v1"
SHARE_AD_LABEL = "fedmri/secagg/share-ad/v1"
SURVIVORS_LABEL = "fedmri/secagg/survivors/v1"
SHARE_SIGNATURE_LABEL = "fedmri/secagg/share-signature/v1"

_RAW = serialization.Encoding.Raw


def new_identity() -> Ed25519PrivateKey:
    """A hospital's long-term signing key (kept at the hospital; its public half is pinned)."""
    return Ed25519PrivateKey.generate()


def identity_public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def derive(private: X25519PrivateKey, peer_public: bytes, peer: str, info: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public), info) -> 32 bytes; errors name the peer."""
    try:
        public = X25519PublicKey.from_public_bytes(peer_public)
    except ValueError as exc:
        raise MalformedMessageError(
            f"hospital {peer}: ephemeral public key is not a valid X25519 key "
            f"({len(peer_public)} bytes)") from exc
    try:
        shared = private.exchange(public)
    except ValueError as exc:  # all-zero output: a low-order point
        raise SecAggError(f"hospital {peer}: key agreement failed (low-order public key); "
                          "refusing its keys") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def check_x25519_public(raw: bytes, hospital: str, which: str) -> None:
    """Refuse an ephemeral public key that is not 32 bytes or is a low-order point (its key
    agreement gives all zeros whatever the private key: it would break every neighbour's
    masking step, or make its masks predictable)."""
    if len(raw) != KEY_BYTES:
        raise MalformedMessageError(
            f"hospital {hospital}: its {which} public key is {len(raw)} bytes, not {KEY_BYTES}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError as exc:
        raise MalformedMessageError(
            f"hospital {hospital}: its {which} public key is a low-order X25519 point; "
            "refusing it") from exc


def _pair_info(label: str, run_id: str, round_: int, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return canonical(label, run_id, round_, low, high)


def share_key(c_private: X25519PrivateKey, peer_c_public: bytes, run_id: str, round_: int,
              me: str, peer: str) -> bytes:
    """Symmetric AES key for shares between `me` and `peer` (same on both ends)."""
    return derive(c_private, peer_c_public, peer, _pair_info(SHARE_KEY_LABEL, run_id, round_,
                                                                me, peer))


def pair_seed(s_private: X25519PrivateKey, peer_s_public: bytes, run_id: str, round_: int,
              me: str, peer: str) -> bytes:
    """Seed of the pairwise mask between `me` and `peer` (same on both ends)."""
    return derive(s_private, peer_s_public, peer, _pair_info(PAIR_SEED_LABEL, run_id, round_,
                                                                me, peer))


def share_ad(run_id: str, round_: int, stage: str, sender: str, receiver: str) -> bytes:
    return canonical(SHARE_AD_LABEL, run_id, round_, stage, sender, receiver)


def encrypt_share(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext, ad); a random nonce per message."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_share(key: bytes, blob: bytes, ad: bytes, sender: str, receiver: str) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except (InvalidTag, ValueError) as exc:
        raise ShareAuthenticationError(
            f"share from hospital {sender} to {receiver} failed AES-GCM authentication "
            "(tampered in transit, misrouted, or replayed from another round); refusing it") \
            from exc


def advertise_payload(run_id: str, round_: int, hospital: str, c_public: bytes,
                      s_public: bytes) -> bytes:
    return canonical(ADVERTISE_LABEL, run_id, round_, hospital, c_public, s_public)


def sign_advertise(identity: Ed25519PrivateKey, run_id: str, round_: int, hospital: str,
                   c_public: bytes, s_public: bytes) -> bytes:
    return identity.sign(advertise_payload(run_id, round_, hospital, c_public, s_public))


def verify_advertise(identity_public: bytes, signature: bytes, run_id: str, round_: int,
                     hospital: str, c_public: bytes, s_public: bytes) -> None:
    """Raise SignatureError naming the hospital unless the signature verifies."""
    try:
        key = Ed25519PublicKey.from_public_bytes(identity_public)
        key.verify(signature, advertise_payload(run_id, round_, hospital, c_public, s_public))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"hospital {hospital}: the signature on its ephemeral keys for run {run_id} round "
            f"{round_} does not verify against its pinned identity key (forged or corrupted "
            "advertisement, or the hospital's identity key changed: re-enroll it)") from exc


def survivors_payload(run_id: str, round_: int, setup_digest: bytes,
                      survivors: tuple[str, ...]) -> bytes:
    return canonical(SURVIVORS_LABEL, run_id, round_, setup_digest, len(survivors), *survivors)


def sign_survivors(identity: Ed25519PrivateKey, run_id: str, round_: int, setup_digest: bytes,
                   survivors: tuple[str, ...]) -> bytes:
    return identity.sign(survivors_payload(run_id, round_, setup_digest, survivors))


def survivors_signature_valid(identity_public: bytes, signature: bytes, run_id: str,
                              round_: int, setup_digest: bytes,
                              survivors: tuple[str, ...]) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(
            signature, survivors_payload(run_id, round_, setup_digest, survivors))
        return True
    except (InvalidSignature, ValueError):
        return False


def _share_payload(run_id: str, round_: int, owner: str, holder: str, kind: str,
                   share: bytes) -> bytes:
    return canonical(SHARE_SIGNATURE_LABEL, run_id, round_, owner, holder, kind, share)


def sign_share(identity: Ed25519PrivateKey, run_id: str, round_: int, owner: str, holder: str,
               kind: str, share: bytes) -> bytes:
    """`share` followed by its dealer's signature: a revealed share is then attributable, to
    the holder that altered it or to the dealer that dealt it."""
    return share + identity.sign(_share_payload(run_id, round_, owner, holder, kind, share))


def open_signed_share(identity_public: bytes, signed: bytes, run_id: str, round_: int,
                      owner: str, holder: str, kind: str) -> bytes:
    """The share inside `signed`, if its dealer `owner` signed it for `holder`."""
    share, signature = signed[:-SIGNATURE_BYTES], signed[-SIGNATURE_BYTES:]
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(
            signature, _share_payload(run_id, round_, owner, holder, kind, share))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(f"a share of hospital {owner} held by {holder} does not carry "
                             f"{owner}'s signature") from exc
    return share
