// fedmri 3D convolution with depth halos: what the CPU and CUDA backends share.
//
// The input of one sample is a depth slab `x` plus, optionally, k/2 planes on each side
// (`halo_lo`, `halo_hi`) owned by neighbouring processes. The convolution sees the
// concatenation [halo_lo | x | halo_hi] in depth (zeros where a halo is absent) and zero
// padding in height and width, but nothing is ever concatenated: kernels read the planes
// from their own buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "conv3d_activation.h"

namespace fedmri {

struct Geometry {
  int64_t N, C, D, H, W;     // input slab
  int64_t Cout, k, s, p;     // kernel size k (odd), stride s, padding p = k / 2
  int64_t lo, hi;            // halo planes present below / above the slab (p or 0)
  int64_t Do, Ho, Wo;        // output
};

// Validates every argument (names the tensor and the expected shape) and returns the geometry.
Geometry describe(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& halo_lo,
                  const std::optional<at::Tensor>& halo_hi, int64_t stride);

// The layout results are returned in: channels-last-3d when x is (strictly) channels-last.
at::MemoryFormat result_format(const at::Tensor& x);

}  // namespace fedmri
