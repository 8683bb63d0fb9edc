"""Spatial tensor parallelism inside a hospital: one volume split in depth over P processes.

Each rank of a tensor-parallel (tp) group holds a depth slab of every activation. Convolutions
exchange k//2 halo planes with their neighbours, normalisations reduce their statistics over
the group, the loss reduces its sums over the group, and parameter gradients are summed over
all ranks, so a step computes what one process computes on the whole volume. A data-parallel
(dp) dimension splits a batch over several tp groups (a dp x tp mesh).

    mesh = init_mesh(dp=1, tp=2)            # after torch.distributed.init_process_group
    slabs = plan_slabs(model, depth=128, parts=2)
    parallelize(model, mesh)                # in place: same parameters and state_dict
"""

from fedmri.client.spatial.convert import ConversionError, parallelize
from fedmri.client.spatial.mesh import SpatialMesh, init_mesh
from fedmri.client.spatial.plan import SlabError, plan_slabs

__all__ = ["ConversionError", "SlabError", "SpatialMesh", "init_mesh", "parallelize",
           "plan_slabs"]
