// difflora::conv2d: aten::conv2d, with frozen float32 CPU weights kept in oneDNN's own layout between calls.
//
// libtorch 1.13 runs a float32 CPU convolution through oneDNN (ideep) with the weight in PyTorch's plain layout,
// which ideep reorders into its blocked layout on every call, forward and backward (the input gradient). Where
// the weight is at least as large as the output (the deep, small-spatial convolutions of a UNet) that reorder
// costs more than the convolution itself. Here a frozen weight (no gradient, not modified since: the version
// counter is checked) is reordered once and kept as long as the weight lives, one copy for forward and, once a
// backward needs it, one of the flipped and transposed weight: for stride 1 the input gradient is the
// convolution of the output gradient with it (dX = dY ⋆ W', W'[i, o] = W[o, i] flipped, padding k − 1 − p).
// The copies take at most DIFFLORA_CONV_CACHE_MB (default 512 MiB); weights beyond it take aten's path.
// Same arithmetic as libtorch's oneDNN path (the forward bit for bit; the input gradient to float32 rounding).
// Everything else (other dtypes and devices, weights that train, autocast, groups, dilation, 1×1 kernels,
// large outputs, libtorch 2.x) is aten::conv2d unchanged.
#include "common.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace difflora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

#if TORCH_VERSION_MAJOR < 2
// The reordered copies of one weight, valid while the weight lives at the same version with the same geometry.
struct Packed {
  explicit Packed(const at::Tensor& w) : owner(w.getIntrusivePtr()) {}
  c10::weak_intrusive_ptr<c10::TensorImpl> owner;
  uint32_t version = 0;
  std::vector<int64_t> padding, stride;
  at::Tensor forward, inputGrad;  // oneDNN-layout tensors; inputGrad made on first need
  int64_t reserved = 0;           // bytes counted against the budget
};

// A process-wide cache (the ops are registered process-wide; a mutex for worker threads), keyed by the weight's
// TensorImpl and checked against its weak pointer, so a freed weight's address is never mistaken for a new one.
// Entries of freed weights are dropped whenever an entry is added.
struct PackCache {
  std::mutex mutex;
  std::unordered_map<const c10::TensorImpl*, Packed> entries;
  int64_t bytes = 0;   // reserved by the entries: two copies of each weight (forward and input gradient)
  int64_t budget = 0;  // bytes the copies may take (BudgetFromEnv)
};

// The copies' budget: DIFFLORA_CONV_CACHE_MB when it is a plain decimal number of MiB (0: keep none), else 512 MiB.
// Bounded because the gain shrinks as convolutions grow while the cost is a second copy (and a third, of the flipped
// weight) of every kept weight: at SD 1.5's scale, unbounded, 128 px steps were 18 % faster but 256 px ones no faster,
// for 4.9 GB more memory and 12 s of reorders in the first step (bench/RESULTS.md). small-sd's fit whole.
int64_t BudgetFromEnv() {
  constexpr int64_t MiB = 1024 * 1024;
  const char* v = std::getenv("DIFFLORA_CONV_CACHE_MB");
  if (v == nullptr || *v == '\0' || std::strspn(v, "0123456789") != std::strlen(v)) return 512 * MiB;
  errno = 0;
  const unsigned long long mb = std::strtoull(v, nullptr, 10);
  if (errno != 0 || mb > static_cast<unsigned long long>(INT64_MAX / MiB)) return INT64_MAX;
  return static_cast<int64_t>(mb) * MiB;
}

PackCache& Cache() {
  static PackCache* cache = [] {
    auto* c = new PackCache();  // never destroyed: no teardown order issue at exit
    c->budget = BudgetFromEnv();
    return c;
  }();
  return *cache;
}

int64_t Reserved(const at::Tensor& w) { return 2 * w.numel() * static_cast<int64_t>(sizeof(float)); }

void Erase(PackCache& c, std::unordered_map<const c10::TensorImpl*, Packed>::iterator it) {
  c.bytes -= it->second.reserved;
  c.entries.erase(it);
}

void DropExpired(PackCache& c) {
  for (auto e = c.entries.begin(); e != c.entries.end();) {
    auto next = std::next(e);
    if (e->second.owner.expired()) Erase(c, e);
    e = next;
  }
}

// Whether w's copies are kept (or may be, within the budget).
bool Keepable(const at::Tensor& w) {
  PackCache& c = Cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.entries.count(w.unsafeGetTensorImpl()) > 0) return true;
  if (c.bytes + Reserved(w) <= c.budget) return true;
  DropExpired(c);
  return c.bytes + Reserved(w) <= c.budget;
}

at::Tensor Reorder(const at::Tensor& w, at::IntArrayRef padding, at::IntArrayRef stride) {
  at::NoGradGuard guard;
  return at::mkldnn_reorder_conv2d_weight(w.contiguous().to_mkldnn(), padding, stride, {1, 1}, 1);
}

