"""The hospital's Flower ClientApp: trains and evaluates on the data folder of its node config.

Node config (set by the SuperNode operator): `hospital` (name), `data-path` (DICOM folder),
optional `threads` (torch CPU threads).
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmri.client.hospital_data import HospitalData, load_hospital
from fedmri.client.trainer import evaluate, train_local
from fedmri.common import wire
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model

app = ClientApp()
log = logging.getLogger("fedmri.client")


def _setup(msg: Message, context: Context) -> tuple[str, RunConfig, torch.nn.Module, HospitalData,
                                                    float]:
    hospital = str(context.node_config.get(wire.HOSPITAL, f"node-{context.node_id}"))
    if "data-path" not in context.node_config:
        raise ValueError(f"hospital {hospital}: node config has no 'data-path'")
    threads = int(context.node_config.get("threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(dict(msg.content.config_records[wire.CONFIG]))
    start = time.perf_counter()
    data = load_hospital(Path(str(context.node_config["data-path"])), cfg)
    model = build_model(cfg)
    model.load_state_dict(msg.content.array_records[wire.ARRAYS].to_torch_state_dict())
    return hospital, cfg, model, data, time.perf_counter() - start


def _val_metrics(model: torch.nn.Module, data: HospitalData, cfg: RunConfig
                 ) -> dict[str, int | float | list[int] | list[float]]:
    result = evaluate(model, data.val, cfg)
    return {wire.VAL_DICE: result.dice, wire.VAL_LOSS: result.loss,
            wire.NUM_VAL: float(len(data.val))}


@app.train()
def train(msg: Message, context: Context) -> Message:
    hospital, cfg, model, data, load_s = _setup(msg, context)
    config = msg.content.config_records[wire.CONFIG]
    rnd = int(config[wire.ROUND])  # type: ignore[arg-type]
    metrics: dict[str, int | float | list[int] | list[float]] = {wire.LOAD_SECONDS: load_s}
    if bool(config.get(wire.EVAL_FIRST, False)):
        metrics.update(_val_metrics(model, data, cfg))
    seed = cfg.seed + 1000 * rnd + zlib.crc32(hospital.encode()) % 1000
    result = train_local(model, data.train, cfg, epochs=cfg.local_epochs, seed=seed)
    metrics.update({wire.NUM_EXAMPLES: float(len(data.train)), wire.TRAIN_LOSS: result.loss,
                    wire.TRAIN_SECONDS: result.seconds})
    log.info("event=trained hospital=%s round=%d loss=%.4f seconds=%.1f", hospital, rnd,
             result.loss, result.seconds)
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()),
                               wire.METRICS: MetricRecord(metrics),
                               wire.INFO: ConfigRecord({wire.HOSPITAL: hospital})}),
                   reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    hospital, cfg, model, data, load_s = _setup(msg, context)
    metrics = _val_metrics(model, data, cfg)
    metrics[wire.LOAD_SECONDS] = load_s
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics),
                               wire.INFO: ConfigRecord({wire.HOSPITAL: hospital})}),
                   reply_to=msg)
