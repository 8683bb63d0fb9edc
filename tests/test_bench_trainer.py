"""The kernels bench's table of the trainer's layers, and `fedmri bench trainer`."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from fedmri.common.config import RunConfig
from fedmri.common.models import build_model
from fedmri.kernels.bench import trainer_layers, trainer_upsampling
from fedmri.kernels.layers import eligible


def test_kernel_bench_table_is_the_trainer_network() -> None:
    """kernels may not import the model, so its bench keeps a table: it must match."""
    size = 32
    model = build_model(RunConfig(conv_backend="aten"))
    seen: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []
    ups: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for module in model.modules():
        if eligible(module) and type(module) is torch.nn.Conv3d:
            module.register_forward_hook(lambda m, inp, out: seen.append(
                (tuple(inp[0].shape[1:]), tuple(m.weight.shape), m.stride[0])))
        elif eligible(module):
            module.register_forward_hook(lambda m, inp, out: ups.append(
                (tuple(inp[0].shape[1:]), tuple(m.weight.shape))))
    with torch.no_grad():
        model(torch.randn(1, 1, size, size, size))
    assert seen and trainer_layers(size) == seen
    assert ups and trainer_upsampling(size) == ups


def test_bench_trainer_prints_both_backends() -> None:
    done = subprocess.run([sys.executable, "-m", "fedmri.common.cli", "bench", "trainer",
                           "--size", "16", "--batches", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    step = json.loads(done.stdout)["batch 1"]
    assert step["aten_ms"] > 0 and step["fedmri_ms"] > 0
    assert step["speedup"] == step["aten_ms"] / step["fedmri_ms"]
