// CUDA backend: our own implicit-GEMM kernels, channels-last-3d (NDHWC).
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
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cstdlib>
#include <string>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "conv3d.h"
#if defined(FEDMRI_SM90A)
#include "wgmma.cuh"
#endif

namespace fedmri {
namespace {

using namespace nvcuda;

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

template <typename T>
__device__ __forceinline__ void store(const Problem<T>& P, int m, int col, float acc) {
  int n, z, h, w;
  decode(P, m, n, z, h, w);
  if (P.bias) acc += to_float(P.bias[col]);
  P.dst.at(n, z, h, w)[col] = from_float<T>(activate(acc, P.act, P.slope));
}

// ---------------------------------------------------------------- tensor cores (fp16/bf16)

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
// WMMA reads rows padded to LDS elements; wgmma reads 128-byte-swizzled rows.
struct PaddedRows {
  static __device__ __forceinline__ int at(int r, int chunk) { return r * LDS + chunk * 8; }
};
#if defined(FEDMRI_SM90A)
struct SwizzledRows {
  static __device__ __forceinline__ int at(int r, int chunk) { return sm90::swizzled(r, chunk); }
};
#endif

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

#if defined(FEDMRI_SM90A)
// The wgmma kernel's tile rows, resolved once per block: for each kd the source address of tap
// (kd, 0, 0) (nullptr where that plane is padding; the address may lie outside the image when
// only later taps are inside) and, as bit kh * 3 + kw, which (kh, kw) taps are inside.
template <typename T, int ROWS>
struct ResolvedRows {
  const T* at[ROWS][3];
  unsigned inside[ROWS];

  __device__ __forceinline__ void resolve(const Problem<T>& P, int m0) {
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int m = m0 + threadIdx.x / CHUNKS + i * (THREADS / CHUNKS);
      at[i][0] = at[i][1] = at[i][2] = nullptr;
      inside[i] = 0;
      if (m >= P.M) continue;
      int n, z, h, w;
      decode(P, m, n, z, h, w);
      const int zs = z * P.s - P.p, hs = h * P.s - P.p, ws = w * P.s - P.p;
#pragma unroll
      for (int kd = 0; kd < 3; ++kd)  // fixed bounds keep `at` in registers
        if (kd < P.k && zs + kd >= -P.src.nlo && zs + kd < P.src.D + P.src.nhi)
          at[i][kd] = P.src.at(n, zs + kd, hs, ws);
#pragma unroll
      for (int kh = 0; kh < 3; ++kh)
#pragma unroll
        for (int kw = 0; kw < 3; ++kw)
          if (kh < P.k && kw < P.k && hs + kh >= 0 && hs + kh < P.src.H && ws + kw >= 0 &&
              ws + kw < P.src.W)
            inside[i] |= 1u << (kh * 3 + kw);
    }
  }

  // One stage of A (this thread's chunk of every row at tap `tap`) into swizzled rows.
  template <bool L1>
  __device__ __forceinline__ void load(const Problem<T>& P, const Tap& tap, T* As) const {
    const int chunk = threadIdx.x % CHUNKS;
    const bool live = tap.kd < P.k;  // past the reduction's end: zeros
    const int64_t offset = ((int64_t)tap.kh * P.src.W + tap.kw) * P.src.C + tap.c;
    const unsigned bit = 1u << (tap.kh * 3 + tap.kw);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const T* base = tap.kd == 0 ? at[i][0] : tap.kd == 1 ? at[i][1] : at[i][2];
      const bool ok = live && base && (inside[i] & bit);
      cp_async16<L1>(As + SwizzledRows::at(threadIdx.x / CHUNKS + i * (THREADS / CHUNKS), chunk),
                     ok ? base + offset : P.weight, ok);
    }
  }
};

