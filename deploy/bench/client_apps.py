"""ClientApps of `fedmri bench secagg`: each client uploads its cohort vector (no training).

Node config (NodeConfig): `bench_index` (this client's place in the cohort, 0..N-1) and
`cpu_dir`. Client i's vector and weight come from the run config
(`fedmri.deploy.bench.vectors.BenchCohort`). Variants: plain, Flower's SecAgg+ mod, and ours
(the hospital's own secure_client, which also answers the next round's advertise on the
unmask step when the server sends its setup along).

Every ClientApp process (Flower starts one per message) writes, when it exits,
`<cpu-dir>/<variant>-<pid>.json` = {"cpu_s": its whole user+sys CPU (getrusage RUSAGE_SELF:
interpreter start, imports, message decoding, our handler and mods, the reply's encoding),
"app_cpu_s": the part spent inside our handler and mods, "peak_mb": its ru_maxrss}, so the
harness sums client CPU exactly, however many processes a protocol needs.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedmri.client import secure_client
from fedmri.common.checkpoint import save_json
from fedmri.deploy.bench.measure import cpu_seconds, peak_mb
from fedmri.deploy.bench.vectors import BenchCohort
from fedmri.proto import wire
from fedmri.proto.node_config import NodeConfig


class _ProcessCpu:
    """This process's CPU record; written once, at exit, into the node's cpu-dir."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.app_cpu_s = 0.0

    def register(self, context: Context, variant: str) -> None:
        cpu_dir = NodeConfig.from_context(context).cpu_dir
        if self.path is not None or cpu_dir is None:
            return
        self.path = cpu_dir / f"{variant}-{os.getpid()}.json"
        atexit.register(self.write)

    def write(self) -> None:
        if self.path is None:
            return
        record = {"cpu_s": cpu_seconds(), "app_cpu_s": self.app_cpu_s, "peak_mb": peak_mb()}
        save_json(self.path, record)


_PROCESS = _ProcessCpu()


@contextmanager
def measured(context: Context, variant: str) -> Iterator[None]:
    """Count the enclosed work as this process's app CPU; record the process's CPU at exit."""
    _PROCESS.register(context, variant)
    start = cpu_seconds()
    try:
        yield
    finally:
        _PROCESS.app_cpu_s += cpu_seconds() - start


def measured_mod(variant: str) -> Mod:
    """A mod (put it first) that measures every mod and handler after it."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        with measured(context, variant):
            return call_next(msg, context)

    return mod


def cohort_client(context: Context) -> tuple[int, BenchCohort]:
    """This client's index (node config) and the cohort (run config)."""
    index: int = NodeConfig.from_context(context).require("bench_index", "the benchmark")
    return index, BenchCohort.from_run_config(context.run_config)


# -- plain: the vector as a float32 ArrayRecord ---------------------------------------------

plain_app = ClientApp()


@plain_app.train()
def _plain_train(msg: Message, context: Context) -> Message:
    with measured(context, "plain"):
        index, cohort = cohort_client(context)
        vector = cohort.vector(index)
        metrics = MetricRecord({wire.NUM_EXAMPLES: cohort.weight(index)})
        return Message(RecordDict({wire.ARRAYS: ArrayRecord(numpy_ndarrays=[vector]),
                                   wire.METRICS: metrics}), reply_to=msg)


# -- flower: Flower's SecAgg+ mod around a NumPyClient ---------------------------------------

class VectorClient(NumPyClient):
    """Returns its vector as the fitted parameters; the server's initial parameters are zeros
    and every round's update replaces them, so SecAgg+ (which averages parameters) yields the
    weighted mean of the vectors."""

    def __init__(self, vector: npt.NDArray[np.float32], weight: int) -> None:
        self.vector, self.weight = vector, weight

    def get_parameters(self, config: dict[str, Any]) -> list[npt.NDArray[Any]]:
        return [np.zeros_like(self.vector)]

    def fit(self, parameters: list[npt.NDArray[Any]], config: dict[str, Any]
            ) -> tuple[list[npt.NDArray[Any]], int, dict[str, Any]]:
        if len(parameters) != 1 or parameters[0].shape != self.vector.shape:
            raise ValueError(f"expected one array of {self.vector.size} parameters, got shapes "
                             f"{[p.shape for p in parameters]}")
        return [self.vector], self.weight, {}


def _vector_client(context: Context) -> Client:
    index, cohort = cohort_client(context)
    return VectorClient(cohort.vector(index), cohort.weight(index)).to_client()


flower_secaggplus_app = ClientApp(client_fn=_vector_client,
                                  mods=[measured_mod("flower"), secaggplus_mod])


# -- ours: the hospital's secure_client around the cohort vector ----------------------------

secure_app = ClientApp()


@secure_app.train()
def _secure_train(msg: Message, context: Context) -> Message:
    with measured(context, "ours"):
        index, cohort = cohort_client(context)
        reply = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: cohort.weight(index)})})
        trained_from = secure_client.training_input({}, int(msg.metadata.group_id))
        records = secure_client.mask(msg, NodeConfig.from_context(context), cohort.vector(index),
                                     cohort.weight(index), trained_from)
        for name, record in records.items():
            reply[name] = record
        return Message(reply, reply_to=msg)


@secure_app.query()
def _secure_step(msg: Message, context: Context) -> Message:
    with measured(context, "ours"):
        return secure_client.query_step(msg, NodeConfig.from_context(context))
