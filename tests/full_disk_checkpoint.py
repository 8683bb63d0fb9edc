"""Run by tests/test_server_checkpoint.py inside a private user and mount namespace
(`unshare -rm`): the coordinator checkpoints onto a small tmpfs that fills up.

argv: MOUNT_POINT SCENARIO, SCENARIO "model" (the disk fills while the global model is
written) or "state" (while server_state.json is written, after the model). Prints JSON: the
error, the rounds and weights a restarted coordinator resumes with, and the files left.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from test_server_checkpoint import CFG, _federation

from fedmri.proto.files import GLOBAL_MODEL
from fedmri.proto.report import RoundRecord

PAGE = 4096


def fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with ballast.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * PAGE)
        except OSError:
            pass
    return ballast


def main() -> None:
    disk, scenario = Path(sys.argv[1]), sys.argv[2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    out = disk / "run"
    fed, _ = _federation(out)
    fed.history.append(RoundRecord(round=1, seconds=1.0, train_seconds=1.0))
    fed._checkpoint()
    model_pages = -(-(out / GLOBAL_MODEL).stat().st_size // PAGE)
    if scenario == "model":  # room for half of the new model's temp file
        ballast = fill(disk)
        with ballast.open("r+b") as fh:
            fh.truncate(ballast.stat().st_size - (model_pages // 2) * PAGE)
    else:  # the disk fills up (someone else's file) between the model and the state file
        import fedmri.server.federation as federation

        save_json = federation.save_json

        def fill_then_save(*args: object) -> None:
            fill(disk)
            save_json(*args)  # type: ignore[arg-type]

        federation.save_json = fill_then_save  # type: ignore[assignment]
    fed.global_state = {k: v + 1.0 if v.is_floating_point() else v
                        for k, v in fed.global_state.items()}
    fed.history.append(RoundRecord(round=2, seconds=1.0, train_seconds=1.0))
    try:
        fed._checkpoint()
        error = None
    except OSError as err:
        error = err.strerror
    resumed, _ = _federation(out)
    second = all(torch.equal(resumed.global_state[k], v) for k, v in fed.global_state.items())
    print(json.dumps({"error": error, "rounds": len(resumed.history),
                      "weights_of_round": 2 if second else 1, "config": CFG.size,
                      "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    main()
