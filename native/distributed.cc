// Data-parallel communication on libtorch's own c10d: a TCPStore rendezvous, then ProcessGroupGloo (CPU tensors)
// or ProcessGroupNCCL (CUDA tensors, where libtorch has it). lib/distributed/process_group.ts types and wraps it.
//
// Everything that can wait on a peer (the rendezvous, waiting for a collective) runs on a worker thread and
// settles a Promise, so a dead or missing peer becomes a rejected Promise after the group's timeout, never a
// frozen event loop. Collectives start on the JS thread (c10d queues them on its own threads) and return a work
// handle at once, so a gradient all-reduce can overlap whatever the caller does before it waits.
//
// Distributed support is a compile-time option: c10d must be in libtorch (USE_DISTRIBUTED) and, for Gloo, gloo's
// headers must be present (Debian ships them apart, in libgloo-dev). Without them the rest of the addon still
// builds and createProcessGroup rejects with what to install.
#include "common.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <thread>

// DIFFLORA_NO_DIST (a compiler define) builds without it, as a fallback where libtorch's c10d headers do not compile.
#if !defined(DIFFLORA_NO_DIST) && defined(USE_DISTRIBUTED) && __has_include(<torch/csrc/distributed/c10d/TCPStore.hpp>)
#define DIFFLORA_DIST 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>
#endif
#if defined(DIFFLORA_DIST) && defined(USE_C10D_GLOO) && __has_include(<gloo/config.h>)
#define DIFFLORA_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(DIFFLORA_DIST) && defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#define DIFFLORA_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace difflora {
namespace {

constexpr const char* kNoGloo =
    "this build of difflora has no distributed (Gloo) support: libtorch's c10d or gloo's headers were missing when "
    "the addon was built. Install libgloo-dev (Debian/Ubuntu: `sudo apt-get install libgloo-dev`, or `npm run setup`) "
    "and rebuild the addon (`npm run build:native`)";
constexpr const char* kNoNccl =
    "this build of difflora has no NCCL support: it needs a CUDA libtorch built with NCCL and nccl.h at build time "
    "(set NCCL_INCLUDE_DIR, then rebuild the addon); use backend 'gloo' for CPU tensors";

#ifdef DIFFLORA_DIST
// Runs `run` on a thread of its own and settles a Promise on the JS thread: resolved with `result(env)`, or rejected
// with an Error whose message is `what` + the failure. Not libuv's pool: a rendezvous or a collective can block for
// the group's whole timeout, and the pool's 4 threads also serve file reads and sharp's image decoding.
Napi::Value RunOffThread(Napi::Env env, std::string what, std::function<void()> run, std::function<Napi::Value(Napi::Env)> result) {
  auto deferred = std::make_shared<Napi::Promise::Deferred>(Napi::Promise::Deferred::New(env));
  Napi::Value promise = deferred->Promise();
  auto tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "difflora:distributed", 0, 1);
  std::thread([tsfn, deferred, what = std::move(what), run = std::move(run), result = std::move(result)]() mutable {
    std::string error;
    try {
      run();
    } catch (const c10::Error& e) {
      error = what + ": " + e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = what + ": " + e.what();
    } catch (...) {
      error = what + ": unknown failure";
    }
    // settles on the JS thread (skipped when the environment is already gone)
    tsfn.BlockingCall([deferred, error, result](Napi::Env e, Napi::Function) {
      if (error.empty()) {
        try {
          deferred->Resolve(result(e));
        } catch (const Napi::Error& err) {
          deferred->Reject(err.Value());
        }
      } else {
        deferred->Reject(Napi::Error::New(e, error).Value());
      }
    });
    tsfn.Release();
  }).detach();
  return promise;
}
#endif

Napi::Value Rejected(Napi::Env env, const std::string& message) {
  auto d = Napi::Promise::Deferred::New(env);
  d.Reject(Napi::Error::New(env, message).Value());
  return d.Promise();
}

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
#ifdef DIFFLORA_GLOO
  o.Set("gloo", true);
#else
  o.Set("gloo", false);
#endif
#ifdef DIFFLORA_NCCL
  o.Set("nccl", true);
#else
  o.Set("nccl", false);
#endif
  return o;
}

#ifndef DIFFLORA_DIST

Napi::Value Unavailable(const Napi::CallbackInfo& info) { throw Napi::Error::New(info.Env(), kNoGloo); }
Napi::Value CreateUnavailable(const Napi::CallbackInfo& info) { return Rejected(info.Env(), kNoGloo); }

}  // namespace

