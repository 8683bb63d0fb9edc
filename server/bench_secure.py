"""`ours` in `fedmri bench secagg`: our secure aggregation (SecureRound), measured like the
other variants (see fedmri.server.bench_apps). The global vector starts at zero, so the
aggregate update of a round is the weighted mean of the clients' vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmri.common import wire
from fedmri.common.identity import load_pinned
from fedmri.common.secagg import QuantConfig
from fedmri.server.bench_apps import BenchRecorder, run_variant
from fedmri.server.secure_round import SecureRound

secure_app = ServerApp()


def _secure_rounds(bench: BenchRecorder, context: Context) -> dict[str, Any]:
    pinned = load_pinned(Path(str(context.run_config["pinned-keys"])))
    cohort = bench.cohort
    quant = QuantConfig.for_clients(len(pinned), cohort.clip, max(cohort.examples))
    nodes = bench.wait_for_nodes()
    bounds = []
    advertised = None  # keys for the next round, collected by the last unmask step
    for rnd in range(1, cohort.rounds + 1):
        with bench.round(rnd) as stats:
            content = RecordDict({
                wire.ARRAYS: ArrayRecord(numpy_ndarrays=[np.zeros(cohort.params, np.float32)]),
                wire.CONFIG: ConfigRecord({wire.ROUND: rnd})})
            secure = SecureRound(bench.grid, str(context.run_id), rnd, pinned, quant,
                                 cohort.params, bench.round_timeout_s, lambda e: None,
                                 advertised=advertised)
            outcome = secure.run(nodes, content, advertise_next=rnd < cohort.rounds)
            advertised = secure.next
            if outcome.failures or outcome.mean_update is None:
                raise RuntimeError(f"round {rnd}: {'; '.join(outcome.failures)}")
        bench.score(stats, outcome.mean_update)
        bounds.append(outcome.error_bound)
    return {"aggregation": "fedmri secure aggregation: uint32 masked vectors; 3 round trips in "
                           "round 1, then 2 (the next round's keys ride on the unmask reply)",
            "clip": quant.clip, "scale": quant.scale, "max_weight": quant.max_weight,
            "error_bound": max(bounds)}


@secure_app.main()
def _secure_main(grid: Grid, context: Context) -> None:
    run_variant(context, "ours", lambda bench: _secure_rounds(bench, context), grid)
