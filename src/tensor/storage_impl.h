#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

#include "fastdcp/tensor/storage.h"

namespace fastdcp {

class StorageImpl : public std::enable_shared_from_this<StorageImpl> {
 public:
  void* data = nullptr;
  size_t nbytes = 0;
  Device device;
  std::shared_ptr<const void> keep_alive;
  HostMemoryInfo info;
  // Which stager cache slot last staged this storage: (stager id << 40) | (slot + 1). A hint that
  // saves a hash lookup per tensor; the stager verifies it (see DefaultStager::Impl::lookup).
  mutable std::atomic<uint64_t> stager_tag{0};
};

}  // namespace fastdcp
