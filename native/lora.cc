// difflora::lora_linear: a frozen Linear with one LoRA adapter, PEFT's lora.Linear forward
//
//   y = x Wᵀ + b + (x Aᵀ) Bᵀ · scale
//
// as one operator. On the CPU in float32 (no autocast, frozen W and b) it is one autograd node: the adapter's
// product is accumulated into the base output by the GEMM itself (addmm_ with beta 1, no separate add and no
// [N, out] temporary), and backward accumulates the input gradient of both branches in one buffer
// (dX = dY W + (dY B · scale) A, again by addmm_) instead of two [N, in] tensors and their sum. Elsewhere (CUDA,
// other dtypes, autocast, a base that trains) it is the plain composition of ATen ops, autograd recording them.
#include "common.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace difflora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool CpuAutocast() {
#if DIFFLORA_TORCH_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(c10::DeviceType::CPU);
#else
  return at::autocast::is_cpu_enabled();
#endif
}

struct LoraLinear : torch::autograd::Function<LoraLinear> {
  // bias travels as an IValue (None or a tensor that needs no gradient), as chunked_attention's mask
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const c10::IValue& bias,
                            const at::Tensor& a, const at::Tensor& b, double scale) {
    const int64_t in = x.size(-1);
    const at::Tensor x2 = x.reshape({-1, in});
    at::Tensor out = bias.isTensor() ? at::addmm(bias.toTensor(), x2, weight.t()) : at::mm(x2, weight.t());
    const at::Tensor h = at::mm(x2, a.t());
    out.addmm_(h, b.t(), 1, scale);
    ctx->save_for_backward({x2, weight, a, b, h});
    ctx->saved_data["scale"] = scale;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return at::_unsafe_view(out, shape);  // not a view: the output may be modified in place like any other
  }

  static variable_list backward(AutogradContext* ctx, variable_list gradOutputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &weight = saved[1], &a = saved[2], &b = saved[3], &h = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const at::Tensor& g = gradOutputs[0];
    const at::Tensor g2 = g.reshape({-1, g.size(-1)});
    at::Tensor gh = at::mm(g2, b);  // d(x Aᵀ) = dY B · scale
    if (scale != 1) gh.mul_(scale);
    at::Tensor dx, da, db;
    if (ctx->needs_input_grad(0)) {
      dx = at::mm(g2, weight);
      dx.addmm_(gh, a);
      std::vector<int64_t> shape = g.sizes().vec();
      shape.back() = x2.size(1);
      dx = at::_unsafe_view(dx, shape);
    }
    // needs_input_grad counts tensor arguments only (x, weight, lora_A, lora_B); the result lists every argument
    if (ctx->needs_input_grad(2)) da = at::mm(gh.t(), x2);
    if (ctx->needs_input_grad(3)) {
      db = at::mm(g2.t(), h);
      if (scale != 1) db.mul_(scale);
    }
    return {dx, at::Tensor(), at::Tensor(), da, db, at::Tensor()};
  }
};

at::Tensor LoraLinearOp(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& a,
                        const at::Tensor& b, double scale) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && a.dim() == 2 && b.dim() == 2 && x.size(-1) == weight.size(1) && a.size(1) == weight.size(1) &&
                  b.size(0) == weight.size(0) && b.size(1) == a.size(0),
              "lora_linear: x [..., in], weight [out, in], lora_A [r, in] and lora_B [out, r] do not fit: ", x.sizes(), ", ", weight.sizes(), ", ",
              a.sizes(), ", ", b.sizes());
  const bool hasBias = bias.has_value() && bias->defined();
  const auto f32cpu = [](const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; };
  const bool fast = f32cpu(x) && f32cpu(weight) && f32cpu(a) && f32cpu(b) && (!hasBias || (f32cpu(*bias) && !bias->requires_grad())) &&
                    !weight.requires_grad() && x.dim() >= 2 && x.numel() > 0 && !CpuAutocast();
  if (!fast) {  // PEFT's arithmetic op by op
    at::Tensor delta = at::linear(at::linear(x, a), b);
    if (scale != 1) delta = delta.mul(scale);
    return at::linear(x, weight, bias).add(delta);
  }
  return LoraLinear::apply(x, weight, hasBias ? c10::IValue(*bias) : c10::IValue(), a, b, scale);
}

}  // namespace
}  // namespace difflora

TORCH_LIBRARY_FRAGMENT(difflora, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale) -> Tensor", &difflora::LoraLinearOp);
}
