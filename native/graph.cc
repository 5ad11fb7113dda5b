// CUDA graphs (issue #15): a training step or a UNet call recorded once and replayed, so the host issues one launch
// instead of a thousand kernel calls. The JS side (lib/cuda_graph.ts) warms the work up on the graph's side stream,
// captures it there and replays it; the tensors it read and wrote stay where they were captured (static inputs and
// outputs), which JS keeps alive for as long as the graph. Built only against a CUDA libtorch; elsewhere every entry
// point says so.
#include "common.h"

#ifdef DIFFLORA_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <atomic>
#include <map>
#include <memory>

namespace difflora {
namespace {

// Captures in progress, process-wide (CUDA's capture mode is a property of the process's threads and streams).
std::atomic<int> capturesInProgress{0};

#ifdef DIFFLORA_WITH_CUDA

struct Graph {
  c10::DeviceIndex device;
  at::cuda::CUDAStream side;
  c10::optional<at::cuda::CUDAStream> previous;  // the stream that was current before enter()
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  bool captured = false;
  bool capturing = false;
};

std::map<int64_t, std::unique_ptr<Graph>>& Graphs() {
  static std::map<int64_t, std::unique_ptr<Graph>> graphs;
  return graphs;
}

Graph& GraphOf(Napi::Env env, const Napi::Value& v) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, "cuda graph: expected a graph id");
  auto it = Graphs().find(v.As<Napi::Number>().Int64Value());
  if (it == Graphs().end()) throw Napi::Error::New(env, "cuda graph: no such graph (already released?)");
  return *it->second;
}

// A stream waits for the work already queued on another (an event recorded there).
void StreamWait(const at::cuda::CUDAStream& waiter, const at::cuda::CUDAStream& on) {
  at::cuda::CUDAEvent event;
  event.record(on);
  event.block(waiter);
}

// cudaGraphNew(deviceIndex) → id
Napi::Value GraphNew(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!at::hasCUDA()) throw Napi::Error::New(env, "cuda graph: no CUDA device");
  auto device = static_cast<c10::DeviceIndex>(info[0].As<Napi::Number>().Int32Value());
  static int64_t next = 1;
  auto g = Guard(env, [] { return std::string("cudaGraphNew"); }, [&] {
    return std::unique_ptr<Graph>(new Graph{device, at::cuda::getStreamFromPool(false, device), c10::nullopt, nullptr});
  });
  int64_t id = next++;
  Graphs()[id] = std::move(g);
  return Napi::Number::New(env, static_cast<double>(id));
}

// cudaGraphEnter(id): the graph's side stream becomes the current stream (after the work queued on the current one).
Napi::Value GraphEnter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Graph& g = GraphOf(env, info[0]);
  if (g.previous) throw Napi::Error::New(env, "cuda graph: already entered");
  Guard(env, [] { return std::string("cudaGraphEnter"); }, [&] {
    at::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream(g.device);
    StreamWait(g.side, current);
    g.previous = current;
    at::cuda::setCurrentCUDAStream(g.side);
  });
  return env.Undefined();
}

// cudaGraphExit(id): back to the stream that was current, which waits for the side stream's work.
Napi::Value GraphExit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Graph& g = GraphOf(env, info[0]);
  if (!g.previous) throw Napi::Error::New(env, "cuda graph: not entered");
  Guard(env, [] { return std::string("cudaGraphExit"); }, [&] {
    at::cuda::setCurrentCUDAStream(*g.previous);
    StreamWait(*g.previous, g.side);
    g.previous = c10::nullopt;
  });
  return env.Undefined();
}

// cudaGraphCaptureBegin(id): starts recording the side stream (entered); nothing runs until replay.
Napi::Value GraphCaptureBegin(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Graph& g = GraphOf(env, info[0]);
  if (!g.previous) throw Napi::Error::New(env, "cuda graph: enter the graph's stream before capturing");
  if (g.captured || g.capturing) throw Napi::Error::New(env, "cuda graph: already captured");
  Guard(env, [] { return std::string("cudaGraphCaptureBegin"); }, [&] {
    c10::cuda::device_synchronize();
    g.graph = std::make_unique<at::cuda::CUDAGraph>();
    g.graph->capture_begin();
    g.capturing = true;
    ++capturesInProgress;
  });
  return env.Undefined();
}

// cudaGraphCaptureEnd(id): ends the recording and instantiates the graph. A failed capture leaves no graph.
Napi::Value GraphCaptureEnd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Graph& g = GraphOf(env, info[0]);
  if (!g.capturing) throw Napi::Error::New(env, "cuda graph: not capturing");
  g.capturing = false;
  --capturesInProgress;
  Guard(env, [] { return std::string("cudaGraphCaptureEnd"); }, [&] {
    try {
      g.graph->capture_end();
    } catch (...) {
      g.graph.reset();
      throw;
    }
    g.captured = true;
  });
  return env.Undefined();
}

// cudaGraphReplay(id): launches the recorded work on the current stream.
Napi::Value GraphReplay(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Graph& g = GraphOf(env, info[0]);
  if (!g.captured) throw Napi::Error::New(env, "cuda graph: nothing captured");
  Guard(env, [] { return std::string("cudaGraphReplay"); }, [&] { g.graph->replay(); });
  return env.Undefined();
}

// cudaGraphRelease(id): frees the graph and its memory pool (after its work is done).
Napi::Value GraphRelease(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "cuda graph: expected a graph id");
  auto it = Graphs().find(info[0].As<Napi::Number>().Int64Value());
  if (it == Graphs().end()) return env.Undefined();
  Guard(env, [] { return std::string("cudaGraphRelease"); }, [&] {
    Graph& g = *it->second;
    if (g.previous) at::cuda::setCurrentCUDAStream(*g.previous);
    if (g.capturing) {
      g.capturing = false;
      --capturesInProgress;
      try { g.graph->capture_end(); } catch (...) {}  // a failed capture: end it before the graph goes
    }
    c10::cuda::device_synchronize();
    Graphs().erase(it);
  });
  return env.Undefined();
}

#else

Napi::Value NoCuda(const Napi::CallbackInfo& info) {
  throw Napi::Error::New(info.Env(), "cuda graph: this addon was built against a libtorch without CUDA");
}

#endif

}  // namespace

bool CudaGraphCapturing() { return capturesInProgress.load() > 0; }

void InitGraph(Napi::Env env, Napi::Object exports) {
#ifdef DIFFLORA_WITH_CUDA
  exports.Set("cudaGraphNew", Napi::Function::New(env, GraphNew));
  exports.Set("cudaGraphEnter", Napi::Function::New(env, GraphEnter));
  exports.Set("cudaGraphExit", Napi::Function::New(env, GraphExit));
  exports.Set("cudaGraphCaptureBegin", Napi::Function::New(env, GraphCaptureBegin));
  exports.Set("cudaGraphCaptureEnd", Napi::Function::New(env, GraphCaptureEnd));
  exports.Set("cudaGraphReplay", Napi::Function::New(env, GraphReplay));
  exports.Set("cudaGraphRelease", Napi::Function::New(env, GraphRelease));
#else
  for (const char* name : {"cudaGraphNew", "cudaGraphEnter", "cudaGraphExit", "cudaGraphCaptureBegin", "cudaGraphCaptureEnd",
                           "cudaGraphReplay", "cudaGraphRelease"}) {
    exports.Set(name, Napi::Function::New(env, NoCuda));
  }
#endif
}

}  // namespace difflora
