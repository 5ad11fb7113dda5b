// Calls any ATen operator through the c10 dispatcher. JS resolves an operator once by name
// (`op("aten::add", "Tensor")` → index) and then calls it by index; arguments are converted from JS by
// the operator's own schema, so the native surface stays one function however many ops TS exposes.
#include "common.h"

#include <sstream>

namespace difflora {
namespace {

bool IsTensorType(const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::OptionalType) return IsTensorType(type->expectRef<c10::OptionalType>().getElementType());
  return type->kind() == c10::TypeKind::TensorType;
}

// Tensor[] and Tensor?[] (cat, stack, index).
bool IsTensorListType(const c10::TypePtr& type) {
  return type->kind() == c10::TypeKind::ListType && IsTensorType(type->expectRef<c10::ListType>().getElementType());
}

// asTensor: the argument's schema position holds a tensor, so a number there is a tensor id.
std::string ArgDescription(Napi::Env env, const Napi::Value& v, bool asTensor) {
  if ((asTensor && v.IsNumber()) || IsTensor(env, v)) {
    at::Tensor* t = TryUnwrapTensor(env, v);
    return t ? Describe(*t) : "Tensor(disposed)";
  }
  if (v.IsArray()) {
    Napi::Array a = v.As<Napi::Array>();
    std::string s = "[";
    for (uint32_t i = 0; i < a.Length() && i < 8; ++i) s += (i ? ", " : "") + ArgDescription(env, a.Get(i), asTensor);
    return s + (a.Length() > 8 ? ", ...]" : "]");
  }
  if (v.IsNumber()) {
    std::ostringstream o;
    o << v.As<Napi::Number>().DoubleValue();
    return o.str();
  }
  if (v.IsString()) return "'" + v.As<Napi::String>().Utf8Value() + "'";
  if (v.IsBoolean()) return v.As<Napi::Boolean>().Value() ? "true" : "false";
  if (v.IsNull() || v.IsUndefined()) return "None";
  return "<object>";
}

std::string CallDescription(Napi::Env env, const napi_value* argv, size_t argc, const c10::OperatorHandle& op) {
  const auto& name = op.operator_name();
  const auto& args = op.schema().arguments();
  std::string s = name.name + (name.overload_name.empty() ? "" : "." + name.overload_name) + "(";
  for (size_t i = 1; i < argc; ++i) {
    bool asTensor = i - 1 < args.size() && (IsTensorType(args[i - 1].type()) || IsTensorListType(args[i - 1].type()));
    s += (i > 1 ? ", " : "") + ArgDescription(env, Napi::Value(env, argv[i]), asTensor);
  }
  return s + ")";
}

[[noreturn]] void BadArg(Napi::Env env, const c10::Argument& arg, const std::string& expected) {
  throw Napi::TypeError::New(env, "argument '" + arg.name() + "' must be " + expected);
}

int64_t ToInt(Napi::Env env, const Napi::Value& v, const c10::Argument& arg) {
  double d;
  if (napi_get_value_double(env, v, &d) == napi_ok) {
    if (d != static_cast<double>(static_cast<int64_t>(d))) BadArg(env, arg, "an integer");
    return static_cast<int64_t>(d);
  }
  if (v.IsBigInt()) {
    bool lossless;
    return v.As<Napi::BigInt>().Int64Value(&lossless);
  }
  if (v.IsBoolean()) return v.As<Napi::Boolean>().Value() ? 1 : 0;
  BadArg(env, arg, "an integer");
}

c10::IValue ToList(Napi::Env env, const Napi::Value& v, const c10::ListTypePtr& type, const c10::Argument& arg) {
  const c10::TypePtr& elem = type->getElementType();
  // Python accepts a single int where the schema says int[N] (e.g. stride=1 for conv2d).
  if (!v.IsArray()) {
    if (elem->kind() == c10::TypeKind::IntType && (v.IsNumber() || v.IsBigInt()) && arg.N()) {
      return c10::IValue(std::vector<int64_t>(*arg.N(), ToInt(env, v, arg)));
    }
    BadArg(env, arg, "an array (" + type->str() + ")");
  }
  Napi::Array a = v.As<Napi::Array>();
  uint32_t n = a.Length();
  switch (elem->kind()) {
    case c10::TypeKind::IntType:
    case c10::TypeKind::SymIntType: {
      std::vector<int64_t> out(n);
      for (uint32_t i = 0; i < n; ++i) out[i] = ToInt(env, a.Get(i), arg);
      return c10::IValue(out);
    }
    case c10::TypeKind::FloatType: {
      std::vector<double> out(n);
      for (uint32_t i = 0; i < n; ++i) {
        Napi::Value x = a.Get(i);
        if (!x.IsNumber()) BadArg(env, arg, "an array of numbers");
        out[i] = x.As<Napi::Number>().DoubleValue();
      }
      return c10::IValue(out);
    }
    case c10::TypeKind::BoolType: {
      c10::List<bool> out;
      for (uint32_t i = 0; i < n; ++i) out.push_back(a.Get(i).ToBoolean().Value());
      return c10::IValue(out);
    }
    case c10::TypeKind::TensorType: {
      c10::List<at::Tensor> out;
      out.reserve(n);
      for (uint32_t i = 0; i < n; ++i) {
        Napi::Value x = a.Get(i);
        at::Tensor* t = TryUnwrapTensor(env, x);
        out.push_back(t ? *t : UnwrapTensor(env, x, "argument '" + arg.name() + "'"));  // throws the right error
      }
      return c10::IValue(out);
    }
    case c10::TypeKind::OptionalType: {  // Tensor?[] (index)
      c10::List<c10::optional<at::Tensor>> out;
      for (uint32_t i = 0; i < n; ++i) {
        Napi::Value x = a.Get(i);
        if (x.IsNull() || x.IsUndefined()) out.push_back(c10::nullopt);
        else out.push_back(UnwrapTensor(env, x, "argument '" + arg.name() + "'"));
      }
      return c10::IValue(out);
    }
    default:
      BadArg(env, arg, "a supported list type (got schema type " + type->str() + ")");
  }
}

c10::IValue ToIValue(Napi::Env env, const Napi::Value& v, const c10::TypePtr& type, const c10::Argument& arg) {
  switch (type->kind()) {
    case c10::TypeKind::OptionalType: {
      napi_valuetype t;
      napi_typeof(env, v, &t);
      if (t == napi_null || t == napi_undefined) return c10::IValue();
      return ToIValue(env, v, type->expectRef<c10::OptionalType>().getElementType(), arg);
    }
    case c10::TypeKind::TensorType:
      if (at::Tensor* t = TryUnwrapTensor(env, v)) return c10::IValue(*t);
      return c10::IValue(UnwrapTensor(env, v, "argument '" + arg.name() + "'"));  // throws the right error
    case c10::TypeKind::IntType:
    case c10::TypeKind::SymIntType:
    case c10::TypeKind::ScalarTypeType:
    case c10::TypeKind::LayoutType:
    case c10::TypeKind::MemoryFormatType:
      return c10::IValue(ToInt(env, v, arg));
    case c10::TypeKind::FloatType:
    case c10::TypeKind::SymFloatType: {
      double d;
      if (napi_get_value_double(env, v, &d) != napi_ok) BadArg(env, arg, "a number");
      return c10::IValue(d);
    }
    case c10::TypeKind::BoolType:
      if (!v.IsBoolean()) BadArg(env, arg, "a boolean");
      return c10::IValue(v.As<Napi::Boolean>().Value());
    case c10::TypeKind::NumberType: {  // Scalar: integral JS numbers are ints, as Python literals would be
      double d;
      if (napi_get_value_double(env, v, &d) != napi_ok) {
        if (v.IsBoolean()) return c10::IValue(v.As<Napi::Boolean>().Value());
        if (v.IsBigInt()) return c10::IValue(ToInt(env, v, arg));
        BadArg(env, arg, "a number");
      }
      if (std::abs(d) < 9007199254740992.0 && d == static_cast<double>(static_cast<int64_t>(d)))
        return c10::IValue(static_cast<int64_t>(d));
      return c10::IValue(d);
    }
    case c10::TypeKind::StringType:
      if (!v.IsString()) BadArg(env, arg, "a string");
      return c10::IValue(v.As<Napi::String>().Utf8Value());
    case c10::TypeKind::DeviceObjType:
      return c10::IValue(DeviceFromValue(env, v));
    case c10::TypeKind::GeneratorType: {
      Napi::Value gen = v.IsObject() ? v.As<Napi::Object>().Get("_native") : v;
      if (!gen.IsExternal()) BadArg(env, arg, "a Generator");
      return c10::IValue(*gen.As<Napi::External<at::Generator>>().Data());
    }
    case c10::TypeKind::ListType:
      return ToList(env, v, type->expect<c10::ListType>(), arg);
    default:
      BadArg(env, arg, "of a supported type (schema type " + type->str() + ")");
  }
}

Napi::Value FromIValue(Napi::Env env, const c10::IValue& v) {
  if (v.isTensor()) return WrapTensor(env, v.toTensor());
  if (v.isNone()) return env.Null();
  if (v.isInt()) return Napi::Number::New(env, static_cast<double>(v.toInt()));
  if (v.isDouble()) return Napi::Number::New(env, v.toDouble());
  if (v.isBool()) return Napi::Boolean::New(env, v.toBool());
  if (v.isString()) return Napi::String::New(env, v.toStringRef());
  if (v.isTensorList()) {
    auto list = v.toTensorList();
    Napi::Array a = Napi::Array::New(env, list.size());
    for (size_t i = 0; i < list.size(); ++i) a.Set(static_cast<uint32_t>(i), WrapTensor(env, list.get(i)));
    return a;
  }
  if (v.isTuple()) {
    const auto& elems = v.toTupleRef().elements();
    Napi::Array a = Napi::Array::New(env, elems.size());
    for (size_t i = 0; i < elems.size(); ++i) a.Set(static_cast<uint32_t>(i), FromIValue(env, elems[i]));
    return a;
  }
  if (v.isList()) {
    auto list = v.toListRef();
    Napi::Array a = Napi::Array::New(env, list.size());
    for (size_t i = 0; i < list.size(); ++i) a.Set(static_cast<uint32_t>(i), FromIValue(env, list[i]));
    return a;
  }
  if (v.isDevice()) return Napi::String::New(env, v.toDevice().str());
  throw Napi::TypeError::New(env, std::string("cannot return a value of type ") + v.tagKind() + " to JS");
}

// op(name, overload) → index for call(). Unknown names are an error at resolve time, not call time.
Napi::Value ResolveOp(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string name = info[0].As<Napi::String>();
  std::string overload = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
  auto handle = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, overload));
  if (!handle) throw Napi::Error::New(env, "unknown operator " + name + (overload.empty() ? "" : "." + overload) + " in this libtorch (" TORCH_VERSION ")");
  AddonData& d = Data(env);
  d.ops.push_back(*handle);
  return Napi::Number::New(env, static_cast<double>(d.ops.size() - 1));
}

