#pragma once
// Internal to the staging engine: fault injection for the system calls copy-on-write staging
// depends on (Note [Syscall fault injection]).

#include <cstdint>

namespace fastdcp::detail {

// Note [Syscall fault injection]
// Each failure of these calls must end the save with its reason and never leave a training
// thread blocked or spinning (Note [Copy-on-write failures] in write_protect_copier.cpp). Most of
// them cannot be provoked from outside, so the copier asks injected_errno() before each call:
// always compiled, inert (one relaxed load) until a test arms it. It takes no lock and allocates
// nothing, so the fault handler may ask too.
enum class Syscall : uint8_t {
  kUserfaultfd,    // userfaultfd(2) or /dev/userfaultfd
  kApi,            // ioctl UFFDIO_API
  kRegister,       // ioctl UFFDIO_REGISTER
  kUnregister,     // ioctl UFFDIO_UNREGISTER
  kWriteProtect,   // ioctl UFFDIO_WRITEPROTECT, protecting
  kUnprotect,      // ioctl UFFDIO_WRITEPROTECT, unprotecting
  kWake,           // ioctl UFFDIO_WAKE
  kMmap,           // mmap of the copy's private state
  kCollapse,       // madvise MADV_COLLAPSE
  kPoll,           // poll on the userfaultfd
  kRead,           // read of the userfaultfd's messages
  kCount,
};

// How the call is named in errors, e.g. "ioctl(UFFDIO_WRITEPROTECT)".
const char* syscall_name(Syscall call) noexcept;

struct SyscallFault {
  uint64_t nth = 1;        // the first call to fail, counted from arming (1: the next one)
  uint64_t times = 1;      // how many calls fail from there; UINT64_MAX: all of them
  int errnum = 0;          // the errno they fail with; 0: they are made, after `before`
  void (*before)(void* context) = nullptr;  // runs just before each of those calls
  void* context = nullptr;
};

// Tests only: arms `call`, replacing what was armed for it. disarm_syscall_faults() clears all.
void arm_syscall_fault(Syscall call, const SyscallFault& fault);
void disarm_syscall_faults();

// Before each call: 0 to make it, or the errno it must fail with.
int injected_errno(Syscall call) noexcept;

}  // namespace fastdcp::detail
