// Gradient checkpointing. JS cannot be called from backward (CUDA nodes run on libtorch's device threads),
// so the checkpointed function is run once without grad while every op it calls through the dispatcher is
// recorded on a tape; backward replays the tape natively — on whatever thread the engine chooses — with
// grad enabled, then backpropagates through the replay (torch.utils.checkpoint's reentrant scheme).
// The function must be made of tensor ops only (no branching on tensor values); tensors it captures
// instead of taking as inputs must be leaves (parameters), whose gradients the replay accumulates.
#include "common.h"

#include <ATen/core/Generator.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <type_traits>
#include <unordered_map>
#include <unordered_set>

namespace difflora {

namespace {
// A tensor argument of a recorded call: a slot (input or result of an earlier call) or a captured constant.
struct TensorRef {
  size_t arg;         // position in the argument stack
  int64_t element;    // index inside a Tensor[] argument, or -1
  size_t slot;
};
struct Step {
  c10::OperatorHandle op;
  torch::jit::Stack args;           // slot tensors replaced at replay time
  std::vector<TensorRef> refs;
  std::vector<TensorRef> results;   // where each result tensor goes (element >= 0: inside a Tensor[] result)
};
}  // namespace

struct Tape {
  std::vector<Step> steps;
  size_t numSlots = 0;
  size_t numInputs = 0;
  std::unordered_map<const c10::TensorImpl*, size_t> slotOf;
  std::vector<at::Tensor> alive;   // keeps recorded tensors alive so an address is never reused
  std::vector<at::Tensor> captured;  // constants the function closed over
  std::vector<std::pair<at::Generator, at::Tensor>> rng;  // default generators and their states at the start
  // Recorded while a CUDA graph is captured: the CUDA generators' states could not be read (libtorch refuses), so
  // the block may not draw random numbers (its replay could not draw the same ones).
  bool cudaRngUnsaved = false;
  AutocastState autocast;  // replayed under the same autocast as the forward
  std::string error;
  // Set by tapeEnd: the last step that reads or writes each slot, and the slots a replay must keep to the end
  // (inputs and outputs). Replay drops every other slot after its last use, so a replayed block holds no more
  // than autograd saves for backward (a block's attention scores, say, are gone once softmax has run).
  std::vector<size_t> lastUse;
  std::vector<bool> pinned;
};

namespace {

size_t SlotFor(Tape& tape, const at::Tensor& t) {
  size_t slot = tape.numSlots++;
  tape.slotOf[t.unsafeGetTensorImpl()] = slot;
  tape.alive.push_back(t);
  return slot;
}

void NoteTensor(Tape& tape, Step& step, const at::Tensor& t, size_t arg, int64_t element) {
  if (!t.defined()) return;
  auto it = tape.slotOf.find(t.unsafeGetTensorImpl());
  if (it != tape.slotOf.end()) {
    step.refs.push_back({arg, element, it->second});
  } else {
    if (t.requires_grad() && !t.is_leaf() && tape.error.empty()) {
      tape.error = "checkpoint: the function uses a tensor with autograd history (" + Describe(t) +
                   ") that is not one of its inputs; pass it as an input";
    }
    tape.captured.push_back(t);
  }
}

// The ATen operators that draw from a generator.
bool DrawsRandomNumbers(const c10::OperatorHandle& op) {
  static const std::unordered_set<std::string> names{
      "aten::bernoulli", "aten::bernoulli_", "aten::dropout", "aten::dropout_", "aten::native_dropout", "aten::_fused_dropout",
      "aten::feature_dropout", "aten::feature_dropout_", "aten::alpha_dropout", "aten::alpha_dropout_", "aten::feature_alpha_dropout",
      "aten::feature_alpha_dropout_", "aten::rand", "aten::rand_like", "aten::randn", "aten::randn_like", "aten::randint",
      "aten::randint_like", "aten::randperm", "aten::normal", "aten::normal_", "aten::uniform_", "aten::exponential_",
      "aten::geometric_", "aten::log_normal_", "aten::cauchy_", "aten::random_", "aten::multinomial", "aten::poisson",
      "aten::binomial", "aten::rrelu", "aten::rrelu_", "aten::rrelu_with_noise", "aten::rrelu_with_noise_", "aten::_standard_gamma",
      "aten::_sample_dirichlet"};
  return names.count(op.schema().name()) > 0;
}

}  // namespace

void RecordOp(Tape& tape, const c10::OperatorHandle& op, const torch::jit::Stack& args, const torch::jit::Stack& results) {
  if (tape.cudaRngUnsaved && tape.error.empty() && DrawsRandomNumbers(op)) {
    tape.error = "checkpoint: " + op.schema().name() + " draws random numbers inside a checkpointed block recorded in a CUDA graph, " +
                 "whose generator state cannot be saved while the graph records; turn off --cuda_graphs or the randomness (dropout) there";
  }
  Step step{op, args, {}, {}};
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = args[i];
    if (v.isTensor()) {
      NoteTensor(tape, step, v.toTensor(), i, -1);
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();
      for (size_t k = 0; k < list.size(); ++k) NoteTensor(tape, step, list.get(k), i, static_cast<int64_t>(k));
    } else if (v.isList()) {  // Tensor?[]
      auto list = v.toListRef();
      for (size_t k = 0; k < list.size(); ++k) if (list[k].isTensor()) NoteTensor(tape, step, list[k].toTensor(), i, static_cast<int64_t>(k));
    }
  }
  // an in-place op returns its input: keep the slot it already has
  auto slotOfResult = [&](const at::Tensor& t) {
    auto it = tape.slotOf.find(t.unsafeGetTensorImpl());
    return it != tape.slotOf.end() ? it->second : SlotFor(tape, t);
  };
  for (size_t i = 0; i < results.size(); ++i) {
    if (results[i].isTensor()) {
      step.results.push_back({i, -1, slotOfResult(results[i].toTensor())});
    } else if (results[i].isTensorList()) {  // chunk, split, unbind...
      auto list = results[i].toTensorList();
      for (size_t k = 0; k < list.size(); ++k) step.results.push_back({i, static_cast<int64_t>(k), slotOfResult(list.get(k))});
    }
  }
  tape.steps.push_back(std::move(step));
}

