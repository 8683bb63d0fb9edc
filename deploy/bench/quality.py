"""`fedmri bench quality`: FedAvg against its baselines on one cohort, in one run.

Runs `fedmri simulate` (real Flower processes), then `fedmri train --central` (pooled data,
the upper bound) and `fedmri train --local H` for every hospital, all with the same model,
splits, seed and total epochs (rounds x local epochs), and prints JSON with the test-site Dice
of each, the ratio FedAvg / central, and the time split of a federated round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedmri.common.config import (
    FEDERATION_ONLY,
    RunConfig,
    add_run_config_args,
    run_config_from_args,
    run_config_to_args,
)
from fedmri.common.layout import hospital_dirs
from fedmri.deploy.bench.measure import mean
from fedmri.deploy.simulate import SimulateOptions, run_simulation
from fedmri.proto import files


def _baseline(args: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedmri.common.cli", "train", *args, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    report = json.loads((out / files.REPORT).read_text())
    return {"test_dice": report["test_dice"], "seconds": time.perf_counter() - started,
            "final_val_dice": report["rounds"][-1]["global_val_dice"]}


def _mean(rounds: list[dict[str, Any]], key: str) -> float:
    return mean([float(r[key]) for r in rounds])


def run_bench(out: Path, hospitals: int, subjects: int, seed: int, cfg: RunConfig,
              data: Path | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    opts = SimulateOptions(out=out / "fedavg", hospitals=hospitals, subjects=subjects, seed=seed,
                           data=data or out / "data", config=cfg)
    report = run_simulation(opts, on_event=lambda e: None)
    data_dir = Path(report["config"]["data"])
    rounds = report["rounds"]
    fedavg = {
        "test_dice": report["test_dice"],
        "seconds": report["seconds"]["federation"],
        "seconds_per_round": _mean(rounds, "seconds"),
        "train_seconds_per_round": _mean(rounds, "train_seconds"),
        "comm_seconds_per_round": _mean(rounds, "comm_seconds"),
        "aggregate_seconds_per_round": _mean(rounds, "aggregate_seconds"),
        "bytes_up_per_round": _mean(rounds, "bytes_up"),
        "final_val_dice": rounds[-1]["global_val_dice"],
    }
    common = ["--data", str(data_dir), "--hospitals", str(hospitals),
              *run_config_to_args(cfg, skip=FEDERATION_ONLY)]
    central = _baseline(["--central", *common], out / "central")
    local = {site.name: _baseline(["--local", site.name, *common], out / f"local-{site.name}")
             for site in hospital_dirs(data_dir)[:hospitals]}
    best_local = max(v["test_dice"] for v in local.values())
    return {
        "config": {**cfg.to_dict(), "hospitals": hospitals, "subjects": subjects,
                   "cohort_seed": seed, "data": str(data_dir)},
        "fedavg": fedavg,
        "central": central,
        "local": local,
        "fedavg_over_central": fedavg["test_dice"] / central["test_dice"],
        "fedavg_minus_best_local": fedavg["test_dice"] - best_local,
        "goals": {"fedavg_ge_0.95_central": fedavg["test_dice"] >= 0.95 * central["test_dice"],
                  "fedavg_above_every_local": fedavg["test_dice"] > best_local},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmri bench quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--data", type=Path, default=None, help="an existing cohort")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    add_run_config_args(parser)  # --seed seeds the cohort too
    args = parser.parse_args(argv)
    try:
        cfg = run_config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    result = run_bench(args.out, args.hospitals, args.subjects, cfg.seed, cfg, args.data)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
