// Shared declarations of the difflora addon: per-addon state, tensor handles, and the error guard
// that turns every libtorch failure into a JS Error instead of aborting Node.
#pragma once

#include <napi.h>
#include <ATen/ATen.h>
#include <torch/version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>

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
struct AddonData {
  Napi::FunctionReference tensorClass;   // the JS class instantiated for every tensor result
  Napi::FunctionReference generatorClass;
  at::Tensor pending;                     // handed to the constructor of the next tensor object
  bool hasPending = false;
  // JS handles that still own a tensor; shared with each handle so finalizers that run during env
  // teardown (after this struct is gone) can still count down safely.
  std::shared_ptr<int64_t> liveTensors = std::make_shared<int64_t>(0);
  std::vector<c10::OperatorHandle> ops;   // resolved once by name, then called by index
  std::vector<std::unique_ptr<c10::InferenceMode>> inferenceGuards;  // entered/exited from JS, LIFO
  std::shared_ptr<Tape> tape;             // set while a checkpointed function runs
};

AddonData& Data(Napi::Env env);

// The native half of a JS tensor. The JS subclass (lib/tensor.ts) adds the PyTorch-named methods.
class TensorHandle : public Napi::ObjectWrap<TensorHandle> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit TensorHandle(const Napi::CallbackInfo& info);
  ~TensorHandle() override;

  at::Tensor& tensor(Napi::Env env);  // throws a JS error when the handle was disposed
  bool disposed() const { return !defined_; }
  void reset(Napi::Env env);

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value IsDisposed(const Napi::CallbackInfo& info);
  Napi::Value Shape(const Napi::CallbackInfo& info);
  Napi::Value Strides(const Napi::CallbackInfo& info);
  Napi::Value DType(const Napi::CallbackInfo& info);
  Napi::Value Device(const Napi::CallbackInfo& info);
  Napi::Value RequiresGrad(const Napi::CallbackInfo& info);
  void SetRequiresGrad(const Napi::CallbackInfo& info, const Napi::Value& value);
  Napi::Value Grad(const Napi::CallbackInfo& info);
  void SetGrad(const Napi::CallbackInfo& info, const Napi::Value& value);
  Napi::Value IsLeaf(const Napi::CallbackInfo& info);
  Napi::Value Numel(const Napi::CallbackInfo& info);
  Napi::Value NBytes(const Napi::CallbackInfo& info);
  Napi::Value Backward(const Napi::CallbackInfo& info);
  Napi::Value SetData(const Napi::CallbackInfo& info);
  Napi::Value ToBuffer(const Napi::CallbackInfo& info);
  Napi::Value DataPtr(const Napi::CallbackInfo& info);

  at::Tensor tensor_;
  bool defined_ = false;
  std::shared_ptr<int64_t> live_;
};

// Wraps a tensor in a new JS tensor object (an instance of the registered JS class).
Napi::Value WrapTensor(Napi::Env env, at::Tensor t);
// Returns the tensor behind a JS tensor object, or throws a TypeError naming `what`.
at::Tensor& UnwrapTensor(Napi::Env env, const Napi::Value& v, const std::string& what);
bool IsTensor(Napi::Env env, const Napi::Value& v);
// The live tensor behind v, or nullptr when v is no tensor or a disposed one (no error built: hot path).
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
void InitDispatch(Napi::Env env, Napi::Object exports);
void InitAutograd(Napi::Env env, Napi::Object exports);
void InitOptim(Napi::Env env, Napi::Object exports);
void InitSafetensors(Napi::Env env, Napi::Object exports);
void InitRuntime(Napi::Env env, Napi::Object exports);
void InitCheckpoint(Napi::Env env, Napi::Object exports);
void InitDistributed(Napi::Env env, Napi::Object exports);

// Called by the dispatcher for every op while a tape records (args as passed, results as returned).
void RecordOp(Tape& tape, const c10::OperatorHandle& op, const torch::jit::Stack& args, const torch::jit::Stack& results);

}  // namespace difflora
