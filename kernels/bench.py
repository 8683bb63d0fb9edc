"""`fedmri bench kernels [--json]`: our conv3d against the framework's, in one run.

GPU: forward, input-gradient and weight-gradient TFLOP/s of our kernels and of cuDNN
(through F.conv3d / aten.convolution_backward, cudnn.benchmark on), float16 and bfloat16,
contiguous and channels_last_3d inputs, on 3D U-Net layer shapes; the halo layer (32->32 over
a 64-plane slab + 1 halo plane each side, bias + ReLU) against concatenate + cuDNN + ReLU;
and the share of the device's measured bf16 matrix-product peak.
CPU: ATen's conv3d against ours on every 3D convolution of the trainer's network at 64^3
and 96^3, batch 1 and 2 (forward, and the two backward passes), and ATen's transposed
convolution against fedmri.kernels.conv_transpose3d on its upsampling layers (batch 1:
forward, and forward + backward). A whole training step of the
trainer's network is `fedmri bench trainer`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fedmri.kernels.ops import conv3d, load
from fedmri.kernels.transposed import conv_transpose3d

GPU_SHAPES = [(1, 32, 128), (32, 32, 128), (64, 64, 64), (128, 128, 32), (256, 256, 16)]
GPU_BATCH = 2
HALO_LAYER = (32, 64, 128)  # channels, slab planes, height = width

# Every 3D convolution the op computes in the trainer's network (MONAI UNet, channels 8-64,
# fedmri.common.models): (in channels, out channels, kernel, stride, input downsampling),
# its input being (in channels, size / downsampling ^ 3). tests/test_kernels_cpu.py checks the
# table against the network, so it cannot drift.
TRAINER_LAYERS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 8, 3, 2, 1), (1, 8, 3, 2, 1), (8, 16, 3, 2, 2), (8, 16, 3, 2, 2), (16, 32, 3, 2, 4),
    (16, 32, 3, 2, 4), (32, 64, 1, 1, 8), (32, 64, 3, 1, 8), (16, 16, 3, 1, 4), (8, 8, 3, 1, 2),
    (3, 3, 3, 1, 1))
# Its transposed convolutions (kernel 3, stride 2, padding 1, output padding 1): (in
# channels, out channels, input downsampling), checked against the network the same way.
TRAINER_UPSAMPLING: tuple[tuple[int, int, int], ...] = ((96, 16, 8), (32, 8, 4), (16, 3, 2))


def conv_flops(n: int, c: int, cout: int, out_voxels: int, k: int) -> float:
    return 2.0 * n * cout * out_voxels * c * k**3


def time_gpu(fn: Callable[[], object], groups: int = 7, inner: int = 5) -> float:
    """Median milliseconds per call: CUDA events around groups of back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / inner)
    return statistics.median(per_call)


