"""Hospital identity keys (Ed25519) and the pinned set of the enrolled hospitals' public keys.

A hospital signs its per-round ephemeral keys with its identity key; the coordinator and the
hospitals accept only hospitals whose public keys are pinned (enrollment:
fedmri.deploy.enrollment).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmri.common.checkpoint import save_json, write_private
from fedmri.common.secagg import identity_public_bytes, new_identity


def create_identity(path: Path) -> bytes:
    """Write a new identity key (owner-readable only); returns its raw public key."""
    key = new_identity()
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return identity_public_bytes(key)


def load_identity(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the identity key {path}: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 identity key")
    return key


def save_pinned(path: Path, pinned: dict[str, bytes]) -> None:
    save_json(path, {h: base64.b64encode(k).decode() for h, k in sorted(pinned.items())})


def load_pinned(path: Path) -> dict[str, bytes]:
    try:
        raw = json.loads(Path(path).read_text())
        pinned = {str(h): base64.b64decode(k, validate=True) for h, k in raw.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"cannot read the pinned hospital keys {path}: {err}") from err
    bad = [h for h, k in pinned.items() if len(k) != 32]
    if bad:
        raise ValueError(f"{path}: pinned keys of {', '.join(bad)} are not 32-byte Ed25519 keys")
    return pinned

