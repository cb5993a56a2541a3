#pragma once
// A pool of host memory that hands out reusable allocations by size, with accounting by kind and
// a budget.
//
// Note [Host pool layout]
// Small allocations (<= small_max_bytes) come from slabs: large HostBuffers carved into blocks of
// one size class (classes grow by 1/4 per step, so at most 25% is wasted), so a million tiny
// tensors cost a few mappings and one CUDA registration per slab, not one per tensor. Larger
// allocations get a HostBuffer of their own. Freed memory stays cached for reuse until trim(),
// and is trimmed automatically before the budget would be exceeded. Exceeding the budget is an
// Error(kResourceExhausted), never swapping. Allocations keep the pool's state alive, so they may
// outlive the HostMemoryPool object.

#include <cstddef>
#include <cstdint>
#include <memory>

#include "fastdcp/memory/host_buffer.h"

namespace fastdcp {

struct HostPoolOptions {
  uint64_t budget_bytes = 0;                   // 0: unlimited
  size_t slab_bytes = size_t{4} << 20;          // size of each slab mapping
  size_t small_max_bytes = size_t{1} << 20;     // larger allocations get their own buffer
};

struct HostMemoryStats {
  // Indexed by HostMemoryTraits: [pinned * 2 + shared].
  uint64_t reserved_bytes[4] = {};  // mapped, cached or in use
  uint64_t in_use_bytes[4] = {};    // handed out (size-class rounded)
  uint64_t total_reserved() const;
  uint64_t total_in_use() const;
  uint64_t pinned_bytes() const { return reserved_bytes[2] + reserved_bytes[3]; }
  uint64_t shared_bytes() const { return reserved_bytes[1] + reserved_bytes[3]; }
  uint64_t buffers = 0;             // live HostBuffer mappings
  uint64_t allocations = 0;         // live allocations
};

class HostAllocation;

class HostMemoryPool {
 public:
  explicit HostMemoryPool(HostPoolOptions options = {}, std::shared_ptr<const CudaRuntime> cuda = {});
  ~HostMemoryPool();
  HostMemoryPool(const HostMemoryPool&) = delete;
  HostMemoryPool& operator=(const HostMemoryPool&) = delete;

  // Returns memory of at least `nbytes` (64-byte aligned). Pinned traits need the CUDA runtime
  // given at construction. Throws Error(kResourceExhausted) when the budget would be exceeded.
  std::shared_ptr<HostAllocation> allocate(size_t nbytes, HostMemoryTraits traits);
  // Unmaps every cached buffer and empty slab; returns the bytes released.
  uint64_t trim();
  HostMemoryStats stats() const;
  const HostPoolOptions& options() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

// Memory handed out by a HostMemoryPool; returns to the pool when destroyed.
class HostAllocation {
 public:
  ~HostAllocation();
  HostAllocation(const HostAllocation&) = delete;
  HostAllocation& operator=(const HostAllocation&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }            // as requested
  size_t capacity() const { return capacity_; }    // as reserved (size class)
  HostMemoryTraits traits() const { return traits_; }
  int shared_fd() const { return shared_fd_; }
  uint64_t shared_offset() const { return shared_offset_; }

 private:
  friend class HostMemoryPool;
  HostAllocation() = default;

  std::shared_ptr<HostMemoryPool::State> pool_;
  void* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
  HostMemoryTraits traits_;
  int shared_fd_ = -1;
  uint64_t shared_offset_ = 0;
  void* owner_ = nullptr;   // the slab or large buffer it came from (pool-internal)
  int size_class_ = -1;     // -1: a large buffer of its own
};

}  // namespace fastdcp
