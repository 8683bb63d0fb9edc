"""fedmri.kernels: the compiled 3D convolution (C++ on CPU, our CUDA kernels on GPU), one op.

`conv3d` is the functional op, `Conv3d` a drop-in nn.Conv3d, `use_fedmri_conv` swaps a model's
eligible convolutions. The library compiles on first use (`fedmri kernels build` ahead of time).
"""

from fedmri.kernels.layers import Conv3d, use_fedmri_conv
from fedmri.kernels.ops import conv3d, load

__all__ = ["Conv3d", "conv3d", "load", "use_fedmri_conv"]