int32_t FastCodeFor(const c10::OperatorHandle& op);  // below, with the fast paths

// opInfo(index) → [tensorArgs, tensorListArgs, singleTensorResult, fastCode]: the positions (0-based, in schema order)
// where lib/ops.ts passes tensor ids instead of tensor objects, and whether call() returns a tensor id.
Napi::Value OpInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData& d = Data(env);
  uint32_t index = info[0].As<Napi::Number>().Uint32Value();
  if (index >= d.ops.size()) throw Napi::RangeError::New(env, "no operator with index " + std::to_string(index));
  const c10::FunctionSchema& schema = d.ops[index].schema();
  Napi::Array tensors = Napi::Array::New(env), lists = Napi::Array::New(env);
  for (size_t i = 0; i < schema.arguments().size(); ++i) {
    const c10::TypePtr& type = schema.arguments()[i].type();
    if (IsTensorType(type)) tensors.Set(tensors.Length(), Napi::Number::New(env, static_cast<double>(i)));
    else if (IsTensorListType(type)) lists.Set(lists.Length(), Napi::Number::New(env, static_cast<double>(i)));
  }
  const auto& returns = schema.returns();
  bool single = returns.size() == 1 && returns[0].type()->kind() == c10::TypeKind::TensorType;
  Napi::Array out = Napi::Array::New(env, 4);
  out.Set(0u, tensors);
  out.Set(1u, lists);
  out.Set(2u, Napi::Boolean::New(env, single));
  out.Set(3u, Napi::Number::New(env, FastCodeFor(d.ops[index])));
  return out;
}

