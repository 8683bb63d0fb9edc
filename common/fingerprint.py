"""Fingerprints people compare by phone, and the signed payloads of the enrollment service.

A fingerprint is the first 120 bits of SHA-256, in base32 groups of four:
`K7QF-2MXA-...` (24 characters; no 0/1/8/9 to mix up with O/I/B/g). Finding another key
with the same fingerprint costs about 2^120 hashes.
"""

from __future__ import annotations

import base64
import hashlib

GROUP = 4
BITS = 120


def fingerprint(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()[: BITS // 8]
    text = base64.b32encode(digest).decode()
    return "-".join(text[i:i + GROUP] for i in range(0, len(text), GROUP))


def normalize(text: str) -> str:
    """A fingerprint as typed (any case, with or without dashes or spaces) -> canonical."""
    raw = "".join(ch for ch in text.upper() if ch.isalnum())
    return "-".join(raw[i:i + GROUP] for i in range(0, len(raw), GROUP))


def members_request_payload(hospital: str, unix_time: int) -> bytes:
    """What a hospital signs with its identity key to read the coordinator's member list."""
    return f"fedmri-members-v1|{hospital}|{unix_time}".encode()
