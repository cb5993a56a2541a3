// A fake libcudart for tests: the entry points fastdcp resolves, backed by host memory, with a
// deferred copy queue (so missing waits show up as stale data), a call log and error injection.
// See fake_cudart_control.h for the semantics tests rely on.

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "fake_cudart_control.h"

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// cudaError_t values, as in the real runtime.
constexpr int kSuccess = 0;
constexpr int kErrorInvalidValue = 1;
constexpr int kErrorMemoryAllocation = 2;
constexpr int kErrorNoDevice = 100;
constexpr int kErrorInvalidDevice = 101;
constexpr int kErrorInvalidResourceHandle = 400;
constexpr int kErrorHostMemoryAlreadyRegistered = 712;
constexpr int kErrorHostMemoryNotRegistered = 713;

// cudaMemcpyKind
constexpr int kHostToHost = 0;
constexpr int kHostToDevice = 1;
constexpr int kDeviceToHost = 2;
constexpr int kDeviceToDevice = 3;
constexpr int kDefault = 4;

struct DeviceAllocation {
  size_t size = 0;
  int device = 0;
};
struct StreamInfo {
  int device = 0;
  unsigned flags = 0;
};
struct EventInfo {
  int device = 0;
  unsigned flags = 0;
};
struct PendingCopy {
  void* dst;
  const void* src;
  size_t n;
};
struct Failure {
  int remaining;
  int code;
};

struct State {
  std::mutex mutex;
  int device_count_override = -1;
  std::map<uintptr_t, DeviceAllocation> device_memory;  // by base address
  std::map<uintptr_t, size_t> registrations;             // host ranges by base address
  std::unordered_map<void*, StreamInfo> streams;
  std::unordered_map<void*, EventInfo> events;
  std::deque<PendingCopy> pending;
  std::string log;
  std::string log_snapshot;
  std::unordered_map<std::string, std::vector<Failure>> failures;
  std::map<int, std::unique_ptr<std::string>> error_strings;
};

// Never destroyed: objects torn down at exit may still call in.
State& state() {
  static State* s = new State;
  return *s;
}

thread_local int current_device = 0;

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%" PRIxPTR, reinterpret_cast<uintptr_t>(p));
  return buf;
}

int device_count_locked(const State& s) {
  if (s.device_count_override >= 0) return s.device_count_override;
  const char* env = std::getenv("FAKE_CUDA_DEVICE_COUNT");
  if (env == nullptr || *env == '\0') return 1;
  long n = std::strtol(env, nullptr, 10);
  return n < 0 ? 0 : static_cast<int>(n);
}

// Returns the injected error for this call of `api`, or 0.
int injected_failure(State& s, const char* api) {
  auto it = s.failures.find(api);
  if (it == s.failures.end()) return 0;
  auto& list = it->second;
  int code = 0;
  for (size_t i = 0; i < list.size();) {
    if (code == 0 && list[i].remaining == 0) {
      code = list[i].code;
      list.erase(list.begin() + static_cast<std::ptrdiff_t>(i));
      continue;
    }
    if (list[i].remaining > 0) --list[i].remaining;
    ++i;
  }
  if (list.empty()) s.failures.erase(it);
  return code;
}

int finish(State& s, const std::string& line, int rc) {
  s.log += line;
  if (rc != kSuccess) s.log += " -> error " + std::to_string(rc);
  s.log += '\n';
  return rc;
}

// The device allocation containing [p, p + n), or nullptr.
const DeviceAllocation* find_device_range(const State& s, const void* p, size_t n) {
  auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = s.device_memory.upper_bound(addr);
  if (it == s.device_memory.begin()) return nullptr;
  --it;
  if (addr < it->first || addr + n > it->first + it->second.size) return nullptr;
  return &it->second;
}

bool is_device_pointer(const State& s, const void* p) { return find_device_range(s, p, 1) != nullptr; }

// Checks the pointers against the copy kind, as the real runtime does with UVA.
bool copy_is_valid(const State& s, void* dst, const void* src, size_t n, int kind) {
  if (dst == nullptr || src == nullptr) return false;
  switch (kind) {
    case kHostToHost:
      return !is_device_pointer(s, dst) && !is_device_pointer(s, src);
    case kHostToDevice:
      return find_device_range(s, dst, n) != nullptr && !is_device_pointer(s, src);
    case kDeviceToHost:
      return find_device_range(s, src, n) != nullptr && !is_device_pointer(s, dst);
    case kDeviceToDevice:
      return find_device_range(s, src, n) != nullptr && find_device_range(s, dst, n) != nullptr;
    case kDefault:
      return true;
    default:
      return false;
  }
}

