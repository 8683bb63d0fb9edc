// Hopper (sm_90a) warpgroup matrix multiply: the PTX wrappers the conv3d kernels use.
//
// Both operands are read from shared memory through descriptors, K-major (each row of the
// tile holds 64 consecutive reduction elements = 128 bytes) with the 128-byte swizzle: the
// 16-byte chunk c of row r sits at chunk c ^ (r % 8). Tiles start on 1024-byte boundaries.
// One call multiplies a 64 x 16 slice of A by a 16 x N slice of B into the warpgroup's
// 64 x N float32 accumulators (N/2 per thread).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fedmri {
namespace sm90 {

// Shared-memory offset (in elements) of the 16-byte chunk `chunk` of tile row `r`.
__device__ __forceinline__ int swizzled(int r, int chunk) { return r * 64 + ((chunk ^ (r & 7)) << 3); }

// Matrix descriptor for a K-major, 128-byte-swizzled tile starting at shared address `addr`:
// rows grouped by 8 (1024 bytes apart), layout type 1 = 128-byte swizzle.
__device__ __forceinline__ uint64_t descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Descriptor for a K-major tile without swizzle, made of core matrices of 8 rows x 16 bytes
// (128 contiguous bytes): `k_stride` bytes between the two 8-element halves of a 16-deep
// slice, 128 bytes between consecutive groups of 8 rows (rows are 16 bytes apart), so the
// tile may start at any row. (Exchanging the two strides fails the tests: checked on an H200.)
__device__ __forceinline__ uint64_t descriptor_plain(uint32_t addr, uint32_t k_stride) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) |
         (static_cast<uint64_t>((k_stride >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>(128 >> 4) << 32);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Writes by cp.async (generic proxy) become visible to wgmma (async proxy).
__device__ __forceinline__ void fence_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from touching accumulators across the asynchronous multiply.
template <int R>
__device__ __forceinline__ void hold(float* d) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define FEDMRI_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define FEDMRI_D16(i) FEDMRI_D4(i), FEDMRI_D4(i + 4), FEDMRI_D4(i + 8), FEDMRI_D4(i + 12)
#define FEDMRI_D32(i) FEDMRI_D16(i), FEDMRI_D16(i + 16)
#define FEDMRI_R16 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
#define FEDMRI_R32 FEDMRI_R16 ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define FEDMRI_R64                                                                             \
  FEDMRI_R32 ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,"   \
             "%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
// d += A * B with scale-d = 1 (accumulate), no negation, no transposition (both K-major).
#define FEDMRI_WGMMA(N, TYPE, NAME, REGS, A, B, ...)                                        \
  template <>                                                                                \
  __device__ __forceinline__ void mma<N, TYPE>(float* d, uint64_t a, uint64_t b) {          \
    asm volatile(                                                                            \
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                           \
        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." NAME "." NAME " {" REGS "}, " A    \
        ", " B ", p, 1, 1, 0, 0;\n}\n"                                                       \
        : __VA_ARGS__                                                                        \
        : "l"(a), "l"(b));                                                                   \
  }

template <int N, typename T>
__device__ void mma(float* d, uint64_t a, uint64_t b);

FEDMRI_WGMMA(32, __half, "f16", FEDMRI_R16, "%16", "%17", FEDMRI_D16(0))
FEDMRI_WGMMA(32, __nv_bfloat16, "bf16", FEDMRI_R16, "%16", "%17", FEDMRI_D16(0))
FEDMRI_WGMMA(64, __half, "f16", FEDMRI_R32, "%32", "%33", FEDMRI_D32(0))
FEDMRI_WGMMA(64, __nv_bfloat16, "bf16", FEDMRI_R32, "%32", "%33", FEDMRI_D32(0))
FEDMRI_WGMMA(128, __half, "f16", FEDMRI_R64, "%64", "%65", FEDMRI_D32(0), FEDMRI_D32(32))
FEDMRI_WGMMA(128, __nv_bfloat16, "bf16", FEDMRI_R64, "%64", "%65", FEDMRI_D32(0),
             FEDMRI_D32(32))

#undef FEDMRI_WGMMA
#undef FEDMRI_R64
#undef FEDMRI_R32
#undef FEDMRI_R16
#undef FEDMRI_D32
#undef FEDMRI_D16
#undef FEDMRI_D4

}  // namespace sm90
}  // namespace fedmri
