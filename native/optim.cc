// Optimizer kernels: AdamW with optional fp32 master weights, gradient clipping, and the gradient
// unscale + overflow check of dynamic loss scaling. State tensors live in JS (saved with the checkpoint);
// these functions only update them, on multi-tensor (_foreach) kernels.
#include "common.h"

#include <c10/core/GradMode.h>

#include <cstdlib>

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
    } else if (device.is_cuda()) {
      norms = at::_foreach_norm(grads, normType);  // one multi-tensor kernel, as clip_grad_norm_ on CUDA
      totalNorm = at::norm(at::stack(norms), normType);
    } else {
      for (auto& g : grads) norms.push_back(at::norm(g, normType).to(device));
      totalNorm = at::norm(at::stack(norms), normType);
    }
    // Python evaluates `max_norm / (total + 1e-6)` as reciprocal() * max_norm; kept for equal bits.
    at::Tensor coef = (totalNorm + 1e-6).reciprocal() * maxNorm;
    at::Tensor clamped = at::clamp(coef, c10::nullopt, 1.0);
#if DIFFLORA_TORCH_AT_LEAST(2, 1)
    if (device.is_cuda()) {
      at::_foreach_mul_(grads, clamped);  // a tensor factor in one kernel (libtorch >= 2.1), as clip_grad_norm_
      return totalNorm;
    }
#endif
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

