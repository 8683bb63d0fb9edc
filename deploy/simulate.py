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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmri.common.checkpoint import save_json
from fedmri.common.config import RunConfig
from fedmri.common.identity import enroll_hospitals, secure_node_config
from fedmri.common.layout import TEST_SITE, hospital_dirs
from fedmri.deploy.deployment import Deployment, FlowerApp, run_deployment

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


class EventTail:
    """Reads new lines of the ServerApp's events.jsonl as they appear."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open() as fh:
            fh.seek(self.offset)
            text = fh.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def describe(event: dict[str, Any]) -> str | None:
    """One human line for a ServerApp event, or None for events not worth a line."""
    kind = event.get("event")
    if kind == "round_done":
        losses = " ".join(f"{h}={v:.3f}" for h, v in event["train_loss"].items())
        return (f"round {event['round']}: {event['seconds']:.1f}s, "
                f"{event['hospitals']} hospitals, train loss {losses}")
    if kind == "validated":
        return f"round {event['round']}: global validation Dice {event['global_val_dice']:.3f}"
    if kind in ("hospital_failed", "round_skipped", "failed", "resumed"):
        return f"{kind}: {event.get('reason') or event.get('error') or event}"
    return None


def _default_printer(event: dict[str, Any]) -> None:
    line = describe(event)
    if line:
        print(line, flush=True)


def run_simulation(opts: SimulateOptions,
                   on_event: Callable[[dict[str, Any]], None] = _default_printer
                   ) -> dict[str, Any]:
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = opts.config
    started = time.perf_counter()
    data = (opts.data or out / "data").resolve()
    if not (data / "cohort.json").exists():
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
    run_config = {**cfg.to_dict(), "out-dir": str(out), "min-nodes": len(sites),
                  "node-wait-s": 300.0, "round-timeout-s": opts.timeout_s,
                  "stage-timeout-s": opts.stage_timeout_s, "pinned-keys": str(pinned)}
    threads = max(1, (os.cpu_count() or 1) // len(sites))
    nodes = [(site.name, {"data-path": str(site), "threads": threads,
                          **secure_node_config(node_dir, site.name, pinned)})
             for site in sites]
    for stale in ("events.jsonl", "server_state.json"):
        (out / stale).unlink(missing_ok=True)
    tail = EventTail(out / "events.jsonl")

    def poll() -> dict[str, Any] | None:
        outcome = None
        for event in tail.read():
            on_event(event)
            if event.get("event") in ("done", "failed"):
                outcome = event
        return outcome

    fed_started = time.perf_counter()
    outcome = run_deployment(
        Deployment(home=out / ".flwr", workdir=out, nodes=nodes, tls=opts.tls,
                   timeout_s=opts.timeout_s),
        FlowerApp("fedmri.server.app:app", "fedmri.client.app:app", run_config), poll)
    if outcome["event"] == "failed":
        raise RuntimeError(f"the federation failed: {outcome['error']} (logs in {out / 'logs'})")
    fed_s = time.perf_counter() - fed_started

    state = json.loads((out / "server_state.json").read_text())
    test = evaluate_on_test_site(out / "global_model.pt", data / TEST_SITE, out / "sample.png")
    report = {
        "config": {**cfg.to_dict(), "mode": "fedavg", "hospitals": [s.name for s in sites],
                   "subjects": opts.subjects, "data": str(data), "cohort_seed": opts.seed},
        "rounds": state["rounds"],
        "test_dice": test["dice"],
        "test_dice_per_class": test["per_class"],
        "seconds": {"total": time.perf_counter() - started, "cohort": cohort_s,
                    "federation": fed_s},
    }
    save_json(out / "report.json", report)
    from fedmri.deploy.plots import plot_curves

    plot_curves(report, out / "curves.png")
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
