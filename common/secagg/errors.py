"""Errors raised by secure aggregation.

Every refusal names the hospital involved and the reason, so a coordinator reading a log line
knows whom to call and what to check. All inherit from `SecAggError` so a daemon can catch one
type, log it and drop the offending message without crashing.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class: a secure-aggregation step refused its input."""


class UnknownHospitalError(SecAggError):
    """A message names a hospital that is not in the pinned identity set (or not in this round)."""


class SignatureError(SecAggError):
    """An advertisement's Ed25519 signature does not verify against the pinned identity key."""


class ReplayError(SecAggError):
    """A message belongs to another run or round (a replay or a stale retry)."""


class ShareAuthenticationError(SecAggError):
    """An encrypted share failed AES-GCM authentication (tampered, misrouted or replayed)."""


class MalformedMessageError(SecAggError):
    """A message does not decode, or a field has the wrong length, type or value."""


class BelowThresholdError(SecAggError):
    """Too few hospitals remain to reconstruct what is needed; the round cannot finish."""


class ProtocolViolationError(SecAggError):
    """A message arrives in the wrong stage or asks for something the protocol forbids."""


class InconsistentSharesError(MalformedMessageError):
    """A hospital's signed shares do not fit one secret: it dealt them wrongly."""

    def __init__(self, dealer: str, message: str) -> None:
        super().__init__(message)
        self.dealer = dealer
