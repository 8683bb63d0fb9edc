"""`fedmri bench tp [--json]`: one training step of the trainer's network on one process
(P = 1, the baseline) against the same step split in depth over P = 2 worker processes, one
thread per rank, in one run: step time, peak memory per rank, halo bytes against the cost
model, and what starting the ranks and their process group costs; and the ceiling, 2 ranks
side by side each training its own half volume alone (no halos, no sums). Then, on paper
from the cost model and the kernels' measured GPU speeds, 8 GPUs of one NVLink node at 256^3
and the largest volume each P can train in 80 GB."""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmri.client.spatial.launch import MeshShape, run_ranks
from fedmri.client.spatial.mesh import SpatialMesh
from fedmri.client.spatial.plan import LayerInput, layer_inputs
from fedmri.common.config import RunConfig
from fedmri.common.models import build_model

TARGET = "fedmri.deploy.bench.tp:rank_step"
BYTES = 4  # float32 activations on the CPU
# Assumptions of the paper estimate (docs/spatial-parallelism.md):
NVLINK_BYTES_S = 450e9  # H100/H200 NVLink 4, per GPU and direction
HBM_BYTES_S = 3.35e12  # H100 SXM memory bandwidth (the H200 has 4.8e12)
MESSAGE_S = 20e-6  # one NCCL point-to-point exchange, latency
# bf16 TFLOP/s of our CUDA kernels on an H200 (docs/kernels.md, measured at 400b4e2):
# forward, input gradient, weight gradient; 32->32 channels at 128^3, and the 1->32 layer.
GPU_TFLOPS = {"forward": 135.1, "input_grad": 133.6, "weight_grad": 40.8}
GPU_TFLOPS_FIRST = {"forward": 10.0, "input_grad": 1.9, "weight_grad": 3.3}
# Element-wise passes per convolution output in a step: norm and activation, forward
# (read + write each) and backward (twice that).
ELEMENTWISE_PASSES = 12
GPU_BYTES = 80e9 * 0.9  # an 80 GB GPU, 10% kept for the CUDA context and the allocator


# -- the cost model --------------------------------------------------------------------------
def _split_layers(model: nn.Module, size: int) -> list[LayerInput]:
    kinds = (nn.Conv3d, nn.ConvTranspose3d, nn.Upsample)
    return layer_inputs(model, (1, 1, size, size, size), lambda m: isinstance(m, kinds))


def halo_cost(model: nn.Module, size: int, parts: int, batch: int = 1,
              bytes_per: int = BYTES) -> dict[str, Any]:
    """Halo bytes of one training step, summed over ranks: every layer that looks across depth
    sends its (lo + hi) planes across each of the P - 1 slab boundaries, once forward and once
    backward (the halo gradients go back); layers that read the same tensor with the same
    halo (a residual unit's convolution and its strided shortcut) share one exchange. Per
    layer, the share of a slab that travels is (lo + hi) / slab depth: surface over volume,
    growing with P and with depth downsampling."""
    from fedmri.client.spatial.layers import halo_planes

    layers, total, messages = [], 0, 0
    last: tuple[int, int, int] | None = None  # (tensor read, lo, hi) of the last exchange
    for index, call in enumerate(_split_layers(model, size)):
        lo, hi = halo_planes(call.module)
        if lo + hi == 0:
            continue
        read = index if call.same_input_as is None else call.same_input_as
        if last == (read, lo, hi):  # comm.halo_exchange reuses the exchange it just made
            continue
        last = (read, lo, hi)
        _, c, d, h, w = call.shape
        # Forward, and backward unless the layer reads the network's input (no gradient).
        passes = 1 if call.network_input else 2
        per_boundary = passes * (lo + hi) * batch * c * h * w * bytes_per
        total += (parts - 1) * per_boundary
        messages += passes * (int(lo > 0) + int(hi > 0))  # an interior rank
        layers.append({"layer": call.name, "channels": c, "depth": d, "halo_planes": lo + hi,
                       "bytes": (parts - 1) * per_boundary,
                       "slab_share": (lo + hi) / max(d / parts, 1)})
    return {"bytes_per_step": total, "interior_rank_messages": messages, "layers": layers}


def gpu_step_seconds(model: nn.Module, size: int, bytes_per: int = 2) -> float:
    """One training step of `model` at size^3 on one GPU, on paper: per convolution the
    slower of its FLOPs at our kernels' measured speed and its activation traffic at HBM
    bandwidth (forward, input and weight gradient), plus the element-wise passes."""
    total = 0.0
    for call in _split_layers(model, size):
        module, shape = call.module, call.shape
        if not isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            continue
        c_in, c_out, stride = module.in_channels, module.out_channels, module.stride[0]
        voxels = math.prod(shape[2:])
        out = voxels / stride ** 3 if isinstance(module, nn.Conv3d) else voxels * stride ** 3
        flops = 2.0 * c_in * c_out * math.prod(module.kernel_size) * (
            out if isinstance(module, nn.Conv3d) else voxels)
        rates = GPU_TFLOPS_FIRST if c_in < 8 else GPU_TFLOPS
        traffic = (c_in * voxels + c_out * out) * bytes_per
        for rate in rates.values():
            total += max(flops / (rate * 1e12), traffic / HBM_BYTES_S)
        total += ELEMENTWISE_PASSES * c_out * out * bytes_per / HBM_BYTES_S
    return total


