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

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmri.client import run_approval, secure_client
from fedmri.common.config import RunConfig
from fedmri.proto import weights, wire
from fedmri.proto.node_config import NodeConfig

if TYPE_CHECKING:
    import torch

    from fedmri.client.hospital_data import HospitalData
    from fedmri.client.spatial.hospital import MeshOutcome
    from fedmri.client.trainer import EvalResult

# Flower starts a fresh process for every message: torch and MONAI (seconds to import) are
# imported only by the handlers that train or evaluate, not by the secure-aggregation steps.

app = ClientApp()
log = logging.getLogger("fedmri.client")


def _setup(msg: Message, context: Context) -> tuple[NodeConfig, RunConfig, torch.nn.Module,
                                                    HospitalData, float]:
    node = NodeConfig.from_context(context)
    data_path = node.require("data_path", "training")
    import torch

    from fedmri.client.hospital_data import load_hospital
    from fedmri.common.models import build_model

    if node.threads > 0:
        torch.set_num_threads(node.threads)
    cfg = RunConfig.from_dict(dict(msg.content.config_records[wire.CONFIG]))
    run_approval.gate(node, context.run_id, cfg)  # before any data is read
    start = time.perf_counter()
    # On a mesh each rank reads its own slab: this process needs only the cases' split.
    data = load_hospital(data_path, cfg, slab=(0, 0) if _on_mesh(node) else None)
    model = build_model(cfg)
    model.load_state_dict(weights.unpack(msg.content))
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"the global weights' {name} holds NaN or infinite values")
    return node, cfg, model, data, time.perf_counter() - start


def _on_mesh(node: NodeConfig) -> bool:
    return node.tp * node.dp > 1


def _eval_metrics(result: EvalResult, data: HospitalData) -> dict[str, float]:
    return {wire.VAL_DICE: result.dice, wire.VAL_LOSS: result.loss,
            wire.NUM_VAL: float(len(data.val))}


def _mesh(node: NodeConfig, cfg: RunConfig, model: torch.nn.Module, data: HospitalData,
          seed: int, epochs: int, evaluate_first: bool) -> MeshOutcome:
    """Train and/or evaluate on the node's dp x tp local ranks (fedmri.client.spatial)."""
    import os

    from fedmri.client.spatial.hospital import run_on_mesh
    from fedmri.client.spatial.launch import MeshShape

    shape = MeshShape(dp=node.dp, tp=node.tp)
    threads = max(1, (node.threads or os.cpu_count() or 1) // shape.world)
    outcome = run_on_mesh(shape, data, cfg, model.state_dict(), seed, epochs, evaluate_first,
                          threads)
    model.load_state_dict(outcome.state_dict)
    return outcome


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedmri.client.trainer import evaluate, train_local
    from fedmri.common.vectors import flatten_update

    node, cfg, model, data, load_s = _setup(msg, context)
    run_approval.gate(node, context.run_id, cfg, volumes=len(data.train))
    hospital = node.hospital
    config = msg.content.config_records[wire.CONFIG]
    rnd = int(config[wire.ROUND])  # type: ignore[arg-type]
    if cfg.secure != secure_client.is_secure(msg):
        # A run declared secure gets masked updates only: a coordinator that leaves the
        # secure-aggregation records out of one message gets a refusal, not the weights.
        raise run_approval.RunRefused(
            f"hospital {hospital}: the run is declared {'secure' if cfg.secure else 'plain'} "
            "but this message is not; refusing")
    if not 1 <= rnd <= cfg.rounds:
        raise run_approval.RunRefused(f"hospital {hospital}: round {rnd} is outside the run's "
                                      f"{cfg.rounds} rounds; refusing")
    if secure_client.is_secure(msg):
        secure_client.check_run_id(msg, context.run_id, hospital)
        # The training seed follows the secure-aggregation round, which the hospital never
        # reveals for twice: a coordinator replaying a round number with the same weights
        # cannot get the same update again and difference two aggregates exactly.
        rnd = secure_client.training_round(msg, rnd, hospital)
    metrics: dict[str, int | float | list[int] | list[float]] = {wire.LOAD_SECONDS: load_s}
    evaluate_first = bool(config.get(wire.EVAL_FIRST, False))
    seed = cfg.seed + 1000 * rnd + zlib.crc32(hospital.encode()) % 1000
    trained_from = ""
    if secure_client.is_secure(msg):  # a digest of the whole model: only where it is used
        trained_from = secure_client.training_input(model.state_dict(), seed)
        secure_client.refuse_used_input(msg, node, trained_from)  # before hours of training
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    if _on_mesh(node):
        outcome = _mesh(node, cfg, model, data, seed, cfg.local_epochs, evaluate_first)
        assert outcome.train is not None
        result = outcome.train
        metrics[wire.MESH_SETUP_SECONDS] = outcome.setup_seconds
        if outcome.val is not None:
            metrics.update(_eval_metrics(outcome.val, data))
    else:
        if evaluate_first:
            metrics.update(_eval_metrics(evaluate(model, data.val, cfg), data))
        result = train_local(model, data.train, cfg, epochs=cfg.local_epochs, seed=seed)
    metrics.update({wire.NUM_EXAMPLES: float(len(data.train)), wire.TRAIN_LOSS: result.loss,
                    wire.TRAIN_SECONDS: result.seconds})
    log.info("event=trained hospital=%s round=%d loss=%.4f seconds=%.1f tp=%d dp=%d", hospital,
             rnd, result.loss, result.seconds, node.tp, node.dp)
    reply = RecordDict({wire.METRICS: MetricRecord(metrics),
                        wire.INFO: ConfigRecord({wire.INFO_HOSPITAL: hospital})})
    if secure_client.is_secure(msg):
        # Only the masked, quantized update leaves the hospital, never the weights.
        update = flatten_update(model.state_dict(), global_state)
        masked = secure_client.mask(msg, node, update, len(data.train), trained_from)
        for name, record in masked.items():
            reply[name] = record
    else:
        for name, record in weights.pack(model.state_dict()).items():
            reply[name] = record
    return Message(reply, reply_to=msg)


@app.query()
def secure_step(msg: Message, context: Context) -> Message:
    """Secure-aggregation steps that carry no training: advertise keys, reveal for unmask."""
    node = NodeConfig.from_context(context)
    run_approval.gate(node, context.run_id, RunConfig.from_dict(dict(context.run_config)),
                      participants=secure_client.participants(msg))
    secure_client.check_run_id(msg, context.run_id, node.hospital)
    return secure_client.query_step(msg, node)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    from fedmri.client.trainer import evaluate

    node, cfg, model, data, load_s = _setup(msg, context)
    metrics: dict[str, int | float | list[int] | list[float]] = {wire.LOAD_SECONDS: load_s}
    if _on_mesh(node):
        outcome = _mesh(node, cfg, model, data, seed=cfg.seed, epochs=0, evaluate_first=True)
        assert outcome.val is not None
        metrics.update(_eval_metrics(outcome.val, data))
        metrics[wire.MESH_SETUP_SECONDS] = outcome.setup_seconds
    else:
        metrics.update(_eval_metrics(evaluate(model, data.val, cfg), data))
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics),
                               wire.INFO: ConfigRecord({wire.INFO_HOSPITAL: node.hospital})}),
                   reply_to=msg)
