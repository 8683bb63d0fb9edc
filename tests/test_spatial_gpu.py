"""Spatial parallelism on GPUs: one rank per GPU, NCCL, our CUDA convolution (marked gpu).

NCCL refuses two ranks on one GPU, so a mesh of P ranks uses the GPUs only when there are
at least P of them (else every rank runs on the CPU with gloo, as tests/test_spatial.py
checks): these tests need 2 GPUs and are skipped on one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_spatial import CASES, _run_check

from fedmri.client.spatial.launch import MeshShape

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]
FLOAT32_TOLERANCE = 1e-3  # TF32 is off by default for convolutions in our op; sums reorder


def test_split_networks_on_two_gpus_equal_one_gpu(tmp_path: Path) -> None:
    results = _run_check(tmp_path, MeshShape(tp=2), batch=1, cases=CASES, dtype="float32")
    for rank, per_net in enumerate(results):
        for net, errors in per_net.items():
            for what, err in errors.items():
                assert err <= FLOAT32_TOLERANCE, f"rank {rank} {net}: {what} {err:.2e}"
