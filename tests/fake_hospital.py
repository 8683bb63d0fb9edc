"""A hospital that answers as fedmri's ClientApp does, with its training replaced by a known
update (so an aggregate can be checked exactly), and optional faults: the test double of the
hospital side for the coordinator's tests, in process (loopback Grid) or as a real ClientApp
(`fake_hospital_app`). A hospital whose name starts with "faulty-" misbehaves as the rest of
its name says."""

from __future__ import annotations

from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedmri.client import secure_client
from fedmri.common.identity import load_identity
from fedmri.common.secagg import Advertise, Reveal
from fedmri.common.secagg.crypto import advertise_payload
from fedmri.common.vectors import flatten_update
from fedmri.proto import weights, wire
from fedmri.proto.node_config import NodeConfig

FAULTY = "faulty-"


def index_of(hospital: str) -> int:
    """hospital-3 -> 3 (Flower's node ids are large random numbers); others -> 9."""
    tail = hospital.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 9


def weight(node: int) -> int:
    return 2 * node + 1


def delta(node: int, rnd: int) -> float:
    return 0.01 * node - 0.003 * rnd


def val_dice(node: int) -> float:
    return 0.5 + 0.04 * node


class Hospitals:
    """Hospital handlers: train returns the global model moved by delta(node, round); `broken`
    nodes raise instead, `nameless` nodes leave the hospital's name out of their replies."""

    def __init__(self) -> None:
        self.broken: set[int] = set()
        self.nameless: set[int] = set()

    def __call__(self, msg: Message, context: Context) -> Message:
        node = NodeConfig.from_context(context)
        index, kind = index_of(node.hospital), msg.metadata.message_type
        fault = node.hospital[len(FAULTY):] if node.hospital.startswith(FAULTY) else ""
        if context.node_id in self.broken:
            raise RuntimeError(f"{node.hospital} crashed")
        if kind == MessageType.QUERY:
            reply = secure_client.query_step(msg, node)
            if fault == "missing-seed":
                drop_pair_seeds(reply)
            if fault == "low-order-key":
                low_order_key(reply, node)
            return reply
        metrics: dict[str, float] = {wire.VAL_DICE: val_dice(index), wire.VAL_LOSS: 1.0,
                                     wire.NUM_VAL: 2.0}
        reply = RecordDict({wire.METRICS: MetricRecord(metrics)})
        if context.node_id not in self.nameless:
            reply[wire.INFO] = ConfigRecord({wire.INFO_HOSPITAL: node.hospital})
        if kind == MessageType.EVALUATE:
            return Message(reply, reply_to=msg)
        rnd = int(msg.metadata.group_id)
        global_state = weights.unpack(msg.content)
        local = {k: v + delta(index, rnd) if v.is_floating_point() else v
                 for k, v in global_state.items()}
        declared = 10**6 if fault == "bad-weight" else weight(index)
        metrics.update({wire.NUM_EXAMPLES: float(declared), wire.TRAIN_LOSS: 0.1 * index,
                        wire.TRAIN_SECONDS: 0.5})
        reply[wire.METRICS] = MetricRecord(metrics)
        if secure_client.is_secure(msg):
            trained_from = secure_client.training_input(global_state, rnd)
            masked = secure_client.mask(msg, node, flatten_update(local, global_state),
                                        weight(index), trained_from)
            for name, record in masked.items():
                reply[name] = record
        else:
            for name, record in weights.pack(local).items():
                reply[name] = record
        return Message(reply, reply_to=msg)




def drop_pair_seeds(reply: Message) -> None:
    """Leave the pairwise seeds out of an unmask reply (a faulty reveal)."""
    record = reply.content.config_records[wire.SECAGG]
    if wire.SECAGG_REVEAL in record:
        reveal = Reveal.from_bytes(bytes(record[wire.SECAGG_REVEAL]))  # type: ignore[arg-type]
        record[wire.SECAGG_REVEAL] = Reveal(reveal.run_id, reveal.round, reveal.sender,
                                            reveal.b_shares, reveal.s_shares, {},
                                            reveal.unreadable).to_bytes()


def low_order_key(reply: Message, node: NodeConfig) -> None:
    """Replace the advertised share key by a low-order point, signed with the real identity."""
    record = reply.content.config_records[wire.SECAGG]
    if wire.SECAGG_ADVERT in record:
        adv = Advertise.from_bytes(bytes(record[wire.SECAGG_ADVERT]))  # type: ignore[arg-type]
        key = b"\0" * 32
        signature = load_identity(node.require("identity_key", "test")).sign(
            advertise_payload(adv.run_id, adv.round, adv.sender, key, adv.s_public))
        record[wire.SECAGG_ADVERT] = Advertise(adv.run_id, adv.round, adv.sender, key,
                                               adv.s_public, signature).to_bytes()
