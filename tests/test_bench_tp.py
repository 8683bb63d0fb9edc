"""`fedmri bench tp`: real worker ranks; the halo bytes they send match the cost model."""

from __future__ import annotations

import json
import subprocess
import sys

from fedmri.client.spatial.launch import SHM_ROOT
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model
from fedmri.deploy.bench.tp import halo_cost


def test_bench_tp_prints_the_comparison_and_its_halo_bytes_match_the_cost_model() -> None:
    done = subprocess.run([sys.executable, "-m", "fedmri.common.cli", "bench", "tp", "--sizes",
                           "32", "--steps", "1", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    for key in ("p1", "p2", "speedup", "memory_ratio", "halo_bytes_per_step", "setup_seconds"):
        assert key in report
    for p in ("p1", "p2"):
        assert report[p]["step_seconds"] > 0 and report[p]["peak_mb"] > 0
    assert report["p2"]["slabs"] == [[0, 16], [16, 32]]
    assert report["p1"]["halo_bytes_per_step"] == 0
    assert report["halo_bytes_per_step"] == report["halo_bytes_model"] > 0
    assert report["speedup"] == report["p1"]["step_seconds"] / report["p2"]["step_seconds"]
    ceiling = report["ceiling"]
    assert ceiling["speedup"] == report["p1"]["step_seconds"] / ceiling["step_seconds"]
    assert report["transport"] == ("shm" if SHM_ROOT.is_dir() else "gloo")
    assert report["sizes"][0]["speedup_pairs"] == [report["speedup"]]  # one repeat: one pair
    assert report["on_paper"]["gpus"] == 8 and 0 < report["on_paper"]["halo_share"] < 1


def test_halo_cost_grows_with_the_boundaries_and_skips_the_inputs_gradient() -> None:
    model = build_model(RunConfig(model="unet"))
    two, four = halo_cost(model, 64, 2), halo_cost(model, 64, 4)
    assert four["bytes_per_step"] == 3 * two["bytes_per_step"]
    first = two["layers"][0]
    assert first["channels"] == 1 and first["halo_planes"] == 1
    # The first layer reads the network's input: one plane of 64 x 64 float32, forward only.
    assert first["bytes"] == 64 * 64 * 4
    assert halo_cost(model, 64, 1)["bytes_per_step"] == 0
    # A strided residual unit's convolution reads the tensor its shortcut just exchanged.
    names = [layer["layer"] for layer in two["layers"]]
    assert "model.0.residual" in names and "model.0.conv.unit0.conv" not in names
