"""The hospital's Flower ClientApp: trains and evaluates on the data folder of its node config.

Node config (set by the SuperNode operator): fedmri.proto.node_config.NodeConfig, read once
per message (the hospital's name, its DICOM folder, threads; for secure aggregation its
identity key, the pinned keys and a state folder, see fedmri.client.secure_client).
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmri.client import secure_client
from fedmri.common.config import RunConfig
from fedmri.proto import wire
from fedmri.proto.node_config import NodeConfig

if TYPE_CHECKING:
    import torch

    from fedmri.client.hospital_data import HospitalData

# Flower starts a fresh process for every message: torch and MONAI (seconds to import) are
# imported only by the handlers that train or evaluate, not by the secure-aggregation steps.

app = ClientApp()
log = logging.getLogger("fedmri.client")


def _setup(msg: Message, context: Context) -> tuple[str, RunConfig, torch.nn.Module, HospitalData,
                                                    float]:
    node = NodeConfig.from_context(context)
    data_path = node.require("data_path", "training")
    import torch

    from fedmri.client.hospital_data import load_hospital
    from fedmri.common.models import build_model

    if node.threads > 0:
        torch.set_num_threads(node.threads)
    cfg = RunConfig.from_dict(dict(msg.content.config_records[wire.CONFIG]))
    start = time.perf_counter()
    data = load_hospital(data_path, cfg)
    model = build_model(cfg)
    model.load_state_dict(msg.content.array_records[wire.ARRAYS].to_torch_state_dict())
    return node.hospital, cfg, model, data, time.perf_counter() - start


def _val_metrics(model: torch.nn.Module, data: HospitalData, cfg: RunConfig
                 ) -> dict[str, int | float | list[int] | list[float]]:
    from fedmri.client.trainer import evaluate

    result = evaluate(model, data.val, cfg)
    return {wire.VAL_DICE: result.dice, wire.VAL_LOSS: result.loss,
            wire.NUM_VAL: float(len(data.val))}


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedmri.client.trainer import train_local
    from fedmri.common.vectors import flatten_update

    hospital, cfg, model, data, load_s = _setup(msg, context)
    config = msg.content.config_records[wire.CONFIG]
    rnd = int(config[wire.ROUND])  # type: ignore[arg-type]
    if secure_client.is_secure(msg):
        # The training seed follows the secure-aggregation round, which the hospital never
        # reveals for twice: a coordinator replaying a round number with the same weights
        # cannot get the same update again and difference two aggregates exactly.
        rnd = secure_client.training_round(msg, rnd, hospital)
    metrics: dict[str, int | float | list[int] | list[float]] = {wire.LOAD_SECONDS: load_s}
    if bool(config.get(wire.EVAL_FIRST, False)):
        metrics.update(_val_metrics(model, data, cfg))
    seed = cfg.seed + 1000 * rnd + zlib.crc32(hospital.encode()) % 1000
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, data.train, cfg, epochs=cfg.local_epochs, seed=seed)
    metrics.update({wire.NUM_EXAMPLES: float(len(data.train)), wire.TRAIN_LOSS: result.loss,
                    wire.TRAIN_SECONDS: result.seconds})
    log.info("event=trained hospital=%s round=%d loss=%.4f seconds=%.1f", hospital, rnd,
             result.loss, result.seconds)
    reply = RecordDict({wire.METRICS: MetricRecord(metrics),
                        wire.INFO: ConfigRecord({wire.INFO_HOSPITAL: hospital})})
    if secure_client.is_secure(msg):
        # Only the masked, quantized update leaves the hospital, never the weights.
        update = flatten_update(model.state_dict(), global_state)
        for name, record in secure_client.mask(msg, NodeConfig.from_context(context), update,
                                               len(data.train)).items():
            reply[name] = record
    else:
        reply[wire.ARRAYS] = ArrayRecord(model.state_dict())
    return Message(reply, reply_to=msg)


@app.query()
def secure_step(msg: Message, context: Context) -> Message:
    """Secure-aggregation steps that carry no training: advertise keys, reveal for unmask."""
    return secure_client.query_step(msg, NodeConfig.from_context(context))


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    hospital, cfg, model, data, load_s = _setup(msg, context)
    metrics = _val_metrics(model, data, cfg)
    metrics[wire.LOAD_SECONDS] = load_s
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics),
                               wire.INFO: ConfigRecord({wire.INFO_HOSPITAL: hospital})}),
                   reply_to=msg)
