#pragma once
// One mapping of host memory: page-aligned, optionally in a memfd (shareable with another process
// by its file descriptor) and optionally registered with the CUDA runtime (pinned).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "fastdcp/memory/cuda_runtime.h"

namespace fastdcp {

struct HostMemoryTraits {
  bool pinned = false;
  bool shared = false;
  friend bool operator==(const HostMemoryTraits&, const HostMemoryTraits&) = default;
};

class HostBuffer {
 public:
  // Maps `nbytes` (rounded up to whole pages). Shared memory is reserved up front, so running out
  // of it is an Error(kResourceExhausted) here and never a SIGBUS later. Pinning requires an
  // available `cuda`; the registration is undone before the memory is unmapped.
  static HostBuffer allocate(size_t nbytes, HostMemoryTraits traits, std::shared_ptr<const CudaRuntime> cuda = {});

  HostBuffer() = default;
  HostBuffer(HostBuffer&& other) noexcept;
  HostBuffer& operator=(HostBuffer&& other) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer();

  void* data() const { return data_; }
  size_t size() const { return size_; }
  bool pinned() const { return cuda_ != nullptr; }
  bool shared() const { return fd_ >= 0; }
  int fd() const { return fd_; }  // the memfd, -1 unless shared; owned by the buffer
  HostMemoryTraits traits() const { return {pinned(), shared()}; }

 private:
  void reset() noexcept;

  void* data_ = nullptr;
  size_t size_ = 0;
  int fd_ = -1;
  std::shared_ptr<const CudaRuntime> cuda_;  // set when registered
};

size_t page_size() noexcept;

// Where a byte range of fastdcp's shared host memory lives: its memfd (owned by the HostBuffer,
// valid while the buffer is) and the offset in it. Found by address, so that memory which reached
// a framework and came back as a raw pointer can still be handed to another process.
struct SharedMemoryRange {
  int fd = -1;
  uint64_t offset = 0;
};
// The memfd range holding [data, data + nbytes), if one live shared HostBuffer holds all of it.
std::optional<SharedMemoryRange> find_shared_memory(const void* data, size_t nbytes);

}  // namespace fastdcp
