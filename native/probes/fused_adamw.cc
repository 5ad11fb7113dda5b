// Compiled, never linked, by the build (CMakeLists.txt, scripts/torch-paths.cjs) against a CUDA libtorch to decide
// DIFFLORA_FUSED_ADAMW: libtorch's fused multi-tensor AdamW with a tensor learning rate and found_inf (2.x),
// which native/optim.cc's device-side step uses on CUDA.
#include <ATen/ATen.h>

void probe(std::vector<at::Tensor> a, const at::Tensor& lr, const at::Tensor& inf) {
  at::_fused_adamw_(a, a, a, a, {}, a, lr, 0.9, 0.999, 0.01, 1e-8, false, false, c10::nullopt, inf);
}
