// Shared declarations of the difflora addon: per-addon state, tensor handles, and the error guard
// that turns every libtorch failure into a JS Error instead of aborting Node.
#pragma once

#include <napi.h>
#include <ATen/ATen.h>
#include <torch/version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>  // at::GradMode, at::NoGradGuard (1.13's Dispatcher.h includes it; do not rely on that)
#include <c10/core/InferenceMode.h>

#include <deque>
#include <memory>

#include <string>
#include <vector>

// libtorch 2.4 reworked autocast and the Allocator interface; code that differs is guarded with this.
#define DIFFLORA_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace difflora {

struct Tape;  // checkpoint.cc: the op calls recorded inside a checkpointed region

// Per-addon state lives in the env's instance data (never in C++ statics): vitest may load the addon
// in several workers of one process.
// Tensors owned by JS live in a slot table; a JS tensor object holds only its slot's id (a number), so
// passing a tensor to an op is reading a number and creating a result is a plain JS allocation (no
// ObjectWrap, no type tag, no per-object N-API reference). An id is index + generation * 2^24: an id kept
// after its tensor was disposed never reaches the slot's next tenant (the finalizer backstop relies on it).
class TensorSlots {
 public:
  static constexpr int64_t kIndexBits = 24;
  static constexpr int64_t kIndexMask = (int64_t{1} << kIndexBits) - 1;
  // The tensor behind id, or nullptr when the id is not a live one (disposed, stale, not an integer).
  at::Tensor* get(double id) {
    if (!(id >= 0) || id > 9007199254740991.0) return nullptr;
    int64_t i = static_cast<int64_t>(id);
    if (static_cast<double>(i) != id) return nullptr;
    size_t index = static_cast<size_t>(i & kIndexMask);
    if (index >= tensors_.size() || gens_[index] != static_cast<uint32_t>(i >> kIndexBits)) return nullptr;
    at::Tensor& t = tensors_[index];
    return t.defined() ? &t : nullptr;
  }
  double put(at::Tensor t);
  bool release(double id);  // false when id was not live
  int64_t live() const { return live_; }

 private:
  std::deque<at::Tensor> tensors_;  // a deque: references stay valid while new slots are added
  std::vector<uint32_t> gens_;
  std::vector<uint32_t> free_;
  int64_t live_ = 0;
};

// Per-addon state lives in the env's instance data (never in C++ statics): vitest may load the addon
// in several workers of one process.
struct AddonData {
  Napi::FunctionReference tensorFactory;  // JS (id) => Tensor, for tensors returned inside arrays/objects
  Napi::FunctionReference generatorClass;
  TensorSlots slots;                       // every tensor a JS object owns
  std::vector<c10::OperatorHandle> ops;   // resolved once by name, then called by index
  std::vector<std::unique_ptr<c10::InferenceMode>> inferenceGuards;  // entered/exited from JS, LIFO
  std::shared_ptr<Tape> tape;             // set while a checkpointed function runs
};

AddonData& Data(Napi::Env env);

// A new slot for t; returns its id (the value a JS tensor object holds), or null for an undefined tensor.
Napi::Value TensorId(Napi::Env env, at::Tensor t);
// Wraps a tensor in a new JS tensor object (through the registered factory).
Napi::Value WrapTensor(Napi::Env env, at::Tensor t);
// Returns the tensor behind a JS tensor object or a tensor id, or throws a TypeError naming `what`.
at::Tensor& UnwrapTensor(Napi::Env env, const Napi::Value& v, const std::string& what);
bool IsTensor(Napi::Env env, const Napi::Value& v);
// The live tensor behind v (a tensor id, or a JS tensor object), or nullptr (no error built: hot path).
at::Tensor* TryUnwrapTensor(napi_env env, napi_value v);
std::vector<at::Tensor> UnwrapTensorList(Napi::Env env, const Napi::Value& v, const std::string& what);

// Human-readable description of a tensor for error messages: "Tensor[2, 3] float32 cpu".
std::string Describe(const at::Tensor& t);
c10::ScalarType DTypeFromCode(Napi::Env env, const Napi::Value& v);
c10::Device DeviceFromValue(Napi::Env env, const Napi::Value& v);
std::string DTypeName(c10::ScalarType t);

// Runs `body`, converting C++ exceptions into JS errors that start with `what` (the op's name and inputs).
template <typename F>
auto Guard(Napi::Env env, const std::function<std::string()>& what, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Napi::Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Napi::Error::New(env, what() + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, what() + ": " + e.what());
  }
}

// Autocast state of CPU and CUDA (autograd.cc), captured and re-entered around a checkpoint replay.
struct AutocastState {
  bool cpuEnabled = false, cudaEnabled = false;
  c10::ScalarType cpuDtype = at::kBFloat16, cudaDtype = at::kHalf;
};
AutocastState CurrentAutocast();
void SetAutocast(const AutocastState& s);
struct AutocastGuard {
  AutocastState saved;
  explicit AutocastGuard(const AutocastState& s) : saved(CurrentAutocast()) { SetAutocast(s); }
  ~AutocastGuard() { SetAutocast(saved); }
};

// Registration functions of each source file.
void InitTensor(Napi::Env env, Napi::Object exports);
void InitDispatch(Napi::Env env, Napi::Object exports);
void InitAutograd(Napi::Env env, Napi::Object exports);
void InitOptim(Napi::Env env, Napi::Object exports);
void InitSafetensors(Napi::Env env, Napi::Object exports);
void InitRuntime(Napi::Env env, Napi::Object exports);
void InitCheckpoint(Napi::Env env, Napi::Object exports);
void InitDistributed(Napi::Env env, Napi::Object exports);
void InitGraph(Napi::Env env, Napi::Object exports);

// Whether a CUDA graph is being captured in this process (graph.cc; false in a build without CUDA). While it is, a
// CUDA generator's state cannot be read (libtorch refuses), which gradient checkpointing's tape needs to know.
bool CudaGraphCapturing();

// Called by the dispatcher for every op while a tape records (args as passed, results as returned).
void RecordOp(Tape& tape, const c10::OperatorHandle& op, const torch::jit::Stack& args, const torch::jit::Stack& results);

}  // namespace difflora