namespace {

// Re-runs the tape on `inputs`; returns every slot's tensor.
std::vector<at::Tensor> Replay(const Tape& tape, const std::vector<at::Tensor>& inputs) {
  std::vector<at::Tensor> slots(tape.numSlots);
  for (size_t i = 0; i < inputs.size(); ++i) slots[i] = inputs[i];
  for (const Step& step : tape.steps) {
    torch::jit::Stack stack = step.args;
    for (const TensorRef& r : step.refs) {
      if (r.element < 0) {
        stack[r.arg] = slots[r.slot];
      } else if (stack[r.arg].isTensorList()) {
        auto list = stack[r.arg].toTensorList().copy();
        list.set(static_cast<size_t>(r.element), slots[r.slot]);
        stack[r.arg] = list;
      } else {
        auto list = c10::impl::toTypedList<c10::optional<at::Tensor>>(stack[r.arg].toList()).copy();
        list.set(static_cast<size_t>(r.element), slots[r.slot]);
        stack[r.arg] = list;
      }
    }
    step.op.callBoxed(&stack);
    for (const TensorRef& r : step.results) {
      slots[r.slot] = r.element < 0 ? stack[r.arg].toTensor() : stack[r.arg].toTensorList().get(static_cast<size_t>(r.element));
    }
    stack.clear();
    const size_t index = static_cast<size_t>(&step - tape.steps.data());
    auto release = [&](const TensorRef& r) {
      if (!tape.pinned[r.slot] && tape.lastUse[r.slot] == index) slots[r.slot].reset();
    };
    for (const TensorRef& r : step.refs) release(r);
    for (const TensorRef& r : step.results) release(r);
  }
  return slots;
}

struct RngGuard {
  std::vector<std::pair<at::Generator, at::Tensor>> saved;
  explicit RngGuard(const std::vector<std::pair<at::Generator, at::Tensor>>& restore) {
    for (const auto& [gen, state] : restore) {
      at::Generator g = gen;
      std::lock_guard<std::mutex> lock(g.mutex());
      saved.emplace_back(g, g.get_state());
      g.set_state(state);
    }
  }
  ~RngGuard() {
    for (auto& [gen, state] : saved) {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(state);
    }
  }
};

struct CheckpointBackward : torch::autograd::Node {
  std::shared_ptr<Tape> tape;
  std::vector<at::Tensor> inputs;   // detached values of the inputs
  std::vector<bool> inputRequiresGrad;
  std::vector<size_t> outputSlots;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& gradOutputs) override {
    RngGuard rng(tape->rng);  // dropout and other random ops draw the same numbers as in forward
    AutocastGuard autocast(tape->autocast);
    c10::AutoGradMode enable(true);
    std::vector<at::Tensor> leaves;
    for (size_t i = 0; i < inputs.size(); ++i) leaves.push_back(inputs[i].detach().requires_grad_(inputRequiresGrad[i]));
    std::vector<at::Tensor> slots = Replay(*tape, leaves);
    torch::autograd::variable_list outs, grads;
    for (size_t i = 0; i < outputSlots.size(); ++i) {
      const at::Tensor& o = slots[outputSlots[i]];
      if (o.requires_grad() && gradOutputs[i].defined()) {
        outs.push_back(o);
        grads.push_back(gradOutputs[i]);
      }
    }
    slots.clear();  // what backward needs, autograd holds
    if (!outs.empty()) torch::autograd::backward(outs, grads);  // also accumulates captured parameters' grads
    torch::autograd::variable_list result;
    for (size_t i = 0; i < leaves.size(); ++i) result.push_back(inputRequiresGrad[i] ? leaves[i].grad() : at::Tensor());
    return result;
  }
};

