// Process-level facts and knobs: versions, devices, threads, memory counters, and tensors from JS buffers.
#include "common.h"
#include "allocator.h"

#include <ATen/Parallel.h>
#ifdef DIFFLORA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace difflora {
namespace {

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("torchVersion", TORCH_VERSION);
  o.Set("cudaAvailable", at::hasCUDA());
#ifdef DIFFLORA_WITH_CUDA
  o.Set("cudaCompiled", true);
#else
  o.Set("cudaCompiled", false);
#endif
  o.Set("cudaDeviceCount", static_cast<double>(at::hasCUDA() ? at::detail::getCUDAHooks().getNumGPUs() : 0));
  o.Set("numThreads", at::get_num_threads());
  o.Set("numInteropThreads", at::get_num_interop_threads());
  o.Set("parallelInfo", at::get_parallel_info());
  o.Set("mkldnn", at::hasMKLDNN());
  o.Set("allocator", alloc::installed() ? "difflora caching (mmap for blocks >= 256 KiB)" : "libtorch default");
  return o;
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 1) throw Napi::RangeError::New(info.Env(), "setNumThreads: need at least 1 thread");
  at::set_num_threads(n);
  return info.Env().Undefined();
}

// memory() → counters; live tensors are the JS handles not yet disposed.
Napi::Value Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("numTensors", static_cast<double>(Data(env).slots.live()));
  alloc::Stats s = alloc::stats();
  Napi::Object cpu = Napi::Object::New(env);
  cpu.Set("allocatedBytes", static_cast<double>(s.allocatedBytes));
  cpu.Set("requestedBytes", static_cast<double>(s.requestedBytes));
  cpu.Set("cachedBytes", static_cast<double>(s.cachedBytes));
  cpu.Set("peakAllocatedBytes", static_cast<double>(s.peakAllocatedBytes));
  cpu.Set("numAllocs", static_cast<double>(s.numAllocs));
  cpu.Set("cacheHits", static_cast<double>(s.cacheHits));
  cpu.Set("cacheMisses", static_cast<double>(s.cacheMisses));
  cpu.Set("numLiveBlocks", static_cast<double>(s.numLiveBlocks));
  cpu.Set("cacheCapBytes", static_cast<double>(s.cacheCapBytes));
  o.Set("cpu", cpu);
  Napi::Array cuda = Napi::Array::New(env);
#ifdef DIFFLORA_WITH_CUDA
  // Index 0 of each stat array is the aggregate over pool types (StatType::AGGREGATE in every version).
  int n = at::hasCUDA() ? at::detail::getCUDAHooks().getNumGPUs() : 0;
  for (int i = 0; i < n; ++i) {
    auto st = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(i));
    Napi::Object dev = Napi::Object::New(env);
    dev.Set("allocatedBytes", static_cast<double>(st.allocated_bytes[0].current));
    dev.Set("peakAllocatedBytes", static_cast<double>(st.allocated_bytes[0].peak));
    dev.Set("reservedBytes", static_cast<double>(st.reserved_bytes[0].current));
    cuda.Set(static_cast<uint32_t>(i), dev);
  }
#endif
  o.Set("cuda", cuda);
  return o;
}

Napi::Value EmptyCache(const Napi::CallbackInfo& info) {
  alloc::emptyCache();
#ifdef DIFFLORA_WITH_CUDA
  if (at::hasCUDA()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  return info.Env().Undefined();
}

Napi::Value SetCacheCap(const Napi::CallbackInfo& info) {
  alloc::setCacheCap(static_cast<uint64_t>(info[0].As<Napi::Number>().DoubleValue()));
  return info.Env().Undefined();
}

Napi::Value ResetPeak(const Napi::CallbackInfo& info) {
  alloc::resetPeak();
  return info.Env().Undefined();
}

// fromBuffer(typedArray, dtypeCode, shape, device?) → a new tensor holding a copy of the bytes.
Napi::Value FromBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "fromBuffer: expected a TypedArray");
  Napi::TypedArray arr = info[0].As<Napi::TypedArray>();
  c10::ScalarType dtype = DTypeFromCode(env, info[1]);
  Napi::Array shapeJs = info[2].As<Napi::Array>();
  std::vector<int64_t> shape(shapeJs.Length());
  int64_t numel = 1;
  for (uint32_t i = 0; i < shapeJs.Length(); ++i) {
    shape[i] = shapeJs.Get(i).As<Napi::Number>().Int64Value();
    if (shape[i] < 0) throw Napi::RangeError::New(env, "fromBuffer: negative dimension");
    numel *= shape[i];
  }
  size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (arr.ByteLength() != nbytes) {
    throw Napi::RangeError::New(env, "fromBuffer: " + std::to_string(arr.ByteLength()) + " bytes given, shape and dtype " +
                                         DTypeName(dtype) + " need " + std::to_string(nbytes));
  }
  const uint8_t* src = static_cast<const uint8_t*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  if (nbytes) std::memcpy(t.data_ptr(), src, nbytes);
  if (info.Length() > 3 && info[3].IsString()) {
    c10::Device device = DeviceFromValue(env, info[3]);
    if (!device.is_cpu()) t = Guard(env, [&] { return "fromBuffer to " + device.str(); }, [&] { return t.to(device); });
  }
  return WrapTensor(env, t);
}

// setAllowTF32(on): TF32 tensor-core math for CUDA matmuls and cuDNN convolutions (Ampere and newer), as
// torch.backends.cuda.matmul.allow_tf32 / torch.backends.cudnn.allow_tf32. Returns the previous matmul flag.
Napi::Value SetAllowTF32(const Napi::CallbackInfo& info) {
  bool on = info[0].ToBoolean();
  bool prev = at::globalContext().allowTF32CuBLAS();
  at::globalContext().setAllowTF32CuBLAS(on);
  at::globalContext().setAllowTF32CuDNN(on);
  return Napi::Boolean::New(info.Env(), prev);
}

Napi::Value Synchronize(const Napi::CallbackInfo& info) {
  if (at::hasCUDA()) at::detail::getCUDAHooks().deviceSynchronize(at::detail::getCUDAHooks().current_device());
  return info.Env().Undefined();
}

}  // namespace

void InitRuntime(Napi::Env env, Napi::Object exports) {
  exports.Set("info", Napi::Function::New(env, Info));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads));
  exports.Set("memory", Napi::Function::New(env, Memory));
  exports.Set("emptyCache", Napi::Function::New(env, EmptyCache));
  exports.Set("setCacheCap", Napi::Function::New(env, SetCacheCap));
  exports.Set("resetPeakMemory", Napi::Function::New(env, ResetPeak));
  exports.Set("fromBuffer", Napi::Function::New(env, FromBuffer));
  exports.Set("setAllowTF32", Napi::Function::New(env, SetAllowTF32));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize));
}

}  // namespace difflora
