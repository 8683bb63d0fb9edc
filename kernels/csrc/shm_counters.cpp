// Counters in memory that processes of one host share (fedmri.client.spatial.shm): each is
// written by one process only, with a release store after the data it announces, and read by
// the others with acquire loads, so that a reader who sees the count also sees the data.
// Besides the two primitives (store, wait), three ops do a message's whole step in one call
// (publish, take, sum): a halo exchange or a small sum was two dozen Python-level tensor
// calls, about 100 us a step of the exchange on a small VM, times 40 exchanges and sums a
// training step.
#include <torch/library.h>

#include <atomic>
#include <cstring>

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

// The signature of a message sits in the word after its counter.
int64_t* signature_of(const at::Tensor& counters, int64_t index) {
  return counter(counters, index + 1);
}

uint8_t* slot_bytes(const at::Tensor& slot, int64_t nbytes) {
  TORCH_CHECK(slot.is_cpu() && slot.scalar_type() == at::kByte && slot.is_contiguous(),
              "fedmri.shm: a slot must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(nbytes <= slot.numel(), "fedmri.shm: a message of ", nbytes,
              " bytes does not fit its slot of ", slot.numel());
  return slot.data_ptr<uint8_t>();
}

}  // namespace

// Copies `data` into `slot`, writes its signature, then sets counter `index` to `value`.
void shm_publish(const at::Tensor& counters, int64_t index, int64_t value, int64_t signature,
                 const at::Tensor& slot, const at::Tensor& data) {
  TORCH_CHECK(data.is_cpu(), "fedmri.shm: messages are CPU tensors");
  const at::Tensor dense = data.contiguous();
  std::memcpy(slot_bytes(slot, dense.nbytes()), dense.data_ptr(), dense.nbytes());
  __atomic_store_n(signature_of(counters, index), signature, __ATOMIC_RELAXED);
  __atomic_store_n(counter(counters, index), value, __ATOMIC_RELEASE);
}

// If the peer's counter `index` has reached `target`: checks the signature it published,
// copies its slot into `data` and sets this rank's counter `taken_index` to `target`.
// Returns 1 when taken, 0 when not there yet, -1 when the signature differs (nothing read).
int64_t shm_take(const at::Tensor& peer_counters, int64_t index, int64_t target,
                 int64_t signature, const at::Tensor& slot, const at::Tensor& data,
                 const at::Tensor& counters, int64_t taken_index) {
  TORCH_CHECK(data.is_cpu() && data.is_contiguous(),
              "fedmri.shm: a message is received into a contiguous CPU tensor");
  if (__atomic_load_n(counter(peer_counters, index), __ATOMIC_ACQUIRE) < target) return 0;
  if (__atomic_load_n(signature_of(peer_counters, index), __ATOMIC_RELAXED) != signature) {
    return -1;
  }
  std::memcpy(data.data_ptr(), slot_bytes(slot, data.nbytes()), data.nbytes());
  data.unsafeGetTensorImpl()->bump_version();  // written in place, as copy_ would say
  __atomic_store_n(counter(counters, taken_index), target, __ATOMIC_RELEASE);
  return 1;
}

// part = the members' shares (slots), added in the order given; every member's counter must
// have reached `round` (the caller waited for it). Returns -1 - i if member i published
// another signature (part is then unchanged), else 0.
int64_t shm_sum(const at::Tensor& part, at::TensorList counters, at::IntArrayRef indices,
                at::TensorList slots, int64_t round, int64_t signature) {
  TORCH_CHECK(part.is_cpu() && part.is_contiguous() && part.dim() == 1,
              "fedmri.shm: a sum's part must be a flat contiguous CPU tensor");
  TORCH_CHECK(counters.size() == indices.size() && slots.size() == indices.size(),
              "fedmri.shm: one counter and one slot per member");
  for (size_t i = 0; i < indices.size(); ++i) {
    // The acquire load of the counter orders the reads of its signature and share after it.
    TORCH_CHECK(__atomic_load_n(counter(counters[i], indices[i]), __ATOMIC_ACQUIRE) >= round,
                "fedmri.shm: member ", i, " of a sum has not published round ", round);
    if (__atomic_load_n(signature_of(counters[i], indices[i]), __ATOMIC_RELAXED) != signature) {
      return -1 - static_cast<int64_t>(i);
    }
  }
  const int64_t nbytes = part.nbytes();
  for (size_t i = 0; i < slots.size(); ++i) {
    slot_bytes(slots[i], nbytes);  // checks it fits
    at::Tensor share = slots[i].narrow(0, 0, nbytes).view(part.scalar_type());
    if (i == 0) {
      part.copy_(share);
    } else {
      part.add_(share);
    }
  }
  return 0;
}

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
  m.def("shm_publish(Tensor(a!) counters, int index, int value, int signature, "
        "Tensor(b!) slot, Tensor data) -> ()");
  m.def("shm_take(Tensor peer_counters, int index, int target, int signature, Tensor slot, "
        "Tensor(a!) data, Tensor(b!) counters, int taken_index) -> int");
  m.def("shm_sum(Tensor(a!) part, Tensor[] counters, int[] indices, Tensor[] slots, "
        "int round, int signature) -> int");
}

TORCH_LIBRARY_IMPL(fedmri, CPU, m) {
  m.impl("shm_store", fedmri::shm_store);
  m.impl("shm_wait", fedmri::shm_wait);
  m.impl("shm_publish", fedmri::shm_publish);
  m.impl("shm_take", fedmri::shm_take);
  m.impl("shm_sum", fedmri::shm_sum);
}
