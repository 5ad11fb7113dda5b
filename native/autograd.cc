// Grad mode, inference mode, autocast regions and random generators. JS pairs every enter with an exit
// in a `finally`, so a throwing op can never leave autocast or no-grad switched on.
#include "common.h"

#include <ATen/autocast_mode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <mutex>

namespace difflora {
namespace {

c10::DeviceType AutocastDevice(Napi::Env env, const Napi::Value& v) {
  std::string s = v.As<Napi::String>();
  if (s == "cpu") return c10::DeviceType::CPU;
  if (s == "cuda") return c10::DeviceType::CUDA;
  throw Napi::TypeError::New(env, "autocast device type must be 'cpu' or 'cuda', got '" + s + "'");
}

#if DIFFLORA_TORCH_AT_LEAST(2, 4)
bool AutocastEnabled(c10::DeviceType d) { return at::autocast::is_autocast_enabled(d); }
void SetAutocastEnabled(c10::DeviceType d, bool on) { at::autocast::set_autocast_enabled(d, on); }
c10::ScalarType AutocastDType(c10::DeviceType d) { return at::autocast::get_autocast_dtype(d); }
void SetAutocastDType(c10::DeviceType d, c10::ScalarType t) { at::autocast::set_autocast_dtype(d, t); }
#else
bool AutocastEnabled(c10::DeviceType d) { return d == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled(); }
void SetAutocastEnabled(c10::DeviceType d, bool on) {
  if (d == c10::DeviceType::CPU) at::autocast::set_cpu_enabled(on); else at::autocast::set_enabled(on);
}
c10::ScalarType AutocastDType(c10::DeviceType d) {
  return d == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype() : at::autocast::get_autocast_gpu_dtype();
}
void SetAutocastDType(c10::DeviceType d, c10::ScalarType t) {
  if (d == c10::DeviceType::CPU) at::autocast::set_autocast_cpu_dtype(t); else at::autocast::set_autocast_gpu_dtype(t);
}
#endif

}  // namespace

AutocastState CurrentAutocast() {
  return {AutocastEnabled(c10::DeviceType::CPU), AutocastEnabled(c10::DeviceType::CUDA),
          AutocastDType(c10::DeviceType::CPU), AutocastDType(c10::DeviceType::CUDA)};
}

void SetAutocast(const AutocastState& s) {
  SetAutocastEnabled(c10::DeviceType::CPU, s.cpuEnabled);
  SetAutocastEnabled(c10::DeviceType::CUDA, s.cudaEnabled);
  SetAutocastDType(c10::DeviceType::CPU, s.cpuDtype);
  SetAutocastDType(c10::DeviceType::CUDA, s.cudaDtype);
}

namespace {

// autocastEnter(deviceType, enabled, dtypeCode) → [prevEnabled, prevDtypeCode]
Napi::Value AutocastEnter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  c10::DeviceType d = AutocastDevice(env, info[0]);
  bool enabled = info[1].ToBoolean();
  c10::ScalarType dtype = DTypeFromCode(env, info[2]);
  if (enabled && d == c10::DeviceType::CPU && dtype != at::kBFloat16) {
    throw Napi::TypeError::New(env, "CPU autocast supports only bfloat16 (libtorch has no float16 matmul on CPU)");
  }
  Napi::Array prev = Napi::Array::New(env, 2);
  prev.Set(0u, Napi::Boolean::New(env, AutocastEnabled(d)));
  prev.Set(1u, Napi::Number::New(env, static_cast<int>(AutocastDType(d))));
  SetAutocastEnabled(d, enabled);
  SetAutocastDType(d, dtype);
  at::autocast::increment_nesting();
  return prev;
}

// autocastExit(deviceType, prevEnabled, prevDtypeCode): restores the state and, leaving the outermost
// region, drops the cache of casted weights as torch.autocast's __exit__ does.
Napi::Value AutocastExit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  c10::DeviceType d = AutocastDevice(env, info[0]);
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  SetAutocastEnabled(d, info[1].ToBoolean());
  SetAutocastDType(d, DTypeFromCode(env, info[2]));
  return env.Undefined();
}

Napi::Value IsAutocastEnabled(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), AutocastEnabled(AutocastDevice(info.Env(), info[0])));
}

// setGradEnabled(on) → previous value
Napi::Value SetGradEnabled(const Napi::CallbackInfo& info) {
  bool prev = c10::GradMode::is_enabled();
  c10::GradMode::set_enabled(info[0].ToBoolean());
  return Napi::Boolean::New(info.Env(), prev);
}

Napi::Value IsGradEnabled(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), c10::GradMode::is_enabled());
}

Napi::Value InferenceModeEnter(const Napi::CallbackInfo& info) {
  AddonData& d = Data(info.Env());
  d.inferenceGuards.push_back(std::make_unique<c10::InferenceMode>(true));
  return Napi::Number::New(info.Env(), static_cast<double>(d.inferenceGuards.size()));
}

