// Entry point of the difflora addon: installs the caching CPU allocator before any tensor exists, then
// registers each source file's functions.
#include "common.h"
#include "allocator.h"

namespace difflora {
namespace {

// setTensorClass(cls): the JS class (a subclass of TensorHandle) that wraps every tensor result.
Napi::Value SetTensorClass(const Napi::CallbackInfo& info) {
  Data(info.Env()).tensorClass = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  alloc::install();
  env.SetInstanceData(new AddonData());
  Napi::Function handle = TensorHandle::Init(env);
  Data(env).tensorClass = Napi::Persistent(handle);
  exports.Set("TensorHandle", handle);
  exports.Set("setTensorClass", Napi::Function::New(env, SetTensorClass));
  InitDispatch(env, exports);
  InitAutograd(env, exports);
  InitOptim(env, exports);
  InitSafetensors(env, exports);
  InitRuntime(env, exports);
  InitCheckpoint(env, exports);
  InitDistributed(env, exports);
  return exports;
}

}  // namespace difflora

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return difflora::Init(env, exports); }

NODE_API_MODULE(difflora, InitAddon)
