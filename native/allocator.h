// A caching CPU allocator for libtorch tensor data, installed with c10::SetCPUAllocator.
//
// Why (see shared/PLATFORM.md, "Tensor memory in Node"): with glibc's malloc, tensor blocks of about
// 1 MiB land on the brk heap next to Node's long-lived small objects, and the heap fragments until RSS
// grows without bound. This allocator keeps tensor data off glibc's heap (blocks >= 256 KiB come
// straight from mmap) and reuses freed blocks through size-class free lists with a capped cache.
//
// Nothing here is Node-specific; the N-API glue lives elsewhere. The allocator is process-wide (so is
// libtorch's CPU allocator slot), and every function below is thread-safe.
#pragma once

#include <cstdint>

namespace difflora {
namespace alloc {

struct Stats {
  uint64_t allocatedBytes;      // live blocks (handed out, not yet freed), by size-class bytes
  uint64_t requestedBytes;      // live blocks, by the byte counts libtorch asked for
  uint64_t cachedBytes;         // freed blocks kept for reuse (bounded by cacheCapBytes)
  uint64_t peakAllocatedBytes;  // maximum of allocatedBytes since start or resetPeak()
  uint64_t numAllocs;           // allocate() calls, zero-byte ones included
  uint64_t cacheHits;           // non-empty allocations served from the cache
  uint64_t cacheMisses;         // non-empty allocations that went to the OS (mmap / posix_memalign)
  uint64_t numLiveBlocks;       // blocks handed out and not yet freed
  uint64_t cacheCapBytes;       // current cap on cachedBytes
};

// Makes this allocator libtorch's CPU allocator. Idempotent and safe to call from several addon
// instances in one process. Call it before creating tensors where possible: tensors created earlier keep
// their own deleter and still free correctly. Reads DIFFLORA_ALLOC_CACHE_MB (cache cap in MiB, default
// 2048) on the first call. Does nothing when another library has already replaced libtorch's default
// CPU allocator (installed() then stays false), because pointers of that allocator could no longer be
// routed back to it.
void install();

// True when this allocator is libtorch's current CPU allocator.
bool installed();

Stats stats();

// Releases every cached (free) block to the OS. Blocks in use are untouched and return to the cache
// when their tensors are freed.
void emptyCache();

// Sets the cap on cached bytes and releases cached blocks at once until the cache fits. 0 disables
// caching (every freed block goes straight back to the OS).
void setCacheCap(uint64_t bytes);

// Restarts peakAllocatedBytes from the current allocatedBytes.
void resetPeak();

}  // namespace alloc
}  // namespace difflora
