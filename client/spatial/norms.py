"""Normalisations whose statistics span the whole volume (instance, group) or the whole batch
(batch norm): local sums, reduced over the mesh, then applied to each slab. Mean first, then
the centred sum of squares (two reductions: as accurate as torch's own)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fedmri.client.spatial.comm import plain_sum, shared_sum
from fedmri.client.spatial.layers import SpatialModule, Unsupported


def _normalize(x: torch.Tensor, groups: int, eps: float,
               group: dist.ProcessGroup | None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) per sample and channel group, statistics over `group`.
    Half-precision inputs (autocast) are normalised in float32, as torch's autocast does."""
    n = x.shape[0]
    flat = _float32_or_wider(x).reshape(n, groups, -1)
    count = plain_sum(flat.new_tensor(float(flat.shape[2]), dtype=torch.float64), group).item()
    mean = shared_sum(flat.sum(-1), group) / count
    centred = flat - mean.unsqueeze(-1)
    var = shared_sum(centred.square().sum(-1), group) / count
    return (centred * torch.rsqrt(var + eps).unsqueeze(-1)).reshape(x.shape)


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
        y = _normalize(x.contiguous(), x.shape[1], self.eps, self.mesh.tp_group)
        return _affine(y, self.weight, self.bias)


class SpatialGroupNorm(SpatialModule, nn.GroupNorm):
    TORCH_BASE = nn.GroupNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp_size == 1:
            return nn.GroupNorm.forward(self, x)
        y = _normalize(x.contiguous(), self.num_groups, self.eps, self.mesh.tp_group)
        return _affine(y, self.weight, self.bias)


class SpatialBatchNorm3d(SpatialModule, nn.BatchNorm3d):
    """Batch statistics over every sample and slab of the mesh (dp and tp); running
    statistics updated identically on every rank; evaluation uses them locally."""

    TORCH_BASE = nn.BatchNorm3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or not self.track_running_stats
        if self.mesh.world_group is None or not use_batch:
            return nn.BatchNorm3d.forward(self, x)
        group = self.mesh.world_group
        c = x.shape[1]
        flat = _float32_or_wider(x).transpose(0, 1).reshape(c, -1)
        count = plain_sum(flat.new_tensor(float(flat.shape[1]), dtype=torch.float64), group).item()
        mean = shared_sum(flat.sum(-1), group) / count
        centred = flat - mean.unsqueeze(-1)
        var = shared_sum(centred.square().sum(-1), group) / count
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), count)
        y = (centred * torch.rsqrt(var + self.eps).unsqueeze(-1))
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
