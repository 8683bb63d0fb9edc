"""nn.Conv3d and nn.ConvTranspose3d on the fedmri ops, and the swap that puts a model's 3D
convolutions on them."""

from __future__ import annotations

import torch
from torch import nn

from fedmri.kernels.ops import conv3d
from fedmri.kernels.transposed import conv_transpose3d, transposable


def autocast_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast a convolution's inputs as autocast would cast F.conv3d (custom ops are not
    autocast by torch); unchanged outside autocast."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
    return x, weight, bias


class Conv3d(nn.Conv3d):
    """An nn.Conv3d (same parameters and state_dict) computed by fedmri.kernels.conv3d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w, b = autocast_inputs(x, self.weight, self.bias)
        return conv3d(x, w, b, stride=self.stride[0])


class ConvTranspose3d(nn.ConvTranspose3d):
    """An nn.ConvTranspose3d (kernel 3, stride 2, padding 1, output padding 1) computed by
    fedmri.kernels.conv_transpose3d on the CPU."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:
            return super().forward(x, output_size)
        return transposed_forward(self, x)


def transposed_forward(layer: nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """layer(x) on fedmri.kernels.conv_transpose3d where it computes the layer's
    configuration, else ATen's."""
    if not transposable(layer):
        return nn.ConvTranspose3d.forward(layer, x)
    x, w, b = autocast_inputs(x, layer.weight, layer.bias)
    return conv_transpose3d(x, w, b)


def eligible(conv: nn.Module) -> bool:
    """Whether the ops compute exactly this layer: a convolution with k 1 or 3, 'same'
    padding, stride 1 or 2, or a transposed convolution that doubles every edge."""
    if type(conv) is nn.ConvTranspose3d:
        return transposable(conv)
    return type(conv) is nn.Conv3d and computable(conv)


def computable(conv: nn.Conv3d) -> bool:
    """Whether the op can compute this convolution's configuration."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    return (len(set(k)) == 1 and k[0] in (1, 3) and len(set(s)) == 1 and s[0] in (1, 2)
            and p == (k[0] // 2,) * 3 and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def use_fedmri_conv(model: nn.Module) -> int:
    """Switch every eligible nn.Conv3d and nn.ConvTranspose3d of `model` to the fedmri ops in
    place; returns how many.

    The swap changes the class only, so parameters, hooks and state_dict keys stay the same.
    """
    count = 0
    for module in model.modules():
        if eligible(module):
            module.__class__ = Conv3d if type(module) is nn.Conv3d else ConvTranspose3d
            count += 1
    return count