// tapeBegin(inputs): starts recording; the inputs (already detached in JS) become slots 0..n-1.
Napi::Value TapeBegin(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData& d = Data(env);
  if (d.tape) throw Napi::Error::New(env, "checkpoint: nested checkpoints are not supported");
  auto tape = std::make_shared<Tape>();
  for (const at::Tensor& t : UnwrapTensorList(env, info[0], "checkpoint inputs")) SlotFor(*tape, t);
  tape->numInputs = tape->numSlots;
  tape->autocast = CurrentAutocast();
  Guard(env, [] { return std::string("checkpoint"); }, [&] {
    std::vector<c10::Device> devices{c10::Device(c10::kCPU)};
    for (const at::Tensor& t : tape->alive) {
      if (!t.device().is_cpu() && std::find(devices.begin(), devices.end(), t.device()) == devices.end()) devices.push_back(t.device());
    }
    const bool capturing = CudaGraphCapturing();
    for (const c10::Device& dev : devices) {
      if (capturing && !dev.is_cpu()) {  // libtorch refuses to read a CUDA generator's state while a graph records
        tape->cudaRngUnsaved = true;
        continue;
      }
      at::Generator g = at::globalContext().defaultGenerator(dev);
      std::lock_guard<std::mutex> lock(g.mutex());
      tape->rng.emplace_back(g, g.get_state());
    }
  });
  d.tape = tape;
  return env.Undefined();
}

Napi::Value TapeAbort(const Napi::CallbackInfo& info) {
  Data(info.Env()).tape.reset();
  return info.Env().Undefined();
}

// A new autograd node. Older libtorch owns nodes by std::shared_ptr with deleteNode as the deleter; newer ones
// (pytorch#181139, April 2026; 2.14 has it) by c10::intrusive_ptr, and deleteNode is gone. Base keeps both branches
// dependent, so the one not taken is never looked up; deleteNode is found by argument-dependent lookup where it exists.
template <typename N, typename Base = torch::autograd::Node>
auto MakeNode() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, Base>) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N(), [](N* n) { deleteNode(static_cast<Base*>(n)); });
  }
}

