// CUDA backend, weight gradient: grad_w[co][kk] = sum over result rows m of
// grad[m][co] * gathered source(m, kk), over slices of rows reduced with float32 atomics;
// tensor cores (WMMA) for fp16/bf16, CUDA cores for float32.
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "conv3d_cuda.cuh"

namespace fedmri {
namespace cuda {
namespace {

using namespace nvcuda;

// float32: a block takes 64 output channels x 64 taps over a slice of rows.
template <typename T>
__global__ void weight_grad(const Problem<T> P, const T* grad, int Cout, float* out,
                            int rows_per_block) {
  constexpr int TILE = 64, ROWS = 16;
  __shared__ float G[ROWS][TILE + 1];
  __shared__ float X[ROWS][TILE + 1];
  const int co0 = blockIdx.y * TILE, kk0 = blockIdx.x * TILE;
  const int r_begin = blockIdx.z * rows_per_block;
  const int r_end = min(P.M, r_begin + rows_per_block);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads, 4x4 each
  float acc[4][4] = {};
  for (int r0 = r_begin; r0 < r_end; r0 += ROWS) {
    for (int i = threadIdx.x; i < ROWS * TILE; i += 256) {
      const int r = i / TILE, q = i % TILE, m = r0 + r;
      float g = 0.f, x = 0.f;
      if (m < r_end) {
        if (co0 + q < Cout) g = to_float(grad[(int64_t)m * Cout + co0 + q]);
        if (kk0 + q < P.K) {
          int n, z, h, w;
          decode(P, m, n, z, h, w);
          const T* v = gather<false>(P, n, z, h, w, tap_of(P, kk0 + q));
          if (v) x = to_float(*v);
        }
      }
      G[r][q] = g;
      X[r][q] = x;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float gv[4], xv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) gv[a] = G[r][ty * 4 + a], xv[a] = X[r][tx * 4 + a];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] += gv[a] * xv[b];
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int co = co0 + ty * 4 + a, kk = kk0 + tx * 4 + b;
      if (co < Cout && kk < P.K) atomicAdd(out + (int64_t)co * P.K + kk, acc[a][b]);
    }
}

// Tensor-core weight gradient (fp16/bf16; channels padded to multiples of 8):
// grad_w (64 output channels x 128 taps per block) += grad^T (64 x 32 rows) x X (32 x 128),
// rows streamed through a 3-stage cp.async pipeline; row slices reduced with float32 atomics.
constexpr int WG_CO = 64, WG_KK = 128, WG_R = 32, WG_LDG = WG_CO + 8, WG_LDX = WG_KK + 8;

// `tap` is this thread's reduction index kk0 + (thread % 16) * 8, fixed for the block; `xr`
// the positions of its two gathered rows, advanced to the next stage on return.
template <typename T>
__device__ __forceinline__ void load_wgrad_stage(const Problem<T>& P, const T* grad, int Cout,
                                                 const Tap& tap, RowPos* xr, T* Gs, T* Xs,
                                                 int r0, int r_end, int co0) {
  const int t = threadIdx.x;
  {  // grad rows: 32 x 64 channels = 256 pieces of 16 bytes
    const int row = t / 8, piece = t % 8, m = r0 + row, co = co0 + piece * 8;
    const bool ok = m < r_end && co < Cout;
    cp_async16(Gs + row * WG_LDG + piece * 8, ok ? grad + (int64_t)m * Cout + co : grad, ok);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // gathered input rows: 32 x 128 taps = 512 pieces
    const int row = t / 16 + i * 16, piece = t % 16, m = r0 + row;
    RowPos& r = xr[i];
    const T* src = m < r_end ? gather<false>(P, r.n, r.z, r.h, r.w, tap) : nullptr;
    advance_row(P, r.n, r.z, r.h, r.w, WG_R);
    cp_async16(Xs + row * WG_LDX + piece * 8, src ? src : grad, src != nullptr);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) weight_grad_mma(const Problem<T> P, const T* grad,
                                                           int Cout, float* out,
                                                           int rows_per_block) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int STAGE = WG_R * (WG_LDG + WG_LDX);
  const int co0 = blockIdx.y * WG_CO, kk0 = blockIdx.x * WG_KK;
  const int r_begin = blockIdx.z * rows_per_block;
  const int r_end = min(P.M, r_begin + rows_per_block);
  const int warp = threadIdx.x / 32, wc = warp % 2, wk = warp / 2;  // 2 x 4 warps, 32 x 32 each
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  const Tap tap = tap_of(P, kk0 + (threadIdx.x % 16) * 8);
  RowPos xr[2];
  for (int i = 0; i < 2; ++i) {
    const int m = min(r_begin + static_cast<int>(threadIdx.x) / 16 + i * 16, P.M - 1);
    decode(P, m, xr[i].n, xr[i].z, xr[i].h, xr[i].w);  // rows past r_end are never read
  }
  const int tiles = r_end > r_begin ? (r_end - r_begin + WG_R - 1) / WG_R : 0;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < tiles)
      load_wgrad_stage(P, grad, Cout, tap, xr, smem + st * STAGE,
                       smem + st * STAGE + WG_R * WG_LDG, r_begin + st * WG_R, r_end, co0);
    cp_async_commit();
  }
  for (int it = 0; it < tiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = it + STAGES - 1;
    if (next < tiles) {
      T* base = smem + (next % STAGES) * STAGE;
      load_wgrad_stage(P, grad, Cout, tap, xr, base, base + WG_R * WG_LDG,
                       r_begin + next * WG_R, r_end, co0);
    }
    cp_async_commit();
    const T* Gs = smem + (it % STAGES) * STAGE;
    const T* Xs = Gs + WG_R * WG_LDG;
#pragma unroll
    for (int r = 0; r < WG_R; r += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], Gs + r * WG_LDG + wc * 32 + i * 16, WG_LDG);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(b[j], Xs + r * WG_LDX + wk * 32 + j * 16, WG_LDX);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
  const int lane = threadIdx.x % 32, row = lane / 2, half8 = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int co = co0 + wc * 32 + i * 16 + row, kk = kk0 + wk * 32 + j * 16 + half8;
      if (co < Cout)
        for (int q = 0; q < 8 && kk + q < P.K; ++q)
          atomicAdd(out + (int64_t)co * P.K + kk + q, scratch[row * 16 + half8 + q]);
      __syncwarp();
    }
}

}  // namespace

