"""ClientApps of `fedmri bench secagg`: each client uploads its cohort vector (no training).

Node config: `index` (this client's place in the cohort, 0..N-1) and `cpu-dir`. Client i's
vector and weight come from the run config (`fedmri.common.bench_vectors.BenchCohort`).

Every ClientApp process (Flower starts one per message) writes, when it exits,
`<cpu-dir>/<variant>-<pid>.json` = {"cpu_s": its whole user+sys CPU (getrusage RUSAGE_SELF:
interpreter start, imports, message decoding, our handler and mods, the reply's encoding),
"app_cpu_s": the part spent inside our handler and mods, "peak_mb": its ru_maxrss}, so the
harness sums client CPU exactly, however many processes a protocol needs.
"""

from __future__ import annotations

import atexit
import os
import resource
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

from fedmri.common import wire
from fedmri.common.bench_vectors import NODE_CPU_DIR, NODE_INDEX, BenchCohort
from fedmri.common.checkpoint import save_json


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _ProcessCpu:
    """This process's CPU record; written once, at exit, into the node's cpu-dir."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.app_cpu_s = 0.0

    def register(self, context: Context, variant: str) -> None:
        if self.path is not None or NODE_CPU_DIR not in context.node_config:
            return
        self.path = Path(str(context.node_config[NODE_CPU_DIR])) / f"{variant}-{os.getpid()}.json"
        atexit.register(self.write)

    def write(self) -> None:
        if self.path is None:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record = {"cpu_s": usage.ru_utime + usage.ru_stime, "app_cpu_s": self.app_cpu_s,
                  "peak_mb": usage.ru_maxrss / 1024}
        save_json(self.path, record)


_PROCESS = _ProcessCpu()


@contextmanager
def measured(context: Context, variant: str) -> Iterator[None]:
    """Count the enclosed work as this process's app CPU; record the process's CPU at exit."""
    _PROCESS.register(context, variant)
    start = _cpu_s()
    try:
        yield
    finally:
        _PROCESS.app_cpu_s += _cpu_s() - start


def measured_mod(variant: str) -> Mod:
    """A mod (put it first) that measures every mod and handler after it."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        with measured(context, variant):
            return call_next(msg, context)

    return mod


def cohort_client(context: Context) -> tuple[int, BenchCohort]:
    """This client's index (node config) and the cohort (run config)."""
    if NODE_INDEX not in context.node_config:
        raise ValueError(f"node {context.node_id}: node config has no '{NODE_INDEX}'; start "
                         "the SuperNode with --node-config 'index=I cpu-dir=\"DIR\"'")
    return int(context.node_config[NODE_INDEX]), BenchCohort.from_run_config(context.run_config)


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
