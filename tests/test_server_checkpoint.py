"""The coordinator's checkpoints: a restarted ServerApp resumes from the last finished round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmri.common.config import RunConfig
from fedmri.common.models import load_model
from fedmri.server.federation import MODEL_FILE, STATE_FILE, Federation, FederationSettings

CFG = RunConfig(size=16, rounds=3)


def _federation(out: Path, cfg: RunConfig = CFG) -> tuple[Federation, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    # No messages are sent here: only construction (resume) and checkpointing are exercised.
    fed = Federation(grid=None, cfg=cfg, settings=FederationSettings(out_dir=out),  # type: ignore[arg-type]
                     emit=events.append)
    return fed, events


def test_checkpoint_then_resume(tmp_path: Path) -> None:
    fed, _ = _federation(tmp_path)
    fed.global_state = {k: v + 1.0 if v.is_floating_point() else v
                        for k, v in fed.global_state.items()}
    fed.history.append({"round": 1, "hospitals": {}, "global_val_dice": None})
    fed._checkpoint()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["config"] == CFG.to_dict() and len(state["rounds"]) == 1
    model, cfg = load_model(tmp_path / MODEL_FILE)
    assert cfg == CFG

    resumed, events = _federation(tmp_path)
    assert events == [{"event": "resumed", "round": 1}]
    assert resumed.history == fed.history
    for key, value in fed.global_state.items():
        assert torch.equal(resumed.global_state[key], value)
        assert torch.equal(model.state_dict()[key], value)


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    fed, _ = _federation(tmp_path)
    fed.history.append({"round": 1, "hospitals": {}})
    fed._checkpoint()
    with pytest.raises(ValueError, match="another config"):
        _federation(tmp_path, RunConfig(size=24, rounds=3))
