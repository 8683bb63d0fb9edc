"""The coordinator's checkpoints: a restarted ServerApp resumes from the last finished round."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmri.common.config import RunConfig
from fedmri.common.models import load_model
from fedmri.proto.events import Event, Resumed
from fedmri.proto.files import GLOBAL_MODEL as MODEL_FILE
from fedmri.proto.files import SERVER_STATE as STATE_FILE
from fedmri.proto.report import RoundRecord
from fedmri.proto.run_config import ServerSettings
from fedmri.server.federation import Federation

CFG = RunConfig(size=16, rounds=3, secure=False)


def _federation(out: Path, cfg: RunConfig = CFG) -> tuple[Federation, list[Event]]:
    events: list[Event] = []
    # No messages are sent here: only construction (resume) and checkpointing are exercised.
    fed = Federation(grid=None, cfg=cfg, settings=ServerSettings(out_dir=out),  # type: ignore[arg-type]
                     emit=events.append)
    return fed, events


def test_checkpoint_then_resume(tmp_path: Path) -> None:
    fed, _ = _federation(tmp_path)
    fed.global_state = {k: v + 1.0 if v.is_floating_point() else v
                        for k, v in fed.global_state.items()}
    fed.history.append(RoundRecord(round=1, seconds=2.0, train_seconds=1.0))
    fed._checkpoint()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["config"] == CFG.to_dict() and len(state["rounds"]) == 1
    model, cfg = load_model(tmp_path / MODEL_FILE)
    assert cfg == CFG

    resumed, events = _federation(tmp_path)
    assert events == [Resumed(1)]
    assert resumed.history == fed.history
    for key, value in fed.global_state.items():
        assert torch.equal(resumed.global_state[key], value)
        assert torch.equal(model.state_dict()[key], value)


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    fed, _ = _federation(tmp_path)
    fed.history.append(RoundRecord(round=1, seconds=2.0, train_seconds=1.0))
    fed._checkpoint()
    with pytest.raises(ValueError, match="another config"):
        _federation(tmp_path, RunConfig(size=24, rounds=3, secure=False))


def _full_disk(scenario: str, tmp_path: Path) -> dict[str, object]:
    """tests/full_disk_checkpoint.py on a 16 MiB tmpfs of its own (no root needed: a user
    namespace); skipped only where the kernel allows no user namespaces."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-rm", "true"], capture_output=True)
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    disk = tmp_path / "disk"
    disk.mkdir()
    here = Path(__file__).parent
    done = subprocess.run([unshare, "-rm", sys.executable, str(here / "full_disk_checkpoint.py"),
                           str(disk), scenario], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(here), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_disk_full_while_writing_the_model_keeps_the_last_good_checkpoint(
        tmp_path: Path) -> None:
    result = _full_disk("model", tmp_path)
    assert result["error"] == "No space left on device"
    # The restarted coordinator resumes after round 1, with round 1's weights; no temp file.
    assert (result["rounds"], result["weights_of_round"]) == (1, 1)
    assert result["files"] == [MODEL_FILE, STATE_FILE]


def test_a_disk_full_after_the_model_never_mixes_two_rounds(tmp_path: Path) -> None:
    result = _full_disk("state", tmp_path)
    assert result["error"] == "No space left on device"  # server_state.json could not follow
    # The model file carries its own round history: round 2's weights with round 2's record.
    assert (result["rounds"], result["weights_of_round"]) == (2, 2)
    assert result["files"] == [MODEL_FILE, STATE_FILE]
