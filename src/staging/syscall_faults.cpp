#include "staging/syscall_faults.h"

#include <atomic>

namespace fastdcp::detail {
namespace {

struct Armed {
  std::atomic<bool> on{false};
  std::atomic<uint64_t> calls{0};  // calls seen since arming
  uint64_t first = 0;              // [first, last] fail; set before `on`, read after it
  uint64_t last = 0;
  int errnum = 0;
  void (*before)(void*) = nullptr;
  void* context = nullptr;
};

Armed g_armed[static_cast<int>(Syscall::kCount)];

}  // namespace

const char* syscall_name(Syscall call) noexcept {
  switch (call) {
    case Syscall::kUserfaultfd: return "userfaultfd";
    case Syscall::kApi: return "ioctl(UFFDIO_API)";
    case Syscall::kRegister: return "ioctl(UFFDIO_REGISTER)";
    case Syscall::kUnregister: return "ioctl(UFFDIO_UNREGISTER)";
    case Syscall::kWriteProtect: return "ioctl(UFFDIO_WRITEPROTECT) protecting";
    case Syscall::kUnprotect: return "ioctl(UFFDIO_WRITEPROTECT) unprotecting";
    case Syscall::kWake: return "ioctl(UFFDIO_WAKE)";
    case Syscall::kMmap: return "mmap";
    case Syscall::kCollapse: return "madvise(MADV_COLLAPSE)";
    case Syscall::kPoll: return "poll on the userfaultfd";
    case Syscall::kRead: return "read of the userfaultfd";
    case Syscall::kCount: break;
  }
  return "?";
}

void arm_syscall_fault(Syscall call, const SyscallFault& fault) {
  Armed& armed = g_armed[static_cast<int>(call)];
  armed.on.store(false);
  armed.calls.store(0);
  armed.first = fault.nth;
  armed.last = fault.times > UINT64_MAX - fault.nth ? UINT64_MAX : fault.nth + fault.times - 1;
  armed.errnum = fault.errnum;
  armed.before = fault.before;
  armed.context = fault.context;
  armed.on.store(true, std::memory_order_release);
}

void disarm_syscall_faults() {
  for (Armed& armed : g_armed) armed.on.store(false);
}

int injected_errno(Syscall call) noexcept {
  Armed& armed = g_armed[static_cast<int>(call)];
  if (!armed.on.load(std::memory_order_acquire)) return 0;
  const uint64_t n = armed.calls.fetch_add(1) + 1;
  if (n < armed.first || n > armed.last) return 0;
  if (armed.before) armed.before(armed.context);
  return armed.errnum;
}

}  // namespace fastdcp::detail
