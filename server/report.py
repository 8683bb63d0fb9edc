"""What a finished run leaves for people: `fedmri run report RUN --out DIR`.

report.json (the run's config, every round's record, the test-site Dice when a held-back
site is given), the global model, the run's events, curves.png, and sample.png (a test-site
slice with the model's segmentation). The test site is scored by `fedmri evaluate`, the
hospital-side evaluator, run as its own process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedmri.common.checkpoint import save_json
from fedmri.proto import files


def write_report(run: Path, out: Path, test_data: Path | None) -> dict[str, Any]:
    """`run`: the run's folder (runs/NAME under the coordinator's home)."""
    from fedmri.server.runs import RUN_RECORD

    state_file = run / files.SERVER_STATE
    if not state_file.exists() or not (run / files.GLOBAL_MODEL).exists():
        raise FileNotFoundError(f"run {run.name} has no finished round yet (no "
                                f"{files.SERVER_STATE} / {files.GLOBAL_MODEL} in {run})")
    record = json.loads((run / RUN_RECORD).read_text())
    rounds = json.loads(state_file.read_text())["rounds"]
    out.mkdir(parents=True, exist_ok=True)
    for name in (files.GLOBAL_MODEL, files.EVENTS):  # the model and the run's full log
        shutil.copyfile(run / name, out / name)
    hospitals = sorted({h for r in rounds for h in r["hospitals"]})
    report: dict[str, Any] = {
        "run": record["run"], "run_id": record["run_id"],
        "config": {**record["config"], "mode": "fedavg", "hospitals": hospitals},
        "rounds": rounds}
    if test_data is not None:
        test = evaluate_on_test_site(out / files.GLOBAL_MODEL, test_data, out / files.SAMPLE)
        report.update(test_dice=test["dice"], test_dice_per_class=test["per_class"])
    save_json(out / files.REPORT, report)
    from fedmri.common.plots import plot_curves

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
