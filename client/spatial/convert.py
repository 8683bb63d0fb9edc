"""`parallelize`: turn a network's layers into their depth-split versions, in place.

Only what is known to be exact is converted or let through: the layers of layers.py and
norms.py, element-wise layers, and containers whose forward only chains, adds or concatenates
channels (the MONAI blocks the trainer's networks are made of). Anything else is named in a
ConversionError before any layer is changed, never run wrongly on a slab.
"""

from __future__ import annotations

import copy

import torch.distributed as dist
from torch import nn

from fedmri.client.spatial import comm
from fedmri.client.spatial.layers import (
    SpatialAvgPool3d,
    SpatialConv3d,
    SpatialConvTranspose3d,
    SpatialMaxPool3d,
    SpatialModule,
    SpatialUpsample,
    Unsupported,
)
from fedmri.client.spatial.mesh import SpatialMesh
from fedmri.client.spatial.norms import (
    SpatialBatchNorm3d,
    SpatialGroupNorm,
    SpatialInstanceNorm3d,
)


class ConversionError(ValueError):
    """A module of the network cannot be split in depth."""


SPLIT: dict[type[nn.Module], type[SpatialModule]] = {
    nn.Conv3d: SpatialConv3d,
    nn.ConvTranspose3d: SpatialConvTranspose3d,
    nn.Upsample: SpatialUpsample,
    nn.MaxPool3d: SpatialMaxPool3d,
    nn.AvgPool3d: SpatialAvgPool3d,
    nn.InstanceNorm3d: SpatialInstanceNorm3d,
    nn.GroupNorm: SpatialGroupNorm,
    nn.BatchNorm3d: SpatialBatchNorm3d,
}

# Per voxel (or per channel at a voxel): the same on a slab as on the whole volume.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Dropout3d,
)

# Containers whose forward chains children and combines their outputs per voxel.
CONTAINERS = frozenset({
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
    "monai.networks.nets.unet.UNet",
    "monai.networks.nets.basic_unet.BasicUNet",
    "monai.networks.nets.basic_unet.TwoConv",
    "monai.networks.nets.basic_unet.Down",
    "monai.networks.nets.basic_unet.UpCat",
    "monai.networks.nets.segresnet.SegResNet",
    "monai.networks.blocks.convolutions.Convolution",
    "monai.networks.blocks.convolutions.ResidualUnit",
    "monai.networks.blocks.acti_norm.ADN",
    "monai.networks.blocks.segresnet_block.ResBlock",
    "monai.networks.blocks.upsample.UpSample",
    "monai.networks.layers.simplelayers.SkipConnection",
})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _target(module: nn.Module, mesh: SpatialMesh) -> type[SpatialModule] | None:
    """The split class for a module, or None for one that runs unchanged on a slab."""
    if isinstance(module, SpatialModule):
        return type(module)
    if isinstance(module, nn.BatchNorm3d) and mesh.dp_size > 1 \
            and not module.track_running_stats:
        # Evaluation would take batch statistics, but replicas evaluate different cases.
        raise Unsupported("batch norm without running statistics on a data-parallel mesh")
    for base, split in SPLIT.items():
        # Exact classes, or subclasses that only change how forward is computed
        # (fedmri.kernels.Conv3d): a subclass with its own parameters is not ours to judge.
        if type(module) is base or (isinstance(module, base)
                                    and _qualname(type(module)).startswith("fedmri.kernels")):
            split.check(module)
            return split
    if isinstance(module, ELEMENTWISE) and type(module).__module__.startswith("torch.nn"):
        if isinstance(module, (nn.Dropout, nn.Dropout3d)) and module.p > 0:
            # Each rank would draw its own masks: not those of one whole volume.
            raise Unsupported(f"dropout p={module.p}: masks drawn per slab differ from one "
                              "volume's; use dropout 0 with tensor parallelism")
        return None
    if _qualname(type(module)) in CONTAINERS:
        if getattr(module, "dim", 1) != 1:  # SkipConnection concatenates on `dim`
            raise Unsupported(f"combines its branches along dim {module.dim}, not channels")
        return None
    raise Unsupported("no depth-split version of this layer (it may look across depth)")


def parallelize(model: nn.Module,
                group: SpatialMesh | dist.ProcessGroup | None) -> nn.Module:
    """Convert `model` in place so that each rank of the tensor-parallel group computes its
    depth slab of every activation; parameters and state_dict keys do not change.

    `group`: a SpatialMesh (init_mesh(dp, tp)), a process group to split over (tp only), or
    None (one process). Raises ConversionError naming every module that cannot be split,
    before any is changed."""
    mesh = group if isinstance(group, SpatialMesh) else SpatialMesh.from_group(group)
    plan: list[tuple[str, nn.Module, type[SpatialModule]]] = []
    errors = []
    for name, module in model.named_modules():
        try:
            target = _target(module, mesh)
        except Unsupported as err:
            errors.append(f"'{name or '<model>'}' ({_qualname(type(module))}): {err}")
            continue
        if target is not None:
            plan.append((name, module, target))
    if errors:
        raise ConversionError("cannot split this network in depth: " + "; ".join(errors))
    for name, module, target in plan:
        module.__class__ = target
        # Plain attributes, not parameters or buffers: state_dict does not change.
        module.__dict__.update(mesh=mesh, spatial_name=name)
    if not getattr(model, "_fedmri_halo_sharing", False):
        # Halo exchanges are shared within one forward of the network (comm._Sharing).
        model.register_forward_pre_hook(comm.forward_begins)
        model.register_forward_hook(comm.forward_ends, always_call=True)
        model.__dict__["_fedmri_halo_sharing"] = True
    return model


def local_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every split layer back to its torch class (the process group
    shared, not copied): what the network computes on one whole volume."""
    memo: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, SpatialModule):
            memo[id(module.mesh)] = module.mesh
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        if isinstance(module, SpatialModule):
            module.__class__ = module.TORCH_BASE  # type: ignore[assignment]
            del module.mesh, module.spatial_name
    return clone
