"""Depth-split versions of the layers that look across depth: convolutions, transposed
convolutions, upsampling and pooling. Each is the torch class with its forward replaced
(`parallelize` swaps the class), so parameters and state_dict keys do not change."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmri.client.spatial.comm import halo_exchange, slab_depths
from fedmri.client.spatial.mesh import SpatialMesh
from fedmri.client.spatial.plan import SlabError
from fedmri.kernels import conv3d
from fedmri.kernels.layers import autocast_inputs, computable, transposed_forward


class Unsupported(ValueError):
    """A layer's configuration that the depth split cannot compute exactly."""


class SpatialModule(nn.Module):
    """What every depth-split layer carries: the mesh and its own name (for errors)."""

    TORCH_BASE: ClassVar[type[nn.Module]]
    mesh: SpatialMesh
    spatial_name: str

    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise Unsupported if this layer's configuration cannot be split exactly."""

    def check_aligned(self, x: torch.Tensor, stride: int) -> None:
        """Interior slabs must hold whole stride windows (plan_slabs cuts them so)."""
        if not self.mesh.last_slab and x.shape[2] % stride:
            raise SlabError(
                f"layer '{self.spatial_name}' (depth stride {stride}) received a slab of "
                f"{x.shape[2]} planes on tp rank {self.mesh.tp_rank}: slab boundaries must be "
                "multiples of the network's total stride (cut the volume with plan_slabs)")