bool BoolOption(Napi::Env env, const Napi::Object& o, const char* key, const char* fn) {
  Napi::Value v = o.Get(key);
  if (!v.IsBoolean()) throw Napi::TypeError::New(env, std::string(fn) + ": option '" + key + "' must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

void CheckLength(Napi::Env env, const char* fn, size_t n, size_t m, const char* what) {
  if (n != m) throw Napi::TypeError::New(env, std::string(fn) + ": " + what + " has " + std::to_string(m) + " tensors, params has " + std::to_string(n));
}

// prodigyStep(params, grads, expAvg|null, expAvgSq, s, p0, {lr, beta1, beta2, beta3, eps, weightDecay, decouple,
// useBiasCorrection, safeguardWarmup, d, d0, dMax, dNumerator, dCoef, growthRate, k})
//   → {stepped, d, dMax, dNumerator, dHat, dDenom}
// One step of Prodigy (konstmish/prodigy, prodigyopt/prodigy.py, slice_p = 1, one parameter group) over every
// parameter: the first pass updates the moments and s and sums <g, p0 − p> and |s| over all parameters (the
// per-parameter float32 reductions summed in double, in order, as the Python sums .item()s), the new d is computed
// on the host from those sums (one sync), and the second pass takes the Adam step with it. expAvg is null when
// beta1 = 0. When |s| sums to 0 (no gradient signal, or lr = 0) nothing more happens: stepped is false and the
// caller keeps d, d_numerator and k, as the Python returns early.
Napi::Value ProdigyStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "prodigyStep";
  std::vector<at::Tensor> params = UnwrapTensorList(env, info[0], "prodigyStep params");
  std::vector<at::Tensor> grads = UnwrapTensorList(env, info[1], "prodigyStep grads");
  bool withExpAvg = info[2].IsArray();
  std::vector<at::Tensor> expAvg = withExpAvg ? UnwrapTensorList(env, info[2], "prodigyStep expAvg") : std::vector<at::Tensor>{};
  std::vector<at::Tensor> expAvgSq = UnwrapTensorList(env, info[3], "prodigyStep expAvgSq");
  std::vector<at::Tensor> s = UnwrapTensorList(env, info[4], "prodigyStep s");
  std::vector<at::Tensor> p0 = UnwrapTensorList(env, info[5], "prodigyStep p0");
  if (!info[6].IsObject()) throw Napi::TypeError::New(env, "prodigyStep: options must be an object");
  Napi::Object o = info[6].As<Napi::Object>();
  auto num = [&](const char* key) {
    Napi::Value v = o.Get(key);
    if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string("prodigyStep: option '") + key + "' must be a number");
    return v.As<Napi::Number>().DoubleValue();
  };
  double lr = num("lr"), beta1 = num("beta1"), beta2 = num("beta2"), beta3 = num("beta3"), eps = num("eps");
  double weightDecay = num("weightDecay"), d = num("d"), d0 = num("d0"), dMax = num("dMax"), dNumerator = num("dNumerator");
  double dCoef = num("dCoef"), growthRate = num("growthRate"), k = num("k");
  bool decouple = BoolOption(env, o, "decouple", fn), useBiasCorrection = BoolOption(env, o, "useBiasCorrection", fn);
  bool safeguardWarmup = BoolOption(env, o, "safeguardWarmup", fn);
  CheckLength(env, fn, params.size(), grads.size(), "grads");
  if (withExpAvg) CheckLength(env, fn, params.size(), expAvg.size(), "expAvg");
  CheckLength(env, fn, params.size(), expAvgSq.size(), "expAvgSq");
  CheckLength(env, fn, params.size(), s.size(), "s");
  CheckLength(env, fn, params.size(), p0.size(), "p0");

  struct Out { bool stepped; double d, dMax, dNumerator, dHat, dDenom; };
  Out out = Guard(env, [&] { return "prodigyStep(" + std::to_string(params.size()) + " params" + (params.empty() ? "" : ", first " + Describe(params[0])) + ")"; }, [&] {
    c10::AutoGradMode noGrad(false);
    Out r{false, d, dMax, dNumerator, d, 0.0};
    if (params.empty() || !(lr > 0.0)) return r;  // lr = 0: the Python skips the first pass, so |s| sums to 0
    double biasCorrection = useBiasCorrection ? std::pow(1 - std::pow(beta2, k + 1), 0.5) / (1 - std::pow(beta1, k + 1)) : 1.0;
    double dlr = d * lr * biasCorrection;
    // 1. coupled weight decay goes into the gradient (in place, as p.grad.data.add_)
    if (weightDecay != 0 && !decouple) at::_foreach_add_(grads, params, weightDecay);
    std::vector<at::Tensor> flatGrads(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) flatGrads[i] = grads[i].reshape({-1});
    // 2. first pass: <g, p0 − p> with the parameters before the step, then the moments and s
    std::vector<at::Tensor> reductions;
    reductions.reserve(2 * params.size());
    for (size_t i = 0; i < params.size(); ++i) reductions.push_back(at::dot(flatGrads[i], p0[i].reshape({-1}) - params[i].reshape({-1})));
    if (withExpAvg) {
      at::_foreach_mul_(expAvg, beta1);
      at::_foreach_add_(expAvg, grads, d * (1 - beta1));
    }
    at::_foreach_mul_(expAvgSq, beta2);
    at::_foreach_addcmul_(expAvgSq, grads, grads, d * d * (1 - beta2));
    at::_foreach_mul_(s, beta3);
    at::_foreach_add_(s, flatGrads, safeguardWarmup ? (d / d0) * d : (d / d0) * dlr);
    for (size_t i = 0; i < params.size(); ++i) reductions.push_back(s[i].abs().sum());
    // 3. the global sums on the host (one sync), in the Python's order and precision
    at::Tensor host = at::stack(reductions).to(at::kDouble).to(at::kCPU).contiguous();
    const double* h = host.data_ptr<double>();
    double deltaNumerator = 0.0, dDenom = 0.0;
    for (size_t i = 0; i < params.size(); ++i) deltaNumerator += (d / d0) * dlr * h[i];
    for (size_t i = 0; i < params.size(); ++i) dDenom += h[params.size() + i];
    r.dDenom = dDenom;
    if (dDenom == 0) return r;
    double globalNumerator = dNumerator * beta3 + deltaNumerator;
    double dHat = dCoef * globalNumerator / dDenom;
    double dNew = d;
    if (dNew == d0) dNew = std::max(dNew, dHat);
    double dMaxNew = std::max(dMax, dHat);
    dNew = std::min(dMaxNew, dNew * growthRate);
    // 4. second pass: the Adam step with the new d in the denominator and the old d in the step size
    std::vector<at::Tensor> denom = at::_foreach_sqrt(expAvgSq);
    at::_foreach_add_(denom, dNew * eps);
    if (weightDecay != 0 && decouple) at::_foreach_add_(params, params, -weightDecay * dlr);
    if (withExpAvg) {
      at::_foreach_addcdiv_(params, expAvg, denom, -dlr);
    } else {
      at::_foreach_addcdiv_(params, grads, denom, -dlr * dNew);  // the Python's `d` is the new one here
    }
    return Out{true, dNew, dMaxNew, globalNumerator, dHat, dDenom};
  });
  Napi::Object result = Napi::Object::New(env);
  result.Set("stepped", Napi::Boolean::New(env, out.stepped));
  result.Set("d", Napi::Number::New(env, out.d));
  result.Set("dMax", Napi::Number::New(env, out.dMax));
  result.Set("dNumerator", Napi::Number::New(env, out.dNumerator));
  result.Set("dHat", Napi::Number::New(env, out.dHat));
  result.Set("dDenom", Napi::Number::New(env, out.dDenom));
  return result;
}

