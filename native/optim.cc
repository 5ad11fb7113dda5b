// Optimizer kernels: AdamW with optional fp32 master weights, gradient clipping, and the gradient
// unscale + overflow check of dynamic loss scaling. State tensors live in JS (saved with the checkpoint);
// these functions only update them, on multi-tensor (_foreach) kernels.
#include "common.h"

#include <c10/core/GradMode.h>

namespace difflora {
namespace {

double NumberOption(Napi::Env env, const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string("adamwStep: option '") + key + "' must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

void CheckSameLength(Napi::Env env, size_t n, size_t m, const char* what) {
  if (n != m) throw Napi::TypeError::New(env, std::string("adamwStep: ") + what + " has " + std::to_string(m) + " tensors, params has " + std::to_string(n));
}

// adamwStep(params, grads, expAvg, expAvgSq, masters|null, {lr, beta1, beta2, eps, weightDecay, step})
// The arithmetic is torch.optim.AdamW's (decoupled weight decay, bias correction, eps outside the
// sqrt), in its exact operation order so fp32 results match PyTorch bit for bit. With masters, the
// update runs on fp32 copies and is then written back into the low-precision params.
Napi::Value AdamWStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<at::Tensor> params = UnwrapTensorList(env, info[0], "adamwStep params");
  std::vector<at::Tensor> grads = UnwrapTensorList(env, info[1], "adamwStep grads");
  std::vector<at::Tensor> expAvg = UnwrapTensorList(env, info[2], "adamwStep expAvg");
  std::vector<at::Tensor> expAvgSq = UnwrapTensorList(env, info[3], "adamwStep expAvgSq");
  bool useMasters = info[4].IsArray();
  std::vector<at::Tensor> masters = useMasters ? UnwrapTensorList(env, info[4], "adamwStep masters") : std::vector<at::Tensor>{};
  Napi::Object o = info[5].As<Napi::Object>();
  double lr = NumberOption(env, o, "lr"), beta1 = NumberOption(env, o, "beta1"), beta2 = NumberOption(env, o, "beta2");
  double eps = NumberOption(env, o, "eps"), weightDecay = NumberOption(env, o, "weightDecay");
  double step = NumberOption(env, o, "step");
  CheckSameLength(env, params.size(), grads.size(), "grads");
  CheckSameLength(env, params.size(), expAvg.size(), "expAvg");
  CheckSameLength(env, params.size(), expAvgSq.size(), "expAvgSq");
  if (useMasters) CheckSameLength(env, params.size(), masters.size(), "masters");
  if (params.empty()) return env.Undefined();

  Guard(env, [&] { return "adamwStep(" + std::to_string(params.size()) + " params, first " + Describe(params[0]) + ")"; }, [&] {
    c10::AutoGradMode noGrad(false);
    std::vector<at::Tensor> target = useMasters ? masters : params;
    std::vector<at::Tensor> g(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) {
      g[i] = grads[i].scalar_type() == target[i].scalar_type() ? grads[i] : grads[i].to(target[i].scalar_type());
    }
    double biasCorrection1 = 1 - std::pow(beta1, step);
    double biasCorrection2 = 1 - std::pow(beta2, step);
    double stepSize = lr / biasCorrection1;
    double biasCorrection2Sqrt = std::sqrt(biasCorrection2);

    at::_foreach_mul_(target, 1 - lr * weightDecay);
    at::_foreach_mul_(expAvg, beta1);
    at::_foreach_add_(expAvg, g, 1 - beta1);
    at::_foreach_mul_(expAvgSq, beta2);
    at::_foreach_addcmul_(expAvgSq, g, g, 1 - beta2);
    std::vector<at::Tensor> denom = at::_foreach_sqrt(expAvgSq);
    at::_foreach_div_(denom, biasCorrection2Sqrt);
    at::_foreach_add_(denom, eps);
    at::_foreach_addcdiv_(target, expAvg, denom, -stepSize);
    if (useMasters) {
      for (size_t i = 0; i < params.size(); ++i) params[i].copy_(masters[i]);
    }
  });
  return env.Undefined();
}

// clipGradNorm(grads, maxNorm, normType) → total norm (a 0-dim tensor), with torch.nn.utils.clip_grad_norm_'s
// arithmetic: coef = maxNorm / (total + 1e-6), clamped to 1, always multiplied (no host sync needed).
Napi::Value ClipGradNorm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<at::Tensor> grads = UnwrapTensorList(env, info[0], "clipGradNorm grads");
  double maxNorm = info[1].As<Napi::Number>().DoubleValue();
  double normType = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : 2.0;
  if (grads.empty()) return WrapTensor(env, at::zeros({}, at::kFloat));
  at::Tensor total = Guard(env, [&] { return "clipGradNorm(" + std::to_string(grads.size()) + " grads)"; }, [&] {
    c10::AutoGradMode noGrad(false);
    at::Device device = grads[0].device();
    std::vector<at::Tensor> norms;
    norms.reserve(grads.size());
    at::Tensor totalNorm;
    if (std::isinf(normType)) {
      for (auto& g : grads) norms.push_back(g.abs().max().to(device));
      totalNorm = norms.size() == 1 ? norms[0] : at::stack(norms).max();
    } else {
      for (auto& g : grads) norms.push_back(at::norm(g, normType).to(device));
      totalNorm = at::norm(at::stack(norms), normType);
    }
    // Python evaluates `max_norm / (total + 1e-6)` as reciprocal() * max_norm; kept for equal bits.
    at::Tensor coef = (totalNorm + 1e-6).reciprocal() * maxNorm;
    at::Tensor clamped = at::clamp(coef, c10::nullopt, 1.0);
    for (auto& g : grads) g.mul_(clamped.to(g.device()));
    return totalNorm;
  });
  return WrapTensor(env, total);
}

// unscaleGrads(grads, invScale) → true when any gradient holds inf or NaN. Multiplies every gradient by
// invScale in place (GradScaler.unscale_). One host sync per call.
Napi::Value UnscaleGrads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<at::Tensor> grads = UnwrapTensorList(env, info[0], "unscaleGrads grads");
  double invScale = info[1].As<Napi::Number>().DoubleValue();
  if (grads.empty()) return Napi::Boolean::New(env, false);
  bool found = Guard(env, [&] { return "unscaleGrads(" + std::to_string(grads.size()) + " grads)"; }, [&] {
    c10::AutoGradMode noGrad(false);
    at::Device device = grads[0].device();
    if (device.is_cuda()) {
      at::Tensor foundInf = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(device));
      at::Tensor inv = at::full({1}, invScale, at::TensorOptions().dtype(at::kFloat).device(device));
      at::_amp_foreach_non_finite_check_and_unscale_(grads, foundInf, inv);
      return foundInf.item<float>() != 0.0f;
    }
    at::Tensor anyBad = at::zeros({}, at::TensorOptions().dtype(at::kBool).device(device));
    for (auto& g : grads) {
      anyBad.logical_or_(at::isfinite(g).logical_not().any());
      g.mul_(invScale);
    }
    return anyBad.item<bool>();
  });
  return Napi::Boolean::New(env, found);
}

}  // namespace

void InitOptim(Napi::Env env, Napi::Object exports) {
  exports.Set("adamwStep", Napi::Function::New(env, AdamWStep));
  exports.Set("clipGradNorm", Napi::Function::New(env, ClipGradNorm));
  exports.Set("unscaleGrads", Napi::Function::New(env, UnscaleGrads));
}

}  // namespace difflora
