"""Secure-aggregation rounds carried by Flower messages: two round trips per round, three in
the first, one more when a hospital drops out while masking (the consistency check).

1. `query` ADVERTISE: a node gets the round setup and answers with its signed ephemeral keys;
   the signature (checked against the pinned identity keys) binds node and hospital. Only the
   nodes without keys for the round get it: all of them in a run's first round (or after a
   round that ended before its unmask step, or a coordinator restart), else only a hospital
   that joined, or did not answer the previous round's unmask step.
2. `train` MASK: every advertiser gets the global weights, the run config and the keys of its
   neighbours; it trains, quantizes its weighted update and answers with encrypted shares and
   the masked vector (uint32, carried in an ArrayRecord, which Flower sends in chunks), and
   its signature over the set of hospitals that got keys.
2b. `query` CONSISTENCY, only if someone who got keys did not answer step 2: the survivors
   sign the survivor set instead.
3. `query` UNMASK (+ next ADVERTISE): given t signatures over the survivor set, survivors
   reveal what removes the masks; the server learns only the sum. Unless this is the last
   round, the message also carries the next round's setup and the reply the hospital's signed
   fresh keys for it (`Advertised`), so the next round starts at step 2.

A hospital whose message is malformed, forged or breaks the protocol is an offender: the
round goes on without it and SecureFedAvg leaves it out of the run's later rounds.

`SecureFedAvg` runs them round after round behind the same interface as plain FedAvg
(fedmri.server.exchange). The server side never holds an unmasked individual update:
`ServerAggregator` keeps masked vectors only, and `aggregate` returns the survivors' sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ConfigRecord, Message, MessageType, RecordDict

from fedmri.common.identity import load_pinned
from fedmri.common.secagg import (
    Advertise,
    BelowThresholdError,
    ConsistencyRequest,
    InconsistentSharesError,
    MalformedMessageError,
    MaskedVector,
    ProtocolViolationError,
    QuantConfig,
    ReplayError,
    Reveal,
    SecAggError,
    ServerAggregator,
    SharesMessage,
    SurvivorSignature,
    dequantize,
    error_bound,
)
from fedmri.common.secagg.crypto import verify_advertise
from fedmri.common.vectors import apply_update, vector_length
from fedmri.proto import wire
from fedmri.proto.events import HospitalExcluded, HospitalFailed, SecureSum
from fedmri.server.exchange import Exchange, Reply, RoundOutcome, metrics_of, payload_bytes

if TYPE_CHECKING:
    import torch


@dataclass
class SecureResult:
    mean_update: np.ndarray  # float64 weighted mean of the survivors' updates
    total_weight: int
    survivors: tuple[str, ...]
    error_bound: float
    aggregate_seconds: float  # unmasking and dequantizing on the server


@dataclass
class Advertised:
    """A round's keys collected before it starts, on the previous round's unmask replies: its
    aggregator (still in the advertise stage) and the node -> hospital binding of each key."""

    agg: ServerAggregator
    hospital_of: dict[int, str]


def _stage_record(stage: str, **fields: bytes | str | int | float) -> ConfigRecord:
    return ConfigRecord({wire.SECAGG_STAGE: stage, **fields})


class SecureRound:
    """Runs one round through `exchange`; `train_content` holds the global weights + config
    for step 2. Replies of the hospitals in the sum land in `replies` (metrics only).

    `advertised`: the keys the previous round collected for this one (its `next`); used when
    they are for this run, round, participants and pinned keys, else ignored.
    """

    def __init__(self, exchange: Exchange, run_id: str, pinned: dict[str, bytes],
                 quant: QuantConfig, vector_length: int, timeout_s: float,
                 stage_timeout_s: float = 120.0, advertised: Advertised | None = None) -> None:
        self.exchange, self.run_id, self.rnd = exchange, run_id, exchange.rnd
        self.timeout_s, self.stage_timeout_s, self.quant = timeout_s, stage_timeout_s, quant
        quant.check(len(pinned))
        # Participants are the enrolled hospitals; those that do not advertise drop out.
        self.agg = ServerAggregator.start_round(run_id, self.rnd, sorted(pinned),
                                                vector_length, pinned)
        self.hospital_of: dict[int, str] = {}  # this round's signed node -> hospital binding
        if advertised is not None and advertised.agg.setup == self.agg.setup \
                and advertised.agg.pinned == pinned:
            self.agg, self.hospital_of = advertised.agg, dict(advertised.hospital_of)
        exchange.names.update(self.hospital_of)
        self.replies: list[Reply] = []
        self.weights: dict[str, int] = {}  # declared (public) weight of each masked reply
        self.next: Advertised | None = None  # the next round's keys, after `unmask`
        self.offenders: dict[str, str] = {}  # hospital -> the malformed data it sent

    def _refuse(self, node: int, what: str, err: Exception) -> None:
        """Fail the node; a hospital that sent malformed or forged data is an offender (a
        stale message, or a transport failure, is not)."""
        self.exchange.fail(node, f"{what} rejected: {err}")
        hospital = self.hospital_of.get(node)
        if hospital and not isinstance(err, (ReplayError, BelowThresholdError)):
            self.offenders.setdefault(hospital, f"{what} rejected: {err}")

    def _take_advert(self, into: Advertised, reply: Message) -> None:
        """Admit a reply's signed keys for `into`'s round; a refusal fails the node, and keys
        that the hospital did sign but that are bad make it an offender."""
        node = reply.metadata.src_node_id
        what = f"advertisement for round {into.agg.setup.round}"
        try:
            advert = Advertise.from_bytes(_field(reply, wire.SECAGG_ADVERT))
        except SecAggError as err:
            self.exchange.fail(node, f"{what} rejected: {err}")
            return
        try:
            if advert.sender in into.hospital_of.values():
                raise ReplayError(f"hospital {advert.sender} answered from two nodes")
            into.agg.receive_advertise(advert)  # checks run, round, signature and the keys
        except SecAggError as err:
            self.exchange.fail(node, f"{what} rejected: {err}")
            if _signed(advert, into.agg.pinned) and \
                    not isinstance(err, (ReplayError, BelowThresholdError)):
                self.offenders.setdefault(advert.sender, f"{what} rejected: {err}")
            return
        into.hospital_of[node] = advert.sender
        if into.agg is self.agg:
            self.exchange.names[node] = advert.sender

    def _send(self, contents: dict[int, RecordDict], kind: str, timeout_s: float
              ) -> list[Message]:
        return self.exchange.send([self.exchange.message(c, n, kind)
                                   for n, c in contents.items()], timeout_s)

    def advertise(self, nodes: list[int]) -> None:
        """Step 1 for the nodes without keys for this round."""
        setup = self.agg.setup.to_bytes()
        here = Advertised(self.agg, self.hospital_of)
        contents = {n: RecordDict({wire.SECAGG: _stage_record(
            wire.STAGE_ADVERTISE, **{wire.SECAGG_SETUP: setup})}) for n in nodes}
        for reply in self._send(contents, MessageType.QUERY, self.stage_timeout_s):
            self._take_advert(here, reply)

    def mask(self, train_content: RecordDict) -> None:
        keys = self.agg.finish_advertise()
        contents = {}
        for node, hospital in sorted(self.hospital_of.items()):
            content = RecordDict(dict(train_content.items()))  # same records, own SECAGG
            fields: dict[str, bytes | str | int | float] = {
                wire.SECAGG_KEYS: keys[hospital].to_bytes(), wire.SECAGG_CLIP: self.quant.clip,
                wire.SECAGG_SCALE: self.quant.scale, wire.SECAGG_MAX_WEIGHT: self.quant.max_weight}
            content[wire.SECAGG] = _stage_record(wire.STAGE_MASK, **fields)
            contents[node] = content
        for reply in self._send(contents, MessageType.TRAIN, self.timeout_s):
            node = reply.metadata.src_node_id
            hospital = self.hospital_of[node]
            try:
                shares = SharesMessage.from_bytes(_field(reply, wire.SECAGG_SHARES))
                vote = SurvivorSignature.from_bytes(_field(reply, wire.SECAGG_VOTE))
                vector = _masked_vector(reply, hospital, self.agg.setup.vector_length)
                self._check_sender(reply, shares.sender, "shares message")
                self._check_sender(reply, vote.signer, "survivor signature")
                # Shares first: if the rest is refused, the hospital counts as dropped with
                # its shares in hand, so its mask key stays recoverable and the round goes on.
                self.agg.receive_shares(shares)
                metrics = metrics_of(reply)
                weight = self.quant.check_weight(metrics.get(wire.NUM_EXAMPLES, 0.0), hospital)
                self.agg.receive_masked(MaskedVector(self.run_id, self.rnd, hospital, vector))
                self.agg.receive_signature(vote)
                self.weights[hospital] = weight
                self.replies.append(Reply(hospital, metrics,
                                          upload_bytes=payload_bytes(reply.content)))
            except (SecAggError, ValueError) as err:
                self._refuse(node, "masked update", err)

    def _ask(self, stage: str, key: str, requests: dict[str, Any],
             extra: dict[str, bytes | str | int | float] | None = None) -> list[Message]:
        """A `stage` query to each hospital of `requests`, its own request under `key`."""
        node_of = {h: n for n, h in self.hospital_of.items()}
        contents = {node_of[h]: RecordDict({wire.SECAGG: _stage_record(
            stage, **{key: req.to_bytes()}, **(extra or {}))})
            for h, req in sorted(requests.items())}
        return self._send(contents, MessageType.QUERY, self.stage_timeout_s)

    def _check_sender(self, reply: Message, sender: str, what: str) -> None:
        hospital = self.hospital_of[reply.metadata.src_node_id]
        if sender != hospital:
            raise ProtocolViolationError(f"node of hospital {hospital} sent a {what} as {sender}")

    def consistency(self, requests: dict[str, ConsistencyRequest]) -> None:
        """Step 2b: the survivors sign the survivor set (someone dropped while masking)."""
        for reply in self._ask(wire.STAGE_CONSISTENCY, wire.SECAGG_CHECK, requests):
            try:
                vote = SurvivorSignature.from_bytes(_field(reply, wire.SECAGG_VOTE))
                self._check_sender(reply, vote.signer, "survivor signature")
                self.agg.receive_signature(vote)
            except SecAggError as err:
                self._refuse(reply.metadata.src_node_id, "survivor signature", err)

    def unmask(self, advertise_next: bool = False) -> None:
        """Step 3; with `advertise_next`, also step 1 of the next round (into `self.next`)."""
        requests = self.agg.unmask_requests()
        extra: dict[str, bytes | str | int | float] = {}
        if advertise_next:
            s = self.agg.setup
            self.next = Advertised(ServerAggregator.start_round(
                s.run_id, s.round + 1, s.participants, s.vector_length, self.agg.pinned), {})
            extra[wire.SECAGG_SETUP] = self.next.agg.setup.to_bytes()
        for reply in self._ask(wire.STAGE_UNMASK, wire.SECAGG_REQUEST, requests, extra):
            node = reply.metadata.src_node_id
            try:
                reveal = Reveal.from_bytes(_field(reply, wire.SECAGG_REVEAL))
                self._check_sender(reply, reveal.sender, "reveal")
                self.agg.receive_reveal(reveal)
            except SecAggError as err:
                self._refuse(node, "reveal", err)
                continue
            if self.next is not None:
                self._take_advert(self.next, reply)

    def run(self, nodes: list[int], train_content: RecordDict,
            advertise_next: bool = False) -> SecureResult:
        """Steps 1 (for `nodes` without keys) to 3; with `advertise_next` the unmask step also
        collects the next round's keys (`self.next`, kept even if this round then fails). A
        round below threshold raises SecAggError (the caller keeps its model)."""
        missing = [n for n in nodes if n not in self.hospital_of]
        if missing:
            self.advertise(missing)
        self.mask(train_content)
        consistency = self.agg.finish_masking()
        if consistency:
            self.consistency(consistency)
        self.unmask(advertise_next)
        started = time.perf_counter()
        try:
            result = self.agg.aggregate()
        except InconsistentSharesError as err:
            self.offenders.setdefault(err.dealer, str(err))
            raise
        except SecAggError:
            # A hospital whose self mask cannot be removed because its shares were unreadable
            # to its holders sent bad shares: it is the offender, not the holders.
            # Only when more holders complain than could be lying without being enough to
            # stop the round alone (holders - t + 1): a complaint cannot be checked.
            blamed = self.agg.unreadable_by()
            setup = self.agg.setup
            enough = setup.degree + 1 - setup.threshold + 1
            for hospital in self.agg.short_of_shares():
                if len(blamed.get(hospital, [])) >= enough:
                    self.offenders.setdefault(hospital, "its shares could not be read by "
                                                        + ", ".join(blamed[hospital]))
            raise
        for sender, holders in self.agg.unreadable_by().items():
            self.exchange.emit(HospitalFailed(self.rnd, f"{sender}: its shares could not be read "
                                              f"by {', '.join(holders)} (not needed this time)"))
        total_weight = sum(self.weights[h] for h in result.survivors)
        mean = dequantize(result.total, self.quant.scale, total_weight)
        seconds = time.perf_counter() - started
        survivors = set(result.survivors)
        self.replies = [r for r in self.replies if r.hospital in survivors]
        return SecureResult(mean, total_weight, result.survivors,
                            error_bound(len(result.survivors), self.quant.scale, total_weight),
                            seconds)


class SecureFedAvg:
    """Secure-aggregation FedAvg round after round: the pinned members, the quantization, the
    keys the last unmask step collected for the next round, and the hospitals excluded from
    the run for sending malformed data (they stay participants of the setup, which every
    hospital derives from the member list, but are sent nothing: they count as dropped)."""

    def __init__(self, run_id: str, pinned_keys: Path | None, clip: float, max_weight: int,
                 rounds: int, round_timeout_s: float, stage_timeout_s: float) -> None:
        if pinned_keys is None:
            raise ValueError("secure aggregation needs the run config 'pinned-keys' (the "
                             "enrolled hospitals' identity keys)")
        self.run_id, self.rounds = run_id, rounds
        self.pinned = load_pinned(pinned_keys)
        self.quant = QuantConfig.for_clients(len(self.pinned), clip, max_weight)
        self.round_timeout_s, self.stage_timeout_s = round_timeout_s, stage_timeout_s
        self.advertised: Advertised | None = None  # next round's keys, from the last unmask
        self.excluded: dict[str, str] = {}  # hospital -> why

    def run(self, exchange: Exchange, nodes: list[int], content: RecordDict,
            global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        nodes = [n for n in nodes if exchange.names.get(n) not in self.excluded]
        secure = SecureRound(exchange, self.run_id, self.pinned, self.quant,
                             vector_length(global_state), self.round_timeout_s,
                             self.stage_timeout_s, self.advertised)
        outcome = RoundOutcome()
        try:
            result = secure.run(nodes, content, advertise_next=exchange.rnd < self.rounds)
            outcome.new_state = apply_update(global_state, result.mean_update)
            outcome.aggregate_seconds = result.aggregate_seconds
            exchange.emit(SecureSum(exchange.rnd, list(result.survivors), result.error_bound))
        except (SecAggError, ValueError) as err:
            outcome.skipped = f"secure aggregation failed, global model unchanged: {err}"
        self.advertised = secure.next
        for hospital, reason in sorted(secure.offenders.items()):
            if hospital not in self.excluded:
                self.excluded[hospital] = reason
                exchange.emit(HospitalExcluded(exchange.rnd, hospital, reason))
        if self.advertised is not None and \
                set(self.advertised.hospital_of.values()) & set(self.excluded):
            self.advertised = None  # its keys must not be used: the next round re-advertises
        outcome.replies = sorted(secure.replies, key=lambda r: r.hospital)
        return outcome


def _signed(advert: Advertise, pinned: dict[str, bytes]) -> bool:
    """Whether the pinned hospital it names really signed this advertisement."""
    try:
        verify_advertise(pinned[advert.sender], advert.signature, advert.run_id, advert.round,
                         advert.sender, advert.c_public, advert.s_public)
        return True
    except (SecAggError, KeyError):
        return False


def _field(reply: Message, key: str) -> bytes:
    """A serialized protocol message from a reply; a missing or mistyped field is refused."""
    records = reply.content.config_records
    value = records[wire.SECAGG].get(key) if wire.SECAGG in records else None
    if not isinstance(value, bytes):
        raise MalformedMessageError(
            f"reply has no '{key}' bytes field (got {type(value).__name__})")
    return value


def _masked_vector(reply: Message, hospital: str, length: int) -> np.ndarray:
    records = reply.content.array_records
    if wire.SECAGG_MASKED not in records or wire.SECAGG_MASKED not in records[wire.SECAGG_MASKED]:
        raise MalformedMessageError(f"hospital {hospital} sent no masked vector")
    array: Array = records[wire.SECAGG_MASKED][wire.SECAGG_MASKED]
    # Checked before decoding: numpy would allocate what a hostile header declares.
    if list(array.shape) != [length] or np.dtype(array.dtype) != np.uint32:
        raise MalformedMessageError(
            f"hospital {hospital} sent a masked vector of dtype {array.dtype} and shape "
            f"{array.shape}; expected uint32 of length {length}")
    try:
        vector = array.numpy()
    except Exception as err:  # noqa: BLE001 - any decoding failure is the sender's
        raise MalformedMessageError(f"hospital {hospital} sent a masked vector that does "
                                    f"not decode ({type(err).__name__}: {err})") from err
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise MalformedMessageError(
            f"hospital {hospital} sent a masked vector of dtype {vector.dtype} and shape "
            f"{vector.shape}; expected 1-D uint32")
    return vector