// call(index, ...args): positional arguments in schema order; missing or undefined ones take the
// schema default; at tensor positions a tensor id (lib/ops.ts converts). An op returning one Tensor
// returns its id (lib/ops.ts makes the JS object; null for an undefined tensor); other results come back
// as JS values with tensor objects. callVoid drops the results (in-place ops, whose result is their input).
// Raw N-API: this runs for every op, and node-addon-api's CallbackInfo costs an extra call per invocation.
napi_value CallOpImpl(napi_env rawEnv, napi_callback_info cbi, bool wantResult) {
  Napi::Env env(rawEnv);
  napi_value stackArgv[16];
  size_t argc = 16;
  napi_get_cb_info(rawEnv, cbi, &argc, stackArgv, nullptr, nullptr);
  std::vector<napi_value> heapArgv;
  const napi_value* argv = stackArgv;
  if (argc > 16) {
    heapArgv.resize(argc);
    napi_get_cb_info(rawEnv, cbi, &argc, heapArgv.data(), nullptr, nullptr);
    argv = heapArgv.data();
  }
  AddonData& d = Data(env);
  uint32_t index = 0;
  if (argc < 1 || napi_get_value_uint32(rawEnv, argv[0], &index) != napi_ok || index >= d.ops.size()) {
    throw Napi::RangeError::New(env, "call: no operator with index " + std::to_string(index));
  }
  const c10::OperatorHandle& op = d.ops[index];
  const c10::FunctionSchema& schema = op.schema();
  const auto& args = schema.arguments();
  size_t given = argc - 1;
  if (given > args.size()) {
    throw Napi::TypeError::New(env, CallDescription(env, argv, argc, op) + ": too many arguments for " + toString(schema));
  }
  torch::jit::Stack stack;
  stack.reserve(args.size());
  try {
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::Argument& arg = args[i];
      napi_value raw = i < given ? argv[i + 1] : nullptr;
      if (raw && arg.type()->kind() == c10::TypeKind::TensorType) {  // the hot case: a tensor id
        double id;
        if (napi_get_value_double(rawEnv, raw, &id) == napi_ok) {
          if (at::Tensor* t = d.slots.get(id)) { stack.emplace_back(*t); continue; }
        }
      }
      Napi::Value v = raw ? Napi::Value(env, raw) : env.Undefined();
      if (v.IsUndefined()) {
        if (arg.default_value()) { stack.push_back(*arg.default_value()); continue; }
        if (arg.type()->kind() == c10::TypeKind::OptionalType) { stack.emplace_back(); continue; }
        throw Napi::TypeError::New(env, "missing argument '" + arg.name() + "'");
      }
      stack.push_back(ToIValue(env, v, arg.type(), arg));
    }
  } catch (const Napi::Error& e) {
    throw Napi::TypeError::New(env, CallDescription(env, argv, argc, op) + ": " + e.Message() + " (schema: " + toString(schema) + ")");
  }
  if (d.tape) {
    torch::jit::Stack args = stack;  // IValues are reference-counted: a cheap copy, only while recording
    Guard(env, [&] { return CallDescription(env, argv, argc, op); }, [&] { op.callBoxed(&stack); });
    RecordOp(*d.tape, op, args, stack);
  } else {
    Guard(env, [&] { return CallDescription(env, argv, argc, op); }, [&] { op.callBoxed(&stack); });
  }
  if (stack.empty() || !wantResult) return env.Undefined();
  const auto& returns = schema.returns();
  if (returns.size() == 1 && returns[0].type()->kind() == c10::TypeKind::TensorType && stack.size() == 1) {
    return TensorId(env, stack[0].isTensor() ? stack[0].toTensor() : at::Tensor());
  }
  if (stack.size() == 1) return FromIValue(env, stack[0]);
  Napi::Array out = Napi::Array::New(env, stack.size());
  for (size_t i = 0; i < stack.size(); ++i) out.Set(static_cast<uint32_t>(i), FromIValue(env, stack[i]));
  return out;
}

