"""The hospital's side of secure aggregation inside the ClientApp (see server/secure_round).

Each message restores the round's protocol state from the node's state folder
(fedmri.client.secagg_state), runs one step of SecAggClient and saves the state again. Node
config (fedmri.proto.node_config.NodeConfig): the hospital's identity key (Ed25519, PEM),
the pinned public keys of the federation's members (JSON) and the state folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedmri.client.secagg_state import RoundStateStore
from fedmri.common.identity import load_identity, load_pinned
from fedmri.common.secagg import (
    ConsistencyRequest,
    KeysBroadcast,
    ProtocolViolationError,
    QuantConfig,
    RoundSetup,
    SecAggClient,
    SecAggError,
    UnmaskRequest,
)
from fedmri.proto import wire
from fedmri.proto.node_config import NodeConfig

PURPOSE = "secure aggregation"
log = logging.getLogger("fedmri.client")


def _store(node: NodeConfig) -> RoundStateStore:
    return RoundStateStore(node.require("state_dir", PURPOSE))


def _client(node: NodeConfig, state: bytes | None = None) -> SecAggClient:
    identity = load_identity(node.require("identity_key", PURPOSE))
    pinned = load_pinned(node.require("pinned_keys", PURPOSE))
    if state is None:
        return SecAggClient(node.hospital, identity, pinned)
    return SecAggClient.restore(state, identity, pinned)


def is_secure(msg: Message) -> bool:
    return wire.SECAGG in msg.content.config_records


def stage_of(msg: Message) -> str:
    return str(msg.content.config_records[wire.SECAGG][wire.SECAGG_STAGE])


def _advertise(setup: RoundSetup, node: NodeConfig) -> bytes:
    """Fresh signed keys for the round; their private halves go to the round's state file."""
    store = _store(node)
    with store.locked(setup.run_id):
        store.refuse_replay(setup.run_id, setup.round, node.hospital, "a round setup")
        # Fresh keys for a round it already masked an update for would let a coordinator
        # that withheld its unmask request collect a second masked copy of that update.
        store.refuse_masked_round(setup.run_id, setup.round, node.hospital)
        client = _client(node)
        advert = client.advertise(setup)
        store.save(setup.run_id, setup.round, client.export_state())
        store.drop_earlier(setup.run_id, setup.round)
    return advert.to_bytes()


def _setup_of(record: ConfigRecord) -> RoundSetup:
    return RoundSetup.from_bytes(bytes(record[wire.SECAGG_SETUP]))  # type: ignore[arg-type]


_RUN_IDS = ((wire.SECAGG_SETUP, RoundSetup), (wire.SECAGG_KEYS, KeysBroadcast),
            (wire.SECAGG_CHECK, ConsistencyRequest), (wire.SECAGG_REQUEST, UnmaskRequest))


def check_run_id(msg: Message, flower_run_id: int, hospital: str) -> None:
    """Every secure-aggregation record must name the Flower run it arrives in: the replay
    record is kept per run id, so a coordinator must not pick a fresh one to replay a round."""
    record = msg.content.config_records[wire.SECAGG]
    for key, kind in _RUN_IDS:
        if key in record:
            named = kind.from_bytes(bytes(record[key])).run_id  # type: ignore[arg-type]
            if named != str(flower_run_id):
                raise ProtocolViolationError(
                    f"hospital {hospital}: a secure-aggregation message of Flower run "
                    f"{flower_run_id} names run {named!r}; refusing")


def participants(msg: Message) -> list[str] | None:
    """The hospitals a round-setup message names (None for other messages)."""
    if not is_secure(msg) or stage_of(msg) != wire.STAGE_ADVERTISE:
        return None
    return list(_setup_of(msg.content.config_records[wire.SECAGG]).participants)


def query_step(msg: Message, node: NodeConfig) -> Message:
    """The secure-aggregation steps that carry no training: advertise keys, reveal."""
    stage = stage_of(msg)
    if stage == wire.STAGE_ADVERTISE:
        return advertise(msg, node)
    if stage == wire.STAGE_CONSISTENCY:
        return sign_survivors(msg, node)
    if stage == wire.STAGE_UNMASK:
        return unmask(msg, node)
    raise ValueError(f"hospital {node.hospital}: unknown secure-aggregation stage {stage!r}")


def advertise(msg: Message, node: NodeConfig) -> Message:
    advert = _advertise(_setup_of(msg.content.config_records[wire.SECAGG]), node)
    return Message(RecordDict({wire.SECAGG: ConfigRecord({wire.SECAGG_ADVERT: advert})}),
                   reply_to=msg)


def training_round(msg: Message, config_round: int, hospital: str) -> int:
    """The round of the keys this train message carries; refused if the run config names
    another round."""
    keys = KeysBroadcast.from_bytes(
        bytes(msg.content.config_records[wire.SECAGG][wire.SECAGG_KEYS]))  # type: ignore[arg-type]
    if keys.round != config_round:
        raise ProtocolViolationError(
            f"hospital {hospital}: the train message says round {config_round} but carries "
            f"keys for secure-aggregation round {keys.round}; refusing")
    return keys.round