// lionStep(params, grads, expAvg, {lr, beta1, beta2, weightDecay}): one step of Lion (lucidrains/lion-pytorch's
// update_fn) over every parameter: p ← p·(1 − lr·wd); p ← p − lr·sign(β1·m + (1 − β1)·g); m ← β2·m + (1 − β2)·g.
Napi::Value LionStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "lionStep";
  std::vector<at::Tensor> params = UnwrapTensorList(env, info[0], "lionStep params");
  std::vector<at::Tensor> grads = UnwrapTensorList(env, info[1], "lionStep grads");
  std::vector<at::Tensor> expAvg = UnwrapTensorList(env, info[2], "lionStep expAvg");
  if (!info[3].IsObject()) throw Napi::TypeError::New(env, "lionStep: options must be an object");
  Napi::Object o = info[3].As<Napi::Object>();
  auto num = [&](const char* key) {
    Napi::Value v = o.Get(key);
    if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string("lionStep: option '") + key + "' must be a number");
    return v.As<Napi::Number>().DoubleValue();
  };
  double lr = num("lr"), beta1 = num("beta1"), beta2 = num("beta2"), weightDecay = num("weightDecay");
  CheckLength(env, fn, params.size(), grads.size(), "grads");
  CheckLength(env, fn, params.size(), expAvg.size(), "expAvg");
  if (params.empty()) return env.Undefined();
  Guard(env, [&] { return "lionStep(" + std::to_string(params.size()) + " params, first " + Describe(params[0]) + ")"; }, [&] {
    c10::AutoGradMode noGrad(false);
    at::_foreach_mul_(params, 1. - lr * weightDecay);
    std::vector<at::Tensor> update = at::_foreach_mul(expAvg, beta1);
    at::_foreach_add_(update, grads, 1. - beta1);
    for (auto& u : update) u.sign_();
    at::_foreach_add_(params, update, -lr);
    at::_foreach_mul_(expAvg, beta2);
    at::_foreach_add_(expAvg, grads, 1. - beta2);
  });
  return env.Undefined();
}

