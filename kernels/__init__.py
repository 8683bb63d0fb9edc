"""fedmri.kernels: the compiled 3D convolution (C++ on CPU, our CUDA kernels on GPU), one op.

`conv3d` is the functional op, `Conv3d` a drop-in nn.Conv3d, `conv_transpose3d` and
`ConvTranspose3d` the U-Nets' upsampling on the same ops (CPU), `use_fedmri_conv` swaps a
model's eligible layers. The library compiles on first use (`fedmri kernels build` ahead of time).
"""

from fedmri.kernels.layers import Conv3d, ConvTranspose3d, use_fedmri_conv
from fedmri.kernels.ops import conv3d, load
from fedmri.kernels.transposed import conv_transpose3d

__all__ = ["Conv3d", "ConvTranspose3d", "conv3d", "conv_transpose3d", "load",
           "use_fedmri_conv"]
