// FEDMRI_CONV3D_KERNEL: which CUDA forward kernel to force (tests and tuning; a kernel that
// cannot take the layer falls back to the automatic choice). Host code only.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstring>
#include <string>

namespace fedmri {

// wgmma / wgmma256: the generic Hopper kernel with 128- / 256-row tiles; "-l1" (near): steps
// in NearWalk order with the source loads kept in L1; strip: the k = 3, stride-1 kernel
// (strip32: 32 channels a step). kAuto: unset (or empty), the measured-best choice.
enum class ForwardKernel {
  kAuto, kWmma, kWgmma, kWgmma256, kWgmmaL1, kWgmma256L1, kStrip, kStrip32
};

inline ForwardKernel parse_forward_kernel(const char* value) {
  static constexpr struct {
    const char* name;
    ForwardKernel kernel;
  } kNames[] = {{"wmma", ForwardKernel::kWmma},          {"wgmma", ForwardKernel::kWgmma},
                {"wgmma256", ForwardKernel::kWgmma256},  {"wgmma-l1", ForwardKernel::kWgmmaL1},
                {"wgmma256-l1", ForwardKernel::kWgmma256L1}, {"strip", ForwardKernel::kStrip},
                {"strip32", ForwardKernel::kStrip32}};
  if (value == nullptr || *value == '\0') return ForwardKernel::kAuto;
  std::string accepted;
  for (const auto& entry : kNames) {
    if (std::strcmp(value, entry.name) == 0) return entry.kernel;
    accepted += (accepted.empty() ? "" : ", ") + std::string(entry.name);
  }
  C10_THROW_ERROR(ValueError, c10::str("FEDMRI_CONV3D_KERNEL=", value,
                                       " is not a conv3d forward kernel: set it to one of ",
                                       accepted, ", or unset it for the automatic choice"));
}

}  // namespace fedmri