void InitDistributed(Napi::Env env, Napi::Object exports) {
  exports.Set("distributedInfo", Napi::Function::New(env, Info));
  exports.Set("createProcessGroup", Napi::Function::New(env, CreateUnavailable));
  for (const char* name : {"allReduce", "broadcast", "allGather", "barrier", "workWait", "workIsCompleted", "destroyProcessGroup"}) {
    exports.Set(name, Napi::Function::New(env, Unavailable));
  }
}

}  // namespace difflora

#else  // DIFFLORA_DIST

using WorkPtr = c10::intrusive_ptr<c10d::Work>;

// TCPStore's libuv backend (the default from libtorch 2.4) exists only where libtorch was built with libuv, as
// PyTorch's wheels are; Debian's 2.x is not, and its TCPStore refuses the default ("use_libuv was requested but
// PyTorch was build without libuv support") before it opens a socket. The classic backend serves every build.
// WithoutLibuv switches to it where the options have the field (2.4+) and says whether it did.
template <typename Options>
auto WithoutLibuv(Options& so, int) -> decltype(so.useLibUV = false, bool()) {
  if (!so.useLibUV) return false;
  so.useLibUV = false;
  return true;
}
template <typename Options>
bool WithoutLibuv(Options&, long) { return false; }

c10::intrusive_ptr<c10d::TCPStore> MakeTcpStore(const std::string& host, c10d::TCPStoreOptions so) {
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, so);
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find("libuv") == std::string::npos || !WithoutLibuv(so, 0)) throw;
    return c10::make_intrusive<c10d::TCPStore>(host, so);
  }
}

using Millis = std::chrono::milliseconds;

// The four collectives we use, over either backend. (ProcessGroupGloo/NCCL derive from ProcessGroup in 1.x and from
// Backend in 2.x; the methods have the same signatures in both, so a template over the concrete class sidesteps that.)
struct Comm {
  virtual ~Comm() = default;
  virtual WorkPtr allreduce(std::vector<at::Tensor>& t, const c10d::AllreduceOptions& o) = 0;
  virtual WorkPtr broadcast(std::vector<at::Tensor>& t, const c10d::BroadcastOptions& o) = 0;
  virtual WorkPtr allgather(std::vector<std::vector<at::Tensor>>& out, std::vector<at::Tensor>& in) = 0;
  virtual WorkPtr barrier() = 0;
};

template <typename PG>
struct CommOf : Comm {
  c10::intrusive_ptr<PG> pg;
  explicit CommOf(c10::intrusive_ptr<PG> p) : pg(std::move(p)) {}
  WorkPtr allreduce(std::vector<at::Tensor>& t, const c10d::AllreduceOptions& o) override { return pg->allreduce(t, o); }
  WorkPtr broadcast(std::vector<at::Tensor>& t, const c10d::BroadcastOptions& o) override { return pg->broadcast(t, o); }
  WorkPtr allgather(std::vector<std::vector<at::Tensor>>& out, std::vector<at::Tensor>& in) override {
    return pg->allgather(out, in, c10d::AllgatherOptions());
  }
  WorkPtr barrier() override { return pg->barrier(c10d::BarrierOptions()); }
};

struct Group {
  std::string backend;  // "gloo" | "nccl"
  int rank = 0, size = 1;
  Millis timeout{60000};
  c10::Device device{c10::kCPU};  // where barrier/allGather buffers live: cpu (gloo) or the rank's GPU (nccl)
  std::string where;              // "rank 1/2 (gloo, 127.0.0.1:29500)", for every message
  c10::intrusive_ptr<c10d::Store> store;
  std::shared_ptr<Comm> comm;     // null once destroyed; in-flight works hold their own reference
};
using GroupPtr = std::shared_ptr<Group>;

// The caller's tensors of one dtype and device, flattened into one buffer so a single collective moves them all.
struct Bucket {
  std::vector<at::Tensor> targets;  // the caller's tensors, written back after the collective
  at::Tensor flat;                  // what the collective runs on (the caller's tensor itself when `direct`)
  bool direct = false;
  WorkPtr work;
};

struct WorkState {
  std::string what;  // "allReduce(sum) on rank 0/2 (gloo, …)"
  std::shared_ptr<Comm> comm;
  Millis timeout{60000};
  std::vector<Bucket> buckets;
  double divideBy = 1;                        // avg: c10d's Gloo has no AVG, so sum then divide
  bool hostSync = false;                      // barrier on NCCL: wait until the GPU work is done, not just queued
  std::vector<std::vector<at::Tensor>> gathered;  // allGather's outputs
  std::mutex mu;
  bool done = false;
  std::string error;
};
using WorkStatePtr = std::shared_ptr<WorkState>;

