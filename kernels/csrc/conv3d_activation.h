// The activations fused into the conv3d epilogue (the op's `activation` argument). Apart from
// conv3d.h so that the CUDA kernel files need no ATen headers (each costs seconds to parse).
#pragma once

#include <cstdint>

namespace fedmri {

enum Activation : int64_t { kNoActivation = 0, kRelu = 1, kLeakyRelu = 2 };

}  // namespace fedmri
