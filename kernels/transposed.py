"""`fedmri.kernels.conv_transpose3d`: the U-Nets' upsampling layer (kernel 3, stride 2,
padding 1, output padding 1: every edge doubles) on the conv3d ops, on the CPU.

A transposed convolution is the input gradient of the strided convolution with the same
weight, so its forward is conv3d_backward_input and its input gradient the stride-2
conv3d_forward. ATen's forward takes its single-threaded loop (slow_conv_transpose3d) for small
inputs at batch 1 and a slow oneDNN kernel for few output channels: the trainer's 16 -> 3
layer at 64^3 took 92 ms against 23 ms here (one thread, docs/kernels.md). Its weight gradient
stays ATen's: oneDNN's was 3.6x faster than our im2col for that layer. Other devices: ATen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fedmri.kernels.ops import load

STRIDE = 2


def transposable(layer: nn.ConvTranspose3d) -> bool:
    """Whether conv_transpose3d computes this layer's configuration."""
    return (layer.kernel_size == (3, 3, 3) and layer.stride == (STRIDE,) * 3
            and layer.padding == (1, 1, 1) and layer.output_padding == (1, 1, 1)
            and layer.dilation == (1, 1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros")


class _ConvTranspose3d(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        n, _, d, h, w = x.shape
        # Only the shape and dtype of the strided convolution's input are read.
        like = x.new_empty(()).expand(n, weight.shape[1], STRIDE * d, STRIDE * h, STRIDE * w)
        y = torch.ops.fedmri.conv3d_backward_input(x, like, weight, None, None, STRIDE)[0]
        if bias is not None:
            y += bias.view(1, -1, 1, 1, 1).to(y.dtype)
        return y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable  # no second derivatives: refused, never silently wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = gw = gb = None
        if need_x:
            gx = torch.ops.fedmri.conv3d_forward(grad, weight, None, None, None, STRIDE, 0, 0.0)
        if need_w or (ctx.has_bias and need_b):
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[1]] if ctx.has_bias else None, [STRIDE] * 3,
                [1] * 3, [1] * 3, True, [1] * 3, 1, [False, need_w, ctx.has_bias and need_b])
        return gx, gw, gb


def conv_transpose3d(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv_transpose3d(x, weight, bias, stride=2, padding=1, output_padding=1): on our ops
    for CPU tensors, ATen's elsewhere."""
    if x.device.type != "cpu" or x.dim() != 5:
        return torch.nn.functional.conv_transpose3d(x, weight, bias, STRIDE, 1, 1)
    if weight.dim() != 5 or weight.shape[0] != x.shape[1] or weight.shape[2:] != (3, 3, 3):
        raise ValueError(f"fedmri.conv_transpose3d: weight of shape {list(weight.shape)} for "
                         f"an input of shape {list(x.shape)}: expected ({x.shape[1]}, "
                         "out channels, 3, 3, 3)")
    if bias is not None and bias.shape != (weight.shape[1],):
        raise ValueError(f"fedmri.conv_transpose3d: bias of shape {list(bias.shape)}, "
                         f"expected [{weight.shape[1]}]")
    load()
    return _ConvTranspose3d.apply(x.contiguous(), weight, bias)
