"""The hospital's side of secure aggregation inside the ClientApp (see server/secure_round).

Flower starts a fresh ClientApp process per message, so a round's protocol state (which
holds ephemeral private keys) is kept between messages in a node-local file per (run, round),
owner-readable only. It is deleted after the round's unmask step; making a round's keys (a
separate advertise, or the next round's advertise answered with the unmask reply) also deletes
the files of the run's earlier rounds, such as those of a round that ended before unmasking.
Node config (fedmri.proto.node_config.NodeConfig): the hospital's identity key (Ed25519,
PEM), the enrolled hospitals' pinned public keys (JSON) and the state folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedmri.common.checkpoint import write_private
from fedmri.common.identity import load_identity, load_pinned
from fedmri.common.secagg import (
    KeysBroadcast,
    ProtocolViolationError,
    QuantConfig,
    RoundSetup,
    SecAggClient,
    UnmaskRequest,
)
from fedmri.proto import wire
from fedmri.proto.node_config import NodeConfig

PURPOSE = "secure aggregation"


def _state_file(node: NodeConfig, run_id: str, rnd: int) -> Path:
    folder: Path = node.require("state_dir", PURPOSE)
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


def _client(node: NodeConfig, state: Path | None = None) -> SecAggClient:
    hospital = node.hospital
    identity = load_identity(node.require("identity_key", PURPOSE))
    pinned = load_pinned(node.require("pinned_keys", PURPOSE))
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


def _advertise(setup: RoundSetup, node: NodeConfig) -> bytes:
    """Fresh signed keys for the round; their private halves go to the round's state file."""
    client = _client(node)
    advert = client.advertise(setup)
    state = _state_file(node, setup.run_id, setup.round)
    write_private(state, client.export_state())
    _drop_earlier_states(state, setup.run_id, setup.round)
    return advert.to_bytes()


def _setup_of(record: ConfigRecord) -> RoundSetup:
    return RoundSetup.from_bytes(bytes(record[wire.SECAGG_SETUP]))  # type: ignore[arg-type]


def query_step(msg: Message, node: NodeConfig) -> Message:
    """The secure-aggregation steps that carry no training: advertise keys, reveal."""
    stage = stage_of(msg)
    if stage == wire.STAGE_ADVERTISE:
        return advertise(msg, node)
    if stage == wire.STAGE_UNMASK:
        return unmask(msg, node)
    raise ValueError(f"hospital {node.hospital}: unknown secure-aggregation stage {stage!r}")


def advertise(msg: Message, node: NodeConfig) -> Message:
    advert = _advertise(_setup_of(msg.content.config_records[wire.SECAGG]), node)
    return Message(RecordDict({wire.SECAGG: ConfigRecord({wire.SECAGG_ADVERT: advert})}),
                   reply_to=msg)


def mask(msg: Message, node: NodeConfig, update: np.ndarray, weight: int) -> RecordDict:
    """Quantize, share and mask the weighted update; the records to add to the train reply."""
    record = msg.content.config_records[wire.SECAGG]
    keys = KeysBroadcast.from_bytes(bytes(record[wire.SECAGG_KEYS]))  # type: ignore[arg-type]
    quant = QuantConfig(clip=float(record[wire.SECAGG_CLIP]),  # type: ignore[arg-type]
                        scale=int(record[wire.SECAGG_SCALE]),  # type: ignore[arg-type]
                        max_weight=int(record[wire.SECAGG_MAX_WEIGHT]))  # type: ignore[arg-type]
    state = _state_file(node, keys.run_id, keys.round)
    client = _client(node, state)
    shares, masked = client.share_and_mask(keys, quant.quantize(update, weight))
    write_private(state, client.export_state())
    return RecordDict({
        wire.SECAGG: ConfigRecord({wire.SECAGG_SHARES: shares.to_bytes()}),
        wire.SECAGG_MASKED: ArrayRecord(
            {wire.SECAGG_MASKED: Array(np.ascontiguousarray(masked.vector, dtype=np.uint32))}),
    })


def unmask(msg: Message, node: NodeConfig) -> Message:
    """Reveal for this round; if the message carries the next round's setup, also advertise
    fresh keys for it in the same reply."""
    record = msg.content.config_records[wire.SECAGG]
    request = UnmaskRequest.from_bytes(bytes(record[wire.SECAGG_REQUEST]))  # type: ignore[arg-type]
    following = _setup_of(record) if wire.SECAGG_SETUP in record else None
    if following and (following.run_id, following.round) != (request.run_id, request.round + 1):
        raise ProtocolViolationError(
            f"hospital {node.hospital}: the setup sent with the unmask request of run "
            f"{request.run_id!r} round {request.round} is for run {following.run_id!r} round "
            f"{following.round}, not the next round; refusing")
    state = _state_file(node, request.run_id, request.round)
    reply = ConfigRecord(
        {wire.SECAGG_REVEAL: _client(node, state).unmask(request).to_bytes()})
    state.unlink(missing_ok=True)
    if following:
        reply[wire.SECAGG_ADVERT] = _advertise(following, node)
    return Message(RecordDict({wire.SECAGG: reply}), reply_to=msg)
