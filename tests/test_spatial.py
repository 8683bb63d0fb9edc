"""Spatial tensor parallelism: split networks equal the single-process network (float64,
real gloo process groups of worker processes), and every refusal is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from torch import nn

from fedmri.client.spatial import ConversionError, SlabError, SpatialMesh, parallelize, plan_slabs
from fedmri.client.spatial.launch import TRANSPORT_ENV, MeshShape, WorkerFailure, run_ranks
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model

TESTS = str(Path(__file__).parent)
TOLERANCE = 1e-10
# Adam divides by sqrt(v) + eps: for gradient entries near eps it multiplies their rounding
# error by up to lr / eps = 1e5 (measured 1.5e-10 on the mixed network's parameters).
STEP_TOLERANCE = 1e-9
# Depths where the splits are uneven: the UNet and SegResNet (total stride 8) cut 40 planes
# into 5 blocks; BasicUNet (16) cuts 72 into 4 blocks of 16 and a remainder of 8 on the last.
CASES = [{"name": "unet", "depth": 40, "hw": 16}, {"name": "basicunet", "depth": 72, "hw": 16},
         {"name": "segresnet", "depth": 40, "hw": 16}]
# What a rank needs to import spatial_check (this folder on its PYTHONPATH).
CHECK_ENV = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
# spatial_check.mixed_network, channels-last: 12 planes cut in blocks of 2 (its pooling).
MIXED = {"name": "mixed", "depth": 12, "hw": 8, "channels_last": True}


def _run_check(tmp_path: Path, shape: MeshShape, batch: int, cases: list[dict[str, object]],
               **extra: object) -> list[dict[str, dict[str, float]]]:
    (tmp_path / "job.json").write_text(json.dumps({"batch": batch, "cases": cases, **extra}))
    run_ranks("spatial_check:run", tmp_path, shape, timeout_s=600, extra_env=CHECK_ENV)
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(shape.world)]


def _assert_equal_to_one_process(results: list[dict[str, dict[str, float]]]) -> None:
    for rank, per_net in enumerate(results):
        for net, errors in per_net.items():
            for what, err in errors.items():
                bound = STEP_TOLERANCE if what == "step" else TOLERANCE
                assert err <= bound, f"rank {rank} {net}: {what} differs by {err:.2e}"


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_networks_equal_one_process(tmp_path: Path, parts: int) -> None:
    results = _run_check(tmp_path, MeshShape(tp=parts), batch=1, cases=[*CASES, MIXED])
    _assert_equal_to_one_process(results)
    assert all(set(r) == {"unet", "basicunet", "segresnet", "mixed"} for r in results)


def test_dp_by_tp_mesh_equals_one_process(tmp_path: Path) -> None:
    # Batch 3 over 2 data-parallel replicas: 2 samples on one, 1 on the other.
    results = _run_check(tmp_path, MeshShape(dp=2, tp=2), batch=3, cases=CASES[::2])
    _assert_equal_to_one_process(results)


def test_a_dead_rank_stops_the_others_and_is_named(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WorkerFailure, match="rank 1 died"):
        _run_check(tmp_path, MeshShape(tp=3), batch=1, cases=CASES[:1], die_rank=1)
    assert time.perf_counter() - start < 120


def _two_rank_results(target: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Run spatial_check.<target> on 2 tp ranks; what each rank wrote."""
    run_ranks(f"spatial_check:{target}", tmp_path, MeshShape(tp=2), timeout_s=300,
              extra_env=CHECK_ENV)
    return [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(2)]


def test_layers_reading_one_tensor_share_its_halo_exchange(tmp_path: Path) -> None:
    for result in _two_rank_results("halo_sharing", tmp_path):
        # The UNet's 10 convolutions, transposed convolutions and 3 strided shortcuts that
        # look across depth: 13 readers, 10 exchanges forward (the shortcuts share theirs);
        # the same without gradients and in inference mode.
        assert result["counts"] == {"grad": 10, "no_grad": 10, "inference": 10}
        assert not result["held_after_forward"]
        assert result["grad_reached_second_reader"]


def test_second_derivatives_are_refused_and_cpu_autocast_runs(tmp_path: Path) -> None:
    for result in _two_rank_results("second_order_and_cpu_autocast", tmp_path):
        for layer, message in result["refused"].items():
            assert "once_differentiable" in message, f"{layer}: second derivative not refused"
        # bfloat16 rounds both sides (about 3 significant digits), in different orders
        assert result["dtype"] == "torch.bfloat16"
        assert result["error"] < 0.05


def test_split_norms_take_channels_last_slabs_and_strided_views(tmp_path: Path) -> None:
    for rank, errors in enumerate(_two_rank_results("norms_on_strided_slabs", tmp_path)):
        assert len(errors) == 9
        for case, err in errors.items():
            assert err <= TOLERANCE, f"rank {rank} {case}: differs by {err:.2e}"