const napi_type_tag kGroupTag = {0x6466666c6f726131ULL, 0x70726f6367726f75ULL};
const napi_type_tag kWorkTag = {0x6466666c6f726132ULL, 0x776f726b68616e64ULL};

template <typename T>
Napi::Value WrapShared(Napi::Env env, std::shared_ptr<T> p, const napi_type_tag& tag) {
  auto ext = Napi::External<std::shared_ptr<T>>::New(env, new std::shared_ptr<T>(std::move(p)),
                                                     [](Napi::Env, std::shared_ptr<T>* h) { delete h; });
  ext.TypeTag(&tag);
  return ext;
}

template <typename T>
std::shared_ptr<T>& UnwrapShared(const Napi::Value& v, const napi_type_tag& tag, const char* what) {
  if (!v.IsExternal() || !v.As<Napi::External<std::shared_ptr<T>>>().CheckTypeTag(&tag)) {
    throw Napi::TypeError::New(v.Env(), std::string("expected a ") + what + " handle");
  }
  return *v.As<Napi::External<std::shared_ptr<T>>>().Data();
}

GroupPtr LiveGroup(const Napi::Value& v, const char* op) {
  GroupPtr g = UnwrapShared<Group>(v, kGroupTag, "process group");
  if (!g->comm) throw Napi::Error::New(v.Env(), std::string(op) + ": the process group (" + g->where + ") was destroyed");
  return g;
}

// ---- rendezvous

std::vector<uint8_t> Bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string Text(const std::vector<uint8_t>& b) { return std::string(b.begin(), b.end()); }

std::string Clip(const std::string& s) { return s.size() <= 400 ? s : s.substr(0, 400) + "…"; }

std::string Message(const std::exception& e) {
  const auto* c10 = dynamic_cast<const c10::Error*>(&e);
  return c10 != nullptr ? c10->what_without_backtrace() : e.what();
}

std::string Seconds(Millis ms) {
  std::ostringstream out;
  out << ms.count() / 1000.0 << " s";
  return out.str();
}

struct JoinOptions {
  std::string backend, masterAddr, fingerprint, device;
  int port = 0, worldSize = 1, rank = 0;
  bool isServer = false;
  Millis timeout{60000};
};

std::string InfoKey(int rank) { return "difflora/info/" + std::to_string(rank); }
std::string AckKey(int rank) { return "difflora/ack/" + std::to_string(rank); }

// Rank 0's verdict on the group: "" when all ranks came and agree on the world size and the fingerprint, else what
// is wrong. `present` gets the ranks that came. (Blocking store waits, not polling: each store request costs a round
// trip of tens of ms here.)
std::string Judge(c10d::Store& store, const JoinOptions& o, const std::string& mine, std::vector<int>& present) {
  std::vector<std::string> keys;
  for (int i = 0; i < o.worldSize; ++i) keys.push_back(InfoKey(i));
  bool all = true;
  try {
    store.wait(keys, o.timeout);
  } catch (const std::exception&) {
    all = false;  // timed out: see who is here
  }
  std::vector<int> missing;
  std::string problem;
  for (int i = 0; i < o.worldSize; ++i) {
    if (!all && !store.check({keys[i]})) {
      missing.push_back(i);
      continue;
    }
    present.push_back(i);
    const std::string info = Text(store.get(keys[i]));
    if (!problem.empty() || info == mine) continue;
    const size_t nl = info.find('\n');
    const std::string ws = info.substr(0, nl), fp = nl == std::string::npos ? "" : info.substr(nl + 1);
    problem = ws != std::to_string(o.worldSize)
                  ? "world size mismatch: rank " + std::to_string(i) + " was started with world size " + ws + ", rank 0 with " +
                        std::to_string(o.worldSize)
                  : "the ranks were started differently: rank 0: '" + Clip(o.fingerprint) + "', rank " + std::to_string(i) +
                        ": '" + Clip(fp) + "'";
  }
  if (!problem.empty() || missing.empty()) return problem;
  std::string list;
  for (int m : missing) list += (list.empty() ? "" : ", ") + std::to_string(m);
  return "only " + std::to_string(present.size()) + " of " + std::to_string(o.worldSize) + " processes (world size " +
         std::to_string(o.worldSize) + ") joined within " + Seconds(o.timeout) + "; missing: rank " + list +
         " (a process did not start, or the processes were started with different world sizes)";
}