// emaStep(shadow, params, oneMinusDecay): shadow ← shadow − (1 − decay)·(shadow − param) for every pair, in place
// (diffusers' EMAModel.step, its foreach form).
Napi::Value EmaStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<at::Tensor> shadow = UnwrapTensorList(env, info[0], "emaStep shadow");
  std::vector<at::Tensor> params = UnwrapTensorList(env, info[1], "emaStep params");
  if (!info[2].IsNumber()) throw Napi::TypeError::New(env, "emaStep: oneMinusDecay must be a number");
  double oneMinusDecay = info[2].As<Napi::Number>().DoubleValue();
  CheckLength(env, "emaStep", params.size(), shadow.size(), "shadow");
  if (params.empty()) return env.Undefined();
  Guard(env, [&] { return "emaStep(" + std::to_string(params.size()) + " params, first " + Describe(params[0]) + ")"; }, [&] {
    c10::AutoGradMode noGrad(false);
    std::vector<at::Tensor> diff = at::_foreach_sub(shadow, params);
    at::_foreach_sub_(shadow, diff, oneMinusDecay);
  });
  return env.Undefined();
}


// ---- The optimizer step with its state on the device (issue #15: no host sync inside a step, so the step can be
// captured in a CUDA graph). The GradScaler's scale and overflow flag, the step count and the learning rate are
// tensors; a step that found inf/NaN gradients changes nothing (the host-side path skips the call instead).

at::Tensor TensorOption(Napi::Env env, const Napi::Object& o, const char* key, const char* fn) {
  return UnwrapTensor(env, o.Get(key), std::string(fn) + " option '" + key + "'");
}

// ampUnscale(grads, scale, foundInf): foundInf ← 1 when any gradient holds inf/NaN, else 0; every gradient ×
// 1/scale in place (GradScaler.unscale_: the reciprocal taken in float64, then float32). No host sync.
Napi::Value AmpUnscale(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<at::Tensor> grads = UnwrapTensorList(env, info[0], "ampUnscale grads");
  at::Tensor scale = UnwrapTensor(env, info[1], "ampUnscale scale");
  at::Tensor foundInf = UnwrapTensor(env, info[2], "ampUnscale foundInf");
  Guard(env, [&] { return "ampUnscale(" + std::to_string(grads.size()) + " grads, scale " + Describe(scale) + ")"; }, [&] {
    c10::AutoGradMode noGrad(false);
    foundInf.zero_();
    if (grads.empty()) return;
    at::Tensor inv = scale.to(at::kDouble).reciprocal().to(at::kFloat);
    if (grads[0].is_cuda()) {
      at::_amp_foreach_non_finite_check_and_unscale_(grads, foundInf, inv);
      return;
    }
    for (auto& g : grads) {
      foundInf.copy_(at::maximum(foundInf, at::isfinite(g).logical_not().any().to(foundInf.scalar_type())));
      g.mul_(inv);
    }
  });
  return env.Undefined();
}

// ampUpdateScale(scale, growthTracker, foundInf, growthFactor, backoffFactor, growthInterval): GradScaler.update on the
// device: on overflow scale × backoff and the tracker to 0; else the tracker + 1, and at growthInterval good steps the
// scale × growth (kept when that is not finite) and the tracker to 0. No host sync.
Napi::Value AmpUpdateScale(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor scale = UnwrapTensor(env, info[0], "ampUpdateScale scale");
  at::Tensor tracker = UnwrapTensor(env, info[1], "ampUpdateScale growthTracker");
  at::Tensor foundInf = UnwrapTensor(env, info[2], "ampUpdateScale foundInf");
  for (int i = 3; i < 6; ++i) {
    if (!info[i].IsNumber()) throw Napi::TypeError::New(env, "ampUpdateScale: growthFactor, backoffFactor and growthInterval must be numbers");
  }
  double growth = info[3].As<Napi::Number>().DoubleValue(), backoff = info[4].As<Napi::Number>().DoubleValue();
  int64_t interval = info[5].As<Napi::Number>().Int64Value();
  Guard(env, [&] { return std::string("ampUpdateScale(scale ") + Describe(scale) + ")"; }, [&] {
    c10::AutoGradMode noGrad(false);
    at::Tensor found = foundInf.ne(0);
    at::Tensor successful = tracker + 1;
    at::Tensor grow = found.logical_not().logical_and(successful.eq(interval));
    at::Tensor grown = scale * growth;
    at::Tensor next = at::where(found, scale * backoff, at::where(grow.logical_and(at::isfinite(grown)), grown, scale));
    tracker.copy_(at::where(found.logical_or(grow), at::zeros_like(successful), successful));
    scale.copy_(next);
  });
  return env.Undefined();
}