void flush(State& s) {
  for (const auto& copy : s.pending) std::memcpy(copy.dst, copy.src, copy.n);
  s.pending.clear();
}

// The null stream, cudaStreamLegacy (0x1) and cudaStreamPerThread (0x2) belong to the current device.
bool is_builtin_stream(const void* stream) { return reinterpret_cast<uintptr_t>(stream) <= 2; }

bool stream_device(const State& s, void* stream, int* device) {
  if (is_builtin_stream(stream)) {
    *device = current_device;
    return true;
  }
  auto it = s.streams.find(stream);
  if (it == s.streams.end()) return false;
  *device = it->second.device;
  return true;
}

void* new_handle() { return ::operator new(16); }
void free_handle(void* h) { ::operator delete(h); }

}  // namespace

// ---- CUDA runtime entry points ----

FAKE_EXPORT int cudaGetDeviceCount(int* count) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  if (int rc = injected_failure(s, "cudaGetDeviceCount")) return finish(s, "cudaGetDeviceCount", rc);
  if (count == nullptr) return finish(s, "cudaGetDeviceCount", kErrorInvalidValue);
  int n = device_count_locked(s);
  *count = n;
  return finish(s, "cudaGetDeviceCount count=" + std::to_string(n), n == 0 ? kErrorNoDevice : kSuccess);
}

FAKE_EXPORT int cudaGetDevice(int* device) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  if (int rc = injected_failure(s, "cudaGetDevice")) return finish(s, "cudaGetDevice", rc);
  if (device == nullptr) return finish(s, "cudaGetDevice", kErrorInvalidValue);
  if (device_count_locked(s) == 0) return finish(s, "cudaGetDevice", kErrorNoDevice);
  *device = current_device;
  return finish(s, "cudaGetDevice device=" + std::to_string(current_device), kSuccess);
}

FAKE_EXPORT int cudaSetDevice(int device) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaSetDevice device=" + std::to_string(device);
  if (int rc = injected_failure(s, "cudaSetDevice")) return finish(s, line, rc);
  int count = device_count_locked(s);
  if (count == 0) return finish(s, line, kErrorNoDevice);
  if (device < 0 || device >= count) return finish(s, line, kErrorInvalidDevice);
  current_device = device;
  return finish(s, line, kSuccess);
}

FAKE_EXPORT const char* cudaGetErrorString(int error) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  auto& slot = s.error_strings[error];
  if (!slot) slot = std::make_unique<std::string>("fake cuda error " + std::to_string(error));
  return slot->c_str();
}

