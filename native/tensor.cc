// Tensor ownership across the JS boundary: the slot table (common.h) and the per-tensor functions that
// lib/tensor.ts's Tensor class calls with its id. A tensor is freed by dispose() (or, as a backstop only, by
// the JS FinalizationRegistry in lib/tensor.ts calling tensorRelease with the id it held).
#include "common.h"

#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace difflora {

AddonData& Data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }


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

double TensorSlots::put(at::Tensor t) {
  size_t index;
  if (!free_.empty()) {
    index = free_.back();
    free_.pop_back();
  } else {
    index = tensors_.size();
    if (static_cast<int64_t>(index) > kIndexMask) throw std::runtime_error("more than 16M live tensors");
    tensors_.emplace_back();
    gens_.push_back(0);
  }
  tensors_[index] = std::move(t);
  ++live_;
  return static_cast<double>(static_cast<int64_t>(index) + (static_cast<int64_t>(gens_[index]) << kIndexBits));
}

bool TensorSlots::release(double id) {
  at::Tensor* t = get(id);
  if (!t) return false;
  size_t index = static_cast<size_t>(static_cast<int64_t>(id) & kIndexMask);
  t->reset();
  gens_[index] = (gens_[index] + 1) & ((1u << 28) - 1);  // ids stay below 2^52: exact doubles
  free_.push_back(static_cast<uint32_t>(index));
  --live_;
  return true;
}

Napi::Value TensorId(Napi::Env env, at::Tensor t) {
  if (!t.defined()) return env.Null();
  return Napi::Number::New(env, Data(env).slots.put(std::move(t)));
}

Napi::Value WrapTensor(Napi::Env env, at::Tensor t) {
  if (!t.defined()) return env.Null();
  AddonData& d = Data(env);
  double id = d.slots.put(std::move(t));
  if (d.tensorFactory.IsEmpty()) {
    d.slots.release(id);
    throw Napi::Error::New(env, "difflora: the Tensor class is not registered (load difflora through its index)");
  }
  return d.tensorFactory.Call({Napi::Number::New(env, id)});
}

namespace {

// The id a JS value stands for: a number, or a tensor object's `_id`; NaN when neither.
double IdOf(napi_env env, napi_value v) {
  double id;
  if (napi_get_value_double(env, v, &id) == napi_ok) return id;
  napi_valuetype type;
  if (napi_typeof(env, v, &type) != napi_ok || type != napi_object) return std::nan("");
  napi_value field;
  if (napi_get_named_property(env, v, "_id", &field) != napi_ok) return std::nan("");
  if (napi_get_value_double(env, field, &id) != napi_ok) return std::nan("");
  return id;
}

// Whether v looks like a JS tensor (a number id, or an object with a numeric _id), live or disposed.
bool LooksLikeTensor(napi_env env, napi_value v) { return !std::isnan(IdOf(env, v)); }

}  // namespace

bool IsTensor(Napi::Env env, const Napi::Value& v) { return v.IsObject() && LooksLikeTensor(env, v); }

at::Tensor* TryUnwrapTensor(napi_env env, napi_value v) {
  return Data(Napi::Env(env)).slots.get(IdOf(env, v));
}

at::Tensor& UnwrapTensor(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (at::Tensor* t = TryUnwrapTensor(env, v)) return *t;
  if (!LooksLikeTensor(env, v)) throw Napi::TypeError::New(env, what + ": expected a Tensor");
  throw Napi::Error::New(env, what + ": Tensor is disposed");
}

std::vector<at::Tensor> UnwrapTensorList(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsArray()) throw Napi::TypeError::New(env, what + ": expected an array of Tensors");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<at::Tensor> out;
  out.reserve(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) out.push_back(UnwrapTensor(env, a.Get(i), what + "[" + std::to_string(i) + "]"));
  return out;
}

namespace {

at::Tensor& Self(const Napi::CallbackInfo& info) {
  at::Tensor* t = info.Length() > 0 ? Data(info.Env()).slots.get(info[0].As<Napi::Number>().DoubleValue()) : nullptr;
  if (!t) throw Napi::Error::New(info.Env(), "Tensor is disposed");
  return *t;
}

// tensorRelease(id) → whether it freed a live tensor. dispose() and the finalizer backstop both call it; a
// stale id (already released, slot since reused) is a no-op. Raw N-API: it runs once per tensor.
napi_value Release(napi_env env, napi_callback_info cbi) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, cbi, &argc, argv, nullptr, nullptr);
  double id = -1;
  if (argc < 1 || napi_get_value_double(env, argv[0], &id) != napi_ok) id = -1;
  bool freed = Data(Napi::Env(env)).slots.release(id);
  napi_value result;
  napi_get_boolean(env, freed, &result);
  return result;
}

Napi::Value Shape(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& t = Self(info);
  Napi::Array a = Napi::Array::New(env, t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(t.size(i))));
  return a;
}

Napi::Value Strides(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& t = Self(info);
  Napi::Array a = Napi::Array::New(env, t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(t.stride(i))));
  return a;
}

Napi::Value DType(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<int>(Self(info).scalar_type()));
}

Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), Self(info).device().str()); }

Napi::Value RequiresGrad(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), Self(info).requires_grad()); }

