#include "fastdcp/memory/cuda_runtime.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "fastdcp/common/error.h"

namespace fastdcp {

// The entry points fastdcp uses, with the runtime's C signatures (cudaError_t is an int).
struct CudaRuntime::Api {
  int (*GetDeviceCount)(int*);
  int (*GetDevice)(int*);
  int (*SetDevice)(int);
  const char* (*GetErrorString)(int);
  int (*HostRegister)(void*, size_t, unsigned);
  int (*HostUnregister)(void*);
  int (*StreamCreateWithFlags)(void**, unsigned);
  int (*StreamDestroy)(void*);
  int (*EventCreateWithFlags)(void**, unsigned);
  int (*EventDestroy)(void*);
  int (*EventRecord)(void*, void*);
  int (*StreamWaitEvent)(void*, void*, unsigned);
  int (*EventSynchronize)(void*);
  int (*MemcpyAsync)(void*, const void*, size_t, int, void*);
  int (*Memcpy)(void*, const void*, size_t, int);
  int (*Malloc)(void**, size_t);
  int (*Free)(void*);
};

namespace {
constexpr unsigned kHostRegisterPortable = 0x01;
constexpr unsigned kStreamNonBlocking = 0x01;
constexpr unsigned kEventDisableTiming = 0x02;
constexpr int kMemcpyHostToDevice = 1;
constexpr int kMemcpyDeviceToHost = 2;

const char* const kLibraryNames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so",
                                     "/usr/local/cuda/lib64/libcudart.so"};
}  // namespace

std::shared_ptr<CudaRuntime> CudaRuntime::unavailable(const std::string& reason) {
  std::shared_ptr<CudaRuntime> runtime(new CudaRuntime());
  runtime->reason_ = reason;
  return runtime;
}

std::shared_ptr<CudaRuntime> CudaRuntime::load(const std::string& library_path) {
  std::shared_ptr<CudaRuntime> runtime(new CudaRuntime());
  runtime->library_path_ = library_path;
  // Prefer the copy a framework already loaded, so that we share its CUDA context.
  void* handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  runtime->owns_handle_ = handle == nullptr;
  if (!handle) handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    runtime->reason_ = "cannot load the CUDA runtime " + library_path + ": " + (why ? why : "unknown error");
    return runtime;
  }
  runtime->handle_ = handle;
  auto api = std::make_unique<Api>();
  bool complete = true;
  std::string missing;
  auto bind = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(handle, name));
    if (!fn) {
      complete = false;
      missing = name;
    }
  };
  bind(api->GetDeviceCount, "cudaGetDeviceCount");
  bind(api->GetDevice, "cudaGetDevice");
  bind(api->SetDevice, "cudaSetDevice");
  bind(api->GetErrorString, "cudaGetErrorString");
  bind(api->HostRegister, "cudaHostRegister");
  bind(api->HostUnregister, "cudaHostUnregister");
  bind(api->StreamCreateWithFlags, "cudaStreamCreateWithFlags");
  bind(api->StreamDestroy, "cudaStreamDestroy");
  bind(api->EventCreateWithFlags, "cudaEventCreateWithFlags");
  bind(api->EventDestroy, "cudaEventDestroy");
  bind(api->EventRecord, "cudaEventRecord");
  bind(api->StreamWaitEvent, "cudaStreamWaitEvent");
  bind(api->EventSynchronize, "cudaEventSynchronize");
  bind(api->MemcpyAsync, "cudaMemcpyAsync");
  bind(api->Memcpy, "cudaMemcpy");
  bind(api->Malloc, "cudaMalloc");
  bind(api->Free, "cudaFree");
  if (!complete) {
    runtime->reason_ = library_path + " lacks " + missing;
    return runtime;
  }
  runtime->api_ = std::move(api);
  int count = 0;
  const int status = runtime->api_->GetDeviceCount(&count);
  if (status != 0) {
    runtime->reason_ = "cudaGetDeviceCount failed: " + std::string(runtime->api_->GetErrorString(status)) +
                       " (error " + std::to_string(status) + ")";
    return runtime;
  }
  if (count <= 0) {
    runtime->reason_ = "no CUDA device";
    return runtime;
  }
  runtime->device_count_ = count;
  return runtime;
}

std::shared_ptr<CudaRuntime> CudaRuntime::instance() {
  static std::once_flag once;
  static std::shared_ptr<CudaRuntime> runtime;
  std::call_once(once, [] {
    if (const char* disabled = std::getenv("FASTDCP_DISABLE_CUDA"); disabled && std::string(disabled) == "1") {
      runtime = unavailable("disabled by FASTDCP_DISABLE_CUDA=1");
      return;
    }
    if (const char* path = std::getenv("FASTDCP_CUDART"); path && *path) {
      runtime = load(path);
      return;
    }
    std::string reasons;
    for (const char* name : kLibraryNames) {
      runtime = load(name);
      if (runtime->available() || runtime->api_) return;  // found a runtime: its verdict stands
      reasons += (reasons.empty() ? "" : "; ") + runtime->reason_;
    }
    runtime = unavailable("no CUDA runtime found (" + reasons + ")");
  });
  return runtime;
}