// Every raw entry point converts C++ exceptions into pending JS exceptions, as node-addon-api's wrappers do.
template <bool WantResult>
napi_value CallOpEntry(napi_env env, napi_callback_info cbi) {
  try {
    return CallOpImpl(env, cbi, WantResult);
  } catch (const Napi::Error& e) {
    e.ThrowAsJavaScriptException();
  } catch (const std::exception& e) {
    Napi::Error::New(env, e.what()).ThrowAsJavaScriptException();
  }
  return nullptr;
}

// ---- Unboxed fast paths for the ops a training step calls most (counted on a small-sd LoRA step: linear,
// add, reshape/view, transpose, conv2d, silu, bmm, ... ~2,000 calls). They skip the schema walk, the IValue
// stack and the boxed call; they go through the same dispatcher entry (at::add etc.), so autograd, autocast
// and inference mode behave the same. Any argument form they do not handle, an active checkpoint tape, or a
// libtorch error makes them answer undefined, and lib/ops.ts then takes the generic path (which also builds
// the error message).
enum FastOp : int32_t {
  kAdd, kAdd_, kSub, kMul, kMul_, kDiv, kMatmul, kMm, kBmm, kLinear, kSilu, kTranspose, kReshape, kView,
  kMulScalar_, kUnsqueeze, kNumFast
};
const char* const kFastNames[kNumFast] = {
  "aten::add.Tensor", "aten::add_.Tensor", "aten::sub.Tensor", "aten::mul.Tensor", "aten::mul_.Tensor", "aten::div.Tensor",
  "aten::matmul", "aten::mm", "aten::bmm", "aten::linear", "aten::silu", "aten::transpose.int", "aten::reshape", "aten::view",
  "aten::mul_.Scalar", "aten::unsqueeze",
};

