// Direct CPU convolution for layers with very few channels (direct_fits: the network's 3-class
// output layer). oneDNN reaches about 45 GFLOP/s on such a layer here; this kernel walks one
// output row (n, z, h) at a time and keeps 16 output columns of every output channel in
// registers (two 8-float vectors each) across all C * k * k * k taps, one unaligned load of
// the source row per tap. Compiled twice: for AVX2 + FMA, chosen at run time when the CPU has
// them, and for the baseline instruction set.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv3d_cpu.h"

namespace fedmri {

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kBlock = 16;               // output columns per register block
constexpr int64_t kRows = kDirectIn * 3 * 3;  // source rows per output row, at most

struct Args {
  Geometry g;
  const float *x, *lo, *hi;
  const float* wt;    // [c][kd][kh][kw][co]
  const float* bias;  // [Cout]
  float* y;           // NCDHW
};

__attribute__((always_inline)) inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Output columns [w0, w0 + count) of one output row (count <= kBlock). rows[r] points at the
// source column that output column w0 meets through tap kw = 0 (nullptr: a zero row).
template <int COUT, int K>
__attribute__((always_inline)) inline void block(const float* const* rows, int64_t nrows,
                                                 const float* wt, const float* bias, float* out,
                                                 int64_t channel_stride, int64_t count) {
  v8 acc[COUT][2];
  for (int co = 0; co < COUT; ++co) acc[co][0] = acc[co][1] = v8{} + bias[co];
  for (int64_t r = 0; r < nrows; ++r) {
    const float* s = rows[r];
    if (!s) continue;
    for (int kw = 0; kw < K; ++kw) {
      const v8 a = load8(s + kw), b = load8(s + kw + 8);
      const float* wk = wt + (r * K + kw) * COUT;
      for (int co = 0; co < COUT; ++co) {
        acc[co][0] += wk[co] * a;
        acc[co][1] += wk[co] * b;
      }
    }
  }
  for (int co = 0; co < COUT; ++co) {
    float tmp[kBlock];
    std::memcpy(tmp, &acc[co][0], sizeof(v8));
    std::memcpy(tmp + 8, &acc[co][1], sizeof(v8));
    std::memcpy(out + co * channel_stride, tmp, count * sizeof(float));
  }
}

// Output rows [r0, r1) of the flattened (n, z, h) range.
template <int COUT, int K>
__attribute__((always_inline)) inline void output_rows(const Args& a, int64_t r0, int64_t r1) {
  const Geometry& g = a.g;
  constexpr int64_t p = K / 2;
  const int64_t nrows = g.C * K * K, channel_stride = g.Do * g.Ho * g.Wo;
  const float* base[kRows];        // column 0 of each source row, nullptr: zero row
  const float* rows[kRows];
  float edge[kRows][kBlock + K];   // zero-padded source segments for blocks at the borders
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t h = row % g.Ho, z = row / g.Ho % g.Do, n = row / (g.Ho * g.Do);
    const Planes<const float*> in = sample(g, n, a.lo, a.x, a.hi);
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t kd = 0; kd < K; ++kd)
        for (int64_t kh = 0; kh < K; ++kh) {
          const float* plane = in.plane(c, z + kd - p);
          const int64_t hi = h + kh - p;
          base[(c * K + kd) * K + kh] = plane && hi >= 0 && hi < g.H ? plane + hi * g.W : nullptr;
        }
    float* out = a.y + n * g.Cout * channel_stride + (z * g.Ho + h) * g.Wo;
    for (int64_t w0 = 0; w0 < g.Wo; w0 += kBlock) {
      // The block reads source columns [w0 - p, w0 - p + reads); of those, [first, last)
      // (relative) lie inside the image.
      constexpr int64_t reads = kBlock + K - 1;
      const int64_t first = std::max<int64_t>(0, p - w0);
      const int64_t last = std::min<int64_t>(reads, g.W - (w0 - p));
      const bool inside = first == 0 && last == reads;
      for (int64_t r = 0; r < nrows; ++r) {
        if (!base[r] || inside) {
          rows[r] = base[r] ? base[r] + w0 - p : nullptr;
          continue;
        }
        std::fill(edge[r], edge[r] + reads, 0.f);
        std::memcpy(edge[r] + first, base[r] + w0 - p + first, (last - first) * sizeof(float));
        rows[r] = edge[r];
      }
      block<COUT, K>(rows, nrows, a.wt, a.bias, out + w0, channel_stride,
                     std::min(kBlock, g.Wo - w0));
    }
  }
}

template <int COUT, int K>
void rows_baseline(const Args& a, int64_t r0, int64_t r1) {
  output_rows<COUT, K>(a, r0, r1);
}

template <int COUT, int K>
__attribute__((target("avx2,fma"))) void rows_avx2(const Args& a, int64_t r0, int64_t r1) {
  output_rows<COUT, K>(a, r0, r1);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

template <int COUT, int K>
void run(const Args& a) {
  const auto rows = has_avx2() ? rows_avx2<COUT, K> : rows_baseline<COUT, K>;
  at::parallel_for(0, a.g.N * a.g.Do * a.g.Ho, 4,
                   [&](int64_t r0, int64_t r1) { rows(a, r0, r1); });
}

template <int K>
void run_k(const Args& a) {
  switch (a.g.Cout) {
    case 1: return run<1, K>(a);
    case 2: return run<2, K>(a);
    case 3: return run<3, K>(a);
    case 4: return run<4, K>(a);
    case 5: return run<5, K>(a);
    case 6: return run<6, K>(a);
    case 7: return run<7, K>(a);
    default: return run<8, K>(a);
  }
}

}  // namespace

at::Tensor forward_direct_cpu(const Geometry& g, const at::Tensor& x, const at::Tensor& w,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& lo,
                              const std::optional<at::Tensor>& hi) {
  TORCH_CHECK(direct_fits(g) && x.scalar_type() == at::kFloat,
              "fedmri.conv3d: internal: direct kernel on an unfit layer");
  const int64_t taps = g.C * g.k * g.k * g.k;
  const float* wp = w.data_ptr<float>();
  std::vector<float> wt(taps * g.Cout), b(g.Cout, 0.f);
  for (int64_t co = 0; co < g.Cout; ++co)
    for (int64_t t = 0; t < taps; ++t) wt[t * g.Cout + co] = wp[co * taps + t];
  if (bias.has_value())
    for (int64_t co = 0; co < g.Cout; ++co) b[co] = bias->data_ptr<float>()[co];
  at::Tensor y = at::empty({g.N, g.Cout, g.Do, g.Ho, g.Wo}, x.options());
  const Args a{g, x.data_ptr<float>(), data_or_null<float>(lo), data_or_null<float>(hi),
               wt.data(), b.data(), y.data_ptr<float>()};
  if (g.N * g.Do * g.Ho * g.Wo == 0) return y;
  g.k == 3 ? run_k<3>(a) : run_k<1>(a);
  return y;
}

}  // namespace fedmri
