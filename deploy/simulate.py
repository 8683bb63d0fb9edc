"""`fedmri simulate`: the whole federation as real local processes on 127.0.0.1.

One `flower-superlink`, one `flower-supernode` per hospital (each with its own data folder
in its node config), the run submitted with `flwr run`, progress read from the ServerApp's
event log, then the final global model scored on the held-back test site. Every process
started here is stopped on success, failure or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedmri.common.checkpoint import save_json
from fedmri.common.config import RunConfig
from fedmri.common.layout import TEST_SITE, hospital_dirs
from fedmri.deploy.deployment import Deployment, FlowerApp, run_deployment
from fedmri.deploy.enrollment import enroll_hospitals, enrolled_node
from fedmri.proto import files
from fedmri.proto.events import (
    FINAL,
    Event,
    EventTail,
    Failed,
    HospitalFailed,
    Resumed,
    RoundDone,
    RoundSkipped,
    Validated,
)
from fedmri.proto.run_config import ServerSettings

log = logging.getLogger("fedmri.deploy")


@dataclass
class SimulateOptions:
    out: Path
    hospitals: int = 3
    subjects: int = 8
    seed: int = 0
    data: Path | None = None  # an existing cohort folder; default: synthesize into OUT/data
    timeout_s: float = 3600.0
    config: RunConfig = RunConfig()
    stage_timeout_s: float = 120.0  # a secure-aggregation step without training
    tls: bool = True  # TLS between SuperNodes, `flwr run` and the SuperLink (a per-run CA)
    # Ranks splitting each volume in depth, per hospital name ("*": every hospital).
    tp: dict[str, int] = field(default_factory=dict)
    # Each hospital's messages in fedmri's long-lived executor, as the hospital daemon runs
    # them; False: Flower's per-message ClientApp processes.
    executor: bool = True


def describe(event: Event) -> str | None:
    """One human line for a ServerApp event, or None for events not worth a line."""
    if isinstance(event, RoundDone):
        losses = " ".join(f"{h}={v:.3f}" for h, v in event.train_loss.items())
        return (f"round {event.round}: {event.seconds:.1f}s, "
                f"{event.hospitals} hospitals, train loss {losses}")
    if isinstance(event, Validated):
        return f"round {event.round}: global validation Dice {event.global_val_dice:.3f}"
    if isinstance(event, (HospitalFailed, RoundSkipped)):
        return f"{event.NAME}: round {event.round}: {event.reason}"
    if isinstance(event, Failed):
        return f"{event.NAME}: {event.error}"
    if isinstance(event, Resumed):
        return f"{event.NAME} after round {event.round}"
    return None


def _default_printer(event: Event) -> None:
    line = describe(event)
    if line:
        print(line, flush=True)


def run_simulation(opts: SimulateOptions,
                   on_event: Callable[[Event], None] = _default_printer
                   ) -> dict[str, Any]:
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = opts.config
    started = time.perf_counter()
    data = (opts.data or out / "data").resolve()
    if not (data / files.COHORT_MANIFEST).exists():
        from fedmri.deploy.cohort import generate_cohort

        print(f"writing synthetic cohort to {data} ...", file=sys.stderr, flush=True)
        generate_cohort(data, hospitals=opts.hospitals, subjects=opts.subjects, seed=opts.seed,
                        progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    sites = hospital_dirs(data)[: opts.hospitals]
    if len(sites) < opts.hospitals:
        raise ValueError(f"{data} has {len(sites)} hospital folders, {opts.hospitals} requested")
    cohort_s = time.perf_counter() - started

    node_dir = out / ".flwr" / "nodes"
    pinned = enroll_hospitals(node_dir, [site.name for site in sites])
    settings = ServerSettings(out_dir=out, min_nodes=len(sites), node_wait_s=300.0,
                              round_timeout_s=opts.timeout_s,
                              stage_timeout_s=opts.stage_timeout_s, pinned_keys=pinned)
    run_config = {**cfg.to_dict(), **settings.to_run_config()}
    threads = max(1, (os.cpu_count() or 1) // len(sites))
    unknown = sorted(set(opts.tp) - {site.name for site in sites} - {"*"})
    if unknown:
        raise ValueError(f"--tp names {', '.join(unknown)}, not among the hospitals "
                         f"{', '.join(site.name for site in sites)}")
    nodes = [replace(enrolled_node(node_dir, site.name, pinned), data_path=site,
                     threads=threads, tp=opts.tp.get(site.name, opts.tp.get("*", 1)))
             for site in sites]
    for stale in (files.EVENTS, files.SERVER_STATE):
        (out / stale).unlink(missing_ok=True)
    tail = EventTail(out / files.EVENTS)

    def poll() -> Event | None:
        outcome = None
        for event in tail.read():
            on_event(event)
            if isinstance(event, FINAL):
                outcome = event
        return outcome

    fed_started = time.perf_counter()
    outcome = run_deployment(
        Deployment(home=out / ".flwr", workdir=out, nodes=nodes, tls=opts.tls,
                   timeout_s=opts.timeout_s, executor=opts.executor),
        FlowerApp("fedmri.server.app:app", "fedmri.client.app:app", run_config), poll)
    if isinstance(outcome, Failed):
        raise RuntimeError(f"the federation failed: {outcome.error} (logs in {out / 'logs'})")
    fed_s = time.perf_counter() - fed_started

    state = json.loads((out / files.SERVER_STATE).read_text())
    test = evaluate_on_test_site(out / files.GLOBAL_MODEL, data / TEST_SITE, out / files.SAMPLE)
    report = {
        "config": {**cfg.to_dict(), "mode": "fedavg", "hospitals": [s.name for s in sites],
                   "subjects": opts.subjects, "data": str(data), "cohort_seed": opts.seed},
        "rounds": state["rounds"],
        "test_dice": test["dice"],
        "test_dice_per_class": test["per_class"],
        "seconds": {"total": time.perf_counter() - started, "cohort": cohort_s,
                    "federation": fed_s},
    }
    save_json(out / files.REPORT, report)
    from fedmri.deploy.plots import plot_curves

    plot_curves(report, out / files.CURVES)
    return report


def evaluate_on_test_site(model: Path, site: Path, sample_png: Path) -> dict[str, Any]:
    """Score the model with the hospital-side evaluator, run as its own process."""
    cmd = [sys.executable, "-m", "fedmri.common.cli", "evaluate", "--model", str(model),
           "--data", str(site), "--json", "--sample-png", str(sample_png)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"evaluating {model} on {site} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result
