"""fedmri.kernels on CUDA against a float64 reference (marked gpu; skipped without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernels_reference import make_inputs, reference, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

# Relative error bounds ||out - ref|| / ||ref|| per dtype (float32 accumulation).
BOUND = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Shapes off the tile sizes (128 rows, 64/128 columns, 32-deep reduction) on purpose.
CASES = [
    # n, c, cout, (d, h, w), k, stride, halo_lo, halo_hi, activation
    (2, 16, 24, (7, 9, 11), 3, 1, True, True, "relu"),
    (1, 8, 72, (5, 13, 6), 3, 2, True, False, "leaky_relu"),
    (3, 3, 5, (6, 7, 5), 3, 1, False, True, None),      # channels % 8 != 0: scalar gather
    (2, 32, 130, (4, 5, 17), 1, 1, False, False, None),
    (1, 24, 40, (9, 8, 7), 3, 2, False, False, "relu"),
    (2, 40, 16, (3, 33, 31), 3, 1, True, True, None),
    (2, 1, 40, (6, 10, 12), 3, 2, True, True, "relu"),  # few input channels: direct kernel
    (1, 2, 8, (5, 5, 5), 1, 1, False, False, "leaky_relu"),
    (1, 128, 40, (5, 9, 7), 3, 2, True, True, "relu"),  # 2 channel blocks: near step order
    (2, 64, 24, (3, 5, 9), 1, 1, False, False, None),
]


def _poisoned_call(fn, like_shapes, dtype):  # type: ignore[no-untyped-def]
    """Fill freed blocks of the outputs' sizes with NaN first, so an unwritten element shows."""
    for shape in like_shapes:
        torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    out = fn()
    torch.cuda.synchronize()  # surfaces an asynchronous CUDA error here
    return out


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite (unwritten?) output elements"
    return rel_err(a, ref)


def _check_once(case, dtype, channels_last) -> None:  # type: ignore[no-untyped-def]
    from fedmri.kernels import conv3d

    n, c, cout, dhw, k, stride, lo, hi, act = case
    t = make_inputs(n, c, cout, dhw, k, lo, hi, dtype, "cuda")
    if channels_last:
        t["x"] = t["x"].detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ref_in = {key: (v.detach().double().cpu().requires_grad_() if v is not None else None)
              for key, v in t.items()}
    ref = reference(ref_in["x"], ref_in["w"], ref_in["b"], ref_in["lo"], ref_in["hi"], stride,
                    act)
    y = _poisoned_call(lambda: conv3d(t["x"], t["w"], t["b"], halo_lo=t["lo"], halo_hi=t["hi"],
                                      stride=stride, activation=act, negative_slope=0.1),
                       [tuple(ref.shape)], dtype)
    assert y.shape == ref.shape
    if channels_last and not t["x"].is_contiguous():  # (with one channel both layouts agree)
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert _rel(y, ref.detach()) < BOUND[dtype]
    gy = torch.randn(ref.shape, dtype=torch.float64)
    names = [key for key in ("x", "w", "b", "lo", "hi") if t[key] is not None]
    grads = _poisoned_call(
        lambda: torch.autograd.grad(y, [t[key] for key in names], gy.to("cuda", dtype)),
        [tuple(t[key].shape) for key in names], dtype)
    ref_grads = torch.autograd.grad(ref, [ref_in[key] for key in names], gy)
    for key, g, r in zip(names, grads, ref_grads, strict=True):
        assert _rel(g, r) < 4 * BOUND[dtype], f"gradient of {key}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_float64_reference(case, dtype, channels_last) -> None:  # type: ignore[no-untyped-def]
    for _ in range(2):  # fresh random inputs each time
        _check_once(case, dtype, channels_last)


