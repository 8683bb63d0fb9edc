// CPU backend.
//
// ATen's conv3d takes its single-threaded direct loop (aten::slow_conv3d) at batch 1. Here
// float32 (and float16/bfloat16, computed in float32) layers with very few channels take our
// direct kernel (conv3d_cpu_direct.cpp) and all others go to oneDNN at every batch size: the
// slab convolves with zero depth padding and the (at most two) output planes whose window
// reaches into a halo are recomputed from a k-plane slab gathered from the halo buffers.
// The input gradient at stride 1 is the forward convolution of the output gradient with the
// flipped, transposed kernel, so it takes the direct kernel or oneDNN as well. From batch 2
// without halos the weight gradient is ATen's own (oneDNN). float64, stride-2 input gradients
// and the other weight gradients use our own im2col over a few output planes at a time + one
// BLAS GEMM per chunk; the gather (at::parallel_for over rows) reads halo planes in place.
#include <ATen/Context.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "conv3d.h"
#include "conv3d_cpu.h"

namespace fedmri {

namespace {

// im2col buffer budget per chunk: small enough that the column matrix written by the
// gather is still in the core's cache when the GEMM reads it (a 64 MB chunk made both
// stream through memory, which two ranks sharing one memory bus felt twice).
constexpr int64_t kChunkBytes = 4 << 20;

// Rows of the column matrix: one per (input channel, kd, kh, kw).
inline int64_t taps(const Geometry& g) { return g.C * g.k * g.k * g.k; }

// Output columns [first, last) along W whose input column lies inside the image.
inline void valid_range(const Geometry& g, int64_t kw, int64_t* first, int64_t* last) {
  *first = std::max<int64_t>(0, (g.p - kw + g.s - 1) / g.s);
  *last = std::min<int64_t>(g.Wo, (g.W - 1 + g.p - kw) / g.s + 1);
}

// Row r = (c, kd, kh, kw) of the column matrix, for output rows [q0, q1) (q = od * Ho + oh:
// a chunk may start and end inside a plane).
template <typename Visit>
void for_each_tap(const Geometry& g, int64_t r, int64_t q0, int64_t q1, Visit visit) {
  const int64_t k3 = g.k * g.k * g.k;
  const int64_t c = r / k3, kd = r / (g.k * g.k) % g.k, kh = r / g.k % g.k, kw = r % g.k;
  int64_t first, last;
  valid_range(g, kw, &first, &last);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t od = q / g.Ho, oh = q % g.Ho;
    const int64_t ih = oh * g.s - g.p + kh;
    visit(c, od * g.s - g.p + kd, ih >= 0 && ih < g.H ? ih : -1, first, last, kw,
          (q - q0) * g.Wo);
  }
}

template <typename T>
void im2col(const Geometry& g, const Planes<const T*>& in, int64_t q0, int64_t q1, T* col) {
  const int64_t P = (q1 - q0) * g.Wo;
  at::parallel_for(0, taps(g), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* out = col + r * P;
      for_each_tap(g, r, q0, q1, [&](int64_t c, int64_t z, int64_t ih, int64_t first,
                                         int64_t last, int64_t kw, int64_t o) {
        T* dst = out + o;
        const T* plane = in.plane(c, z);
        if (!plane || ih < 0 || first >= last) {
          std::fill(dst, dst + g.Wo, T(0));
          return;
        }
        const T* row = plane + ih * g.W;
        const int64_t shift = kw - g.p;  // output column ow reads input column ow*s + shift
        std::fill(dst, dst + first, T(0));
        if (g.s == 1) {
          std::memcpy(dst + first, row + first + shift, (last - first) * sizeof(T));
        } else {
          for (int64_t ow = first; ow < last; ++ow) dst[ow] = row[ow * g.s + shift];
        }
        std::fill(dst + last, dst + g.Wo, T(0));
      });
    }
  });
}

// Scatter-add of a column matrix back onto the planes; rows of one channel touch only that
// channel's planes, so channels run in parallel without races.
template <typename T>
void col2im(const Geometry& g, const T* col, int64_t q0, int64_t q1, const Planes<T*>& out) {
  const int64_t P = (q1 - q0) * g.Wo, k3 = g.k * g.k * g.k;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t r = c0 * k3; r < c1 * k3; ++r) {
      const T* src = col + r * P;
      for_each_tap(g, r, q0, q1, [&](int64_t c, int64_t z, int64_t ih, int64_t first,
                                         int64_t last, int64_t kw, int64_t o) {
        T* plane = out.plane(c, z);
        if (!plane || ih < 0) return;
        T* row = plane + ih * g.W;
        const int64_t shift = kw - g.p;
        for (int64_t ow = first; ow < last; ++ow) row[ow * g.s + shift] += src[o + ow];
      });
    }
  });
}