// Reduction steps of BK channels in (kd, channel block, kh, kw) order, for sources whose
// channels are a multiple of BK. Consecutive steps then read nearly the same source rows
// (shifted by one column for kw, one image row for kh), so with those loads kept in L1 most of
// a step comes from L1 instead of L2. (The weights are not repacked: a step's B rows are the
// BK channels of tap (kd, kh, kw) in the usual [kd][kh][kw][C] order.)
struct NearWalk {
  int kd = 0, cb = 0, kh = 0, kw = 0;
  __device__ __forceinline__ Tap tap(int chunk8) const { return {kd, kh, kw, cb + chunk8}; }
  template <typename T>
  __device__ __forceinline__ int kk(const Problem<T>& P, int chunk8) const {
    return ((kd * P.k + kh) * P.k + kw) * P.src.C + cb + chunk8;
  }
  template <typename T>
  __device__ __forceinline__ void next(const Problem<T>& P) {
    if (++kw < P.k) return;
    kw = 0;
    if (++kh < P.k) return;
    kh = 0;
    if ((cb += BK) == P.src.C) cb = 0, ++kd;
  }
};
#endif

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

#if defined(FEDMRI_SM90A)
// ---------------------------------------------------------------- Hopper tensor cores (wgmma)

// Built when the extension is compiled for sm_90a.

// Epilogue of the wgmma kernels: waits for the last multiplies and copies (the stages' shared
// memory is then reused), accumulators -> float32 tile in shared memory -> bias,
// activation and 16-byte stores of 8 channels per thread. `row_out(r)` is where tile row r's
// channels go (nullptr: nowhere). wgmma layout: warp w of a warpgroup holds rows
// 16 w + lane / 4 (+ 8) of its 64, and of each 8-column block the columns 2 (lane % 4) (+ 1).
template <typename T, int BN, int MI, typename RowOut>
__device__ __forceinline__ void wgmma_epilogue(const Problem<T>& P, float (&acc)[MI][BN / 2],
                                               float* tile, int n0, RowOut row_out) {
  constexpr int BM = 128 * MI, LDE = BN + 8;  // LDE: conflict-free float2 writes
  sm90::wait<0>();
#pragma unroll
  for (int i = 0; i < MI; ++i) sm90::hold<BN / 2>(acc[i]);
  cp_async_wait<0>();
  __syncthreads();
  const int group = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = (group * MI + i) * 64 + warp * 16 + lane / 4 + half * 8;
        const int c = j * 8 + (lane % 4) * 2;
        *reinterpret_cast<float2*>(tile + r * LDE + c) =
            make_float2(acc[i][j * 4 + half * 2], acc[i][j * 4 + half * 2 + 1]);
      }
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * BN / 8; idx += THREADS) {
    const int r = idx / (BN / 8), c = idx % (BN / 8) * 8;
    T* out = n0 + c < P.cols ? row_out(r) : nullptr;
    if (out) store8_at(P, out, n0 + c, tile + r * LDE + c);
  }
}

// The wgmma kernels' main loop over `steps` reduction steps in a ring of STAGES shared-memory
// stages: load(slot) gathers the next step into a slot; multiply(slot) issues and commits this
// warpgroup's multiplies of one. A slot is refilled two steps after it was multiplied, so one
// multiply stays in flight while the next one is issued.
template <int STAGES, typename Load, typename Multiply>
__device__ __forceinline__ void wgmma_pipeline(int steps, Load& load, Multiply multiply) {
#pragma unroll
  for (int st = 0; st < STAGES - 2; ++st) {
    if (st < steps) load(st);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<STAGES - 3>();
    sm90::fence_proxy();
    __syncthreads();  // this step has landed; every warpgroup is done with step - 2
    multiply(step % STAGES);
    const int next = step + STAGES - 2;
    if (next < steps) load(next % STAGES);
    cp_async_commit();
    sm90::wait<1>();  // this warpgroup's multiply of step - 1 is done
  }
}

template <int MI, int N>
__device__ __forceinline__ void zero(float (&acc)[MI][N]) {
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) acc[i][j] = 0.f;
}

// Generic wgmma kernel. Two warpgroups; warpgroup g multiplies rows
// [g * 64 * MI, (g + 1) * 64 * MI) of the BM = 128 * MI row tile by the BN-wide column tile,
// both operands read by wgmma straight from 128-byte-swizzled shared memory (no register
// fragments). Each thread's tile rows are resolved once (ResolvedRows).
template <int BN, int MI, int STAGES_>
struct WgmmaTile {
  static constexpr int BM = 128 * MI, STAGES = STAGES_;
  static constexpr int STAGE = (BM + BN) * BK;  // elements of A and B per stage
  static constexpr int SMEM = STAGES * STAGE * 2 + 1024;  // + room to align to 1024 bytes
  static_assert(BM * (BN + 8) * 4 <= STAGES * STAGE * 2, "epilogue tile must fit the stages");
};