template <typename T>
cudaError_t launch_weight_grad(const Problem<T>& P, const T* grad, float* out,
                               const cudaDeviceProp& device, cudaStream_t stream) {
  if (P.M == 0) return cudaSuccess;
  const int K = P.K, Cout = P.cols;
  // Enough row slices to fill the GPU a few times over, at least 512 rows each.
  auto slices_for = [&](int tiles) {
    return std::max(1, std::min((P.M + 511) / 512, 4 * device.multiProcessorCount / tiles + 1));
  };
  if constexpr (std::is_same_v<T, float>) {
    const dim3 grid((K + 63) / 64, (Cout + 63) / 64);
    const int slices = slices_for(grid.x * grid.y);
    weight_grad<T><<<dim3(grid.x, grid.y, slices), 256, 0, stream>>>(
        P, grad, Cout, out, (P.M + slices - 1) / slices);
  } else {
    const dim3 grid((K + WG_KK - 1) / WG_KK, (Cout + WG_CO - 1) / WG_CO);
    const int slices = slices_for(grid.x * grid.y);
    const int smem = STAGES * WG_R * (WG_LDG + WG_LDX) * static_cast<int>(sizeof(T));
    if (const cudaError_t err = allow_smem(weight_grad_mma<T>, smem); err != cudaSuccess)
      return err;
    weight_grad_mma<T><<<dim3(grid.x, grid.y, slices), THREADS, smem, stream>>>(
        P, grad, Cout, out, (P.M + slices - 1) / slices);
  }
  return cudaGetLastError();
}

#define FEDMRI_INSTANTIATE(T)                                                                \
  template cudaError_t launch_weight_grad<T>(const Problem<T>&, const T*, float*,            \
                                             const cudaDeviceProp&, cudaStream_t);
FEDMRI_INSTANTIATE(float)
FEDMRI_INSTANTIATE(__half)
FEDMRI_INSTANTIATE(__nv_bfloat16)
#undef FEDMRI_INSTANTIATE

}  // namespace cuda
}  // namespace fedmri
