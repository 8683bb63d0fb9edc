"""Where to cut a volume in depth so that every layer of a network sees aligned slabs.

A layer with depth stride s (strided convolution, pooling) at a point where the network has
already downsampled by f needs every interior slab boundary at a multiple of f * s voxels of
the input. `plan_slabs` finds those layers by running the network once on meta tensors (no
memory, no compute) and cuts the volume into the most even aligned slabs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn


class SlabError(ValueError):
    """The volume's depth cannot be split over the ranks as the network's strides need."""


@dataclass(frozen=True)
class StridedLayer:
    name: str
    stride: int
    depth_in: int  # the layer's input depth when the network's input has `depth`

    def alignment(self, depth: int) -> int:
        """The smallest b such that an input boundary at a multiple of b falls on a whole
        plane, and a multiple of the stride, at this layer's depth (b x depth_in / depth)."""
        scale = Fraction(self.depth_in, depth)
        s_q = self.stride * scale.denominator
        return s_q // math.gcd(s_q, scale.numerator)


def depth_stride(module: nn.Module) -> int:
    """The stride in depth of a layer that downsamples (1 for any other)."""
    if isinstance(module, nn.Conv3d):
        return int(module.stride[0])
    if isinstance(module, (nn.MaxPool3d, nn.AvgPool3d)):
        stride = module.stride if module.stride is not None else module.kernel_size
        return int(stride if isinstance(stride, int) else stride[0])
    return 1


@dataclass(frozen=True)
class LayerInput:
    name: str
    module: nn.Module
    shape: torch.Size
    network_input: bool  # the layer reads the network's input (no gradient flows back)
    same_input_as: int | None = None  # the first earlier call that read the same tensor


def layer_inputs(model: nn.Module, shape: tuple[int, ...],
                 select: Callable[[nn.Module], bool]) -> list[LayerInput]:
    """Every call of a selected layer of `model`, in call order, for an input of `shape`
    (N, C, D, H, W): one forward pass on meta tensors of a copy of the model (no memory, no
    compute). Layers of the copy are whole-volume torch layers."""
    from fedmri.client.spatial.convert import local_copy

    probe = local_copy(model).to("meta").eval()  # eval: no running-statistics updates
    x = torch.empty(shape, device="meta")
    found: list[LayerInput] = []
    inputs: list[torch.Tensor] = []  # held, so that no two calls' inputs share an id
    hooks = []
    for name, module in probe.named_modules():
        if select(module):
            def record(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                same = next((i for i, t in enumerate(inputs) if t is args[0]), None)
                inputs.append(args[0])
                found.append(LayerInput(name, mod, args[0].shape, args[0] is x, same))
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            probe(x)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def strided_layers(model: nn.Module, shape: tuple[int, ...]) -> list[StridedLayer]:
    """Every downsampling layer of `model` and its input depth, for an input of `shape`."""
    return [StridedLayer(call.name, depth_stride(call.module), int(call.shape[2]))
            for call in layer_inputs(model, shape, lambda m: depth_stride(m) > 1)]


def split_depth(depth: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, stop) of `parts` slabs of `depth` planes, boundaries at multiples of `align`,
    as even as that allows (the first slabs take the extra blocks, the last the remainder)."""
    if parts < 1:
        raise SlabError(f"cannot split into {parts} slabs")
    blocks, rest = divmod(depth, align)
    if blocks < parts:
        raise SlabError(f"a depth of {depth} has {blocks} blocks of {align} planes: too few "
                        f"for {parts} slabs; use at most {max(blocks, 1)} ranks or a larger "
                        "volume")
    base, extra = divmod(blocks, parts)
    sizes = [(base + (1 if i < extra else 0)) * align for i in range(parts)]
    sizes[-1] += rest
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def plan_slabs(model: nn.Module, depth: int, parts: int,
               shape: tuple[int, int, int, int] | None = None) -> list[tuple[int, int]]:
    """The depth slabs [start, stop) of `parts` tensor-parallel ranks for `model`.

    `shape` is (C, D, H, W) of one input (default: one channel, a cube of `depth`). A
    SlabError names the layer whose stride or halo the split cannot meet."""
    from fedmri.client.spatial.layers import halo_planes

    c, d, h, w = shape if shape is not None else (1, depth, depth, depth)
    layers = strided_layers(model, (1, c, d, h, w))
    align = 1
    for layer in layers:
        align = math.lcm(align, layer.alignment(depth))
    try:
        slabs = split_depth(depth, parts, align)
    except SlabError as err:
        worst = max(layers, key=lambda layer: layer.alignment(depth))
        raise SlabError(
            f"cannot split depth {depth} over {parts} ranks: layer '{worst.name}' has stride "
            f"{worst.stride} at depth {worst.depth_in} of {depth}, so slab boundaries must fall "
            f"on multiples of {align} planes ({err})") from None
    if parts > 1:
        # Each layer's slab holds what the same layer holds when the slab is the whole input
        # (traced wide in-plane: a thin slab may be fewer voxels than a norm accepts).
        for size in sorted({stop - start for start, stop in slabs}):
            for call in layer_inputs(model, (1, c, size, max(h, 256), max(w, 256)),
                                     lambda m: max(halo_planes(m)) > 0):
                needed, planes = max(halo_planes(call.module)), int(call.shape[2])
                if planes < needed:
                    raise SlabError(
                        f"cannot split depth {depth} over {parts} ranks: layer '{call.name}' "
                        f"needs {needed} halo planes from its neighbours but a slab of {size} "
                        f"planes has only {planes} there; use fewer ranks or a larger volume")
    return slabs


__all__ = ["SlabError", "layer_inputs", "plan_slabs", "split_depth", "strided_layers"]