def time_cpu_pair(a: Callable[[], object], b: Callable[[], object],
                  reps: int = 9) -> tuple[float, float]:
    """Median milliseconds of a and of b, called alternately so that both see the same
    allocator and cache state (fresh large allocations page-fault, and that state drifts)."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_gpu(lambda: a @ b, groups=5, inner=10)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def _aten_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int,
                   padding: list[int], mask: list[bool]) -> Any:
    return torch.ops.aten.convolution_backward(grad, x, w, [w.shape[0]], [stride] * 3, padding,
                                               [1] * 3, False, [0] * 3, 1, mask)


def gpu_layer(c: int, cout: int, size: int, dtype: torch.dtype,
              channels_last: bool) -> dict[str, Any]:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    dev = "cuda"
    x = torch.randn(GPU_BATCH, c, size, size, size, device=dev,
                    dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(cout, c, 3, 3, 3, device=dev, dtype=dtype) / (27 * c) ** 0.5)
    b = torch.randn(cout, device=dev, dtype=dtype)
    gy = torch.randn(GPU_BATCH, cout, size, size, size, device=dev,
                     dtype=dtype).contiguous(memory_format=fmt)
    flops = conv_flops(GPU_BATCH, c, cout, size**3, 3)
    ops = torch.ops.fedmri
    passes = {
        "forward": (lambda: F.conv3d(x, w, b, padding=1), lambda: conv3d(x, w, b)),
        "input_grad": (lambda: _aten_backward(gy, x, w, 1, [1] * 3, [True, False, False]),
                       lambda: ops.conv3d_backward_input(gy, x, w, None, None, 1)),
        "weight_grad": (lambda: _aten_backward(gy, x, w, 1, [1] * 3, [False, True, True]),
                        lambda: ops.conv3d_backward_weight(gy, x, w, None, None, 1)),
    }
    row: dict[str, Any] = {
        "shape": f"{c}->{cout} @{size}^3", "dtype": str(dtype).split(".")[-1],
        "layout": "channels_last_3d" if channels_last else "contiguous",
        "forward_rel_err": _rel_err(conv3d(x, w, b), F.conv3d(x, w, b, padding=1))}
    for name, (theirs, ours) in passes.items():
        t_cudnn, t_ours = time_gpu(theirs), time_gpu(ours)
        row[name] = {"cudnn_ms": t_cudnn, "ours_ms": t_ours,
                     "cudnn_tflops": flops / t_cudnn / 1e9, "ours_tflops": flops / t_ours / 1e9,
                     "ratio": t_cudnn / t_ours}
    return row


def gpu_halo_layer(dtype: torch.dtype, channels_last: bool) -> dict[str, Any]:
    c, depth, side = HALO_LAYER
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format

    def vol(planes: int) -> torch.Tensor:
        return torch.randn(GPU_BATCH, c, planes, side, side, device="cuda",
                           dtype=dtype).contiguous(memory_format=fmt)

    x, lo, hi = vol(depth), vol(1), vol(1)
    w = torch.randn(c, c, 3, 3, 3, device="cuda", dtype=dtype) / (27 * c) ** 0.5
    b = torch.randn(c, device="cuda", dtype=dtype)

    def concat_cudnn() -> torch.Tensor:
        return F.relu(F.conv3d(torch.cat([lo, x, hi], 2), w, b, padding=(0, 1, 1)), inplace=True)

    def ours() -> torch.Tensor:
        return conv3d(x, w, b, halo_lo=lo, halo_hi=hi, activation="relu")

    t_base, t_ours = time_gpu(concat_cudnn), time_gpu(ours)
    flops = conv_flops(GPU_BATCH, c, c, depth * side * side, 3)
    return {"shape": f"{c}->{c} @({depth}+2 halo)x{side}^2, bias+relu",
            "dtype": str(dtype).split(".")[-1],
            "layout": "channels_last_3d" if channels_last else "contiguous",
            "rel_err": _rel_err(ours(), concat_cudnn()),
            "concat_cudnn_ms": t_base, "ours_ms": t_ours, "ours_tflops": flops / t_ours / 1e9,
            "ratio": t_base / t_ours}


def run_gpu() -> dict[str, Any]:
    torch.backends.cudnn.benchmark = True
    peak = _matmul_peak_tflops()
    layers = []
    for dtype in (torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for c, cout, size in GPU_SHAPES:
                row = gpu_layer(c, cout, size, dtype, channels_last)
                fwd = row["forward"]
                fwd["ours_pct_of_bf16_peak"] = 100 * fwd["ours_tflops"] / peak
                layers.append(row)
                print(_gpu_line(row), file=sys.stderr, flush=True)
    halo = [gpu_halo_layer(dt, cl) for dt in (torch.float16, torch.bfloat16)
            for cl in (False, True)]
    fwd = [r["forward"]["ratio"] for r in layers]
    return {"device": torch.cuda.get_device_name(0), "bf16_matmul_peak_tflops": peak,
            "layers": layers, "halo_layer": halo,
            "goals": {"forward_min_ratio_vs_cudnn": min(fwd),
                      "forward_goal_met": min(fwd) >= 0.8,
                      "halo_min_ratio": min(h["ratio"] for h in halo),
                      "halo_goal_met": min(h["ratio"] for h in halo) >= 1.0}}


def _gpu_line(row: dict[str, Any]) -> str:
    parts = [f"{row['shape']:<18} {row['dtype']:<8} {row['layout']:<16}"]
    for name in ("forward", "input_grad", "weight_grad"):
        r = row[name]
        parts.append(f"{name} {r['ours_tflops']:6.1f}/{r['cudnn_tflops']:6.1f} TF "
                     f"x{r['ratio']:.2f}")
    return "  ".join(parts)


def trainer_layers(size: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """(input shape, weight shape, stride) of TRAINER_LAYERS on a size^3 volume."""
    return [((cin, *(size // down,) * 3), (cout, cin, k, k, k), stride)
            for cin, cout, k, stride, down in TRAINER_LAYERS]


def trainer_upsampling(size: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, weight shape) of TRAINER_UPSAMPLING on a size^3 volume."""
    return [((cin, *(size // down,) * 3), (cin, cout, 3, 3, 3))
            for cin, cout, down in TRAINER_UPSAMPLING]


def cpu_upsampling_layer(shape: tuple[int, ...], wshape: tuple[int, ...]) -> tuple[float, ...]:
    """Milliseconds of ATen's and of our forward, then of ATen's and our forward + backward."""
    x = torch.randn(1, *shape, requires_grad=True)
    w = torch.randn(*wshape, requires_grad=True)
    b = torch.randn(wshape[1], requires_grad=True)

    def aten() -> torch.Tensor:
        return F.conv_transpose3d(x, w, b, 2, 1, 1)

    def ours() -> torch.Tensor:
        return conv_transpose3d(x, w, b)

    gy = torch.randn_like(aten())
    with torch.no_grad():
        forward = time_cpu_pair(aten, ours)
    return (*forward, *time_cpu_pair(lambda: aten().backward(gy), lambda: ours().backward(gy)))


def cpu_upsampling(size: int) -> dict[str, Any]:
    """ATen's transposed convolution against ours on the trainer's upsampling layers."""
    keys = ("aten_forward_ms", "ours_forward_ms", "aten_step_ms", "ours_step_ms")
    rows = [cpu_upsampling_layer(shape, wshape) for shape, wshape in trainer_upsampling(size)]
    totals = {key: sum(row[i] for row in rows) for i, key in enumerate(keys)}
    return {**totals, "layers": len(rows),
            "forward_speedup": totals["aten_forward_ms"] / totals["ours_forward_ms"],
            "step_speedup": totals["aten_step_ms"] / totals["ours_step_ms"]}


def cpu_layer(shape: tuple[int, ...], wshape: tuple[int, ...], stride: int,
              batch: int) -> dict[str, float]:
    x = torch.randn(batch, *shape)
    w, b = torch.randn(*wshape), torch.randn(wshape[0])
    pad = [wshape[2] // 2] * 3
    gy = torch.randn_like(F.conv3d(x, w, b, stride=stride, padding=pad))
    ops = torch.ops.fedmri
    forward = time_cpu_pair(lambda: F.conv3d(x, w, b, stride=stride, padding=pad),
                            lambda: conv3d(x, w, b, stride=stride))
    backward = time_cpu_pair(
        lambda: _aten_backward(gy, x, w, stride, pad, [True, True, True]),
        lambda: (ops.conv3d_backward_input(gy, x, w, None, None, stride),
                 ops.conv3d_backward_weight(gy, x, w, None, None, stride)))
    return {"aten_forward_ms": forward[0], "ours_forward_ms": forward[1],
            "aten_backward_ms": backward[0], "ours_backward_ms": backward[1]}


def cpu_network(size: int, batch: int) -> dict[str, Any]:
    layers = trainer_layers(size)
    per_layer = [cpu_layer(shape, wshape, stride, batch) for shape, wshape, stride in layers]
    totals = {key: sum(row[key] for row in per_layer) for key in per_layer[0]}
    return {**totals, "layers": len(layers),
            "forward_speedup": totals["aten_forward_ms"] / totals["ours_forward_ms"],
            "backward_speedup": totals["aten_backward_ms"] / totals["ours_backward_ms"]}


def run_cpu(sizes: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    for size in sizes:
        for batch in (1, 2):
            row = cpu_network(size, batch)
            result[f"{size}^3 batch {batch}"] = row
            print(f"{size}^3 batch {batch}: forward aten {row['aten_forward_ms']:.1f} ms, ours "
                  f"{row['ours_forward_ms']:.1f} ms (x{row['forward_speedup']:.2f}); backward aten "
                  f"{row['aten_backward_ms']:.1f} ms, ours {row['ours_backward_ms']:.1f} ms "
                  f"(x{row['backward_speedup']:.2f})", file=sys.stderr, flush=True)
        up = result[f"{size}^3 upsampling"] = cpu_upsampling(size)
        print(f"{size}^3 upsampling (transposed): forward aten {up['aten_forward_ms']:.1f} ms, "
              f"ours {up['ours_forward_ms']:.1f} ms (x{up['forward_speedup']:.2f}); forward + "
              f"backward aten {up['aten_step_ms']:.1f} ms, ours {up['ours_step_ms']:.1f} ms "
              f"(x{up['step_speedup']:.2f})", file=sys.stderr, flush=True)
    b1 = [result[f"{s}^3 batch 1"]["forward_speedup"] for s in sizes]
    b2 = [result[f"{s}^3 batch 2"]["forward_speedup"] for s in sizes]
    result["goals"] = {"batch1_min_forward_speedup": min(b1), "batch1_goal_met": min(b1) >= 1.5,
                       "batch2_min_forward_speedup": min(b2), "batch2_goal_met": min(b2) >= 1.0}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmri bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda when a GPU is visible (auto), else cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96],
                        help="CPU: volume sizes of the trainer's network")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("fedmri bench kernels: --device cuda but no GPU is visible", file=sys.stderr)
        return 1
    load()
    torch.manual_seed(0)
    report: dict[str, Any] = {"torch": torch.__version__}
    if device == "cuda":
        report["gpu"] = run_gpu()
    else:
        report["cpu"] = run_cpu(args.sizes)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
