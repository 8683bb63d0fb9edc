// The `fedmri` operator namespace: schemas and the checks every backend shares.
#include <torch/library.h>

#include "conv3d.h"

namespace fedmri {

namespace {

void check_halo(const std::optional<at::Tensor>& halo, const char* name, const at::Tensor& x,
                int64_t p) {
  if (!halo.has_value()) return;
  const at::Tensor& h = *halo;
  TORCH_CHECK(h.dim() == 5 && h.size(0) == x.size(0) && h.size(1) == x.size(1) &&
                  h.size(2) == p && h.size(3) == x.size(3) && h.size(4) == x.size(4),
              "fedmri.conv3d: ", name, " has shape ", h.sizes(), ", expected [", x.size(0), ", ",
              x.size(1), ", ", p, ", ", x.size(3), ", ", x.size(4),
              "] (N, C, kernel_size // 2 planes, H, W)");
  TORCH_CHECK(h.scalar_type() == x.scalar_type() && h.device() == x.device(), "fedmri.conv3d: ",
              name, " is ", h.scalar_type(), " on ", h.device(), ", x is ", x.scalar_type(),
              " on ", x.device());
}

}  // namespace

Geometry describe(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& halo_lo,
                  const std::optional<at::Tensor>& halo_hi, int64_t stride) {
  TORCH_CHECK(x.dim() == 5, "fedmri.conv3d: x must be (N, C, D, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 5, "fedmri.conv3d: weight must be (Cout, C, k, k, k), got ",
              weight.sizes());
  const int64_t k = weight.size(2);
  TORCH_CHECK((k == 1 || k == 3) && weight.size(3) == k && weight.size(4) == k,
              "fedmri.conv3d: kernel must be 1x1x1 or 3x3x3, got weight shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "fedmri.conv3d: weight expects ", weight.size(1),
              " input channels, x has ", x.size(1));
  TORCH_CHECK(stride == 1 || stride == 2, "fedmri.conv3d: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "fedmri.conv3d: weight is ", weight.scalar_type(), " on ", weight.device(),
              ", x is ", x.scalar_type(), " on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fedmri.conv3d: bias must have shape [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "fedmri.conv3d: bias is ", bias->scalar_type(), " on ", bias->device());
  }
  const int64_t p = k / 2;
  check_halo(halo_lo, "halo_lo", x, p);
  check_halo(halo_hi, "halo_hi", x, p);
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.D = x.size(2), g.H = x.size(3), g.W = x.size(4);
  g.Cout = weight.size(0), g.k = k, g.s = stride, g.p = p;
  g.lo = halo_lo.has_value() ? p : 0;
  g.hi = halo_hi.has_value() ? p : 0;
  TORCH_CHECK(g.D > 0 && g.H > 0 && g.W > 0, "fedmri.conv3d: empty spatial size ", x.sizes());
  g.Do = (g.D - 1) / stride + 1;
  g.Ho = (g.H - 1) / stride + 1;
  g.Wo = (g.W - 1) / stride + 1;
  return g;
}

at::MemoryFormat result_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !x.is_contiguous()
             ? at::MemoryFormat::ChannelsLast3d
             : at::MemoryFormat::Contiguous;
}

}  // namespace fedmri

TORCH_LIBRARY(fedmri, m) {
  m.def(
      "conv3d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? halo_lo, Tensor? halo_hi, "
      "int stride, int activation, float negative_slope) -> Tensor");
  // grad_out is the gradient before the activation; the halo gradients are empty tensors
  // where the halo was not given.
  m.def(
      "conv3d_backward_input(Tensor grad_out, Tensor x, Tensor weight, Tensor? halo_lo, "
      "Tensor? halo_hi, int stride) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv3d_backward_weight(Tensor grad_out, Tensor x, Tensor weight, Tensor? halo_lo, "
      "Tensor? halo_hi, int stride) -> (Tensor, Tensor)");
}
