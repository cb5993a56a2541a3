#include "fastdcp/memory/host_pool.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {

constexpr size_t kMinBlock = 64;

int traits_index(HostMemoryTraits traits) { return (traits.pinned ? 2 : 0) + (traits.shared ? 1 : 0); }

// Size classes from 64 bytes up to `max`, four per doubling (64, 80, 96, 112, 128, 160, ...).
std::vector<size_t> make_size_classes(size_t max) {
  std::vector<size_t> classes;
  for (size_t base = kMinBlock; base < max; base *= 2) {
    for (size_t step = 0; step < 4 && base + step * base / 4 < max; ++step) classes.push_back(base + step * base / 4);
  }
  classes.push_back(max);
  return classes;
}

struct Slab {
  HostBuffer buffer;
  int size_class = 0;
  size_t blocks_used = 0;
};

struct Partition {
  std::vector<std::unique_ptr<Slab>> slabs;
  std::vector<std::vector<std::pair<Slab*, size_t>>> free_blocks;  // per size class: (slab, offset)
  std::multimap<size_t, std::unique_ptr<HostBuffer>> cached_large;  // free, keyed by size
  std::unordered_map<const HostBuffer*, std::unique_ptr<HostBuffer>> live_large;
};

}  // namespace

uint64_t HostMemoryStats::total_reserved() const {
  return reserved_bytes[0] + reserved_bytes[1] + reserved_bytes[2] + reserved_bytes[3];
}
uint64_t HostMemoryStats::total_in_use() const {
  return in_use_bytes[0] + in_use_bytes[1] + in_use_bytes[2] + in_use_bytes[3];
}

struct HostMemoryPool::State {
  std::mutex mutex;
  HostPoolOptions options;
  std::shared_ptr<const CudaRuntime> cuda;
  std::vector<size_t> size_classes;
  Partition partitions[4];
  HostMemoryStats stats;

  // Makes room for `bytes` more reserved memory within the budget, trimming cached memory first.
  void reserve_locked(uint64_t bytes, size_t requested) {
    if (options.budget_bytes == 0) return;
    if (stats.total_reserved() + bytes > options.budget_bytes) trim_locked();
    if (stats.total_reserved() + bytes > options.budget_bytes) {
      throw Error(ErrorCode::kResourceExhausted,
                  "host memory budget exceeded: a " + std::to_string(requested) + "-byte staging buffer needs " +
                      std::to_string(bytes) + " more bytes, but " + std::to_string(stats.total_reserved()) + " of " +
                      std::to_string(options.budget_bytes) + " budgeted bytes are reserved (" +
                      std::to_string(stats.total_in_use()) + " in use); raise memory_budget_bytes or stage less");
    }
  }

  HostBuffer new_buffer_locked(size_t bytes, size_t requested, HostMemoryTraits traits) {
    const size_t rounded = (bytes + page_size() - 1) / page_size() * page_size();
    reserve_locked(rounded, requested);
    HostBuffer buffer = HostBuffer::allocate(bytes, traits, traits.pinned ? cuda : nullptr);
    stats.reserved_bytes[traits_index(traits)] += buffer.size();
    ++stats.buffers;
    return buffer;
  }

  uint64_t trim_locked() {
    uint64_t released = 0;
    for (int t = 0; t < 4; ++t) {
      Partition& p = partitions[t];
      for (auto& [size, buffer] : p.cached_large) released += buffer->size();
      stats.buffers -= p.cached_large.size();
      p.cached_large.clear();
      std::vector<Slab*> empty;
      for (auto& slab : p.slabs) {
        if (slab->blocks_used == 0) empty.push_back(slab.get());
      }
      if (empty.empty()) continue;
      for (auto& blocks : p.free_blocks) {
        std::erase_if(blocks, [&](const auto& block) {
          return std::find(empty.begin(), empty.end(), block.first) != empty.end();
        });
      }
      std::erase_if(p.slabs, [&](const std::unique_ptr<Slab>& slab) {
        if (slab->blocks_used != 0) return false;
        released += slab->buffer.size();
        --stats.buffers;
        return true;
      });
    }
    for (int t = 0; t < 4; ++t) stats.reserved_bytes[t] = 0;
    for (int t = 0; t < 4; ++t) {
      for (auto& slab : partitions[t].slabs) stats.reserved_bytes[t] += slab->buffer.size();
      for (auto& [ptr, buffer] : partitions[t].live_large) stats.reserved_bytes[t] += buffer->size();
    }
    return released;
  }
};

