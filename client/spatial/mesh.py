"""The dp x tp process mesh: who holds which depth slab of which samples."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.distributed as dist


@dataclass(frozen=True)
class SpatialMesh:
    """This rank's place in a dp x tp mesh of a torch.distributed world.

    Global rank = dp_rank * tp_size + tp_rank: the ranks splitting one volume are consecutive,
    so on a multi-GPU host they share the fastest links. Groups are None where their size is 1
    (nothing to communicate), and all are None for a single process.
    """

    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    world_group: dist.ProcessGroup | None = None

    @property
    def below(self) -> int | None:
        """Global rank holding the slab below this one (None for the first slab)."""
        return self._global(self.tp_rank - 1) if self.tp_rank > 0 else None

    @property
    def above(self) -> int | None:
        return self._global(self.tp_rank + 1) if self.tp_rank < self.tp_size - 1 else None

    @property
    def last_slab(self) -> bool:
        return self.tp_rank == self.tp_size - 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size

    def tp_only(self) -> SpatialMesh:
        """This rank's tp group alone: reductions that span one sample, not the batch."""
        return replace(self, dp_size=1, dp_group=None, world_group=self.tp_group)

    def _global(self, tp_rank: int) -> int:
        return self.dp_rank * self.tp_size + tp_rank

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None) -> SpatialMesh:
        """A tp-only mesh over `group` (None: a single process)."""
        if group is None or dist.get_world_size(group) == 1:
            return cls()
        if dist.get_world_size(group) != dist.get_world_size():
            raise ValueError("parallelize(model, group): a group smaller than the world needs "
                             "a SpatialMesh (init_mesh(dp, tp)) so that ranks and groups agree")
        return cls(tp_rank=dist.get_rank(group), tp_size=dist.get_world_size(group),
                   tp_group=group, world_group=group)


def init_mesh(dp: int, tp: int) -> SpatialMesh:
    """Split the initialised default process group into dp groups of tp consecutive ranks.

    Every rank must call this (new_group is collective over the world)."""
    if dp < 1 or tp < 1:
        raise ValueError(f"dp and tp must be >= 1, got dp={dp} tp={tp}")
    if not dist.is_initialized():
        if dp * tp == 1:
            return SpatialMesh()
        raise RuntimeError("init_mesh: torch.distributed is not initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != dp * tp:
        raise ValueError(f"the world has {world} ranks but dp x tp = {dp} x {tp} = {dp * tp}")
    tp_groups = [dist.new_group(list(range(g * tp, (g + 1) * tp))) for g in range(dp)]
    dp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    dp_rank, tp_rank = divmod(rank, tp)
    return SpatialMesh(tp_rank=tp_rank, tp_size=tp, dp_rank=dp_rank, dp_size=dp,
                       tp_group=tp_groups[dp_rank] if tp > 1 else None,
                       dp_group=dp_groups[tp_rank] if dp > 1 else None,
                       world_group=dist.group.WORLD if world > 1 else None)


def gpu_per_rank(world: int) -> bool:
    """Whether each of `world` local ranks gets a GPU of its own (NCCL), else all use the
    CPU (gloo): NCCL refuses two ranks on one GPU."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= world