Napi::Value SetRequiresGrad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = Self(info);
  Guard(env, [&] { return "requiresGrad = (" + Describe(t) + ")"; }, [&] { t.requires_grad_(info[1].ToBoolean()); });
  return env.Undefined();
}

// tensorGrad(id) → the gradient's id (a new slot sharing the gradient), or null.
Napi::Value Grad(const Napi::CallbackInfo& info) { return TensorId(info.Env(), Self(info).grad()); }

Napi::Value SetGrad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = Self(info);
  at::Tensor g = info[1].IsNull() || info[1].IsUndefined() ? at::Tensor() : UnwrapTensor(env, info[1], "grad =");
  Guard(env, [&] { return "grad = (" + Describe(t) + ", " + Describe(g) + ")"; }, [&] { t.mutable_grad() = g; });
  return env.Undefined();
}

Napi::Value IsLeaf(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), Self(info).is_leaf()); }

Napi::Value Numel(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(Self(info).numel()));
}

Napi::Value NBytes(const Napi::CallbackInfo& info) {
  const at::Tensor& t = Self(info);
  return Napi::Number::New(info.Env(), static_cast<double>(t.numel() * t.element_size()));
}

// tensorBackward(id, gradient?, retainGraph?)
Napi::Value Backward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = Self(info);
  at::Tensor gradient;
  if (info.Length() > 1 && !info[1].IsUndefined() && !info[1].IsNull()) gradient = UnwrapTensor(env, info[1], "backward(gradient)");
  c10::optional<bool> retain;
  if (info.Length() > 2 && info[2].IsBoolean()) retain = info[2].As<Napi::Boolean>().Value();
  Guard(env, [&] { return "backward(" + Describe(t) + ")"; }, [&] { t.backward(gradient, retain, false); });
  return env.Undefined();
}

// PyTorch's `param.data = other`: the handle keeps its identity and autograd flags, the storage changes.
Napi::Value SetData(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = Self(info);
  at::Tensor src = UnwrapTensor(env, info[1], "setData");
  Guard(env, [&] { return "setData(" + Describe(t) + ", " + Describe(src) + ")"; }, [&] { t.set_data(src); });
  return env.Undefined();
}

// Copies the tensor's elements (row-major, on CPU) into a new ArrayBuffer.
Napi::Value ToBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor& t = Self(info);
  at::Tensor c = Guard(env, [&] { return "toBuffer(" + Describe(t) + ")"; }, [&] {
    return t.detach().to(at::kCPU).contiguous();
  });
  size_t n = c.numel() * c.element_size();
  Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(env, n);
  if (n) std::memcpy(buf.Data(), c.data_ptr(), n);
  return buf;
}

// Address of the first element, for tests of aliasing (views share it) and alignment.
Napi::Value DataPtr(const Napi::CallbackInfo& info) {
  const at::Tensor& t = Self(info);
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())));
}

// setTensorFactory(fn): (id) => Tensor, used where native code returns tensors inside arrays or objects.
Napi::Value SetTensorFactory(const Napi::CallbackInfo& info) {
  Data(info.Env()).tensorFactory = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

}  // namespace

void InitTensor(Napi::Env env, Napi::Object exports) {
  napi_value release;
  NAPI_THROW_IF_FAILED_VOID(env, napi_create_function(env, "tensorRelease", NAPI_AUTO_LENGTH, Release, nullptr, &release));
  exports.Set("tensorRelease", Napi::Value(env, release));
  exports.Set("setTensorFactory", Napi::Function::New(env, SetTensorFactory, "setTensorFactory"));
  exports.Set("tensorShape", Napi::Function::New(env, Shape, "tensorShape"));
  exports.Set("tensorStride", Napi::Function::New(env, Strides, "tensorStride"));
  exports.Set("tensorDtypeCode", Napi::Function::New(env, DType, "tensorDtypeCode"));
  exports.Set("tensorDevice", Napi::Function::New(env, Device, "tensorDevice"));
  exports.Set("tensorRequiresGrad", Napi::Function::New(env, RequiresGrad, "tensorRequiresGrad"));
  exports.Set("tensorSetRequiresGrad", Napi::Function::New(env, SetRequiresGrad, "tensorSetRequiresGrad"));
  exports.Set("tensorGrad", Napi::Function::New(env, Grad, "tensorGrad"));
  exports.Set("tensorSetGrad", Napi::Function::New(env, SetGrad, "tensorSetGrad"));
  exports.Set("tensorIsLeaf", Napi::Function::New(env, IsLeaf, "tensorIsLeaf"));
  exports.Set("tensorNumel", Napi::Function::New(env, Numel, "tensorNumel"));
  exports.Set("tensorNbytes", Napi::Function::New(env, NBytes, "tensorNbytes"));
  exports.Set("tensorBackward", Napi::Function::New(env, Backward, "tensorBackward"));
  exports.Set("tensorSetData", Napi::Function::New(env, SetData, "tensorSetData"));
  exports.Set("tensorToBuffer", Napi::Function::New(env, ToBuffer, "tensorToBuffer"));
  exports.Set("tensorDataPtr", Napi::Function::New(env, DataPtr, "tensorDataPtr"));
}

}  // namespace difflora
