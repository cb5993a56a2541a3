#pragma once
// Fault injection: a test-only seam, compiled in always and inert until a test arms it.
//
// Note [Fault injection]
// A component asks `fault::injected(name)` just before each system call whose failure it must
// survive; a nonzero answer is an errno, and the call is not made but fails with it. Calls are
// named as the component's errors name them: the I/O path's by the system call ("pwritev",
// "fsync", ...), copy-on-write staging's by what the call does ("ioctl(UFFDIO_WRITEPROTECT)
// unprotecting", "poll on the userfaultfd", ...), so a test arms the name its error will show.
// `fault::inject("pwritev", 3, ENOSPC)` fails the third pwritev from now with ENOSPC (and, with
// times > 1, the calls after it too; kAlways: all of them). A `before` hook runs just before each
// of those calls, so a test can make another thread's change land right then; with error 0 the
// call is made after it. Arming a name again replaces what was armed for it; clear() (or a
// Scope's end) disarms everything.
//
// The userfaultfd fault-handler thread asks too, and a training thread waits on it, so asking
// takes no lock and allocates nothing: a name claims one slot of a fixed table for good (at
// most kMaxCalls names, each at most kMaxCallName bytes), armed under a mutex and published with a
// release store; asking scans the named slots with acquire loads and compares names in place.
// Unarmed, asking is one relaxed atomic load.

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace fastdcp::fault {

inline constexpr uint64_t kAlways = UINT64_MAX;
inline constexpr size_t kMaxCalls = 64;
inline constexpr size_t kMaxCallName = 63;

struct Fault {
  uint64_t nth = 1;    // the first call to fail, counted from arming (1: the next one)
  uint64_t times = 1;  // how many calls fail from there; kAlways: all of them
  int error = 0;       // the errno they fail with; 0: they are made, after `before`
  void (*before)(void* context) = nullptr;  // runs just before each of those calls
  void* context = nullptr;
};

// Arms `call`, replacing what was armed for it. Throws Error(kInvalidArgument) for a name longer
// than kMaxCallName or beyond kMaxCalls distinct names.
void inject(std::string_view call, const Fault& fault);
// The `nth` (1-based) call named `call` from now, and the `times - 1` after it, fail with `error`.
inline void inject(std::string_view call, uint64_t nth, int error, uint64_t times = 1) {
  inject(call, Fault{.nth = nth, .times = times, .error = error});
}
// Disarms every injected failure.
void clear() noexcept;
// The errno the next `call` fails with, or 0 to make the call. Counts the call when armed.
int injected(std::string_view call) noexcept;

// Arms failures for a scope (a test) and disarms them all at its end.
class Scope {
 public:
  Scope() = default;
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  ~Scope() { clear(); }
};

}  // namespace fastdcp::fault
