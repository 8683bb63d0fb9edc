"""A hospital training on a mesh of local worker processes gets the model one process gets;
a rank that dies is named, the others stop, and nothing is left behind."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from spatial_check import assert_same_model

from fedmri.client.hospital_data import load_hospital
from fedmri.client.spatial.hospital import MeshOutcome, run_on_mesh
from fedmri.client.spatial.launch import MeshShape, WorkerFailure
from fedmri.client.trainer import evaluate, train_local
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model

CFG = RunConfig(model="unet", size=32, local_epochs=2, batch_size=2)
# float32 training: the ranks sum in another order than one process (and a data-parallel
# replica convolves a batch of 1 where one process convolves 2), and Adam magnifies the
# last-bit differences of small gradients. One process alone, batch of 2 against the same
# batch as two halves of 1 (equal in exact arithmetic), differs by up to 9e-3 after these
# 2 steps; tp=2 by 1e-5, dp=2 x tp=2 by 7e-3 (largest relative difference of a parameter
# tensor). float64 is exact to 1e-10 (test_spatial.py). docs/spatial-parallelism.md.
FLOAT32_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmri.deploy.cohort import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, hospitals=1, subjects=3, seed=5)
    return out / "hospital-1"


@pytest.mark.parametrize("shape", [MeshShape(tp=2), MeshShape(dp=2, tp=2)],
                         ids=["tp2", "dp2xtp2"])
def test_training_on_a_mesh_gives_the_single_process_model(hospital: Path,
                                                           shape: MeshShape) -> None:
    model = build_model(CFG)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_hospital(hospital, CFG)
    before = evaluate(model, data.val, CFG)
    single = train_local(model, data.train, CFG, CFG.local_epochs, seed=11)
    outcome: MeshOutcome = run_on_mesh(shape, data, CFG, weights, seed=11,
                                       epochs=CFG.local_epochs, evaluate_first=True, threads=1)
    assert outcome.train is not None and outcome.val is not None
    assert outcome.train.steps == single.steps
    assert outcome.train.loss == pytest.approx(single.loss, rel=1e-4)
    assert outcome.val.dice == pytest.approx(before.dice, abs=1e-4)
    assert outcome.val.loss == pytest.approx(before.loss, rel=1e-5)
    assert outcome.setup_seconds > 0
    assert_same_model(outcome.state_dict, model, CFG,
                      torch.from_numpy(data.val[0].image[None]), FLOAT32_TOLERANCE)


def _mesh_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("fedmri-mesh-*"))


def _is_rank(proc: psutil.Process) -> bool:
    """A worker rank (other tests' children may linger here as zombies)."""
    try:
        return "fedmri.client.spatial.worker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def test_a_rank_killed_mid_training_is_named_and_nothing_hangs(hospital: Path) -> None:
    before = _mesh_dirs()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            run_on_mesh(MeshShape(tp=3), load_hospital(hospital, CFG, slab=(0, 0)), CFG,
                        build_model(CFG).state_dict(), seed=1, epochs=500,
                        evaluate_first=False, threads=1)
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=train)
    worker.start()
    me = psutil.Process()
    deadline = time.monotonic() + 120
    ranks: list[psutil.Process] = []
    while time.monotonic() < deadline and len(ranks) < 3:
        ranks = [p for p in me.children() if _is_rank(p)]
        time.sleep(0.2)
    assert len(ranks) == 3
    time.sleep(8)  # well into training (imports, group, data, first steps)
    assert worker.is_alive()
    rank1 = next(p for p in ranks if p.cmdline()[-6] == "1")
    killed = time.monotonic()
    rank1.kill()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the hospital hung after a rank died"
    assert time.monotonic() - killed < 30
    assert len(errors) == 1 and isinstance(errors[0], WorkerFailure)
    assert "rank 1" in str(errors[0])
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    assert _mesh_dirs() == before  # the job folder (weights) is gone


def test_job_folders_of_killed_hospital_processes_are_removed_at_the_next_job() -> None:
    from fedmri.client.spatial.hospital import JOB_PREFIX, _remove_orphaned_jobs

    dead = psutil.Popen(["true"])
    dead.wait()
    orphan = Path(tempfile.mkdtemp(prefix=f"{JOB_PREFIX}{dead.pid}-"))
    mine = Path(tempfile.mkdtemp(prefix=f"{JOB_PREFIX}{psutil.Process().pid}-"))
    try:
        _remove_orphaned_jobs()
        assert not orphan.exists() and mine.exists()
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(orphan, ignore_errors=True)


def test_a_rank_error_is_short_and_says_where() -> None:
    from fedmri.client.spatial.worker import MAX_ERROR_CHARS, _describe

    try:
        raise ValueError("x" * 1_000_000)
    except ValueError as err:
        text = _describe(err)
    assert len(text) < MAX_ERROR_CHARS + 500
    assert "(1000012 characters)" in text and "test_spatial_hospital.py" in text