// tapeEnd(originalInputs, outputs) → outputs wired to a CheckpointBackward node (new tensor objects).
Napi::Value TapeEnd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData& d = Data(env);
  std::shared_ptr<Tape> tape = std::move(d.tape);
  d.tape.reset();
  if (!tape) throw Napi::Error::New(env, "checkpoint: tapeEnd without tapeBegin");
  if (!tape->error.empty()) throw Napi::Error::New(env, tape->error);
  std::vector<at::Tensor> originals = UnwrapTensorList(env, info[0], "checkpoint inputs");
  std::vector<at::Tensor> outputs = UnwrapTensorList(env, info[1], "checkpoint outputs");
  auto node = MakeNode<CheckpointBackward>();
  node->tape = tape;
  for (size_t i = 0; i < tape->numInputs; ++i) node->inputs.push_back(tape->alive[i]);
  for (const at::Tensor& t : originals) node->inputRequiresGrad.push_back(t.requires_grad());
  Napi::Array out = Napi::Array::New(env, outputs.size());
  Guard(env, [] { return std::string("checkpoint"); }, [&] {
    for (const at::Tensor& o : outputs) {
      auto it = tape->slotOf.find(o.unsafeGetTensorImpl());
      if (it == tape->slotOf.end()) throw std::runtime_error("an output was not computed by the checkpointed function (" + Describe(o) + ")");
      node->outputSlots.push_back(it->second);
    }
    node->set_next_edges(torch::autograd::collect_next_edges(originals));
    tape->lastUse.assign(tape->numSlots, 0);
    tape->pinned.assign(tape->numSlots, false);
    for (size_t i = 0; i < tape->numInputs; ++i) tape->pinned[i] = true;
    for (size_t slot : node->outputSlots) tape->pinned[slot] = true;
    for (size_t i = 0; i < tape->steps.size(); ++i) {
      for (const TensorRef& r : tape->steps[i].refs) tape->lastUse[r.slot] = i;
      for (const TensorRef& r : tape->steps[i].results) tape->lastUse[r.slot] = std::max(tape->lastUse[r.slot], i);
    }
    // The forward's intermediates are recomputed in backward: drop every reference to them, keeping only
    // the inputs, the captured constants and the non-tensor arguments.
    tape->alive.resize(tape->numInputs);
    tape->slotOf.clear();
    for (Step& step : tape->steps) {
      for (const TensorRef& r : step.refs) {
        c10::IValue& v = step.args[r.arg];
        if (r.element < 0) {
          v = c10::IValue();
        } else if (v.isTensorList()) {
          auto list = v.toTensorList().copy();
          list.set(static_cast<size_t>(r.element), at::Tensor());
          v = list;
        } else {
          auto list = c10::impl::toTypedList<c10::optional<at::Tensor>>(v.toList()).copy();
          list.set(static_cast<size_t>(r.element), c10::nullopt);
          v = list;
        }
      }
    }
    for (size_t i = 0; i < outputs.size(); ++i) {
      at::Tensor wired = outputs[i].detach();  // a fresh autograd identity sharing the storage
      if (torch::autograd::isDifferentiableType(wired.scalar_type())) torch::autograd::set_history(wired, node);
      out.Set(static_cast<uint32_t>(i), WrapTensor(env, wired));
    }
  });
  return out;
}

}  // namespace

void InitCheckpoint(Napi::Env env, Napi::Object exports) {
  exports.Set("tapeBegin", Napi::Function::New(env, TapeBegin));
  exports.Set("tapeAbort", Napi::Function::New(env, TapeAbort));
  exports.Set("tapeEnd", Napi::Function::New(env, TapeEnd));
}

}  // namespace difflora