// Every rank announces itself (its world size and fingerprint, the caller's description of how it was started) on
// the store; rank 0 judges, and every rank fails with rank 0's verdict when something is wrong. Rank 0, the store's
// host, waits until the others have read the verdict, so they report it rather than a lost connection.
void Join(c10d::Store& store, const JoinOptions& o) {
  const std::string r = std::to_string(o.rank);
  if (store.add("difflora/rank/" + r, 1) > 1) {
    throw std::runtime_error("rank " + r + " was claimed by two processes (RANK must differ between processes)");
  }
  const std::string mine = std::to_string(o.worldSize) + "\n" + o.fingerprint;
  store.set(InfoKey(o.rank), Bytes(mine));
  if (o.rank == 0) {
    std::vector<int> present;
    const std::string verdict = Judge(store, o, mine, present);
    store.set("difflora/verdict", Bytes(verdict));
    if (o.isServer) {
      std::vector<std::string> acks;
      for (int i : present) {
        if (i != 0) acks.push_back(AckKey(i));
      }
      try {
        if (!acks.empty()) store.wait(acks, o.timeout);
      } catch (const std::exception&) {
        // a rank that came and went: it fails on its own
      }
    }
    if (!verdict.empty()) throw std::runtime_error(verdict);
    return;
  }
  try {
    store.wait({"difflora/verdict"}, o.timeout + Millis(5000));  // rank 0 decides within its own timeout
  } catch (const std::exception& e) {
    throw std::runtime_error("rank 0 did not confirm the group (world size " + std::to_string(o.worldSize) + ") within " +
                             Seconds(o.timeout + Millis(5000)) + ": " + Message(e));
  }
  const std::string verdict = Text(store.get("difflora/verdict"));
  store.set(AckKey(o.rank), Bytes("1"));
  if (!verdict.empty()) throw std::runtime_error("rank 0 reports: " + verdict);
}

#ifdef DIFFLORA_GLOO
// This machine's address on the route to `host` (a UDP "connect" sends nothing; it only picks the route), so Gloo
// listens where the other machines can reach it. Loopback for a loopback master. Empty when it cannot tell.
std::string LocalAddressTowards(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), "9", &hints, &res) != 0 || res == nullptr) return "";
  std::string out;
  int fd = socket(res->ai_family, SOCK_DGRAM, 0);
  if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
    sockaddr_storage local{};
    socklen_t len = sizeof(local);
    char buf[INET6_ADDRSTRLEN] = {0};
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
      const void* addr = local.ss_family == AF_INET6 ? static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr)
                                                     : static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&local)->sin_addr);
      if (inet_ntop(local.ss_family, addr, buf, sizeof(buf)) != nullptr) out = buf;
    }
  }
  if (fd >= 0) close(fd);
  freeaddrinfo(res);
  return out;
}

std::shared_ptr<::gloo::transport::Device> GlooDevice(const std::string& masterAddr) {
  const char* iface = std::getenv("GLOO_SOCKET_IFNAME");
  if (iface != nullptr && *iface != '\0') {
    std::string first(iface);
    first = first.substr(0, first.find(','));
    return c10d::ProcessGroupGloo::createDeviceForInterface(first);
  }
  const std::string local = LocalAddressTowards(masterAddr);
  if (!local.empty()) return c10d::ProcessGroupGloo::createDeviceForHostname(local);
  return c10d::ProcessGroupGloo::createDefaultDevice();
}
#endif

std::shared_ptr<Comm> MakeComm(const JoinOptions& o, const c10::intrusive_ptr<c10d::Store>& store) {
  c10::intrusive_ptr<c10d::Store> scoped = c10::make_intrusive<c10d::PrefixStore>("difflora/" + o.backend, store);
  if (o.backend == "gloo") {
#ifdef DIFFLORA_GLOO
    auto opts = c10d::ProcessGroupGloo::Options::create(o.timeout);
    opts->devices.push_back(GlooDevice(o.masterAddr));
    return std::make_shared<CommOf<c10d::ProcessGroupGloo>>(
        c10::make_intrusive<c10d::ProcessGroupGloo>(scoped, o.rank, o.worldSize, opts));
#else
    throw std::runtime_error(kNoGloo);
#endif
  }
#ifdef DIFFLORA_NCCL
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = o.timeout;
  return std::make_shared<CommOf<c10d::ProcessGroupNCCL>>(
      c10::make_intrusive<c10d::ProcessGroupNCCL>(scoped, o.rank, o.worldSize, opts));
#else
  throw std::runtime_error(kNoNccl);
#endif
}

