// What the CPU sources share: the depth-extended input of one sample as plane pointers, and
// the direct kernel for layers with very few channels (conv3d_cpu_direct.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "conv3d.h"

namespace fedmri {

// One sample's depth-extended input, NCDHW pieces; plane(c, z) for z relative to x's first
// plane, nullptr where the plane is padding.
template <typename P>
struct Planes {
  P lo, mid, hi;
  int64_t nlo, D, nhi, HW;
  P plane(int64_t c, int64_t z) const {
    if (z < 0) return z >= -nlo ? lo + (c * nlo + z + nlo) * HW : nullptr;
    if (z >= D) return z - D < nhi ? hi + (c * nhi + z - D) * HW : nullptr;
    return mid + (c * D + z) * HW;
  }
};

template <typename P>
Planes<P> sample(const Geometry& g, int64_t n, P lo, P mid, P hi) {
  const int64_t HW = g.H * g.W;
  return {lo ? lo + n * g.C * g.lo * HW : nullptr, mid + n * g.C * g.D * HW,
          hi ? hi + n * g.C * g.hi * HW : nullptr, g.lo, g.D, g.hi, HW};
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Stride 1, at most kDirectIn input and kDirectOut output channels (the network's 3-class
// output layer): oneDNN's kernels are far from the machine's speed on so few channels.
constexpr int64_t kDirectIn = 4, kDirectOut = 8;
inline bool direct_fits(const Geometry& g) {
  return g.s == 1 && g.C <= kDirectIn && g.Cout <= kDirectOut;
}

// y = conv(x, w) + bias, float32 NCDHW tensors; halos read in place.
at::Tensor forward_direct_cpu(const Geometry& g, const at::Tensor& x, const at::Tensor& w,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& lo,
                              const std::optional<at::Tensor>& hi);

}  // namespace fedmri