def halo_planes(module: nn.Module) -> tuple[int, int]:
    """(planes from below, planes from above) that a depth-split layer of this torch layer's
    configuration exchanges with its neighbours (the same in forward and backward)."""
    if isinstance(module, nn.Conv3d):
        k, stride = module.kernel_size[0], module.stride[0]
        # A stride-2 window of an aligned slab never reaches past its last plane.
        return k // 2, k // 2 if stride == 1 else 0
    if isinstance(module, nn.ConvTranspose3d):
        k, s, p = module.kernel_size[0], module.stride[0], _ints(module.padding)[0]
        return max(0, (k - 1 - p) // s), max(0, (p - 1 + s) // s)
    if isinstance(module, nn.Upsample) and module.mode != "nearest":
        return 1, 1
    return 0, 0


class SpatialConv3d(SpatialModule, nn.Conv3d):
    """'Same' 3D convolution on fedmri.kernels.conv3d with the neighbours' k//2 planes."""

    TORCH_BASE = nn.Conv3d

    @classmethod
    def check(cls, module: nn.Module) -> None:
        assert isinstance(module, nn.Conv3d)
        if not computable(module):
            raise Unsupported(
                f"kernel {module.kernel_size}, stride {module.stride}, padding "
                f"{module.padding}, dilation {module.dilation}, groups {module.groups}: the "
                "split convolution takes cubic kernels 1 or 3, stride 1 or 2, 'same' zero "
                "padding, no dilation, groups 1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride[0]
        if stride > 1:
            self.check_aligned(x, stride)
        x, halo_lo, halo_hi = halo_exchange(x, self.mesh, *halo_planes(self), self.spatial_name)
        x, w, b = autocast_inputs(x, self.weight, self.bias)
        if halo_lo is not None:
            halo_lo = halo_lo.to(x.dtype)
        if halo_hi is not None:
            halo_hi = halo_hi.to(x.dtype)
        return conv3d(x, w, b, halo_lo=halo_lo, halo_hi=halo_hi, stride=stride)


class SpatialConvTranspose3d(SpatialModule, nn.ConvTranspose3d):
    """Transposed convolution (upsampling by its stride s): a slab of d input planes makes
    exactly the s*d output planes above it, from its own planes plus the halo planes whose
    kernel windows reach into it."""

    TORCH_BASE = nn.ConvTranspose3d

    @classmethod
    def check(cls, module: nn.Module) -> None:
        assert isinstance(module, nn.ConvTranspose3d)
        if isinstance(module.padding, str):
            raise Unsupported(f"padding {module.padding!r}")
        k, s, p = module.kernel_size[0], module.stride[0], int(module.padding[0])
        op = module.output_padding[0]
        if module.dilation[0] != 1 or module.padding_mode != "zeros":
            raise Unsupported("dilated or non-zero-padded transposed convolution")
        if k - 2 * p + op != s:
            raise Unsupported(f"kernel {k}, stride {s}, padding {p}, output padding {op} in "
                              f"depth: the output depth is not exactly {s} x the input's")

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.mesh.tp_size == 1:
            return transposed_forward(self, x) if output_size is None else \
                nn.ConvTranspose3d.forward(self, x, output_size)
        if output_size is not None:
            raise Unsupported(f"layer '{self.spatial_name}': output_size is not supported "
                              "on depth slabs")
        lo, hi = halo_planes(self)
        x, halo_lo, halo_hi = halo_exchange(x, self.mesh, lo, hi, self.spatial_name)
        # The slab's own s*d output planes, from its own planes (this layer's padding keeps
        # the output depth at s x the input's) ...
        y = transposed_forward(self, x)
        # ... plus what the halo planes' kernel windows add to the planes at either end. No
        # concatenated copy of the slab: it is saved for backward once, as on one process.
        s, p, k, depth = self.stride[0], _ints(self.padding)[0], self.kernel_size[0], y.shape[2]
        if halo_hi is not None and p > 0:
            y = _AddToPlanes.apply(y, self._halo_part(halo_hi)[:, :, :p], depth - p)
        reach = k - s - p  # output planes the planes below reach into
        if halo_lo is not None and reach > 0:
            first = s * lo + p
            y = _AddToPlanes.apply(y, self._halo_part(halo_lo)[:, :, first:first + reach], 0)
        return y

    def _halo_part(self, halo: torch.Tensor) -> torch.Tensor:
        """The halo planes' transposed convolution, unpadded in depth, without bias."""
        return F.conv_transpose3d(halo, self.weight, None, self.stride,
                                  (0, *_ints(self.padding)[1:]),
                                  (0, *self.output_padding[1:]), self.groups, self.dilation)


class _AddToPlanes(torch.autograd.Function):
    """y[:, :, start:start + len(part)] += part, in place; its backward hands y's gradient on
    as it is (autograd's own in-place slice add would copy the whole gradient)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, part: torch.Tensor, start: int) -> torch.Tensor:
        y.narrow(2, start, part.shape[2]).add_(part)
        ctx.mark_dirty(y)
        ctx.start, ctx.planes = start, part.shape[2]
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad, grad.narrow(2, ctx.start, ctx.planes), None


class SpatialUpsample(SpatialModule, nn.Upsample):
    """nn.Upsample by an integer depth factor: nearest (local) or (tri)linear (one halo plane
    each side, interpolated in depth at the global source positions torch uses)."""

    TORCH_BASE = nn.Upsample

    @classmethod
    def check(cls, module: nn.Module) -> None:
        assert isinstance(module, nn.Upsample)
        if module.size is not None or module.scale_factor is None:
            raise Unsupported("upsampling to a fixed size: give a scale factor instead")
        if module.recompute_scale_factor:
            raise Unsupported("recompute_scale_factor=True")
        scale = _depth_scale(module)
        if scale != int(scale) or scale < 1:
            raise Unsupported(f"depth scale factor {scale}: only whole factors split exactly")
        if module.mode == "nearest" and int(scale) & (int(scale) - 1):
            raise Unsupported(f"nearest upsampling by {scale}: only powers of two split "
                              "exactly (1/scale must be exact in floating point)")
        if module.mode not in ("nearest", "trilinear"):
            raise Unsupported(f"mode {module.mode!r}: nearest or trilinear only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp_size == 1 or self.mode == "nearest":
            return nn.Upsample.forward(self, x)
        scale = int(_depth_scale(self))
        depths = slab_depths(x.shape[2], self.mesh, x.device)
        start, total = sum(depths[:self.mesh.tp_rank]), sum(depths)
        x, halo_lo, halo_hi = halo_exchange(x, self.mesh, *halo_planes(self), self.spatial_name)
        ext = torch.cat([t for t in (halo_lo, x, halo_hi) if t is not None], dim=2)
        first = start - (1 if halo_lo is not None else 0)  # global plane of ext[:, :, 0]
        i0, i1, w1 = _linear_sources(scale * start, scale * x.shape[2], total, scale,
                                     bool(self.align_corners))
        shape = (1, 1, -1, 1, 1)
        w1_t = torch.as_tensor(w1, dtype=x.dtype, device=x.device).view(shape)
        lower = ext.index_select(2, torch.as_tensor(i0 - first, device=x.device))
        upper = ext.index_select(2, torch.as_tensor(i1 - first, device=x.device))
        y = lower * (1 - w1_t) + upper * w1_t
        n, c, d, h, w = y.shape
        planes = y.transpose(1, 2).reshape(n * d, c, h, w)
        factor = self.scale_factor
        hw_scale = ((float(factor[1]), float(factor[2])) if isinstance(factor, tuple)
                    else (float(factor), float(factor)))  # type: ignore[arg-type]
        planes = F.interpolate(planes, scale_factor=hw_scale, mode="bilinear",
                               align_corners=self.align_corners)
        return planes.reshape(n, d, c, *planes.shape[2:]).transpose(1, 2).contiguous()


def _depth_scale(module: nn.Upsample) -> float:
    factor = module.scale_factor
    return float(factor[0] if isinstance(factor, tuple) else factor)  # type: ignore[arg-type]


def _linear_sources(out_start: int, count: int, depth_in: int, scale: int,
                    align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's linear source planes (i0, i1) and upper weight of outputs [out_start, +count)."""
    out = np.arange(out_start, out_start + count, dtype=np.float64)
    depth_out = depth_in * scale
    if align_corners:
        src = out * ((depth_in - 1) / (depth_out - 1)) if depth_out > 1 else out * 0.0
    else:
        src = np.maximum((out + 0.5) / scale - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, depth_in - 1)
    return i0, i1, src - i0


class SpatialPool3d(SpatialModule):
    """Max or average pooling whose windows tile depth (kernel = stride, no padding): local on
    aligned slabs."""

    @classmethod
    def check(cls, module: nn.Module) -> None:
        assert isinstance(module, (nn.MaxPool3d, nn.AvgPool3d))
        k = _first(module.kernel_size)
        s = _first(module.stride if module.stride is not None else module.kernel_size)
        p = _first(module.padding)
        dilation = _first(getattr(module, "dilation", 1))
        if getattr(module, "return_indices", False):
            raise Unsupported("return_indices=True: the indices would be local to a slab")
        if k != s or p != 0 or dilation != 1 or module.ceil_mode:
            raise Unsupported(f"pooling kernel {k}, stride {s}, padding {p}, dilation "
                              f"{dilation}, ceil_mode {module.ceil_mode}: only windows that "
                              "tile depth (kernel = stride, no padding) split exactly")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool: nn.MaxPool3d | nn.AvgPool3d = self  # type: ignore[assignment]
        self.check_aligned(x, _first(pool.kernel_size))
        return self.TORCH_BASE.forward(self, x)


class SpatialMaxPool3d(SpatialPool3d, nn.MaxPool3d):
    TORCH_BASE = nn.MaxPool3d


class SpatialAvgPool3d(SpatialPool3d, nn.AvgPool3d):
    TORCH_BASE = nn.AvgPool3d


def _first(value: int | tuple[int, ...]) -> int:
    return int(value if isinstance(value, int) else value[0])


def _ints(padding: str | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(padding, str):  # refused by check(); kept out of the arithmetic
        raise Unsupported(f"padding {padding!r}")
    return tuple(int(p) for p in padding)