// im2col of sample n's output rows [q0, q1), reading x and its halos in place.
template <typename T>
void im2col_sample(const Geometry& g, const at::Tensor& x, const std::optional<at::Tensor>& lo,
                   const std::optional<at::Tensor>& hi, int64_t n, int64_t q0, int64_t q1,
                   const at::Tensor& col) {
  im2col<T>(g, sample<const T*>(g, n, data_or_null<T>(lo), x.data_ptr<T>(), data_or_null<T>(hi)),
            q0, q1, col.data_ptr<T>());
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor prepared(const at::Tensor& t, at::ScalarType type) {
  return t.to(type).contiguous();
}

std::optional<at::Tensor> prepared(const std::optional<at::Tensor>& t, at::ScalarType type) {
  if (!t.has_value()) return std::nullopt;
  return prepared(*t, type);
}

// Output rows (of Wo voxels) per chunk so that one im2col buffer stays within kChunkBytes
// (at most the sample's Do * Ho rows).
int64_t rows_per_chunk(const Geometry& g, int64_t elem) {
  const int64_t fit = kChunkBytes / std::max<int64_t>(1, taps(g) * g.Wo * elem);
  return std::clamp<int64_t>(fit, 1, std::max<int64_t>(1, g.Do * g.Ho));
}

// Calls fn(n, q0, q1, col) for every chunk of output rows [q0, q1) of every sample, col the
// (taps, (q1 - q0) * Wo) view of the buffer that im2col fills.
template <typename T, typename Fn>
void for_each_chunk(const Geometry& g, const at::Tensor& col_buffer, Fn fn) {
  const int64_t step = rows_per_chunk(g, sizeof(T)), rows = g.Do * g.Ho;
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t q0 = 0; q0 < rows; q0 += step) {
      const int64_t q1 = std::min(rows, q0 + step);
      const int64_t P = (q1 - q0) * g.Wo;
      fn(n, q0, q1, col_buffer.flatten().narrow(0, 0, taps(g) * P).view({taps(g), P}));
    }
  }
}

at::Tensor column_buffer(const Geometry& g, at::ScalarType type) {
  return at::empty({taps(g) * rows_per_chunk(g, at::elementSize(type)) * g.Wo},
                   at::TensorOptions(type));
}

// The (Cout, P) block of sample n's output (or output gradient) for output rows [q0, q1).
at::Tensor block(const at::Tensor& y, const Geometry& g, int64_t n, int64_t q0, int64_t q1) {
  return y[n].view({g.Cout, g.Do * g.Ho * g.Wo}).narrow(1, q0 * g.Wo, (q1 - q0) * g.Wo);
}

bool use_onednn(const at::Tensor& x) {
  return x.scalar_type() != at::kDouble && at::hasMKLDNN();
}

// Input plane z (relative to x's first plane) of every sample, zeros where it is padding.
at::Tensor plane_or_zeros(const Geometry& g, const at::Tensor& x,
                          const std::optional<at::Tensor>& lo,
                          const std::optional<at::Tensor>& hi, int64_t z) {
  if (z >= 0 && z < g.D) return x.narrow(2, z, 1);
  if (z < 0 && lo.has_value()) return lo->narrow(2, z + g.p, 1);
  if (z >= g.D && hi.has_value()) return hi->narrow(2, z - g.D, 1);
  return at::zeros({g.N, g.C, 1, g.H, g.W}, x.options());
}

