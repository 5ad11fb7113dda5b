// Caching CPU allocator for libtorch; see allocator.h for why it exists.
//
// Layout of the design:
//   - Every request is rounded up to a size class, so freed blocks can be reused by later requests of
//     nearby sizes, and waste stays bounded (at most ~12.5% above 4 KiB).
//   - Classes >= 256 KiB are mapped with mmap, never taken from glibc's heap: that is the whole point
//     (tensor data must not share the brk heap with Node's small long-lived objects).
//   - Smaller classes come from posix_memalign(64, ...), like c10's default allocator.
//   - A freed block goes to a per-class free list unless that would push the cached total over the cap;
//     then it goes back to the OS.
//   - The DataPtr's context is the data pointer itself (as with c10's default allocator). libtorch needs
//     that: oneDNN/ideep allocates scratch memory through Allocator::raw_allocate / raw_deallocate, which
//     only work when context == data, and libtorch 2.x's copy-on-write storage requires the same. The
//     size class of each live block is therefore looked up in a map keyed by the data pointer.
//   - One mutex guards all state: libtorch allocates from OpenMP worker threads, and an uncontended
//     lock costs far less than the kernels that follow.
#include "allocator.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace difflora {
namespace alloc {
namespace {

constexpr size_t KiB = 1024;
constexpr size_t MiB = 1024 * KiB;

constexpr size_t kAlignment = 64;             // what c10 promises for CPU tensor data (AVX-512 loads)
constexpr size_t kLinearSmallMax = 4 * KiB;   // up to here, classes are multiples of 64 bytes
constexpr size_t kMmapMin = 256 * KiB;        // classes from here on are mmap'd
constexpr size_t kLinearPageMax = 1 * MiB;    // from kMmapMin to here, classes are page multiples
constexpr size_t kPage = 4 * KiB;             // class granularity for mapped blocks (mmap rounds further if needed)
constexpr size_t kMaxRequest = size_t(1) << 56;  // far beyond any real tensor; keeps rounding from overflowing
constexpr uint64_t kDefaultCacheCap = 2048ull * MiB;
// SetAllocator lets a registration replace the current one when its priority is >= the current one's.
// c10 registers its default CPU allocator with priority 0; anything above wins over it.
constexpr uint8_t kInstallPriority = 100;

// ---------------------------------------------------------------------------------------------------
// Size classes

size_t roundUp(size_t n, size_t step) { return (n + step - 1) / step * step; }

// Largest power of two <= n (n > 0).
size_t floorPow2(size_t n) { return size_t(1) << (63 - __builtin_clzll(static_cast<unsigned long long>(n))); }

// For n in (2^k, 2^(k+1)], steps of 2^k / 8: eight classes per doubling, waste <= 12.5%.
size_t roundGeometric(size_t n) { return roundUp(n, floorPow2(n - 1) / 8); }

size_t sizeClass(size_t n) {
  if (n <= kLinearSmallMax) return roundUp(n, kAlignment);
  if (n < kMmapMin) return roundGeometric(n);  // steps of >= 512 bytes, ends exactly at kMmapMin
  if (n <= kLinearPageMax) return roundUp(n, kPage);
  return roundGeometric(n);  // steps of >= 128 KiB, so still page multiples
}

bool isMapped(size_t cls) { return cls >= kMmapMin; }

// ---------------------------------------------------------------------------------------------------
// The OS side: where blocks come from and go back to. Both return/accept whole size classes.

void* osAllocate(size_t cls) {
  if (isMapped(cls)) {
    void* p = mmap(nullptr, cls, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  void* p = nullptr;
  return posix_memalign(&p, kAlignment, cls) == 0 ? p : nullptr;
}

void osRelease(void* p, size_t cls) {
  if (isMapped(cls)) {
    munmap(p, cls);
  } else {
    std::free(p);
  }
}

using BlockList = std::vector<std::pair<void*, size_t>>;  // (pointer, size class)

void osReleaseAll(const BlockList& blocks) {
  for (const auto& b : blocks) osRelease(b.first, b.second);
}

// ---------------------------------------------------------------------------------------------------
// The cache: live-block table, free lists and counters, all behind one mutex. Calls into the OS are made
// outside the lock so that a slow munmap does not stall other threads.

class BlockCache {
 public:
  BlockCache() { live_.reserve(4096); }

  void* allocate(size_t n);  // nullptr for n == 0; throws c10::Error when out of memory
  // Returns false when p was not handed out by this cache (see freeBlock()).
  bool release(void* p);
  Stats stats();
  void emptyCache();
  void setCap(uint64_t bytes);
  void resetPeak();

 private:
  struct LiveBlock {
    size_t cls;        // size-class bytes actually reserved
    size_t requested;  // bytes libtorch asked for
  };

  void* popCachedLocked(size_t cls);
  void recordLiveLocked(void* p, size_t cls, size_t requested);
  BlockList trimLocked(uint64_t limit);  // unlinks cached blocks until cachedBytes <= limit

  std::mutex mu_;
  std::unordered_map<void*, LiveBlock> live_;
  std::map<size_t, std::vector<void*>> free_;  // size class -> cached blocks (used LIFO, cache-warm)
  Stats s_{};
};

void* BlockCache::popCachedLocked(size_t cls) {
  auto it = free_.find(cls);
  if (it == free_.end() || it->second.empty()) return nullptr;
  void* p = it->second.back();
  it->second.pop_back();
  s_.cachedBytes -= cls;
  return p;
}

void BlockCache::recordLiveLocked(void* p, size_t cls, size_t requested) {
  live_.emplace(p, LiveBlock{cls, requested});
  s_.allocatedBytes += cls;
  s_.requestedBytes += requested;
  s_.numLiveBlocks += 1;
  s_.peakAllocatedBytes = std::max(s_.peakAllocatedBytes, s_.allocatedBytes);
}

void* BlockCache::allocate(size_t n) {
  if (n == 0) {
    // Like c10's default allocator: empty tensors get a null data pointer (the deleter never sees it).
    std::lock_guard<std::mutex> lock(mu_);
    s_.numAllocs += 1;
    return nullptr;
  }
  const size_t cls = sizeClass(n);
  {
    std::lock_guard<std::mutex> lock(mu_);
    s_.numAllocs += 1;
    if (void* p = popCachedLocked(cls)) {
      s_.cacheHits += 1;
      recordLiveLocked(p, cls, n);
      return p;
    }
    s_.cacheMisses += 1;
  }
  void* p = osAllocate(cls);
  if (p == nullptr) {
    // Cached blocks of other classes may be what stands between us and success.
    emptyCache();
    p = osAllocate(cls);
  }
  TORCH_CHECK(p != nullptr, "difflora CPU allocator: out of memory: could not allocate ", cls,
              " bytes (", n, " requested)");
  std::lock_guard<std::mutex> lock(mu_);
  recordLiveLocked(p, cls, n);
  return p;
}

bool BlockCache::release(void* p) {
  size_t cls = 0;
  bool keep = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return false;
    cls = it->second.cls;
    s_.allocatedBytes -= cls;
    s_.requestedBytes -= it->second.requested;
    s_.numLiveBlocks -= 1;
    live_.erase(it);
    keep = s_.cachedBytes + cls <= s_.cacheCapBytes;
    if (keep) {
      free_[cls].push_back(p);
      s_.cachedBytes += cls;
    }
  }
  if (!keep) osRelease(p, cls);
  return true;
}

BlockList BlockCache::trimLocked(uint64_t limit) {
  BlockList out;
  // Largest classes first: fewest OS calls to get under the limit.
  for (auto it = free_.rbegin(); it != free_.rend() && s_.cachedBytes > limit; ++it) {
    std::vector<void*>& list = it->second;
    while (!list.empty() && s_.cachedBytes > limit) {
      out.emplace_back(list.back(), it->first);
      list.pop_back();
      s_.cachedBytes -= it->first;
    }
  }
  return out;
}

Stats BlockCache::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return s_;
}

void BlockCache::emptyCache() {
  BlockList blocks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    blocks = trimLocked(0);
  }
  osReleaseAll(blocks);
}

void BlockCache::setCap(uint64_t bytes) {
  BlockList blocks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s_.cacheCapBytes = bytes;
    blocks = trimLocked(bytes);
  }
  osReleaseAll(blocks);
}

