#pragma once
// Control API of the fake CUDA runtime (tests/fake_cuda/fake_cudart.cpp).
//
// The fake is loaded by fastdcp through CudaRuntime::load(FASTDCP_FAKE_CUDART) and never linked
// into the tests, so tests reach these functions with dlsym on a handle for the same path
// (FakeCudaControl below does that; dlopen of an already loaded path shares its state).
//
// Semantics in short:
//  - Device memory (cudaMalloc) is host memory tracked with its device.
//  - cudaMemcpyAsync only queues the copy; the queue is performed, in issue order, by
//    cudaEventSynchronize, cudaStreamSynchronize, cudaDeviceSynchronize, cudaMemcpy and cudaFree.
//  - Every CUDA call is appended to a call log, one line each, e.g.
//      "cudaEventRecord ev=0x55d0 stream=0x0"
//      "cudaStreamWaitEvent stream=0x55e0 ev=0x55d0 flags=0"
//      "cudaMemcpyAsync stream=0x55e0 n=4096 kind=2 dst=0x7f.. src=0x7f.."
//      "cudaEventSynchronize ev=0x55f0"
//      "cudaDeviceSynchronize"
//    Pointers are printed as 0x<hex> (null as 0x0). A failed call ends with " -> error <code>".
//    Misuse that real CUDA would turn into corruption is logged as a line starting "HAZARD ".

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Clears registrations, pending copies, the call log and injected failures. device_count >= 0
// fixes the device count; a negative value goes back to FAKE_CUDA_DEVICE_COUNT (default 1).
// Device allocations, streams and events stay valid: objects from earlier tests may still own them.
void fake_cuda_reset(int device_count);
// The (calls_before_failure + 1)-th later call of `api_name` (e.g. "cudaMemcpyAsync") returns
// `error_code` without doing anything; once.
void fake_cuda_fail(const char* api_name, int calls_before_failure, int error_code);
// The call log, newline-separated; valid until the next fake_cuda_call_log or fake_cuda_reset.
const char* fake_cuda_call_log(void);
// The size of the cudaHostRegister'ed range that contains `ptr` (staged buffers may lie inside a
// registered slab), or 0.
size_t fake_cuda_is_registered(const void* ptr);
size_t fake_cuda_registration_count(void);
size_t fake_cuda_pending_copies(void);

#ifdef __cplusplus
}  // extern "C"

#include <dlfcn.h>

#include <stdexcept>
#include <string>

// Resolves the control API from the fake runtime at `path` (loading it if needed).
class FakeCudaControl {
 public:
  explicit FakeCudaControl(const char* path) {
    handle_ = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) throw std::runtime_error(std::string("cannot load fake cudart: ") + dlerror());
    resolve(reset, "fake_cuda_reset");
    resolve(fail, "fake_cuda_fail");
    resolve(call_log_raw, "fake_cuda_call_log");
    resolve(is_registered, "fake_cuda_is_registered");
    resolve(registration_count, "fake_cuda_registration_count");
    resolve(pending_copies, "fake_cuda_pending_copies");
  }
  ~FakeCudaControl() {
    if (handle_ != nullptr) dlclose(handle_);
  }
  FakeCudaControl(const FakeCudaControl&) = delete;
  FakeCudaControl& operator=(const FakeCudaControl&) = delete;

  std::string call_log() const { return call_log_raw(); }

  void (*reset)(int) = nullptr;
  void (*fail)(const char*, int, int) = nullptr;
  const char* (*call_log_raw)() = nullptr;
  size_t (*is_registered)(const void*) = nullptr;
  size_t (*registration_count)() = nullptr;
  size_t (*pending_copies)() = nullptr;

 private:
  template <class Fn>
  void resolve(Fn& fn, const char* name) {
    fn = reinterpret_cast<Fn>(dlsym(handle_, name));
    if (fn == nullptr) throw std::runtime_error(std::string("fake cudart lacks ") + name);
  }
  void* handle_ = nullptr;
};
#endif
