"""ServerApps of `fedmri bench secagg`: one aggregation variant each, measured the same way.

Every variant reads the cohort from the run config (`fedmri.deploy.bench.vectors`), regenerates
all clients' vectors once to get the exact weighted mean (float64), runs R rounds and writes
`<out-dir>/bench.json`:

    {"variant", "cohort", "rounds": [{"round", "seconds", "server_cpu_s", "upload_bytes",
     "upload_bytes_per_client", "replies", "max_abs_error"}], "server_peak_mb", "details"}

or `{"variant", "error"}` when the run failed. Measures, the same for every variant
(`BenchRecorder`):

- seconds: wall time of the round, from the first message sent to the aggregate in hand;
- server_cpu_s: this process's user+sys CPU over the round (getrusage RUSAGE_SELF);
- upload_bytes: the serialized size of the content of every reply of the round (all protocol
  stages), i.e. the summed size of Flower's deflated objects of each reply's RecordDict
  (arrays, chunks, records: what the SuperNode pushes to the SuperLink, before transport
  framing), counted by `CountingGrid`; per client = total / N;
- max_abs_error: max over coordinates of |aggregate - exact weighted mean|, in float64;
- server_peak_mb: ru_maxrss of this process at the end (includes the float64 reference mean,
  8 bytes per parameter, the same for every variant).

The counting (deflating every reply once more) is subtracted from seconds and server_cpu_s.
`CountingGrid.send_and_receive` pulls every `grid-poll-s` seconds (default 0.2) instead of
Flower's fixed 3 s, so a protocol stage is not rounded up to 3 s; the same for all variants.

Variants: `plain_app` (weighted FedAvg over the Message API, no protection: the server's own
weighted mean), `flower_secaggplus_app` (Flower's bundled SecAgg+ on its legacy strategy
path, parameters in `secaggplus_settings`) and `secure_app` (ours: the ServerApp's own
SecureFedAvg).
"""

from __future__ import annotations

import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Parameters, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run

from fedmri.common.checkpoint import save_json
from fedmri.common.secagg.graph import default_degree, default_threshold
from fedmri.deploy.bench.measure import cpu_seconds, peak_mb
from fedmri.deploy.bench.vectors import BenchCohort
from fedmri.proto import files, wire
from fedmri.proto.events import Event, SecureSum
from fedmri.proto.run_config import ServerSettings
from fedmri.server.exchange import Exchange
from fedmri.server.fedavg import weighted_average
from fedmri.server.secure_round import SecureFedAvg

MODULUS = 2**32  # Flower's default (and largest) SecAgg+ modulus
FLOAT32_QUANT_CAP = 2**24  # beyond this, Flower's float32 quantizer arithmetic limits precision


def content_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content: Flower's deflated objects, each counted once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