HostMemoryPool::HostMemoryPool(HostPoolOptions options, std::shared_ptr<const CudaRuntime> cuda)
    : state_(std::make_shared<State>()) {
  if (options.small_max_bytes < kMinBlock || options.slab_bytes < options.small_max_bytes) {
    throw Error(ErrorCode::kInvalidArgument, "HostPoolOptions: need 64 <= small_max_bytes <= slab_bytes");
  }
  state_->options = options;
  state_->cuda = std::move(cuda);
  state_->size_classes = make_size_classes(options.small_max_bytes);
  for (auto& p : state_->partitions) p.free_blocks.resize(state_->size_classes.size());
}

HostMemoryPool::~HostMemoryPool() = default;

const HostPoolOptions& HostMemoryPool::options() const { return state_->options; }

std::shared_ptr<HostAllocation> HostMemoryPool::allocate(size_t nbytes, HostMemoryTraits traits) {
  State& s = *state_;
  std::lock_guard lock(s.mutex);
  Partition& part = s.partitions[traits_index(traits)];
  // pool_ is set last: an allocation that failed half-way must not return itself to the pool.
  std::shared_ptr<HostAllocation> alloc(new HostAllocation());
  alloc->size_ = nbytes;
  alloc->traits_ = traits;
  const HostBuffer* source = nullptr;
  if (std::max(nbytes, kMinBlock) <= s.options.small_max_bytes) {
    const auto cls = static_cast<int>(std::lower_bound(s.size_classes.begin(), s.size_classes.end(),
                                                       std::max(nbytes, kMinBlock)) - s.size_classes.begin());
    const size_t block = s.size_classes[cls];
    auto& free_list = part.free_blocks[cls];
    if (free_list.empty()) {
      auto slab = std::make_unique<Slab>();
      slab->buffer = s.new_buffer_locked(s.options.slab_bytes, nbytes, traits);
      slab->size_class = cls;
      // Hand out low addresses first: pop_back takes the last pushed.
      for (size_t off = (slab->buffer.size() / block) * block; off >= block; off -= block) {
        free_list.emplace_back(slab.get(), off - block);
      }
      part.slabs.push_back(std::move(slab));
    }
    auto [slab, offset] = free_list.back();
    free_list.pop_back();
    ++slab->blocks_used;
    alloc->data_ = static_cast<char*>(slab->buffer.data()) + offset;
    alloc->capacity_ = block;
    alloc->size_class_ = cls;
    alloc->owner_ = slab;
    alloc->shared_offset_ = offset;
    source = &slab->buffer;
  } else {
    const size_t rounded = (nbytes + page_size() - 1) / page_size() * page_size();
    auto it = part.cached_large.lower_bound(rounded);
    std::unique_ptr<HostBuffer> buffer;
    if (it != part.cached_large.end() && it->first <= rounded + rounded / 8) {
      buffer = std::move(it->second);
      part.cached_large.erase(it);
    } else {
      buffer = std::make_unique<HostBuffer>(s.new_buffer_locked(nbytes, nbytes, traits));
    }
    alloc->data_ = buffer->data();
    alloc->capacity_ = buffer->size();
    alloc->owner_ = buffer.get();
    source = buffer.get();
    part.live_large.emplace(buffer.get(), std::move(buffer));
  }
  alloc->shared_fd_ = source->fd();
  if (!traits.shared) alloc->shared_offset_ = 0;
  s.stats.in_use_bytes[traits_index(traits)] += alloc->capacity_;
  ++s.stats.allocations;
  alloc->pool_ = state_;
  return alloc;
}

HostAllocation::~HostAllocation() {
  if (!pool_) return;
  auto& s = *pool_;
  std::lock_guard lock(s.mutex);
  Partition& part = s.partitions[traits_index(traits_)];
  if (size_class_ >= 0) {
    auto* slab = static_cast<Slab*>(owner_);
    --slab->blocks_used;
    part.free_blocks[size_class_].emplace_back(
        slab, static_cast<size_t>(static_cast<char*>(data_) - static_cast<char*>(slab->buffer.data())));
  } else {
    auto it = part.live_large.find(static_cast<const HostBuffer*>(owner_));
    if (it != part.live_large.end()) {
      const size_t size = it->second->size();
      part.cached_large.emplace(size, std::move(it->second));
      part.live_large.erase(it);
    }
  }
  s.stats.in_use_bytes[traits_index(traits_)] -= capacity_;
  --s.stats.allocations;
}

uint64_t HostMemoryPool::trim() {
  std::lock_guard lock(state_->mutex);
  return state_->trim_locked();
}

HostMemoryStats HostMemoryPool::stats() const {
  std::lock_guard lock(state_->mutex);
  return state_->stats;
}

}  // namespace fastdcp
