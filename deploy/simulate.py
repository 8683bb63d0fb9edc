"""`fedmri simulate`: the whole federation as real local processes on 127.0.0.1.

The topology deploy/compose.yaml runs in containers (fedmri.deploy.topology), here as local
processes through the same commands: `fedmri server init` and a ticket per hospital
(`fedmri server token --out`), `fedmri server start`, then each hospital's `fedmri client
init --ticket` (its own keys, enrolled through the enrollment service) and `fedmri client
start` (SuperNode and executor), then `fedmri run start --wait` and `fedmri run report` with
the held-back test site. Every home lies under OUT (coordinator/, hospital-N/); the report,
the global model and the plots are written to OUT. Every process started here is stopped on
success, failure or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmri.common.checkpoint import save_json
from fedmri.common.config import RunConfig, run_config_to_args
from fedmri.common.layout import TEST_SITE, hospital_dirs
from fedmri.deploy.topology import Hospital, LocalFederation, Topology, ok, wait_for
from fedmri.proto import files
from fedmri.proto.events import Event, Failed
from fedmri.server.runs import RUN_RECORD, describe, wait_for_end

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
    # Ranks splitting each volume in depth, per hospital name ("*": every hospital).
    tp: dict[str, int] = field(default_factory=dict)
    # Each hospital's messages in fedmri's long-lived executor, as the hospital daemon runs
    # them; False: Flower's per-message ClientApp processes.
    executor: bool = True


def _default_printer(event: Event) -> None:
    line = describe(event)
    if line:
        print(line, flush=True)


def topology(opts: SimulateOptions, sites: list[str]) -> Topology:
    unknown = sorted(set(opts.tp) - set(sites) - {"*"})
    if unknown:
        raise ValueError(f"--tp names {', '.join(unknown)}, not among the hospitals "
                         f"{', '.join(sites)}")
    threads = max(1, (os.cpu_count() or 1) // len(sites))
    hospitals = tuple(Hospital(name, tp=opts.tp.get(name, opts.tp.get("*", 1)),
                               threads=threads, executor=opts.executor) for name in sites)
    cfg = opts.config
    flags = ("--min-nodes", str(len(sites)), "--node-wait", "300",
             "--round-timeout", str(opts.timeout_s), "--stage-timeout", str(opts.stage_timeout_s),
             "--wait-timeout", str(opts.timeout_s), *run_config_to_args(cfg))
    return Topology("simulate", hospitals, flags, allow_plain=not cfg.secure)


def run_simulation(opts: SimulateOptions,
                   on_event: Callable[[Event], None] = _default_printer
                   ) -> dict[str, Any]:
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = (opts.data or out / "data").resolve()
    if not (data / files.COHORT_MANIFEST).exists():
        from fedmri.deploy.cohort import generate_cohort

        print(f"writing synthetic cohort to {data} ...", file=sys.stderr, flush=True)
        generate_cohort(data, hospitals=opts.hospitals, subjects=opts.subjects, seed=opts.seed,
                        progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    sites = [site.name for site in hospital_dirs(data)[: opts.hospitals]]
    if len(sites) < opts.hospitals:
        raise ValueError(f"{data} has {len(sites)} hospital folders, {opts.hospitals} requested")
    topo = topology(opts, sites)
    cohort_s = time.perf_counter() - started

    fed_started = time.perf_counter()
    with LocalFederation(out, data, topo) as fed:
        print("starting the coordinator and enrolling the hospitals ...", file=sys.stderr,
              flush=True)
        fed.up(wait_online=False)
        runner = fed.start("run", *topo.run_start(str(fed.server)))
        folder = wait_for("the run to be submitted", lambda: _submitted(fed, runner), 120)
        outcome = wait_for_end(folder, on_event, opts.timeout_s,
                               lambda: _trouble(fed, runner))
        runner.wait(timeout=60)  # `fedmri run start --wait` follows the same events
        if isinstance(outcome, Failed):
            raise RuntimeError(f"the federation failed: {outcome.error} (logs in {out})")
        fed_s = time.perf_counter() - fed_started
        ok(*topo.run_report(str(fed.server), str(out), str(data / TEST_SITE)), timeout=600)

    report: dict[str, Any] = json.loads((out / files.REPORT).read_text())
    report["config"].update(subjects=opts.subjects, data=str(data), cohort_seed=opts.seed)
    report["seconds"] = {"total": time.perf_counter() - started, "cohort": cohort_s,
                         "federation": fed_s}
    save_json(out / files.REPORT, report)
    return report


def _trouble(fed: LocalFederation, runner: subprocess.Popen[bytes]) -> str | None:
    """Why the run can no longer end well: the runner or the coordinator has exited."""
    if runner.poll() is not None:
        text = (fed.root / "run.out").read_text(errors="replace")
        return f"fedmri run start failed: {text.strip()[-1500:]}"
    server = fed.procs["server"]
    if server.poll() is not None:
        return (f"the coordinator exited (code {server.returncode}); see "
                f"{fed.root / 'server.out'} and {fed.server / 'logs'}")
    return None


def _submitted(fed: LocalFederation, runner: subprocess.Popen[bytes]) -> Path | None:
    found = next(iter((fed.server / "runs").glob(f"*/{RUN_RECORD}")), None)
    if found is None and runner.poll() not in (None, 0):
        raise RuntimeError(_trouble(fed, runner))
    return found.parent if found else None
