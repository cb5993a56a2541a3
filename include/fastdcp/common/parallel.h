#pragma once
// Runs independent work items on a few threads: for I/O and checksums, where each call is long
// enough (milliseconds) that starting threads per call costs nothing measurable.

#include <cstddef>
#include <functional>

namespace fastdcp {

// The number of threads to use when the caller asked for `requested` (0: one per core, at least 2).
int resolve_thread_count(int requested) noexcept;

// Calls work(i) for every i in [0, count) on up to `threads` threads (the caller's among them),
// items taken in increasing order. The first exception stops the handing out of further items
// and is rethrown once all threads have finished.
void parallel_for(size_t count, int threads, const std::function<void(size_t)>& work);

}  // namespace fastdcp