int IntOption(const Napi::Object& o, const char* key, int lo, int hi) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string("createProcessGroup: ") + key + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d)) || d < lo || d > hi) {
    throw Napi::RangeError::New(o.Env(), std::string("createProcessGroup: ") + key + " must be an integer in [" +
                                             std::to_string(lo) + ", " + std::to_string(hi) + "], got " + v.ToString().Utf8Value());
  }
  return static_cast<int>(d);
}

std::string StringOption(const Napi::Object& o, const char* key, const std::string& dflt) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return dflt;
  if (!v.IsString()) throw Napi::TypeError::New(o.Env(), std::string("createProcessGroup: ") + key + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

// createProcessGroup({backend, masterAddr, masterPort, worldSize, rank, timeoutMs, isServer?, fingerprint?, device?})
// → Promise<group handle>. Rank 0 (or isServer) hosts the TCPStore on masterPort (0: any free port, for a group of 1).
Napi::Value CreateProcessGroup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throw Napi::TypeError::New(env, "createProcessGroup: expected an options object");
  Napi::Object in = info[0].As<Napi::Object>();
  JoinOptions o;
  o.backend = StringOption(in, "backend", "gloo");
  if (o.backend != "gloo" && o.backend != "nccl") {
    throw Napi::TypeError::New(env, "createProcessGroup: backend must be 'gloo' or 'nccl', got '" + o.backend + "'");
  }
  o.masterAddr = StringOption(in, "masterAddr", "");
  if (o.masterAddr.empty()) throw Napi::TypeError::New(env, "createProcessGroup: masterAddr must be a host name or address");
  o.port = IntOption(in, "masterPort", 0, 65535);
  o.worldSize = IntOption(in, "worldSize", 1, 1 << 20);
  o.rank = IntOption(in, "rank", 0, o.worldSize - 1);
  o.timeout = Millis(IntOption(in, "timeoutMs", 1, 1 << 30));
  o.isServer = in.Get("isServer").IsUndefined() ? o.rank == 0 : in.Get("isServer").ToBoolean().Value();
  o.fingerprint = StringOption(in, "fingerprint", "");
  o.device = StringOption(in, "device", o.backend == "nccl" ? "cuda:0" : "cpu");
  if (o.port == 0 && o.worldSize > 1) {
    throw Napi::RangeError::New(env, "createProcessGroup: masterPort 0 (any free port) only works for a group of 1");
  }
  std::string where = "rank " + std::to_string(o.rank) + "/" + std::to_string(o.worldSize) + " (" + o.backend + ", " +
                      o.masterAddr + ":" + std::to_string(o.port) + ", timeout " + std::to_string(o.timeout.count()) + " ms)";
#ifndef DIFFLORA_GLOO
  if (o.backend == "gloo") return Rejected(env, kNoGloo);
#endif
#ifndef DIFFLORA_NCCL
  if (o.backend == "nccl") return Rejected(env, kNoNccl);
#endif
  c10::Device device = c10::Device(o.device);
  if ((o.backend == "nccl") != device.is_cuda()) {
    throw Napi::TypeError::New(env, "createProcessGroup: backend '" + o.backend + "' cannot use device '" + o.device + "'");
  }
  auto group = std::make_shared<Group>();
  group->backend = o.backend;
  group->rank = o.rank;
  group->size = o.worldSize;
  group->timeout = o.timeout;
  group->device = device;
  group->where = where;
  auto phase = std::make_shared<std::string>();
  auto run = [o, group, phase]() {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(o.port);
    so.isServer = o.isServer;
    so.numWorkers = static_cast<std::size_t>(o.worldSize);
    so.waitWorkers = false;  // Join() waits itself, with an error that says who is missing
    so.timeout = o.timeout;
    *phase = o.isServer ? "starting the rendezvous server on port " + std::to_string(o.port) + " (is the port already in use?)"
                        : "connecting to the rendezvous server at " + o.masterAddr + ":" + std::to_string(o.port);
    auto tcp = MakeTcpStore(o.masterAddr, so);
    group->where = "rank " + std::to_string(o.rank) + "/" + std::to_string(o.worldSize) + " (" + o.backend + ", " +
                   o.masterAddr + ":" + std::to_string(tcp->getPort()) + ")";
    group->store = tcp;
    *phase = "waiting for the other processes";
    Join(*tcp, o);
    *phase = "connecting " + o.backend + " to the other processes";
    group->comm = MakeComm(o, group->store);
  };
  // The message of a failure names this process's place in the group and what it was doing.
  return RunOffThread(
      env, "createProcessGroup " + where, [run, phase]() {
        try {
          run();
        } catch (const c10::Error& e) {
          throw std::runtime_error("while " + *phase + ": " + e.what_without_backtrace());
        } catch (const std::exception& e) {
          throw std::runtime_error("while " + *phase + ": " + e.what());
        }
      },
      [group](Napi::Env e) {
        Napi::Object out = Napi::Object::New(e);
        out.Set("handle", WrapShared(e, group, kGroupTag));
        out.Set("where", group->where);
        return out;
      });
}

