// CUDA backend, CUDA cores (no tensor cores): the float32 implicit GEMM (forward and input
// gradient) and the direct forward of layers with at most FEW_CIN input channels.
#include "conv3d_cuda.cuh"

namespace fedmri {
namespace cuda {
namespace {

// ---------------------------------------------------------------- float32

// Bias + activation on one result element, and the store.
template <typename T>
__device__ __forceinline__ void store(const Problem<T>& P, int m, int col, float acc) {
  int n, z, h, w;
  decode(P, m, n, z, h, w);
  if (P.bias) acc += to_float(P.bias[col]);
  P.dst.at(n, z, h, w)[col] = from_float<T>(activate(acc, P.act, P.slope));
}

// One thread per result element; a warp covers consecutive channels of one row, so the
// gathered source values are shared through the cache.
template <bool TRANSPOSED>
__global__ void igemm_simt(const Problem<float> P) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= (int64_t)P.M * P.cols) return;
  const int m = static_cast<int>(idx / P.cols), col = static_cast<int>(idx % P.cols);
  int n, z, h, w;
  decode(P, m, n, z, h, w);
  const float* wrow = P.weight + (int64_t)col * P.K;
  float acc = 0.f;
  for (int kk0 = 0; kk0 < P.K; kk0 += P.src.C) {  // one tap at a time
    const float* base = gather<TRANSPOSED>(P, n, z, h, w, tap_of(P, kk0));
    if (!base) continue;
    for (int c = 0; c < P.src.C; ++c) acc += base[c] * wrow[kk0 + c];
  }
  store(P, m, col, acc);
}

// ---------------------------------------------------------------- few input channels

// Forward of layers with at most 4 input channels (the network's first layer). A GEMM would
// pad every tap to 8 channels and waste most of its work, so here each thread convolves one
// result position for 32 output channels directly (the chunk's weights in shared memory,
// float32 accumulation); neighbouring threads share the source values through the cache.

template <typename T, bool NCDHW>
__global__ void __launch_bounds__(256) direct_few(const Problem<T> P) {
  __shared__ __align__(16) float ws[27 * FEW_CIN * FEW_COUT];  // [tap][c][co]
  const int co0 = blockIdx.y * FEW_COUT, C = P.src.C;
  for (int i = threadIdx.x; i < P.K * FEW_COUT; i += blockDim.x) {
    const int co = co0 + i % FEW_COUT, kk = i / FEW_COUT;  // kk = tap * C + c
    ws[i] = co < P.cols ? to_float(P.weight[(int64_t)co * P.K + kk]) : 0.f;
  }
  __syncthreads();
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= P.M) return;
  int n, z, h, w;
  decode(P, m, n, z, h, w);
  float acc[FEW_COUT] = {};
  const float4* wv = reinterpret_cast<const float4*>(ws);
  for (int kd = 0; kd < P.k; ++kd)
    for (int kh = 0; kh < P.k; ++kh)
      for (int kw = 0; kw < P.k; ++kw, wv += C * FEW_COUT / 4) {
        const T* src = gather<false>(P, n, z, h, w, Tap{kd, kh, kw, 0});
        if (!src) continue;
        for (int c = 0; c < C; ++c) {
          const float v = to_float(src[c]);
#pragma unroll
          for (int q = 0; q < FEW_COUT / 4; ++q) {
            const float4 w4 = wv[c * FEW_COUT / 4 + q];
            acc[4 * q] += v * w4.x, acc[4 * q + 1] += v * w4.y;
            acc[4 * q + 2] += v * w4.z, acc[4 * q + 3] += v * w4.w;
          }
        }
      }
  if (!NCDHW) {
#pragma unroll
    for (int q = 0; q < FEW_COUT; q += 8)
      if (co0 + q < P.cols) store8(P, m, co0 + q, acc + q);
    return;
  }
  // (N, C, D, H, W) result written in place: a warp's stores of one channel are contiguous.
  const int64_t volume = (int64_t)P.dst.D * P.dst.H * P.dst.W;
  T* out = P.dst.mid + ((int64_t)n * P.cols + co0) * volume + ((int64_t)z * P.dst.H + h) * P.dst.W + w;
#pragma unroll
  for (int q = 0; q < FEW_COUT; ++q)
    if (co0 + q < P.cols) {
      const float b = P.bias ? to_float(P.bias[co0 + q]) : 0.f;
      out[q * volume] = from_float<T>(activate(acc[q] + b, P.act, P.slope));
    }
}

}  // namespace

template <bool TRANSPOSED>
cudaError_t launch_simt(const Problem<float>& P, cudaStream_t stream) {
  const int64_t total = (int64_t)P.M * P.cols;
  igemm_simt<TRANSPOSED><<<(total + 255) / 256, 256, 0, stream>>>(P);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_direct_few(const Problem<T>& P, bool ncdhw, cudaStream_t stream) {
  const dim3 grid((P.M + 255) / 256, (P.cols + FEW_COUT - 1) / FEW_COUT);
  ncdhw ? direct_few<T, true><<<grid, 256, 0, stream>>>(P)
        : direct_few<T, false><<<grid, 256, 0, stream>>>(P);
  return cudaGetLastError();
}

template cudaError_t launch_simt<false>(const Problem<float>&, cudaStream_t);
template cudaError_t launch_simt<true>(const Problem<float>&, cudaStream_t);
template cudaError_t launch_direct_few<float>(const Problem<float>&, bool, cudaStream_t);
template cudaError_t launch_direct_few<__half>(const Problem<__half>&, bool, cudaStream_t);
template cudaError_t launch_direct_few<__nv_bfloat16>(const Problem<__nv_bfloat16>&, bool,
                                                      cudaStream_t);

}  // namespace cuda
}  // namespace fedmri