class CountingGrid(Grid):
    """Delegates to Flower's Grid and counts the serialized size of every reply's content."""

    def __init__(self, inner: Grid, poll_s: float = 0.2) -> None:
        self.inner, self.poll_s = inner, poll_s
        self.reset()

    def reset(self) -> None:
        self.bytes_by_node: dict[int, int] = defaultdict(int)
        self.replies = 0
        self.overhead_s = 0.0  # wall and CPU spent counting, subtracted from the round
        self.overhead_cpu_s = 0.0

    def _count(self, messages: list[Message]) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        for msg in messages:
            self.replies += 1
            if msg.has_content():
                self.bytes_by_node[msg.metadata.src_node_id] += content_bytes(msg.content)
        self.overhead_s += time.perf_counter() - wall
        self.overhead_cpu_s += cpu_seconds() - cpu

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._count(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        pending = {mid for mid in self.push_messages(list(messages)) if mid}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {msg.metadata.reply_to_message_id for msg in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies


@dataclass
class RoundStats:
    round: int
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    upload_bytes: int = 0
    upload_bytes_per_client: float = 0.0
    replies: int = 0
    max_abs_error: float | None = None


class BenchRecorder:
    """The cohort, the reference mean, the counting grid and the per-round measurements."""

    def __init__(self, grid: Grid, context: Context, variant: str) -> None:
        self.variant = variant
        self.cohort = BenchCohort.from_run_config(context.run_config)
        self.settings = ServerSettings.from_run_config(dict(context.run_config))
        self.grid = CountingGrid(grid, self.settings.grid_poll_s)
        self.reference = self.cohort.exact_mean()
        self.rounds: list[RoundStats] = []

    def wait_for_nodes(self) -> list[int]:
        """All N SuperNodes, so no round waits for a late one (not part of any round)."""
        deadline = time.monotonic() + self.settings.node_wait_s
        while len(nodes := sorted(self.grid.get_node_ids())) < self.cohort.clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {self.cohort.clients} SuperNodes connected "
                                   f"within {self.settings.node_wait_s:.0f}s")
            time.sleep(0.2)
        return nodes

    @contextmanager
    def round(self, rnd: int) -> Iterator[RoundStats]:
        stats = RoundStats(rnd)
        self.grid.reset()
        wall, cpu = time.perf_counter(), cpu_seconds()
        yield stats
        stats.seconds = time.perf_counter() - wall - self.grid.overhead_s
        stats.server_cpu_s = cpu_seconds() - cpu - self.grid.overhead_cpu_s
        stats.upload_bytes = sum(self.grid.bytes_by_node.values())
        stats.upload_bytes_per_client = stats.upload_bytes / self.cohort.clients
        stats.replies = self.grid.replies
        self.rounds.append(stats)

    def score(self, stats: RoundStats, aggregate: npt.NDArray[Any]) -> None:
        flat = np.asarray(aggregate, dtype=np.float64).reshape(-1)
        if flat.shape != self.reference.shape:
            raise ValueError(f"round {stats.round}: the aggregate has {flat.size} values, "
                             f"expected {self.reference.size}")
        stats.max_abs_error = float(np.max(np.abs(flat - self.reference)))

    def finish(self, details: dict[str, Any]) -> None:
        save_json(self.settings.out_dir / files.BENCH_RESULT, {
            "variant": self.variant, "cohort": self.cohort.to_run_config(),
            "rounds": [asdict(r) for r in self.rounds], "server_peak_mb": peak_mb(),
            "details": details})


def record_variant(context: Context, variant: str,
                   body: Callable[[BenchRecorder], dict[str, Any]], grid: Grid) -> None:
    """Run one variant's rounds; bench.json holds the measurements, or the error."""
    out_dir = ServerSettings.from_run_config(dict(context.run_config)).out_dir
    try:
        bench = BenchRecorder(grid, context, variant)
        bench.finish(body(bench))
    except Exception as err:
        save_json(out_dir / files.BENCH_RESULT, {"variant": variant,
                                          "error": f"{type(err).__name__}: {err}",
                                          "trace": traceback.format_exc(limit=6)})
        raise


# -- plain: weighted FedAvg over the Message API ------------------------------------------

def _plain_rounds(bench: BenchRecorder) -> dict[str, Any]:
    nodes = bench.wait_for_nodes()
    global_vector = np.zeros(bench.cohort.params, dtype=np.float32)
    for rnd in range(1, bench.cohort.rounds + 1):
        with bench.round(rnd) as stats:
            arrays = ArrayRecord(numpy_ndarrays=[global_vector])
            messages = [Message(RecordDict({wire.ARRAYS: arrays,
                                            wire.CONFIG: ConfigRecord({wire.ROUND: rnd})}),
                                dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(rnd)) for node in nodes]
            replies = list(bench.grid.send_and_receive(
                messages, timeout=bench.settings.round_timeout_s))
            failed = [r for r in replies if r.has_error()]
            if failed or len(replies) != len(nodes):
                reasons = "; ".join(str(r.error.reason) for r in failed)
                raise RuntimeError(f"round {rnd}: {len(replies) - len(failed)} of {len(nodes)} "
                                   f"clients answered. {reasons}")
            # The server's own weighted mean, in float64 so the score sees its accumulation.
            states = [({"v": torch.from_numpy(reply.content.array_records[wire.ARRAYS]
                                              .to_numpy_ndarrays()[0]).double()},
                       float(cast(float, reply.content.metric_records[wire.METRICS][
                           wire.NUM_EXAMPLES])))
                      for reply in sorted(replies, key=lambda r: r.metadata.src_node_id)]
            aggregate = weighted_average(states)["v"].numpy()
        bench.score(stats, aggregate)
        global_vector = aggregate.astype(np.float32)
    return {"aggregation": "fedmri.server.fedavg.weighted_average (float64) of the clients' "
                           "float32 vectors"}


plain_app = ServerApp()


@plain_app.main()
def _plain_main(grid: Grid, context: Context) -> None:
    record_variant(context, "plain", _plain_rounds, grid)


# -- flower: Flower's SecAgg+ (legacy DefaultWorkflow + FedAvg) ---------------------------

def secaggplus_settings(cohort: BenchCohort) -> dict[str, Any]:
    """SecAgg+ parameters that match our protocol's graph and give Flower its best precision.

    - num_shares: share holders per client = our default degree + 1 (self included): every
      client for N <= 32 (complete graph, as ours), else a ring of O(log N) neighbours.
      N = 2 needs Flower's float form (1.0 = all sampled clients).
    - reconstruction_threshold: the smallest strict majority of the holders, as ours.
    - clipping_range: the cohort's clip (10 std, nothing is clipped).
    - max_weight: the largest client weight, so the weight factor uses the full range.
    - quantization_range: the largest power of two <= min(2^24, (2^32 - 1) / N): N values of
      at most Q, plus the weight factor, must sum below the 2^32 modulus; above 2^24 the
      float32 arithmetic in Flower's quantizer (clients return float32) gains nothing.
    - modulus_range: 2^32 (Flower's default and maximum).
    """
    n = cohort.clients
    degree = default_degree(n)
    holders = degree + 1
    quant = 1 << (min(FLOAT32_QUANT_CAP, (MODULUS - 1) // n).bit_length() - 1)
    return {"num_shares": holders if holders > 2 else 1.0,
            "reconstruction_threshold": default_threshold(degree),
            "clipping_range": cohort.clip, "quantization_range": quant,
            "modulus_range": MODULUS, "max_weight": float(max(cohort.examples))}


def secaggplus_error_bound(cohort: BenchCohort, settings: dict[str, Any]) -> float:
    """Worst-case per-coordinate error of Flower's SecAgg+ weighted mean (nothing clipped).

    Per client, in units of the update: stochastic rounding < 2c/Q, plus float32 rounding of
    x * w, x + c and * Q/2c, each <= c * 2^-24, 2c * 2^-24, 2c * 2^-24. Summed over N clients,
    divided by the quantized total weight D; the weights rounded to 1/Q move the mean by at
    most 2cN/(QD).
    """
    n, c = cohort.clients, float(settings["clipping_range"])
    q, max_w = int(settings["quantization_range"]), float(settings["max_weight"])
    total = sum(round(e / max_w * q) for e in cohort.examples) / q
    return n * (5 * c * 2**-24 + 4 * c / q) / total + 1e-12


class _MeasuredFit:
    """Wraps a fit workflow: one measured round per call, scored against the exact mean."""

    def __init__(self, inner: Callable[[Grid, Context], None], bench: BenchRecorder) -> None:
        self.inner, self.bench = inner, bench

    def __call__(self, grid: Grid, context: Context) -> None:
        rnd = int(cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][
            WorkflowKey.CURRENT_ROUND]))
        before = context.state.array_records[MAIN_PARAMS_RECORD]
        with self.bench.round(rnd) as stats:
            self.inner(grid, context)
        after = context.state.array_records[MAIN_PARAMS_RECORD]
        if after is before:
            raise RuntimeError(f"round {rnd}: SecAgg+ halted without an aggregate (too few "
                               "clients answered); see the ServerApp log")
        aggregate = after.to_numpy_ndarrays()[0]
        self.bench.score(stats, aggregate)
        # Keep the global model float32, as plain does (SecAgg+ dequantizes to float64).
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
            numpy_ndarrays=[aggregate.astype(np.float32)])


