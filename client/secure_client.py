"""The hospital's side of secure aggregation inside the ClientApp (see server/secure_round).

Flower starts a fresh ClientApp process per message, so a round's protocol state (which
holds ephemeral private keys) is kept between messages in a node-local file per (run, round),
owner-readable only. It is deleted after the round's unmask step; making a round's keys (a
separate advertise, or the next round's advertise answered with the unmask reply) also deletes
the files of the run's earlier rounds, such as those of a round that ended before unmasking.
Node config: `identity-key` (the hospital's Ed25519 key, PEM), `pinned-keys` (the enrolled
hospitals' public keys, JSON), `state-dir`.
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
    ProtocolViolationError,
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


def _drop_earlier_states(path: Path, run_id: str, rnd: int) -> None:
    """Delete the state files of the run's rounds before `rnd` (their keys are never used
    again: a round's messages are refused in any other round)."""
    prefix = f"secagg-{run_id}-"
    for old in path.parent.glob(f"{prefix}*.state"):
        suffix = old.name[len(prefix):-len(".state")]
        if suffix.isdigit() and int(suffix) < rnd:
            old.unlink(missing_ok=True)


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


def _advertise(setup: RoundSetup, context: Context, hospital: str) -> bytes:
    """Fresh signed keys for the round; their private halves go to the round's state file."""
    client = _client(context, hospital)
    advert = client.advertise(setup)
    state = _state_file(context, setup.run_id, setup.round)
    _save(state, client.export_state())
    _drop_earlier_states(state, setup.run_id, setup.round)
    return advert.to_bytes()


def _setup_of(record: ConfigRecord) -> RoundSetup:
    return RoundSetup.from_bytes(bytes(record[wire.SECAGG_SETUP]))  # type: ignore[arg-type]


def advertise(msg: Message, context: Context, hospital: str) -> Message:
    advert = _advertise(_setup_of(msg.content.config_records[wire.SECAGG]), context, hospital)
    return Message(RecordDict({wire.SECAGG: ConfigRecord({wire.SECAGG_ADVERT: advert})}),
                   reply_to=msg)


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
    """Reveal for this round; if the message carries the next round's setup, also advertise
    fresh keys for it in the same reply."""
    record = msg.content.config_records[wire.SECAGG]
    request = UnmaskRequest.from_bytes(bytes(record[wire.SECAGG_REQUEST]))  # type: ignore[arg-type]
    following = _setup_of(record) if wire.SECAGG_SETUP in record else None
    if following and (following.run_id, following.round) != (request.run_id, request.round + 1):
        raise ProtocolViolationError(
            f"hospital {hospital}: the setup sent with the unmask request of run "
            f"{request.run_id!r} round {request.round} is for run {following.run_id!r} round "
            f"{following.round}, not the next round; refusing")
    state = _state_file(context, request.run_id, request.round)
    reply = ConfigRecord(
        {wire.SECAGG_REVEAL: _client(context, hospital, state).unmask(request).to_bytes()})
    state.unlink(missing_ok=True)
    if following:
        reply[wire.SECAGG_ADVERT] = _advertise(following, context, hospital)
    return Message(RecordDict({wire.SECAGG: reply}), reply_to=msg)
