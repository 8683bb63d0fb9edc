"""Normalisations whose statistics span the whole volume (instance, group) or the whole batch
(batch norm): each rank's count, mean and centred sum of squares, combined over the mesh in
one reduction (Chan's parallel formula: as accurate as a two-pass variance), then applied to
each slab."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from fedmri import kernels
from fedmri.client.spatial.comm import all_reduce_sum
from fedmri.client.spatial.layers import SpatialModule, Unsupported
from fedmri.client.spatial.mesh import SpatialMesh


def group_moments(flat: torch.Tensor, group: dist.ProcessGroup | None, rank: int,
                  size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, biased variance and count over the last dimension of `flat` and over the ranks
    of `group` (this rank is `rank` of `size`), with one all-reduce; no gradient."""
    count = flat.shape[-1]
    mean, var = _row_moments(flat.reshape(-1, count))
    mean, var = mean.view(flat.shape[:-1]), var.view(flat.shape[:-1])
    if group is None:
        return mean, var, float(count)
    # Every rank's (count, mean, M2) side by side, gathered by summing zero-padded rows.
    n = mean.numel()
    rows = flat.new_zeros((size, 1 + 2 * n))
    torch.cat((mean.new_full((1,), count), mean.reshape(-1), var.reshape(-1) * count),
              out=rows[rank])
    all_reduce_sum(rows, group)
    counts, means, m2s = rows.split([1, n, n], dim=1)
    total = float(counts.sum())
    mean_all = (counts * means).sum(0).div_(total)  # not mm: autocast would make it bf16
    spread = (means - mean_all).square_().mul_(counts)  # Chan: M2 = sum M2_i + c_i d_i^2
    var_all = m2s.sum(0).add_(spread.sum(0)).div_(total)
    return mean_all.view_as(mean), var_all.view_as(mean), total


def _row_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each row (rows, length), as accurate as a two-pass variance.
    On the CPU our op (kernels/csrc/row_stats.cpp: 5x faster than ATen's, which costs a split
    rank about 9 ms a step at 128³); elsewhere ATen's two passes in one call."""
    if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64):
        kernels.load()  # rows of a channels-last or batch norm input may be a strided view
        return torch.ops.fedmri.norm_row_moments(rows.contiguous())
    return torch.batch_norm_update_stats(rows.unsqueeze(0), None, None, 0.0)


def _scale_rows(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) per row of x (rows, length), in one fused pass (torch's
    batch norm kernel in inference mode, each row a channel)."""
    return torch.batch_norm(x.unsqueeze(0), None, None, mean, var, False, 0.0, eps,
                            False).squeeze(0)


class _SyncNormalize(torch.autograd.Function):
    """(x - mean) / sqrt(var + eps) over the last dimension and the ranks of a group, with
    the analytic backward: it keeps only the normalised slab (one tensor of the slab's size,
    as torch's own norms do) and needs one all-reduce of two sums per row."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, eps: float, group: dist.ProcessGroup,
                rank: int, size: int, stats: list[Any] | None = None) -> torch.Tensor:
        mean, var, count = group_moments(flat, group, rank, size)
        if stats is not None:  # batch norm's running statistics take the same ones
            stats.extend((mean, var, count))
        rows = flat.reshape(-1, flat.shape[-1])
        normalized = _scale_rows(rows, mean.reshape(-1), var.reshape(-1), eps)
        ctx.save_for_backward(normalized, var.reshape(-1))
        ctx.group, ctx.count, ctx.eps = group, count, eps
        return normalized.view_as(flat)

    @staticmethod
    @once_differentiable  # its all-reduce is no autograd op: refused, never silently wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        normalized, var = ctx.saved_tensors
        rows = grad.reshape(normalized.shape)
        # Both sums per row in one pass: batch norm's weight and bias gradients of the
        # normalised rows (mean 0, scale 1) are sum(grad * normalized) and sum(grad).
        ones = torch.ones_like(var)
        _, sum_proj, sum_grad = torch.ops.aten.native_batch_norm_backward(
            rows.unsqueeze(0), normalized.unsqueeze(0), ones, None, None,
            torch.zeros_like(var), ones, True, 0.0, [False, True, True])
        sums = torch.stack([sum_grad, sum_proj])
        all_reduce_sum(sums, ctx.group)
        mean_grad, mean_proj = sums.div_(ctx.count).unbind()
        # rstd * (grad - mean_grad - normalized * mean_proj), in two passes.
        out = _scale_rows(rows, mean_grad, var, ctx.eps)
        out.addcmul_(normalized, mean_proj.mul_(torch.rsqrt(var + ctx.eps)).neg_().unsqueeze(-1))
        return out.view_as(grad), None, None, None, None, None


def _normalize(x: torch.Tensor, groups: int, eps: float, mesh: SpatialMesh) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) per sample and channel group, statistics over the tp
    group. Half-precision inputs (autocast) are normalised in float32, as autocast does."""
    flat = _float32_or_wider(x).reshape(x.shape[0], groups, -1)
    y = _SyncNormalize.apply(flat, eps, mesh.tp_group, mesh.tp_rank, mesh.tp_size)
    return y.reshape(x.shape)


def _float32_or_wider(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _affine(y: torch.Tensor, weight: torch.Tensor | None,
            bias: torch.Tensor | None) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class SpatialInstanceNorm3d(SpatialModule, nn.InstanceNorm3d):
    TORCH_BASE = nn.InstanceNorm3d

    @classmethod
    def check(cls, module: nn.Module) -> None:
        assert isinstance(module, nn.InstanceNorm3d)
        if module.track_running_stats:
            raise Unsupported("instance norm with running statistics")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp_size == 1:
            return nn.InstanceNorm3d.forward(self, x)
        y = _normalize(x.contiguous(), x.shape[1], self.eps, self.mesh)
        return _affine(y, self.weight, self.bias)


class SpatialGroupNorm(SpatialModule, nn.GroupNorm):
    TORCH_BASE = nn.GroupNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp_size == 1:
            return nn.GroupNorm.forward(self, x)
        y = _normalize(x.contiguous(), self.num_groups, self.eps, self.mesh)
        return _affine(y, self.weight, self.bias)


class SpatialBatchNorm3d(SpatialModule, nn.BatchNorm3d):
    """Batch statistics over every sample and slab of the mesh (dp and tp); running
    statistics updated identically on every rank; evaluation uses them locally."""

    TORCH_BASE = nn.BatchNorm3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or not self.track_running_stats
        if self.mesh.world_group is None or not use_batch:
            return nn.BatchNorm3d.forward(self, x)
        mesh, c = self.mesh, x.shape[1]
        flat = _float32_or_wider(x).transpose(0, 1).reshape(c, -1)
        rank = mesh.dp_rank * mesh.tp_size + mesh.tp_rank
        stats: list[Any] = []
        y = _SyncNormalize.apply(flat, self.eps, mesh.world_group, rank, mesh.world_size, stats)
        if self.training and self.track_running_stats:
            self._update_running(*stats)
        y = y.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1)
        return _affine(y, self.weight, self.bias)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype),
                                                alpha=factor)


__all__ = ["SpatialBatchNorm3d", "SpatialGroupNorm", "SpatialInstanceNorm3d"]
