"""`fedmri bench trainer [--json]`: one training step of the trainer's network on ATen's 3D
convolutions against one on ours (fedmri.kernels), in one run, on the CPU: what a hospital's
CPU training runs. The per-layer comparison is `fedmri bench kernels`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from fedmri.common.config import RunConfig
from fedmri.common.models import build_model
from fedmri.kernels.bench import time_cpu_pair
from fedmri.kernels.ops import load


def train_step(cfg: RunConfig, batch: int) -> dict[str, float]:
    """Median milliseconds of one SGD step (forward, backward, update) per backend."""
    x = torch.randn(batch, 1, cfg.size, cfg.size, cfg.size)

    def stepper(backend: str) -> Callable[[], None]:
        model = build_model(replace(cfg, conv_backend=backend))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return step

    aten, ours = time_cpu_pair(stepper("aten"), stepper("fedmri"))
    return {"aten_ms": aten, "fedmri_ms": ours, "speedup": aten / ours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmri bench trainer", description=__doc__)
    parser.add_argument("--size", type=int, default=RunConfig().size,
                        help="volume edge in voxels (default: the trainer's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    load()
    torch.manual_seed(0)
    cfg = RunConfig(size=args.size)
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "size": cfg.size, "model": cfg.model}
    for batch in args.batches:
        step = train_step(cfg, batch)
        report[f"batch {batch}"] = step
        print(f"trainer step ({cfg.size}^3) batch {batch}: aten {step['aten_ms']:.0f} ms, "
              f"fedmri {step['fedmri_ms']:.0f} ms (x{step['speedup']:.2f})",
              file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
