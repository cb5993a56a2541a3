#pragma once
// Runs independent work items on a few threads: for I/O and checksums, where each call is long
// enough (milliseconds) that starting threads per call costs nothing measurable.

#include <cstddef>
#include <functional>
#include <system_error>
#include <thread>
#include <utility>

namespace fastdcp {

// Throws Error(kResourceExhausted) for a `what` thread that could not start (errnum: EAGAIN from
// pthread_create): says how much address space its stack reserves, the limits, and what to change.
[[noreturn]] void throw_thread_start_error(const char* what, int errnum);

// A new thread running `f`; see throw_thread_start_error for a thread the system refuses (under
// `ulimit -v`, every thread's stack must fit in the address space left).
template <class Thread = std::thread, class F>
Thread start_thread(const char* what, F&& f) {
  try {
    return Thread(std::forward<F>(f));
  } catch (const std::system_error& e) {
    throw_thread_start_error(what, e.code().value());
  }
}

// The number of threads to use when the caller asked for `requested` (0: one per core, at least 2).
int resolve_thread_count(int requested) noexcept;

// Calls work(i) for every i in [0, count) on up to `threads` threads (the caller's among them),
// items taken in increasing order. The first exception stops the handing out of further items
// and is rethrown once all threads have finished. Where fewer threads can start, the work runs on
// those that did (the caller's at least), with a warning.
void parallel_for(size_t count, int threads, const std::function<void(size_t)>& work);

}  // namespace fastdcp
