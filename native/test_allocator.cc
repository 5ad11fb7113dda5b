// Standalone test of the caching CPU allocator (native/allocator.cc); not part of the addon.
// Build and run (one command):
//   g++ -O2 -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 native/allocator.cc native/test_allocator.cc
//     -I/usr/include -I/usr/include/torch/csrc/api/include -ltorch -ltorch_cpu -lc10 -lpthread
//     -o /tmp/test_allocator && /tmp/test_allocator
// Prints one line per check group and PASS/FAIL at the end; exits non-zero on any failure.
#include "allocator.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace alloc = difflora::alloc;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                        \
  do {                                                           \
    if (!(cond)) {                                               \
      ++failures;                                                \
      std::printf("  FAIL %s:%d: %s  ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                  \
      std::printf("\n");                                         \
    }                                                            \
  } while (0)

constexpr int64_t KiB = 1024;
constexpr int64_t MiB = 1024 * KiB;

uint64_t rssBytes() {
  long pages = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
  std::fclose(f);
  return static_cast<uint64_t>(resident) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

bool aligned64(const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; }

at::Tensor bytes(int64_t n) { return at::empty({n}, at::kByte); }

void printStats(const char* label) {
  alloc::Stats s = alloc::stats();
  std::printf(
      "  [%s] allocated=%llu requested=%llu cached=%llu peak=%llu allocs=%llu hits=%llu misses=%llu "
      "live=%llu cap=%llu\n",
      label, (unsigned long long)s.allocatedBytes, (unsigned long long)s.requestedBytes,
      (unsigned long long)s.cachedBytes, (unsigned long long)s.peakAllocatedBytes,
      (unsigned long long)s.numAllocs, (unsigned long long)s.cacheHits, (unsigned long long)s.cacheMisses,
      (unsigned long long)s.numLiveBlocks, (unsigned long long)s.cacheCapBytes);
}

void expectNothingLive(const char* where) {
  alloc::Stats s = alloc::stats();
  EXPECT(s.allocatedBytes == 0 && s.requestedBytes == 0 && s.numLiveBlocks == 0,
        "%s: allocated=%llu requested=%llu live=%llu", where, (unsigned long long)s.allocatedBytes,
        (unsigned long long)s.requestedBytes, (unsigned long long)s.numLiveBlocks);
}

const std::vector<int64_t> kSizes = {0, 1, 100, 4 * KiB, 300 * KiB, 1 * MiB, 5 * MiB, 33 * MiB};

// Tensors and raw blocks made by c10's default allocator before install() must still free correctly.
void testInstall(at::Tensor& preTensor, void*& preRaw) {
  std::printf("install\n");
  EXPECT(!alloc::installed(), "installed before install()");
  EXPECT(c10::GetCPUAllocator() == c10::GetDefaultCPUAllocator(), "unexpected CPU allocator at start");
  preTensor = at::ones({256 * KiB}, at::kFloat);  // 1 MiB, default allocator
  preRaw = c10::GetCPUAllocator()->raw_allocate(64 * KiB);
  alloc::install();
  EXPECT(alloc::installed(), "not installed after install()");
  alloc::install();  // idempotent
  EXPECT(alloc::installed(), "not installed after second install()");
  EXPECT(c10::GetCPUAllocator()->raw_deleter() != nullptr, "raw_deleter is null");
  const char* envCap = std::getenv("DIFFLORA_ALLOC_CACHE_MB");
  // Malformed values are ignored by install(); an all-digit value is a cap in MiB.
  bool envValid = envCap != nullptr && *envCap != '\0' && std::strspn(envCap, "0123456789") == std::strlen(envCap);
  uint64_t expectCap = envValid ? std::strtoull(envCap, nullptr, 10) * MiB : 2048ull * MiB;
  EXPECT(alloc::stats().cacheCapBytes == expectCap, "cap %llu, expected %llu",
         (unsigned long long)alloc::stats().cacheCapBytes, (unsigned long long)expectCap);
  expectNothingLive("after install");

  EXPECT(preTensor.sum().item<float>() == 256 * KiB, "pre-install tensor content");
  preTensor = at::Tensor();  // frees through the default allocator's own deleter
  // oneDNN frees its scratch memory with raw_deallocate() on whatever allocator is current.
  c10::GetCPUAllocator()->raw_deallocate(preRaw);
  preRaw = nullptr;
  expectNothingLive("after freeing pre-install memory");
}

void testSizes() {
  std::printf("sizes\n");
  alloc::Stats before = alloc::stats();
  for (int round = 0; round < 3; ++round) {
    for (int64_t n : kSizes) {
      at::Tensor t = bytes(n);
      uint8_t* p = t.data_ptr<uint8_t>();
      EXPECT(t.numel() == n, "numel %lld", (long long)n);
      EXPECT(aligned64(p), "size %lld not 64-byte aligned: %p", (long long)n, (void*)p);
      if (n > 0) {
        std::memset(p, 0xAB, n);
        EXPECT(p[0] == 0xAB && p[n - 1] == 0xAB, "write size %lld", (long long)n);
        alloc::Stats s = alloc::stats();
        EXPECT(s.requestedBytes >= static_cast<uint64_t>(n) && s.allocatedBytes >= s.requestedBytes,
              "live accounting for size %lld", (long long)n);
      }
      // Float tensors through an op, too.
      if (n >= 4) {
        at::Tensor r = at::randn({n / 4});
        EXPECT(aligned64(r.data_ptr()), "randn %lld not aligned", (long long)n);
        float* f = r.data_ptr<float>();
        for (int64_t i = 0; i < n / 4; ++i) f[i] = 1.0f;
        EXPECT(r.sum().item<float>() == static_cast<float>(n / 4), "randn sum %lld", (long long)n);
      }
    }
  }
  alloc::Stats after = alloc::stats();
  expectNothingLive("after size round trips");
  EXPECT(after.cacheHits > before.cacheHits, "no cache hits on repeated sizes");
  EXPECT(after.cachedBytes <= after.cacheCapBytes, "cached over cap");
  EXPECT(after.numAllocs > before.numAllocs, "numAllocs did not move");
  EXPECT(after.peakAllocatedBytes >= static_cast<uint64_t>(33 * MiB), "peak below largest tensor");
  printStats("sizes");
}

// Each request is rounded to a class >= n with bounded waste.
void testSizeClasses() {
  std::printf("size classes\n");
  std::mt19937_64 rng(42);
  std::vector<int64_t> sizes;
  for (int i = 0; i < 400; ++i) sizes.push_back(1 + static_cast<int64_t>(rng() % (64 * MiB)));
  for (int i = 0; i < 400; ++i) sizes.push_back(1 + static_cast<int64_t>(rng() % (256 * KiB)));
  for (int64_t p = 1; p <= 64 * MiB; p *= 2) {
    sizes.push_back(p);
    sizes.push_back(p + 1);
  }
  for (int64_t n : sizes) {
    uint64_t base = alloc::stats().allocatedBytes;
    at::Tensor t = bytes(n);
    uint64_t cls = alloc::stats().allocatedBytes - base;
    EXPECT(cls >= static_cast<uint64_t>(n), "class %llu < request %lld", (unsigned long long)cls, (long long)n);
    // <= 64 bytes of rounding below 4 KiB, <= 12.5% above, <= one page between 256 KiB and 1 MiB.
    EXPECT(cls <= static_cast<uint64_t>(n) + 63 || cls <= static_cast<uint64_t>(n) + n / 8 + 1 ||
              (cls <= static_cast<uint64_t>(n) + 4095 && n <= 1 * MiB),
          "class %llu too wasteful for %lld", (unsigned long long)cls, (long long)n);
  }
  expectNothingLive("after size classes");
}

void testZeroSize() {
  std::printf("zero size\n");
  uint64_t allocs = alloc::stats().numAllocs;
  {
    at::Tensor t = at::empty({0});
    EXPECT(t.numel() == 0, "numel");
    at::Tensor u = at::cat({t, at::ones({3})});
    EXPECT(u.numel() == 3 && u.sum().item<float>() == 3.0f, "cat with empty");
    c10::DataPtr d = c10::GetCPUAllocator()->allocate(0);  // direct zero-byte allocation
    EXPECT(d.device().is_cpu(), "device");
  }
  EXPECT(alloc::stats().numAllocs > allocs, "zero-size allocations not counted");
  expectNothingLive("after zero size");
}

void testRaw() {
  std::printf("raw_allocate/raw_deallocate\n");
  c10::Allocator* a = c10::GetCPUAllocator();
  for (size_t n : {size_t(1), size_t(5000), size_t(300 * KiB), size_t(3 * MiB)}) {
    void* p = a->raw_allocate(n);
    EXPECT(p != nullptr && aligned64(p), "raw_allocate %zu", n);
    std::memset(p, 1, n);
    a->raw_deallocate(p);
  }
  expectNothingLive("after raw");
}

void testCap() {
  std::printf("cache cap\n");
  alloc::emptyCache();
  alloc::setCacheCap(1 * MiB);
  {
    std::vector<at::Tensor> ts;
    for (int i = 0; i < 6; ++i) ts.push_back(bytes(512 * KiB));
  }  // six 512 KiB blocks freed: only two fit
  alloc::Stats s = alloc::stats();
  EXPECT(s.cachedBytes <= 1 * MiB && s.cachedBytes > 0, "cached=%llu with cap 1 MiB", (unsigned long long)s.cachedBytes);
  alloc::setCacheCap(256 * KiB);  // trims immediately
  s = alloc::stats();
  EXPECT(s.cachedBytes <= 256 * KiB, "cached=%llu after lowering cap", (unsigned long long)s.cachedBytes);
  EXPECT(s.cacheCapBytes == static_cast<uint64_t>(256 * KiB), "cap not reported");
  alloc::setCacheCap(0);  // no caching at all
  { at::Tensor t = bytes(2 * MiB); }
  EXPECT(alloc::stats().cachedBytes == 0, "cap 0 still caches");
  alloc::setCacheCap(2048ull * MiB);
  expectNothingLive("after cap");
  printStats("cap");
}

void testEmptyCache() {
  std::printf("emptyCache\n");
  at::Tensor live1 = bytes(3 * MiB);
  at::Tensor live2 = bytes(1000);
  { at::Tensor a = bytes(7 * MiB), b = bytes(2000), c = bytes(400 * KiB); }
  EXPECT(alloc::stats().cachedBytes > 0, "nothing cached before emptyCache");
  alloc::emptyCache();
  EXPECT(alloc::stats().cachedBytes == 0, "cachedBytes=%llu after emptyCache", (unsigned long long)alloc::stats().cachedBytes);
  // Tensors that outlive emptyCache() still free correctly (back into the cache).
  std::memset(live1.data_ptr(), 7, 3 * MiB);
  live1 = at::Tensor();
  live2 = at::Tensor();
  EXPECT(alloc::stats().cachedBytes > 0, "freed-after-empty blocks not cached");
  expectNothingLive("after emptyCache");
  alloc::resetPeak();
  EXPECT(alloc::stats().peakAllocatedBytes == 0, "resetPeak");
}

// Real kernels, some on OpenMP worker threads and (where libtorch has it) through oneDNN, which
// allocates via raw_allocate.
void testOps() {
  std::printf("ops (mkldnn=%d, threads=2)\n", at::hasMKLDNN() ? 1 : 0);
  at::set_num_threads(2);
  {
    at::Tensor x = at::randn({4, 8, 32, 32}).requires_grad_();
    at::Tensor w = at::randn({16, 8, 3, 3}).requires_grad_();
    at::Tensor y = at::conv2d(x, w, {}, 1, 1);
    at::Tensor z = at::matmul(y.flatten(1), at::randn({16 * 32 * 32, 10}));
    z.sum().backward();
    EXPECT(x.grad().defined() && w.grad().defined(), "grads");
    EXPECT(aligned64(y.data_ptr()), "conv output aligned");
  }
  expectNothingLive("after ops");
}

// Tensors allocated and freed from several threads at once; each checks its own data before freeing,
// which catches a block handed out twice.
void testThreads() {
  std::printf("threads 4 x 20000\n");
  const std::vector<int64_t> sizes = {0, 1, 100, 4 * KiB, 20 * KiB, 300 * KiB, 1 * MiB, 2 * MiB + 123};
  std::atomic<int> bad{0};
  auto worker = [&](int id) {
    std::mt19937 rng(id);
    std::vector<at::Tensor> window(8);
    for (int i = 0; i < 20000; ++i) {
      int64_t n = sizes[rng() % sizes.size()];
      uint8_t tag = static_cast<uint8_t>(id * 31 + i);
      at::Tensor t = bytes(n);
      if (n > 0) {
        uint8_t* p = t.data_ptr<uint8_t>();
        p[0] = tag;
        p[n / 2] = tag;
        p[n - 1] = tag;
      }
      at::Tensor& slot = window[i % window.size()];
      if (slot.defined() && slot.numel() > 0) {  // verify the tensor we are about to drop
        const uint8_t* q = slot.data_ptr<uint8_t>();
        int64_t m = slot.numel();
        uint8_t expect = q[0];
        if (q[m / 2] != expect || q[m - 1] != expect) bad++;
      }
      slot = t;
    }
  };
  std::vector<std::thread> threads;
  for (int id = 0; id < 4; ++id) threads.emplace_back(worker, id);
  for (auto& t : threads) t.join();
  EXPECT(bad.load() == 0, "%d corrupted tensors", bad.load());
  expectNothingLive("after threads");
  alloc::Stats s = alloc::stats();
  EXPECT(s.cachedBytes <= s.cacheCapBytes, "cached over cap");
  printStats("threads");
}

// The scenario from PLATFORM.md: 1 MiB temporaries with small long-lived heap objects allocated in
// between (standing in for Node's handles). RSS must stay flat.
void testRssLoop() {
  const int iterations = 65000;
  std::printf("rss loop %d x 1 MiB\n", iterations);
  std::vector<std::unique_ptr<char[]>> smallObjects;
  smallObjects.reserve(iterations);
  uint64_t rssWarm = 0;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iterations; ++i) {
    at::Tensor t = bytes(1 * MiB);
    std::memset(t.data_ptr(), i & 0xFF, 1 * MiB);
    smallObjects.emplace_back(new char[80]);
    if (i == 1000) rssWarm = rssBytes();
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  uint64_t rssEnd = rssBytes();
  double growthMb = (static_cast<double>(rssEnd) - static_cast<double>(rssWarm)) / MiB;
  std::printf("  rss warm=%.1f MB end=%.1f MB growth=%.1f MB, %.2f us/iter (incl. 1 MiB memset)\n",
              rssWarm / double(MiB), rssEnd / double(MiB), growthMb, secs * 1e6 / iterations);
  // 64k small objects of ~96 bytes each account for ~6 MB of the growth.
  EXPECT(growthMb < 32.0, "RSS grew %.1f MB", growthMb);
  expectNothingLive("after rss loop");
}

}  // namespace

int main() {
  at::Tensor preTensor;
  void* preRaw = nullptr;
  try {
    testInstall(preTensor, preRaw);
    testSizes();
    testSizeClasses();
    testZeroSize();
    testRaw();
    testCap();
    testEmptyCache();
    testOps();
    testThreads();
    testRssLoop();
    alloc::emptyCache();
    EXPECT(alloc::stats().cachedBytes == 0, "final emptyCache");
    printStats("final");
  } catch (const std::exception& e) {
    ++failures;
    std::printf("  FAIL exception: %s\n", e.what());
  }
  std::printf(failures == 0 ? "PASS\n" : "FAIL (%d)\n", failures);
  return failures == 0 ? 0 : 1;
}
