// CUDA backend, host side: layout conversion, operand packing, and which kernel family runs
// (the families live in conv3d_cuda_*.cu, their launchers are declared in conv3d_cuda.cuh).
//
// Forward and input gradient are one GEMM shape: rows = positions of the result volume,
// columns = its channels, reduction = (kd, kh, kw, c) taps of the source volume, which is
// gathered on the fly (never materialised). The source and the result are each up to three
// depth pieces (halo below | slab | halo above) read and written in place; bias and
// activation are fused into the epilogue. float16/bfloat16 run on tensor cores: on Hopper
// (built for sm_90a) the forward takes the wgmma kernels (the strip kernel for k = 3,
// stride 1, else the generic one), elsewhere and for the input gradient WMMA 16x16x16 with a
// 3-stage cp.async pipeline. Layers with at most 4 input channels take a direct kernel, and
// float32 a plain SIMT path. The weight gradient is a split-reduction kernel (tensor cores for
// fp16/bf16) with float32 atomics across row slices. NCDHW tensors are converted with our own
// tiled transpose.

// The narrow ATen headers (not ATen/ATen.h): this file is the longest compile of the build.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <type_traits>

#include "conv3d.h"
#include "conv3d_cuda.cuh"
#include "forward_kernel.h"

namespace fedmri {
namespace cuda {
namespace {

// ---------------------------------------------------------------- layout conversion

// (N, C, S) <-> (N, S, Cp), S = D * H * W, through 32 x 32 shared-memory tiles so that both
// the reads and the writes are coalesced. To channels-last, channels C..Cp-1 are zero-filled
// (the padding the tensor-core kernels need); back, the first C of Cp channels are kept.
template <typename T, bool TO_CHANNELS_LAST>
__global__ void transpose_layout(const T* in, T* out, int C, int Cp, int64_t S) {
  __shared__ T tile[32][33];
  const int64_t n = blockIdx.z, s0 = (int64_t)blockIdx.x * 32;
  const int c0 = blockIdx.y * 32, tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int i = ty; i < 32; i += 8) {
    if (TO_CHANNELS_LAST) {  // read along S, one channel per row
      const int c = c0 + i;
      const int64_t s = s0 + tx;
      tile[i][tx] = c < C && s < S ? in[(n * C + c) * S + s] : from_float<T>(0.f);
    } else {  // read along channels, one position per row
      const int c = c0 + tx;
      const int64_t s = s0 + i;
      tile[i][tx] = c < C && s < S ? in[(n * S + s) * Cp + c] : from_float<T>(0.f);
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = ty; i < 32; i += 8) {
    if (TO_CHANNELS_LAST) {
      const int c = c0 + tx;
      const int64_t s = s0 + i;
      if (c < Cp && s < S) out[(n * S + s) * Cp + c] = tile[tx][i];
    } else {
      const int c = c0 + i;
      const int64_t s = s0 + tx;
      if (c < C && s < S) out[(n * C + c) * S + s] = tile[tx][i];
    }
  }
}

// ---------------------------------------------------------------- host side

template <typename T>
Slab<T> slab(T* lo, T* mid, T* hi, int nlo, int D, int nhi, int H, int W, int C) {
  return {lo, mid, hi, nlo, D, nhi, H, W, C};
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.numel() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename F>
void dispatch(at::ScalarType type, F f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "fedmri.conv3d on CUDA supports float32, float16 and bfloat16, got ", type);
  }
}

// Our transpose for a (N, C, D, H, W) contiguous tensor: `to_cl` gives channels-last with
// `channels` >= C lanes, else back to contiguous with `channels` <= C (ATen's strided copy
// reaches a fraction of the memory bandwidth on these shapes).
at::Tensor transposed(const at::Tensor& t, int64_t channels, bool to_cl) {
  const int64_t N = t.size(0), D = t.size(2), H = t.size(3), W = t.size(4), S = D * H * W;
  const int64_t C = to_cl ? t.size(1) : channels, Cp = to_cl ? channels : t.size(1);
  at::Tensor out = at::empty({N, channels, D, H, W}, t.options().memory_format(
      to_cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const dim3 grid((S + 31) / 32, ((to_cl ? Cp : C) + 31) / 32, N);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(t.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = reinterpret_cast<const T*>(t.data_ptr());
    T* o = reinterpret_cast<T*>(out.data_ptr());
    if (to_cl)
      transpose_layout<T, true><<<grid, dim3(32, 8), 0, stream>>>(in, o, C, Cp, S);
    else
      transpose_layout<T, false><<<grid, dim3(32, 8), 0, stream>>>(in, o, C, Cp, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

bool strictly(const at::Tensor& t, at::MemoryFormat format) {
  const at::MemoryFormat other = format == at::MemoryFormat::Contiguous
                                     ? at::MemoryFormat::ChannelsLast3d
                                     : at::MemoryFormat::Contiguous;
  return t.dim() == 5 && t.is_contiguous(format) && !t.is_contiguous(other) &&
         t.size(2) * t.size(3) * t.size(4) <= INT32_MAX;
}

// A channels-last result in `format`.
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat format) {
  if (format == at::MemoryFormat::Contiguous && strictly(t, at::MemoryFormat::ChannelsLast3d))
    return transposed(t, t.size(1), false);
  return t.contiguous(format);
}

// The tensor-core kernels read source channels 8 at a time: fp16/bf16 operands are zero-padded
// to a multiple of 8 channels (only the first layer, C = 1, and odd layers pay a copy).
int64_t lanes(int64_t channels, const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? channels : (channels + 7) / 8 * 8;
}

// Channels-last (N, C, D, H, W) with C zero-padded to `channels`.
at::Tensor channels_last(const at::Tensor& t, int64_t channels) {
  if (strictly(t, at::MemoryFormat::Contiguous)) return transposed(t, channels, true);
  const at::Tensor cl = t.contiguous(at::MemoryFormat::ChannelsLast3d);
  if (t.size(1) == channels) return cl;
  const at::Tensor ndhwc = cl.permute({0, 2, 3, 4, 1});
  return at::constant_pad_nd(ndhwc, {0, channels - t.size(1)}).permute({0, 4, 1, 2, 3});
}

at::Tensor cl_or_empty(const std::optional<at::Tensor>& t, const at::Tensor& like,
                       int64_t channels) {
  return t.has_value() ? channels_last(*t, channels) : at::empty({0}, like.options());
}

// The gathered input of forward and weight gradient: x and its halos, channels-last, channels
// padded to `C` lanes.
struct PaddedInput {
  int64_t C;
  at::Tensor x, lo, hi;
  template <typename T>
  Slab<const T> as_slab(const Geometry& g) const {
    return slab<const T>(ptr<T>(lo), ptr<T>(x), ptr<T>(hi), g.lo, g.D, g.hi, g.H, g.W, C);
  }
};

PaddedInput padded_input(const Geometry& g, const at::Tensor& x_in,
                         const std::optional<at::Tensor>& lo, const std::optional<at::Tensor>& hi,
                         int64_t C) {
  const at::Tensor x = channels_last(x_in, C);
  return {C, x, cl_or_empty(lo, x, C), cl_or_empty(hi, x, C)};
}

// Weight permuted to `order` with its last dimension zero-padded to `last`.
at::Tensor packed(const at::Tensor& w, at::IntArrayRef order, int64_t last) {
  const at::Tensor p = w.permute(order).contiguous();
  return p.size(4) == last ? p : at::constant_pad_nd(p, {0, last - p.size(4)});
}

// FEDMRI_CONV3D_KERNEL, read once: a process-wide setting (set it before the first call). Read
// by every forward, so that a wrong value fails on any GPU, not only where it would apply.
ForwardKernel forced_kernel() {
  static const ForwardKernel kernel = parse_forward_kernel(std::getenv("FEDMRI_CONV3D_KERNEL"));
  return kernel;
}

#if defined(FEDMRI_SM90A)
// The Hopper (compute capability 9.0) forward kernels; false where none applies.
template <typename T>
bool run_sm90(const Problem<T>& P, ForwardKernel force, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0 || force == ForwardKernel::kWmma) return false;
  const int bn = P.cols <= 32 ? 32 : P.cols <= 64 ? 64 : 128;
  // The strip kernel (k = 3, stride 1) for up to 32 result channels; from 64 on the generic
  // kernel measured faster (H200, 64->64 @64^3: 213 vs 188 TFLOP/s with 256-row tiles).
  const bool strip_fits = P.k == 3 && P.s == 1 && P.src.C % 32 == 0;
  const bool strip32 = force == ForwardKernel::kStrip32;
  if (strip_fits && (force == ForwardKernel::kStrip || strip32 ||
                     (force == ForwardKernel::kAuto && P.cols <= 32))) {
    const int Mpad = P.M / P.dst.W * (P.dst.W + 2);
    // 64 channels a stage where they divide, except for 64 columns: there 32 channels with
    // 6 stages measured faster than 64 with 3 (H200, 64->64 @64^3).
    const bool wide =
        P.src.C % 64 == 0 && !strip32 && (P.cols <= 32 || force == ForwardKernel::kStrip);
    cudaError_t err;
    if (P.cols <= 32) err = wide ? launch_wgmma_strip<T, 32, 64>(P, Mpad, stream)
                                 : launch_wgmma_strip<T, 32, 32>(P, Mpad, stream);
    else err = wide ? launch_wgmma_strip<T, 64, 64>(P, Mpad, stream)
                    : launch_wgmma_strip<T, 64, 32>(P, Mpad, stream);
    C10_CUDA_CHECK(err);
    return true;
  }
  // Generic wgmma: row tile 256 when that still gives every SM a tile, else 128 (the wgmma
  // knobs fix it).
  const bool l1_knob = force == ForwardKernel::kWgmmaL1 || force == ForwardKernel::kWgmma256L1;
  const bool forced256 = force == ForwardKernel::kWgmma256 || force == ForwardKernel::kWgmma256L1;
  const bool wgmma_knob = forced256 || l1_knob || force == ForwardKernel::kWgmma;
  const int64_t big_tiles = (P.M + 255) / 256 * ((P.cols + bn - 1) / bn);
  const bool rows256 = forced256 || (!wgmma_knob && big_tiles >= prop->multiProcessorCount);
  // Steps in near order with L1-cached source loads where the channels allow ("-l1" knobs),
  // except for 256 x 128 tiles, where it measured slower (H200, fp16 128->128 @32^3: 332 vs
  // 350 TFLOP/s; 64->64 @64^3 233 vs 223, 256->256 @16^3 319 vs 307).
  const bool near = P.src.C % BK == 0 &&
                    (l1_knob || (force == ForwardKernel::kAuto && !(rows256 && bn == 128)));
  const cudaError_t err = near ? launch_wgmma_generic<T, true>(P, bn, rows256, *prop, stream)
                               : launch_wgmma_generic<T, false>(P, bn, rows256, *prop, stream);
  C10_CUDA_CHECK(err);
  return true;
}
#endif

template <typename T, bool TRANSPOSED>
void run_igemm(const Problem<T>& P, ForwardKernel force, cudaStream_t stream) {
  if (P.M == 0 || P.cols == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    C10_CUDA_CHECK(launch_simt<TRANSPOSED>(P, stream));
  } else {
    TORCH_CHECK(P.src.C % 8 == 0, "fedmri.conv3d: internal: unpadded channels");
#if defined(FEDMRI_SM90A)
    if (!TRANSPOSED && run_sm90(P, force, stream)) return;
#endif
    const cudaError_t err = launch_wmma<T, TRANSPOSED>(P, stream);
    C10_CUDA_CHECK(err);
  }
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                        const std::optional<at::Tensor>& b_in,
                        const std::optional<at::Tensor>& lo_in,
                        const std::optional<at::Tensor>& hi_in, int64_t stride,
                        int64_t activation, double slope) {
  const Geometry g = describe(x_in, w_in, b_in, lo_in, hi_in, stride);
  const ForwardKernel force = forced_kernel();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool few = g.C <= FEW_CIN;  // direct kernel, channels unpadded
  const PaddedInput in = padded_input(g, x_in, lo_in, hi_in, few ? g.C : lanes(g.C, x_in));
  const int64_t C = in.C;
  const at::Tensor wp = packed(w_in, {0, 2, 3, 4, 1}, C);  // [Cout][kd][kh][kw][C]
  const at::Tensor bias = b_in.has_value() ? b_in->contiguous() : at::empty({0}, in.x.options());
  // The direct kernel writes either layout; the GEMM kernels write channels-last.
  const at::MemoryFormat format = result_format(x_in);
  const bool ncdhw = few && format == at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({g.N, g.Cout, g.Do, g.Ho, g.Wo},
                           in.x.options().memory_format(
                               ncdhw ? format : at::MemoryFormat::ChannelsLast3d));
  dispatch(in.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Problem<T> P{};
    P.src = in.as_slab<T>(g);
    P.dst = slab<T>(nullptr, ptr<T>(y), nullptr, 0, g.Do, 0, g.Ho, g.Wo, g.Cout);
    P.weight = ptr<T>(wp);
    P.bias = ptr<T>(bias);
    P.M = g.N * g.Do * g.Ho * g.Wo, P.cols = g.Cout, P.K = g.k * g.k * g.k * C;
    P.k = g.k, P.s = g.s, P.p = g.p, P.act = activation, P.slope = slope;
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (!few) return run_igemm<T, false>(P, force, stream);
    if (P.M == 0 || P.cols == 0) return;
    C10_CUDA_CHECK(launch_direct_few<T>(P, ncdhw, stream));
  });
  return in_format(y, format);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_input_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& lo_in, const std::optional<at::Tensor>& hi_in,
    int64_t stride) {
  const Geometry g = describe(x_in, w_in, std::nullopt, lo_in, hi_in, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto finish = [](const at::Tensor& t, const std::optional<at::Tensor>& like) {
    return like.has_value() ? in_format(t, result_format(*like)) : t;
  };
  const ForwardKernel force = forced_kernel();
  if (g.s == 1 && g.C >= 32 && force != ForwardKernel::kWmma) {
    // The gradient of [lo | x | hi] is the 'same' convolution of the output gradient, depth-
    // padded by the halo planes whose gradient is wanted, with the flipped kernel and the
    // channels swapped: the forward's kernels (strip / wgmma on Hopper) do it.
    const at::Tensor src =
        g.lo || g.hi ? at::constant_pad_nd(grad_in, {0, 0, 0, 0, g.lo, g.hi}) : grad_in;
    const at::Tensor ext = forward_cuda(src, w_in.flip({2, 3, 4}).transpose(0, 1), std::nullopt,
                                        std::nullopt, std::nullopt, 1, kNoActivation, 0.0);
    auto piece = [&](int64_t start, int64_t planes, const std::optional<at::Tensor>& like) {
      return like.has_value() ? finish(ext.narrow(2, start, planes), like)
                              : at::empty({0}, x_in.options());
    };
    return {piece(g.lo, g.D, x_in), piece(0, g.lo, lo_in), piece(g.lo + g.D, g.hi, hi_in)};
  }
  const int64_t Cout = lanes(g.Cout, x_in);
  const at::Tensor grad = channels_last(grad_in, Cout);
  const at::Tensor wt = packed(w_in, {1, 2, 3, 4, 0}, Cout);  // [C][kd][kh][kw][Cout]
  const auto cl = x_in.options().memory_format(at::MemoryFormat::ChannelsLast3d);
  at::Tensor gx = at::empty(x_in.sizes(), cl);
  at::Tensor glo = lo_in ? at::empty(lo_in->sizes(), cl) : at::empty({0}, x_in.options());
  at::Tensor ghi = hi_in ? at::empty(hi_in->sizes(), cl) : at::empty({0}, x_in.options());
  dispatch(x_in.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Problem<T> P{};
    P.src = slab<const T>(nullptr, ptr<T>(grad), nullptr, 0, g.Do, 0, g.Ho, g.Wo, Cout);
    P.dst = slab<T>(ptr<T>(glo), ptr<T>(gx), ptr<T>(ghi), g.lo, g.D, g.hi, g.H, g.W, g.C);
    P.weight = ptr<T>(wt);
    P.bias = nullptr;
    P.M = g.N * (g.lo + g.D + g.hi) * g.H * g.W, P.cols = g.C, P.K = g.k * g.k * g.k * Cout;
    P.k = g.k, P.s = g.s, P.p = g.p, P.act = kNoActivation, P.slope = 0.f;
    run_igemm<T, true>(P, force, at::cuda::getCurrentCUDAStream());
  });
  return {finish(gx, x_in), finish(glo, lo_in), finish(ghi, hi_in)};
}

std::tuple<at::Tensor, at::Tensor> backward_weight_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& lo_in, const std::optional<at::Tensor>& hi_in,
    int64_t stride) {
  const Geometry g = describe(x_in, w_in, std::nullopt, lo_in, hi_in, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PaddedInput in = padded_input(g, x_in, lo_in, hi_in, lanes(g.C, x_in));
  const int64_t C = in.C, Cout = lanes(g.Cout, x_in);
  const at::Tensor grad = channels_last(grad_in, Cout);
  const int K = g.k * g.k * g.k * C;
  at::Tensor acc = at::zeros({Cout, K}, in.x.options().dtype(at::kFloat));
  dispatch(in.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    Problem<T> P{};
    P.src = in.as_slab<T>(g);
    P.dst = slab<T>(nullptr, nullptr, nullptr, 0, g.Do, 0, g.Ho, g.Wo, Cout);  // row decode
    P.M = g.N * g.Do * g.Ho * g.Wo, P.cols = Cout, P.K = K;
    P.k = g.k, P.s = g.s, P.p = g.p;
    C10_CUDA_CHECK(launch_weight_grad<T>(P, ptr<T>(grad), acc.data_ptr<float>(),
                                         *at::cuda::getCurrentDeviceProperties(),
                                         at::cuda::getCurrentCUDAStream()));
  });
  // [Cout][kd][kh][kw][C] -> [Cout][C][kd][kh][kw]
  at::Tensor gw = acc.view({Cout, g.k, g.k, g.k, C}).permute({0, 4, 1, 2, 3})
                      .narrow(0, 0, g.Cout).narrow(1, 0, g.C)
                      .to(w_in.scalar_type()).contiguous();
  at::Tensor gb = grad_in.to(at::kFloat).sum({0, 2, 3, 4}).to(w_in.scalar_type());
  return {gw, gb};
}

}  // namespace
}  // namespace cuda
}  // namespace fedmri

TORCH_LIBRARY_IMPL(fedmri, CUDA, m) {
  m.impl("conv3d_forward", &fedmri::cuda::forward_cuda);
  m.impl("conv3d_backward_input", &fedmri::cuda::backward_input_cuda);
  m.impl("conv3d_backward_weight", &fedmri::cuda::backward_weight_cuda);
}