template <typename T, int BN, int MI, int STAGES, bool NEAR>
__global__ void __launch_bounds__(THREADS, 1) igemm_wgmma(const Problem<T> P) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tile = WgmmaTile<BN, MI, STAGES>;
  constexpr int BM = Tile::BM;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* base = smem_raw + ((1024 - raw % 1024) % 1024);  // swizzle atoms: 1024 B
  T* smem = reinterpret_cast<T*>(base);
  const uint32_t smem_addr = static_cast<uint32_t>(__cvta_generic_to_shared(base));
  auto A = [&](int stage) { return smem + stage * Tile::STAGE; };
  auto B = [&](int stage) { return A(stage) + BM * BK; };
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int group = threadIdx.x / 128;

  float acc[MI][BN / 2];
  zero(acc);

  ResolvedRows<T, BM / (THREADS / CHUNKS)> rows;
  rows.resolve(P, m0);
  const int chunk8 = (threadIdx.x % CHUNKS) * 8;
  Tap tap = tap_of(P, chunk8);
  const int tiles = (P.K + BK - 1) / BK;
  int kk = chunk8;  // this thread's reduction index in the next stage
  NearWalk near;    // NEAR: the step order instead of kk
  auto load = [&](int slot) {
    if constexpr (NEAR) {
      rows.template load<true>(P, near.tap(chunk8), A(slot));
      load_weights<T, BN, SwizzledRows>(P, B(slot), n0, near.kk(P, chunk8));
      near.next(P);
    } else {
      rows.template load<false>(P, tap, A(slot));
      advance(P, tap, BK);
      load_weights<T, BN, SwizzledRows>(P, B(slot), n0, kk);
      kk += BK;
    }
  };
  wgmma_pipeline<STAGES>(tiles, load, [&](int slot) {
    // Descriptors' low bits are addresses in 16-byte units: offsets are compile-time adds.
    const uint64_t da =
        sm90::descriptor(smem_addr + (slot * Tile::STAGE + group * MI * 64 * BK) * 2);
    const uint64_t db = sm90::descriptor(smem_addr + (slot * Tile::STAGE + BM * BK) * 2);
    sm90::fence();
#pragma unroll
    for (int k = 0; k < BK / 16; ++k)  // 16 reduction elements = 32 bytes along the row
#pragma unroll
      for (int i = 0; i < MI; ++i)
        sm90::mma<BN, T>(acc[i], da + (i * 64 * BK * 2 + k * 32) / 16, db + k * 32 / 16);
    sm90::commit();
  });
  wgmma_epilogue<T, BN, MI>(P, acc, reinterpret_cast<float*>(base), n0, [&](int r) -> T* {
    const int m = m0 + r;
    if (m >= P.M) return nullptr;
    int n, z, h, w;
    decode(P, m, n, z, h, w);
    return P.dst.at(n, z, h, w);
  });
#else
  __trap();  // launched only on devices of compute capability 9.0 (sm_90a code)
#endif
}

// Forward for k = 3, stride 1 (every U-Net convolution but the downsampling ones). Rows are
// the result positions of the width-padded volume (W + 2 per image row; the two pad columns
// are computed and dropped), so for one (kd, kh) the three kw taps of BM consecutive rows
// read BM + 2 consecutive source rows, shifted by 0, 1 and 2. A stage gathers that strip once
// for BK channels (a third of the generic kernel's gather work and traffic) with the three
// taps' weights, and wgmma reads the strip at three row offsets. No swizzle: operands are
// stored as planes of 16-byte rows (8 channels), each plane an odd multiple of 16 bytes long
// so that the 8 planes of a row land in different banks.
template <int BN, int BK>
struct StripTile {
  static constexpr int MI = 2, BM = 256, CH = BK / 8;
  static constexpr int PA = BM + 9, PB = BN + 1;  // rows per plane of A (strip) and B
  static constexpr int A = CH * PA * 8, B = 3 * CH * PB * 8, STAGE = A + B;  // elements
  // As many stages as fit, at most 4 for 32 columns and 6 for 64 (the faster of 4 and 6 on
  // an H200 for each).
  static constexpr int FIT = (226 * 1024) / (STAGE * 2), CAP = BN == 32 ? 4 : 6;
  static constexpr int STAGES = FIT < CAP ? FIT : CAP;
  static constexpr int SMEM = STAGES * STAGE * 2;
  static_assert(STAGES >= 3, "three stages must fit");
  static_assert(BM * (BN + 8) * 4 <= SMEM, "epilogue tile must fit the stages");
};