at::Tensor forward_onednn(const Geometry& g, const at::Tensor& x_in, const at::Tensor& w,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& lo,
                          const std::optional<at::Tensor>& hi) {
  // oneDNN's NCDHW kernel for output channels that are not a multiple of 8 was about 2.5x
  // slower than its channels-last one at batch 1 and 2 (3->3 channels at 64^3 and 96^3,
  // conversions included; that layer now takes the direct kernel), so such layers take the
  // channels-last detour. Every other layer makes the very call ATen makes from batch 2 on.
  const at::Tensor x = g.Cout % 8 && x_in.suggest_memory_format() == at::MemoryFormat::Contiguous
                           ? x_in.contiguous(at::MemoryFormat::ChannelsLast3d)
                           : x_in;
  at::Tensor y = at::mkldnn_convolution(x, w, bias, {g.p, g.p, g.p}, {g.s, g.s, g.s},
                                        {1, 1, 1}, 1);
  // Output planes whose window reaches a halo plane: 0 (below) and Do-1 (above, if it reads
  // plane D). Each is one valid convolution over its k input planes.
  std::vector<int64_t> redo;
  if (g.lo) redo.push_back(0);
  if (g.hi && (g.Do - 1) * g.s + g.p >= g.D && (redo.empty() || g.Do > 1)) redo.push_back(g.Do - 1);
  for (int64_t od : redo) {
    std::vector<at::Tensor> planes;
    for (int64_t kd = 0; kd < g.k; ++kd) planes.push_back(plane_or_zeros(g, x, lo, hi, od * g.s - g.p + kd));
    at::Tensor slab = at::cat(planes, 2).contiguous(x.suggest_memory_format());
    y.narrow(2, od, 1).copy_(at::mkldnn_convolution(slab, w, bias, {0, g.p, g.p},
                                                    {1, g.s, g.s}, {1, 1, 1}, 1));
  }
  return y;
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                       const std::optional<at::Tensor>& b_in,
                       const std::optional<at::Tensor>& lo_in,
                       const std::optional<at::Tensor>& hi_in, int64_t stride,
                       int64_t activation, double slope) {
  const Geometry g = describe(x_in, w_in, b_in, lo_in, hi_in, stride);
  const auto type = compute_type(x_in);
  const auto bias = prepared(b_in, type);
  auto finish = [&](at::Tensor y) {  // activation, then the caller's dtype and layout
    if (activation == kRelu) at::relu_(y);
    if (activation == kLeakyRelu) at::leaky_relu_(y, slope);
    return y.to(x_in.scalar_type()).contiguous(result_format(x_in));
  };
  if (type == at::kFloat && direct_fits(g)) {
    return finish(forward_direct_cpu(g, prepared(x_in, type), prepared(w_in, type), bias,
                                     prepared(lo_in, type), prepared(hi_in, type)));
  }
  if (use_onednn(x_in)) {
    auto keep = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
      if (!t.has_value()) return std::nullopt;
      return t->to(type);
    };
    return finish(forward_onednn(g, x_in.to(type), w_in.to(type).contiguous(), bias,
                                 keep(lo_in), keep(hi_in)));
  }
  const at::Tensor x = prepared(x_in, type);
  const at::Tensor w = prepared(w_in, type).view({g.Cout, -1});
  const auto lo = prepared(lo_in, type), hi = prepared(hi_in, type);
  at::Tensor y = at::empty({g.N, g.Cout, g.Do, g.Ho, g.Wo}, x.options());
  const at::Tensor col = column_buffer(g, type);
  AT_DISPATCH_FLOATING_TYPES(type, "fedmri_conv3d_forward_cpu", [&] {
    for_each_chunk<scalar_t>(g, col, [&](int64_t n, int64_t q0, int64_t q1, at::Tensor c) {
      im2col_sample<scalar_t>(g, x, lo, hi, n, q0, q1, c);
      at::Tensor out = block(y, g, n, q0, q1);
      if (bias.has_value()) {
        at::addmm_out(out, bias->view({g.Cout, 1}), w, c);
      } else {
        at::mm_out(out, w, c);
      }
    });
  });
  return finish(y);
}