int32_t FastCodeFor(const c10::OperatorHandle& op) {
  const auto& n = op.operator_name();
  std::string full = n.name + (n.overload_name.empty() ? "" : "." + n.overload_name);
  for (int32_t i = 0; i < kNumFast; ++i) if (full == kFastNames[i]) return i;
  return -1;
}

struct FastArgs {
  napi_env env;
  AddonData& d;
  const napi_value* argv;
  size_t argc;
  bool present(size_t i) const {
    if (i >= argc) return false;
    napi_valuetype t;
    napi_typeof(env, argv[i], &t);
    return t != napi_undefined;
  }
  at::Tensor* tensor(size_t i) const {
    double id;
    if (i >= argc || napi_get_value_double(env, argv[i], &id) != napi_ok) return nullptr;
    return d.slots.get(id);
  }
  // A Scalar as ToIValue makes it (integral numbers are ints); def when absent.
  bool scalar(size_t i, at::Scalar& out) const {
    if (!present(i)) { out = at::Scalar(int64_t{1}); return true; }
    double v;
    if (napi_get_value_double(env, argv[i], &v) != napi_ok) return false;
    if (std::abs(v) < 9007199254740992.0 && v == static_cast<double>(static_cast<int64_t>(v))) out = at::Scalar(static_cast<int64_t>(v));
    else out = at::Scalar(v);
    return true;
  }
  bool integer(size_t i, int64_t& out) const {
    double v;
    if (i >= argc || napi_get_value_double(env, argv[i], &v) != napi_ok) return false;
    if (v != static_cast<double>(static_cast<int64_t>(v))) return false;
    out = static_cast<int64_t>(v);
    return true;
  }
  bool intList(size_t i, std::vector<int64_t>& out) const {
    bool isArray = false;
    if (i >= argc || napi_is_array(env, argv[i], &isArray) != napi_ok || !isArray) return false;
    uint32_t n = 0;
    napi_get_array_length(env, argv[i], &n);
    out.resize(n);
    for (uint32_t k = 0; k < n; ++k) {
      napi_value e;
      double v;
      if (napi_get_element(env, argv[i], k, &e) != napi_ok || napi_get_value_double(env, e, &v) != napi_ok) return false;
      if (v != static_cast<double>(static_cast<int64_t>(v))) return false;
      out[k] = static_cast<int64_t>(v);
    }
    return true;
  }
};

