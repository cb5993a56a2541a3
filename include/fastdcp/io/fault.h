#pragma once
// Fault injection: a test-only seam, compiled in always and inert until a test arms it.
//
// Note [Fault injection]
// The I/O path asks `fault::injected("pwritev")` just before each system call it depends on; a
// nonzero answer is an errno, and the call is not made but fails with it. A test arms a failure
// with `fault::inject("pwritev", 3, ENOSPC)`: the third pwritev from now fails with ENOSPC (and,
// with times > 1, the calls after it too). Calls are named by the system call itself, so any
// component can guard its own calls with the same seam (userfaultfd, mprotect, ...). Unarmed, a
// check is one relaxed atomic load.

#include <string_view>

namespace fastdcp::fault {

// The `nth` (1-based) call named `call` from now, and the `times - 1` after it, fail with `error`.
void inject(std::string_view call, int nth, int error, int times = 1);
// Disarms every injected failure.
void clear();
// The errno the next `call` fails with, or 0 to make the call. Counts the call when armed.
int injected(std::string_view call);

// Arms failures for a scope (a test) and disarms them all at its end.
class Scope {
 public:
  Scope() = default;
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  ~Scope() { clear(); }
};

}  // namespace fastdcp::fault
