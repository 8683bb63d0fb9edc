// CUDA backend, what the kernel families share: the problem (source and result volumes kept
// as up to three depth pieces, channels-last), the on-the-fly gather of the source operand,
// cp.async copies, tile constants and the epilogue stores. At the end, the launchers each
// family file defines (and explicitly instantiates) for the host dispatch in conv3d_cuda.cu:
//   conv3d_cuda_wmma.cu   tensor cores through WMMA (the input gradient, and the forward
//                         where no wgmma kernel runs)
//   conv3d_cuda_wgmma.cu  Hopper wgmma forward kernels (compiled in for sm_90a only)
//   conv3d_cuda_simt.cu   CUDA cores: float32 implicit GEMM, few-input-channel forward
//   conv3d_cuda_wgrad.cu  weight gradient
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "conv3d_activation.h"

// A named namespace (not an anonymous one): the launchers take these types across files.
namespace fedmri {
namespace cuda {

// A channels-last volume kept as up to three depth pieces (lo | mid | hi).
template <typename T>
struct Slab {
  T* lo;
  T* mid;
  T* hi;
  int nlo, D, nhi, H, W, C;
  // Start of the channel vector at (n, z, h, w), z relative to mid's first plane.
  __device__ __forceinline__ T* at(int n, int z, int h, int w) const {
    T* base = mid;
    int planes = D;
    if (z < 0) {
      base = lo, planes = nlo, z += nlo;
    } else if (z >= D) {
      base = hi, planes = nhi, z -= D;
    }
    return base + ((((int64_t)n * planes + z) * H + h) * W + w) * (int64_t)C;
  }
  __device__ __forceinline__ bool holds(int z, int h, int w) const {
    return z >= -nlo && z < D + nhi && h >= 0 && h < H && w >= 0 && w < W;
  }
};

template <typename T>
struct Problem {
  Slab<const T> src;   // gathered operand
  Slab<T> dst;         // result, rows = (n, z, h, w) over dst's pieces
  const T* weight;     // [cols][K], K ordered (kd, kh, kw, c)
  const T* bias;       // [cols] or nullptr
  int M, cols, K;      // GEMM sizes
  int k, s, p;
  int act;
  float slope;
};

// Result row m -> (n, z, h, w) of dst.
template <typename T>
__device__ __forceinline__ void decode(const Problem<T>& P, int m, int& n, int& z, int& h,
                                       int& w) {
  const Slab<T>& d = P.dst;
  w = m % d.W;
  m /= d.W;
  h = m % d.H;
  m /= d.H;
  const int planes = d.nlo + d.D + d.nhi;
  z = m % planes - d.nlo;
  n = m / planes;
}

// Source position for result (z, h, w) and tap (kd, kh, kw); false where it is padding.
// Forward: in = out * s - p + k. Transposed (input gradient): out = (in + p - k) / s.
template <bool TRANSPOSED>
__device__ __forceinline__ bool source(int s, int p, int o, int k, int& i) {
  if (!TRANSPOSED) {
    i = o * s - p + k;
    return true;
  }
  const int num = o + p - k;  // s is 1 or 2: no division
  if (num < 0 || (num & (s - 1))) return false;
  i = num >> (s - 1);
  return true;
}

// Result row m += step without divisions (rows walked in order; any step, any sizes).
template <typename T>
__device__ __forceinline__ void advance_row(const Problem<T>& P, int& n, int& z, int& h, int& w,
                                            int step) {
  const Slab<T>& d = P.dst;
  w += step;
  while (w >= d.W) {
    w -= d.W;
    if (++h == d.H) {
      h = 0;
      if (++z == d.D + d.nhi) z = -d.nlo, ++n;
    }
  }
}

// Reduction index kk = ((kd * k + kh) * k + kw) * Cs + c, kept as its parts.
struct Tap {
  int kd, kh, kw, c;
};

template <typename T>
__device__ __forceinline__ Tap tap_of(const Problem<T>& P, int kk) {
  const int tap = kk / P.src.C;
  return {tap / (P.k * P.k), tap / P.k % P.k, tap % P.k, kk - tap * P.src.C};
}

// kk += step without divisions: each thread walks its reduction indices in order.
template <typename T>
__device__ __forceinline__ void advance(const Problem<T>& P, Tap& t, int step) {
  t.c += step;
  while (t.c >= P.src.C) {
    t.c -= P.src.C;
    if (++t.kw == P.k) {
      t.kw = 0;
      if (++t.kh == P.k) t.kh = 0, ++t.kd;
    }
  }
}

// The source value for result (n, z, h, w) and tap t; nullptr where it is padding
// (or past the reduction: t.kd == k).
template <bool TRANSPOSED, typename T>
__device__ __forceinline__ const T* gather(const Problem<T>& P, int n, int z, int h, int w,
                                           const Tap& t) {
  int zi, hi, wi;
  if (t.kd >= P.k || !source<TRANSPOSED>(P.s, P.p, z, t.kd, zi) ||
      !source<TRANSPOSED>(P.s, P.p, h, t.kh, hi) || !source<TRANSPOSED>(P.s, P.p, w, t.kw, wi) ||
      !P.src.holds(zi, hi, wi))
    return nullptr;
  return P.src.at(n, zi, hi, wi) + t.c;
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float activate(float v, int act, float slope) {
  if (act == kRelu) return v > 0.f ? v : 0.f;
  if (act == kLeakyRelu) return v > 0.f ? v : v * slope;
  return v;
}

// ---------------------------------------------------------------- staged tiles (cp.async)

constexpr int BM = 128, BK = 64, STAGES = 3, THREADS = 256, LDS = BK + 8;
constexpr int CHUNKS = BK / 8;  // 16-byte pieces per tile row

// 16-byte copy global -> shared, zero-filled where !valid. L1: also keep the line in L1
// (cp.async.ca) for loads that neighbouring steps read again; otherwise L2 only (.cg).
template <bool L1 = false>
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (L1)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(valid ? 16 : 0));
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Result position of one tile row, decoded once per block (n < 0: past the last row).
struct RowPos {
  int n, z, h, w;
};

// Shared-memory tile layouts (offsets in elements of the 16-byte chunk `chunk` of row r):
// WMMA reads rows padded to LDS elements; wgmma 128-byte-swizzled rows (SwizzledRows).
struct PaddedRows {
  static __device__ __forceinline__ int at(int r, int chunk) { return r * LDS + chunk * 8; }
};

// B rows of one stage: this thread's 16-byte chunk of reduction index kk for each of its
// columns of the packed weights (zeros past the columns or the reduction).
template <typename T, int BN, typename Layout>
__device__ __forceinline__ void load_weights(const Problem<T>& P, T* Bs, int n0, int kk) {
  const int chunk = threadIdx.x % CHUNKS;
#pragma unroll
  for (int r = threadIdx.x / CHUNKS; r < BN; r += THREADS / CHUNKS) {
    const int col = n0 + r;
    const bool ok = col < P.cols && kk < P.K;
    cp_async16(Bs + Layout::at(r, chunk), ok ? P.weight + (int64_t)col * P.K + kk : P.weight,
               ok);
  }
}

// Bias + activation (float32) on 8 consecutive channels of result row m, then one 16-byte
// store where the channels allow.
template <typename T>
__device__ __forceinline__ void store8_at(const Problem<T>& P, T* out, int col, const float* x) {
  alignas(16) T v[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const float b = P.bias && col + q < P.cols ? to_float(P.bias[col + q]) : 0.f;
    v[q] = from_float<T>(activate(x[q] + b, P.act, P.slope));
  }
  constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte store
  if (col + 8 <= P.cols && P.cols % VEC == 0) {
#pragma unroll
    for (int q = 0; q < 8; q += VEC)
      *reinterpret_cast<uint4*>(out + col + q) = *reinterpret_cast<const uint4*>(v + q);
  } else {
    for (int q = 0; q < 8 && col + q < P.cols; ++q) out[col + q] = v[q];
  }
}

// The same for result row m.
template <typename T>
__device__ __forceinline__ void store8(const Problem<T>& P, int m, int col, const float* x) {
  int n, z, h, w;
  decode(P, m, n, z, h, w);
  store8_at(P, P.dst.at(n, z, h, w), col, x);
}

// Forward of layers with at most FEW_CIN input channels: FEW_COUT output channels a thread.
constexpr int FEW_CIN = 4, FEW_COUT = 32;

// ---------------------------------------------------------------- launchers
// T: float, __half or __nv_bfloat16 unless said otherwise. Each returns the first CUDA error
// of its launch (the dispatch checks it), so that kernel files need no torch headers.

// Allows `kernel` `bytes` of dynamic shared memory.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Tensor-core implicit GEMM through WMMA (__half, __nv_bfloat16; source channels a multiple
// of 8); the column tile is the narrowest of 32, 64, 128 that holds P.cols (or 128).
template <typename T, bool TRANSPOSED>
cudaError_t launch_wmma(const Problem<T>& P, cudaStream_t stream);

// Hopper wgmma kernels (__half, __nv_bfloat16; defined only in sm_90a builds, FEDMRI_SM90A).
// The generic one for `bn` (32, 64 or 128) columns, 128- or 256-row tiles, steps in near
// order (NEAR: source channels a multiple of BK; `device`'s shared memory per SM sizes the L1
// carve-out)...
template <typename T, bool NEAR>
cudaError_t launch_wgmma_generic(const Problem<T>& P, int bn, bool rows256,
                                 const cudaDeviceProp& device, cudaStream_t stream);
// ... and the strip kernel for k = 3, stride 1 (BN 32 or 64 columns, BK 32 or 64 channels a
// step; source channels a multiple of BK) over the `Mpad` rows of the width-padded result.
template <typename T, int BN, int BK>
cudaError_t launch_wgmma_strip(const Problem<T>& P, int Mpad, cudaStream_t stream);

// float32 implicit GEMM, one thread per result element.
template <bool TRANSPOSED>
cudaError_t launch_simt(const Problem<float>& P, cudaStream_t stream);
// Forward with at most FEW_CIN (unpadded) input channels; `ncdhw`: P.dst.mid is an
// (N, C, D, H, W) contiguous result instead of channels-last.
template <typename T>
cudaError_t launch_direct_few(const Problem<T>& P, bool ncdhw, cudaStream_t stream);

// Weight gradient: out[P.cols][P.K] (float32, zeroed) += grad^T x gathered source, where grad
// is the channels-last output gradient with P.cols channels (padded to 8 for __half and
// __nv_bfloat16, like the source); row slices enough to fill `device`'s SMs.
template <typename T>
cudaError_t launch_weight_grad(const Problem<T>& P, const T* grad, float* out,
                               const cudaDeviceProp& device, cudaStream_t stream);

}  // namespace cuda
}  // namespace fedmri