// callFast(code, ...args) → a tensor id (functional ops), true (in-place ops), or undefined: not handled here.
napi_value CallFast(napi_env rawEnv, napi_callback_info cbi) {
  napi_value argv[8];
  size_t argc = 8;
  napi_value undefined;
  napi_get_undefined(rawEnv, &undefined);
  if (napi_get_cb_info(rawEnv, cbi, &argc, argv, nullptr, nullptr) != napi_ok || argc < 1 || argc > 8) return undefined;
  Napi::Env env(rawEnv);
  AddonData& d = Data(env);
  if (d.tape) return undefined;
  int32_t code = -1;
  napi_get_value_int32(rawEnv, argv[0], &code);
  FastArgs a{rawEnv, d, argv + 1, argc - 1};
  at::Tensor* x = a.tensor(0);
  if (!x) return undefined;
  at::Tensor out;
  bool inPlace = false;
  try {
    switch (code) {
      case kAdd: case kSub: case kAdd_: {
        at::Tensor* y = a.tensor(1);
        at::Scalar alpha;
        if (!y || a.argc > 3 || !a.scalar(2, alpha)) return undefined;
        if (code == kAdd) out = at::add(*x, *y, alpha);
        else if (code == kSub) out = at::sub(*x, *y, alpha);
        else { x->add_(*y, alpha); inPlace = true; }
        break;
      }
      case kMul: case kDiv: case kMul_: case kMatmul: case kMm: case kBmm: {
        at::Tensor* y = a.tensor(1);
        if (!y || a.argc != 2) return undefined;
        switch (code) {
          case kMul: out = at::mul(*x, *y); break;
          case kDiv: out = at::div(*x, *y); break;
          case kMul_: x->mul_(*y); inPlace = true; break;
          case kMatmul: out = at::matmul(*x, *y); break;
          case kMm: out = at::mm(*x, *y); break;
          default: out = at::bmm(*x, *y); break;
        }
        break;
      }
      case kMulScalar_: {
        at::Scalar s;
        if (a.argc != 2 || !a.present(1) || !a.scalar(1, s)) return undefined;
        x->mul_(s);
        inPlace = true;
        break;
      }
      case kLinear: {
        at::Tensor* w = a.tensor(1);
        if (!w || a.argc > 3) return undefined;
        c10::optional<at::Tensor> bias;
        if (a.argc == 3) {
          napi_valuetype t;
          napi_typeof(rawEnv, argv[3], &t);
          if (t != napi_null && t != napi_undefined) {
            at::Tensor* b = a.tensor(2);
            if (!b) return undefined;
            bias = *b;
          }
        }
        out = at::linear(*x, *w, bias);
        break;
      }
      case kSilu:
        if (a.argc != 1) return undefined;
        out = at::silu(*x);
        break;
      case kTranspose: {
        int64_t d0, d1;
        if (a.argc != 3 || !a.integer(1, d0) || !a.integer(2, d1)) return undefined;
        out = x->transpose(d0, d1);
        break;
      }
      case kUnsqueeze: {
        int64_t dim;
        if (a.argc != 2 || !a.integer(1, dim)) return undefined;
        out = x->unsqueeze(dim);
        break;
      }
      case kReshape: case kView: {
        std::vector<int64_t> shape;
        if (a.argc != 2 || !a.intList(1, shape)) return undefined;
        out = code == kReshape ? x->reshape(shape) : x->view(shape);
        break;
      }
      default:
        return undefined;
    }
  } catch (const std::exception&) {
    return undefined;  // the generic path reruns the op and reports the error with its arguments
  }
  napi_value result;
  if (inPlace) napi_get_boolean(rawEnv, true, &result);
  else napi_create_double(rawEnv, d.slots.put(std::move(out)), &result);
  return result;
}

// schema(index) → the operator's schema as text, for docs and error messages in TS.
Napi::Value OpSchema(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData& d = Data(env);
  uint32_t index = info[0].As<Napi::Number>().Uint32Value();
  if (index >= d.ops.size()) throw Napi::RangeError::New(env, "no operator with index " + std::to_string(index));
  return Napi::String::New(env, toString(d.ops[index].schema()));
}

}  // namespace

void InitDispatch(Napi::Env env, Napi::Object exports) {
  exports.Set("op", Napi::Function::New(env, ResolveOp, "op"));
  napi_value call, callVoid;
  NAPI_THROW_IF_FAILED_VOID(env, napi_create_function(env, "call", NAPI_AUTO_LENGTH, CallOpEntry<true>, nullptr, &call));
  NAPI_THROW_IF_FAILED_VOID(env, napi_create_function(env, "callVoid", NAPI_AUTO_LENGTH, CallOpEntry<false>, nullptr, &callVoid));
  exports.Set("call", Napi::Value(env, call));
  exports.Set("callVoid", Napi::Value(env, callVoid));
  exports.Set("opInfo", Napi::Function::New(env, OpInfo, "opInfo"));
  napi_value callFast;
  NAPI_THROW_IF_FAILED_VOID(env, napi_create_function(env, "callFast", NAPI_AUTO_LENGTH, CallFast, nullptr, &callFast));
  exports.Set("callFast", Napi::Value(env, callFast));
  exports.Set("schema", Napi::Function::New(env, OpSchema, "schema"));
}

}  // namespace difflora