FAKE_EXPORT int cudaHostRegister(void* ptr, size_t size, unsigned flags) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaHostRegister ptr=" + hex(ptr) + " n=" + std::to_string(size) + " flags=" + std::to_string(flags);
  if (int rc = injected_failure(s, "cudaHostRegister")) return finish(s, line, rc);
  if (device_count_locked(s) == 0) return finish(s, line, kErrorNoDevice);
  if (ptr == nullptr || size == 0 || is_device_pointer(s, ptr)) return finish(s, line, kErrorInvalidValue);
  auto begin = reinterpret_cast<uintptr_t>(ptr);
  auto end = begin + size;
  // Any overlap with a registered range is refused, as by the real runtime.
  auto it = s.registrations.lower_bound(end);
  if (it != s.registrations.begin()) {
    --it;
    if (it->first + it->second > begin) return finish(s, line, kErrorHostMemoryAlreadyRegistered);
  }
  s.registrations.emplace(begin, size);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaHostUnregister(void* ptr) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaHostUnregister ptr=" + hex(ptr);
  if (int rc = injected_failure(s, "cudaHostUnregister")) return finish(s, line, rc);
  auto it = s.registrations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == s.registrations.end()) return finish(s, line, kErrorHostMemoryNotRegistered);
  // Copies still queued into this range would land in memory about to be unmapped: report them
  // and drop them instead of corrupting the process.
  auto begin = it->first;
  auto end = begin + it->second;
  size_t dropped = 0;
  for (auto c = s.pending.begin(); c != s.pending.end();) {
    auto dst = reinterpret_cast<uintptr_t>(c->dst);
    if (dst < end && dst + c->n > begin) {
      c = s.pending.erase(c);
      ++dropped;
    } else {
      ++c;
    }
  }
  if (dropped > 0) {
    s.log += "HAZARD cudaHostUnregister with pending copies ptr=" + hex(ptr) + " dropped=" + std::to_string(dropped) + "\n";
  }
  s.registrations.erase(it);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaStreamCreateWithFlags(void** stream, unsigned flags) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaStreamCreateWithFlags";
  if (int rc = injected_failure(s, "cudaStreamCreateWithFlags")) return finish(s, line, rc);
  if (stream == nullptr) return finish(s, line, kErrorInvalidValue);
  if (device_count_locked(s) == 0) return finish(s, line, kErrorNoDevice);
  void* h = new_handle();
  s.streams[h] = StreamInfo{current_device, flags};
  *stream = h;
  line += " stream=" + hex(h) + " flags=" + std::to_string(flags) + " device=" + std::to_string(current_device);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaStreamDestroy(void* stream) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaStreamDestroy stream=" + hex(stream);
  if (int rc = injected_failure(s, "cudaStreamDestroy")) return finish(s, line, rc);
  auto it = s.streams.find(stream);
  if (it == s.streams.end()) return finish(s, line, kErrorInvalidResourceHandle);
  s.streams.erase(it);
  free_handle(stream);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaEventCreateWithFlags(void** event, unsigned flags) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaEventCreateWithFlags";
  if (int rc = injected_failure(s, "cudaEventCreateWithFlags")) return finish(s, line, rc);
  if (event == nullptr) return finish(s, line, kErrorInvalidValue);
  if (device_count_locked(s) == 0) return finish(s, line, kErrorNoDevice);
  void* h = new_handle();
  s.events[h] = EventInfo{current_device, flags};
  *event = h;
  line += " ev=" + hex(h) + " flags=" + std::to_string(flags) + " device=" + std::to_string(current_device);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaEventDestroy(void* event) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaEventDestroy ev=" + hex(event);
  if (int rc = injected_failure(s, "cudaEventDestroy")) return finish(s, line, rc);
  auto it = s.events.find(event);
  if (it == s.events.end()) return finish(s, line, kErrorInvalidResourceHandle);
  s.events.erase(it);
  free_handle(event);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaEventRecord(void* event, void* stream) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaEventRecord ev=" + hex(event) + " stream=" + hex(stream);
  if (int rc = injected_failure(s, "cudaEventRecord")) return finish(s, line, rc);
  auto it = s.events.find(event);
  int device = 0;
  if (it == s.events.end() || !stream_device(s, stream, &device)) return finish(s, line, kErrorInvalidResourceHandle);
  // The real runtime requires the event and the stream to belong to one device.
  if (device != it->second.device) return finish(s, line, kErrorInvalidResourceHandle);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaStreamWaitEvent(void* stream, void* event, unsigned flags) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaStreamWaitEvent stream=" + hex(stream) + " ev=" + hex(event) + " flags=" + std::to_string(flags);
  if (int rc = injected_failure(s, "cudaStreamWaitEvent")) return finish(s, line, rc);
  int device = 0;
  if (s.events.count(event) == 0 || !stream_device(s, stream, &device)) {
    return finish(s, line, kErrorInvalidResourceHandle);
  }
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaEventSynchronize(void* event) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaEventSynchronize ev=" + hex(event);
  if (int rc = injected_failure(s, "cudaEventSynchronize")) return finish(s, line, rc);
  if (s.events.count(event) == 0) return finish(s, line, kErrorInvalidResourceHandle);
  flush(s);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaMemcpyAsync(void* dst, const void* src, size_t n, int kind, void* stream) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaMemcpyAsync stream=" + hex(stream) + " n=" + std::to_string(n) + " kind=" + std::to_string(kind) +
                     " dst=" + hex(dst) + " src=" + hex(src);
  if (int rc = injected_failure(s, "cudaMemcpyAsync")) return finish(s, line, rc);
  int device = 0;
  if (!stream_device(s, stream, &device)) return finish(s, line, kErrorInvalidResourceHandle);
  if (n == 0) return finish(s, line, kSuccess);
  if (!copy_is_valid(s, dst, src, n, kind)) return finish(s, line, kErrorInvalidValue);
  s.pending.push_back(PendingCopy{dst, src, n});
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaMemcpy(void* dst, const void* src, size_t n, int kind) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaMemcpy n=" + std::to_string(n) + " kind=" + std::to_string(kind) + " dst=" + hex(dst) +
                     " src=" + hex(src);
  if (int rc = injected_failure(s, "cudaMemcpy")) return finish(s, line, rc);
  // A synchronous copy on the legacy stream waits for everything queued before it.
  flush(s);
  if (n == 0) return finish(s, line, kSuccess);
  if (!copy_is_valid(s, dst, src, n, kind)) return finish(s, line, kErrorInvalidValue);
  std::memcpy(dst, src, n);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaMalloc(void** ptr, size_t n) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaMalloc n=" + std::to_string(n);
  if (int rc = injected_failure(s, "cudaMalloc")) return finish(s, line, rc);
  if (ptr == nullptr) return finish(s, line, kErrorInvalidValue);
  if (device_count_locked(s) == 0) return finish(s, line, kErrorNoDevice);
  if (n == 0) {
    *ptr = nullptr;
    return finish(s, line + " ptr=0x0", kSuccess);
  }
  // 256-byte aligned like real device allocations.
  size_t rounded = (n + 255) / 256 * 256;
  void* p = std::aligned_alloc(256, rounded);
  if (p == nullptr) return finish(s, line, kErrorMemoryAllocation);
  s.device_memory[reinterpret_cast<uintptr_t>(p)] = DeviceAllocation{n, current_device};
  *ptr = p;
  return finish(s, line + " ptr=" + hex(p) + " device=" + std::to_string(current_device), kSuccess);
}

