"""Secure-aggregation FedAvg core (Bonawitz et al. 2017; Bell et al. 2020), Flower-free.

Hospitals quantize their weighted updates (`quantize`), mask them so the server sees only the
sum (`SecAggClient`, `ServerAggregator`), and the server dequantizes the sum (`dequantize`).
Messages are plain dataclasses with `to_bytes`/`from_bytes` (`messages`), so any transport can
carry them. See `protocol` for the message flow and threat model, `quantize` for the error
bound.
"""

from .client import SecAggClient
from .crypto import identity_public_bytes, new_identity
from .errors import (
    BelowThresholdError,
    InconsistentSharesError,
    MalformedMessageError,
    ProtocolViolationError,
    ReplayError,
    SecAggError,
    ShareAuthenticationError,
    SignatureError,
    UnknownHospitalError,
)
from .messages import (
    Advertise,
    ConsistencyRequest,
    EncryptedShare,
    KeysBroadcast,
    MaskedVector,
    Reveal,
    RoundSetup,
    SharesMessage,
    SurvivorSignature,
    UnmaskRequest,
)
from .protocol import expected_setup, new_setup
from .quantize import (
    QuantConfig,
    check_no_overflow,
    dequantize,
    error_bound,
    max_safe_scale,
    quantize,
)
from .server import AggregateResult, ServerAggregator

__all__ = [
    "AggregateResult",
    "Advertise",
    "BelowThresholdError",
    "ConsistencyRequest",
    "EncryptedShare",
    "InconsistentSharesError",
    "KeysBroadcast",
    "MalformedMessageError",
    "MaskedVector",
    "ProtocolViolationError",
    "QuantConfig",
    "ReplayError",
    "Reveal",
    "RoundSetup",
    "SecAggClient",
    "SecAggError",
    "ServerAggregator",
    "ShareAuthenticationError",
    "SharesMessage",
    "SignatureError",
    "SurvivorSignature",
    "UnknownHospitalError",
    "UnmaskRequest",
    "check_no_overflow",
    "dequantize",
    "error_bound",
    "expected_setup",
    "identity_public_bytes",
    "max_safe_scale",
    "new_identity",
    "new_setup",
    "quantize",
]