// Stride 1: the input gradient is the 'same' convolution of the output gradient with the
// flipped kernel, channels swapped. A halo plane's gradient comes from the few output planes
// whose windows reach it: one small convolution over those planes each side, so the slab's
// own gradient is written in place (padding the whole output gradient by the halo planes and
// cutting the result apart cost two full copies per layer on every split rank).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_input_onednn(
    const Geometry& g, const at::Tensor& grad, const at::Tensor& x,
    const at::Tensor& w, const std::optional<at::Tensor>& lo,
    const std::optional<at::Tensor>& hi) {
  const at::Tensor wt = w.to(at::kFloat).flip({2, 3, 4}).transpose(0, 1).contiguous();
  const at::Tensor gf = grad.to(at::kFloat);
  const auto fmt = grad.suggest_memory_format();
  auto flipped_same = [&](const at::Tensor& planes) {  // any depth, zero 'same' padding
    Geometry f = g;  // the same convolution seen from the output gradient
    f.C = g.Cout, f.Cout = g.C, f.lo = f.hi = 0;
    f.D = f.Do = planes.size(2);
    if (direct_fits(f)) {
      return forward_direct_cpu(f, planes.contiguous(), wt, std::nullopt, std::nullopt,
                                std::nullopt);
    }
    return at::mkldnn_convolution(planes.contiguous(fmt), wt, std::nullopt, {g.p, g.p, g.p},
                                  {1, 1, 1}, {1, 1, 1}, 1);
  };
  // Gradient of the input planes [first, first + count) outside the slab: the output
  // gradient's planes [first - p, first + count + p), zeros outside the slab, convolved.
  auto halo_grad = [&](int64_t first, int64_t count, const at::Tensor& like) {
    const int64_t a = first - g.p, b = first + count + g.p;
    const int64_t a_in = std::max<int64_t>(a, 0), b_in = std::min<int64_t>(b, g.D);
    const at::Tensor window = at::constant_pad_nd(gf.narrow(2, a_in, b_in - a_in),
                                                  {0, 0, 0, 0, a_in - a, b - b_in});
    return flipped_same(window).narrow(2, g.p, count).to(x.scalar_type())
        .clone(result_format(like));
  };
  auto none = [&] { return at::empty({0}, x.options()); };  // distinct: outputs never alias
  return {flipped_same(gf).to(x.scalar_type()).contiguous(result_format(x)),
          lo ? halo_grad(-g.lo, g.lo, *lo) : none(),
          hi ? halo_grad(g.D, g.hi, *hi) : none()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_input_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& lo_in, const std::optional<at::Tensor>& hi_in,
    int64_t stride) {
  const Geometry g = describe(x_in, w_in, std::nullopt, lo_in, hi_in, stride);
  const auto type = compute_type(x_in);
  if (use_onednn(x_in) && g.s == 1) return backward_input_onednn(g, grad_in, x_in, w_in, lo_in, hi_in);
  const at::Tensor grad = prepared(grad_in, type);
  const at::Tensor wt = prepared(w_in, type).view({g.Cout, -1}).t();
  at::Tensor gx = at::zeros(x_in.sizes(), x_in.options().dtype(type));
  auto zeros_or_empty = [&](const std::optional<at::Tensor>& h) {
    return h.has_value() ? at::zeros(h->sizes(), gx.options()) : at::empty({0}, gx.options());
  };
  at::Tensor glo = zeros_or_empty(lo_in), ghi = zeros_or_empty(hi_in);
  const at::Tensor col = column_buffer(g, type);
  AT_DISPATCH_FLOATING_TYPES(type, "fedmri_conv3d_backward_input_cpu", [&] {
    for_each_chunk<scalar_t>(g, col, [&](int64_t n, int64_t q0, int64_t q1, at::Tensor c) {
      at::mm_out(c, wt, block(grad, g, n, q0, q1));
      col2im<scalar_t>(g, c.data_ptr<scalar_t>(), q0, q1,
                       sample<scalar_t*>(g, n, lo_in ? glo.data_ptr<scalar_t>() : nullptr,
                                         gx.data_ptr<scalar_t>(),
                                         hi_in ? ghi.data_ptr<scalar_t>() : nullptr));
    });
  });
  auto finish = [&](const at::Tensor& t, const std::optional<at::Tensor>& like) {
    if (!like.has_value()) return t.to(x_in.scalar_type());
    return t.to(x_in.scalar_type()).contiguous(result_format(*like));
  };
  return {finish(gx, x_in), finish(glo, lo_in), finish(ghi, hi_in)};
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& lo_in, const std::optional<at::Tensor>& hi_in,
    int64_t stride) {
  const Geometry g = describe(x_in, w_in, std::nullopt, lo_in, hi_in, stride);
  const auto type = compute_type(x_in);
  if (use_onednn(x_in) && g.N >= 2 && !lo_in && !hi_in) {
    // From batch 2, without halos, ATen's own weight gradient (oneDNN) took 27 ms over the
    // network's 64^3 layers against 44 ms for our im2col + GEMM (at batch 1 ATen takes its
    // slow loop, and with halos it cannot be asked).
    const at::Tensor w = w_in.to(type);
    auto [unused, gw, gb] = at::convolution_backward(
        grad_in.to(type), x_in.to(type), w, c10::IntArrayRef{g.Cout}, {g.s, g.s, g.s},
        {g.p, g.p, g.p}, {1, 1, 1}, false, {0, 0, 0}, 1, {false, true, true});
    return {gw.to(w_in.scalar_type()).contiguous(), gb.to(w_in.scalar_type())};
  }
  const at::Tensor grad = prepared(grad_in, type);
  const at::Tensor x = prepared(x_in, type);
  const auto lo = prepared(lo_in, type), hi = prepared(hi_in, type);
  at::Tensor gw = at::zeros({g.Cout, taps(g)}, x.options());
  const at::Tensor col = column_buffer(g, type);
  AT_DISPATCH_FLOATING_TYPES(type, "fedmri_conv3d_backward_weight_cpu", [&] {
    for_each_chunk<scalar_t>(g, col, [&](int64_t n, int64_t q0, int64_t q1, at::Tensor c) {
      im2col_sample<scalar_t>(g, x, lo, hi, n, q0, q1, c);
      gw.addmm_(block(grad, g, n, q0, q1), c.t());
    });
  });
  const at::Tensor gb = grad.sum({0, 2, 3, 4});
  return {gw.view(w_in.sizes()).to(w_in.scalar_type()), gb.to(w_in.scalar_type())};
}

}  // namespace

}  // namespace fedmri

TORCH_LIBRARY_IMPL(fedmri, CPU, m) {
  m.impl("conv3d_forward", &fedmri::forward_cpu);
  m.impl("conv3d_backward_input", &fedmri::backward_input_cpu);
  m.impl("conv3d_backward_weight", &fedmri::backward_weight_cpu);
}
