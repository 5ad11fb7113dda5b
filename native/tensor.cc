// The JS tensor handle: owns one at::Tensor until dispose() (or, as a backstop only, the finalizer).
#include "common.h"

#include <sstream>

namespace difflora {

AddonData& Data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

// Every tensor object carries this tag: recognising one is a private-symbol lookup, much cheaper than
// instanceof (which walks prototypes and looks up Symbol.hasInstance), and objects wrapped by other
// addons can never be mistaken for ours.
static const napi_type_tag kTensorTag = {0x6469666c6f726121ULL, 0x74656e736f72f00dULL};

std::string DTypeName(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

std::string Describe(const at::Tensor& t) {
  if (!t.defined()) return "Tensor(undefined)";
  std::ostringstream s;
  s << "Tensor[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << "] " << DTypeName(t.scalar_type()) << " " << t.device().str();
  return s.str();
}

c10::ScalarType DTypeFromCode(Napi::Env env, const Napi::Value& v) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, "dtype must be a dtype code");
  int code = v.As<Napi::Number>().Int32Value();
  if (code < 0 || code >= static_cast<int>(c10::ScalarType::NumOptions))
    throw Napi::TypeError::New(env, "unknown dtype code " + std::to_string(code));
  return static_cast<c10::ScalarType>(code);
}

c10::Device DeviceFromValue(Napi::Env env, const Napi::Value& v) {
  if (!v.IsString()) throw Napi::TypeError::New(env, "device must be a string such as 'cpu' or 'cuda:0'");
  std::string s = v.As<Napi::String>();
  try {
    return c10::Device(s);
  } catch (const c10::Error& e) {
    throw Napi::TypeError::New(env, "invalid device '" + s + "': " + e.what_without_backtrace());
  }
}

Napi::Function TensorHandle::Init(Napi::Env env) {
  return DefineClass(env, "TensorHandle", {
    InstanceMethod("dispose", &TensorHandle::Dispose),
    InstanceAccessor("isDisposed", &TensorHandle::IsDisposed, nullptr),
    InstanceAccessor("shape", &TensorHandle::Shape, nullptr),
    InstanceMethod("stride", &TensorHandle::Strides),
    InstanceAccessor("dtypeCode", &TensorHandle::DType, nullptr),
    InstanceAccessor("device", &TensorHandle::Device, nullptr),
    InstanceAccessor("requiresGrad", &TensorHandle::RequiresGrad, &TensorHandle::SetRequiresGrad),
    InstanceAccessor("_grad", &TensorHandle::Grad, &TensorHandle::SetGrad),
    InstanceAccessor("isLeaf", &TensorHandle::IsLeaf, nullptr),
    InstanceMethod("numel", &TensorHandle::Numel),
    InstanceAccessor("nbytes", &TensorHandle::NBytes, nullptr),
    InstanceMethod("_backward", &TensorHandle::Backward),
    InstanceMethod("_setData", &TensorHandle::SetData),
    InstanceMethod("_toBuffer", &TensorHandle::ToBuffer),
    InstanceMethod("_dataPtr", &TensorHandle::DataPtr),
  });
}

// A tensor object is only ever constructed by WrapTensor, which parks the tensor in AddonData first;
// this avoids allocating an External per result (object creation dominates per-op cost).
TensorHandle::TensorHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorHandle>(info) {
  AddonData& d = Data(info.Env());
  if (!d.hasPending) {
    throw Napi::TypeError::New(info.Env(), "Tensors are created by torch functions (torch.tensor, torch.zeros, ...), not with new");
  }
  tensor_ = std::move(d.pending);
  d.pending = at::Tensor();
  d.hasPending = false;
  defined_ = true;
  Value().TypeTag(&kTensorTag);
  live_ = d.liveTensors;
  (*live_)++;
}

TensorHandle::~TensorHandle() {
  // Finalizer backstop: normally dispose() ran long before.
  if (defined_) {
    tensor_.reset();
    defined_ = false;
    (*live_)--;
  }
}

void TensorHandle::reset(Napi::Env env) {
  if (!defined_) return;
  tensor_.reset();
  defined_ = false;
  (*live_)--;
}

at::Tensor& TensorHandle::tensor(Napi::Env env) {
  if (!defined_) throw Napi::Error::New(env, "Tensor is disposed");
  return tensor_;
}

Napi::Value WrapTensor(Napi::Env env, at::Tensor t) {
  if (!t.defined()) return env.Null();
  AddonData& d = Data(env);
  d.pending = std::move(t);
  d.hasPending = true;
  Napi::Object obj = d.tensorClass.New({});
  return obj;
}

bool IsTensor(Napi::Env env, const Napi::Value& v) {
  if (!v.IsObject()) return false;
  return v.As<Napi::Object>().CheckTypeTag(&kTensorTag);
}