CudaRuntime::~CudaRuntime() {
  if (handle_ && owns_handle_) dlclose(handle_);
}

void CudaRuntime::check(int status, const char* call) const {
  if (status == 0) return;
  throw Error(ErrorCode::kCudaError, std::string(call) + " failed: " + api_->GetErrorString(status) + " (error " +
                                         std::to_string(status) + ")");
}

#define FASTDCP_REQUIRE_CUDA(what)                                                                  \
  if (!api_) throw Error(ErrorCode::kUnavailable, std::string(what) + ": CUDA is unavailable: " + reason_)

void CudaRuntime::host_register(void* ptr, size_t nbytes) const {
  FASTDCP_REQUIRE_CUDA("cudaHostRegister");
  check(api_->HostRegister(ptr, nbytes, kHostRegisterPortable), "cudaHostRegister");
}

bool CudaRuntime::host_unregister(void* ptr) const noexcept { return api_ && api_->HostUnregister(ptr) == 0; }

int CudaRuntime::current_device() const {
  FASTDCP_REQUIRE_CUDA("cudaGetDevice");
  int device = 0;
  check(api_->GetDevice(&device), "cudaGetDevice");
  return device;
}

void CudaRuntime::set_device(int device) const {
  FASTDCP_REQUIRE_CUDA("cudaSetDevice");
  check(api_->SetDevice(device), "cudaSetDevice");
}

CudaStream CudaRuntime::create_stream(int device) const {
  CudaDeviceGuard guard(*this, device);
  void* stream = nullptr;
  check(api_->StreamCreateWithFlags(&stream, kStreamNonBlocking), "cudaStreamCreateWithFlags");
  return stream;
}

void CudaRuntime::destroy_stream(int device, CudaStream stream) const noexcept {
  if (api_) destroy_on_device(device, api_->StreamDestroy, stream);
}

// Destructors' path: errors are ignored and the caller's device is restored.
void CudaRuntime::destroy_on_device(int device, int (*destroy)(void*), void* handle) const noexcept {
  if (!handle) return;
  int previous = 0;
  api_->GetDevice(&previous);
  api_->SetDevice(device);
  destroy(handle);
  api_->SetDevice(previous);
}

CudaEvent CudaRuntime::create_event(int device) const {
  CudaDeviceGuard guard(*this, device);
  void* event = nullptr;
  check(api_->EventCreateWithFlags(&event, kEventDisableTiming), "cudaEventCreateWithFlags");
  return event;
}

void CudaRuntime::destroy_event(int device, CudaEvent event) const noexcept {
  if (api_) destroy_on_device(device, api_->EventDestroy, event);
}

void CudaRuntime::record_event(CudaEvent event, CudaStream stream) const {
  FASTDCP_REQUIRE_CUDA("cudaEventRecord");
  check(api_->EventRecord(event, stream), "cudaEventRecord");
}

void CudaRuntime::stream_wait_event(CudaStream stream, CudaEvent event) const {
  FASTDCP_REQUIRE_CUDA("cudaStreamWaitEvent");
  check(api_->StreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent");
}

void CudaRuntime::event_synchronize(CudaEvent event) const {
  FASTDCP_REQUIRE_CUDA("cudaEventSynchronize");
  check(api_->EventSynchronize(event), "cudaEventSynchronize");
}

void CudaRuntime::memcpy_device_to_host_async(void* dst, const void* src, size_t nbytes, CudaStream stream) const {
  FASTDCP_REQUIRE_CUDA("cudaMemcpyAsync");
  check(api_->MemcpyAsync(dst, src, nbytes, kMemcpyDeviceToHost, stream), "cudaMemcpyAsync(device to host)");
}

void* CudaRuntime::device_malloc(size_t nbytes) const {
  FASTDCP_REQUIRE_CUDA("cudaMalloc");
  void* ptr = nullptr;
  check(api_->Malloc(&ptr, nbytes), "cudaMalloc");
  return ptr;
}

void CudaRuntime::device_free(void* ptr) const noexcept {
  if (api_ && ptr) api_->Free(ptr);
}

void CudaRuntime::memcpy_host_to_device(void* dst, const void* src, size_t nbytes) const {
  FASTDCP_REQUIRE_CUDA("cudaMemcpy");
  check(api_->Memcpy(dst, src, nbytes, kMemcpyHostToDevice), "cudaMemcpy(host to device)");
}

void CudaRuntime::memcpy_device_to_host(void* dst, const void* src, size_t nbytes) const {
  FASTDCP_REQUIRE_CUDA("cudaMemcpy");
  check(api_->Memcpy(dst, src, nbytes, kMemcpyDeviceToHost), "cudaMemcpy(device to host)");
}

CudaDeviceGuard::CudaDeviceGuard(const CudaRuntime& runtime, int device)
    : runtime_(runtime), previous_(runtime.current_device()) {
  if (device != previous_) runtime_.set_device(device);
}

CudaDeviceGuard::~CudaDeviceGuard() {
  try {
    runtime_.set_device(previous_);
  } catch (...) {
  }
}

}  // namespace fastdcp
