"""The trainer's Dice + cross-entropy loss and the Dice metric on depth slabs.

Each rank sums over its own voxels; the sums are reduced over the tensor-parallel group (per
sample) and over the mesh (the batch), and every rank then computes the same loss: exactly
MONAI's DiceCELoss(to_onehot_y=True, softmax=True) on the whole batch (Dice per sample and
class, averaged; cross-entropy averaged over every voxel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedmri.client.spatial.comm import plain_sum, replica_sum
from fedmri.client.spatial.mesh import SpatialMesh

SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr


def dice_ce_loss(logits: torch.Tensor | None, labels: torch.Tensor | None, mesh: SpatialMesh,
                 num_classes: int, batch_size: int, volume_voxels: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The loss of the whole batch (`batch_size` samples of `volume_voxels` voxels), from this
    rank's slab of its samples (None where this data-parallel replica has no sample; `dtype`
    is then the logits' dtype of the others)."""
    if logits is None or labels is None:
        # Same reductions, in the same order and dtype, as the replicas holding samples (its
        # whole tp group is empty too, so the per-sample reduction is skipped by all of it).
        zero = torch.zeros((), dtype=dtype)
        return _combine(replica_sum(zero, mesh.dp_group), replica_sum(zero, mesh.world_group),
                        num_classes, batch_size, volume_voxels)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # reduced-precision logits (autocast): sums in float32
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.dim()))
    # Per sample and class: intersection, predicted and true volume; summed over slabs.
    sums = torch.stack([(probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)])
    ce = F.cross_entropy(logits, labels[:, 0].long(), reduction="sum")
    if mesh.dp_group is None:
        # The tp group is the whole mesh: one reduction for both (a synchronisation less).
        both = replica_sum(torch.cat([sums.reshape(-1), ce.reshape(1)]), mesh.tp_group)
        sums, ce_sum = both[:-1].view_as(sums), both[-1]
    else:
        sums, ce_sum = replica_sum(sums, mesh.tp_group), None
    intersection, predicted, truth = sums[0], sums[1], sums[2]
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (predicted + truth + SMOOTH)
    dice_sum = replica_sum(dice.sum(), mesh.dp_group)
    if ce_sum is None:  # after the dp sum: the order the replicas without samples keep
        ce_sum = replica_sum(ce, mesh.world_group)
    return _combine(dice_sum, ce_sum, num_classes, batch_size, volume_voxels)


def _combine(dice_sum: torch.Tensor, ce_sum: torch.Tensor, num_classes: int, batch_size: int,
             volume_voxels: int) -> torch.Tensor:
    return dice_sum / (batch_size * num_classes) + ce_sum / (batch_size * volume_voxels)


def dice_counts(prediction: torch.Tensor, truth: torch.Tensor, num_classes: int,
                mesh: SpatialMesh) -> torch.Tensor:
    """(classes-1, 3): per foreground class, overlap, predicted and true voxels of one sample,
    summed over its slabs."""
    rows = []
    for k in range(1, num_classes):
        p, t = prediction == k, truth == k
        rows.append(torch.stack([(p & t).sum(), p.sum(), t.sum()]))
    return plain_sum(torch.stack(rows).to(torch.float64), mesh.tp_group)


def dice_from_counts(counts: torch.Tensor) -> list[float]:
    """Dice per foreground class (a class absent from both counts as 1), as
    fedmri.client.trainer.dice_per_class."""
    scores = []
    for overlap, predicted, true in counts.tolist():
        denom = predicted + true
        scores.append(1.0 if denom == 0 else 2.0 * overlap / denom)
    return scores