def _flower_rounds(bench: BenchRecorder, context: Context) -> dict[str, Any]:
    cohort = bench.cohort
    settings = secaggplus_settings(cohort)
    zeros: Parameters = ndarrays_to_parameters([np.zeros(cohort.params, dtype=np.float32)])
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cohort.clients,
                      min_available_clients=cohort.clients, initial_parameters=zeros)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cohort.rounds),
                           strategy=strategy)
    secagg = SecAggPlusWorkflow(**settings, timeout=bench.settings.round_timeout_s)
    bench.wait_for_nodes()
    DefaultWorkflow(fit_workflow=_MeasuredFit(secagg, bench))(bench.grid, legacy)
    if len(bench.rounds) != cohort.rounds:
        raise RuntimeError(f"SecAgg+ ran {len(bench.rounds)} of {cohort.rounds} rounds")
    return {"secaggplus": settings, "error_bound": secaggplus_error_bound(cohort, settings),
            "strategy": "flwr.server.strategy.FedAvg (legacy), full participation"}


flower_secaggplus_app = ServerApp()


@flower_secaggplus_app.main()
def _flower_main(grid: Grid, context: Context) -> None:
    record_variant(context, "flower", lambda bench: _flower_rounds(bench, context), grid)


# -- ours: the ServerApp's SecureFedAvg -------------------------------------------------------