def on_paper(model: nn.Module, activation_bytes_per_voxel: float,
             process_bytes_per_voxel: float) -> dict[str, Any]:
    """8 GPUs of one NVLink node at 256^3 and the largest volume per P in 80 GB."""
    size, parts = 256, 8
    cost = halo_cost(model, size, parts, bytes_per=2)  # bf16 activations on GPUs
    # An interior rank sends one boundary's worth (hi planes down, lo planes up) and receives
    # as much at the same time (NVLink is full duplex).
    rank_bytes = cost["bytes_per_step"] / (parts - 1)
    halo_s = rank_bytes / NVLINK_BYTES_S + cost["interior_rank_messages"] * MESSAGE_S
    compute_s = gpu_step_seconds(model, size) / parts
    largest: dict[str, dict[str, int]] = {}
    for name, per_voxel in (("activations", activation_bytes_per_voxel),
                            ("process_peak", process_bytes_per_voxel)):
        # float32 bytes per voxel as measured on the CPU (bf16 autocast would halve most).
        largest[name] = {f"p{p}": int((GPU_BYTES * p / per_voxel) ** (1 / 3) // 16 * 16)
                         for p in (1, 2, 4, 8)}
    return {"volume": f"{size}^3", "gpus": parts, "halo_bytes_per_rank": rank_bytes,
            "halo_seconds": halo_s, "compute_seconds": compute_s,
            "halo_share": halo_s / (halo_s + compute_s),
            "largest_edge_in_80gb_fp32": largest}


# -- one rank ---------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2 ** 20


def rank_step(mesh: SpatialMesh, job_dir: Path) -> None:
    """Time training steps of the split network on this rank; write what it measured: the
    median step, the activations (tensors autograd saves for backward, counted once per
    storage, parameters left out) and the growth of the process's peak resident memory
    over the steps (activations, gradients, kernel workspaces, allocator slack)."""
    from fedmri.client.spatial import comm, parallelize, plan_slabs
    from fedmri.client.spatial.comm import HaloTraffic
    from fedmri.client.spatial.training import SlabObjective

    job = json.loads((job_dir / "job.json").read_text())
    size, steps = job["size"], job["steps"]
    cfg = RunConfig(model=job["model"], size=size)
    model = build_model(cfg)
    rank = mesh.dp_rank * mesh.tp_size + mesh.tp_rank
    if job["alone"]:
        # The ceiling: ranks side by side, each training the unsplit network on its own
        # slab as if it were a whole volume; no halos, no sums, only the machine shared.
        start, stop = plan_slabs(model, size, mesh.world_size)[rank]
        mesh = SpatialMesh()
    else:
        start, stop = plan_slabs(model, size, mesh.tp_size)[mesh.tp_rank]
    parallelize(model, mesh)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, size, size, size, generator=gen)[:, :, start:stop].contiguous()
    y = torch.randint(0, cfg.num_classes, (1, 1, size, size, size), generator=gen)
    y = y[:, :, start:stop].contiguous()
    voxels = x[0, 0].numel() if job["alone"] else size ** 3
    objective = SlabObjective(mesh, cfg.num_classes, voxels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(count_saved: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        if count_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = objective(model, x, y)
        else:
            loss = objective(model, x, y)
        loss.backward()
        objective.reduce_gradients(model)
        opt.step()

    base_mb = _rss_mb()
    step(count_saved=True)  # warm-up; counts the tensors saved for backward once
    HaloTraffic.bytes_sent = 0
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb
    # Activations peak at the end of the forward pass: what autograd saved for backward.
    (job_dir / f"rank{rank}.json").write_text(json.dumps({
        "step_seconds": sorted(times)[len(times) // 2],
        "peak_mb": sum(saved.values()) / 2 ** 20, "rss_peak_mb": rss_mb,
        "halo_bytes_per_step": HaloTraffic.bytes_sent / steps, "slab": [start, stop],
        "transport": "shm" if comm.shared_memory() else "gloo"}))


# -- the harness -----------------------------------------------------------------------------
def measure(model: str, size: int, parts: int, steps: int, alone: bool = False
            ) -> dict[str, Any]:
    """One run of `parts` ranks splitting the volume (or, `alone`, each training its own
    slab without exchanges: the ceiling of the split)."""
    job_dir = Path(tempfile.mkdtemp(prefix="fedmri-bench-tp-"))
    try:
        (job_dir / "job.json").write_text(json.dumps({"model": model, "size": size,
                                                      "steps": steps, "alone": alone}))
        shape = MeshShape(dp=parts) if alone else MeshShape(tp=parts)
        setup_s = run_ranks(TARGET, job_dir, shape, threads=1)
        ranks = [json.loads((job_dir / f"rank{r}.json").read_text()) for r in range(parts)]
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    return {"step_seconds": max(r["step_seconds"] for r in ranks),
            "peak_mb": max(r["peak_mb"] for r in ranks),
            "rss_peak_mb": max(r["rss_peak_mb"] for r in ranks),
            "halo_bytes_per_step": sum(r["halo_bytes_per_step"] for r in ranks),
            "setup_seconds": setup_s, "slabs": [r["slab"] for r in ranks],
            "transport": ranks[0]["transport"]}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median step time (its own memory and set-up figures with it)."""
    return sorted(runs, key=lambda run: run["step_seconds"])[len(runs) // 2]


def compare(model: str, size: int, steps: int, repeats: int) -> dict[str, Any]:
    # P = 1 and P = 2 alternate, so that a slow spell of the machine hits both alike.
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    alone: list[dict[str, Any]] = []
    for _ in range(repeats):
        for parts in (1, 2):
            runs[parts].append(measure(model, size, parts, steps))
        alone.append(measure(model, size, 2, steps, alone=True))
    p1, p2 = _median_run(runs[1]), _median_run(runs[2])

    def speedups(other: list[dict[str, Any]]) -> list[float]:
        # Each run against the P = 1 run just before it: the machine's speed drifts.
        return sorted(a["step_seconds"] / b["step_seconds"] for a, b in zip(runs[1], other,
                                                                            strict=True))

    pairs, ceiling = speedups(runs[2]), speedups(alone)
    cost = halo_cost(build_model(RunConfig(model=model, size=size)), size, 2)
    return {"size": size, "p1": p1, "p2": p2, "repeats": repeats,
            "step_seconds_all": {f"p{p}": [r["step_seconds"] for r in runs[p]] for p in runs},
            "speedup_pairs": pairs,
            "speedup": pairs[len(pairs) // 2],
            # Two half-volume processes side by side, no exchanges: what this machine allows.
            "ceiling": {"step_seconds": _median_run(alone)["step_seconds"],
                        "speedup": ceiling[len(ceiling) // 2]},
            "transport": p2["transport"],
            "memory_ratio": p2["peak_mb"] / p1["peak_mb"],
            "rss_ratio": p2["rss_peak_mb"] / p1["rss_peak_mb"],
            "halo_bytes_per_step": p2["halo_bytes_per_step"],
            "halo_bytes_model": cost["bytes_per_step"],
            "setup_seconds": p2["setup_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmri bench tp", description=__doc__)
    parser.add_argument("--model", default=RunConfig().model, help="network (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 160],
                        help="volume edges; the first is the headline (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating P=1 / P=2 runs; the median run is reported")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    runs = []
    for size in args.sizes:
        run = compare(args.model, size, args.steps, args.repeats)
        runs.append(run)
        print(f"bench tp {args.model} {size}^3: step P=1 {run['p1']['step_seconds']:.2f} s, "
              f"P=2 {run['p2']['step_seconds']:.2f} s (x{run['speedup']:.2f}); activations per "
              f"rank {run['p1']['peak_mb']:.0f} -> {run['p2']['peak_mb']:.0f} MB "
              f"(x{run['memory_ratio']:.2f}, process peak x{run['rss_ratio']:.2f}); halo "
              f"{run['halo_bytes_per_step'] / 1e6:.1f} MB "
              f"(model {run['halo_bytes_model'] / 1e6:.1f}); set-up "
              f"{run['setup_seconds']:.1f} s; ceiling (2 halves alone) "
              f"x{run['ceiling']['speedup']:.2f}", file=sys.stderr, flush=True)
    head = runs[0]
    network = build_model(RunConfig(model=args.model, size=head["size"]))
    voxels = head["size"] ** 3
    per_voxel = (head["p1"]["peak_mb"] * 2 ** 20 / voxels,
                 head["p1"]["rss_peak_mb"] * 2 ** 20 / voxels)
    report = {**{k: head[k] for k in ("p1", "p2", "speedup", "memory_ratio",
                                      "halo_bytes_per_step", "setup_seconds", "ceiling",
                                      "transport")},
              "model": args.model, "size": head["size"], "threads_per_rank": 1,
              "halo_bytes_model": head["halo_bytes_model"], "sizes": runs,
              "on_paper": on_paper(network, *per_voxel), "torch": torch.__version__}
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