def training_input(state: Mapping[str, Any], seed: int) -> str:
    """A digest of what an update is trained from: the training seed and the global weights as
    the model holds them once loaded (its own dtypes, names sorted, -0.0 as 0.0), so the same
    weights sent in another encoding (another dtype, order or index) give the same digest."""
    digest = hashlib.sha256(f"fedmri-training-input\0{int(seed)}\0".encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        if tensor.is_floating_point():
            tensor = tensor + 0.0  # -0.0 becomes 0.0: the same weight
        data = tensor.numpy().tobytes()
        digest.update(b"%d:%s:%s:%d:" % (len(name), name.encode(), str(tensor.dtype).encode(),
                                          len(data)))
        digest.update(data)
    return digest.hexdigest()


def refuse_used_input(msg: Message, node: NodeConfig, trained_from: str) -> None:
    """Before training: refuse at once an input `mask` would refuse (see secagg_state)."""
    keys = KeysBroadcast.from_bytes(
        bytes(msg.content.config_records[wire.SECAGG][wire.SECAGG_KEYS]))  # type: ignore[arg-type]
    _store(node).refuse_used_input(trained_from, keys.run_id, keys.round, node.hospital)


def mask(msg: Message, node: NodeConfig, update: np.ndarray, weight: int,
         trained_from: str) -> RecordDict:
    """Quantize, share and mask the weighted update trained from `trained_from`
    (`training_input`); the records to add to the train reply."""
    record = msg.content.config_records[wire.SECAGG]
    keys = KeysBroadcast.from_bytes(bytes(record[wire.SECAGG_KEYS]))  # type: ignore[arg-type]
    quant = QuantConfig(clip=float(record[wire.SECAGG_CLIP]),  # type: ignore[arg-type]
                        scale=int(record[wire.SECAGG_SCALE]),  # type: ignore[arg-type]
                        max_weight=int(record[wire.SECAGG_MAX_WEIGHT]))  # type: ignore[arg-type]
    store = _store(node)
    with store.locked(keys.run_id):
        client = _client(node, store.load(keys.run_id, keys.round, node.hospital))
        shares, masked, vote = client.share_and_mask(keys, quant.quantize(update, weight))
        store.claim_input(trained_from, keys.run_id, keys.round, node.hospital)
        store.save(keys.run_id, keys.round, client.export_state())
    return RecordDict({
        wire.SECAGG: ConfigRecord({wire.SECAGG_SHARES: shares.to_bytes(),
                                   wire.SECAGG_VOTE: vote.to_bytes()}),
        wire.SECAGG_MASKED: ArrayRecord(
            {wire.SECAGG_MASKED: Array(np.ascontiguousarray(masked.vector, dtype=np.uint32))}),
    })


def sign_survivors(msg: Message, node: NodeConfig) -> Message:
    """The consistency check: sign the survivor set the server shows (see SecAggClient)."""
    record = msg.content.config_records[wire.SECAGG]
    request = ConsistencyRequest.from_bytes(bytes(record[wire.SECAGG_CHECK]))  # type: ignore[arg-type]
    store = _store(node)
    with store.locked(request.run_id):
        client = _client(node, store.load(request.run_id, request.round, node.hospital))
        vote = client.sign_survivors(request)
        store.save(request.run_id, request.round, client.export_state())
    return Message(RecordDict({wire.SECAGG: ConfigRecord({wire.SECAGG_VOTE: vote.to_bytes()})}),
                   reply_to=msg)


def unmask(msg: Message, node: NodeConfig) -> Message:
    """Reveal for this round (once: the round is then recorded as unmasked, durably, before
    the reply leaves); if the message carries the next round's setup, also advertise fresh
    keys for it in the same reply. A refused next setup never withholds this round's reveal."""
    record = msg.content.config_records[wire.SECAGG]
    request = UnmaskRequest.from_bytes(bytes(record[wire.SECAGG_REQUEST]))  # type: ignore[arg-type]
    store = _store(node)
    with store.locked(request.run_id):
        store.refuse_replay(request.run_id, request.round, node.hospital, "an unmask request")
        client = _client(node, store.load(request.run_id, request.round, node.hospital))
        reveal = client.unmask(request)
        store.record_unmasked(request.run_id, request.round)
        store.drop(request.run_id, request.round)
    reply = ConfigRecord({wire.SECAGG_REVEAL: reveal.to_bytes()})
    if wire.SECAGG_SETUP in record:
        try:
            following = _setup_of(record)
            if (following.run_id, following.round) != (request.run_id, request.round + 1):
                raise ProtocolViolationError(
                    f"the setup sent with the unmask request of run {request.run_id!r} round "
                    f"{request.round} is for run {following.run_id!r} round {following.round}, "
                    "not the next round")
            reply[wire.SECAGG_ADVERT] = _advertise(following, node)
        except (SecAggError, ValueError) as err:
            log.warning("event=next_setup_refused hospital=%s run=%s round=%d reason=%s",
                        node.hospital, request.run_id, request.round + 1, err)
    return Message(RecordDict({wire.SECAGG: reply}), reply_to=msg)