// ---- collectives

void CheckTensors(Napi::Env env, const Group& g, const std::vector<at::Tensor>& ts, const char* op) {
  if (ts.empty()) throw Napi::TypeError::New(env, std::string(op) + ": expected at least one tensor");
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    const std::string name = std::string(op) + ": tensor " + std::to_string(i) + " (" + Describe(t) + ")";
    if (t.is_sparse()) throw Napi::TypeError::New(env, name + " is sparse; only dense tensors can be reduced");
    if (g.backend == "gloo" && !t.device().is_cpu()) {
      throw Napi::TypeError::New(env, name + " is not on the CPU; a gloo group reduces CPU tensors (use backend 'nccl' for CUDA)");
    }
    if (g.backend == "nccl" && !t.device().is_cuda()) throw Napi::TypeError::New(env, name + " is not on a CUDA device (nccl group)");
    switch (t.scalar_type()) {
      case at::kFloat: case at::kDouble: case at::kHalf: case at::kBFloat16:
      case at::kInt: case at::kLong: case at::kChar: case at::kByte:
        break;
      default:
        throw Napi::TypeError::New(env, name + ": unsupported dtype for a collective");
    }
  }
}

// Groups tensors by dtype and device (in order of first appearance) and flattens each group into one buffer.
// `wire(dtype)` is the dtype the collective runs in (Gloo in libtorch 1.x has no bf16 reductions: those go as fp32).
std::vector<Bucket> MakeBuckets(const std::vector<at::Tensor>& ts, const std::function<at::ScalarType(at::ScalarType)>& wire) {
  std::vector<Bucket> buckets;
  for (const at::Tensor& t : ts) {
    auto it = std::find_if(buckets.begin(), buckets.end(), [&](const Bucket& b) {
      return b.targets[0].scalar_type() == t.scalar_type() && b.targets[0].device() == t.device();
    });
    if (it == buckets.end()) {
      buckets.push_back(Bucket{});
      it = buckets.end() - 1;
    }
    it->targets.push_back(t);
  }
  at::NoGradGuard noGrad;
  for (Bucket& b : buckets) {
    const at::ScalarType dtype = b.targets[0].scalar_type();
    if (b.targets.size() == 1 && b.targets[0].is_contiguous() && wire(dtype) == dtype) {
      b.flat = b.targets[0];
      b.direct = true;
      continue;
    }
    std::vector<at::Tensor> parts;
    for (const at::Tensor& t : b.targets) parts.push_back(t.reshape({-1}));
    b.flat = at::cat(parts).to(wire(dtype));
  }
  return buckets;
}

// After the collective: divide for avg, then copy each slice of the flat buffer back into the caller's tensor.
void Finish(WorkState& w) {
  at::NoGradGuard noGrad;
  for (Bucket& b : w.buckets) {
    if (w.divideBy != 1) b.flat.div_(w.divideBy);
    if (b.direct) continue;
    int64_t offset = 0;
    for (at::Tensor& t : b.targets) {
      const int64_t n = t.numel();
      t.copy_(b.flat.narrow(0, offset, n).view(t.sizes()));
      offset += n;
    }
  }
}

Napi::Value WrapWork(Napi::Env env, WorkStatePtr w) { return WrapShared(env, std::move(w), kWorkTag); }

std::string ReduceOpName(const Napi::Value& v) {
  if (v.IsUndefined()) return "sum";
  if (!v.IsString()) throw Napi::TypeError::New(v.Env(), "allReduce: op must be 'sum' or 'avg'");
  std::string op = v.As<Napi::String>().Utf8Value();
  if (op != "sum" && op != "avg") throw Napi::TypeError::New(v.Env(), "allReduce: op must be 'sum' or 'avg', got '" + op + "'");
  return op;
}