at::Tensor* TryUnwrapTensor(napi_env env, napi_value v) {
  bool tagged = false;
  if (napi_check_object_type_tag(env, v, &kTensorTag, &tagged) != napi_ok || !tagged) return nullptr;
  void* wrapped = nullptr;
  if (napi_unwrap(env, v, &wrapped) != napi_ok || !wrapped) return nullptr;
  TensorHandle* h = static_cast<TensorHandle*>(wrapped);
  return h->disposed() ? nullptr : &h->tensor(Napi::Env(env));
}

at::Tensor& UnwrapTensor(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (at::Tensor* t = TryUnwrapTensor(env, v)) return *t;
  if (!IsTensor(env, v)) throw Napi::TypeError::New(env, what + ": expected a Tensor");
  TensorHandle* h = TensorHandle::Unwrap(v.As<Napi::Object>());
  if (h->disposed()) throw Napi::Error::New(env, what + ": Tensor is disposed");
  return h->tensor(env);
}

std::vector<at::Tensor> UnwrapTensorList(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsArray()) throw Napi::TypeError::New(env, what + ": expected an array of Tensors");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<at::Tensor> out;
  out.reserve(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) out.push_back(UnwrapTensor(env, a.Get(i), what + "[" + std::to_string(i) + "]"));
  return out;
}

Napi::Value TensorHandle::Dispose(const Napi::CallbackInfo& info) {
  reset(info.Env());
  return info.Env().Undefined();
}

Napi::Value TensorHandle::IsDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !defined_); }

Napi::Value TensorHandle::Shape(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& t = tensor(env);
  Napi::Array a = Napi::Array::New(env, t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(t.size(i))));
  return a;
}

Napi::Value TensorHandle::Strides(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& t = tensor(env);
  Napi::Array a = Napi::Array::New(env, t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(t.stride(i))));
  return a;
}

Napi::Value TensorHandle::DType(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<int>(tensor(info.Env()).scalar_type()));
}

Napi::Value TensorHandle::Device(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), tensor(info.Env()).device().str());
}

Napi::Value TensorHandle::RequiresGrad(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), tensor(info.Env()).requires_grad());
}

void TensorHandle::SetRequiresGrad(const Napi::CallbackInfo& info, const Napi::Value& value) {
  Napi::Env env = info.Env();
  at::Tensor& t = tensor(env);
  Guard(env, [&] { return "requiresGrad = (" + Describe(t) + ")"; }, [&] { t.requires_grad_(value.ToBoolean()); });
}

Napi::Value TensorHandle::Grad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return WrapTensor(env, tensor(env).grad());
}

void TensorHandle::SetGrad(const Napi::CallbackInfo& info, const Napi::Value& value) {
  Napi::Env env = info.Env();
  at::Tensor& t = tensor(env);
  at::Tensor g = value.IsNull() || value.IsUndefined() ? at::Tensor() : UnwrapTensor(env, value, "grad =");
  Guard(env, [&] { return "grad = (" + Describe(t) + ", " + Describe(g) + ")"; }, [&] { t.mutable_grad() = g; });
}

Napi::Value TensorHandle::IsLeaf(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), tensor(info.Env()).is_leaf());
}

Napi::Value TensorHandle::Numel(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(tensor(info.Env()).numel()));
}

Napi::Value TensorHandle::NBytes(const Napi::CallbackInfo& info) {
  const at::Tensor& t = tensor(info.Env());
  return Napi::Number::New(info.Env(), static_cast<double>(t.numel() * t.element_size()));
}

// backward(gradient?, retainGraph?)
Napi::Value TensorHandle::Backward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = tensor(env);
  at::Tensor gradient;
  if (info.Length() > 0 && !info[0].IsUndefined() && !info[0].IsNull()) gradient = UnwrapTensor(env, info[0], "backward(gradient)");
  c10::optional<bool> retain;
  if (info.Length() > 1 && info[1].IsBoolean()) retain = info[1].As<Napi::Boolean>().Value();
  Guard(env, [&] { return "backward(" + Describe(t) + ")"; }, [&] { t.backward(gradient, retain, false); });
  return env.Undefined();
}

// PyTorch's `param.data = other`: the handle keeps its identity and autograd flags, the storage changes.
Napi::Value TensorHandle::SetData(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = tensor(env);
  at::Tensor& src = UnwrapTensor(env, info[0], "setData");
  Guard(env, [&] { return "setData(" + Describe(t) + ", " + Describe(src) + ")"; }, [&] { t.set_data(src); });
  return env.Undefined();
}

// Copies the tensor's elements (row-major, on CPU) into a new ArrayBuffer.
Napi::Value TensorHandle::ToBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = tensor(env);
  at::Tensor c = Guard(env, [&] { return "toBuffer(" + Describe(t) + ")"; }, [&] {
    return t.detach().to(at::kCPU).contiguous();
  });
  size_t n = c.numel() * c.element_size();
  Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(env, n);
  if (n) std::memcpy(buf.Data(), c.data_ptr(), n);
  return buf;
}

// Address of the first element, for tests of aliasing (views share it) and alignment.
Napi::Value TensorHandle::DataPtr(const Napi::CallbackInfo& info) {
  const at::Tensor& t = tensor(info.Env());
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())));
}

}  // namespace difflora
