import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmri.client.dataset import Case
from fedmri.client.trainer import dice_per_class, evaluate, train_local
from fedmri.common.checkpoint import save_model
from fedmri.common.config import RunConfig
from fedmri.common.models import MODELS, build_model, load_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_built_by_name_are_identical_for_a_seed(name: str) -> None:
    cfg = RunConfig(model=name, size=32)
    a, b = build_model(cfg), build_model(cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    out = a(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, cfg.num_classes, 32, 32, 32)


def test_unknown_model_and_bad_config_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown model 'vnet'"):
        build_model(RunConfig(model="vnet"))
    with pytest.raises(ValueError, match="size"):
        RunConfig.from_dict({"size": 20})
    with pytest.raises(ValueError, match="'lr' must be float"):
        RunConfig.from_dict({"lr": "fast"})
    assert RunConfig.from_dict(RunConfig(size=32).to_dict()) == RunConfig(size=32)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = RunConfig(size=16)
    model = build_model(cfg, seed=3)
    save_model(tmp_path / "m.pt", model.state_dict(), cfg.to_dict())
    loaded, loaded_cfg = load_model(tmp_path / "m.pt")
    assert loaded_cfg == cfg
    for va, vb in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(va, vb)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(pickle.UnpicklingError):
        load_model(tmp_path / "bad.pt")


def _toy_cases(n: int, size: int) -> list[Case]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        label = np.zeros((size,) * 3, dtype=np.int64)
        c = size // 2 + rng.integers(-2, 3)
        label[c - 5:c + 5, c - 5:c + 5, c - 5:c + 5] = 2
        label[c - 2:c + 2, c - 2:c + 2, c - 2:c + 2] = 1
        image = (label * 0.4 + rng.normal(0, 0.05, label.shape)).astype(np.float32)[None]
        cases.append(Case(f"toy{i}", image, label))
    return cases


def test_one_local_training_step_lowers_loss_and_learns() -> None:
    cfg = RunConfig(size=16, lr=1e-2, batch_size=2)
    model = build_model(cfg)
    cases = _toy_cases(4, 16)
    before = evaluate(model, cases, cfg)
    first = train_local(model, cases, cfg, epochs=1, seed=0)
    assert first.steps == 2 and np.isfinite(first.loss)
    train_local(model, cases, cfg, epochs=25, seed=1)
    after = evaluate(model, cases, cfg)
    assert after.loss < before.loss
    assert after.dice > before.dice + 0.2


def test_dice_per_class() -> None:
    truth = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 2, 2, 2, 0])
    assert dice_per_class(pred, truth, 3) == pytest.approx([2 / 3, 4 / 6])
    assert dice_per_class(np.zeros(3), np.zeros(3), 2) == [1.0]


def test_root_help_does_not_import_torch() -> None:
    code = ("import sys; from fedmri.common.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("simulate", "data", "synth", "train", "evaluate"):
        assert name in done.stdout
