#include "fastdcp/memory/host_buffer.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "fastdcp/common/error.h"

namespace fastdcp {

namespace {

// Live shared buffers by start address; see find_shared_memory.
struct SharedRegistry {
  struct Mapping {
    size_t size;
    int fd;
  };
  std::mutex mutex;
  std::map<uintptr_t, Mapping> mappings;
};

SharedRegistry& shared_registry() {
  static auto* registry = new SharedRegistry;  // leaked: buffers may be freed during static destruction
  return *registry;
}

}  // namespace

std::optional<SharedMemoryRange> find_shared_memory(const void* data, size_t nbytes) {
  const auto address = reinterpret_cast<uintptr_t>(data);
  SharedRegistry& registry = shared_registry();
  std::lock_guard lock(registry.mutex);
  auto it = registry.mappings.upper_bound(address);
  if (it == registry.mappings.begin()) return std::nullopt;
  --it;
  const uint64_t offset = address - it->first;
  if (offset + nbytes > it->second.size) return std::nullopt;
  return SharedMemoryRange{it->second.fd, offset};
}

size_t page_size() noexcept {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

HostBuffer HostBuffer::allocate(size_t nbytes, HostMemoryTraits traits, std::shared_ptr<const CudaRuntime> cuda) {
  HostBuffer buffer;
  const size_t size = std::max<size_t>((nbytes + page_size() - 1) / page_size() * page_size(), page_size());
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
  if (traits.shared) {
    // Note: memfd rather than /dev/shm, which is 64 MiB in default containers.
    buffer.fd_ = memfd_create("fastdcp-staging", MFD_CLOEXEC);
    if (buffer.fd_ < 0) throw_system_error("memfd_create for " + std::to_string(size) + " bytes of shared memory", errno);
    if (ftruncate(buffer.fd_, static_cast<off_t>(size)) != 0) {
      const int err = errno;
      buffer.reset();
      throw_system_error("ftruncate of shared memory to " + std::to_string(size) + " bytes", err);
    }
    // Reserve the pages now: a later page fault on exhausted shared memory would be a SIGBUS.
    if (const int err = posix_fallocate(buffer.fd_, 0, static_cast<off_t>(size)); err != 0) {
      buffer.reset();
      throw Error(ErrorCode::kResourceExhausted, "cannot reserve " + std::to_string(size) +
                                                     " bytes of shared memory (memfd): " + std::strerror(err));
    }
    flags = MAP_SHARED;
  }
  void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, buffer.fd_, 0);
  if (data == MAP_FAILED) {
    const int err = errno;
    buffer.reset();
    const std::string limit = address_space_limit_note();
    throw Error(ErrorCode::kResourceExhausted, "cannot map " + std::to_string(size) + " bytes of host memory: " +
                                                   std::strerror(err) + (limit.empty() ? "" : " (" + limit + ")"));
  }
  buffer.data_ = data;
  buffer.size_ = size;
  if (buffer.fd_ >= 0) {
    SharedRegistry& registry = shared_registry();
    std::lock_guard lock(registry.mutex);
    registry.mappings[reinterpret_cast<uintptr_t>(data)] = {size, buffer.fd_};
  }
  if (size >= (size_t{2} << 20)) madvise(data, size, MADV_HUGEPAGE);  // a hint; THP may be off
  if (traits.pinned) {
    if (!cuda || !cuda->available()) {
      buffer.reset();
      throw Error(ErrorCode::kUnavailable, "pinned host memory needs CUDA, which is unavailable" +
                                               (cuda ? ": " + cuda->unavailable_reason() : std::string()));
    }
    try {
      cuda->host_register(data, size);
    } catch (...) {
      buffer.reset();
      throw;
    }
    buffer.cuda_ = std::move(cuda);
  }
  return buffer;
}

HostBuffer::HostBuffer(HostBuffer&& other) noexcept { *this = std::move(other); }

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    fd_ = std::exchange(other.fd_, -1);
    cuda_ = std::move(other.cuda_);
  }
  return *this;
}

HostBuffer::~HostBuffer() { reset(); }

void HostBuffer::reset() noexcept {
  if (cuda_ && data_) cuda_->host_unregister(data_);  // unpin before the pages go away
  cuda_.reset();
  if (data_ && fd_ >= 0) {
    SharedRegistry& registry = shared_registry();
    std::lock_guard lock(registry.mutex);
    registry.mappings.erase(reinterpret_cast<uintptr_t>(data_));
  }
  if (data_) munmap(data_, size_);
  if (fd_ >= 0) close(fd_);
  data_ = nullptr;
  size_ = 0;
  fd_ = -1;
}

}  // namespace fastdcp