def test_a_depth_the_strides_cannot_split_names_the_layer() -> None:
    model = build_model(RunConfig(model="basicunet"))
    with pytest.raises(SlabError, match=r"cannot split depth 48 over 4 ranks: layer "
                       r"'down_4.max_pooling' has stride 2 at depth 6 of 48.*multiples of 16"):
        plan_slabs(model, 48, 4)
    assert plan_slabs(model, 48, 3) == [(0, 16), (16, 32), (32, 48)]
    assert plan_slabs(build_model(RunConfig(model="unet")), 40, 3) == [(0, 16), (16, 32),
                                                                       (32, 40)]


def test_a_module_that_cannot_be_split_is_named_and_nothing_is_converted() -> None:
    class Pooled(nn.Module):  # a custom forward: it might look across depth
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=2, keepdim=True).expand_as(x)

    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), Pooled(),
                          nn.Conv3d(4, 4, 5, padding=2), nn.Linear(4, 4))
    with pytest.raises(ConversionError) as err:
        parallelize(model, SpatialMesh())
    text = str(err.value)
    assert "'1' (test_spatial." in text and "Pooled" in text
    assert "'2' (torch.nn.modules.conv.Conv3d): kernel (5, 5, 5)" in text
    assert "'3' (torch.nn.modules.linear.Linear)" in text
    assert type(model[0]) is nn.Conv3d  # nothing changed


@pytest.mark.parametrize(("module", "why"), [
    (nn.Dropout(0.2), "dropout p=0.2: masks drawn per slab"),
    (nn.MaxPool3d(2, return_indices=True), "return_indices=True"),
    (nn.ConvTranspose3d(1, 1, 3, stride=2, padding=1), "not exactly 2 x the input's"),
    (nn.Upsample(size=(8, 8, 8)), "fixed size"),
])
def test_layers_that_a_split_would_compute_wrongly_are_refused(module: nn.Module,
                                                               why: str) -> None:
    with pytest.raises(ConversionError, match=why):
        parallelize(nn.Sequential(module), SpatialMesh())


def test_batch_norm_without_running_statistics_is_refused_on_a_data_parallel_mesh() -> None:
    model = nn.Sequential(nn.BatchNorm3d(2, track_running_stats=False))
    with pytest.raises(ConversionError, match="without running statistics on a data-parallel"):
        parallelize(model, SpatialMesh(dp_rank=0, dp_size=2))
    parallelize(model, SpatialMesh(tp_rank=0, tp_size=2))  # tp only: every rank, same samples


def test_plan_checks_the_halos_of_thin_slabs_and_traces_batch_norm() -> None:
    wide = nn.Sequential(nn.ConvTranspose3d(1, 1, 5, padding=2))
    with pytest.raises(SlabError, match="layer '0' needs 2 halo planes .* has only 1"):
        plan_slabs(wide, 4, 3)
    assert plan_slabs(wide, 6, 3) == [(0, 2), (2, 4), (4, 6)]
    bn = nn.Sequential(nn.Conv3d(1, 2, 3, stride=2, padding=1), nn.BatchNorm3d(2, momentum=None))
    assert plan_slabs(bn, 8, 2) == [(0, 4), (4, 8)]


def test_a_job_folder_can_be_run_again(tmp_path: Path) -> None:
    for _ in range(2):  # the first run's file store must not break the second rendezvous
        run_ranks("spatial_check:noop", tmp_path, MeshShape(tp=2), timeout_s=120,
                  extra_env=CHECK_ENV)


def test_ranks_stop_when_their_launcher_is_killed(tmp_path: Path) -> None:
    env = {**os.environ, **CHECK_ENV}
    code = ("import sys; from pathlib import Path; from fedmri.client.spatial.launch import "
            "MeshShape, run_ranks; run_ranks('spatial_check:sleep', Path(sys.argv[1]), "
            "MeshShape(tp=2))")
    launcher = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(tmp_path.glob("rank*.ready"))) < 2:
        time.sleep(0.2)
    ranks = psutil.Process(launcher.pid).children()
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive, "ranks outlived their launcher"
    # Its shared-memory folder outlives it; the next launcher on this host removes it.
    from fedmri.client.spatial.launch import SHM_ROOT, _remove_orphans

    orphans = list(SHM_ROOT.glob(f"fedmri-tp-{launcher.pid}-*"))
    assert len(orphans) == 1
    _remove_orphans()
    assert not orphans[0].exists()


def test_a_misaligned_slab_is_refused_by_the_strided_layer() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 3, stride=2, padding=1))
    parallelize(model, SpatialMesh(tp_rank=0, tp_size=2))  # no peers needed to refuse
    with pytest.raises(SlabError, match="layer '0' .*stride 2.* slab of 7 planes"):
        model(torch.zeros(1, 1, 7, 4, 4))


def test_split_network_equals_one_process_over_gloo(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The default carries halos and sums through shared memory; gloo remains the fallback.
    monkeypatch.setenv(TRANSPORT_ENV, "gloo")
    _assert_equal_to_one_process(_run_check(tmp_path, MeshShape(tp=2), batch=1, cases=CASES[:1]))
