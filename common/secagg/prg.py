"""Mask generator: expands a 32-byte seed into a pseudorandom uint32 vector.

AES-256 in counter mode over zero bytes is a fast PRG (AES-NI, one pass, numpy views the
keystream without a copy loop). The AES key is derived from the seed with HKDF-SHA256 and a
context label, so the same seed used for two purposes (self mask, pairwise mask) gives
independent streams; each derived key is used for one stream only, so a zero nonce is safe.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
SELF_MASK_LABEL = b"fedmri/secagg/prg/self-mask/v1"
PAIR_MASK_LABEL = b"fedmri/secagg/prg/pair-mask/v1"


def derive_key(seed: bytes, label: bytes) -> bytes:
    """HKDF-SHA256(seed, info=label) -> 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(seed)


def mask_vector(seed: bytes, length: int, label: bytes) -> npt.NDArray[np.uint32]:
    """`length` uniform uint32 values determined by (seed, label)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise ValueError(f"mask length must be >= 0, got {length}")
    encryptor = Cipher(algorithms.AES(derive_key(seed, label)), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)