def _secure_rounds(bench: BenchRecorder, context: Context) -> dict[str, Any]:
    cohort, settings = bench.cohort, bench.settings
    secure = SecureFedAvg(str(context.run_id), settings.pinned_keys, cohort.clip,
                          max(cohort.examples), cohort.rounds, settings.round_timeout_s,
                          settings.stage_timeout_s)
    nodes = bench.wait_for_nodes()
    # A float64 global model of zeros: the new state is the dequantized mean itself.
    zeros = {"v": torch.zeros(cohort.params, dtype=torch.float64)}
    bounds = []
    for rnd in range(1, cohort.rounds + 1):
        events: list[Event] = []
        with bench.round(rnd) as stats:
            content = RecordDict({
                wire.ARRAYS: ArrayRecord(numpy_ndarrays=[np.zeros(cohort.params, np.float32)]),
                wire.CONFIG: ConfigRecord({wire.ROUND: rnd})})
            exchange = Exchange(bench.grid, rnd, events.append, {})
            outcome = secure.run(exchange, nodes, content, zeros)
            if exchange.failures or outcome.new_state is None:
                raise RuntimeError(f"round {rnd}: {outcome.skipped} "
                                   f"{'; '.join(exchange.failures)}")
        bench.score(stats, outcome.new_state["v"].numpy())
        bounds += [e.error_bound for e in events if isinstance(e, SecureSum)]
    return {"aggregation": "fedmri secure aggregation: uint32 masked vectors; 3 round trips in "
                           "round 1, then 2 (the next round's keys ride on the unmask reply)",
            "clip": secure.quant.clip, "scale": secure.quant.scale,
            "max_weight": secure.quant.max_weight, "error_bound": max(bounds)}


secure_app = ServerApp()


@secure_app.main()
def _secure_main(grid: Grid, context: Context) -> None:
    record_variant(context, "ours", lambda bench: _secure_rounds(bench, context), grid)
