"""`fedmri simulate --out DIR [--hospitals N] [--subjects K] [run config flags]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmri.common.config import add_run_config_args, run_config_from_args
from fedmri.proto import files


def _with_progress_bar(opts: Any, rounds: int, run: Callable[..., dict[str, Any]],
                       describe: Callable[[Any], str | None]) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedmri.proto.events import Event, RoundDone

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} rounds"), TimeElapsedColumn()) as bar:
        task = bar.add_task("federated training", total=rounds)

        def on_event(event: Event) -> None:
            line = describe(event)
            if line:
                bar.console.print(line)
            if isinstance(event, RoundDone):
                bar.update(task, completed=event.round)

        return run(opts, on_event=on_event)


def parse_tp(spec: str) -> dict[str, int]:
    """`--tp`: "P" -> {"*": P} (every hospital), "NAME=P,NAME=P" -> {NAME: P, ...}."""

    def ranks(text: str) -> int:
        if not text.strip().isdigit() or int(text) < 1:
            raise ValueError(f"--tp: {text!r} is not a whole number of ranks >= 1")
        return int(text)

    if "=" not in spec:
        return {"*": ranks(spec)}
    out = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if not name.strip():
            raise ValueError(f"--tp: {item!r} names no hospital (HOSPITAL=P)")
        out[name.strip()] = ranks(value)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmri simulate",
        description="Run the federation on this machine as the Compose file runs it "
                    "(deploy/compose.yaml): a coordinator (`fedmri server`) and one hospital "
                    "daemon each (`fedmri client`), enrolled through the enrollment service, "
                    "then a run (`fedmri run`), as processes on 127.0.0.1 with their homes "
                    "under OUT, on a synthetic DICOM cohort (written to OUT/data unless "
                    "--data is given).")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--subjects", type=int, default=8, help="subjects per hospital")
    parser.add_argument("--data", type=Path, default=None,
                        help="an existing cohort (from `fedmri synth`) instead of a new one")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    parser.add_argument("--stage-timeout", type=float, default=120.0,
                        help="seconds to wait for hospitals in a secure-aggregation step "
                             "without training; later ones count as dropped")
    parser.add_argument("--tp", default="1", metavar="P|HOSPITAL=P,...",
                        help="worker processes that split each volume in depth (spatial tensor "
                             "parallelism): P for every hospital, or per hospital, e.g. "
                             "hospital-1=2")
    parser.add_argument("--per-message-processes", action="store_true",
                        help="run each hospital's messages in Flower's fresh per-message "
                             "processes instead of fedmri's long-lived executor (as the "
                             "hospital daemon runs them)")
    add_run_config_args(parser)  # --seed seeds the cohort too
    args = parser.parse_args(argv)
    if args.hospitals < 1:
        parser.error("--hospitals must be >= 1")
    try:
        tp = parse_tp(args.tp)
    except ValueError as err:
        parser.error(str(err))
    if args.out.exists() and (args.out / files.REPORT).exists():
        parser.error(f"{args.out} already holds a finished run; choose another --out")
    if (args.out / "coordinator").exists():
        parser.error(f"{args.out} holds an earlier, unfinished simulation (coordinator/); "
                     "choose another --out or remove it")
    try:
        cfg = run_config_from_args(args)
    except ValueError as err:
        parser.error(str(err))

    from fedmri.deploy.deployment import run_guarded
    from fedmri.deploy.simulate import SimulateOptions, run_simulation
    from fedmri.server.runs import describe

    opts = SimulateOptions(out=args.out, hospitals=args.hospitals, subjects=args.subjects,
                           seed=cfg.seed, data=args.data, timeout_s=args.timeout, config=cfg,
                           stage_timeout_s=args.stage_timeout, tp=tp,
                           executor=not args.per_message_processes)

    def work() -> dict[str, Any]:
        if sys.stdout.isatty():
            return _with_progress_bar(opts, cfg.rounds, run_simulation, describe)
        return run_simulation(opts)  # plain lines for logs and pipes

    report, code = run_guarded("simulate", work)
    if report is None:
        return code
    last = report["rounds"][-1]
    print(f"done in {report['seconds']['total']:.0f}s: global validation Dice "
          f"{last['global_val_dice']:.3f}, test-site Dice {report['test_dice']:.3f}")
    print(f"wrote {args.out}/{files.REPORT}, {files.GLOBAL_MODEL}, {files.CURVES}, "
          f"{files.SAMPLE}")
    return 0