template <typename T, int BN, int BK>
__global__ void __launch_bounds__(THREADS, 1) strip_wgmma(const Problem<T> P, int Mpad) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tile = StripTile<BN, BK>;
  constexpr int BM = Tile::BM, MI = Tile::MI, CH = Tile::CH, STAGES = Tile::STAGES;
  constexpr int A_PIECES = (BM + 2) * CH, A_ITERS = (A_PIECES + THREADS - 1) / THREADS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const uint32_t smem_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const int q0 = blockIdx.x * BM, n0 = blockIdx.y * BN, group = threadIdx.x / 128;
  const int Wp = P.dst.W + 2, H = P.dst.H, Do = P.dst.D;

  // Padded row q -> (n, z, h, w) of the result, w in [-1, W] (-1 and W: pad columns).
  auto unpad = [&](int q, RowPos& r) {
    r.w = q % Wp - 1;
    q /= Wp;
    r.h = q % H;
    q /= H;
    r.z = q % Do;
    r.n = q / Do;
  };
  // The strip rows this thread gathers (strip row j = piece / CH is padded row q0 - 1 + j),
  // resolved once: per kd the start of its source row in the right depth piece (with this
  // thread's 8 channels; nullptr where the plane or the column is padding), and per row the
  // kh whose source row lies inside the image (bit kh). A stage then only adds an offset.
  const T* src[A_ITERS][3];
  unsigned kh_inside[A_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int piece = threadIdx.x + i * THREADS, q = q0 - 1 + piece / CH;
    src[i][0] = src[i][1] = src[i][2] = nullptr;
    kh_inside[i] = 0;
    if (piece >= A_PIECES || q < 0 || q >= Mpad) continue;
    RowPos r;
    unpad(q, r);
#pragma unroll
    for (int kd = 0; kd < 3; ++kd)
      if (P.src.holds(r.z + kd - 1, r.h, r.w))
        src[i][kd] = P.src.at(r.n, r.z + kd - 1, r.h, r.w) + piece % CH * 8;
#pragma unroll
    for (int kh = 0; kh < 3; ++kh)
      if (r.h + kh - 1 >= 0 && r.h + kh - 1 < H) kh_inside[i] |= 1u << kh;
  }
  const int steps = 9 * (P.src.C / BK);
  const int64_t row_elems = (int64_t)P.src.W * P.src.C;  // one image row of the source
  // Steps run (kd, kh, channel block) in order; loads walk them incrementally (no divisions).
  int kd = 0, kh = 0, c0 = 0;
  auto load = [&](int slot) {
    const int kdh = kd * 3 + kh;
    T* As = smem + slot * Tile::STAGE;
    T* Bs = As + Tile::A;
    const int64_t offset = (kh - 1) * row_elems + c0;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      const int piece = threadIdx.x + i * THREADS;
      if (piece >= A_PIECES) break;
      const T* row = kd == 0 ? src[i][0] : kd == 1 ? src[i][1] : src[i][2];
      const bool ok = row && (kh_inside[i] >> kh & 1u);
      cp_async16(As + (piece % CH * Tile::PA + piece / CH) * 8, ok ? row + offset : P.weight, ok);
    }
    const T* wbase = P.weight + (int64_t)kdh * 3 * P.src.C + c0;
    constexpr int B_PIECES = 3 * BN * CH;
