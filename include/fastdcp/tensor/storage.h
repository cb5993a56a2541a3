#pragma once
// A Storage is a contiguous byte range on one device that tensors view. Its identity (not its
// address) is what staging deduplicates and caches on: two Storage handles are the same storage
// exactly when they share one StorageImpl.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace fastdcp {

enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;

  static Device cpu() { return {}; }
  static Device cuda(int index) { return {DeviceType::kCUDA, index}; }
  bool is_cpu() const { return type == DeviceType::kCPU; }
  bool is_cuda() const { return type == DeviceType::kCUDA; }
  std::string str() const;
  // "cpu", "cuda" (device 0) or "cuda:<index>", as str() writes them; Error(kInvalidArgument)
  // naming the text otherwise.
  static Device parse(const std::string& text);
  friend bool operator==(const Device&, const Device&) = default;
};

// What fastdcp's own host memory is: staged buffers report these truthfully.
struct HostMemoryInfo {
  bool pinned = false;           // registered with the CUDA runtime
  bool shared = false;           // in a memfd that another process can map
  int shared_fd = -1;            // that memfd (owned by the allocation), -1 if not shared
  uint64_t shared_offset = 0;    // offset of this storage inside the memfd
};

class StorageImpl;

class Storage {
 public:
  Storage() = default;
  // Views memory owned elsewhere; `keep_alive` is held for as long as any handle lives.
  static Storage wrap(void* data, size_t nbytes, Device device, std::shared_ptr<const void> keep_alive = {},
                      HostMemoryInfo info = {});
  // Allocates zeroed, 64-byte aligned host memory owned by the storage.
  static Storage allocate_cpu(size_t nbytes);

  bool defined() const { return impl_ != nullptr; }
  void* data() const;
  size_t nbytes() const;
  Device device() const;
  const HostMemoryInfo& host_info() const;
  // Stable identity of the underlying storage while any handle is alive.
  const StorageImpl* identity() const { return impl_.get(); }
  std::weak_ptr<const StorageImpl> weak_identity() const { return impl_; }
  long use_count() const { return impl_.use_count(); }

  // Replaces the memory in place, as frameworks do when they free a storage to 0 bytes and
  // regrow it (sharded-parameter training). Every tensor viewing this storage sees the change.
  void reset(void* data, size_t nbytes, std::shared_ptr<const void> keep_alive = {});

  friend bool operator==(const Storage& a, const Storage& b) { return a.impl_ == b.impl_; }

 private:
  std::shared_ptr<StorageImpl> impl_;
};

}  // namespace fastdcp