// allReduce(group, tensors, op) → work: every rank's tensors summed (or averaged), in place.
Napi::Value AllReduce(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  GroupPtr g = LiveGroup(info[0], "allReduce");
  std::vector<at::Tensor> ts = UnwrapTensorList(env, info[1], "allReduce: tensors");
  const std::string op = ReduceOpName(info[2]);
  CheckTensors(env, *g, ts, "allReduce");
  if (op == "avg") {
    for (const at::Tensor& t : ts) {
      if (!at::isFloatingType(t.scalar_type())) throw Napi::TypeError::New(env, "allReduce: avg needs floating-point tensors, got " + Describe(t));
    }
  }
  auto w = std::make_shared<WorkState>();
  w->what = "allReduce(" + op + ") on " + g->where;
  w->comm = g->comm;
  w->timeout = g->timeout;
  w->divideBy = op == "avg" ? g->size : 1;
  const bool gloo = g->backend == "gloo";
  Guard(env, [&] { return w->what; }, [&] {
    w->buckets = MakeBuckets(ts, [gloo](at::ScalarType d) { return gloo && d == at::kBFloat16 ? at::kFloat : d; });
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    for (Bucket& b : w->buckets) {
      std::vector<at::Tensor> one{b.flat};
      b.work = w->comm->allreduce(one, opts);
    }
  });
  return WrapWork(env, w);
}

// broadcast(group, tensors, root) → work: rank `root`'s tensors copied into every rank's, in place.
Napi::Value Broadcast(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  GroupPtr g = LiveGroup(info[0], "broadcast");
  std::vector<at::Tensor> ts = UnwrapTensorList(env, info[1], "broadcast: tensors");
  if (!info[2].IsNumber()) throw Napi::TypeError::New(env, "broadcast: root must be a rank number");
  const double root = info[2].As<Napi::Number>().DoubleValue();
  if (root != static_cast<double>(static_cast<int>(root)) || root < 0 || root >= g->size) {
    throw Napi::RangeError::New(env, "broadcast: root must be a rank in [0, " + std::to_string(g->size - 1) + "], got " + info[2].ToString().Utf8Value());
  }
  CheckTensors(env, *g, ts, "broadcast");
  auto w = std::make_shared<WorkState>();
  w->what = "broadcast from rank " + std::to_string(static_cast<int>(root)) + " on " + g->where;
  w->comm = g->comm;
  w->timeout = g->timeout;
  Guard(env, [&] { return w->what; }, [&] {
    // a broadcast only moves bytes: 16-bit floats travel bit for bit viewed as bytes, the one type every Gloo
    // build takes (1.x's has no bf16; Debian's 2.14 refuses fp16 too: "Invalid scalar type")
    w->buckets = MakeBuckets(ts, [](at::ScalarType d) { return d; });
    c10d::BroadcastOptions opts;
    opts.rootRank = static_cast<int64_t>(root);
    for (Bucket& b : w->buckets) {
      const bool half = b.flat.scalar_type() == at::kBFloat16 || b.flat.scalar_type() == at::kHalf;
      std::vector<at::Tensor> one{half ? b.flat.view(at::kByte) : b.flat};
      b.work = w->comm->broadcast(one, opts);
    }
  });
  return WrapWork(env, w);
}

// allGather(group, tensor) → work whose wait() yields one tensor per rank (same shape and dtype on every rank).
Napi::Value AllGather(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  GroupPtr g = LiveGroup(info[0], "allGather");
  at::Tensor t = UnwrapTensor(env, info[1], "allGather: tensor");
  CheckTensors(env, *g, {t}, "allGather");
  auto w = std::make_shared<WorkState>();
  w->what = "allGather on " + g->where;
  w->comm = g->comm;
  w->timeout = g->timeout;
  Guard(env, [&] { return w->what; }, [&] {
    at::NoGradGuard noGrad;
    at::Tensor input = t.contiguous();
    w->gathered.assign(1, {});
    for (int i = 0; i < g->size; ++i) w->gathered[0].push_back(at::empty_like(input));
    std::vector<at::Tensor> in{input};
    Bucket b;
    b.flat = input;
    b.direct = true;
    b.work = w->comm->allgather(w->gathered, in);
    w->buckets.push_back(std::move(b));
  });
  return WrapWork(env, w);
}

