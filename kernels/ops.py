"""`fedmri.kernels.conv3d`: the compiled op, its fake (meta) kernels and its autograd formula.

The library defines three ops in the `fedmri` namespace (kernels/csrc/registration.cpp):
conv3d_forward, conv3d_backward_input, conv3d_backward_weight, each with a CPU and (when
compiled) a CUDA kernel, five CPU ops on messages in shared memory (shm_store, shm_wait,
shm_publish, shm_take, shm_sum: kernels/csrc/shm_counters.cpp, for fedmri.client.spatial.shm)
and one for the split norms' statistics (norm_row_moments: kernels/csrc/row_stats.cpp).
This module loads the library, compiling it on first use, and registers what torch.compile and
autograd need on the Python side.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fedmri.kernels import build

ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}
_lock = threading.Lock()
_loaded = False


def load() -> None:
    """Load the operator library (compiling it if this torch has no cached build)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        built = build.read_manifest()
        try:
            if built is None:
                build.build()  # cpp_extension.load loads what it builds
            else:
                torch.ops.load_library(built.library)
        except Exception as err:
            raise RuntimeError(
                f"fedmri.kernels: the operator library could not be built or loaded ({err}). "
                "Check `fedmri kernels info`; a model can run on ATen's convolutions instead "
                "with conv_backend='aten' in the run config.") from err
        _register_python_side()
        _loaded = True


# What torch.compiler.assume_constant_result sets, without importing dynamo (1.3 s per process
# start): compiling a model before any eager call then runs load() while tracing instead of
# failing on its lock (tests/test_kernels_cpu.py compiles first in a fresh process).
load._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


def _like(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    fmt = torch.channels_last_3d if _channels_last(t) else torch.contiguous_format
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int) -> list[int]:
    n, _, d, h, w = x.shape
    return [n, weight.shape[0], (d - 1) // stride + 1, (h - 1) // stride + 1,
            (w - 1) // stride + 1]


def _register_python_side() -> None:
    lib = "fedmri::"

    @torch.library.register_fake(lib + "conv3d_forward")
    def _forward_fake(x, weight, bias, halo_lo, halo_hi, stride, activation, negative_slope):
        return _like(x, output_shape(x, weight, stride))

    @torch.library.register_fake(lib + "conv3d_backward_input")
    def _input_fake(grad_out, x, weight, halo_lo, halo_hi, stride):
        def grad(h: torch.Tensor | None) -> torch.Tensor:
            return x.new_empty([0]) if h is None else _like(h, list(h.shape))
        return _like(x, list(x.shape)), grad(halo_lo), grad(halo_hi)

    @torch.library.register_fake(lib + "conv3d_backward_weight")
    def _weight_fake(grad_out, x, weight, halo_lo, halo_hi, stride):
        return weight.new_empty(weight.shape), weight.new_empty([weight.shape[0]])

    @torch.library.register_fake(lib + "norm_row_moments")
    def _moments_fake(x):
        return x.new_empty([x.shape[0]]), x.new_empty([x.shape[0]])

    torch.library.register_autograd(lib + "conv3d_forward", _backward,
                                    setup_context=_setup_context)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, halo_lo, halo_hi, stride, activation, slope = inputs
    ctx.save_for_backward(x, weight, halo_lo, halo_hi, output if activation else None)
    ctx.stride, ctx.activation, ctx.slope = stride, activation, slope
    ctx.has_bias = bias is not None


@once_differentiable  # the backward ops have no autograd: refused, never silently wrong
def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, halo_lo, halo_hi, y = ctx.saved_tensors
    grad = grad_y
    if ctx.activation:  # y > 0 exactly where the pre-activation was > 0 (slope >= 0)
        slope = 0.0 if ctx.activation == ACTIVATIONS["relu"] else ctx.slope
        grad = torch.where(y > 0, grad_y, grad_y * slope)
    need = ctx.needs_input_grad
    gx = glo = ghi = gw = gb = None
    if need[0] or need[3] or need[4]:
        gx, glo, ghi = torch.ops.fedmri.conv3d_backward_input(grad, x, weight, halo_lo, halo_hi,
                                                              ctx.stride)
    if need[1] or need[2]:
        gw, gb = torch.ops.fedmri.conv3d_backward_weight(grad, x, weight, halo_lo, halo_hi,
                                                         ctx.stride)
    return (gx, gw, gb if ctx.has_bias else None, glo if halo_lo is not None else None,
            ghi if halo_hi is not None else None, None, None, None)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           halo_lo: torch.Tensor | None = None, halo_hi: torch.Tensor | None = None,
           stride: int = 1, activation: str | None = None,
           negative_slope: float = 0.01) -> torch.Tensor:
    """3D convolution with 'same' padding (k = 1 or 3), stride 1 or 2, optional fused bias and
    activation ("relu" or "leaky_relu"), and depth halos.

    `halo_lo` / `halo_hi` are the k//2 planes just below / above x's slab in depth, shaped
    (N, C, k//2, H, W); where one is None the convolution pads with zeros instead. Height and
    width are zero-padded. Gradients flow to x, both halos, weight and bias.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"fedmri.conv3d: activation must be one of {list(ACTIVATIONS)}, "
                         f"got {activation!r}")
    if negative_slope < 0:
        raise ValueError(f"fedmri.conv3d: negative_slope must be >= 0, got {negative_slope}")
    load()
    args = (x, weight, bias, halo_lo, halo_hi, stride, ACTIVATIONS[activation], negative_slope)
    if not torch.compiler.is_compiling() and not _needs_grad(x, weight, bias, halo_lo, halo_hi):
        # Nothing to differentiate: skip the Python autograd kernel (about 30 us a call,
        # 10% of a small layer's time).
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fedmri.conv3d_forward.default(*args)
    return torch.ops.fedmri.conv3d_forward.default(*args)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
