"""`fedmri simulate --hospitals N --rounds R --out DIR [--seed S] [--subjects K] [--size D]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmri.common.config import RunConfig


def _with_progress_bar(opts: Any, rounds: int, run: Callable[..., dict[str, Any]],
                       describe: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total} rounds"), TimeElapsedColumn()) as bar:
        task = bar.add_task("federated training", total=rounds)

        def on_event(event: dict[str, Any]) -> None:
            line = describe(event)
            if line:
                bar.console.print(line)
            if event.get("event") == "round_done":
                bar.update(task, completed=event["round"])

        return run(opts, on_event=on_event)


def main(argv: list[str]) -> int:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog="fedmri simulate",
        description="Run the federation on this machine: a real flower-superlink and one "
                    "flower-supernode per hospital on 127.0.0.1, on a synthetic DICOM cohort "
                    "(written to OUT/data unless --data is given).")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=0, help="cohort and training seed")
    parser.add_argument("--subjects", type=int, default=8, help="subjects per hospital")
    parser.add_argument("--size", type=int, default=defaults.size,
                        help="model grid edge in voxels (FOV 192 mm)")
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--model", default=defaults.model, help="unet, basicunet or segresnet")
    parser.add_argument("--data", type=Path, default=None,
                        help="an existing cohort (from `fedmri synth`) instead of a new one")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    parser.add_argument("--secure", action=argparse.BooleanOptionalAction, default=True,
                        help="secure aggregation: the server learns only the sum of the "
                             "hospitals' updates (default); --no-secure for plain FedAvg")
    parser.add_argument("--stage-timeout", type=float, default=120.0,
                        help="seconds to wait for hospitals in a secure-aggregation step "
                             "without training; later ones count as dropped")
    parser.add_argument("--conv-backend", choices=["fedmri", "aten"],
                        default=defaults.conv_backend,
                        help="hospitals' 3D convolutions on fedmri.kernels (default) or ATen")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS between the processes (default: TLS with a per-run CA)")
    args = parser.parse_args(argv)
    if args.hospitals < 1:
        parser.error("--hospitals must be >= 1")
    if args.out.exists() and (args.out / "report.json").exists():
        parser.error(f"{args.out} already holds a finished run; choose another --out")
    try:
        cfg = RunConfig(model=args.model, size=args.size, rounds=args.rounds,
                        local_epochs=args.local_epochs, seed=args.seed, secure=args.secure,
                        conv_backend=args.conv_backend)
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))

    from fedmri.deploy.deployment import run_guarded
    from fedmri.deploy.simulate import SimulateOptions, describe, run_simulation

    opts = SimulateOptions(out=args.out, hospitals=args.hospitals, subjects=args.subjects,
                           seed=args.seed, data=args.data, timeout_s=args.timeout, config=cfg,
                           tls=not args.insecure, stage_timeout_s=args.stage_timeout)

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
    print(f"wrote {args.out}/report.json, global_model.pt, curves.png, sample.png")
    return 0
