"""The hospital's side of secure aggregation inside the ClientApp (see server/secure_round).

Flower starts a fresh ClientApp process per message, so the round's protocol state (which
holds ephemeral private keys) is kept between messages in a node-local file, owner-readable
only, and deleted after the unmask step. Node config: `identity-key` (the hospital's Ed25519
key, PEM), `pinned-keys` (the enrolled hospitals' public keys, JSON), `state-dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedmri.common import wire
from fedmri.common.identity import load_identity, load_pinned
from fedmri.common.secagg import (
    KeysBroadcast,
    QuantConfig,
    RoundSetup,
    SecAggClient,
    UnmaskRequest,
)


def _node_path(context: Context, key: str) -> Path:
    if key not in context.node_config:
        raise ValueError(f"secure aggregation needs '{key}' in the SuperNode's node config")
    return Path(str(context.node_config[key]))


def _state_file(context: Context, run_id: str, rnd: int) -> Path:
    folder = _node_path(context, "state-dir")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder / f"secagg-{run_id}-{rnd}.state"


def _save(path: Path, state: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(state)


def _client(context: Context, hospital: str, state: Path | None = None) -> SecAggClient:
    identity = load_identity(_node_path(context, "identity-key"))
    pinned = load_pinned(_node_path(context, "pinned-keys"))
    if state is None:
        return SecAggClient(hospital, identity, pinned)
    if not state.exists():
        raise ValueError(f"hospital {hospital}: no secure-aggregation state {state}; this node "
                         "did not take part in the round's earlier steps")
    return SecAggClient.restore(state.read_bytes(), identity, pinned)


def is_secure(msg: Message) -> bool:
    return wire.SECAGG in msg.content.config_records


def stage_of(msg: Message) -> str:
    return str(msg.content.config_records[wire.SECAGG][wire.SECAGG_STAGE])


def advertise(msg: Message, context: Context, hospital: str) -> Message:
    record = msg.content.config_records[wire.SECAGG]
    setup = RoundSetup.from_bytes(bytes(record[wire.SECAGG_SETUP]))  # type: ignore[arg-type]
    client = _client(context, hospital)
    advert = client.advertise(setup)
    _save(_state_file(context, setup.run_id, setup.round), client.export_state())
    return Message(RecordDict({wire.SECAGG: ConfigRecord(
        {wire.SECAGG_ADVERT: advert.to_bytes()})}), reply_to=msg)


def mask(msg: Message, context: Context, hospital: str, update: np.ndarray,
         weight: int) -> RecordDict:
    """Quantize, share and mask the weighted update; the records to add to the train reply."""
    record = msg.content.config_records[wire.SECAGG]
    keys = KeysBroadcast.from_bytes(bytes(record[wire.SECAGG_KEYS]))  # type: ignore[arg-type]
    quant = QuantConfig(clip=float(record[wire.SECAGG_CLIP]),  # type: ignore[arg-type]
                        scale=int(record[wire.SECAGG_SCALE]),  # type: ignore[arg-type]
                        max_weight=int(record[wire.SECAGG_MAX_WEIGHT]))  # type: ignore[arg-type]
    state = _state_file(context, keys.run_id, keys.round)
    client = _client(context, hospital, state)
    shares, masked = client.share_and_mask(keys, quant.quantize(update, weight))
    _save(state, client.export_state())
    return RecordDict({
        wire.SECAGG: ConfigRecord({wire.SECAGG_SHARES: shares.to_bytes()}),
        wire.SECAGG_MASKED: ArrayRecord(
            {wire.SECAGG_MASKED: Array(np.ascontiguousarray(masked.vector, dtype=np.uint32))}),
    })


def unmask(msg: Message, context: Context, hospital: str) -> Message:
    record = msg.content.config_records[wire.SECAGG]
    request = UnmaskRequest.from_bytes(bytes(record[wire.SECAGG_REQUEST]))  # type: ignore[arg-type]
    state = _state_file(context, request.run_id, request.round)
    reveal = _client(context, hospital, state).unmask(request)
    state.unlink(missing_ok=True)
    return Message(RecordDict({wire.SECAGG: ConfigRecord(
        {wire.SECAGG_REVEAL: reveal.to_bytes()})}), reply_to=msg)