def test_large_layer_bf16() -> None:
    """A real U-Net layer size: many blocks along rows and the 3-stage pipeline fully used."""
    from fedmri.kernels import conv3d

    t = make_inputs(2, 64, 64, (24, 40, 40), 3, True, True, torch.bfloat16, "cuda")
    x = t["x"].detach().contiguous(memory_format=torch.channels_last_3d)
    ref = reference(*(v.detach().double().cpu() if v is not None else None
                      for v in (x, t["w"], t["b"], t["lo"], t["hi"])), 1, "relu")
    w, b, lo, hi = (t[key].detach() for key in ("w", "b", "lo", "hi"))  # type: ignore[union-attr]
    y = _poisoned_call(lambda: conv3d(x, w, b, halo_lo=lo, halo_hi=hi, activation="relu"),
                       [tuple(ref.shape)], torch.bfloat16)
    assert _rel(y, ref) < BOUND[torch.bfloat16]


FORCED = ["wmma", "wgmma", "wgmma256", "wgmma-l1", "wgmma256-l1", "strip", "strip32"]
FAMILIES = ("igemm_mma<", "igemm_wgmma<", "strip_wgmma<")  # in the kernels' names


@pytest.mark.parametrize("kernel", FORCED)
def test_forward_kernel_variants(kernel: str) -> None:
    """Each forward kernel forced in turn (on an H100/H200; elsewhere the one that runs) against
    the reference. FEDMRI_CONV3D_KERNEL is read once per process: each runs in its own."""
    done = subprocess.run(
        [sys.executable, "-c", f"import test_kernels_gpu as t; t.check_forced_kernel({kernel!r})"],
        cwd=Path(__file__).parent, env={**os.environ, "FEDMRI_CONV3D_KERNEL": kernel},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]


def check_forced_kernel(kernel: str) -> None:
    """In a process started with FEDMRI_CONV3D_KERNEL=kernel: halos, bias and activation, sizes
    off the tiles, and the profiler shows that the forced kernel family ran (on Hopper with
    sm_90a code; elsewhere WMMA)."""
    from torch.profiler import ProfilerActivity, profile

    from fedmri.kernels import build, conv3d

    built = build.read_manifest()
    hopper = torch.cuda.get_device_capability() == (9, 0) and built is not None \
        and "9.0a" in built.archs
    family = FAMILIES[0] if not hopper or kernel == "wmma" else \
        FAMILIES[2] if kernel.startswith("strip") else FAMILIES[1]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for c, cout in [(32, 32), (64, 64), (64, 136), (32, 100), (128, 72)]:
            for dtype in (torch.float16, torch.bfloat16):
                t = make_inputs(2, c, cout, (6, 21, 19), 3, True, True, dtype, "cuda")
                x = t["x"].detach().contiguous(memory_format=torch.channels_last_3d)
                w, b, lo, hi = (t[key].detach() for key in ("w", "b", "lo", "hi"))  # type: ignore[union-attr]
                ref = reference(*(v.double().cpu() for v in (x, w, b, lo, hi)), 1, "leaky_relu")
                y = _poisoned_call(lambda: conv3d(x, w, b, halo_lo=lo, halo_hi=hi,  # noqa: B023
                                                  activation="leaky_relu", negative_slope=0.1),
                                   [tuple(ref.shape)], dtype)
                assert _rel(y, ref) < BOUND[dtype], f"{kernel} {dtype} {c}->{cout}"
    names = {event.key for event in prof.key_averages()}
    ran = {f for f in FAMILIES if any(f in name for name in names)}
    assert ran == {family}, f"FEDMRI_CONV3D_KERNEL={kernel}: ran {ran}, expected {family}"


def test_opcheck_cuda() -> None:
    from fedmri.kernels import load

    load()
    t = make_inputs(2, 8, 16, (5, 6, 7), 3, True, True, torch.float16, "cuda")
    torch.library.opcheck(torch.ops.fedmri.conv3d_forward.default,
                          (t["x"], t["w"], t["b"], t["lo"], t["hi"], 1, 1, 0.0))