// barrier(group) → work that completes once every rank has called barrier.
Napi::Value Barrier(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  GroupPtr g = LiveGroup(info[0], "barrier");
  auto w = std::make_shared<WorkState>();
  w->what = "barrier on " + g->where;
  w->comm = g->comm;
  w->timeout = g->timeout;
  Guard(env, [&] { return w->what; }, [&] {
    Bucket b;
    b.direct = true;
    if (g->backend == "gloo") {
      b.work = w->comm->barrier();
    } else {
      // NCCL's own barrier guesses a device per rank; a one-element all-reduce on ours is the same rendezvous
      b.flat = at::zeros({1}, at::TensorOptions().device(g->device));
      std::vector<at::Tensor> one{b.flat};
      b.work = w->comm->allreduce(one, c10d::AllreduceOptions());
      w->hostSync = true;
    }
    w->buckets.push_back(std::move(b));
  });
  return WrapWork(env, w);
}

// workWait(work) → Promise<tensor[]>: resolves when the collective finished on this rank and the caller's tensors
// hold the result (allGather: the gathered tensors); rejects when a peer failed or the group's timeout passed.
Napi::Value WorkWait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  WorkStatePtr w = UnwrapShared<WorkState>(info[0], kWorkTag, "collective work");
  auto run = [w]() {
    std::lock_guard<std::mutex> lock(w->mu);
    if (w->done) {
      if (!w->error.empty()) throw std::runtime_error(w->error);
      return;
    }
    // settled either way: the buffers and the backend are let go (a destroyed group ends once its works are done);
    // only allGather's outputs are kept
    auto release = [&w]() {
      w->done = true;
      w->buckets.clear();
      w->comm.reset();
    };
    try {
      // the group's own timeout fails the collective first; this bound only guards against a backend that ignores it
      const Millis bound = w->timeout + Millis(5000);
      for (Bucket& b : w->buckets) b.work->wait(bound);
      Finish(*w);
      if (w->hostSync) {
        for (Bucket& b : w->buckets) b.flat.cpu();
      }
      release();
    } catch (const c10::Error& e) {
      w->error = e.what_without_backtrace();
      release();
      throw std::runtime_error(w->error);
    } catch (const std::exception& e) {
      w->error = e.what();
      release();
      throw std::runtime_error(w->error);
    }
  };
  auto result = [w](Napi::Env e) {
    Napi::Array out = Napi::Array::New(e);
    if (!w->gathered.empty()) {
      for (size_t i = 0; i < w->gathered[0].size(); ++i) out.Set(static_cast<uint32_t>(i), WrapTensor(e, w->gathered[0][i]));
    }
    return out;
  };
  return RunOffThread(env, w->what + " failed (a peer process may have died, hung, or called a different collective)", run, result);
}

Napi::Value WorkIsCompleted(const Napi::CallbackInfo& info) {
  WorkStatePtr w = UnwrapShared<WorkState>(info[0], kWorkTag, "collective work");
  // a wait() in progress holds the lock (and may block for the timeout): report "not yet" rather than block here
  std::unique_lock<std::mutex> lock(w->mu, std::try_to_lock);
  if (!lock.owns_lock()) return Napi::Boolean::New(info.Env(), false);
  for (Bucket& b : w->buckets) {
    if (b.work && !b.work->isCompleted()) return Napi::Boolean::New(info.Env(), false);
  }
  return Napi::Boolean::New(info.Env(), true);
}

// destroyProcessGroup(group): releases the backend and the store (rank 0's store server stops). Collectives still
// in flight keep the backend alive until they settle. Idempotent.
Napi::Value DestroyProcessGroup(const Napi::CallbackInfo& info) {
  GroupPtr g = UnwrapShared<Group>(info[0], kGroupTag, "process group");
  g->comm.reset();
  g->store.reset();
  return info.Env().Undefined();
}

}  // namespace

void InitDistributed(Napi::Env env, Napi::Object exports) {
  exports.Set("distributedInfo", Napi::Function::New(env, Info));
  exports.Set("createProcessGroup", Napi::Function::New(env, CreateProcessGroup));
  exports.Set("allReduce", Napi::Function::New(env, AllReduce));
  exports.Set("broadcast", Napi::Function::New(env, Broadcast));
  exports.Set("allGather", Napi::Function::New(env, AllGather));
  exports.Set("barrier", Napi::Function::New(env, Barrier));
  exports.Set("workWait", Napi::Function::New(env, WorkWait));
  exports.Set("workIsCompleted", Napi::Function::New(env, WorkIsCompleted));
  exports.Set("destroyProcessGroup", Napi::Function::New(env, DestroyProcessGroup));
}

}  // namespace difflora

#endif  // DIFFLORA_DIST