FAKE_EXPORT int cudaFree(void* ptr) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaFree ptr=" + hex(ptr);
  if (int rc = injected_failure(s, "cudaFree")) return finish(s, line, rc);
  if (ptr == nullptr) return finish(s, line, kSuccess);
  auto it = s.device_memory.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == s.device_memory.end()) return finish(s, line, kErrorInvalidValue);
  // cudaFree synchronizes the device, so queued copies from this memory complete first.
  flush(s);
  s.device_memory.erase(it);
  std::free(ptr);
  return finish(s, line, kSuccess);
}

FAKE_EXPORT int cudaDeviceSynchronize() {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  if (int rc = injected_failure(s, "cudaDeviceSynchronize")) return finish(s, "cudaDeviceSynchronize", rc);
  flush(s);
  return finish(s, "cudaDeviceSynchronize", kSuccess);
}

FAKE_EXPORT int cudaStreamSynchronize(void* stream) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  std::string line = "cudaStreamSynchronize stream=" + hex(stream);
  if (int rc = injected_failure(s, "cudaStreamSynchronize")) return finish(s, line, rc);
  int device = 0;
  if (!stream_device(s, stream, &device)) return finish(s, line, kErrorInvalidResourceHandle);
  flush(s);
  return finish(s, line, kSuccess);
}

// ---- Control API ----

FAKE_EXPORT void fake_cuda_reset(int device_count) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  s.device_count_override = device_count >= 0 ? device_count : -1;
  s.registrations.clear();
  s.pending.clear();
  s.log.clear();
  s.log_snapshot.clear();
  s.failures.clear();
  current_device = 0;
}

FAKE_EXPORT void fake_cuda_fail(const char* api_name, int calls_before_failure, int error_code) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  if (api_name == nullptr || error_code == kSuccess) return;
  s.failures[api_name].push_back(Failure{calls_before_failure < 0 ? 0 : calls_before_failure, error_code});
}

FAKE_EXPORT const char* fake_cuda_call_log() {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  s.log_snapshot = s.log;
  return s.log_snapshot.c_str();
}

FAKE_EXPORT size_t fake_cuda_is_registered(const void* ptr) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  auto addr = reinterpret_cast<uintptr_t>(ptr);
  auto it = s.registrations.upper_bound(addr);
  if (it == s.registrations.begin()) return 0;
  --it;
  return addr < it->first + it->second ? it->second : 0;
}

FAKE_EXPORT size_t fake_cuda_registration_count() {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  return s.registrations.size();
}

FAKE_EXPORT size_t fake_cuda_pending_copies() {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  return s.pending.size();
}