// The packed forward weight (and, with inputGrad, the packed input-gradient weight) of w.
at::Tensor PackedWeight(const at::Tensor& w, at::IntArrayRef padding, at::IntArrayRef stride, bool inputGrad) {
  PackCache& c = Cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const c10::TensorImpl* key = w.unsafeGetTensorImpl();
  const uint32_t version = w._version();
  auto it = c.entries.find(key);
  if (it != c.entries.end()) {
    Packed& p = it->second;
    const bool same = !p.owner.expired() && p.owner.lock().get() == key && p.version == version && p.padding == padding.vec() && p.stride == stride.vec();
    if (!same) Erase(c, it), it = c.entries.end();
  }
  if (it == c.entries.end()) {
    DropExpired(c);
    Packed p(w);
    p.reserved = Reserved(w);
    c.bytes += p.reserved;
    p.version = version;
    p.padding = padding.vec();
    p.stride = stride.vec();
    p.forward = Reorder(w, padding, stride);
    it = c.entries.emplace(key, std::move(p)).first;
  }
  Packed& p = it->second;
  if (!inputGrad) return p.forward;
  if (!p.inputGrad.defined()) {
    const int64_t k = w.size(2);
    p.inputGrad = Reorder(w.transpose(0, 1).flip({2, 3}), {k - 1 - p.padding[0], w.size(3) - 1 - p.padding[1]}, {1, 1});
  }
  return p.inputGrad;
}

struct PackedConv2d : torch::autograd::Function<PackedConv2d> {
  // weight and bias need no gradient (checked by the caller); bias travels as an IValue
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight, const c10::IValue& bias,
                            std::vector<int64_t> stride, std::vector<int64_t> padding) {
    const at::Tensor packed = PackedWeight(weight, padding, stride, false);
    const c10::optional<at::Tensor> b = bias.isTensor() ? c10::optional<at::Tensor>(bias.toTensor()) : c10::nullopt;
    at::Tensor out = at::mkldnn_convolution(input.contiguous(), packed, b, padding, stride, {1, 1}, 1);
    ctx->saved_data["weight"] = weight;  // a parameter: kept alive by its module anyway
    if (stride[0] != 1 || stride[1] != 1) ctx->save_for_backward({input});
    ctx->saved_data["stride"] = c10::IValue(stride);
    ctx->saved_data["padding"] = c10::IValue(padding);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list gradOutputs) {
    const at::Tensor weight = ctx->saved_data["weight"].toTensor();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector();
    const at::Tensor g = gradOutputs[0].contiguous();
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      if (stride[0] == 1 && stride[1] == 1) {
        const at::Tensor packed = PackedWeight(weight, padding, stride, true);
        dx = at::mkldnn_convolution(g, packed, c10::nullopt, {weight.size(2) - 1 - padding[0], weight.size(3) - 1 - padding[1]}, {1, 1}, {1, 1}, 1);
      } else {
        const at::Tensor input = ctx->get_saved_variables()[0];
        dx = std::get<0>(at::convolution_backward(g, input, weight, c10::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1, {true, false, false}));
      }
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool CpuAutocast() { return at::autocast::is_cpu_enabled(); }
#endif

at::Tensor Conv2dOp(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
#if TORCH_VERSION_MAJOR < 2
  const bool hasBias = bias.has_value() && bias->defined();
  const auto two = [](at::IntArrayRef a) { return a.size() == 2; };
  const bool eligible = input.dim() == 4 && weight.dim() == 4 && groups == 1 && two(stride) && two(padding) && two(dilation) && dilation[0] == 1 &&
                        dilation[1] == 1 && input.device().is_cpu() && weight.device().is_cpu() && input.scalar_type() == at::kFloat &&
                        weight.scalar_type() == at::kFloat && !weight.requires_grad() && (!hasBias || (bias->scalar_type() == at::kFloat && !bias->requires_grad())) &&
                        weight.size(1) == input.size(1) && weight.size(2) > 1 && weight.size(3) > 1 && padding[0] < weight.size(2) && padding[1] < weight.size(3) &&
                        input.size(2) + 2 * padding[0] >= weight.size(2) && input.size(3) + 2 * padding[1] >= weight.size(3) && input.numel() > 0 &&
                        at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() && !CpuAutocast() && !weight.is_mkldnn() && !input.is_mkldnn() &&
                        !weight.is_inference();  // (inference tensors have no version counter)
  if (eligible) {
    const int64_t oh = (input.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
    const int64_t ow = (input.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
    // the reorder is worth keeping where it costs as much as the convolution writes
    if (weight.numel() >= input.size(0) * weight.size(0) * oh * ow && Keepable(weight)) {
      return PackedConv2d::apply(input, weight, hasBias ? c10::IValue(*bias) : c10::IValue(), stride.vec(), padding.vec());
    }
  }
#endif
  return at::conv2d(input, weight, bias, stride, padding, dilation, groups);
}

// Drops the kept copies of weights that no longer live; returns how many are kept. Module.dispose calls it, so a
// disposed model's copies go with it instead of waiting for the next convolution that packs a new weight.
int64_t ConvCacheTrim() {
#if TORCH_VERSION_MAJOR < 2
  PackCache& c = Cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  DropExpired(c);
  return static_cast<int64_t>(c.entries.size());
#else
  return 0;
#endif
}

}  // namespace
}  // namespace difflora

TORCH_LIBRARY_FRAGMENT(difflora, m) {
  m.def("conv_cache_trim() -> int", &difflora::ConvCacheTrim);
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor",
        &difflora::Conv2dOp);
}
