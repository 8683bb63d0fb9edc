// CUDA backend, Hopper tensor cores (wgmma; built when the extension is compiled for sm_90a,
// FEDMRI_SM90A): the generic implicit-GEMM forward kernel and the strip kernel for k = 3,
// stride 1. Both read their operands from shared memory through descriptors (wgmma.cuh).
#if defined(FEDMRI_SM90A)
#include "conv3d_cuda.cuh"
#include "wgmma.cuh"

namespace fedmri {
namespace cuda {
namespace {

// The wgmma tiles' layout (see PaddedRows).
struct SwizzledRows {
  static __device__ __forceinline__ int at(int r, int chunk) { return sm90::swizzled(r, chunk); }
};

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
  // 16, like strip_wgmma's: nvcc gives one extern __shared__ name a single alignment per file
  // (of the first kernel instantiated); the tiles are aligned to 1024 bytes here.
  extern __shared__ __align__(16) unsigned char smem_raw[];
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

template <typename T, int BN, int MI, int STAGES, bool NEAR = false>
cudaError_t launch_wgmma(const Problem<T>& P, const cudaDeviceProp& device,
                         cudaStream_t stream) {
  using Tile = WgmmaTile<BN, MI, STAGES>;
  auto kernel = igemm_wgmma<T, BN, MI, STAGES, NEAR>;
  if (const cudaError_t err = allow_smem(kernel, Tile::SMEM); err != cudaSuccess) return err;
  if (NEAR) {  // the smallest shared-memory carve-out that holds the tile: the rest is L1
    const int per_sm = static_cast<int>(device.sharedMemPerMultiprocessor);
    const int percent = ((Tile::SMEM + 1024) * 100 + per_sm - 1) / per_sm;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, percent);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((P.M + Tile::BM - 1) / Tile::BM, (P.cols + BN - 1) / BN);
  kernel<<<grid, THREADS, Tile::SMEM, stream>>>(P);
  return cudaGetLastError();
}

}  // namespace

// The generic kernel's tiles for `bn` columns: 128-row tiles in 6 stages,
// 256-row tiles in 5 (4 for 128 columns, and 4 in near order).
template <typename T, bool NEAR>
cudaError_t launch_wgmma_generic(const Problem<T>& P, int bn, bool rows256,
                                 const cudaDeviceProp& device, cudaStream_t stream) {
  constexpr int S256 = NEAR ? 4 : 5;
  if (bn == 32)
    return rows256 ? launch_wgmma<T, 32, 2, S256, NEAR>(P, device, stream)
                   : launch_wgmma<T, 32, 1, 6, NEAR>(P, device, stream);
  if (bn == 64)
    return rows256 ? launch_wgmma<T, 64, 2, S256, NEAR>(P, device, stream)
                   : launch_wgmma<T, 64, 1, 6, NEAR>(P, device, stream);
  return rows256 ? launch_wgmma<T, 128, 2, 4, NEAR>(P, device, stream)
                 : launch_wgmma<T, 128, 1, 6, NEAR>(P, device, stream);
}

template <typename T, int BN, int BK>
cudaError_t launch_wgmma_strip(const Problem<T>& P, int Mpad, cudaStream_t stream) {
  using Tile = StripTile<BN, BK>;
  auto kernel = strip_wgmma<T, BN, BK>;
  if (const cudaError_t err = allow_smem(kernel, Tile::SMEM); err != cudaSuccess) return err;
  const dim3 grid((Mpad + Tile::BM - 1) / Tile::BM, (P.cols + BN - 1) / BN);
  kernel<<<grid, THREADS, Tile::SMEM, stream>>>(P, Mpad);
  return cudaGetLastError();
}

// What the dispatch launches, for both tensor-core types.
#define FEDMRI_INSTANTIATE(T)                                                               \
  template cudaError_t launch_wgmma_generic<T, false>(const Problem<T>&, int, bool,         \
                                                      const cudaDeviceProp&, cudaStream_t); \
  template cudaError_t launch_wgmma_generic<T, true>(const Problem<T>&, int, bool,          \
                                                     const cudaDeviceProp&, cudaStream_t);  \
  template cudaError_t launch_wgmma_strip<T, 32, 32>(const Problem<T>&, int, cudaStream_t); \
  template cudaError_t launch_wgmma_strip<T, 32, 64>(const Problem<T>&, int, cudaStream_t); \
  template cudaError_t launch_wgmma_strip<T, 64, 32>(const Problem<T>&, int, cudaStream_t); \
  template cudaError_t launch_wgmma_strip<T, 64, 64>(const Problem<T>&, int, cudaStream_t);
FEDMRI_INSTANTIATE(__half)
FEDMRI_INSTANTIATE(__nv_bfloat16)
#undef FEDMRI_INSTANTIATE

}  // namespace cuda
}  // namespace fedmri
#endif  // FEDMRI_SM90A