// adamwStepOnDevice(params, grads, expAvg, expAvgSq, masters|null, {lr, stepCount, foundInf|null, beta1, beta2, eps,
// weightDecay}): adamwStep's arithmetic with the learning rate lr (a float64 [1] tensor the host fills before each
// step) and the bias corrections of stepCount + 1, read on the device (float64 scalars, as the host path's doubles).
// With foundInf (the scaler's flag) a flagged step leaves parameters, moments and the count as they were; otherwise
// stepCount advances by one. No host sync.
Napi::Value AdamWStepOnDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "adamwStepOnDevice";
  std::vector<at::Tensor> params = UnwrapTensorList(env, info[0], "adamwStepOnDevice params");
  std::vector<at::Tensor> grads = UnwrapTensorList(env, info[1], "adamwStepOnDevice grads");
  std::vector<at::Tensor> expAvg = UnwrapTensorList(env, info[2], "adamwStepOnDevice expAvg");
  std::vector<at::Tensor> expAvgSq = UnwrapTensorList(env, info[3], "adamwStepOnDevice expAvgSq");
  bool useMasters = info[4].IsArray();
  std::vector<at::Tensor> masters = useMasters ? UnwrapTensorList(env, info[4], "adamwStepOnDevice masters") : std::vector<at::Tensor>{};
  if (!info[5].IsObject()) throw Napi::TypeError::New(env, "adamwStepOnDevice: options must be an object");
  Napi::Object o = info[5].As<Napi::Object>();
  at::Tensor lrTensor = TensorOption(env, o, "lr", fn);
  at::Tensor stepCount = TensorOption(env, o, "stepCount", fn);
  Napi::Value fi = o.Get("foundInf");
  bool masked = !fi.IsNull() && !fi.IsUndefined();
  at::Tensor foundInf = masked ? UnwrapTensor(env, fi, "adamwStepOnDevice option 'foundInf'") : at::Tensor();
  double beta1 = NumberOption(env, o, "beta1"), beta2 = NumberOption(env, o, "beta2");
  double eps = NumberOption(env, o, "eps"), weightDecay = NumberOption(env, o, "weightDecay");
  CheckSameLength(env, params.size(), grads.size(), "grads");
  CheckSameLength(env, params.size(), expAvg.size(), "expAvg");
  CheckSameLength(env, params.size(), expAvgSq.size(), "expAvgSq");
  if (useMasters) CheckSameLength(env, params.size(), masters.size(), "masters");
  if (params.empty()) return env.Undefined();

  Guard(env, [&] { return "adamwStepOnDevice(" + std::to_string(params.size()) + " params, first " + Describe(params[0]) + ")"; }, [&] {
    c10::AutoGradMode noGrad(false);
    std::vector<at::Tensor> target = useMasters ? masters : params;
    std::vector<at::Tensor> g(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) {
      g[i] = grads[i].scalar_type() == target[i].scalar_type() ? grads[i] : grads[i].to(target[i].scalar_type());
    }
#ifdef DIFFLORA_FUSED_ADAMW
    // CUDA, libtorch 2.x: one multi-tensor kernel (torch.optim.AdamW(fused=True)'s), which reads the step count and the
    // learning rate on the device and skips a flagged step by itself. DIFFLORA_NO_FUSED_ADAMW=1 keeps the op-by-op path.
    if (target[0].is_cuda() && std::getenv("DIFFLORA_NO_FUSED_ADAMW") == nullptr) {
      at::Tensor advance = masked ? foundInf.eq(0).to(stepCount.scalar_type()) : at::ones_like(stepCount);
      stepCount.add_(advance);  // the kernel reads the new count (as torch's _fused_adamw does after its += 1)
      at::Tensor lr = lrTensor.to(at::kFloat).reshape({});
      std::vector<at::Tensor> steps(target.size(), stepCount.reshape({}));
      at::_fused_adamw_(target, g, expAvg, expAvgSq, {}, steps, lr, beta1, beta2, weightDecay, eps, false, false, c10::nullopt,
                        masked ? c10::optional<at::Tensor>(foundInf) : c10::nullopt);
      if (useMasters) {
        for (size_t i = 0; i < params.size(); ++i) params[i].copy_(masters[i]);
      }
      return;
    }
#endif
    at::Tensor keep = masked ? foundInf.eq(0) : at::Tensor();
    at::Tensor advance = masked ? keep.to(at::kDouble) : at::ones({1}, stepCount.options().dtype(at::kDouble));
    at::Tensor step = stepCount.to(at::kDouble) + 1;
    at::Tensor lr = lrTensor.to(at::kDouble).reshape({1});
    at::Tensor stepSize = (lr / (1 - at::pow(beta1, step))).to(at::kFloat);
    at::Tensor biasCorrection2Sqrt = at::sqrt(1 - at::pow(beta2, step)).to(at::kFloat);
    at::Tensor decay = (1 - lr * weightDecay).to(at::kFloat);
    // the moments: in place, or (masked) new values kept only when the step is not flagged
    std::vector<at::Tensor> m = masked ? at::_foreach_mul(expAvg, beta1) : expAvg;
    std::vector<at::Tensor> v = masked ? at::_foreach_mul(expAvgSq, beta2) : expAvgSq;
    if (!masked) {
      at::_foreach_mul_(m, beta1);
      at::_foreach_mul_(v, beta2);
    }
    at::_foreach_add_(m, g, 1 - beta1);
    at::_foreach_addcmul_(v, g, g, 1 - beta2);
    std::vector<at::Tensor> denom = at::_foreach_sqrt(v);
    for (size_t i = 0; i < target.size(); ++i) {
      at::Tensor& d = denom[i];
      d.div_(biasCorrection2Sqrt.to(d.scalar_type()));
      d.add_(eps);
      // (m · stepSize) / denom, as addcdiv's kernel orders it: on the CPU the same bits as adamwStep
      at::Tensor updated = target[i].mul(decay.to(target[i].scalar_type())).sub_(m[i].mul(stepSize.to(d.scalar_type())).div_(d));
      if (masked) {
        target[i].copy_(at::where(keep, updated, target[i]));
        expAvg[i].copy_(at::where(keep, m[i], expAvg[i]));
        expAvgSq[i].copy_(at::where(keep, v[i], expAvgSq[i]));
      } else {
        target[i].copy_(updated);
      }
      if (useMasters) params[i].copy_(masters[i]);
    }
    stepCount.add_(advance.to(stepCount.scalar_type()));
  });
  return env.Undefined();
}
}  // namespace

void InitOptim(Napi::Env env, Napi::Object exports) {
  exports.Set("adamwStep", Napi::Function::New(env, AdamWStep));
  exports.Set("clipGradNorm", Napi::Function::New(env, ClipGradNorm));
  exports.Set("unscaleGrads", Napi::Function::New(env, UnscaleGrads));
  exports.Set("prodigyStep", Napi::Function::New(env, ProdigyStep));
  exports.Set("lionStep", Napi::Function::New(env, LionStep));
  exports.Set("emaStep", Napi::Function::New(env, EmaStep));
  exports.Set("ampUnscale", Napi::Function::New(env, AmpUnscale));
  exports.Set("ampUpdateScale", Napi::Function::New(env, AmpUpdateScale));
  exports.Set("adamwStepOnDevice", Napi::Function::New(env, AdamWStepOnDevice));
}

}  // namespace difflora
