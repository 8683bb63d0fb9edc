"""Secure-aggregation rounds carried by Flower messages: two round trips per round, three in
the first.

1. `query` ADVERTISE: a node gets the round setup and answers with its signed ephemeral keys;
   the signature (checked against the pinned identity keys) binds node and hospital. Only the
   nodes without keys for the round get it: all of them in a run's first round (or after a
   round that ended before its unmask step, or a coordinator restart), else only a hospital
   that joined, or did not answer the previous round's unmask step.
2. `train` MASK: every advertiser gets the global weights, the run config and the keys of its
   neighbours; it trains, quantizes its weighted update and answers with encrypted shares and
   the masked vector (uint32, carried in an ArrayRecord, which Flower sends in chunks).
3. `query` UNMASK (+ next ADVERTISE): survivors reveal what removes the masks; the server
   learns only the sum. Unless this is the last round, the message also carries the next
   round's setup and the reply the hospital's signed fresh keys for it (`Advertised`), so the
   next round starts at step 2.

The server side never holds an unmasked individual update: `ServerAggregator` keeps masked
vectors only, and `aggregate` returns the survivors' sum.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmri.common import wire
from fedmri.common.secagg import (
    Advertise,
    MaskedVector,
    QuantConfig,
    Reveal,
    SecAggError,
    ServerAggregator,
    SharesMessage,
    dequantize,
    error_bound,
)

log = logging.getLogger("fedmri.server")


@dataclass
class SecureReply:
    hospital: str
    message: Message  # the train reply (metrics, info)
    upload_bytes: int


@dataclass
class SecureOutcome:
    mean_update: np.ndarray | None  # float64 weighted mean of the survivors' updates
    total_weight: int
    survivors: tuple[str, ...]
    replies: list[SecureReply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bytes_down: int = 0
    error_bound: float = 0.0
    aggregate_seconds: float = 0.0  # unmasking and dequantizing on the server


@dataclass
class Advertised:
    """A round's keys collected before it starts, on the previous round's unmask replies: its
    aggregator (still in the advertise stage) and the node -> hospital binding of each key."""

    agg: ServerAggregator
    hospital_of: dict[int, str]


def _message(content: RecordDict, node: int, kind: str, rnd: int) -> Message:
    return Message(content, dst_node_id=node, message_type=kind, group_id=str(rnd))


def _stage_record(stage: str, **fields: bytes | str | int | float) -> ConfigRecord:
    return ConfigRecord({wire.SECAGG_STAGE: stage, **fields})


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and config values: the measure of bytes_up/bytes_down."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for cfg in content.config_records.values():
        total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in cfg.values())
    return total


class SecureRound:
    """Runs one round; `train_content` holds the global weights + config for step 2.

    `advertised`: the keys the previous round collected for this one (its `next`); used when
    they are for this run, round, participants and pinned keys, else ignored.
    """

    def __init__(self, grid: Grid, run_id: str, rnd: int, pinned: dict[str, bytes],
                 quant: QuantConfig, vector_length: int, timeout_s: float,
                 emit: Callable[[dict[str, object]], None], stage_timeout_s: float = 120.0,
                 known_nodes: dict[int, str] | None = None,
                 advertised: Advertised | None = None) -> None:
        self.grid, self.run_id, self.rnd, self.timeout_s = grid, run_id, rnd, timeout_s
        self.stage_timeout_s = stage_timeout_s
        self.quant, self.emit = quant, emit
        quant.check(len(pinned))
        # Participants are the enrolled hospitals; those that do not advertise drop out.
        self.agg = ServerAggregator.start_round(run_id, rnd, sorted(pinned),
                                                vector_length + 1, pinned)
        self.hospital_of: dict[int, str] = {}  # this round's signed node -> hospital binding
        if advertised is not None and advertised.agg.setup == self.agg.setup \
                and advertised.agg.pinned == pinned:
            self.agg, self.hospital_of = advertised.agg, dict(advertised.hospital_of)
        self.outcome = SecureOutcome(None, 0, ())
        self.known_nodes = known_nodes or {}  # earlier rounds' bindings, to name dropouts
        self.next: Advertised | None = None  # the next round's keys, after `unmask`

    def _exchange(self, messages: list[Message], timeout_s: float) -> list[Message]:
        self.outcome.bytes_down += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout_s))
        answered = {r.metadata.src_node_id for r in replies}
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self._fail(m.metadata.dst_node_id, f"no reply within {timeout_s:.0f}s")
        return [r for r in replies if not self._errored(r)]

    def _errored(self, reply: Message) -> bool:
        if reply.has_error():
            self._fail(reply.metadata.src_node_id, reply.error.reason or "error without reason")
            return True
        return False

    def _fail(self, node: int, reason: str) -> None:
        who = self.hospital_of.get(node) or self.known_nodes.get(node) or f"node {node}"
        text = f"{who}: {reason}"
        self.outcome.failures.append(text)
        self.emit({"event": "hospital_failed", "round": self.rnd, "reason": text})

    def _take_advert(self, into: Advertised, reply: Message) -> None:
        """Admit a reply's signed keys for `into`'s round; a refusal fails the node."""
        node = reply.metadata.src_node_id
        try:
            advert = Advertise.from_bytes(_field(reply, wire.SECAGG_ADVERT))
            if advert.sender in into.hospital_of.values():
                raise SecAggError(f"hospital {advert.sender} answered from two nodes")
            into.agg.receive_advertise(advert)  # checks run, round and the pinned signature
            into.hospital_of[node] = advert.sender
        except (SecAggError, KeyError, ValueError) as err:
            self._fail(node, f"advertisement for round {into.agg.setup.round} rejected: {err}")

    def advertise(self, nodes: list[int]) -> None:
        """Step 1 for the nodes without keys for this round."""
        setup = self.agg.setup.to_bytes()
        content = RecordDict({wire.SECAGG: _stage_record(wire.STAGE_ADVERTISE,
                                                         **{wire.SECAGG_SETUP: setup})})
        here = Advertised(self.agg, self.hospital_of)
        for reply in self._exchange([_message(content, n, MessageType.QUERY, self.rnd)
                                     for n in nodes], self.stage_timeout_s):
            self._take_advert(here, reply)

    def mask(self, train_content: RecordDict) -> None:
        keys = self.agg.finish_advertise()
        messages = []
        for node, hospital in sorted(self.hospital_of.items()):
            content = RecordDict(dict(train_content.items()))  # same records, own SECAGG
            fields: dict[str, bytes | str | int | float] = {
                wire.SECAGG_KEYS: keys[hospital].to_bytes(), wire.SECAGG_CLIP: self.quant.clip,
                wire.SECAGG_SCALE: self.quant.scale, wire.SECAGG_MAX_WEIGHT: self.quant.max_weight}
            content[wire.SECAGG] = _stage_record(wire.STAGE_MASK, **fields)
            messages.append(_message(content, node, MessageType.TRAIN, self.rnd))
        for reply in self._exchange(messages, self.timeout_s):
            node = reply.metadata.src_node_id
            hospital = self.hospital_of[node]
            try:
                shares = SharesMessage.from_bytes(_field(reply, wire.SECAGG_SHARES))
                vector = _masked_vector(reply, hospital)
                if shares.sender != hospital:
                    raise SecAggError(f"node of hospital {hospital} sent shares as "
                                      f"{shares.sender}")
                self.agg.receive_shares(shares)
                self.agg.receive_masked(MaskedVector(self.run_id, self.rnd, hospital, vector))
                self.outcome.replies.append(
                    SecureReply(hospital, reply, payload_bytes(reply.content)))
            except (SecAggError, KeyError, ValueError) as err:
                self._fail(node, f"masked update rejected: {err}")

    def unmask(self, advertise_next: bool = False) -> None:
        """Step 3; with `advertise_next`, also step 1 of the next round (into `self.next`)."""
        requests = self.agg.finish_masking()
        node_of = {h: n for n, h in self.hospital_of.items()}
        extra: dict[str, bytes | str | int | float] = {}
        if advertise_next:
            s = self.agg.setup
            self.next = Advertised(ServerAggregator.start_round(
                s.run_id, s.round + 1, s.participants, s.vector_length, self.agg.pinned), {})
            extra[wire.SECAGG_SETUP] = self.next.agg.setup.to_bytes()
        messages = [
            _message(RecordDict({wire.SECAGG: _stage_record(
                wire.STAGE_UNMASK, **{wire.SECAGG_REQUEST: req.to_bytes()}, **extra)}),
                node_of[hospital], MessageType.QUERY, self.rnd)
            for hospital, req in sorted(requests.items())]
        for reply in self._exchange(messages, self.stage_timeout_s):
            node = reply.metadata.src_node_id
            try:
                reveal = Reveal.from_bytes(_field(reply, wire.SECAGG_REVEAL))
                if reveal.sender != self.hospital_of[node]:
                    raise SecAggError(f"node of hospital {self.hospital_of[node]} revealed as "
                                      f"{reveal.sender}")
                self.agg.receive_reveal(reveal)
            except (SecAggError, KeyError, ValueError) as err:
                self._fail(node, f"reveal rejected: {err}")
                continue
            if self.next is not None:
                self._take_advert(self.next, reply)

    def run(self, nodes: list[int], train_content: RecordDict,
            advertise_next: bool = False) -> SecureOutcome:
        """Steps 1 (for `nodes` without keys) to 3; with `advertise_next` the unmask step also
        collects the next round's keys (`self.next`, kept even if this round then fails). A
        round below threshold raises SecAggError (the caller keeps its model)."""
        missing = [n for n in nodes if n not in self.hospital_of]
        if missing:
            self.advertise(missing)
        self.mask(train_content)
        self.unmask(advertise_next)
        started = time.perf_counter()
        result = self.agg.aggregate()
        mean, total_weight = dequantize(result.total, self.quant.scale)
        self.outcome.aggregate_seconds = time.perf_counter() - started
        self.outcome.mean_update = mean
        self.outcome.total_weight = total_weight
        self.outcome.survivors = result.survivors
        self.outcome.error_bound = error_bound(len(result.survivors), self.quant.scale,
                                               total_weight)
        survivors = set(result.survivors)
        self.outcome.replies = [r for r in self.outcome.replies if r.hospital in survivors]
        return self.outcome


def _field(reply: Message, key: str) -> bytes:
    """A serialized protocol message from a reply; a missing or mistyped field is refused."""
    records = reply.content.config_records
    value = records[wire.SECAGG].get(key) if wire.SECAGG in records else None
    if not isinstance(value, bytes):
        raise SecAggError(f"reply has no '{key}' bytes field (got {type(value).__name__})")
    return value


def _masked_vector(reply: Message, hospital: str) -> np.ndarray:
    records = reply.content.array_records
    if wire.SECAGG_MASKED not in records or wire.SECAGG_MASKED not in records[wire.SECAGG_MASKED]:
        raise SecAggError(f"hospital {hospital} sent no masked vector")
    array: Array = records[wire.SECAGG_MASKED][wire.SECAGG_MASKED]
    vector = array.numpy()
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise SecAggError(f"hospital {hospital} sent a masked vector of dtype {vector.dtype} "
                          f"and shape {vector.shape}; expected 1-D uint32")
    return vector

