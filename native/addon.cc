// Entry point of the difflora addon: installs the caching CPU allocator before any tensor exists, then
// registers each source file's functions.
#include "common.h"
#include "allocator.h"

namespace difflora {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  alloc::install();
  env.SetInstanceData(new AddonData());
  InitTensor(env, exports);
  InitDispatch(env, exports);
  InitAutograd(env, exports);
  InitOptim(env, exports);
  InitSafetensors(env, exports);
  InitRuntime(env, exports);
  InitCheckpoint(env, exports);
  InitDistributed(env, exports);
  InitGraph(env, exports);
  return exports;
}

}  // namespace difflora

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return difflora::Init(env, exports); }

NODE_API_MODULE(difflora, InitAddon)
