"""Hospital identity keys (Ed25519) and the coordinator's pinned set of their public keys.

A hospital signs its per-round ephemeral keys with its identity key; the coordinator accepts
only hospitals whose public keys it pinned at enrollment (`simulate` enrolls its hospitals by
generating the keys for the run).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmri.common.checkpoint import save_json
from fedmri.common.secagg import identity_public_bytes, new_identity


def create_identity(path: Path) -> bytes:
    """Write a new identity key (owner-readable only); returns its raw public key."""
    key = new_identity()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
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


def enroll_hospitals(folder: Path, hospitals: list[str]) -> Path:
    """A fresh identity key per hospital (`folder/<hospital>/identity.pem`) and the
    coordinator's pinned set of their public keys (`folder/pinned-keys.json`, returned).
    This is how `simulate` and the benchmarks enroll; a deployment enrolls hospitals with keys
    they made themselves, sending only the public half."""
    pinned = {h: create_identity(folder / h / "identity.pem") for h in hospitals}
    path = folder / "pinned-keys.json"
    save_pinned(path, pinned)
    return path


def secure_node_config(folder: Path, hospital: str, pinned: Path) -> dict[str, str]:
    """The node config entries a SuperNode of an enrolled hospital needs for secure
    aggregation (see fedmri.client.secure_client)."""
    return {"hospital": hospital, "identity-key": str(folder / hospital / "identity.pem"),
            "pinned-keys": str(pinned), "state-dir": str(folder / hospital / "state")}
