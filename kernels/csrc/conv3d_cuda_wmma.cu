// CUDA backend, tensor cores through WMMA (fp16/bf16, Ampere on): the implicit GEMM of the
// forward (where no Hopper kernel runs) and of the input gradient (TRANSPOSED), 16x16x16
// fragments fed by a 3-stage cp.async pipeline.
#include <mma.h>

#include "conv3d_cuda.cuh"

namespace fedmri {
namespace cuda {
namespace {

using namespace nvcuda;

// The positions of the BM / (THREADS / CHUNKS) tile rows this thread gathers.
template <typename T, int BM>
__device__ __forceinline__ void tile_rows(const Problem<T>& P, int m0, RowPos* rows) {
#pragma unroll
  for (int i = 0; i < BM / (THREADS / CHUNKS); ++i) {
    const int m = m0 + threadIdx.x / CHUNKS + i * (THREADS / CHUNKS);
    rows[i].n = -1;
    if (m < P.M) decode(P, m, rows[i].n, rows[i].z, rows[i].h, rows[i].w);
  }
}

// One BM x BN x BK stage: A rows gathered from the source, B rows from the packed weights.
// Source channels are a multiple of 8 (the host pads them), so 8 consecutive reduction
// elements share one tap and each is one 16-byte cp.async, zero-filled at padding.
// `tap` is this thread's reduction index k0 + chunk * 8, advanced to the next tile on return.
template <typename T, bool TRANSPOSED, int BM, int BN, typename Layout = PaddedRows>
__device__ __forceinline__ void load_stage(const Problem<T>& P, const RowPos* rows, Tap& tap,
                                           T* As, T* Bs, int n0, int k0) {
  const int t = threadIdx.x;
  const int chunk = t % CHUNKS, kk = k0 + chunk * 8;
#pragma unroll
  for (int i = 0; i < BM / (THREADS / CHUNKS); ++i) {
    const int r = t / CHUNKS + i * (THREADS / CHUNKS);
    const T* src = rows[i].n >= 0
                       ? gather<TRANSPOSED>(P, rows[i].n, rows[i].z, rows[i].h, rows[i].w, tap)
                       : nullptr;
    cp_async16(As + Layout::at(r, chunk), src ? src : P.weight, src != nullptr);
  }
  advance(P, tap, BK);
  load_weights<T, BN, Layout>(P, Bs, n0, kk);
}

// 8 warps as 4 (rows) x 2 (columns); each warp owns 32 x (WN*16) of the tile.
template <typename T, bool TRANSPOSED, int WN>
__global__ void __launch_bounds__(THREADS, 2) igemm_mma(const Problem<T> P) {
  constexpr int BN = 2 * WN * 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
  auto A = [&](int stage) { return smem + stage * (BM + BN) * LDS; };
  auto B = [&](int stage) { return A(stage) + BM * LDS; };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][WN];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < WN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  RowPos rows[BM / (THREADS / CHUNKS)];
  tile_rows<T, BM>(P, m0, rows);
  Tap tap = tap_of(P, (threadIdx.x % CHUNKS) * 8);
  const int tiles = (P.K + BK - 1) / BK;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < tiles) load_stage<T, TRANSPOSED, BM, BN>(P, rows, tap, A(st), B(st), n0, st * BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt is complete and stage kt-1 is no longer being read
    const int next = kt + STAGES - 1;
    if (next < tiles) {
      load_stage<T, TRANSPOSED, BM, BN>(P, rows, tap, A(next % STAGES), B(next % STAGES), n0,
                                    next * BK);
    }
    cp_async_commit();
    const T* As = A(kt % STAGES);
    const T* Bs = B(kt % STAGES);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[WN];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < WN; ++j)
        wmma::load_matrix_sync(b[j], Bs + (wn * WN * 16 + j * 16) * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < WN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: each warp stages one 16x16 accumulator at a time in shared memory; a lane
  // writes 8 consecutive channels of one row (bias + activation applied in float32).
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
  const int lane = threadIdx.x % 32, row = lane / 2, half8 = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < WN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int m = m0 + wm * 32 + i * 16 + row;
      if (m < P.M) store8(P, m, n0 + wn * WN * 16 + j * 16 + half8, scratch + row * 16 + half8);
      __syncwarp();
    }
  }
}

template <typename T, bool TRANSPOSED, int WN>
cudaError_t launch_mma(const Problem<T>& P, cudaStream_t stream) {
  constexpr int BN = 2 * WN * 16;
  const int smem = STAGES * (BM + BN) * LDS * static_cast<int>(sizeof(T));
  auto kernel = igemm_mma<T, TRANSPOSED, WN>;
  if (const cudaError_t err = allow_smem(kernel, smem); err != cudaSuccess) return err;
  const dim3 grid((P.M + BM - 1) / BM, (P.cols + BN - 1) / BN);
  kernel<<<grid, THREADS, smem, stream>>>(P);
  return cudaGetLastError();
}

}  // namespace

template <typename T, bool TRANSPOSED>
cudaError_t launch_wmma(const Problem<T>& P, cudaStream_t stream) {
  if (P.cols <= 32) return launch_mma<T, TRANSPOSED, 1>(P, stream);
  if (P.cols <= 64) return launch_mma<T, TRANSPOSED, 2>(P, stream);
  return launch_mma<T, TRANSPOSED, 4>(P, stream);
}

template cudaError_t launch_wmma<__half, false>(const Problem<__half>&, cudaStream_t);
template cudaError_t launch_wmma<__half, true>(const Problem<__half>&, cudaStream_t);
template cudaError_t launch_wmma<__nv_bfloat16, false>(const Problem<__nv_bfloat16>&,
                                                       cudaStream_t);
template cudaError_t launch_wmma<__nv_bfloat16, true>(const Problem<__nv_bfloat16>&,
                                                      cudaStream_t);

}  // namespace cuda
}  // namespace fedmri
