// Counters in memory that processes of one host share (fedmri.client.spatial.shm): each is
// written by one process only, with a release store after the data it announces, and read by
// the others with acquire loads, so that a reader who sees the count also sees the data.
#include <torch/library.h>

#include <atomic>

namespace fedmri {

namespace {

int64_t* counter(const at::Tensor& counters, int64_t index) {
  TORCH_CHECK(counters.is_cpu() && counters.scalar_type() == at::kLong &&
                  counters.is_contiguous(),
              "fedmri.shm: counters must be a contiguous int64 CPU tensor, got ",
              counters.scalar_type(), " on ", counters.device());
  TORCH_CHECK(index >= 0 && index < counters.numel(), "fedmri.shm: counter ", index,
              " out of range [0, ", counters.numel(), ")");
  return counters.data_ptr<int64_t>() + index;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace

void shm_store(const at::Tensor& counters, int64_t index, int64_t value) {
  __atomic_store_n(counter(counters, index), value, __ATOMIC_RELEASE);
}

// Spins up to `spins` times until the counter reaches `target`; returns the last value read
// (the caller decides whether to wait on, yield or give up).
int64_t shm_wait(const at::Tensor& counters, int64_t index, int64_t target, int64_t spins) {
  const int64_t* c = counter(counters, index);
  int64_t value = __atomic_load_n(c, __ATOMIC_ACQUIRE);
  for (int64_t i = 0; value < target && i < spins; ++i) {
    cpu_relax();
    value = __atomic_load_n(c, __ATOMIC_ACQUIRE);
  }
  return value;
}

}  // namespace fedmri

TORCH_LIBRARY_FRAGMENT(fedmri, m) {
  m.def("shm_store(Tensor(a!) counters, int index, int value) -> ()");
  m.def("shm_wait(Tensor counters, int index, int target, int spins) -> int");
}

TORCH_LIBRARY_IMPL(fedmri, CPU, m) {
  m.impl("shm_store", fedmri::shm_store);
  m.impl("shm_wait", fedmri::shm_wait);
}