void BlockCache::resetPeak() {
  std::lock_guard<std::mutex> lock(mu_);
  s_.peakAllocatedBytes = s_.allocatedBytes;
}

// Created on first use and never destroyed: tensors may be freed during static destruction at process
// exit (after any function-local static object would already be gone), and their deleter must still
// find the cache.
BlockCache& cache() {
  static BlockCache* instance = [] {
    auto* c = new BlockCache();
    c->setCap(kDefaultCacheCap);
    return c;
  }();
  return *instance;
}

// ---------------------------------------------------------------------------------------------------
// The c10::Allocator that libtorch calls.

// The DataPtr deleter and raw_deleter(). Must be a plain function (c10 stores a function pointer).
void freeBlock(void* p) {
  if (p == nullptr) return;  // zero-byte allocations
  if (cache().release(p)) return;
  // Not ours: only reachable through raw_deallocate() of memory that oneDNN got from c10's default
  // allocator (raw_allocate) before install(). Give it back the way that allocator would.
  c10::DeleterFnPtr fallback = c10::GetDefaultCPUAllocator()->raw_deleter();
  if (fallback != nullptr) {
    fallback(p);
  } else {
    std::free(p);
  }
}

c10::DataPtr makeDataPtr(size_t n) {
  TORCH_CHECK(n <= kMaxRequest, "difflora CPU allocator: cannot allocate ", n, " bytes");
  void* p = cache().allocate(n);  // null for n == 0
  return c10::DataPtr(p, p, &freeBlock, c10::Device(c10::DeviceType::CPU));
}