#pragma unroll
    for (int i = 0; i < (B_PIECES + THREADS - 1) / THREADS; ++i) {
      const int piece = threadIdx.x + i * THREADS;
      if (B_PIECES % THREADS && piece >= B_PIECES) break;
      const int kw = piece / (BN * CH), r = piece / CH % BN, c = piece % CH, col = n0 + r;
      const bool ok = col < P.cols;
      cp_async16(Bs + ((kw * CH + c) * Tile::PB + r) * 8,
                 ok ? wbase + (int64_t)col * P.K + kw * P.src.C + c * 8 : P.weight, ok);
    }
    if ((c0 += BK) == P.src.C) {
      c0 = 0;
      if (++kh == 3) kh = 0, ++kd;
    }
  };

  float acc[MI][BN / 2];
  zero(acc);
  wgmma_pipeline<STAGES>(steps, load, [&](int slot) {
    // A descriptor's low bits are the address in 16-byte units, so moving within the stage
    // is adding a compile-time count of 16-byte rows to the stage's two base descriptors.
    const uint32_t a = smem_addr + slot * Tile::STAGE * 2, b = a + Tile::A * 2;
    const uint64_t da = sm90::descriptor_plain(a + group * MI * 64 * 16, Tile::PA * 16);
    const uint64_t db = sm90::descriptor_plain(b, Tile::PB * 16);
    sm90::fence();
#pragma unroll
    for (int kw = 0; kw < 3; ++kw)
#pragma unroll
      for (int k = 0; k < BK / 16; ++k)
#pragma unroll
        for (int i = 0; i < MI; ++i)
          sm90::mma<BN, T>(acc[i], da + 2 * k * Tile::PA + i * 64 + kw,
                           db + (kw * CH + 2 * k) * Tile::PB);
    sm90::commit();
  });
  wgmma_epilogue<T, BN, MI>(P, acc, reinterpret_cast<float*>(smem_raw), n0, [&](int r) -> T* {
    const int q = q0 + r;
    if (q >= Mpad) return nullptr;
    RowPos p;
    unpad(q, p);
    return p.w >= 0 && p.w < P.dst.W ? P.dst.at(p.n, p.z, p.h, p.w) : nullptr;
  });
#else
  __trap();  // launched only on devices of compute capability 9.0 (sm_90a code)
#endif
}
#endif  // FEDMRI_SM90A

// ---------------------------------------------------------------- float32 (SIMT)

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
constexpr int FEW_CIN = 4, FEW_COUT = 32;

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

// ---------------------------------------------------------------- weight gradient

// grad_w[co][kk] = sum over output rows m of grad[m][co] * gathered input(m, kk).
// Block: 64 output channels x 64 taps, a slice of rows; float32 atomics across slices.
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

template <typename T, bool TRANSPOSED, int WN>
void launch_mma(const Problem<T>& P, cudaStream_t stream) {
  constexpr int BN = 2 * WN * 16;
  const int smem = STAGES * (BM + BN) * LDS * static_cast<int>(sizeof(T));
  auto kernel = igemm_mma<T, TRANSPOSED, WN>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((P.M + BM - 1) / BM, (P.cols + BN - 1) / BN);
  kernel<<<grid, THREADS, smem, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which forward kernel: FEDMRI_CONV3D_KERNEL = wmma | wgmma | wgmma256 | wgmma-l1 |
// wgmma256-l1 | strip | strip32 (-l1: steps in NearWalk order, source loads kept in L1)
// forces one (tests and tuning; one that cannot take the layer falls back); unset = auto.
std::string forced_kernel() {
  const char* knob = std::getenv("FEDMRI_CONV3D_KERNEL");
  return knob ? knob : "";
}

#if defined(FEDMRI_SM90A)
template <typename T, int BN, int MI, int STAGES, bool NEAR = false>
void launch_wgmma(const Problem<T>& P, cudaStream_t stream) {
  using Tile = WgmmaTile<BN, MI, STAGES>;
  auto kernel = igemm_wgmma<T, BN, MI, STAGES, NEAR>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::SMEM));
  if (NEAR) {  // the smallest shared-memory carve-out that holds the tile: the rest is L1
    const int per_sm = at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor;
    const int percent = ((Tile::SMEM + 1024) * 100 + per_sm - 1) / per_sm;
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, percent));
  }
  const dim3 grid((P.M + Tile::BM - 1) / Tile::BM, (P.cols + BN - 1) / BN);
  kernel<<<grid, THREADS, Tile::SMEM, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The generic wgmma kernel for `bn` (32, 64 or 128) columns: 128-row tiles in 6 stages,
