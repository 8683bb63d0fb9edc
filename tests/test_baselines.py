"""Central and local-only baselines, and `fedmri evaluate`, on a small synthetic cohort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmri.client.hospital_data import load_hospital
from fedmri.client.train_cli import evaluate_main, run_baseline, score_site
from fedmri.client.train_cli import main as train_main
from fedmri.common.checkpoint import save_model
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model
from fedmri.deploy.cohort import generate_cohort

CFG = RunConfig(size=16, rounds=2, local_epochs=1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("baseline") / "data"
    generate_cohort(data, hospitals=2, subjects=2, seed=3)
    return data


def untrained_dice(cohort: Path, folder: Path) -> float:
    """The test-site Dice of the network before any training: what training must beat."""
    save_model(folder / "untrained.pt", build_model(CFG).state_dict(), CFG.to_dict())
    return float(score_site(folder / "untrained.pt", cohort / "test-site", None)["dice"])


def test_central_baseline_report_has_the_simulate_shape(cohort: Path, tmp_path: Path) -> None:
    report = run_baseline(cohort, tmp_path, CFG, hospitals=2, local=None)
    assert report["config"]["mode"] == "central"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for rnd in report["rounds"]:
        assert set(rnd["hospitals"]) == {"hospital-1", "hospital-2"}
    # Training learns: validation Dice rises and the test site beats the untrained network
    # (0.23 against 0.12 with this seed).
    first, second = (r["global_val_dice"] for r in report["rounds"])
    assert 0.0 < first < second <= 1.0
    assert untrained_dice(cohort, tmp_path) + 0.05 < report["test_dice"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "global_model.pt").exists() and (tmp_path / "sample.png").exists()


def test_local_baseline_trains_on_one_site_only(cohort: Path, tmp_path: Path) -> None:
    report = run_baseline(cohort, tmp_path, CFG, hospitals=2, local="hospital-2")
    assert report["config"]["mode"] == "local:hospital-2"
    hospitals = report["rounds"][0]["hospitals"]
    assert hospitals["hospital-1"]["train_loss"] is None
    assert hospitals["hospital-2"]["train_loss"] > 0


def test_bad_hospital_and_empty_folder_give_clear_errors(cohort: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    code = train_main(["--local", "hospital-9", "--data", str(cohort), "--out", str(tmp_path),
                       "--size", "16", "--rounds", "1"])
    assert code == 1
    assert "hospital 'hospital-9' not in ['hospital-1', 'hospital-2']" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable labelled MR series under .*empty"):
        load_hospital(tmp_path / "empty", CFG)


def test_evaluate_command_prints_json(cohort: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_baseline(cohort, tmp_path, CFG, hospitals=2, local=None)
    capsys.readouterr()
    code = evaluate_main(["--model", str(tmp_path / "global_model.pt"), "--data",
                          str(cohort / "test-site"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    expected = score_site(tmp_path / "global_model.pt", cohort / "test-site", None)
    assert result["cases"] == 2 and result["dice"] == expected["dice"]
    assert result["dice"] > untrained_dice(cohort, tmp_path) + 0.05
    assert len(result["per_class"]) == 2
