#pragma once
// The CUDA runtime, loaded at run time.
//
// Note [CUDA is optional]
// fastdcp neither links against nor needs CUDA to build or run. CudaRuntime::instance() looks for a
// libcudart already loaded into the process (for example by PyTorch), then for one on the library
// path, and resolves the few entry points fastdcp uses. "No library", "no driver" and "no device"
// all mean "no accelerator": available() is false and unavailable_reason() says why. Tests load a
// fake runtime with CudaRuntime::load(path) and hand it to the components that use CUDA.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace fastdcp {

using CudaStream = void*;  // cudaStream_t
using CudaEvent = void*;   // cudaEvent_t

class CudaRuntime {
 public:
  // The process-wide runtime; FASTDCP_CUDART names a library to load instead of searching, and
  // FASTDCP_DISABLE_CUDA=1 makes it unavailable.
  static std::shared_ptr<CudaRuntime> instance();
  // Loads the runtime from `library_path`. Never throws: failures make it unavailable.
  static std::shared_ptr<CudaRuntime> load(const std::string& library_path);
  // A runtime that is never available (for CPU-only configurations and tests).
  static std::shared_ptr<CudaRuntime> unavailable(const std::string& reason);

  ~CudaRuntime();
  CudaRuntime(const CudaRuntime&) = delete;
  CudaRuntime& operator=(const CudaRuntime&) = delete;

  bool available() const { return device_count_ > 0; }
  int device_count() const { return device_count_; }
  const std::string& unavailable_reason() const { return reason_; }
  const std::string& library_path() const { return library_path_; }

  // Each call below throws Error(kCudaError) naming the CUDA call and its error on failure.
  // Registers host memory as pinned (portable across devices).
  void host_register(void* ptr, size_t nbytes) const;
  // Unregisters; returns false instead of throwing (used in destructors).
  bool host_unregister(void* ptr) const noexcept;
  int current_device() const;
  void set_device(int device) const;
  CudaStream create_stream(int device) const;  // non-blocking w.r.t. the legacy default stream
  void destroy_stream(int device, CudaStream stream) const noexcept;
  CudaEvent create_event(int device) const;    // timing disabled
  void destroy_event(int device, CudaEvent event) const noexcept;
  void record_event(CudaEvent event, CudaStream stream) const;
  void stream_wait_event(CudaStream stream, CudaEvent event) const;
  void event_synchronize(CudaEvent event) const;
  void memcpy_device_to_host_async(void* dst, const void* src, size_t nbytes, CudaStream stream) const;
  // For tests and benchmarks: plain device allocations.
  void* device_malloc(size_t nbytes) const;
  void device_free(void* ptr) const noexcept;
  void memcpy_host_to_device(void* dst, const void* src, size_t nbytes) const;
  void memcpy_device_to_host(void* dst, const void* src, size_t nbytes) const;

 private:
  struct Api;
  CudaRuntime() = default;
  void check(int status, const char* call) const;
  void destroy_on_device(int device, int (*destroy)(void*), void* handle) const noexcept;

  void* handle_ = nullptr;  // dlopen handle (not owned when the library was already loaded)
  bool owns_handle_ = false;
  std::unique_ptr<Api> api_;
  int device_count_ = 0;
  std::string reason_;
  std::string library_path_;
};

// Sets the calling thread's current device for a scope and restores the previous one.
class CudaDeviceGuard {
 public:
  CudaDeviceGuard(const CudaRuntime& runtime, int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  const CudaRuntime& runtime_;
  int previous_;
};

}  // namespace fastdcp