// 256-row tiles in 5 (4 for 128 columns, and 4 in near order).
template <typename T, bool NEAR>
void launch_generic(const Problem<T>& P, int bn, bool rows256, cudaStream_t stream) {
  constexpr int S256 = NEAR ? 4 : 5;
  if (bn == 32)
    rows256 ? launch_wgmma<T, 32, 2, S256, NEAR>(P, stream)
            : launch_wgmma<T, 32, 1, 6, NEAR>(P, stream);
  else if (bn == 64)
    rows256 ? launch_wgmma<T, 64, 2, S256, NEAR>(P, stream)
            : launch_wgmma<T, 64, 1, 6, NEAR>(P, stream);
  else
    rows256 ? launch_wgmma<T, 128, 2, 4, NEAR>(P, stream)
            : launch_wgmma<T, 128, 1, 6, NEAR>(P, stream);
}

template <typename T, int BN, int BK>
void launch_strip(const Problem<T>& P, int Mpad, cudaStream_t stream) {
  using Tile = StripTile<BN, BK>;
  auto kernel = strip_wgmma<T, BN, BK>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::SMEM));
  const dim3 grid((Mpad + Tile::BM - 1) / Tile::BM, (P.cols + BN - 1) / BN);
  kernel<<<grid, THREADS, Tile::SMEM, stream>>>(P, Mpad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The Hopper (compute capability 9.0) forward kernels; false where none applies.
template <typename T>
bool run_sm90(const Problem<T>& P, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const std::string force = forced_kernel();
  if (prop->major != 9 || prop->minor != 0 || force == "wmma") return false;
  const int bn = P.cols <= 32 ? 32 : P.cols <= 64 ? 64 : 128;
  // The strip kernel (k = 3, stride 1) for up to 32 result channels; from 64 on the generic
  // kernel measured faster (H200, 64->64 @64^3: 213 vs 188 TFLOP/s with 256-row tiles).
  const bool strip_fits = P.k == 3 && P.s == 1 && P.src.C % 32 == 0;
  const bool strip32 = force == "strip32";
  if (strip_fits && (force == "strip" || strip32 || (force.empty() && P.cols <= 32))) {
    const int Mpad = P.M / P.dst.W * (P.dst.W + 2);
    // 64 channels a stage where they divide, except for 64 columns: there 32 channels with
    // 6 stages measured faster than 64 with 3 (H200, 64->64 @64^3).
    const bool wide = P.src.C % 64 == 0 && !strip32 && (P.cols <= 32 || force == "strip");
    if (P.cols <= 32) wide ? launch_strip<T, 32, 64>(P, Mpad, stream)
                           : launch_strip<T, 32, 32>(P, Mpad, stream);
    else wide ? launch_strip<T, 64, 64>(P, Mpad, stream)
              : launch_strip<T, 64, 32>(P, Mpad, stream);
    return true;
  }
  // Generic wgmma: row tile 256 when that still gives every SM a tile, else 128.
  const int64_t big_tiles = (P.M + 255) / 256 * ((P.cols + bn - 1) / bn);
  const bool rows256 = force == "wgmma256" || force == "wgmma256-l1" ||
                       (force.rfind("wgmma", 0) != 0 && big_tiles >= prop->multiProcessorCount);
  // Steps in near order with L1-cached source loads where the channels allow ("-l1" knobs),
  // except for 256 x 128 tiles, where it measured slower (H200, fp16 128->128 @32^3: 332 vs
  // 350 TFLOP/s; 64->64 @64^3 233 vs 223, 256->256 @16^3 319 vs 307).
  const bool l1_knob = force.size() > 3 && force.compare(force.size() - 3, 3, "-l1") == 0;
  const bool near =
      P.src.C % BK == 0 && (l1_knob || (force.empty() && !(rows256 && bn == 128)));
  near ? launch_generic<T, true>(P, bn, rows256, stream)
       : launch_generic<T, false>(P, bn, rows256, stream);
  return true;
}
#endif

template <typename T, bool TRANSPOSED>
void run_igemm(const Problem<T>& P, cudaStream_t stream) {
  if (P.M == 0 || P.cols == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    const int64_t total = (int64_t)P.M * P.cols;
    igemm_simt<TRANSPOSED><<<(total + 255) / 256, 256, 0, stream>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // Column tile 32, 64 or 128 wide: the narrowest that holds the channels (or 128).
    TORCH_CHECK(P.src.C % 8 == 0, "fedmri.conv3d: internal: unpadded channels");
#if defined(FEDMRI_SM90A)
    if (!TRANSPOSED && run_sm90(P, stream)) return;
#endif
    const int wn = P.cols <= 32 ? 1 : P.cols <= 64 ? 2 : 4;
    if (wn == 1) launch_mma<T, TRANSPOSED, 1>(P, stream);
    if (wn == 2) launch_mma<T, TRANSPOSED, 2>(P, stream);
    if (wn == 4) launch_mma<T, TRANSPOSED, 4>(P, stream);
  }
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                        const std::optional<at::Tensor>& b_in,
                        const std::optional<at::Tensor>& lo_in,
                        const std::optional<at::Tensor>& hi_in, int64_t stride,
                        int64_t activation, double slope) {
  const Geometry g = describe(x_in, w_in, b_in, lo_in, hi_in, stride);
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
    if (!few) return run_igemm<T, false>(P, stream);
    if (P.M == 0 || P.cols == 0) return;
    const dim3 grid((P.M + 255) / 256, (P.cols + FEW_COUT - 1) / FEW_COUT);
    ncdhw ? direct_few<T, true><<<grid, 256, 0, stream>>>(P)
          : direct_few<T, false><<<grid, 256, 0, stream>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  if (g.s == 1 && g.C >= 32 && forced_kernel() != "wmma") {
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
    run_igemm<T, true>(P, at::cuda::getCurrentCUDAStream());
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
    if (P.M == 0) return;
    // Enough row slices to fill the GPU a few times over, at least 512 rows each.
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    auto slices_for = [&](int tiles) {
      return std::max(1, std::min((P.M + 511) / 512, 4 * sms / tiles + 1));
    };
    const auto stream = at::cuda::getCurrentCUDAStream();
    if constexpr (std::is_same_v<T, float>) {
      const dim3 grid((K + 63) / 64, (Cout + 63) / 64);
      const int slices = slices_for(grid.x * grid.y);
      weight_grad<T><<<dim3(grid.x, grid.y, slices), 256, 0, stream>>>(
          P, ptr<T>(grad), static_cast<int>(Cout), acc.data_ptr<float>(),
          (P.M + slices - 1) / slices);
    } else {
      const dim3 grid((K + WG_KK - 1) / WG_KK, (Cout + WG_CO - 1) / WG_CO);
      const int slices = slices_for(grid.x * grid.y);
      const int smem = STAGES * WG_R * (WG_LDG + WG_LDX) * static_cast<int>(sizeof(T));
      C10_CUDA_CHECK(cudaFuncSetAttribute(weight_grad_mma<T>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      weight_grad_mma<T><<<dim3(grid.x, grid.y, slices), THREADS, smem, stream>>>(
          P, ptr<T>(grad), static_cast<int>(Cout), acc.data_ptr<float>(),
          (P.M + slices - 1) / slices);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // [Cout][kd][kh][kw][C] -> [Cout][C][kd][kh][kw]
  at::Tensor gw = acc.view({Cout, g.k, g.k, g.k, C}).permute({0, 4, 1, 2, 3})
                      .narrow(0, 0, g.Cout).narrow(1, 0, g.C)
                      .to(w_in.scalar_type()).contiguous();
  at::Tensor gb = grad_in.to(at::kFloat).sum({0, 2, 3, 4}).to(w_in.scalar_type());
  return {gw, gb};
}

}  // namespace
}  // namespace fedmri

TORCH_LIBRARY_IMPL(fedmri, CUDA, m) {
  m.impl("conv3d_forward", &fedmri::forward_cuda);
  m.impl("conv3d_backward_input", &fedmri::backward_input_cuda);
  m.impl("conv3d_backward_weight", &fedmri::backward_weight_cuda);
}