Napi::Value InferenceModeExit(const Napi::CallbackInfo& info) {
  AddonData& d = Data(info.Env());
  if (d.inferenceGuards.empty()) throw Napi::Error::New(info.Env(), "inferenceModeExit without enter");
  d.inferenceGuards.pop_back();
  return info.Env().Undefined();
}

// --- Random generators. A JS Generator holds an External to its at::Generator.

Napi::Value WrapGenerator(Napi::Env env, at::Generator g) {
  return Napi::External<at::Generator>::New(env, new at::Generator(std::move(g)),
                                            [](Napi::Env, at::Generator* p) { delete p; });
}

at::Generator& UnwrapGenerator(Napi::Env env, const Napi::Value& v) {
  if (!v.IsExternal()) throw Napi::TypeError::New(env, "expected a native generator");
  return *v.As<Napi::External<at::Generator>>().Data();
}

// generatorNew(device): a fresh generator on that device (CUDA ones are cloned from the default).
Napi::Value GeneratorNew(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  c10::Device device = DeviceFromValue(env, info[0]);
  return Guard(env, [&] { return "Generator(" + device.str() + ")"; }, [&]() -> Napi::Value {
    if (device.is_cpu()) return WrapGenerator(env, at::detail::createCPUGenerator());
    at::Generator def = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(def.mutex());
    return WrapGenerator(env, def.clone());
  });
}

// generatorDefault(device): the device's default generator (what torch.manual_seed seeds).
Napi::Value GeneratorDefault(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  c10::Device device = DeviceFromValue(env, info[0]);
  return Guard(env, [&] { return "defaultGenerator(" + device.str() + ")"; }, [&]() -> Napi::Value {
    return WrapGenerator(env, at::globalContext().defaultGenerator(device));
  });
}

Napi::Value GeneratorSeed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Generator& g = UnwrapGenerator(env, info[0]);
  bool lossless;
  uint64_t seed = info[1].IsBigInt() ? info[1].As<Napi::BigInt>().Uint64Value(&lossless)
                                     : static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value());
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_current_seed(seed);
  return env.Undefined();
}

Napi::Value GeneratorInitialSeed(const Napi::CallbackInfo& info) {
  at::Generator& g = UnwrapGenerator(info.Env(), info[0]);
  return Napi::BigInt::New(info.Env(), g.current_seed());
}

Napi::Value GeneratorGetState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Generator& g = UnwrapGenerator(env, info[0]);
  std::lock_guard<std::mutex> lock(g.mutex());
  return WrapTensor(env, Guard(env, [] { return std::string("Generator.getState"); }, [&] { return g.get_state(); }));
}

Napi::Value GeneratorSetState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Generator& g = UnwrapGenerator(env, info[0]);
  at::Tensor& state = UnwrapTensor(env, info[1], "Generator.setState");
  std::lock_guard<std::mutex> lock(g.mutex());
  Guard(env, [&] { return "Generator.setState(" + Describe(state) + ")"; }, [&] { g.set_state(state); });
  return env.Undefined();
}

// manualSeed(seed): seeds the CPU and every CUDA default generator, as torch.manual_seed does.
Napi::Value ManualSeed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t seed = static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value());
  Guard(env, [] { return std::string("manualSeed"); }, [&] { at::manual_seed(seed); });
  return env.Undefined();
}

}  // namespace

void InitAutograd(Napi::Env env, Napi::Object exports) {
  exports.Set("autocastEnter", Napi::Function::New(env, AutocastEnter));
  exports.Set("autocastExit", Napi::Function::New(env, AutocastExit));
  exports.Set("isAutocastEnabled", Napi::Function::New(env, IsAutocastEnabled));
  exports.Set("setGradEnabled", Napi::Function::New(env, SetGradEnabled));
  exports.Set("isGradEnabled", Napi::Function::New(env, IsGradEnabled));
  exports.Set("inferenceModeEnter", Napi::Function::New(env, InferenceModeEnter));
  exports.Set("inferenceModeExit", Napi::Function::New(env, InferenceModeExit));
  exports.Set("generatorNew", Napi::Function::New(env, GeneratorNew));
  exports.Set("generatorDefault", Napi::Function::New(env, GeneratorDefault));
  exports.Set("generatorSeed", Napi::Function::New(env, GeneratorSeed));
  exports.Set("generatorInitialSeed", Napi::Function::New(env, GeneratorInitialSeed));
  exports.Set("generatorGetState", Napi::Function::New(env, GeneratorGetState));
  exports.Set("generatorSetState", Napi::Function::New(env, GeneratorSetState));
  exports.Set("manualSeed", Napi::Function::New(env, ManualSeed));
}

}  // namespace difflora
