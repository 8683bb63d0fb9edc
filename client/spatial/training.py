"""The hospital's training step and evaluation on one rank of a spatial mesh."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedmri.client.dataset import Case
from fedmri.client.spatial.comm import plain_sum, sum_gradients
from fedmri.client.spatial.loss import dice_ce_loss, dice_counts, dice_from_counts
from fedmri.client.spatial.mesh import SpatialMesh
from fedmri.client.spatial.norms import SpatialBatchNorm3d
from fedmri.client.trainer import EvalResult, autocast
from fedmri.common.config import RunConfig


class SlabObjective:
    """A training step's loss on this rank's slab of its share of the batch (samples i with
    i % dp == dp_rank); `volume_voxels` are those of one whole volume."""

    def __init__(self, mesh: SpatialMesh, num_classes: int, volume_voxels: int) -> None:
        self.mesh, self.num_classes, self.volume_voxels = mesh, num_classes, volume_voxels

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.mesh.dp_size and model.training and any(
                isinstance(m, SpatialBatchNorm3d) for m in model.modules()):
            # Batch norm reduces over every replica inside the forward, which an empty
            # replica does not run: all ranks see the same batch size and stop together.
            raise ValueError(f"a batch of {x.shape[0]} over {self.mesh.dp_size} data-parallel "
                             "replicas leaves one without a sample, and the network has batch "
                             "norm: use a batch size and a number of training cases that are "
                             "multiples of dp")
        mine = slice(self.mesh.dp_rank, None, self.mesh.dp_size)
        xs, ys = x[mine], y[mine]
        logits = model(xs) if len(xs) else None
        return dice_ce_loss(logits, ys if len(xs) else None, self.mesh, self.num_classes,
                            x.shape[0], self.volume_voxels, dtype=x.dtype)

    def reduce_gradients(self, model: nn.Module) -> None:
        sum_gradients(list(model.parameters()), self.mesh)


@torch.no_grad()
def evaluate_slabs(model: nn.Module, cases: Sequence[Case], cfg: RunConfig, mesh: SpatialMesh,
                   volume_voxels: int, dev: torch.device) -> EvalResult:
    """fedmri.client.trainer.evaluate on slabs: data-parallel replicas take every dp-th case,
    each case's Dice counts and loss are reduced over its tp group, and the per-case scores
    over the mesh, so every rank returns the scores of all cases."""
    if not cases:
        raise ValueError("no validation cases to evaluate on")
    model.to(dev).eval()
    per_case = mesh.tp_only()
    rows = torch.zeros(len(cases), cfg.num_classes, dtype=torch.float64, device=dev)  # Dice, loss
    for j, case in enumerate(cases):
        if j % mesh.dp_size != mesh.dp_rank:
            continue
        with autocast(cfg, dev):
            logits = model(torch.from_numpy(case.image[None]).to(dev)).float()
        truth = torch.from_numpy(case.label).to(dev)
        dice = dice_from_counts(dice_counts(logits.argmax(1)[0], truth, cfg.num_classes, mesh))
        loss = dice_ce_loss(logits, truth[None, None], per_case, cfg.num_classes, 1,
                            volume_voxels)
        if mesh.tp_rank == 0:  # one copy per case in the sum below
            rows[j] = torch.tensor([*dice, float(loss)], dtype=torch.float64, device=dev)
    rows = plain_sum(rows, mesh.world_group).cpu()
    model.cpu()
    per_class = rows[:, :-1].mean(0)
    return EvalResult(dice=float(per_class.mean()), loss=float(rows[:, -1].mean()),
                      per_class=[float(v) for v in per_class])