// The c10::Allocator interface changed across libtorch versions: `allocate` is const in 1.x and early
// 2.x and non-const later, and 2.x added the pure virtual `copy_data`. Rather than guessing the exact
// release from version macros, both `allocate` signatures are declared and nothing is marked
// `override`: whichever signature the installed libtorch declares virtual is overridden, the other is
// an ordinary member. `copy_data` likewise overrides where it exists and is unused elsewhere.
class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) const { return makeDataPtr(n); }
  c10::DataPtr allocate(size_t n) { return makeDataPtr(n); }
  c10::DeleterFnPtr raw_deleter() const { return &freeBlock; }
  void copy_data(void* dest, const void* src, std::size_t count) const {
    if (count > 0) std::memcpy(dest, src, count);
  }
};

CachingCpuAllocator* allocatorInstance() {
  static CachingCpuAllocator* instance = new CachingCpuAllocator();  // never destroyed, see cache()
  return instance;
}

// DIFFLORA_ALLOC_CACHE_MB, when set to a plain decimal number of MiB, overrides the default cap.
// Anything else (empty, signs, spaces, units) is ignored.
void applyCapFromEnv() {
  const char* env = std::getenv("DIFFLORA_ALLOC_CACHE_MB");
  if (env == nullptr || *env == '\0' || std::strspn(env, "0123456789") != std::strlen(env)) return;
  errno = 0;
  unsigned long long mb = std::strtoull(env, nullptr, 10);
  const uint64_t maxMb = UINT64_MAX / MiB;
  cache().setCap(errno != 0 || mb > maxMb ? UINT64_MAX : static_cast<uint64_t>(mb) * MiB);
}

}  // namespace

void install() {
  // SetCPUAllocator is not thread-safe; serialize our own calls.
  static std::mutex installMutex;
  static bool envApplied = false;
  std::lock_guard<std::mutex> lock(installMutex);
  c10::Allocator* ours = allocatorInstance();
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current == ours) return;
  if (current != c10::GetDefaultCPUAllocator()) return;  // someone else's allocator: leave it alone
  if (!envApplied) {
    applyCapFromEnv();
    envApplied = true;
  }
  c10::SetCPUAllocator(ours, kInstallPriority);
}

bool installed() { return c10::GetCPUAllocator() == allocatorInstance(); }

Stats stats() { return cache().stats(); }

void emptyCache() { cache().emptyCache(); }

void setCacheCap(uint64_t bytes) { cache().setCap(bytes); }

void resetPeak() { cache().resetPeak(); }

}  // namespace alloc
}  // namespace difflora
